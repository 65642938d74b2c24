"""The ``ep-train`` command: ``train``, ``plan``, ``check``, ``generate``, ``convert``, ``analyze-experts``."""

from __future__ import annotations

import argparse
import importlib
import sys

from ep_train.config import load_config, parse_overrides, require_data, validate
from ep_train.stdio import exit_quietly_on_broken_pipe, report_error


def _plan(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ep-train plan", description="Parameter counts and per-rank memory (host and "
                                 "device peaks), before any GPU is touched. Extra --section.key value pairs override "
                                 "the config; the DeepSpeed JSON is the run's parallel.ds_config.")
    ap.add_argument("--config", required=False, help="YAML or JSON run config")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node (processes, also on CPU)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda",
                    help="where the run trains: decides train.mixed_precision auto (bf16 on cuda, fp32 on cpu); "
                         "on cpu everything is host memory")
    ap.add_argument("--zero-stage", type=int, default=None, choices=[1, 2, 3],
                    help="override the DeepSpeed JSON's zero_optimization.stage (the trainer takes 1 to 3)")
    ap.add_argument("--no-offload", action="store_true", help="assume no CPU offload whatever the JSON says")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON (bytes)")
    args, rest = ap.parse_known_args(argv)
    for flag, value, what in (("--nodes", args.nodes, "machines"), ("--gpus-per-node", args.gpus_per_node,
                                                                     "processes (GPUs) per machine")):
        if value < 1:
            raise ValueError(f"{flag} = {value} is invalid: must be >= 1; pass the number of {what}, e.g. {flag} 1")
    import json

    from ep_train.sizes import format_size, model_size, plan_memory

    # a plan needs no data, tokenizer or checkpoint here (a cluster's config planned on a laptop)
    cfg = load_config(args.config, parse_overrides(rest, refuse_repeated=True), check_paths=False)
    world = args.nodes * args.gpus_per_node
    validate(cfg, world_size=world, check_paths=False)
    plan = plan_memory(cfg, world, args.device, zero_stage=args.zero_stage, offload=False if args.no_offload else None)
    if args.json:
        size = model_size(cfg)
        print(json.dumps({"parameters": {"total": size.total, "active": size.active}, **plan}, indent=1))
        return 0
    print(format_size(cfg))
    gib = 2 ** 30
    off = " + CPU offload" if plan["offload_optimizer"] or plan["offload_param"] else ""
    print(f"\nper rank, {world} ranks ({args.nodes} x {args.gpus_per_node}), ep_size {cfg.parallel.ep_size}, "
          f"ZeRO-{plan['zero_stage']}{off}, {plan['precision']} on {args.device} "
          f"({plan['partition_elements']:,} parameter elements in this rank's partitions):")
    for b in plan["breakdown"]:
        print(f"  {b['name']:<26} {b['where']:<6} {b['bytes'] / gib:8.2f} GiB  {b['why']}")
    print(f"  {'host peak':<26} {'':<6} {plan['host_peak_bytes'] / gib:8.2f} GiB per rank "
          f"(end of set-up {plan['host_setup_bytes'] / gib:.2f} GiB)")
    print(f"  {'device peak':<26} {'':<6} {plan['device_peak_bytes'] / gib:8.2f} GiB per rank")
    print(f"  all-to-all: {plan['all_to_all_bytes_per_step'] / 2 ** 20:,.1f} MiB sent per rank per step")
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
    cfg = load_config(args.config, parse_overrides(rest, refuse_repeated=True))
    validate(cfg, world_size=args.world_size)
    if args.run_dir is not None:  # a training launch (the launch scripts pass the trainer's arguments): as main()
        require_data(cfg)
    print(f"config ok: {args.config or '(defaults)'}")
    return 0


def _refuse_repeated_fields(argv: list[str]) -> None:
    """``ep-train train``: the overrides as the trainer reads them (past its own options), a field given twice
    refused as ``check`` does (``python -m ep_train.train`` itself keeps the last: see parse_overrides)."""
    if "-h" in argv or "--help" in argv:
        return
    ap = argparse.ArgumentParser(prog="ep-train train", add_help=False)
    for names in (("--config",), ("--run-dir", "--run_dir"), ("--local_rank", "--local-rank")):
        ap.add_argument(*names)
    parse_overrides(ap.parse_known_args(argv)[1], refuse_repeated=True)


LAZY_COMMANDS = {"generate": "ep_train.generation", "convert": "ep_train.interop.convert",
                 "analyze-experts": "ep_train.analyze"}


@exit_quietly_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"plan": _plan, "check": _check}
    for name, module in LAZY_COMMANDS.items():  # torch is imported only when one of these runs
        commands[name] = lambda args, m=module: importlib.import_module(m).main(args)
    try:
        from ep_train.train import main as train_main

        def _train(args: list[str]) -> int:
            _refuse_repeated_fields(args)
            return train_main(args)

        commands["train"] = _train
    except ImportError:
        pass
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"ep-train: error: unknown command {argv[0]!r}", file=sys.stderr)
        print("usage: ep-train COMMAND ...   (ep-train COMMAND --help for its options)\n"
              "  train --config C.yaml [--section.key value ...]   the trainer (under torchrun/deepspeed)\n"
              "  plan --config C.yaml [--nodes N --gpus-per-node G]   parameters and per-rank memory\n"
              "  check --config C.yaml [--world-size N]            the config's checks, nothing else\n"
              "  generate --checkpoint PATH --prompt TEXT           sampling with a KV cache\n"
              "  convert {to-hf,from-hf,upcycle,reshard} ...        Hugging Face in/out, dense -> MoE, resharding\n"
              "  analyze-experts --checkpoint PATH --data DIR --output DIR   what each expert takes",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    errors: tuple[type[Exception], ...] = (ValueError,)
    if argv[0] == "train":  # only the trainer needs torch; plan and check stay quick
        from ep_train.train.trainer import NonFiniteLossError

        errors += (NonFiniteLossError,)
    try:
        return commands[argv[0]](argv[1:]) or 0
    except errors as e:
        return report_error(f"ep-train {argv[0]}", e)


if __name__ == "__main__":
    sys.exit(main())
