"""``ep-train train``: the training loop on a DeepSpeed engine (ZeRO-1/2/3, CPU offload, EP).

Launched by ``deepspeed``, ``torchrun`` or as one plain process. Every rank runs the same steps;
host syncs per step: the non-finite check per micro-batch and, on logging steps, the metric
all-reduces.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ep_train.config import (Config, DataConfig, check_new_run, config_from_dict, config_to_dict, data_sources,
                             load_config, parse_overrides, require_data, validate)
from ep_train.data.loader import DistributedBatches, TokenWindows
from ep_train.data.mixture import Blend, data_fingerprint, mixture_key
from ep_train.data.verify import has_split, load_manifest, verify_for_training
from ep_train.model.moe import expert_biases, set_expert_biases, update_expert_biases
from ep_train.model.transformer import (Transformer, build_model, document_ids, document_positions,
                                        eod_masked_targets)
from ep_train.parallel import compile_blocks, parallelize
from ep_train.parallel.groups import deepspeed_layout, init_distributed
from ep_train.sizes import model_size
from ep_train.stdio import keep_running_on_broken_pipe
from ep_train.train import checkpoint, resume
from ep_train.train.metrics import CollapseWatch, MetricsLogger
from ep_train.train.optim import lr_schedule, optimizer_param_groups
from ep_train.train.signals import STOP_EXIT_CODE, STOP_MARKER, StopFlag


class NonFiniteLossError(RuntimeError):
    pass


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[tuple[str, Any]]]:
    ap = argparse.ArgumentParser(prog="ep-train train", description="Train an MoE model. Any config key can be "
                                 "overridden as --section.key VALUE or --key VALUE (e.g. --num_experts 8).")
    ap.add_argument("--config", default=None, help="YAML or JSON run config")
    ap.add_argument("--run-dir", "--run_dir", dest="run_dir", default="runs/default",
                    help="checkpoints, TensorBoard logs, metrics.jsonl")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args, rest = ap.parse_known_args(argv)
    return args, parse_overrides(rest)


def partition_report(model: torch.nn.Module) -> dict[str, Any]:
    """Elements of each parameter this rank holds (its ZeRO partition, padding included) vs in full."""
    rep: dict[str, Any] = {"dense": 0, "expert": 0, "params": {}}
    for n, p in model.named_parameters():
        # ds_numel, not numel(): a partition swapped to NVMe has an empty ds_tensor
        local = p.ds_tensor.ds_numel if hasattr(p, "ds_tensor") else p.numel()
        full = getattr(p, "ds_numel", p.numel())
        rep["expert" if getattr(p, "allreduce", True) is False else "dense"] += local
        rep["params"][n] = [local, full]
    return rep


def shards_eos_id(data_dir: str | Path, data: DataConfig) -> int:
    """The EOS id that ends each document in the shards (data.document_mask cuts windows at it,
    data.eod_mask_loss drops the target after it); refused, naming the setting that needs it, if absent."""
    key = "document_mask" if data.document_mask else "eod_mask_loss"
    eos = load_manifest(data_dir)["tokenizer"].get("eos_id")
    if not isinstance(eos, int) or isinstance(eos, bool) or eos < 0:
        raise ValueError(f"data.{key} = true needs the EOS id that ends each document, but "
                         f"{Path(data_dir) / 'manifest.json'} has tokenizer.eos_id = {eos!r}; rebuild the shards "
                         f"with a tokenizer that has EOS (data_prep_tool build), or set data.{key} false")
    return eos


def eval_windows(eval_batches: int, batch_size: int, available: int, per_round: int) -> int:
    """How many held-out windows an evaluation reads (the first ones of the split): ``eval_batches`` global
    batches, as Megatron's eval_iters counts them, so the figure is the same at any world size or micro-batch
    size (a run resumed at another shape keeps its validation curve); fewer when the split holds fewer, cut to
    whole rounds of one micro-batch per rank (``per_round``) so every rank runs the same forwards."""
    return min(eval_batches * batch_size, available // per_round * per_round)


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, stop: StopFlag | None = None) -> None:
        import deepspeed

        from ep_train.parallel.zero import (build_ds_config, gather_whole_blocks, is_offloading_optimizer,
                                            materialize_partitioned)
        from ep_train.parallel.ds_grad_path import apply_fast_grad_path
        from ep_train.parallel.ds_load import fetch_only_loaded
        from ep_train.parallel.ds_nvme import allow_moe_save
        from ep_train.parallel.ds_memory import lean_offload_buffers

        self.cfg, self.run_dir = cfg, run_dir
        self.rank, self.world, self.device = init_distributed()
        validate(cfg, world_size=self.world)
        t = cfg.train
        use_bf16 = t.mixed_precision == "bf16" or (t.mixed_precision == "auto" and self.device.type == "cuda")
        self.ds_config = build_ds_config(cfg, self.world, use_bf16)
        self.ckpt_root = run_dir / "checkpoints"
        # Chosen before the engine exists: a checkpoint from another world/EP size is converted here (rank 0,
        # before this rank builds its model) and needs DeepSpeed's universal loader, a switch the engine
        # reads when it is built.
        self.resume_plan = resume.plan(cfg, self.ckpt_root, self.world, self.rank, self.ds_config,
                                       log=lambda m: print(m, flush=True))
        if self.resume_plan is not None and self.resume_plan.universal is not None:
            self.ds_config["checkpoint"] = {**self.ds_config.get("checkpoint", {}), "load_universal": True}
        if self.resume_plan is None:  # a model that starts training now (validate left these to here on a resume)
            check_new_run(cfg.moe)
        torch.manual_seed(t.seed + self.rank)  # per-rank streams (router noise); the model init is shared

        self.sources = data_sources(cfg.data)
        assert self.sources  # main() refuses a run without data before any process group
        # Every rank checks (and fails alike): manifest sizes and index checksums, tokenizer and vocabulary,
        # no token id >= model.vocab_size (found here with its shard and position, not deep in the model).
        for src in self.sources:
            verify_for_training(src.path, "train", cfg.model.vocab_size, cfg.data.tokenizer)
            if t.eval_interval and has_split(src.path, "val"):
                verify_for_training(src.path, "val", cfg.model.vocab_size, cfg.data.tokenizer)
        self.eos_id = (shards_eos_id(self.sources[0].path, cfg.data)
                       if cfg.data.document_mask or cfg.data.eod_mask_loss else None)
        self.blend = Blend([TokenWindows(src.path, "train", cfg.data.seq_len, cfg.data.tokenizer)
                            for src in self.sources], [src.weight for src in self.sources], t.seed,
                           cfg.data.shuffle, [src.label for src in self.sources])
        # what a checkpoint's data position indexes into (saved with each checkpoint, compared on resume)
        self.data_fingerprint = data_fingerprint(self.sources, [w.num_windows for w in self.blend.windows])
        # Sharded construction: shapes on `meta`, this rank's experts only, then values module by module
        # straight into this rank's ZeRO-3 partitions (ep_train.parallel.zero.materialize_partitioned).
        layout = deepspeed_layout(cfg.parallel.ep_size)
        self.ep_group = layout.ep_group
        model = parallelize(build_model(cfg.model, cfg.moe, device="meta"), cfg, layout)
        materialize_partitioned(model, self._value_source(), self.ds_config, layout,
                                dtype=torch.bfloat16 if use_bf16 else torch.float32, device=self.device)
        groups = optimizer_param_groups(model, cfg)
        adam = dict(lr=t.learning_rate, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)
        if is_offloading_optimizer(self.ds_config):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **adam)
        else:
            optimizer = torch.optim.AdamW(groups, **adam)
        schedule = lr_schedule(optimizer, t)
        leaf_blocks = gather_whole_blocks(model, self.ds_config, cfg.parallel.zero3_gather)  # one gather per block
        with lean_offload_buffers(self.ds_config):  # no duplicate fp32 master / gradient buffers (ds_memory.py)
            self.engine, _, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=schedule, config=self.ds_config)
        apply_fast_grad_path(self.engine.optimizer, self.ds_config)  # no full-size gradient copies (ds_grad_path.py)
        allow_moe_save(self.engine)  # MoE checkpoints with optimizer states on NVMe (ds_nvme.py)
        fetch_only_loaded(self.engine)  # a resume gathers no expert it does not load (ds_load.py)
        self.model: Transformer = model
        if t.compile:
            compile_blocks(model)
        report = partition_report(model)
        (run_dir / "partitions").mkdir(parents=True, exist_ok=True)
        (run_dir / "partitions" / f"rank{self.rank}.json").write_text(json.dumps(report))
        if self.rank == 0:
            print(f"rank 0 holds {report['dense']:,} dense and {report['expert']:,} expert parameter elements "
                  f"(ZeRO-{self.ds_config['zero_optimization']['stage']} partitions"
                  f"{f', gathered a block at a time: {leaf_blocks} blocks' if leaf_blocks else ''})", flush=True)
        self.step, self.skipped, self.consecutive_skips = 0, 0, 0
        self.saved_step: int | None = None  # the step of the newest complete checkpoint of this run's state
        self.batches = DistributedBatches(self.blend, t.batch_size, t.micro_batch_size, self.rank, self.world,
                                          seed=t.seed, shuffle=cfg.data.shuffle)
        self.metrics = MetricsLogger(run_dir, self.rank == 0, t.max_steps,
                                     CollapseWatch(t.collapse_threshold, t.collapse_intervals), cfg.parallel.ep_size)
        self.stop = stop or StopFlag()

    def _loss_targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The targets the loss counts: -100 where the input is EOS under data.eod_mask_loss."""
        return eod_masked_targets(x, y, self.eos_id) if self.cfg.data.eod_mask_loss else y

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        x, y = x.to(self.device), y.to(self.device)
        y = self._loss_targets(x, y)
        if not self.cfg.data.document_mask:
            return self.engine(x, y)
        doc = document_ids(x, self.eos_id)
        return self.engine(x, y, doc, document_positions(doc) if self.cfg.data.reset_positions else None)

    def _leave_other_histories(self, step: int) -> None:
        """Collective. What lies past ``step`` in the run folder belongs to a history this run does not
        continue: checkpoints go to checkpoints/abandoned/ (checkpoint.set_aside_newer), metrics.jsonl
        records to metrics.abandoned.jsonl. Rank 0 does it; any failure there reaches every rank."""
        err = ""
        if self.rank == 0:
            try:
                moved, removed = checkpoint.set_aside_newer(self.ckpt_root, step)
                lines = self.metrics.resume_at(step, step * self.cfg.train.batch_size * self.cfg.data.seq_len)
            except Exception as e:  # on rank 0 alone: the others must not wait for it at a collective
                moved, removed, lines = [], [], 0
                err = (f"could not move what lies past step {step} in {self.run_dir} out of the way "
                       f"({type(e).__name__}: {e}); fix the folder's permissions or free space, or move the "
                       "checkpoints/step_* folders past that step and metrics.jsonl aside yourself")
            for p in moved:
                print(f"resume: a checkpoint past step {step}, from a history this run leaves, moved to {p} "
                      "(pruning would otherwise delete the new checkpoints, and resume auto return to it)",
                      flush=True)
            for p in removed:
                print(f"resume: removed {p}, an incomplete save past step {step}", flush=True)
            if lines:
                print(f"resume: {lines} metrics.jsonl records past step {step} (they will be logged again) "
                      "moved to metrics.abandoned.jsonl", flush=True)
        msg = [err]
        dist.broadcast_object_list(msg, src=0)  # communication: no rank saves before the folders are out of the way
        if msg[0]:
            raise checkpoint.CheckpointError(msg[0])

    def _value_source(self):  # type: ignore[no-untyped-def]
        """Initial values: the seeded initialisation, or a Hugging Face checkpoint streamed tensor by tensor."""
        from ep_train.model.init import SeededInit

        if self.cfg.train.init_from and self.resume_plan is None:  # a resume's values come from its checkpoint
            from ep_train.interop.hf import HFMixtralSource

            return HFMixtralSource(self.cfg.train.init_from, self.cfg)  # checks the run config matches it
        return SeededInit(self.cfg.model, self.cfg.moe, self.cfg.train.seed)

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self) -> Path:
        state = {"step": self.step, "consumed_samples": self.batches.consumed_samples, "skipped_steps": self.skipped,
                 "world_size": self.world, "config": config_to_dict(self.cfg), "data": self.data_fingerprint,
                 "zero": resume.zero_layout(self.ds_config), "consecutive_skips": self.consecutive_skips}
        biases = expert_biases(self.model)
        if biases:  # in the JSON, not DeepSpeed's files: exact (float32 -> float64 -> float32)
            state["expert_bias"] = biases
        estimate = model_size(self.cfg).total * 16  # fp32 parameters + master copy + two Adam moments
        path = checkpoint.save(self.engine, self.ckpt_root, self.step, state, self.cfg.train.keep_last, estimate)
        self.saved_step = self.step
        if self.rank == 0:
            print(f"saved checkpoint {path}", flush=True)
        return path

    def maybe_resume(self) -> None:
        plan = self.resume_plan
        if plan is None:
            if self.cfg.train.resume is not None and self.rank == 0:
                print(f"resume auto: no checkpoint in {self.ckpt_root}, starting fresh", flush=True)
            self._leave_other_histories(0)  # a crash before the first save left its records; a new run's too
            return
        optimizer = self.scheduler.optimizer
        tags = resume.group_tags(optimizer)
        state = checkpoint.load(self.engine, plan.path, plan.universal)
        if plan.universal is not None:
            resume.restore_group_tags(optimizer, tags)  # DeepSpeed's universal load overwrote them
            resume.separate_steps(optimizer)  # ... and left one step count shared by every sub-group
        self.step, self.skipped = state["step"], state["skipped_steps"]
        # train.max_consecutive_skips counts across the stop (absent in checkpoints that predate it: 0)
        self.consecutive_skips = state.get("consecutive_skips", 0)
        self.batches.consumed_samples = state["consumed_samples"]
        if plan.path.parent.resolve() == self.ckpt_root.resolve():
            self.saved_step = self.step  # this state is on disk already: a run resumed at its end saves nothing
        self._leave_other_histories(self.step)
        set_expert_biases(self.model, state.get("expert_bias", {}))  # the moe section cannot change on resume
        changed = resume.apply_changes(self.scheduler, state["config"], self.cfg, self.step - self.skipped,
                                       force=plan.universal is not None)
        if self.rank == 0:
            how = f", resharded ({'; '.join(plan.reshard)})" if plan.reshard else ""
            print(f"resumed from {plan.path} at step {self.step} ({self.batches.consumed_samples} samples){how}",
                  flush=True)
            for c in changed:
                print(f"resume: applying changed {c}", flush=True)
            saved = config_from_dict(state["config"]).data  # the checkpoint's, defaults for fields it predates
            for key in ("document_mask", "reset_positions", "eod_mask_loss"):  # changes what is learned: say so
                if getattr(saved, key) != getattr(self.cfg.data, key):
                    print(f"resume: data.{key} changes from {getattr(saved, key)} to {getattr(self.cfg.data, key)} "
                          f"at step {self.step}", flush=True)
            for path, now_fp in self.data_fingerprint.items():  # the same folders, rebuilt since?
                then = state.get("data", {}).get(path)  # absent in checkpoints that predate it
                if then is not None and then != now_fp:
                    print(f"resume: the data in {path} changed since the checkpoint (training windows "
                          f"{then['windows']:,} -> {now_fp['windows']:,}, shards "
                          f"{'the same' if then['shards_sha256'] == now_fp['shards_sha256'] else 'rebuilt'}): "
                          f"samples from {self.batches.consumed_samples} on follow the new data's order, which does "
                          "not continue the old one's (some samples may repeat or be skipped)", flush=True)
            before, now = mixture_key(data_sources(saved)), mixture_key(self.sources)
            if before != now:
                def show(key: list[tuple[Path, float]]) -> str:
                    return ", ".join(f"{w:.3f} {path}" for path, w in key)

                print(f"resume: the data sources or weights differ from the checkpoint's "
                      f"({show(before)} -> {show(now)}): samples from "
                      f"{self.batches.consumed_samples} on follow the new mixture, which does not continue the old "
                      "one's order (some samples may repeat or be skipped)", flush=True)

    # ---- one step ----------------------------------------------------------------------------
    def _stop_requested(self) -> bool:
        """Collective: whether any rank got a stop notice (SIGUSR1/SIGTERM), so that every rank stops together."""
        return bool(self._all_reduce(torch.tensor([1.0 if self.stop.raised else 0.0]), dist.ReduceOp.MAX).item())

    def _all_reduce(self, t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        t = t.to(self.device)
        dist.all_reduce(t, op=op)  # communication + (at .item()/.tolist()) a host sync
        return t

    def train_step(self) -> dict[str, Any]:
        t = self.cfg.train
        self.engine.train()
        sums = torch.zeros(4, dtype=torch.float64)  # loss, lm, aux, z over micro-batches
        layer_acc: dict[int, torch.Tensor] = {}
        nonfinite = False
        inject = t.inject_nonfinite_steps is not None and self.step + 1 in t.inject_nonfinite_steps
        hook = None
        if inject and t.inject_nonfinite_into == "grad":  # one parameter's gradient, the loss stays finite
            hook = self.model.norm.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses (dense parameters)
        micro = self.batches.next()
        for x, y in micro:
            out = self._forward(x, y)
            loss = out.loss * float("nan") if inject and hook is None else out.loss
            # Backward even when non-finite: ZeRO sees a non-finite gradient norm, skips the
            # optimizer step and clears the gradients (DeepSpeed's overflow path), and every rank
            # still enters the same collectives. So the loss is read only afterwards (on a GPU a read
            # before the backward would make the host wait for the forward before queueing it).
            self.engine.backward(loss)
            with torch.profiler.record_function("ep_train.optimizer_step"):  # read by bench/step_breakdown.py
                self.engine.step()  # DeepSpeed counts micro-steps: only the last one of the batch updates
            values = torch.stack([loss, out.lm_loss, out.aux_loss, out.z_loss]).detach().double().cpu()  # host sync
            nonfinite |= not bool(torch.isfinite(values[0]))
            sums += values
            layers = sorted(out.router_stats)
            if layers:  # every MoE layer's statistics in one device-to-host copy (a host sync each on a GPU)
                rows = torch.stack([torch.cat([st.tokens_per_expert.float(),
                                               torch.stack([st.dropped, st.assignments, st.entropy]).detach().float()])
                                    for st in (out.router_stats[i] for i in layers)]).cpu()
                for j, i in enumerate(layers):
                    layer_acc[i] = layer_acc.get(i, 0) + rows[j]
        if hook is not None:
            hook.remove()
        self.step += 1
        # The count must agree on every rank (one rank's NaN poisons the shared gradient norm anyway).
        nonfinite = bool(self._all_reduce(torch.tensor([float(nonfinite)]), dist.ReduceOp.MAX).item())
        applied = self.engine.was_step_applied()
        if nonfinite and applied:
            raise RuntimeError("a non-finite loss reached an optimizer step that DeepSpeed applied; "
                               "this ZeRO configuration does not skip non-finite gradients")
        # A finite loss with a non-finite gradient norm: DeepSpeed skipped the update; count it the same.
        nonfinite = nonfinite or not applied
        if nonfinite:
            self.skipped += 1
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0
            self._update_expert_bias(layer_acc)
        sums /= len(micro)
        return {"sums": sums, "layers": layer_acc, "nonfinite": nonfinite, "lr": lr}

    def _biased_layers(self) -> dict[int, Any]:
        """MoE layer index -> router, for routers with an aux-loss-free expert bias."""
        return {i: b.ffn.router for i, b in enumerate(self.model.layers)
                if b.is_moe and b.ffn.router.expert_bias is not None}

    def _update_expert_bias(self, layer_acc: dict[int, torch.Tensor]) -> None:
        """After an applied optimizer step: every rank moves its biases by the counts of the whole step
        (all micro-batches, all ranks), so the biases stay identical everywhere. Skipped steps move nothing."""
        layers = self._biased_layers()
        if not layers:
            return
        e = self.cfg.moe.num_experts
        counts = self._all_reduce(torch.stack([layer_acc[i][:e] for i in sorted(layers)])).cpu()  # communication
        update_expert_biases(self.model, {i: counts[j] for j, i in enumerate(sorted(layers))})

    def profiled_step(self) -> dict[str, Any]:
        """One training step under torch.profiler: a Chrome trace (open in Perfetto or chrome://tracing)
        and a table of operators by self time, per rank, in run_dir/profile/."""
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        # The profiler's records are Python objects; enough of them start a full pass of Python's cyclic
        # garbage collector inside the step (0.2-0.25 s at 583M, on one rank, and the others then wait for it at
        # the next collective), which steady-state steps do not have (none in steps 4-10 of a 583M run). So the
        # collector runs just before the profiled step, on every rank, and pauses during it.
        was_enabled = gc.isenabled()
        started = time.monotonic()
        gc.collect()
        collected = time.monotonic()
        gc.disable()
        try:
            with profile(activities=acts, record_shapes=False) as prof:
                res = self.train_step()
                if cuda:
                    torch.cuda.synchronize()
        finally:
            if was_enabled:
                gc.enable()
        exporting = time.monotonic()
        out = self.run_dir / "profile"
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"rank{self.rank}_step{self.step}"
        prof.export_chrome_trace(f"{stem}.json")
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        Path(f"{stem}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=25,
                                                                 max_name_column_width=60))
        if self.rank == 0:
            print(f"profiled step {self.step}: {stem}.txt and {stem}.json", flush=True)
        # the collection before the step and the export after it (seconds: a trace of every op) are not training:
        # left out of tokens/s like evaluation and saves (the step itself still runs under the profiler)
        untimed = torch.tensor([(collected - started) + (time.monotonic() - exporting)], dtype=torch.float64)
        # the slowest rank's: the others wait for it at the next step's first collective
        res["untimed_s"] = self._all_reduce(untimed, dist.ReduceOp.MAX).item()
        return res

    def _gather_metrics(self, res: dict[str, Any]) -> tuple[dict[str, float], dict[int, list[int]], dict[int, dict]]:
        sums = self._all_reduce(res["sums"].clone()).cpu() / self.world
        counts, stats = {}, {}
        for i in sorted(res["layers"]):
            row = self._all_reduce(res["layers"][i].clone()).cpu()
            e = self.model.moe_cfg.num_experts
            counts[i] = [int(v) for v in row[:e].tolist()]
            dropped, assigned, entropy = row[e:].tolist()
            micro_batches = self.world * self.batches.grad_accum_steps  # entropy is a per-micro-batch mean
            stats[i] = {"dropped_frac": dropped / max(assigned, 1), "entropy": entropy / micro_batches}
        for i, ratio in self._ep_rank_imbalance(res["layers"]).items():
            stats[i]["ep_rank_max_over_mean"] = ratio
        vals = dict(zip(("loss", "lm_loss", "aux_loss", "z_loss"), sums.tolist()))
        return vals, counts, stats

    def _ep_rank_imbalance(self, layers: dict[int, torch.Tensor]) -> dict[int, float]:
        """Per MoE layer: within each EP group, the rows of the rank whose experts got the most this step over
        the group's mean rank (what that group's all-to-alls wait for), averaged over the EP groups. From the
        world's summed counts instead, two groups unbalanced in opposite directions read as balanced.
        Collective (two small all-reduces)."""
        ep, e = self.cfg.parallel.ep_size, self.model.moe_cfg.num_experts
        order = sorted(layers)
        if ep == 1 or not order:
            return {}
        # this rank's tokens' rows per expert [L, E], summed over its micro-batches, then over its EP group
        rows = torch.stack([layers[i][:e] for i in order]).to(self.device, torch.float64)
        dist.all_reduce(rows, group=self.ep_group)  # communication: the group's rows per expert
        per_rank = rows.view(len(order), ep, e // ep).sum(2)  # [L, ep] rows each EP rank's experts received
        mean = per_rank.mean(1)
        ratio = torch.where(mean > 0, per_rank.max(1).values / mean.clamp_min(1e-12), torch.zeros_like(mean))
        ratio = self._all_reduce(ratio).cpu() / self.world  # each group counted by its ep ranks: the groups' mean
        return dict(zip(order, ratio.tolist()))

    def _rss_peaks_mb(self) -> list[float]:
        """Peak resident memory of every rank so far (MiB, index = rank): host RAM is where offloaded states live."""
        import resource

        mine = torch.zeros(self.world, dtype=torch.float64)
        mine[self.rank] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # ru_maxrss is KiB
        return self._all_reduce(mine).tolist()  # communication + host sync; one slot per rank, the others zero

    def _max_rss_mb(self) -> float:
        """Peak resident memory of the largest rank (MiB)."""
        return max(self._rss_peaks_mb())

    def evaluate(self) -> dict[str, float] | None:
        """Validation loss per source with a ``val`` split (names as in the logs); None if none has one."""
        out: dict[str, float] = {}
        for src in self.sources:
            loss = self._evaluate_folder(src.path)
            if loss is not None:
                out[src.label] = loss
        return out or None

    def _val_windows(self, data_dir: str) -> TokenWindows | None:
        """The held-out windows of a source, None without a split or with fewer than one micro-batch per rank."""
        if not has_split(data_dir, "val"):  # no held-out text here; a damaged one was refused at start
            return None
        val = TokenWindows(data_dir, "val", self.cfg.data.seq_len)
        return val if val.num_windows >= self.cfg.train.micro_batch_size * self.world else None

    def _evaluate_folder(self, data_dir: str) -> float | None:
        val = self._val_windows(data_dir)
        if val is None:
            return None
        t = self.cfg.train
        per_round = t.micro_batch_size * self.world
        n = eval_windows(t.eval_batches, t.batch_size, val.num_windows, per_round)
        # one micro-batch per rank at a time (the first n windows in all): never the whole evaluation in memory
        loader = DistributedBatches(val, per_round, t.micro_batch_size, self.rank, self.world, seed=0, shuffle=False)
        self.engine.eval()
        # [summed token losses, counted targets]: the mean over every counted target of the held-out windows,
        # so a micro-batch with fewer counted targets (EOS masking) weighs less and one with none not at all
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for x, y in (mb for _ in range(n // per_round) for mb in loader.next()):
                counted = int((self._loss_targets(x, y) != -100).sum())
                total += torch.tensor([self._forward(x, y).lm_loss.item() * counted, counted], dtype=torch.float64)
        loss, counted = self._all_reduce(total).cpu().tolist()
        return loss / counted if counted else None

    def _log_data_position(self, before: int) -> None:
        """A line when a source starts another pass over its data (reshuffled): the run repeats it."""
        if self.rank != 0:
            return
        old, new = self.blend.epochs(before), self.blend.epochs(self.batches.consumed_samples)
        for src, windows, e0, e1 in zip(self.sources, self.blend.windows, old, new):
            if e1 > e0 and e1 > 1:
                print(f"data: source {src.label!r} wrapped around at step {self.step}: pass {e1} over its "
                      f"{windows.num_windows:,} windows begins (reshuffled)", flush=True)

    # ---- loop ----------------------------------------------------------------------------------
    def fit(self) -> int:
        t = self.cfg.train
        self.maybe_resume()
        if self.rank == 0:  # after resume: the recorded config is what runs (changes were applied above)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(config_to_dict(self.cfg), indent=2))
            print("config (command line > file > defaults):\n" + json.dumps(config_to_dict(self.cfg), indent=1),
                  flush=True)
        if self.rank == 0:
            print(f"training: world {self.world}, ep_size {self.cfg.parallel.ep_size}, ZeRO-"
                  f"{self.ds_config['zero_optimization']['stage']}, micro {t.micro_batch_size} x accumulation "
                  f"{self.batches.grad_accum_steps} x ranks {self.world} = global batch {t.batch_size}", flush=True)
            # only with evaluation on: its validation shards were verified at start (not opened otherwise)
            unevaluated = [src.path for src in self.sources if self._val_windows(src.path) is None] \
                if t.eval_interval > 0 else []
            if unevaluated:  # said now, not discovered at the end as a missing val_loss
                every = len(unevaluated) == len(self.sources)
                print(f"WARNING: train.eval_interval = {t.eval_interval} but "
                      f"{'no data source has' if every else 'these data sources have no'} validation split of at "
                      f"least one micro-batch per rank ({t.micro_batch_size} x {self.world} windows of data.seq_len "
                      f"{self.cfg.data.seq_len}): {', '.join(unevaluated)}; no val_loss for "
                      f"{'the run' if every else 'them'}. Build the data with --val-fraction > 0 (data_prep_tool) "
                      "or set train.eval_interval 0", flush=True)
            if t.eval_interval > 0:
                per_round = t.micro_batch_size * self.world
                sizes = {src.label: eval_windows(t.eval_batches, t.batch_size, val.num_windows, per_round)
                         for src in self.sources if (val := self._val_windows(src.path)) is not None}
                if sizes:
                    print(f"evaluation every {t.eval_interval} steps: the first "
                          + ", ".join(f"{n:,} windows of {label!r}" for label, n in sizes.items())
                          + f" (train.eval_batches {t.eval_batches} x batch_size {t.batch_size}, or what the split "
                          "holds)", flush=True)
            if len(self.sources) > 1:  # what the weights mean for this run, before it starts
                planned = self.blend.samples_per_source(t.max_steps * t.batch_size)
                shares = [share for _, share in mixture_key(self.sources)]
                for src, share, w, n in zip(self.sources, shares, self.blend.windows, planned):
                    print(f"data: source {src.label!r} ({src.path}): weight {share:.3f}, "
                          f"{w.num_windows:,} windows; {t.max_steps} steps read {n:,} samples = "
                          f"{n / max(w.num_windows, 1):.2f} passes (each pass reshuffled)", flush=True)
        self.metrics.log_memory(self.step, "setup", self._rss_peaks_mb())  # collective; set-up ends here
        tokens_per_step = t.batch_size * self.cfg.data.seq_len
        last_log, t_log = self.step, time.monotonic()
        while self.step < t.max_steps:
            before = self.batches.consumed_samples
            res = self.profiled_step() if self.step + 1 == t.profile_step else self.train_step()
            t_log += res.get("untimed_s", 0.0)
            self._log_data_position(before)
            if self.consecutive_skips >= t.max_consecutive_skips:
                path = self.save()  # weights are those of the last good step: skipped steps change nothing
                raise NonFiniteLossError(
                    f"{self.consecutive_skips} consecutive steps had a non-finite loss (step {self.step}); stopping. "
                    f"Last good state saved in {path}. Lower train.learning_rate, check the data, or raise "
                    "train.max_consecutive_skips")
            if self.step % t.log_interval == 0 or self.step == t.max_steps:
                vals, counts, stats = self._gather_metrics(res)
                elapsed = time.monotonic() - t_log
                norm = self.engine.get_global_grad_norm()  # None where DeepSpeed computes none (logged as such)
                rec = {"step": self.step, "tokens": self.step * tokens_per_step, **vals,
                       "lr": res["lr"], "grad_norm": float(norm) if norm is not None else None,
                       "tokens_per_sec": (self.step - last_log) * tokens_per_step / max(elapsed, 1e-9),
                       "skipped_steps": self.skipped, "nonfinite": res["nonfinite"],
                       "max_rss_mb": self._max_rss_mb()}
                if len(self.sources) > 1:
                    seen = self.blend.samples_per_source(self.batches.consumed_samples)
                    rec["tokens_by_source"] = {src.label: n * self.cfg.data.seq_len for src, n in zip(self.sources, seen)}
                self.metrics.log(rec, counts, stats, per_expert=t.log_expert_stats)
                last_log, t_log = self.step, time.monotonic()
            if t.eval_interval and self.step % t.eval_interval == 0:
                paused = time.monotonic()
                val = self.evaluate()
                if val is not None:
                    self.metrics.log_eval(self.step, self.step * tokens_per_step, val,
                                          {src.label: src.weight for src in self.sources})
                t_log += time.monotonic() - paused  # tokens/s is training's rate: evaluation left out
            if self.step >= t.max_steps:  # at the last step a stop notice changes nothing: saved below, exit 0
                continue
            stop, saved = self._stop_requested(), None
            if not stop and t.save_interval and self.step % t.save_interval == 0:
                paused = time.monotonic()
                saved = self.save()
                t_log += time.monotonic() - paused  # so are checkpoint saves (minutes with offload at scale)
                stop = self._stop_requested()  # a notice during the save: stop on the checkpoint just written
            if stop:
                path = saved if saved is not None else self.save()
                if self.rank == 0:  # launchers (launch/slurm/train.sbatch) requeue when they find this file
                    (self.run_dir / STOP_MARKER).write_text(json.dumps({"step": self.step, "checkpoint": str(path)}))
                    print(f"stopped on signal at step {self.step}; exit code {STOP_EXIT_CODE}", flush=True)
                self.metrics.close()
                return STOP_EXIT_CODE
        if self.saved_step != self.step and t.save_at_end:  # saved_step == step: resumed at max_steps (on disk)
            self.save()
        self.metrics.log_memory(self.step, "final", self._rss_peaks_mb())  # the whole run, the last save included
        self.metrics.close()
        return 0


def main(argv: list[str] | None = None) -> int:
    keep_running_on_broken_pipe()  # a closed `| head` on the console must not end a training run
    stop = StopFlag()  # first: a preemption notice during set-up is not lost
    # A file-size limit (ulimit -f) would kill the process mid-save; ignored, the write fails with EFBIG
    # and the checkpoint code reports it like a full disk, keeping the previous checkpoint.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    args, overrides = _parse(list(sys.argv[1:] if argv is None else argv))
    cfg = load_config(args.config, overrides)
    validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))  # before any process group exists
    require_data(cfg)
    run_dir = Path(args.run_dir)
    if os.environ.get("RANK", "0") == "0":
        # A stop marker from an earlier attempt must not outlive it: whatever happens from here on (a
        # failed resume included), only a new, successful stop writes one (sbatch requeues on it).
        (run_dir / STOP_MARKER).unlink(missing_ok=True)
    trainer = Trainer(cfg, run_dir, stop)
    rc = trainer.fit()
    # Every rank got here (fit ends with a collective save): an orderly teardown, so that no gloo/NCCL
    # worker thread is still running while the interpreter exits (a rank once aborted with "terminate
    # called without an active exception" after its final save). Not on errors: a peer may be gone.
    dist.barrier()
    dist.destroy_process_group()
    return rc
