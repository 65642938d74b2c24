"""Training: ``python -m ep_train.train`` or ``ep-train train``."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from ep_train.train.trainer import main as _main  # deferred: importing DeepSpeed is slow

    return _main(argv)
