"""Data preparation throughput: ep-train's build vs the raw sentencepiece limit vs datasets.map.

    python bench/data_prep.py [--workers 2] [--repeat 3] [--write]

Same text (the Python standard library's sources), same tokenizer, same number of processes:
- limit: the documents already in memory, encoded by a Pool of N sentencepiece processes (no reading,
  no writing): the fastest any tool could go on this machine;
- ep-train: `data_prep_tool build` end to end (read, encode, EOS, split, write shards, checksums);
- datasets.map: `load_dataset("text") .map(tokenize, batched, num_proc=N)` (Arrow cache, no shards).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import sysconfig
import tempfile
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import append_section, machine, stats, timed  # noqa: E402
from bench.targets import describe, figure  # noqa: E402
from bench.targets import verdict as target_verdict  # noqa: E402

_sp = None


def _init(model: str) -> None:
    global _sp
    import sentencepiece as spm

    _sp = spm.SentencePieceProcessor(model_file=model)


def _encode(texts: list[str]) -> int:
    return sum(len(x) + 1 for x in _sp.encode(texts))


def corpus(small: bool) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if small:
        return [str(stdlib / "json"), str(stdlib / "textwrap.py")]
    # the whole standard library's Python sources (tests included), not third-party site-packages
    return [str(p) for p in sorted(stdlib.rglob("*.py")) if "site-packages" not in p.parts]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="toy size (the test suite runs this)")
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args(argv)

    from ep_train.data import prep
    from ep_train.data.tokenizer import train_tokenizer

    inputs = corpus(args.small)
    files = prep.expand_inputs(inputs)
    tmp = Path(tempfile.mkdtemp(prefix="bench_prep_"))
    vocab = 1000 if args.small else 4096
    model = str(train_tokenizer([str(f) for f in files], vocab, str(tmp / "tok"), input_sentence_size=200_000))
    texts = [f.read_text(errors="replace") for f in files]
    texts = [t for t in texts if t.strip()]
    batches = [texts[i:i + 16] for i in range(0, len(texts), 16)]
    ctx = get_context("fork")

    tokens = {}

    def limit() -> None:
        with ctx.Pool(args.workers, _init, (model,)) as pool:
            tokens["limit"] = sum(pool.imap(_encode, batches))

    def ours() -> None:
        out = tmp / "shards"
        shutil.rmtree(out, ignore_errors=True)
        man = prep.build(inputs, model, str(out), workers=args.workers, progress=False)
        tokens["ep-train"] = man["splits"]["train"]["tokens"]

    def hf_map() -> None:
        import datasets

        datasets.disable_progress_bars()
        ds = datasets.load_dataset("text", data_files=[str(f) for f in files], sample_by="document", split="train",
                                   cache_dir=str(tmp / "hf_cache"), keep_in_memory=True,
                                   encoding_errors="replace")

        def tok(batch: dict) -> dict:
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=model)
            return {"ids": [x + [sp.eos_id()] for x in sp.encode(batch["text"])]}

        mapped = ds.map(tok, batched=True, batch_size=16, num_proc=args.workers, remove_columns=["text"],
                        keep_in_memory=True)
        tokens["datasets.map"] = sum(len(x) for x in mapped["ids"] if len(x) > 1)

    results = {}
    for name, fn in (("limit", limit), ("ep-train", ours), ("datasets.map", hf_map)):
        fn()  # warm-up (imports, page cache)
        results[name] = timed(fn, args.repeat)
    shutil.rmtree(tmp, ignore_errors=True)
    lim_rate = tokens["limit"] / stats(results["limit"])[0]
    rows = ["| tool | tokens | seconds, median (min-max) | tokens/s | share of the limit |", "|---|---|---|---|---|"]
    for name, ts in results.items():
        med, lo, hi = stats(ts)
        rate = tokens[name] / med
        rows.append(f"| {name} | {tokens[name]:,} | {med:.2f} ({lo:.2f}-{hi:.2f}) | {rate:,.0f} | "
                    f"{rate / lim_rate:.0%} |")
    table = "\n".join(rows)
    print(table)
    share = (tokens["ep-train"] / stats(results["ep-train"])[0]) / lim_rate
    verdict = target_verdict("data_prep_share", share)
    if args.write:
        append_section("Data preparation", f"""
`python bench/data_prep.py --workers {args.workers} --repeat {args.repeat} --write` on {machine()}.
Corpus: {len(texts)} documents, every `.py` file of the Python standard library; sentencepiece BPE, {vocab} pieces;
{args.workers} processes for every tool. Target (bench/targets.py): ep-train's tokens/s {describe('data_prep_share')} of the limit's: **{verdict}** ({figure('data_prep_share', share, 0)}).

{table}

The limit only encodes documents already in memory; ep-train also reads and decodes the files
(plain text directly, not through `datasets`' text loader), writes shards (all training: no validation split
here) and hashes them. Token counts: ep-train {tokens['ep-train']:,}, the limit {tokens['limit']:,}; the limit reads
in text mode (`\\r\\n` becomes `\\n`, a byte-order mark stays a character), ep-train reads bytes (keeps
`\\r\\n`, drops a byte-order mark).
""")
    return {"share": share, "tokens": tokens}


if __name__ == "__main__":
    main()
