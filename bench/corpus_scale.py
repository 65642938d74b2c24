"""Corpus-scale data preparation: `data_prep_tool build` on multi-GB corpora, against raw sentencepiece.

    python bench/corpus_scale.py [--sizes-gb 0.5,2] [--workers 2] [--write] [--small]

The corpus is real text already on the machine: the Python standard library's ``.py`` files, written
as jsonl rows (one file per row) in shuffled passes until the size is reached (``corpus/part_NNN.jsonl``,
~100 MB each, at least 8 of them: array tasks split the inputs by file). For every size, each run is a fresh process tree sampled from outside every 0.2 s
(``VmHWM`` of the tool's main process and of each of its workers, from /proc):

- **build**: ``data_prep_tool build --workers N`` (read, encode, EOS, split 1% validation, write, hash);
- **array**: the same corpus as ``--num-tasks N --task-id i --workers 1``, the N tasks at once (as a SLURM
  array on one node), then ``data_prep_tool merge``; its token count must equal the build's;
- **limit**: the first ~200 MB of the corpus already in memory, encoded by a Pool of N sentencepiece
  processes (no reading, no writing): the fastest any tool could go here (tokens/s only); measured
  before, between and after the two runs, the median reported with the range.

- **one .txt file**: the same kind of text as one plain-text file of the size (a plain-text file is one
  document), built with ``--workers N``: tokenized in pieces cut after newlines (``prep.LARGE_TEXT_BYTES``);
- **whole vs pieces**: one plain-text file of ``COMPARE_BYTES``, built as before pieces existed (the whole
  file tokenized at once; ``LARGE_TEXT_BYTES`` raised in that process) and in pieces: peak RSS of each, and
  whether the two wrote the same shards (the whole-file tokenization is the reference for the pieces).

Memory must not grow with the corpus: the peak of every process at the largest size is compared with the
smallest (target in bench/targets.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import append_section, machine  # noqa: E402
from bench.targets import TARGETS, describe  # noqa: E402
from bench.targets import verdict as target_verdict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOOL = [sys.executable, str(ROOT / "tools" / "data_prep_tool.py")]
PART_BYTES = 100 * 2**20
MIB = 2**20
COMPARE_BYTES = 24 * MIB  # above prep.LARGE_TEXT_BYTES; whole, its tokenization takes ~50x this in memory
_sp = None


def _texts(size: int, seed: int) -> Iterator[str]:
    """The standard library's sources in shuffled passes until ``size`` characters were given."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.rglob("*.py")) if "site-packages" not in p.parts]
    texts = [t for t in texts if t.strip()]
    rng = random.Random(seed)
    written = 0
    while written < size:
        order = list(range(len(texts)))
        rng.shuffle(order)  # each pass in another order: shards are not one file repeated end to end
        for i in order:
            yield texts[i]
            written += len(texts[i])
            if written >= size:
                return


