"""Reuse a checkpointed forward's exchanges in its recompute: all of them (``train.recompute_comm: false``), or
the small ones only (the default, ``train.recompute_comm: true``).

Under activation checkpointing the backward runs a block's forward again, and every exchange in it (the
MoE layers' count and token all-to-alls, the global-batch balance all-reduce, expert choice's score
all-gather) crosses the network again: time, and a point where every rank waits for the slowest. With a
tape, the block's first forward records each exchange's result in call order and the recompute takes them
back in the same order without communicating (torchtitan's selective checkpointing keeps all_to_all
outputs for the same reason). Only forward exchanges are taped; the backward's (gradients) always
communicate.

Why the n-th exchange of the recompute is the n-th of the forward: the recompute runs the same module
code on the same inputs with the RNG state replayed (torch.utils.checkpoint), so it routes as the forward
did and makes the same exchanges in the same order (the same requirement as without the tape, where the
ranks' recomputes must pair up; torch.utils.checkpoint also compares the recomputed saved tensors' shapes
and dtypes with the forward's, which catches most divergence but not all). A recompute that stops early
(checkpoint's early stop) leaves the rest unused. Since no rank communicates in its recompute, ranks
cannot disagree on which recomputes exchange.

Small exchanges (``exchange(..., small=True)``): the routing counts each MoE layer exchanges before its tokens
(a few integers per expert, and the layer's one host sync) and the global-batch balance counts (E values). A
recompute that sends the tokens again (``train.recompute_comm: true``) still replays these: they cost no memory
worth counting, and the recompute then has neither their collectives nor the host sync (on a GPU a sync stalls
the launch queue). The n-th small exchange of the recompute is the n-th small one of the forward, for the reason
above; the token exchanges between them run, and pair up across ranks as every rank recomputes alike.

Memory: a block's recorded results live from its forward to the end of its backward: per MoE layer the
received rows (with their fp32 weights and membership bytes) and the returned rows, about K D values per
token each under even routing (more on a rank whose experts are popular), the counts, and for expert
choice the gathered scores (ep T E fp32). ``ep_train.sizes.activation_bytes`` adds the 2 K D estimate.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

T = TypeVar("T")

_state = threading.local()  # the recompute runs on the autograd engine's thread (CUDA): per thread


class _Tape:
    def __init__(self) -> None:
        self.items: list[object] = []
        self.cursor = 0


class _Mode:
    """Sets this thread's tape, mode ("record" or "replay") and scope ("all" exchanges or the "small" ones) for
    the duration of a forward."""

    def __init__(self, tape: _Tape, mode: str, scope: str) -> None:
        self.tape, self.mode, self.scope = tape, mode, scope
        self.prev: tuple[_Tape | None, str | None, str | None] = (None, None, None)

    def __enter__(self) -> None:
        self.prev = (getattr(_state, "tape", None), getattr(_state, "mode", None), getattr(_state, "scope", None))
        _state.tape, _state.mode, _state.scope = self.tape, self.mode, self.scope
        if self.mode == "replay":
            self.tape.cursor = 0  # a second backward over a retained graph replays from the start

    def __exit__(self, *exc: object) -> None:
        _state.tape, _state.mode, _state.scope = self.prev


def tape_contexts(scope: str = "all") -> tuple[_Mode, _Mode]:
    """``context_fn`` for ``torch.utils.checkpoint`` (``functools.partial`` it for the small scope): (forward
    context that records, recompute context that replays), sharing one fresh tape per checkpointed call."""
    assert scope in ("all", "small"), scope
    tape = _Tape()
    return _Mode(tape, "record", scope), _Mode(tape, "replay", scope)


def exchange(run: Callable[[], T], small: bool = False) -> T:
    """``run()``, a forward communication: run, recorded by the enclosing checkpointed forward, or (in its
    recompute) the recorded result, in call order. Outside a checkpointed call it just runs; under a tape of the
    small scope only ``small`` exchanges are recorded and replayed, the others run every time."""
    tape, mode = getattr(_state, "tape", None), getattr(_state, "mode", None)
    if tape is None or (getattr(_state, "scope", "all") == "small" and not small):
        return run()
    if mode == "record":
        out = run()
        tape.items.append(_alias(out))
        return out
    assert tape.cursor < len(tape.items), "the recompute made more exchanges than its forward"
    out = tape.items[tape.cursor]
    tape.cursor += 1
    return _alias(out)  # type: ignore[return-value]


def _alias(x: object) -> object:
    """A tensor as a new, graph-free alias of the same storage (an autograd Function may then make it its
    output without touching the forward's graph); anything else as it is."""
    return x.detach() if isinstance(x, torch.Tensor) else x
