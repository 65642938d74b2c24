"""``data_prep_tool``: train-tokenizer, build, merge, adopt, inspect."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ep_train.data import prep
from ep_train.data.tokenizer import train_tokenizer
from ep_train.stdio import exit_quietly_on_broken_pipe, report_error


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="data_prep_tool", description="Local text -> sentencepiece -> Megatron shards")
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train-tokenizer", help="train a sentencepiece model (BPE, byte fallback, split digits)")
    t.add_argument("--input", nargs="+", required=True, help="text files, globs or folders")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--output", required=True, help="prefix: writes PREFIX.model, PREFIX.vocab, PREFIX.json")
    t.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    t.add_argument("--input-sentence-size", type=int, default=2_000_000, help="lines sampled for training")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--bos-id", type=int, default=1)
    t.add_argument("--eos-id", type=int, default=2)
    t.add_argument("--unk-id", type=int, default=0)
    t.add_argument("--pad-id", type=int, default=3)
    t.add_argument("--text-key", default="text", help="JSON/parquet field holding the text (as for build)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.model")

    b = sub.add_parser("build", help="tokenize local text/jsonl/parquet/arrow into shards + manifest.json")
    b.add_argument("--input", nargs="+", required=True, help="files, globs or folders")
    b.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    b.add_argument("--output", required=True, help="output folder")
    b.add_argument("--workers", type=int, default=1, help="encoding processes")
    b.add_argument("--text-key", default="text", help="field holding the text in json/parquet/arrow rows")
    b.add_argument("--val-fraction", type=float, default=0.0, help="share of documents for validation")
    b.add_argument("--shard-size-mb", type=float, default=256.0, help="roll to a new shard at this size")
    b.add_argument("--append-bos", action="store_true", help="also put BOS before each document")
    b.add_argument("--strict", action="store_true", help="stop at the first malformed row")
    b.add_argument("--dtype", choices=["uint16", "int32"], default=None, help="token dtype (default: by vocab)")
    b.add_argument("--num-tasks", type=int, default=1, help="split the inputs over N array tasks")
    b.add_argument("--task-id", type=int, default=0, help="this task's index (SLURM_ARRAY_TASK_ID)")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--overwrite", action="store_true",
                   help="delete the previous build in --output (its shards, progress.json, manifest.json; nothing "
                        "else) and build afresh; without it, a folder holding another build is refused")

    m = sub.add_parser("merge", help="one manifest over the part_* folders of a --num-tasks build")
    m.add_argument("output")

    a = sub.add_parser("adopt", help="write manifest.json for Megatron/GPT-NeoX .bin/.idx shards made elsewhere")
    a.add_argument("folder", help="the folder holding PREFIX.bin + PREFIX.idx pairs (searched recursively)")
    a.add_argument("--tokenizer", required=True, help="the sentencepiece .model the shards were made with")
    a.add_argument("--val", nargs="*", default=[], metavar="PATTERN",
                   help="prefixes (fnmatch, relative to the folder) that form the validation split")

    i = sub.add_parser("inspect", help="counts, dtype, length histogram, decoded samples, checksums")
    i.add_argument("data_dir")
    i.add_argument("--samples", type=int, default=3)
    i.add_argument("--tokenizer", default=None, help="if the manifest's tokenizer path moved")
    i.add_argument("--no-verify", action="store_true")
    i.add_argument("--force-tokenizer", action="store_true",
                   help="decode samples even with a tokenizer other than the build's (its sha256 differs)")
    return ap


def _docs(split: dict) -> str:
    """'N docs', or 'N docs in M sequences' where large text files were written in pieces."""
    docs = sum(s.get("megatron_documents", s["documents"]) for s in split["shards"])
    return f"{docs:,} docs" + (f" in {split['documents']:,} sequences" if docs != split["documents"] else "")


@exit_quietly_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "train-tokenizer":
            files = [str(p) for p in prep.expand_inputs(args.input)]
            if Path(f"{args.output}.model").exists() and not args.overwrite:
                raise ValueError(f"--output {args.output!r}: {args.output}.model exists already (shards built with "
                                 "it would no longer match it); add --overwrite to replace it, or choose another "
                                 "--output prefix")
            path = train_tokenizer(files, args.vocab_size, args.output, text_key=args.text_key,
                                   model_type=args.model_type,
                                   input_sentence_size=args.input_sentence_size, num_threads=args.threads,
                                   bos_id=args.bos_id, eos_id=args.eos_id, unk_id=args.unk_id, pad_id=args.pad_id)
            print(f"wrote {path}")
        elif args.cmd == "build":
            man = prep.build(args.input, args.tokenizer, args.output, workers=args.workers, text_key=args.text_key,
                             val_fraction=args.val_fraction, shard_size_mb=args.shard_size_mb,
                             append_bos=args.append_bos, strict=args.strict, num_tasks=args.num_tasks,
                             task_id=args.task_id, dtype=args.dtype, progress=not args.no_progress,
                             overwrite=args.overwrite)
            if man.get("already_built"):
                out = args.output if args.num_tasks == 1 else f"{args.output}/part_{args.task_id:05d}"
                print(f"{out} already holds this build (same inputs, tokenizer and options): nothing to do; "
                      "add --overwrite to rebuild it")
            s, r = man["splits"], man["report"]
            print(f"train: {_docs(s['train'])}, {s['train']['tokens']:,} tokens in {len(s['train']['shards'])} "
                  f"shard(s); val: {_docs(s['val'])}, {s['val']['tokens']:,} tokens")
            print("skipped: " + json.dumps({k: v for k, v in r.items() if k != "examples"}))
            for e in r["examples"]:
                print(f"  {e}")
        elif args.cmd == "merge":
            man = prep.merge(args.output)
            print(f"merged {len(man['splits']['train']['shards'])} train shard(s) into {args.output}/manifest.json")
        elif args.cmd == "adopt":
            from ep_train.data.adopt import adopt

            man = adopt(args.folder, args.tokenizer, args.val)
            s = man["splits"]
            print(f"wrote {args.folder}/manifest.json: train {len(s['train']['shards'])} shard(s), "
                  f"{s['train']['tokens']:,} tokens; val {len(s['val']['shards'])} shard(s), {s['val']['tokens']:,} "
                  "tokens")
        elif args.cmd == "inspect":
            text, ok = prep.inspect(args.data_dir, args.samples, args.tokenizer, verify=not args.no_verify,
                                    force_tokenizer=args.force_tokenizer)
            print(text)
            return 0 if ok else 1
    except ValueError as e:
        return report_error(f"data_prep_tool {args.cmd}", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
