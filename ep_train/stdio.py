"""Entry-point behaviour: refusals on stderr (``report_error``), and output piped into a reader that stops
early (``... | head``).

Python ignores SIGPIPE, so a write to a closed pipe raises ``BrokenPipeError``: a traceback and,
under ``set -o pipefail``, a failed pipeline. The convention of ``git``, ``ls`` and
``python -m json.tool`` is to stop writing quietly and exit 0: the reader has what it wanted.

Two forms:
- ``exit_quietly_on_broken_pipe(main)`` for short commands (``plan``, ``inspect``): the command ends
  at the first write that fails and returns 0.
- ``keep_running_on_broken_pipe()`` for the trainer: hours of training must not stop because a
  ``| head`` on its console went away; later console output is dropped (metrics.jsonl and
  TensorBoard still get everything).
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, TextIO

_PACKAGE = Path(__file__).resolve().parent  # ep_train/


def raised_in_ep_train(e: BaseException) -> bool:
    """Whether the innermost Python frame of ``e``'s traceback is ep-train's own code (an error raised in C
    counts as its Python caller's)."""
    tb = e.__traceback__
    if tb is None:
        return True  # never raised: made by ep-train to be reported
    while tb.tb_next is not None:
        tb = tb.tb_next
    name = tb.tb_frame.f_code.co_filename
    return not name.startswith("<") and Path(name).resolve().is_relative_to(_PACKAGE)  # not <string>, <frozen ...>


def report_error(prog: str, e: BaseException) -> int:
    """A refusal: ``PROG: error: MESSAGE`` on stderr; returns the exit status, 2.

    ep-train's own errors name the field, the value and the fix, so that line is all a user needs. An error
    a library raised and ep-train did not catch is no diagnosed input but an environment problem or a bug, and
    its bare message can mislead (py-cpuinfo, which DeepSpeed asks for the CPU's features, reads JSON from a
    child interpreter's stdout: anything printed there at start-up made the trainer say only "error: Expecting
    value: line 1 column 1 (char 0)"). Such an error gets its traceback first."""
    if not raised_in_ep_train(e):
        traceback.print_exception(e, file=sys.stderr)
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2


def _silence(stream: TextIO) -> None:
    """Point ``stream``'s file descriptor at /dev/null, so the interpreter's final flush cannot fail."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # replaced or closed stream (tests, pytest capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _same_file(a: TextIO, b: TextIO) -> bool:
    try:
        return os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno()))
    except (AttributeError, OSError, ValueError):
        return False


def exit_quietly_on_broken_pipe(main: Callable[..., int | None]) -> Callable[..., int]:
    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:  # type: ignore[no-untyped-def]
        try:
            rc = main(*args, **kwargs)
            sys.stdout.flush()  # a late failure (block-buffered pipe) happens here, not at shutdown
            return rc or 0
        except BrokenPipeError:
            both = _same_file(sys.stdout, sys.stderr)  # `2>&1 | head`: stderr is the same closed pipe
            _silence(sys.stdout)
            if both:
                _silence(sys.stderr)
            return 0
    return wrapper


class _PipeTolerantStream:
    """Wraps a text stream: after the first ``BrokenPipeError`` all further output is dropped."""

    def __init__(self, stream: TextIO) -> None:
        self._stream, self._broken = stream, False

    def _guard(self, fn: Callable[[], object]) -> object:
        if self._broken:
            return None
        try:
            return fn()
        except BrokenPipeError:
            self._broken = True
            _silence(self._stream)
            return None

    def write(self, s: str) -> int:
        self._guard(lambda: self._stream.write(s))
        return len(s)

    def flush(self) -> None:
        self._guard(self._stream.flush)

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def keep_running_on_broken_pipe() -> None:
    """Make stdout and stderr drop output instead of raising once their reader has gone."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _PipeTolerantStream):
            setattr(sys, name, _PipeTolerantStream(stream))
