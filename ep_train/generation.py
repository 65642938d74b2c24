"""Sampling from a trained model: ``generate`` (text), ``generate_tokens`` (token ids), ``ep-train generate``.

Shape legend: B prompts in one batch, S tokens fed in one step, V vocab.

Batching: prompts of the same token length run together as one batch; prompts of other lengths run as
separate batches. No padding, so no position or mask bookkeeping: every sequence sees exactly what it
would see alone. Generation routes dropless (``ep_train.model.moe.inference_routing``) so a token's
experts never depend on its batch.

``ep_train.generate`` (the package attribute) is this module's ``generate`` function.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist

from ep_train.model.moe import inference_routing
from ep_train.model.transformer import KVCache, Transformer

if TYPE_CHECKING:
    import sentencepiece as spm


class Generated(NamedTuple):
    tokens: list[list[int]]  # per prompt, the new tokens (ending with EOS where it stopped on one)
    new_tokens: int  # sum of len(tokens)
    seconds: float  # wall time of the generation loop (prefill included)

    @property
    def tokens_per_sec(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from the last position's logits [B, V]: argmax when ``temperature`` is 0,
    else a draw from softmax(logits / temperature) kept to the ``top_k`` likeliest tokens (0 = all)
    and to the smallest set whose probability reaches ``top_p`` (nucleus)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # shifted by the row's maximum first: every value <= 0, so a tiny temperature gives -inf (probability 0)
    # and 0 at the maximum, never inf - inf = NaN in the softmax
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # the top token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    for name, value, ok, fix in (
            ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, "ask for at least 1 token"),
            ("temperature", temperature, math.isfinite(temperature) and temperature >= 0,
             "use 0 for greedy or a positive finite value (1 samples from the model's distribution)"),
            ("top_p", top_p, 0 < top_p <= 1, "use a value in (0, 1]; 1 keeps every token"),
            ("top_k", top_k, top_k >= 0, "use 0 to keep every token or a positive count")):
        if not ok:
            raise ValueError(f"{name} = {value} is invalid: {fix}")


def check_lengths(lengths: list[int], max_new_tokens: int, max_seq_len: int, names: list[str] | None = None) -> None:
    """Refuse prompts that do not fit the model's context (``model.max_seq_len``), with room for the new tokens."""
    for i, n in enumerate(lengths):
        what = names[i] if names else f"prompt {i}"
        if n == 0:
            raise ValueError(f"{what} is empty (0 tokens); give at least one token to continue from")
        if n > max_seq_len:
            raise ValueError(f"{what} is {n} tokens long, longer than the model's context "
                             f"(model.max_seq_len = {max_seq_len}); shorten it to at most {max_seq_len} tokens")
        # the last new token is returned, never fed back: the model reads n + max_new_tokens - 1 positions
        if n + max_new_tokens - 1 > max_seq_len:
            raise ValueError(f"{what} ({n} tokens) + max_new_tokens ({max_new_tokens}) = {n + max_new_tokens} "
                             f"tokens, of which the model reads all but the last: more than its context "
                             f"(model.max_seq_len = {max_seq_len}); lower max_new_tokens to {max_seq_len - n + 1} "
                             "or shorten the prompt")


def check_prompt_ids(prompts: list[list[int]], vocab_size: int) -> None:
    """Refuse token ids the model has no embedding for: indexing the embedding with them raises a bare
    IndexError on the CPU and a device-side assert on CUDA (which also breaks the process's CUDA context)."""
    for i, p in enumerate(prompts):
        for pos, t in enumerate(p):
            if not 0 <= t < vocab_size:
                raise ValueError(f"prompt {i} has token id {t} at position {pos}, outside the model's vocabulary "
                                 f"[0, {vocab_size}) (model.vocab_size = {vocab_size}); pass ids of the tokenizer "
                                 "the model was trained with")


