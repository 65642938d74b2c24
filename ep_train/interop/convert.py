"""``ep-train convert``: Hugging Face Mixtral out (``to-hf``) and in (``from-hf``), dense -> MoE (``upcycle``),
and ``reshard`` (the offline form of resuming at another world/EP size)."""

from __future__ import annotations

import argparse
import os

from ep_train.config import parse_overrides

TRAIN_HINT = "train it with:\n  ep-train train --config {cfg} --run-dir {run}{data}"


def _trained_with(cfg_path: str, run: str) -> str:
    from ep_train.config import load_config

    cfg = load_config(cfg_path, check_paths=False)  # a hint only; the trainer checks the paths
    data = "" if cfg.data.data_dir else " --data_dir DIR   (the output of data_prep_tool build)"
    return TRAIN_HINT.format(cfg=cfg_path, run=run, data=data)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ep-train convert", description="Convert between ep-train runs and Hugging "
                                 "Face Mixtral folders, or upcycle a dense model into an MoE.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    th = sub.add_parser("to-hf", help="export a run (any world/EP size) as a Hugging Face Mixtral folder")
    th.add_argument("--checkpoint", required=True, help="run directory (latest checkpoint), its checkpoints/ or a "
                    "checkpoints/step_N folder; or a run made by from-hf/upcycle not trained yet (its init weights)")
    th.add_argument("--output", required=True, help="new folder for config.json, safetensors and tokenizer")
    th.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: fp32 for checkpoints (master weights), the source's for init weights")
    th.add_argument("--max-shard-size", default="2GB",
                    help="safetensors file size cap, e.g. 5GB (files are streamed: memory is one tensor)")
    th.add_argument("--allow-dropless", action="store_true", help="export a model trained with "
                    "moe.capacity_factor as a dropless Mixtral (Hugging Face has no capacity)")
    fh = sub.add_parser("from-hf", help="make a run directory that starts from a Hugging Face Mixtral folder; extra "
                        "--section.key value pairs override the config")
    fh.add_argument("--hf", required=True, help="Hugging Face Mixtral folder (save_pretrained)")
    fh.add_argument("--output", required=True, help="new run directory")
    fh.add_argument("--config", default=None, help="base run config (data, training); the model comes from --hf")
    fh.add_argument("--link", action="store_true", help="hard-link the weights into RUN/init instead of copying")
    up = sub.add_parser("upcycle", help="make an MoE run directory whose experts start as a dense model's FFN; "
                        "extra --section.key value pairs override the config")
    up.add_argument("--dense", required=True, help="dense ep-train run (or checkpoint) or Hugging Face "
                    "Llama/Mistral folder")
    up.add_argument("--output", required=True, help="new run directory")
    up.add_argument("--num-experts", type=int, required=True)
    up.add_argument("--experts-per-token", type=int, default=2)
    up.add_argument("--noise", type=float, default=0.0, help="std of gaussian noise added to each expert's weights")
    up.add_argument("--router-init", choices=["zeros", "normal"], default="zeros",
                    help="zeros: uniform routing, the MoE computes the dense model; normal: moe.router_init_std")
    up.add_argument("--seed", type=int, default=0, help="seed of the noise and the normal router")
    up.add_argument("--config", default=None, help="base run config (data, training); the model comes from --dense")
    rs = sub.add_parser("reshard", help="prepare a checkpoint for resuming at any world/EP size ahead of time (the "
                        "trainer does it by itself at resume; for big models, do it here, off the cluster's clock)")
    rs.add_argument("--checkpoint", required=True, help="run directory (latest checkpoint) or checkpoints/step_N")
    args, rest = ap.parse_known_args(argv)
    if args.cmd == "reshard":
        if rest:
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
        from ep_train.interop.universal import find_checkpoint, to_universal

        step = find_checkpoint(args.checkpoint)
        if not (step / "universal" / "zero").is_dir() and not os.access(step, os.W_OK):
            raise ValueError(f"--checkpoint {str(step)!r} is read-only: reshard writes its conversion into the step "
                             "folder (where the resume looks for it); copy the checkpoint somewhere writable and "
                             "reshard (or resume from) the copy")
        out = to_universal(step)
        print(f"wrote {out}: every parameter whole, experts by global id; `ep-train train ... --resume {step}` "
              "now resumes at any world size and parallel.ep_size that divides the experts, without converting")
        return 0
    if args.cmd == "to-hf":
        if rest:
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
        from ep_train.interop.hf_export import to_hf

        out = to_hf(args.checkpoint, args.output, args.dtype, args.max_shard_size, args.allow_dropless)
        print(f"wrote {out} (transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
        return 0
    overrides = parse_overrides(rest)
    if args.cmd == "from-hf":
        from ep_train.interop.hf import from_hf

        cfg = from_hf(args.hf, args.output, args.config, overrides, args.link)
    else:
        from ep_train.interop.upcycle import upcycle

        cfg = upcycle(args.dense, args.output, args.num_experts, args.experts_per_token, args.noise,
                      args.router_init, args.seed, args.config, overrides)
    print(f"wrote {cfg} and {cfg.parent / 'init'}; " + _trained_with(str(cfg), args.output))
    return 0