def make_corpus(out: Path, size: int, seed: int = 0) -> tuple[int, int]:
    """jsonl parts of about ``size`` characters of text in total; returns (documents, characters)."""
    out.mkdir(parents=True, exist_ok=True)
    written = docs = part = 0
    f = open(out / f"part_{part:03d}.jsonl", "w")
    part_bytes = 0
    for text in _texts(size, seed):
        line = json.dumps({"text": text}) + "\n"
        f.write(line)
        written += len(text)
        part_bytes += len(line)
        docs += 1
        if part_bytes >= min(PART_BYTES, size // 8):  # at least 8 parts: array tasks split by file
            f.close()
            part += 1
            f = open(out / f"part_{part:03d}.jsonl", "w")
            part_bytes = 0
    f.close()
    if part_bytes == 0:  # the size was reached right after a part was closed
        (out / f"part_{part:03d}.jsonl").unlink()
    return docs, written


def make_text_file(path: Path, size: int, seed: int = 0) -> int:
    """One plain-text file of about ``size`` characters (the same texts, one after the other); its size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for text in _texts(size, seed):
            f.write(text)
    return path.stat().st_size


# `data_prep_tool build` as it ran before large text files were cut into pieces: the whole file at once
WHOLE = ["-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); from ep_train.data import prep; "
               "prep.LARGE_TEXT_BYTES = 1 << 62; from ep_train.data.cli import main; sys.exit(main(sys.argv[1:]))"]


def _shard_digests(out: Path) -> list[tuple[str, str, str]]:
    man = json.loads((out / "manifest.json").read_text())
    return [(s["prefix"], s["bin_sha256"], split) for split in ("train", "val") for s in man["splits"][split]["shards"]]


def _tokens(out: Path) -> int:
    man = json.loads((out / "manifest.json").read_text())
    return man["splits"]["train"]["tokens"] + man["splits"]["val"]["tokens"]


def compare_whole(tmp: Path, model: str, workers: int) -> dict:
    """Peak RSS of one COMPARE_BYTES text file built whole (the earlier path) and in pieces; same shards?"""
    path = tmp / "compare" / "one.txt"
    nbytes = make_text_file(path, COMPARE_BYTES, seed=1)
    common = ["build", "--input", str(path), "--tokenizer", model, "--val-fraction", "0.01", "--no-progress",
              "--workers", str(workers)]
    res: dict[str, Any] = {"bytes": nbytes}
    for name, cmd in (("whole", [sys.executable, *WHOLE]), ("pieces", TOOL)):
        out = tmp / "compare" / name
        secs, peaks, _ = sampled([[*cmd, *common, "--output", str(out)]])
        res[name] = {"s": secs, "main_peak": peaks["main"], "worker_peak": peaks["worker"], "tokens": _tokens(out),
                     "shards": _shard_digests(out)}
    res["same_shards"] = res["whole"]["shards"] == res["pieces"]["shards"]
    shutil.rmtree(tmp / "compare")
    return res


def _vmhwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def sampled(cmds: list[list[str]]) -> tuple[float, dict[str, int], list[str]]:
    """Run the commands at once; (seconds, peak VmHWM per role, outputs). Roles: 'main' (each command's own
    process), 'worker' (their children); the largest of each."""
    import psutil

    t0 = time.monotonic()
    logs = [tempfile.TemporaryFile("w+") for _ in cmds]  # files, not pipes: concurrent tasks never block on output
    procs = [subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for c, log in zip(cmds, logs)]
    peaks = {"main": 0, "worker": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for p in procs:
                if (v := _vmhwm(p.pid)) is not None:
                    peaks["main"] = max(peaks["main"], v)
                try:
                    kids = psutil.Process(p.pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    kids = []
                for k in kids:
                    if (v := _vmhwm(k.pid)) is not None:
                        peaks["worker"] = max(peaks["worker"], v)
            done.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    for p in procs:
        p.wait()
    done.set()
    th.join()
    outs = []
    for log in logs:
        log.seek(0)
        outs.append(log.read())
        log.close()
    for c, p, o in zip(cmds, procs, outs):
        if p.returncode:
            raise RuntimeError(f"{' '.join(c)} failed ({p.returncode}):\n{o[-3000:]}")
    return time.monotonic() - t0, peaks, outs


def _init(model: str) -> None:
    global _sp
    import sentencepiece as spm

    _sp = spm.SentencePieceProcessor(model_file=model)


def _encode(texts: list[str]) -> int:
    assert _sp is not None
    return sum(len(x) + 1 for x in _sp.encode(texts))


def limit_rate(corpus: Path, model: str, workers: int, budget: int) -> tuple[float, int]:
    """Tokens/s of a Pool encoding ~``budget`` bytes of the corpus held in memory."""
    texts, size = [], 0
    for part in sorted(corpus.glob("*.jsonl")):
        for line in part.open():
            texts.append(json.loads(line)["text"])
            size += len(texts[-1])
            if size >= budget:
                break
        if size >= budget:
            break
    batches = [texts[i:i + 16] for i in range(0, len(texts), 16)]
    with get_context("fork").Pool(workers, _init, (model,)) as pool:
        list(pool.imap(_encode, batches[:8]))  # warm-up
        t0 = time.perf_counter()
        tokens = sum(pool.imap(_encode, batches))
        return tokens / (time.perf_counter() - t0), tokens


def merge_note(r: dict) -> str:
    """The merge reads only the parts' manifests: it often exits before the first 0.2 s sample."""
    if r["merge_peak"] < 10 * MIB:
        return f", merge {r['merge_s']:.1f} s (too brief to sample)"
    return f", merge {r['merge_peak'] / MIB:.0f} MiB"


GROWTH_KEYS = ("build_main_peak", "build_worker_peak", "array_task_peak", "text_main_peak", "text_worker_peak")


def _load() -> float:
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-gb", default="0.5,2", help="corpus sizes in GiB of text (2**30 characters each)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="toy sizes, 5 and 20 MB (the test suite runs this)")
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    ap.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    args = ap.parse_args(argv)
    sizes = [5 * MIB, 20 * MIB] if args.small else [int(float(x) * 2**30) for x in args.sizes_gb.split(",")]

    from ep_train.data.prep import LARGE_TEXT_BYTES, expand_inputs
    from ep_train.data.tokenizer import train_tokenizer

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_corpus_"))
    tmp.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    vocab = 1000 if args.small else 4096
    model = str(train_tokenizer([str(p) for p in expand_inputs([str(stdlib / "email"), str(stdlib / "json"),
                                                                 str(stdlib / "asyncio")])],
                                vocab, str(tmp / "tok"), input_sentence_size=200_000))
    rows = []
    try:
        for size in sizes:
            corpus = tmp / f"corpus_{size // MIB}MiB"
            docs, nbytes = make_corpus(corpus, size)
            common = ["--tokenizer", model, "--val-fraction", "0.01", "--no-progress"]
            budget = min(size, 200 * MIB)
            # The limit is measured before, between and after the tools' runs: the median stands beside them,
            # the spread shows how much the machine's other load moved it.
            lims = [limit_rate(corpus, model, args.workers, budget)]
            out = tmp / f"shards_{size // MIB}"
            secs, peaks, _ = sampled([[*TOOL, "build", "--input", str(corpus), "--output", str(out),
                                       "--workers", str(args.workers), *common]])
            man = json.loads((out / "manifest.json").read_text())
            tokens = man["splits"]["train"]["tokens"] + man["splits"]["val"]["tokens"]
            load_build = _load()
            shutil.rmtree(out)
            lims.append(limit_rate(corpus, model, args.workers, budget))
            arr = tmp / f"array_{size // MIB}"
            tasks = [[*TOOL, "build", "--input", str(corpus), "--output", str(arr), "--workers", "1",
                      "--num-tasks", str(args.workers), "--task-id", str(i), *common] for i in range(args.workers)]
            a_secs, a_peaks, _ = sampled(tasks)
            m_secs, m_peaks, _ = sampled([[*TOOL, "merge", str(arr)]])
            merged = json.loads((arr / "manifest.json").read_text())
            a_tokens = merged["splits"]["train"]["tokens"] + merged["splits"]["val"]["tokens"]
            shutil.rmtree(arr)
            lims.append(limit_rate(corpus, model, args.workers, budget))
            rates = sorted(r for r, _ in lims)
            lim, lim_tokens = rates[1], lims[0][1]
            shutil.rmtree(corpus)
            text_file = tmp / f"text_{size // MIB}" / "corpus.txt"
            text_bytes = make_text_file(text_file, size)
            t_out = tmp / f"text_shards_{size // MIB}"
            t_secs, t_peaks, _ = sampled([[*TOOL, "build", "--input", str(text_file), "--output", str(t_out),
                                           "--workers", str(args.workers), *common]])
            t_tokens = _tokens(t_out)
            shutil.rmtree(t_out)
            shutil.rmtree(text_file.parent)
            row = {"chars": nbytes, "documents": docs, "tokens": tokens, "build_s": secs, "build_tok_s": tokens / secs,
                   "build_main_peak": peaks["main"], "build_worker_peak": peaks["worker"],
                   "array_s": a_secs + m_secs, "array_tok_s": a_tokens / (a_secs + m_secs),
                   "array_task_peak": a_peaks["main"], "merge_peak": m_peaks["main"], "merge_s": m_secs,
                   "array_tokens": a_tokens,
                   "limit_tok_s": lim, "limit_min": rates[0], "limit_max": rates[-1], "limit_tokens": lim_tokens,
                   "load": max(load_build, _load()), "text_bytes": text_bytes, "text_s": t_secs,
                   "text_tokens": t_tokens, "text_main_peak": t_peaks["main"], "text_worker_peak": t_peaks["worker"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        compare = compare_whole(tmp, model, args.workers)
        print(json.dumps(compare), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    small, large = rows[0], rows[-1]
    # the text-file rows count only where both sizes take the same path (pieces above LARGE_TEXT_BYTES; --small's
    # first size is below it); a process too brief to be sampled (0) has nothing to compare
    keys = [k for k in GROWTH_KEYS if not k.startswith("text_") or small["text_bytes"] > LARGE_TEXT_BYTES]
    growth = max(large[k] / small[k] for k in keys if small[k] > 0)
    verdict = target_verdict("corpus_memory_growth", growth)
    table = ["| corpus | documents | tokens | tool | seconds | tokens/s | share of the limit | peak RSS per process "
             "| load avg |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gb = f"{r['chars'] / 1e9:.2f} G chars"
        table.append(f"| {gb} | {r['documents']:,} | {r['tokens']:,} | build, {args.workers} workers | "
                     f"{r['build_s']:.0f} | {r['build_tok_s']:,.0f} | {r['build_tok_s'] / r['limit_tok_s']:.0%} | "
                     f"main {r['build_main_peak'] / MIB:.0f} MiB, workers {r['build_worker_peak'] / MIB:.0f} MiB | "
                     f"{r['load']:.1f} |")
        table.append(f"| {gb} | | {r['array_tokens']:,} | {args.workers} array tasks + merge | {r['array_s']:.0f} | "
                     f"{r['array_tok_s']:,.0f} | {r['array_tok_s'] / r['limit_tok_s']:.0%} | "
                     f"task {r['array_task_peak'] / MIB:.0f} MiB{merge_note(r)} | |")
        table.append(f"| {gb} | | | raw sentencepiece (limit, {r['limit_tokens']:,} tokens in memory; median of 3: "
                     f"before, between, after) | | {r['limit_tok_s']:,.0f} ({r['limit_min']:,.0f}-"
                     f"{r['limit_max']:,.0f}) | 100% | | |")
        text_rate = r["text_tokens"] / r["text_s"]
        table.append(f"| {r['text_bytes'] / 1e9:.2f} GB file | 1 | {r['text_tokens']:,} | one .txt file, build, "
                     f"{args.workers} workers | {r['text_s']:.0f} | {text_rate:,.0f} | {text_rate / r['limit_tok_s']:.0%} "
                     f"| main {r['text_main_peak'] / MIB:.0f} MiB, workers {r['text_worker_peak'] / MIB:.0f} MiB | |")
    text = "\n".join(table)
    cmp_table = ["| one .txt file | tokenized | seconds | peak RSS, main | peak RSS, largest worker | tokens |",
                 "|---|---|---|---|---|---|"]
    for name, words in (("whole", "whole (the earlier path)"), ("pieces", "in pieces (now)")):
        c = compare[name]
        cmp_table.append(f"| {compare['bytes'] / MIB:.0f} MiB | {words} | {c['s']:.1f} | {c['main_peak'] / MIB:,.0f} MiB "
                         f"| {c['worker_peak'] / MIB:,.0f} MiB | {c['tokens']:,} |")
    cmp_text = "\n".join(cmp_table)
    whole_peak = max(compare["whole"]["main_peak"], compare["whole"]["worker_peak"])
    pieces_peak = max(compare["pieces"]["main_peak"], compare["pieces"]["worker_peak"])
    print(cmp_text)
    print(text)
    if args.write:
        append_section("Data preparation at corpus scale", f"""
`python bench/corpus_scale.py --sizes-gb {args.sizes_gb} --workers {args.workers} --write` on {machine()}.
Corpus: the standard library's `.py` files as jsonl rows in shuffled passes up to each size (real text,
repeated); sentencepiece BPE, {vocab} pieces; 1% validation. Every process tree sampled from outside
(VmHWM every 0.2 s). The array run starts its {args.workers} tasks at once with one encoding process each,
then merges; its tokens equal the build's: **{'yes' if all(r['array_tokens'] == r['tokens'] for r in rows) else 'NO'}**.
The limit encodes the first ~200 MB held in memory with {args.workers} sentencepiece processes.
"load avg" is the machine's 1-minute load average after the build (above ~{args.workers} means other work ran
alongside: the times then include it).

{text}

Memory does not grow with the corpus ({TARGETS['corpus_memory_growth'].what}: {describe('corpus_memory_growth')}):
**{verdict}** (ratio {growth:.2f} for {rows[-1]['chars'] / rows[0]['chars']:.0f}x the text).

A plain-text file is one document. Above {LARGE_TEXT_BYTES >> 20} MiB (`prep.LARGE_TEXT_BYTES`) it is read and
tokenized in pieces, each ending just after a newline (the "one .txt file" rows: the same texts, one after the
other, in one file). Their share of the limit can pass 100%: the limit encodes whole documents, and
sentencepiece encodes the pieces (at most `prep.PART_CHARS` characters) faster than long inputs. The earlier
path tokenized the whole file at once; both on one {compare['bytes'] / MIB:.0f} MiB file, {args.workers} workers:

{cmp_text}

The two wrote the same shards (every .bin's sha256): **{'yes' if compare['same_shards'] else 'NO'}**. Largest
process: {whole_peak / MIB:,.0f} MiB whole ({whole_peak / compare['bytes']:.0f}x the file), {pieces_peak / MIB:,.0f} MiB
in pieces.
""")
    return {"rows": rows, "growth": growth, "compare": compare}


if __name__ == "__main__":
    main()
