"""bf16 on CPU: DeepSpeed bf16 (bf16 parameters, fp32 master weights in DeepSpeedCPUAdam) at world 2, EP 2,
ZeRO-3 + CPU offload, with and without activation checkpointing, tracks the fp32 run.

The fp32 side is the single-process reference (no DeepSpeed): tests/distributed/test_trainer.py shows the
fp32 ZeRO-3 + offload run equals it within 1e-5 relative, so it stands for "the fp32 run" at no extra cost.
The trainer runs in the test's own gloo processes (harness.run_distributed) so the engine's dtypes can be read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ep_train.config import load_config, parse_overrides
from tests.distributed.harness import read_losses, run_distributed
from tests.distributed.reference_train import reference_losses

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny.yaml"
STEPS = 20
COMMON = ["--seq_len", "32", "--max_steps", str(STEPS), "--warmup_steps", "4", "--ep_size", "2"]
# Tolerance on max_step |loss_bf16 - loss_fp32| / loss_fp32. bf16 keeps 8 significant bits: spacing 2^-8 = 3.9e-3
# relative, so every matmul input is rounded by up to 2e-3. The loss is the fp32 cross-entropy of bf16 logits,
# averaged over 8 x 32 tokens per step (per-token rounding errors largely cancel), and updates go to fp32
# master weights (no update is lost to bf16 rounding), so the runs drift only through slightly different
# gradients. Measured on this model: 1.3e-4 (both checkpointing settings). 1e-2 (2.5 bf16 spacings of the
# loss) leaves ~80x room for other CPUs' bf16 kernels and router top-k flips, yet a bf16 loss that did not
# learn, diverged or went non-finite is far outside it (the fp32 loss falls by 0.37 over these 20 steps).
REL_TOL = 1e-2


def _bf16_run(rank: int, world: int, data: str, run_dir: str, ckpt: str) -> dict[str, Any]:
    import torch

    from ep_train.train.trainer import Trainer

    cfg = load_config(CONFIG, parse_overrides(["--data_dir", data, *COMMON, "--mixed_precision", "bf16",
                                               "--activation_checkpointing", ckpt]))
    trainer = Trainer(cfg, Path(run_dir))
    assert trainer.fit() == 0
    eng = trainer.engine
    zero = eng.optimizer  # DeepSpeedZeroOptimizer_Stage3
    states = {str(v.dtype) for st in zero.optimizer.state.values() for v in st.values()
              if torch.is_tensor(v) and v.is_floating_point()}
    x = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        out = eng(x, x)
    return {"bf16_enabled": eng.bfloat16_enabled(), "inner_optimizer": type(zero.optimizer).__name__,
            "param_dtypes": sorted({str(p.ds_tensor.dtype) for p in eng.module.parameters()}),
            "master_dtypes": sorted({str(t.dtype) for t in zero.fp32_partitioned_groups_flat}),
            "master_numel": sum(t.numel() for t in zero.fp32_partitioned_groups_flat),
            "state_dtypes": sorted(states), "logits": str(out.logits.dtype), "loss": str(out.loss.dtype),
            "lm_loss": str(out.lm_loss.dtype), "aux": str(out.aux_loss.dtype)}


@pytest.fixture(scope="module")
def fp32_reference(built) -> list[float]:
    return reference_losses(load_config(CONFIG, parse_overrides(["--data_dir", str(built), *COMMON])), STEPS)


@pytest.mark.parametrize("ckpt", ["false", "true"])
def test_bf16_tracks_fp32_under_zero3_offload(tmp_path, built, fp32_reference, ckpt) -> None:
    run = tmp_path / "run"
    infos = run_distributed(_bf16_run, 2, str(built), str(run), ckpt, timeout=420)
    for info in infos:
        assert info["bf16_enabled"] and info["inner_optimizer"] == "DeepSpeedCPUAdam", info
        assert info["param_dtypes"] == ["torch.bfloat16"], info  # the model (ZeRO partitions) is bf16
        assert info["master_dtypes"] == ["torch.float32"] and info["master_numel"] > 0, info  # fp32 master weights
        assert info["state_dtypes"] == ["torch.float32"], info  # Adam moments in fp32
        assert info["logits"] == "torch.bfloat16", info  # the forward really runs in bf16
        assert info["loss"] == info["lm_loss"] == info["aux"] == "torch.float32", info  # losses in fp32

    got = read_losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    rel = [abs(got[s] - want) / abs(want) for s, want in enumerate(fp32_reference, 1)]
    print(f"bf16 vs fp32 (activation_checkpointing={ckpt}): max relative loss difference {max(rel):.2e}")
    assert max(rel) < REL_TOL, (max(rel), got, fp32_reference)
    assert got[STEPS] < got[1] - 0.1  # the bf16 run learns
