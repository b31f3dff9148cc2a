"""Stage-1 training of EHIN (paper §3.1-3.4, METHOD §3-4).

    python -m ehin.train_stage1 --profile smoke --out runs/smoke-ehin
    python -m ehin.train_stage1 --config my.yaml --set model.n_layers=3 --set train.epochs=5 --out runs/x
    python -m ehin.train_stage1 --out runs/x --resume        # continue from runs/x/checkpoints/last.pt
    torchrun --nproc_per_node 4 -m ehin.train_stage1 --profile paper --out runs/x   # DDP

Writes into --out: config.yaml (the resolved config), metrics.jsonl (one line per epoch: losses, val
metrics, learning rates), tb/ (the same as TensorBoard curves: `tensorboard --logdir OUT/tb`),
checkpoints/last.pt (every epoch, atomically), result.json (final metrics).
AdamW with the backbone at lr x backbone_lr_mult, polynomial decay stepped every iteration (TRIS).
A NaN or infinite loss stops the run naming the step and the term; the last good checkpoint stays.
Ctrl-C prints the command that resumes the run and exits 130. SIGTERM (a time limit, a preemption,
`scancel`) lets the step finish and writes checkpoints/last.pt mid-epoch; then the command exits 143
(in a submitit job training goes on until SLURM ends it). A resumed run trains exactly the remaining
steps (one process; under DDP SIGTERM acts as it always did).

Under torchrun (WORLD_SIZE > 1; or a SLURM job, bench.launch_ddp) the process group is initialised
from the environment (NCCL on GPUs, gloo on CPU) and the model is wrapped in DistributedDataParallel.
train.batch_size is the global batch: each step's batch is the single-process one, split evenly over
the ranks, and each rank fuses its images with every rank's texts, so a step computes the gradient of
the single-process loss (docs/method.md, D-DDP; ehin.distributed). BatchNorm (RN trunks) becomes
SyncBatchNorm on GPUs. Rank 0 alone evaluates and writes; the others wait at barriers.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler
from tqdm import tqdm

from ehin.checkpoint import load as load_checkpoint
from ehin.checkpoint import save_atomic
from ehin.checkpoint import weights_digest
from ehin.cli import command, command_parser, UserError
from ehin.config import add_run_args, clip_spec, config_for_run, config_hash
from ehin.distributed import (RankBatches, all_gather_list, all_gather_with_grad, all_ranks, barrier, resolve_device,
                              data_parallel, dist_env, mean_over_ranks, start_run, sync_batchnorm)
from ehin.metrics import COLLAPSED_PCT, format_metrics, format_result
from ehin.training_log import TrainingLog, run_summary


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the run stops and keeps its last good checkpoint."""


class StoppedBySignal(BaseException):
    """SIGTERM arrived during training in a process that SIGTERM ends; checkpoints/last.pt holds the
    run up to the step (or the evaluation) it fell in, so a resumed run trains exactly the rest. A
    request to stop, as KeyboardInterrupt is: `except Exception` lets it through."""


class _Sigterm:
    """SIGTERM during training (a device call's time limit, a preemption, `scancel`, `scontrol requeue`):
    the handler only marks it; at the next step boundary the trainer writes a checkpoint of the run so
    far and then does what the process did on SIGTERM before (`pass_on`). The default ends the process:
    StoppedBySignal. A handler set from Python is called and training goes on: submitit's job logs the
    signal, and SLURM ends and requeues the job when it means to, which then resumes from that step.
    One process only: DDP ranks would have to agree on the step, so under torchrun SIGTERM acts as before."""

    def __init__(self, enabled: bool) -> None:
        self.pending = False
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.previous = signal.getsignal(signal.SIGTERM) if self.enabled else None

    def __enter__(self) -> "_Sigterm":
        if self.enabled:
            signal.signal(signal.SIGTERM, self._mark)
        return self

    def _mark(self, signum, frame) -> None:
        self.pending = True

    def pass_on(self, what: str) -> None:
        """After the checkpoint is written: the caller's own response to SIGTERM."""
        self.pending = False
        if self.previous in (None, signal.SIG_DFL):
            raise StoppedBySignal(what)
        if callable(self.previous):
            self.previous(signal.SIGTERM, None)

    def __exit__(self, exc_type, *exc) -> None:
        if not self.enabled:
            return
        # None: a handler not set from Python, which cannot be put back; the default then
        signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)
        if self.pending and exc_type is None:
            # SIGTERM during the last epoch's evaluation: the run finished, so the request goes on to
            # the caller's handler (the default ends the process) rather than being lost.
            signal.raise_signal(signal.SIGTERM)


