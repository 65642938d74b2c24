"""Writing small files so that a crash or power loss leaves the old content or the new, never a torn one."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """``path``'s new content, via a temporary file beside it that is flushed to disk (fsync) before the
    rename: without the fsync a power loss after the rename can leave the renamed file empty."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
