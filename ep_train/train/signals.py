"""Graceful stop on SIGUSR1 (SLURM's warning before the time limit) or SIGTERM (preemption)."""

from __future__ import annotations

import signal

STOP_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped on a signal, checkpoint written, requeue me"
STOP_MARKER = "stopped_on_signal.json"  # in the run folder; torchrun turns exit codes into 1, files survive


class StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signal = signum  # only a flag: the step in flight finishes, then every rank saves together
        # One notice is enough. Launchers repeat it (to reach workers still starting); a repeat that
        # arrives while the interpreter shuts down, when Python has put back the default action, would
        # kill the process by the signal (exit -10) after a clean checkpoint-and-stop. Ignored handlers
        # survive shutdown.
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)

    @property
    def raised(self) -> bool:
        return self.signal is not None
