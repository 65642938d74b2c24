"""``python -m tests.distributed.limited_rank LIMIT RANK [trainer args]``: ``ep_train.train`` with a file-size
limit of LIMIT bytes on rank RANK only (a full disk on one node, a quota): the other ranks write freely.
LIMIT ``copyfile``: on rank RANK only ``shutil.copyfile`` fails with ENOSPC."""

from __future__ import annotations

import os
import resource
import runpy
import sys


def _full_disk_copies() -> None:
    """shutil.copyfile fails as on a full disk (ENOSPC); bound before DeepSpeed imports it by name."""
    import errno
    import shutil

    def copyfile(src: str, dst: str, *args: object, **kwargs: object) -> str:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)

    shutil.copyfile = copyfile  # type: ignore[assignment]


if __name__ == "__main__":
    limit, rank = sys.argv[1], sys.argv[2]
    if os.environ.get("RANK") == rank:
        if limit == "copyfile":  # only file copies fail (DeepSpeed's recovery scripts), every other write succeeds
            _full_disk_copies()
        else:
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
    sys.argv = ["ep_train.train", *sys.argv[3:]]
    runpy.run_module("ep_train.train", run_name="__main__", alter_sys=True)
