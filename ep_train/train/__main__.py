import os
import sys

from ep_train.stdio import report_error
from ep_train.train.trainer import NonFiniteLossError, main

if __name__ == "__main__":
    try:
        rc = main()
    except (ValueError, NonFiniteLossError) as e:
        sys.exit(report_error("ep-train train", e))
    # After a completed run (checkpoint saved, metrics closed, process group torn down) leave without the
    # interpreter's teardown: a native worker thread still joinable at static destruction made ranks abort
    # with "terminate called without an active exception" (SIGABRT) after their final save, now and then,
    # failing torchrun jobs that had finished (seen in CI). Nothing is left to flush but stdio.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc or 0)
