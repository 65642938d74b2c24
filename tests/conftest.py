"""Shared fixtures: a sentencepiece model and shards built from the Python standard library's own text."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Real text already on every machine: a few stdlib packages (Python source, docstrings, comments).
CORPUS = [STDLIB / "json", STDLIB / "email", STDLIB / "asyncio", STDLIB / "textwrap.py", STDLIB / "this.py"]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Path:
    from ep_train.data.tokenizer import train_tokenizer
    from ep_train.data.prep import expand_inputs

    out = tmp_path_factory.mktemp("tok")
    files = [str(p) for p in expand_inputs([str(c) for c in CORPUS])]
    return train_tokenizer(files, 1000, str(out / "sp"))


@pytest.fixture(scope="session")
def built(tokenizer, tmp_path_factory) -> Path:
    from ep_train.data.prep import build

    out = tmp_path_factory.mktemp("shards")
    build([str(c) for c in CORPUS], str(tokenizer), str(out), workers=1, val_fraction=0.1, shard_size_mb=0.25,
          progress=False)
    return out


@pytest.fixture(scope="session")
def built_small(tokenizer, tmp_path_factory) -> Path:
    """A second, smaller source (other stdlib text, the same tokenizer): for weighted mixtures."""
    from ep_train.data.prep import build

    out = tmp_path_factory.mktemp("shards_small")
    build([str(STDLIB / "logging"), str(STDLIB / "html")], str(tokenizer), str(out), workers=1, val_fraction=0.3,
          shard_size_mb=0.25, progress=False)
    return out
