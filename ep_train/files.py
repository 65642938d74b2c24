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
    fsync_path(path.parent)  # the rename itself is durable only once the folder's entry is


def fsync_path(path: Path | str) -> None:
    """Flush a file's data, or a folder's entries, to disk (Linux allows fsync on a read-only descriptor of
    either). ``torch.save`` and ``os.replace`` do not: after a power loss a file can be there but empty."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