def _ignore_sigterm(worker_id: int) -> None:
    # Loader workers share the trainer's process group, which `timeout` and `scancel` signal as a
    # whole: they keep loading so that the trainer can finish its step and write the checkpoint.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


PER_EXPRESSION = "per_expression.npz"  # the final evaluation's scores per expression, in the run folder
# Written in the run folder once this process has taken a training step: by then torch.compile has compiled
# the step (forward and backward) into inductor's on-disk cache, which cells of the same graph started after
# it read instead of compiling again (bench.executors holds them back until it exists).
FIRST_STEP = "first_step.done"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(cfg: dict):
    """Build the shared prerequisites once (generated dataset, pretrained small CLIP); cached on disk."""
    from ehin.data import prepare_dataset
    from ehin.pretrain_clip import ensure_pretrained, synthetic_overrides

    refer = prepare_dataset(cfg)
    for role in ("backbone", "scorer"):
        arch, source, size = clip_spec(cfg, role)
        overrides = synthetic_overrides(source)
        if overrides is not None:
            ensure_pretrained(arch, size, **overrides)
    return refer


def prepare_once(cfg: dict, main_rank: bool, world: int):
    """`prepare` under DDP: the main rank generates the dataset and pretrains the small CLIP, then the
    other ranks (after the barrier) only read them from the cache."""
    if main_rank:
        refer = prepare(cfg)
    barrier(world)
    if not main_rank:
        refer = prepare(cfg)
    return refer


def build_scorer(cfg: dict):
    """The frozen CLIP of L_CL/L_BG (METHOD §2); None when neither term is on."""
    from ehin.model.scorer import build_frozen_scorer, uses_scorer

    return build_frozen_scorer(cfg) if uses_scorer(cfg) else None


def compile_for_training(net: torch.nn.Module, scorer: torch.nn.Module | None, mode: str) -> Callable:
    """train.compile: `net`'s forward compiled with torch.compile's `mode`, and the frozen scorer's image
    tower too (it runs on 2N masked images with input gradients every step); the loss's text cache stays
    eager. The step is launch-bound without it: reports/perf/profile_bf16_compiletrain has ~29 ms of
    kernels in a ~86 ms step at the paper size; "reduce-overhead" replays the compiled regions as CUDA
    graphs (reports/perf/h200_bf16_cl_fused_compiletrain_ro.json). Each call of the returned forward
    starts a step, so a graph may overwrite the previous step's outputs."""
    if scorer is not None:
        scorer.clip.encode_image = torch.compile(scorer.clip.encode_image, mode=mode)
    compiled = torch.compile(net, mode=mode)

    def forward(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()  # a no-op for modes without CUDA graphs
        return compiled(*args, **kwargs)

    return forward


def poly_lambda(total_iters: int, power: float):
    return lambda it: max(0.0, 1.0 - it / max(1, total_iters)) ** power


def evaluates(epoch: int, epochs: int, cfg: dict) -> bool:
    """Does a training of `epochs` evaluate after 0-based `epoch`? Every eval.every epochs and after the last (the
    run's metrics), in both stages."""
    return epoch == epochs - 1 or (epoch + 1) % cfg["eval"]["every"] == 0


def fused_kernel(cfg: dict, device: torch.device | None) -> dict:
    """train.fused_adamw as optimizer keywords: the fused kernel on CUDA (a speed lever, not hashed), for
    stage 1's AdamW and stage 2's Adam."""
    fused = bool(cfg["train"].get("fused_adamw")) and device is not None and device.type == "cuda"
    return {"fused": True} if fused else {}


def build_optimizer(model, cfg: dict, device: torch.device | None = None) -> torch.optim.Optimizer:
    t = cfg["train"]
    groups = [
        {"params": [p for p in model.backbone_parameters() if p.requires_grad], "lr": t["lr"] * t["backbone_lr_mult"]},
        {"params": [p for p in model.head_parameters() if p.requires_grad], "lr": t["lr"]},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t["lr"], weight_decay=t["weight_decay"],
                             **fused_kernel(cfg, device))


def _learning_rates(scheduler) -> dict[str, float]:
    """The learning rate each parameter group ended the epoch at (backbone first, then the heads)."""
    lrs = scheduler.get_last_lr()
    names = ["lr_backbone", "lr_head"] if len(lrs) == 2 else [f"lr_{i}" for i in range(len(lrs))]
    return dict(zip(names, (float(x) for x in lrs)))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class _SkipBatches:
    """A batch sampler without its first `skip` batches (their indices are drawn, their items never loaded)."""

    def __init__(self, batches, skip: int) -> None:
        self.batches, self.skip = batches, skip

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.skip)


