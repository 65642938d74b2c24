"""The ``ep-train`` command: ``train``, ``plan``, ``check``."""

from __future__ import annotations

import argparse
import sys

from ep_train.config import load_config, parse_overrides, validate
from ep_train.stdio import exit_quietly_on_broken_pipe


def _plan(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ep-train plan", description="Parameter counts and per-rank memory, "
                                 "before any GPU is touched. Extra --section.key value pairs override the config.")
    ap.add_argument("--config", required=False, help="YAML or JSON run config")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    ap.add_argument("--no-offload", action="store_true", help="assume no CPU offload of params/optimizer")
    args, rest = ap.parse_known_args(argv)
    for flag, value, what in (("--nodes", args.nodes, "machines"), ("--gpus-per-node", args.gpus_per_node,
                                                                     "processes (GPUs) per machine")):
        if value < 1:
            raise ValueError(f"{flag} = {value} is invalid: must be >= 1; pass the number of {what}, e.g. {flag} 1")
    from ep_train.sizes import format_size, model_state_bytes_per_rank

    cfg = load_config(args.config, parse_overrides(rest))
    world = args.nodes * args.gpus_per_node
    validate(cfg, world_size=world)
    print(format_size(cfg))
    mem = model_state_bytes_per_rank(cfg, world, args.zero_stage, offload=not args.no_offload)
    gib = 2 ** 30
    print(f"\nper rank, {world} ranks ({args.nodes} x {args.gpus_per_node}), ep_size {cfg.parallel.ep_size}, "
          f"ZeRO-{args.zero_stage}{'' if args.no_offload else ' + CPU offload'}, bf16 params + fp32 Adam:")
    for k in ("params", "grads", "optimizer"):
        print(f"  {k:<10} {mem[k] / gib:8.2f} GiB")
    print(f"  {'on device':<10} {mem['device'] / gib:8.2f} GiB (model states; activations come on top)")
    print(f"  {'host RAM':<10} {mem['host'] / gib:8.2f} GiB")
    return 0


def _check(argv: list[str]) -> int:
    """The trainer's config checks without starting it: the launch scripts run this first, so a bad
    config gives one error and exit code 2 instead of one per worker plus torchrun's failure report."""
    ap = argparse.ArgumentParser(prog="ep-train check", description="Load and validate a run config exactly as "
                                 "the trainer does (command line > file > defaults), then exit 0 or 2.")
    ap.add_argument("--config", required=False, help="YAML or JSON run config")
    ap.add_argument("--world-size", type=int, default=None, help="also check divisibility by this many processes")
    ap.add_argument("--run-dir", "--run_dir", dest="run_dir", default=None, help=argparse.SUPPRESS)  # trainer's
    args, rest = ap.parse_known_args(argv)
    cfg = load_config(args.config, parse_overrides(rest))
    validate(cfg, world_size=args.world_size)
    print(f"config ok: {args.config or '(defaults)'}")
    return 0


@exit_quietly_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"plan": _plan, "check": _check}
    try:
        from ep_train.train import main as train_main
        commands["train"] = train_main
    except ImportError:
        pass
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(f"usage: ep-train {{{','.join(commands)}}} --config C.yaml [--section.key value ...]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    errors: tuple[type[Exception], ...] = (ValueError,)
    if argv[0] == "train":  # only the trainer needs torch; plan and check stay quick
        from ep_train.train.trainer import NonFiniteLossError

        errors += (NonFiniteLossError,)
    try:
        return commands[argv[0]](argv[1:]) or 0
    except errors as e:
        print(f"ep-train {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
