"""Naive per-token references the MoE code is checked against (plain Python loops, no vectorisation).

Deliberately written from the definitions, not from ep_train's code paths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def naive_route(logits: torch.Tensor, k: int, normalize: bool = True):
    """Per token: softmax over all experts, top-k, renormalise. Returns python lists."""
    t, e = logits.shape
    probs = [torch.softmax(logits[i], dim=-1) for i in range(t)]
    ids, weights, norms = [], [], []
    for i in range(t):
        order = sorted(range(e), key=lambda j: (-probs[i][j].item(), j))[:k]
        total = sum(probs[i][j] for j in order) if normalize else torch.tensor(1.0)
        ids.append(order)
        weights.append([probs[i][j] / total for j in order])
        norms.append(total)
    return probs, ids, weights, norms


def naive_aux_loss(probs, ids, e: int) -> torch.Tensor:
    t, k = len(ids), len(ids[0])
    counts = [0] * e
    for row in ids:
        for j in row:
            counts[j] += 1
    mean_p = [sum(probs[i][j] for i in range(t)) / t for j in range(e)]
    return e * sum(counts[j] / (t * k) * mean_p[j] for j in range(e))


def naive_z_loss(logits: torch.Tensor) -> torch.Tensor:
    t = logits.shape[0]
    return sum(math.log(sum(math.exp(v) for v in logits[i].tolist())) ** 2 for i in range(t)) / t


def naive_capacity(probs, ids, weights, norms, e: int, capacity: int, policy: str):
    """Returns (ids, weights, keep) as lists after the capacity rule (see router.apply_capacity's docstring)."""
    t, k = len(ids), len(ids[0])
    ids = [list(r) for r in ids]
    weights = [list(r) for r in weights]
    keep = [[False] * k for _ in range(t)]
    load = [0] * e
    for ex in range(e):  # round 0: each expert keeps its highest-probability assignments
        cands = [(i, s) for i in range(t) for s in range(k) if ids[i][s] == ex]
        cands.sort(key=lambda a: (-probs[a[0]][ex].item(), a[0] * k + a[1]))
        for i, s in cands[:capacity]:
            keep[i][s] = True
        load[ex] = min(len(cands), capacity)
    if policy == "overflow":
        orig = [list(r) for r in ids]
        used = [set(r) for r in ids]
        ranked = [sorted(range(e), key=lambda j: (-probs[i][j].item(), j)) for i in range(t)]
        ptr = [0] * t
        dropped = [[False] * k for _ in range(t)]
        while True:
            proposals = []  # (token, slot, expert)
            for i in range(t):
                pend = [s for s in range(k) if not keep[i][s] and not dropped[i][s]]
                if not pend:
                    continue
                while ptr[i] < e and ranked[i][ptr[i]] in used[i]:
                    ptr[i] += 1
                if ptr[i] >= e:
                    dropped[i][pend[0]] = True
                    continue
                proposals.append((i, pend[0], ranked[i][ptr[i]]))
            if not any(not keep[i][s] and not dropped[i][s] for i in range(t) for s in range(k)):
                break
            for ex in range(e):
                props = [p for p in proposals if p[2] == ex]
                props.sort(key=lambda p: (-probs[p[0]][ex].item(), p[0]))
                room = capacity - load[ex]
                for n, (i, s, _) in enumerate(props):
                    if n < room:
                        ids[i][s], keep[i][s] = ex, True
                        load[ex] += 1
            for i, _, ex in proposals:
                used[i].add(ex)
                ptr[i] += 1
        for i in range(t):
            for s in range(k):
                if ids[i][s] != orig[i][s]:
                    weights[i][s] = probs[i][ids[i][s]] / norms[i]
    for i in range(t):
        for s in range(k):
            if not keep[i][s]:
                weights[i][s] = torch.tensor(0.0)
    return ids, weights, keep


def naive_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def naive_moe(x: torch.Tensor, gate_w: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, k: int,
              capacity: int | None = None, policy: str = "drop", shared=None) -> torch.Tensor:
    """Token by token, slot by slot: y_t = sum_k w_tk * expert_{e_tk}(x_t) (+ shared(x_t))."""
    logits = F.linear(x.float(), gate_w.float())
    probs, ids, weights, norms = naive_route(logits, k)
    if capacity is not None:
        ids, weights, keep = naive_capacity(probs, ids, weights, norms, gate_w.shape[0], capacity, policy)
    else:
        keep = [[True] * k for _ in ids]
    rows = []
    for i in range(x.shape[0]):
        y = torch.zeros_like(x[i])
        for s in range(k):
            if keep[i][s]:
                ex = ids[i][s]
                y = y + weights[i][s] * naive_swiglu(x[i], w1[ex], w3[ex], w2[ex])
        if shared is not None:
            y = y + shared(x[i])
        rows.append(y)
    return torch.stack(rows)