def train_loader(ds: Dataset, batch_size: int, gen: torch.Generator, collate_fn: Callable, num_workers: int,
                 rank: int = 0, world: int = 1, skip: int = 0) -> DataLoader:
    """The epoch's batches, shuffled by `gen` alone (as DataLoader's shuffle=True draws them), less the
    first `skip` (a run resumed mid-epoch). Under DDP rank r gets the r-th slice of each single-process
    batch (the same generator draws the same permutation), so the ranks together train on exactly the
    batches one process would."""
    batches = BatchSampler(RandomSampler(ds, generator=gen), batch_size, drop_last=True)
    if world > 1:
        batches = RankBatches(batches, rank, world)
    return DataLoader(ds, batch_sampler=_SkipBatches(batches, skip) if skip else batches, generator=gen,
                      collate_fn=collate_fn, num_workers=num_workers,
                      worker_init_fn=_ignore_sigterm if num_workers else None)


def forward_loss(net: Callable, loss_fn: Callable, batch: dict, world: int = 1) -> tuple[torch.Tensor, dict]:
    """The step's loss (total, terms). Under DDP (docs/method.md, D-DDP) `batch` is this rank's share of
    the global batch: its images are fused with the texts of every rank (gathered with their gradient)
    and the loss is the mean over this rank's rows, so DDP's gradient average is the gradient of the
    global batch's loss."""
    if world == 1:
        return loss_fn(net(batch["image"], batch["tokens"]), batch)
    batch = {**batch, "text_offset": dist.get_rank() * len(batch["sentence"]),
             "text_sentences": all_gather_list(batch["sentence"])}
    return loss_fn(net(batch["image"], batch["tokens"], gather_texts=all_gather_with_grad), batch)


