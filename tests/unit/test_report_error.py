"""ep_train.stdio.report_error: ep-train's own refusals stay one line; an error a library raised keeps its
traceback (the trainer once printed only "error: Expecting value: line 1 column 1 (char 0)" for py-cpuinfo's
JSON error, with nothing to say where it came from)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ep_train.config import load_config, parse_overrides
from ep_train.stdio import raised_in_ep_train, report_error

ROOT = Path(__file__).resolve().parents[2]


def _caught(fn) -> BaseException:  # type: ignore[no-untyped-def]
    with pytest.raises(Exception) as info:
        fn()
    return info.value


def test_own_refusal_is_one_line(capsys) -> None:
    e = _caught(lambda: load_config(ROOT / "configs" / "tiny.yaml", parse_overrides(["--no_such_field", "1"])))
    assert isinstance(e, ValueError) and raised_in_ep_train(e)
    assert report_error("ep-train check", e) == 2
    err = capsys.readouterr().err
    assert err == f"ep-train check: error: {e}\n"


def test_library_error_keeps_its_traceback(capsys) -> None:
    e = _caught(lambda: json.loads(""))  # raised inside the json module, uncaught by ep-train
    assert isinstance(e, ValueError) and not raised_in_ep_train(e)
    assert report_error("ep-train train", e) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "json" in err and "JSONDecodeError" in err
    assert err.endswith("ep-train train: error: Expecting value: line 1 column 1 (char 0)\n")


def test_unraised_error_counts_as_own(capsys) -> None:
    assert raised_in_ep_train(ValueError("made to be reported"))
    assert report_error("x", ValueError("made to be reported")) == 2
    assert capsys.readouterr().err == "x: error: made to be reported\n"


def test_plan_refuses_a_ds_json_that_is_not_json(tmp_path) -> None:
    """`plan` read the DeepSpeed JSON with a bare json.loads: an empty file ended in json's own message."""
    bad = tmp_path / "ds.json"
    for text, want in (("", "is not valid JSON"), ("[1, 2]", "holds a JSON list, not an object")):
        bad.write_text(text)
        p = subprocess.run([sys.executable, "-m", "ep_train.cli", "plan", "--config", "configs/tiny.yaml",
                            "--ds_config", str(bad), "--nodes", "1", "--gpus-per-node", "2"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert f"parallel.ds_config {str(bad)!r}" in p.stderr and want in p.stderr, p.stderr


def test_hf_folder_with_broken_json_is_refused_by_name(tmp_path) -> None:
    from ep_train.interop.hf import HFMixtralSource

    (tmp_path / "config.json").write_text('{"model_type": "mixtral",')  # cut short
    with pytest.raises(ValueError, match="config.json' is not valid JSON"):
        HFMixtralSource(tmp_path)
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ValueError, match="holds a JSON list, not an object"):
        HFMixtralSource(tmp_path)


def test_index_without_weight_map_is_refused_by_name(tmp_path) -> None:
    from ep_train.interop.hf import weight_map

    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match='has no "weight_map" object'):
        weight_map(index)
    index.write_text('{"weight_map": {"lm_head.weight": "a.safetensors"}}')
    with pytest.raises(ValueError, match="names 1 shard file"):  # the shard it names is not there
        weight_map(index)
    (tmp_path / "a.safetensors").write_bytes(b"")
    assert weight_map(index) == {"lm_head.weight": "a.safetensors"}


def test_a_frame_with_no_file_is_not_ep_trains() -> None:
    code = compile("raise ValueError('from exec')", "<string>", "exec")
    e = _caught(lambda: exec(code))
    assert not raised_in_ep_train(e)
