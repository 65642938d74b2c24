"""``python -m tests.distributed.limited_rank LIMIT RANK [trainer args]``: ``ep_train.train`` with a file-size
limit of LIMIT bytes on rank RANK only (a full disk on one node, a quota): the other ranks write freely."""

from __future__ import annotations

import os
import resource
import runpy
import sys

if __name__ == "__main__":
    limit, rank = int(sys.argv[1]), sys.argv[2]
    if os.environ.get("RANK") == rank:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.argv = ["ep_train.train", *sys.argv[3:]]
    runpy.run_module("ep_train.train", run_name="__main__", alter_sys=True)