def run(cfg: dict, out_dir: str | Path, *, resume: bool = True, progress: bool = True,
        on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train stage 1 with `cfg` into `out_dir`; returns {metrics, history, timings, device, world_size}
    (on every rank; under DDP only rank 0's metrics are real, the others get {}).

    `on_epoch(entry)` sees each epoch's losses and val metrics after its checkpoint is written (on
    rank 0); Optuna's pruning raises from it (bench.search).
    """
    from ehin.data.datasets import EvalDataset, TrainDataset, train_collate
    from ehin.evaluate import evaluate, model_map_fn
    from ehin.losses import Stage1Loss
    from ehin.model import build_model

    out_dir = Path(out_dir)
    ckpt_path = out_dir / "checkpoints" / "last.pt"
    # Refuse a checkpoint of another config before writing anything: a refused --resume must leave
    # the run (its config.yaml above all) as it was, so that a plain --resume still continues it.
    ckpt = load_checkpoint(ckpt_path) if resume and ckpt_path.exists() else None
    if ckpt is not None:
        check_resumable(ckpt, cfg, ckpt_path)
    t, d = cfg["train"], cfg["data"]
    rank, world, device, main_rank = start_run(cfg, out_dir, resolve_device(cfg))
    progress = progress and main_rank
    t_start = time.time()

    refer = prepare_once(cfg, main_rank, world)
    seed_everything(t["seed"])
    model = sync_batchnorm(build_model(cfg), device, world).to(device)
    scorer = build_scorer(cfg)
    if scorer is not None:
        scorer = scorer.to(device)
    loss_fn = Stage1Loss.from_config(cfg, scorer)
    train_ds = TrainDataset(refer, d["train_split"], model.backbone.tokenize, d["image_size"], d["K"], t["seed"])
    eval_ds = select_ds = None
    if main_rank:
        eval_ds = EvalDataset(refer, cfg["eval"]["split"], model.backbone.tokenize, d["image_size"],
                              max_items=cfg["eval"]["max_items"])
        if cfg["eval"]["select_split"]:
            select_ds = EvalDataset(refer, cfg["eval"]["select_split"], model.backbone.tokenize, d["image_size"],
                                    max_items=cfg["eval"]["max_items"])

    if t["batch_size"] % world:
        raise UserError(f"train.batch_size {t['batch_size']} is not divisible by the {world} ranks")
    steps_per_epoch = len(train_ds) // t["batch_size"]
    if steps_per_epoch == 0:
        raise UserError(f"train split has {len(train_ds)} refs, fewer than one batch of {t['batch_size']}; "
                        "lower train.batch_size")
    # train.channels_last / train.fused_adamw: speed levers on CUDA (bench.perf measures them), not hashed
    channels_last = bool(t["channels_last"]) and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(steps_per_epoch * t["epochs"], t["poly_power"]))

    history: list[dict] = []
    start_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        if scorer is not None and "scorer_cache" in ckpt:
            scorer.load_cache_state(ckpt["scorer_cache"])
        history = ckpt["history"]
        start_epoch = ckpt["epoch"] + 1
        if progress:
            at = f", {ckpt['partial']['step']} steps into epoch {start_epoch + 1}" if "partial" in ckpt else ""
            print(f"resuming {out_dir} after epoch {start_epoch}{at}")
    partial = ckpt.get("partial") if ckpt is not None else None  # an epoch SIGTERM stopped (StoppedBySignal)

    amp = bool(t["amp"]) and device.type == "cuda"
    train_s = sum(h.get("train_s", 0.0) for h in history)
    log = TrainingLog(out_dir, fresh=ckpt is None) if main_rank else None
    # The CLIP parameters that EHIN does not use (ViT `proj`, the RN attention pooling, CLIP's own
    # logit scale) get no gradient: DDP must be told, and leaves their .grad None as a single process does.
    net = data_parallel(model, device, world, find_unused=True)
    compile_mode = t["compile"] if device.type == "cuda" else None  # a CUDA lever, as channels_last
    if compile_mode is not None:
        net = compile_for_training(net, scorer, compile_mode)

    def save_last(epoch: int, steps_done: dict | None = None) -> None:
        """Everything a resumed run needs (rank 0): `epoch` is the last finished one; `steps_done` the
        steps of the next one done so far (mid-epoch, after SIGTERM)."""
        save_atomic({"kind": "stage1", "config": cfg, "config_hash": config_hash(cfg, stage="1"), "epoch": epoch,
                     "model": model.state_dict(), "backbone_quick_gelu": model.backbone.quick_gelu,
                     "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                     "scorer_cache": scorer.cache_state() if scorer is not None else {},
                     "history": history, **({"partial": steps_done} if steps_done else {})}, ckpt_path)

    def after_epoch_checkpoint(epoch: int) -> None:
        """SIGTERM during the epoch's evaluation: its checkpoint is written (the last epoch finishes
        the run instead, see _Sigterm.__exit__)."""
        if sigterm.pending and epoch < t["epochs"] - 1:
            sigterm.pass_on(f"SIGTERM in epoch {epoch + 1}: {ckpt_path} holds the run up to its end")

    stepped = False  # this process has taken a training step (FIRST_STEP)
    with _Sigterm(world == 1) as sigterm:
        for epoch in range(start_epoch, t["epochs"]):
            model.train()
            train_ds.set_epoch(epoch)
            # Shuffle from (seed, epoch) alone so a resumed run sees exactly the batches it would have.
            gen = torch.Generator().manual_seed(t["seed"] * 1_000_003 + epoch)
            skip = partial["step"] if partial is not None and partial["epoch"] == epoch else 0
            loader = train_loader(train_ds, t["batch_size"], gen, train_collate, d["num_workers"], rank, world, skip)
            sums: dict[str, float | torch.Tensor] = dict(partial["sums"]) if skip else {}
            grad_norm_max = None  # train.grad_clip: the epoch's largest global gradient norm, before clipping
            if skip and "grad_norm_max" in partial:
                grad_norm_max = torch.tensor(partial["grad_norm_max"], dtype=torch.float64, device=device)
            t0 = time.time() - (partial["train_s"] if skip else 0.0)
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{t['epochs']}", leave=False, disable=not progress)
            for step, batch in enumerate(bar, start=skip):
                batch = _to_device(batch, device)
                if channels_last:
                    batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    total, terms = forward_loss(net, loss_fn, batch, world)
                global_step = epoch * steps_per_epoch + step
                _check_finite(total, terms, global_step, epoch, kept=ckpt_path.exists(), world=world)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if t["grad_clip"] is not None:
                    # Off by default, as TRIS and the paper. The global norm before clipping (the same on every
                    # DDP rank: grads are averaged by now) is logged, so a run shows where its updates spiked.
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"]).detach().double()
                    terms = {**terms, "grad_norm": norm}
                    grad_norm_max = norm if grad_norm_max is None else torch.maximum(grad_norm_max, norm)
                optimizer.step()
                scheduler.step()
                if not stepped:
                    stepped = True
                    if main_rank:
                        (out_dir / FIRST_STEP).touch()
                # Summed on the device in float64 (the same sums as adding Python floats), read once an epoch:
                # a read per step waits for the backward pass, which a GPU shared by several runs makes slow.
                for k, v in {"loss": total, **terms}.items():
                    v = v.detach().double() if torch.is_tensor(v) else float(v)
                    sums[k] = sums[k] + v if k in sums else v
                if sigterm.pending:
                    save_last(epoch - 1, {"epoch": epoch, "step": step + 1, "train_s": time.time() - t0,
                                          "sums": {k: float(v) for k, v in sums.items()},
                                          **({"grad_norm_max": float(grad_norm_max)} if grad_norm_max is not None else {})})
                    sigterm.pass_on(f"SIGTERM at epoch {epoch + 1}, step {step + 1} of {steps_per_epoch}: "
                                    f"{ckpt_path} holds the run up to that step")
                if progress and step % max(1, t["log_every"]) == 0:  # a read waits for the device: only when shown
                    bar.set_postfix({k: f"{float(v.detach() if torch.is_tensor(v) else v):.3f}"
                                     for k, v in {"loss": total, **terms}.items()})
            sums = {k: float(v) for k, v in sums.items()}
            epoch_train_s = time.time() - t0
            train_s += epoch_train_s
            sums = mean_over_ranks(sums, world, device)  # log the global batch's losses, not rank 0's share
            n = max(1, steps_per_epoch)
            entry = {"epoch": epoch + 1, **{k: v / n for k, v in sums.items()}, "train_s": round(epoch_train_s, 2),
                     **_learning_rates(scheduler)}
            if grad_norm_max is not None:
                entry["grad_norm_max"] = float(grad_norm_max)
            if not main_rank:
                history.append(entry)
                barrier(world)  # rank 0 evaluates and writes the checkpoint
                continue
            last = epoch == t["epochs"] - 1
            if not evaluates(epoch, t["epochs"], cfg):
                # eval.every > 1: a learning curve with fewer points for less time (on the gpu profile
                # evaluating the full val split took a quarter of a cell); losses and checkpoint as always.
                history.append(entry)
                log.epoch(entry)
                save_last(epoch)
                if progress:
                    print(f"epoch {epoch + 1}: loss {entry['loss']:.4f}  ({epoch_train_s:.1f}s train, not evaluated)")
                after_epoch_checkpoint(epoch)
                barrier(world)
                continue
            t1 = time.time()
            empty = [0, 0]  # maps without a positive pixel, maps
            # the last epoch's scores per expression, for claims paired over expressions (bench.check)
            entry.update(evaluate(_count_empty(model_map_fn(model, device, amp), empty), eval_ds,
                                  batch_size=cfg["eval"]["batch_size"], desc="val", progress=progress,
                                  per_expression=out_dir / PER_EXPRESSION if last else None))
            entry["empty_maps"] = round(100 * empty[0] / max(1, empty[1]), 2)
            if entry["empty_maps"] >= COLLAPSED_PCT:
                print(f"warning: epoch {epoch + 1}: {entry['empty_maps']:.0f}% of the val expressions get an empty map "
                      f"(no pixel > 0): the model has collapsed and its PointM/IoU mean nothing; a smaller "
                      f"train.lr (now {t['lr']:g}) usually avoids it", file=sys.stderr)
            if select_ds is not None:
                sel = evaluate(model_map_fn(model, device, amp), select_ds, batch_size=cfg["eval"]["batch_size"],
                               progress=False)
                entry.update({f"select_{k}": v for k, v in sel.items()})
            entry["eval_s"] = round(time.time() - t1, 2)
            history.append(entry)
            log.epoch(entry)
            save_last(epoch)
            if select_ds is not None and entry["select_point_mask"] >= max(h["select_point_mask"] for h in history):
                save_atomic({"kind": "stage1", "config": cfg, "epoch": epoch, "model": model.state_dict(),
                             "backbone_quick_gelu": model.backbone.quick_gelu},
                            out_dir / "checkpoints" / "best.pt")
            if progress:
                print(f"epoch {epoch + 1}: loss {entry['loss']:.4f}  "
                      f"{format_metrics(entry, ('point_mask', 'iou'))}  ({epoch_train_s:.1f}s train)")
            if on_epoch is not None:
                on_epoch(entry)
            after_epoch_checkpoint(epoch)
            barrier(world)
    if log is not None:
        log.close()

    # weights_digest: the trained model's identity, which its pseudo-labels name too (ehin.two_stage checks the two
    # agree when a chain's labels come without the checkpoint)
    result = {**run_summary(history, train_s, t_start, device), "world_size": world,
              "config_hash": config_hash(cfg, stage="1"), "weights_digest": weights_digest(model)}
    if main_rank:
        with open(out_dir / "result.json", "w") as f:
            json.dump(result, f, indent=1)
    return result


def check_resumable(ckpt: dict, cfg: dict, path: Path) -> None:
    """Raise UserError unless `ckpt` was written by a stage-1 run of `cfg` (same config_hash(stage="1"))."""
    # Checkpoints written before the stage-1 hash existed hold the full config_hash; accept it too.
    if ckpt.get("kind") == "stage1" and ckpt.get("config_hash") in (config_hash(cfg, stage="1"), config_hash(cfg)):
        return
    out = path.parent.parent
    raise UserError(f"{path} was written by another config; to continue that run pass --resume alone "
                    f"(it reuses {out / 'config.yaml'}), or choose a new --out")


def _count_empty(map_fn: Callable, counts: list[int]) -> Callable:
    """`map_fn`, counting into `counts` [empty, total] the maps that have no pixel > 0."""

    def fn(batch: dict) -> list:
        maps = map_fn(batch)
        counts[0] += sum(not bool((np.asarray(m) > 0).any()) for m in maps)
        counts[1] += len(maps)
        return maps

    return fn


def _check_finite(total: torch.Tensor, terms: dict, step: int, epoch: int, kept: bool, world: int = 1) -> None:
    finite = bool(torch.isfinite(total).item())
    # Under DDP every rank stops at the same step: one that went on would wait forever in backward.
    if all_ranks(finite, world, total.device):
        return
    tail = ("the last good checkpoint is kept" if kept else
            "no checkpoint was written (none exists before the first epoch ends)")
    if finite:
        raise NonFiniteLossError(f"non-finite loss on another rank at step {step} (epoch {epoch + 1}); {tail}")
    terms = {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in terms.items()}
    bad = [k for k, v in terms.items() if not math.isfinite(v)] or ["total"]
    raise NonFiniteLossError(
        f"non-finite loss at step {step} (epoch {epoch + 1}): term(s) {', '.join(bad)} = "
        f"{', '.join(str(terms.get(k, float(total.detach()))) for k in bad)}; {tail}"
    )


def parser() -> argparse.ArgumentParser:
    p = command_parser("python -m ehin.train_stage1", __doc__)
    add_run_args(p, "model.alpha=0.2")
    return p


@command(also=(NonFiniteLossError,))
def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    out = Path(args.out)
    cfg = config_for_run(p, args)
    main_rank = dist_env()[0] == 0
    if args.resume and not (out / "checkpoints" / "last.pt").exists() and main_rank:
        print(f"{out} holds no checkpoint (checkpoints/last.pt): --resume starts from scratch")
    try:
        result = run(cfg, out, resume=args.resume)
    except KeyboardInterrupt:
        # The run folder's config.yaml is written first, so --resume alone picks the run up again.
        print(f"\ninterrupted; continue with: python -m ehin.train_stage1 --out {shlex.quote(str(out))} --resume",
              file=sys.stderr)
        raise SystemExit(130) from None
    except StoppedBySignal as e:
        print(f"\nstopped: {e}; continue with: python -m ehin.train_stage1 --out {shlex.quote(str(out))} --resume",
              file=sys.stderr)
        raise SystemExit(143) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if main_rank:
        # the paper's column names (the metric registry); result.json keeps the code's keys for programs
        print(format_result(f"final {cfg['eval']['split']}", result["metrics"]) + f"; {out / 'result.json'}")


if __name__ == "__main__":
    main()