def prompt_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The random stream of prompt ``index`` under ``seed``: a prompt's draws depend on these two only, not on
    the prompts it is batched with nor on which process generates it (expert-parallel generation splits the
    prompts over the ranks), so every layout samples the same tokens."""
    digest = hashlib.sha256(f"{seed}/prompt{index}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class _Batch:
    """Prompts of one token length [B, S0] being continued: each ``step`` feeds the model once and adds one
    token per prompt still running."""

    def __init__(self, model: Transformer, ids: torch.Tensor, max_new_tokens: int, sampling: tuple[float, float, int],
                 generators: list[torch.Generator] | None, eos_id: int | None, use_kv_cache: bool) -> None:
        b = ids.shape[0]
        self.model, self.sampling, self.generators, self.eos_id = model, sampling, generators, eos_id
        self.cache = KVCache(len(model.layers)) if use_kv_cache else None
        self.seq, self.feed = ids, ids  # the whole sequence so far; what the next cached step feeds
        self.out: list[list[int]] = [[] for _ in range(b)]
        self.done = [False] * b
        self.left = max_new_tokens

    @property
    def finished(self) -> bool:
        return self.left == 0 or all(self.done)

    def step(self) -> None:
        self.take(self.forward())

    def forward(self) -> torch.Tensor:
        """The model once (collective under expert parallelism): the last position's logits [B, V]."""
        if self.cache is not None:
            return self.model.forward_step(self.feed, self.cache)[0][:, -1]
        return self.model(self.seq).logits[:, -1]  # full recompute: the reference the cache must match

    def take(self, logits: torch.Tensor) -> None:
        """The next token of every prompt from ``logits`` (no communication)."""
        temperature, top_p, top_k = self.sampling
        if self.generators is None:
            nxt = sample_next(logits, temperature, top_p, top_k)  # [B]
        else:  # each prompt from its own stream (prompt_generator)
            nxt = torch.cat([sample_next(logits[r:r + 1], temperature, top_p, top_k, g)
                             for r, g in enumerate(self.generators)])
        self.seq, self.feed = torch.cat([self.seq, nxt[:, None]], dim=1), nxt[:, None]
        for row, t in enumerate(nxt.tolist()):  # host sync per step (the EOS check needs the values)
            if not self.done[row]:
                self.out[row].append(t)
                self.done[row] = t == self.eos_id
        self.left -= 1


@torch.inference_mode()
def _run_alone(batches: list[_Batch]) -> None:
    for batch in batches:
        while not batch.finished:
            batch.step()


@torch.inference_mode()
def _run_in_lockstep(model: Transformer, batches: list[_Batch], group: dist.ProcessGroup,
                     device: torch.device) -> None:
    """This rank's batches, stepped together with the other ranks': every MoE layer's all-to-all needs every
    rank of the group in every forward, so a rank with nothing left runs a one-token forward (output unused)
    until no rank has work."""
    queue = iter(batches)
    current = next(queue, None)
    state = torch.zeros(1, dtype=torch.int32, device=device)  # 0 done, 1 working, 2 failed (the max wins)
    idle_ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    failure: Exception | None = None
    while True:
        while current is not None and current.finished:
            current = next(queue, None)
        state.fill_(2 if failure is not None else int(current is not None))
        dist.all_reduce(state, op=dist.ReduceOp.MAX, group=group)  # communication; .item(): a host sync per step
        if state.item() == 2:  # every rank stops together (one left behind would wait in the next all-to-all)
            if failure is not None:
                raise failure
            raise ValueError("generation failed on another rank of the expert-parallel group (its error is in "
                             "its output)")
        if state.item() == 0:
            return
        if current is None:
            model(idle_ids)
            continue
        # A failure inside the forward is not caught: this process exits and the launcher stops the others,
        # which wait in an all-to-all (caught, it would leave them there until the process group's timeout).
        logits = current.forward()
        try:
            current.take(logits)
        except Exception as e:  # sampling (a NaN probability), no communication: said at the next check
            failure = e


