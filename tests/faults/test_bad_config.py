"""Bad run configs are refused before any process group exists, with a message naming the field (or
file and line), the value and the fix. Most cases go through the Python API (fast); a few through
``ep-train plan`` and ``python -m ep_train.train``, which must exit 2 with ``error:`` and no traceback."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ep_train.config import load_config, parse_overrides, validate

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Case:
    id: str
    text: str = ""  # the config file's content ({tmp} = the test's temp folder)
    expect: tuple[str, ...] = ()  # every one must appear in the message: field / file:line, value, fix
    name: str = "c.yaml"
    overrides: list[str] = field(default_factory=list)  # command-line style, e.g. ["--lr", "nan"]
    world_size: int | None = None  # run validate(cfg, world_size=...) after loading


CASES = [
    # --- duplicates: YAML and JSON keep the last one silently
    Case("dup-yaml-key", "train:\n  learning_rate: 0.1\n  seed: 3\n  learning_rate: 0.2\n",
         ("c.yaml:4", "'learning_rate' appears twice", "first on line 2", "delete one")),
    Case("dup-yaml-section", "train:\n  seed: 1\nmodel:\n  num_layers: 2\ntrain:\n  seed: 2\n",
         ("c.yaml:5", "'train' appears twice", "first on line 1", "delete one")),
    Case("dup-alias-and-name", "lr: 0.1\ntrain:\n  learning_rate: 0.2\n",
         ("sets train.learning_rate twice", "'lr'", "'train.learning_rate'", "keep one")),
    Case("dup-json-key", '{"train": {"seed": 1,\n  "seed": 2}}\n',
         ("c.json:2", "'seed' appears twice", "first on line 1", "delete one"), name="c.json"),
    # ... and so did the command line (under SLURM a user's --resume replaced the script's --resume auto)
    Case("dup-override-alias", "", ("override --train.learning_rate '0.2' sets train.learning_rate again",
                                    "already --lr '0.1'", "give the field once"),
         overrides=["--lr", "0.1", "--train.learning_rate", "0.2"]),
    Case("dup-override-same-name", "", ("override --resume 'auto' sets train.resume again",
                                        "already --resume 'runs/x/checkpoints/step_100'"),
         overrides=["--resume", "runs/x/checkpoints/step_100", "--resume=auto"]),
    # --- syntax errors say which file and line
    Case("yaml-bad-indent", "model:\n  hidden_size: 64\n bad: 3\n", ("c.yaml:3", "invalid YAML", "fix the syntax")),
    Case("yaml-unclosed-bracket", "train:\n  inject_nonfinite_steps: [1, 2\n",
         ("c.yaml:3", "invalid YAML", "began on line 2", "unclosed")),
    Case("json-trailing-comma", '{"train": {"seed": 1,}}', ("c.json:1:", "invalid JSON", "trailing commas"),
         name="c.json"),
    Case("not-a-mapping", "- 1\n- 2\n", ("must hold a mapping", "got list", "'train:'")),
    Case("not-utf8", "\udcff", ("not UTF-8", "YAML or JSON")),
    # --- a safe loader: python tags are refused, never run
    Case("yaml-python-apply", "train:\n  seed: !!python/object/apply:os.system ['touch {tmp}/pwned']\n",
         ("c.yaml:2", "python/object/apply:os.system", "refused", "write the plain value")),
    Case("yaml-python-name", "model: !!python/name:os.system\n", ("c.yaml:1", "python/name:os.system", "refused")),
    # --- NaN / inf anywhere numeric
    Case("lr-inf", "train:\n  learning_rate: .inf\n", ("train.learning_rate = inf", "finite", "default 0.0003")),
    Case("lr-nan-override", "", ("train.learning_rate = nan", "finite", "set train.learning_rate"),
         overrides=["--lr", "nan"]),
    Case("capacity-nan", "moe:\n  capacity_factor: .nan\n", ("moe.capacity_factor = nan", "finite")),
    Case("rope-theta-inf", "model:\n  rope_theta: .inf\n", ("model.rope_theta = inf", "finite", "1000000.0")),
    Case("max-steps-inf", "train:\n  max_steps: .inf\n", ("train.max_steps = inf", "expected an integer")),
    # --- optimizer
    Case("beta1-one", "train:\n  beta1: 1.0\n", ("train.beta1 = 1.0", "[0, 1)", "e.g. 0.9")),
    Case("beta2-negative", "train:\n  beta2: -0.1\n", ("train.beta2 = -0.1", "[0, 1)", "e.g. 0.95")),
    Case("eps-zero", "train:\n  eps: 0\n", ("train.eps = 0.0", "must be positive", "1e-8")),
    Case("weight-decay-negative", "train:\n  weight_decay: -0.1\n", ("train.weight_decay = -0.1", ">= 0", "0.1")),
    Case("lr-zero", "train:\n  learning_rate: 0\n", ("train.learning_rate = 0.0", "positive", "3e-4")),
    Case("grad-clip-negative", "train:\n  grad_clip: -1\n", ("train.grad_clip = -1.0", ">= 0", "e.g. 1.0")),
    Case("min-lr-ratio", "train:\n  min_lr_ratio: 1.5\n", ("train.min_lr_ratio = 1.5", "[0, 1]", "e.g. 0.1")),
    Case("warmup-beyond-max-steps", "train:\n  warmup_steps: 50\n  max_steps: 10\n",
         ("train.warmup_steps = 50", "train.max_steps (10)", "lower train.warmup_steps")),
    # --- routing settings that would train something other than what they say
    Case("top1-renormalised", "moe:\n  num_experts_per_token: 1\n  normalize_top_k: true\n",
         ("moe.normalize_top_k = True", "num_experts_per_token = 1", "learn nothing from the language-model loss",
          "leave it unset (null")),
    Case("expert-choice-overflow", "moe:\n  router_type: expert_choice\n  capacity_factor: 2.0\n"
         "  drop_policy: overflow\n", ("moe.drop_policy = 'overflow'", "no effect with moe.router_type = "
                                      "'expert_choice'", "remove it")),
    Case("expert-choice-aux-weight", "moe:\n  router_type: expert_choice\n  capacity_factor: 2.0\n"
         "  aux_loss_weight: 0.1\n", ("moe.aux_loss_weight = 0.1", "no Switch loss", "set 0")),
    # --- intervals and counts
    Case("save-interval-negative", "train:\n  save_interval: -1\n",
         ("train.save_interval = -1", ">= 0", "0 saves only at the end")),
    Case("eval-interval-negative", "train:\n  eval_interval: -5\n", ("train.eval_interval = -5", "0 never")),
    Case("log-interval-zero", "train:\n  log_interval: 0\n", ("train.log_interval = 0", "set train.log_interval >= 1")),
    Case("keep-last-zero", "train:\n  keep_last: 0\n", ("train.keep_last = 0", "set train.keep_last >= 1")),
    Case("micro-batch-zero", "train:\n  micro_batch_size: 0\n",
         ("train.micro_batch_size = 0", "set train.micro_batch_size >= 1")),
    Case("seq-len-zero", "data:\n  seq_len: 0\n", ("data.seq_len = 0", "positive", "e.g. 512")),
    Case("seed-negative", "train:\n  seed: -1\n", ("train.seed = -1", "non-negative", "e.g. 1234")),
    Case("inject-step-zero", "train:\n  inject_nonfinite_steps: [0, 3]\n",
         ("train.inject_nonfinite_steps = [0, 3]", "count from 1")),
    # --- files the run will open
    Case("tokenizer-missing", "data:\n  tokenizer: {tmp}/nope.model\n",
         ("data.tokenizer = '", "nope.model'", "no such file", "sentencepiece .model")),
    Case("tokenizer-is-folder", "data:\n  tokenizer: {tmp}\n", ("data.tokenizer = '", "is a folder", "PREFIX.model")),
    Case("data-dir-missing", "data:\n  data_dir: {tmp}/shards\n",
         ("data.data_dir = '", "shards'", "no such folder", "data_prep_tool build")),
    Case("data-dir-no-manifest", "data:\n  data_dir: {tmp}\n", ("data.data_dir = '", "no manifest.json", "merge")),
    Case("resume-missing", "train:\n  resume: {tmp}/ck/step_00000004\n",
         ("train.resume = '", "no such checkpoint folder", "auto")),
    Case("ds-config-unknown", "parallel:\n  ds_config: zero9\n", ("parallel.ds_config = 'zero9'", "zero3_offload")),
    Case("zero3-gather-unknown", "parallel:\n  zero3_gather: layer\n",
         ("parallel.zero3_gather = 'layer'", "'block'", "'module'")),
    Case("world-size-zero", "", ("world size = 0", ">= 1"), world_size=0),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_config_is_refused_with_field_value_and_fix(tmp_path: Path, case: Case) -> None:
    path = None
    if case.text:
        path = tmp_path / case.name
        text = case.text.replace("{tmp}", str(tmp_path))
        if case.id == "not-utf8":
            path.write_bytes(b"train:\n  seed: \xff\n")
        else:
            path.write_text(text)
    with pytest.raises(ValueError) as err:
        cfg = load_config(path, parse_overrides(case.overrides, refuse_repeated=True))  # as the ep-train commands
        validate(cfg, world_size=case.world_size)
    msg = str(err.value)
    for want in case.expect:
        assert want in msg, f"{want!r} not in: {msg}"
    assert not (tmp_path / "pwned").exists()  # the python/object/apply case must not have run its command


def test_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


def test_good_configs_still_load(tmp_path: Path) -> None:
    """The checks must not refuse what is legitimate: a YAML merge key overridden below it, warmup ==
    max_steps, beta1 0, a tiny eps, an existing tokenizer file and data folder, the shipped configs."""
    (tmp_path / "tok.model").write_bytes(b"x")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    p = tmp_path / "ok.yaml"
    p.write_text("train:\n  <<: {seed: 5, max_steps: 10}\n  seed: 7\n  warmup_steps: 10\n  beta1: 0.0\n"
                 f"  eps: 1.0e-12\ndata:\n  tokenizer: {tmp_path}/tok.model\n  data_dir: {tmp_path}/shards\n")
    cfg = load_config(p)
    assert (cfg.train.seed, cfg.train.max_steps, cfg.train.warmup_steps, cfg.train.beta1) == (7, 10, 10, 0.0)
    for name in ("tiny", "demo", "mixtral_8x7b"):
        load_config(ROOT / "configs" / f"{name}.yaml")


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def _refused(p: subprocess.CompletedProcess, *expect: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "error:" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    for want in expect:
        assert want in p.stderr, f"{want!r} not in: {p.stderr}"


def test_plan_refuses_bad_configs_and_nodes(tmp_path: Path) -> None:
    _refused(_run("-m", "ep_train.cli", "plan", "--config", "configs/tiny.yaml", "--nodes", "0"),
             "--nodes = 0", "must be >= 1")
    bad = tmp_path / "tag.yaml"
    bad.write_text("train:\n  seed: !!python/object/apply:os.system ['touch pwned']\n")
    _refused(_run("-m", "ep_train.cli", "plan", "--config", str(bad), cwd=tmp_path), "tag.yaml:2", "refused")
    assert not (tmp_path / "pwned").exists()
    bad = tmp_path / "c.json"
    bad.write_text('{"train": {"seed": 1,}}')
    _refused(_run("-m", "ep_train.cli", "plan", "--config", str(bad)), "c.json:1:", "invalid JSON")
    _refused(_run("-m", "ep_train.cli", "plan", "--config", "configs/tiny.yaml", "--save_interval", "-1"),
             "train.save_interval = -1")


def test_trainer_refuses_bad_configs_before_starting(tmp_path: Path) -> None:
    bad = tmp_path / "dup.yaml"
    bad.write_text("train:\n  learning_rate: 0.1\n  learning_rate: .inf\n")
    p = _run("-m", "ep_train.train", "--config", str(bad), "--run-dir", str(tmp_path / "run"))
    _refused(p, "dup.yaml:3", "'learning_rate' appears twice")
    p = _run("-m", "ep_train.train", "--config", "configs/tiny.yaml", "--run-dir", str(tmp_path / "run"),
             "--learning_rate", ".inf")
    _refused(p, "train.learning_rate = inf", "finite")
    assert not (tmp_path / "run").exists()  # refused before the trainer made its run folder


def test_check_refuses_a_bad_deepspeed_json(tmp_path: Path) -> None:
    """`ep-train check` (which the launch scripts run first) reads the DeepSpeed JSON as the trainer will: one
    error instead of one per worker."""
    ds = tmp_path / "ds.json"
    for text, want in (("", "is not valid JSON"), ('{"zero_optimization": {"stage": 3}, "ep_train": {"fast": true}}',
                                                     "has no switch 'fast'")):
        ds.write_text(text)
        _refused(_run("-m", "ep_train.cli", "check", "--config", "configs/tiny.yaml", "--ds_config", str(ds)),
                 "ds.json", want)
    ds.write_text('{"zero_optimization": {"stage": 3}, "ep_train": {"fast_grad_path": false}}')
    p = _run("-m", "ep_train.cli", "check", "--config", "configs/tiny.yaml", "--ds_config", str(ds))
    assert p.returncode == 0 and "config ok" in p.stdout, p.stderr