def _check_same_request(group: dist.ProcessGroup, request: list) -> None:
    """Every rank must continue the same prompts with the same settings (each takes its share by index, and
    rank 0 prints every prompt's tokens): compared by digest, refused on every rank if any differs."""
    digest = hashlib.sha256(json.dumps(request, default=int).encode()).hexdigest()  # default: numpy ids
    every: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, digest, group=group)  # communication
    differ = [r for r, d in enumerate(every) if d != every[0]]
    if differ:
        raise ValueError(f"the ranks of the expert-parallel group asked for different generations (prompts or "
                         f"settings differ between rank 0 and rank(s) {differ}); pass every rank the same prompts "
                         "and settings (e.g. one --prompts-file all ranks read)")


def generate_tokens(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, seed: int | None = None, eos_id: int | None = None,
                    experts_per_token: int | None = None, use_kv_cache: bool = True,
                    group: dist.ProcessGroup | None = None) -> Generated:
    """Continue each prompt (token ids) by up to ``max_new_tokens`` tokens, stopping a prompt at ``eos_id``.

    Greedy when ``temperature`` is 0; otherwise sampled (``top_p``, ``top_k``), each prompt from its own
    generator seeded by ``seed`` and its index (``prompt_generator``; None: not reproducible).
    ``experts_per_token`` routes with another K for this call only. ``use_kv_cache=False`` recomputes the
    whole sequence each step (slow; same tokens). Runs where the model's parameters are, in eval mode
    (restored after). Returns the new tokens and the throughput.

    ``group``: expert-parallel generation (a model loaded with ``ep_train.load(..., ep_group=group)``). Every
    rank of the group passes the same prompts and gets every prompt's tokens back; rank r continues prompts
    r, r + n, r + 2n, ... of the n ranks, in step with the others (see ``_run_in_lockstep``). ``new_tokens``
    counts every rank's tokens.
    """
    if group is not None:  # first: then the checks below refuse alike on every rank
        _check_same_request(group, [prompts, max_new_tokens, temperature, top_p, top_k, seed, eos_id,
                                    experts_per_token, use_kv_cache])
    check_sampling(max_new_tokens, temperature, top_p, top_k)
    check_lengths([len(p) for p in prompts], max_new_tokens, model.cfg.max_seq_len)
    check_prompt_ids(prompts, model.cfg.vocab_size)
    device = next(model.parameters()).device
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    mine = range(rank, len(prompts), world)
    groups: dict[int, list[int]] = {}  # token length -> prompt indices (one batch each, no padding)
    for i in mine:
        groups.setdefault(len(prompts[i]), []).append(i)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with inference_routing(model, experts_per_token):
            batches = [_Batch(model, torch.tensor([prompts[i] for i in idx], dtype=torch.long, device=device),
                              max_new_tokens, (temperature, top_p, top_k),
                              None if seed is None or temperature == 0 else
                              [prompt_generator(seed, i, device) for i in idx], eos_id, use_kv_cache)
                       for idx in groups.values()]
            if group is None:
                _run_alone(batches)
            else:
                _run_in_lockstep(model, batches, group, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    done = {i: toks for idx, batch in zip(groups.values(), batches) for i, toks in zip(idx, batch.out)}
    if group is not None:
        every: list[dict[int, list[int]] | None] = [None] * world
        dist.all_gather_object(every, done, group=group)  # communication: each rank's tokens to every rank
        done = {i: toks for part in every for i, toks in (part or {}).items()}
    result = [done[i] for i in range(len(prompts))]
    return Generated(result, sum(len(t) for t in result), seconds)


def _snippet(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def generate_text(model: Transformer, tokenizer: spm.SentencePieceProcessor, prompts: list[str] | str,
                  max_new_tokens: int, *, add_bos: bool = False, **kwargs: object) -> tuple[list[str], Generated]:
    """``generate`` that also returns the token-level result (counts, timing)."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if add_bos and tokenizer.bos_id() < 0:
        raise ValueError("add_bos: the tokenizer has no BOS piece; leave it off")
    ids = [tokenizer.encode(t, add_bos=add_bos) for t in texts]
    vocab = model.cfg.vocab_size
    if tokenizer.get_piece_size() > vocab:
        raise ValueError(f"the tokenizer has {tokenizer.get_piece_size()} pieces, more than the model's vocabulary "
                         f"(model.vocab_size = {vocab}); use the tokenizer the model was trained with")
    names = [f"prompt {i} {_snippet(t)}" for i, t in enumerate(texts)]
    check_lengths([len(p) for p in ids], max_new_tokens, model.cfg.max_seq_len, names)
    kwargs.setdefault("eos_id", tokenizer.eos_id() if tokenizer.eos_id() >= 0 else None)
    gen = generate_tokens(model, ids, max_new_tokens, **kwargs)  # type: ignore[arg-type]
    return [decode_continuation(tokenizer, p, toks) for p, toks in zip(ids, gen.tokens)], gen


def decode_continuation(tokenizer: spm.SentencePieceProcessor, prompt: list[int], new: list[int]) -> str:
    """The text ``new`` adds after ``prompt``, so that ``prompt text + result`` reads as the whole sequence.

    Decoded alone, the new ids lose what only their context gives: sentencepiece drops the leading space
    ('\u2581') of the first piece when the tokenizer adds a dummy prefix (Mixtral's and Llama's do), so
    'hello' + 'world' would run together. So the whole sequence is decoded and the decoded prompt cut off.
    """
    from ep_train.data.tokenizer import safe_decode

    head = safe_decode(tokenizer, prompt)[0]
    whole = safe_decode(tokenizer, [*prompt, *new])[0]
    if whole.startswith(head):
        return whole[len(head):]
    # The prompt's decoding changed with what follows it (byte-fallback pieces completing a character across
    # the boundary): keep what differs from the common start, the closest to the new text there is.
    n = 0
    while n < min(len(head), len(whole)) and head[n] == whole[n]:
        n += 1
    return whole[n:]


def generate(model: Transformer, tokenizer: spm.SentencePieceProcessor, prompts: list[str] | str,
             max_new_tokens: int = 64, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, experts_per_token: int | None = None, use_kv_cache: bool = True,
             device: str | torch.device | None = None, add_bos: bool = False,
             group: dist.ProcessGroup | None = None) -> list[str]:
    """Completions (the new text only) of each prompt, one string per prompt, in order.

    ``model`` and ``tokenizer`` as ``ep_train.load(path)`` returns them. Greedy by default; ``temperature``
    > 0 samples (with ``top_p``, ``top_k``; ``seed`` makes it reproducible). Stops a prompt at the
    tokenizer's EOS. ``experts_per_token`` overrides the trained K for this call only. ``device``: move the
    model there first (default: where it is). ``add_bos``: start each prompt with BOS, as the training text
    did (``ep_train.load`` tells: ``Loaded.add_bos``). A prompt longer than the model's context, or one that
    would run past it within ``max_new_tokens``, is refused with a ``ValueError``. ``group``: expert parallel
    (see ``generate_tokens``); every rank passes the same prompts and gets every completion.
    """
    if device is not None:
        model.to(device)
    texts, _ = generate_text(model, tokenizer, prompts, max_new_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, seed=seed, experts_per_token=experts_per_token, use_kv_cache=use_kv_cache,
                             add_bos=add_bos, group=group)
    return texts


def main(argv: list[str] | None = None) -> int:
    """``ep-train generate``: print a completion per prompt, then a tokens/s line. Errors: ValueError."""
    ap = argparse.ArgumentParser(prog="ep-train generate", description="Sample from a run directory, a "
                                 "checkpoints/step_N folder or a Hugging Face Mixtral folder (with a KV cache).")
    ap.add_argument("--checkpoint", required=True, help="run dir, checkpoints/step_N or Hugging Face Mixtral folder")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    ap.add_argument("--prompts-file", default=None, help="a text file, one prompt per line")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--experts-per-token", type=int, default=None, help="route with this K (inference only)")
    ap.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence each step")
    ap.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: found from the checkpoint)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=None,
                    help="start prompts with BOS (default: as the training data did: the data manifest's "
                         "append_bos, or a Hugging Face folder's add_bos_token)")
    args = ap.parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        f = Path(args.prompts_file)
        if not f.is_file():
            raise ValueError(f"--prompts-file {args.prompts_file!r} not found; pass a text file, one prompt per line")
        prompts += [line for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompt given; pass --prompt TEXT (repeatable) or --prompts-file FILE")
    check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    from ep_train.api import load

    # torchrun's workers (TORCHELASTIC_RUN_ID): a WORLD_SIZE alone may be a training job's environment (a
    # Kubeflow pod, a job script) in which a plain `ep-train generate` must still run as one process
    world = int(os.environ.get("WORLD_SIZE", "1")) if "TORCHELASTIC_RUN_ID" in os.environ else 1
    joined = world > 1 and not dist.is_initialized()
    device, group = (args.device, None) if world == 1 else _join_launch(args.device)
    try:
        loaded = load(args.checkpoint, device=device, dtype=getattr(torch, args.dtype), tokenizer=args.tokenizer,
                      ep_group=group)
        if loaded.tokenizer is None:
            raise ValueError(f"no tokenizer found for {args.checkpoint!r} (looked for data.tokenizer, the data "
                             "manifest's tokenizer and tokenizer.model beside the weights); pass --tokenizer FILE")
        texts, gen = generate_text(loaded.model, loaded.tokenizer, prompts, args.max_new_tokens,
                                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                   experts_per_token=args.experts_per_token, use_kv_cache=not args.no_kv_cache,
                                   add_bos=loaded.add_bos if args.add_bos is None else args.add_bos, group=group)
    finally:
        if joined:
            dist.destroy_process_group()
    if group is not None and int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 prints: every rank holds every completion
    for prompt, text in zip(prompts, texts):
        print(f"=== {prompt!r}\n{prompt}{text}")
    cache = "no KV cache" if args.no_kv_cache else "KV cache"
    where = args.device if group is None else f"{args.device}, {world} processes, expert parallel"
    print(f"{gen.new_tokens} tokens in {gen.seconds:.2f} s: {gen.tokens_per_sec:.1f} tokens/s "
          f"({len(prompts)} prompt(s), {cache}, {where})")
    return 0


def _join_launch(device_arg: str) -> tuple[torch.device, dist.ProcessGroup]:
    """Under torchrun (WORLD_SIZE > 1): join the launch's process group (gloo on the CPU, nccl on CUDA) and
    take this process's device (cuda:LOCAL_RANK). Generation then runs expert parallel over every process:
    each holds the dense weights and 1/WORLD_SIZE of every MoE layer's experts."""
    from ep_train.api import check_device

    dev = check_device(device_arg)
    if dev.type == "cuda":
        if dev.index is not None:
            raise ValueError(f"--device = {device_arg!r}: under torchrun each process takes cuda:LOCAL_RANK; "
                             "pass --device cuda")
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # torchrun's env:// rendezvous; 30 minutes (NCCL's default is 10): the other ranks wait in a collective
        # while rank 0 converts a checkpoint to the universal form (convert it beforehand for a large model)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return dev, dist.group.WORLD


if __name__ == "__main__":  # python -m ep_train.generation: as ep-train generate (errors -> exit 2)
    from ep_train.cli import main as cli_main

    sys.exit(cli_main(["generate", *sys.argv[1:]]))
