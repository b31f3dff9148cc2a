"""Stage-2 training on pseudo-labels (paper §3.5, METHOD §7).

    python -m ehin.train_stage2 --pseudo runs/s1/pseudo/train.npz --profile smoke --out runs/s2
    python -m ehin.train_stage2 --pseudo P --config my.yaml --set stage2.ema=mse --out runs/s2 --resume
    torchrun --nproc_per_node 4 -m ehin.train_stage2 --pseudo P --profile paper --out runs/s2   # DDP

Writes into --out (rank 0 only): config.yaml, metrics.jsonl (one line per epoch: losses, val metrics on the
epochs evaluated (eval.every, as stage 1), lr), tb/ (the same as TensorBoard curves), checkpoints/last.pt
(every epoch, atomically; {"kind": "stage2", "config", "model", ...}), result.json. Adam (CLIP at
lr × stage2.backbone_lr_mult), polynomial decay stepped every iteration, BCE + Dice on every head (ignore
pixels excluded), optional EMA teacher with MSE/KL consistency on the finest head. Evaluation:
ehin.evaluate.evaluate with stage=2 (foreground = logit > 0) on the student network.

Under torchrun (WORLD_SIZE > 1; or a SLURM job, bench.launch_ddp --stage 2) the process group is
initialised from the environment (NCCL on GPUs, gloo on CPU); stage2.batch_size is the global batch,
split evenly over the ranks; a DistributedSampler shards each epoch's permutation. Rank 0 evaluates
and writes; the others wait.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ehin.checkpoint import load as load_checkpoint
from ehin.checkpoint import save_atomic
from ehin.cli import command, command_parser, UserError
from ehin.config import add_run_args, config_for_run, config_hash
from ehin.distributed import barrier, data_parallel, dist_env, mean_over_ranks, resolve_device, start_run
from ehin.metrics import format_metrics, format_result
from ehin.training_log import TrainingLog, run_summary


# ---- data ---------------------------------------------------------------------------------------------

class PseudoLabelDataset(Dataset):
    """One item per ref that has a pseudo-label: image [3,S,S] in [0,1], tokens [20] (one of the ref's
    sentences, drawn from (seed, epoch, ref) alone), label uint8 [S,S] (0 bg, 1 fg, 255 ignore), ref_id.
    The ground-truth masks are never read."""

    def __init__(self, refer, split: str, tokenize, image_size: int, labels, seed: int):
        from ehin.data.datasets import CACHE_BYTES

        self.refer, self.tokenize, self.image_size, self.labels, self.seed = refer, tokenize, int(image_size), labels, seed
        if labels.image_size != self.image_size:
            raise UserError(f"{labels.path}: pseudo-labels are {labels.image_size} px, the images {self.image_size}")
        refs = refer.refs(split)
        self.items = [r for r in refs if int(r["ref_id"]) in labels]
        if not self.items:
            raise UserError(f"{labels.path} holds no label for any ref of split '{split}' of {refer!r}")
        self.missing = len(refs) - len(self.items)
        self.epoch = 0
        n_bytes = 3 * len({r["image_id"] for r in self.items}) * self.image_size**2
        self._images: dict[int, np.ndarray] | None = {} if n_bytes <= CACHE_BYTES else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def _image(self, image_id: int) -> np.ndarray:
        from ehin.data.datasets import resize_image_uint8

        if self._images is not None and image_id in self._images:
            return self._images[image_id]
        img = resize_image_uint8(self.refer.load_image(image_id), self.image_size)
        if self._images is not None:
            self._images[image_id] = img
        return img

    def __getitem__(self, index: int) -> dict:
        from ehin.data.datasets import to_tensor01

        ref = self.items[index]
        sents = [self.refer.sentence(s) for s in ref["sentences"]]
        rng = np.random.default_rng([self.seed, self.epoch, int(ref["ref_id"])])
        sentence = sents[rng.integers(len(sents))]
        return {
            "image": to_tensor01(self._image(ref["image_id"])),
            "tokens": self.tokenize([sentence]).long()[0],
            "label": torch.from_numpy(self.labels.label(ref["ref_id"])),
            "ref_id": int(ref["ref_id"]),
        }


def collate(batch: list[dict]) -> dict:
    out = {k: torch.stack([b[k] for b in batch]) for k in ("image", "tokens", "label")}
    out["ref_id"] = torch.tensor([b["ref_id"] for b in batch])
    return out


def check_pseudo_labels(labels, refer, cfg: dict) -> None:
    """Refuse pseudo-labels made for another dataset, split or image size than the config trains on."""
    from ehin.pseudo_labels.pipeline import split_digest

    d, meta = cfg["data"], labels.meta
    if meta.get("dataset") != d["dataset"] or meta.get("split") != d["train_split"]:
        raise UserError(f"{labels.path} holds pseudo-labels of {meta.get('dataset')} / {meta.get('split')}, "
                        f"but the config trains on {d['dataset']} / {d['train_split']}")
    if meta.get("split_digest") != split_digest(refer, d["train_split"]):
        raise UserError(f"{labels.path} was made from another version of {d['dataset']} {d['train_split']} "
                        f"(its refs, images or sentences differ: another synthetic.* size or seed?); "
                        f"regenerate the pseudo-labels with this config's stage 1")
    if labels.image_size != d["image_size"]:
        raise UserError(f"{labels.path}: pseudo-labels are {labels.image_size} px but data.image_size is "
                        f"{d['image_size']}; regenerate them at the stage-2 image size")


def poly_lambda(total_iters: int, power: float) -> Callable[[int], float]:
    return lambda it: max(0.0, 1.0 - it / max(1, total_iters)) ** power


def build_optimizer(model, cfg: dict, device: torch.device | None = None) -> torch.optim.Optimizer:
    from ehin.train_stage1 import fused_kernel

    s = cfg["stage2"]
    groups = [{"params": list(model.backbone_parameters()), "lr": s["lr"] * s["backbone_lr_mult"]},
              {"params": list(model.head_parameters()), "lr": s["lr"]}]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=s["lr"], **fused_kernel(cfg, device))


# ---- training -----------------------------------------------------------------------------------------

def run(cfg: dict, out_dir: str | Path, pseudo: str | Path, *, resume: bool = True, progress: bool = True,
        on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train stage 2 on the pseudo-label file `pseudo`; returns {metrics, history, timings, device}
    (on every rank; only rank 0's metrics are real, the others get {})."""
    from ehin.data.datasets import EvalDataset
    from ehin.evaluate import evaluate, model_map_fn
    from ehin.pseudo_labels.pipeline import load_pseudo_labels
    from ehin.stage2.losses import EMATeacher, Stage2Loss, consistency
    from ehin.stage2.model import build_stage2
    from ehin.train_stage1 import PER_EXPRESSION, compile_for_training, evaluates, prepare_once, seed_everything

    out_dir = Path(out_dir)
    s2, t, d = cfg["stage2"], cfg["train"], cfg["data"]
    rank, world, device, main_rank = start_run(cfg, out_dir, resolve_device(cfg))
    progress = progress and main_rank
    t_start = time.time()

    refer = prepare_once(cfg, main_rank, world)
    labels = load_pseudo_labels(pseudo)
    check_pseudo_labels(labels, refer, cfg)
    meta = labels.meta

    seed_everything(t["seed"])
    model = build_stage2(cfg).to(device)
    # train.channels_last / fused_adamw / compile: stage 1's speed levers on CUDA, not hashed, here too. Without
    # them stage 2 took 39 s an epoch on an H100 where stage 1 took 19.6 (reports/testbed/README.md, session 45).
    channels_last = bool(t["channels_last"]) and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_ds = PseudoLabelDataset(refer, d["train_split"], model.backbone.tokenize, d["image_size"], labels, t["seed"])
    if s2["batch_size"] % world:
        raise UserError(f"stage2.batch_size {s2['batch_size']} is not divisible by the {world} ranks")
    per_rank = s2["batch_size"] // world
    steps_per_epoch = len(train_ds) // s2["batch_size"]
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_ds)} pseudo-labelled refs, fewer than one batch of {s2['batch_size']}")
    optimizer = build_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(steps_per_epoch * s2["epochs"], s2["poly_power"]))
    teacher = EMATeacher(model, s2["ema_decay"]).to(device) if s2["ema"] else None
    loss_fn = Stage2Loss(s2["dice_weight"])

    ckpt_path = out_dir / "checkpoints" / "last.pt"
    history: list[dict] = []
    start_epoch = 0
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("kind") != "stage2" or ckpt.get("config_hash") != config_hash(cfg):
            raise UserError(f"{ckpt_path} was written by another config; use a new --out or delete it")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if teacher is not None and ckpt.get("ema") is not None:
            teacher.model.load_state_dict(ckpt["ema"])
        torch.set_rng_state(ckpt["torch_rng"])
        history = ckpt["history"]
        start_epoch = ckpt["epoch"] + 1
        if progress:
            print(f"resuming {out_dir} from epoch {start_epoch}")

    log = TrainingLog(out_dir, fresh=start_epoch == 0) if main_rank else None  # metrics.jsonl and tb/
    net = data_parallel(model, device, world)
    compile_mode = t["compile"] if device.type == "cuda" else None
    if compile_mode is not None:
        net = compile_for_training(net, None, compile_mode)  # evaluation runs `model`, eager
    eval_ds = None
    if main_rank:
        eval_ds = EvalDataset(refer, cfg["eval"]["split"], model.backbone.tokenize, d["image_size"],
                              max_items=cfg["eval"]["max_items"])

    amp = bool(t["amp"]) and device.type == "cuda"
    train_s = sum(h.get("train_s", 0.0) for h in history)
    for epoch in range(start_epoch, s2["epochs"]):
        model.train()
        train_ds.set_epoch(epoch)
        if world > 1:
            sampler = torch.utils.data.distributed.DistributedSampler(
                train_ds, num_replicas=world, rank=rank, shuffle=True, seed=t["seed"], drop_last=True)
            sampler.set_epoch(epoch)
            loader = DataLoader(train_ds, batch_size=per_rank, sampler=sampler, drop_last=True, collate_fn=collate,
                                num_workers=d["num_workers"])
        else:
            # shuffle from (seed, epoch) alone: a resumed run sees exactly the batches it would have
            gen = torch.Generator().manual_seed(t["seed"] * 1_000_003 + epoch)
            loader = DataLoader(train_ds, batch_size=per_rank, shuffle=True, drop_last=True, generator=gen,
                                collate_fn=collate, num_workers=d["num_workers"])
        sums: dict[str, torch.Tensor] = {}
        t0 = time.time()
        bar = tqdm(loader, desc=f"stage2 epoch {epoch + 1}/{s2['epochs']}", leave=False, disable=not progress,
                   total=steps_per_epoch)
        for step, batch in enumerate(bar):
            if step >= steps_per_epoch:  # the DistributedSampler may give one batch more than the plan
                break
            images, tokens = batch["image"].to(device), batch["tokens"].to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            target = batch["label"].to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                logits = net(images, tokens)
                total, terms = loss_fn(logits, target)
                if teacher is not None:
                    cons = consistency(logits[0], teacher(images, tokens)[0], s2["ema"])
                    total = total + s2["ema_weight"] * cons
                    terms["consistency"] = cons.detach()
            if not torch.isfinite(total):
                raise RuntimeError(f"non-finite stage-2 loss at epoch {epoch + 1} step {step}: "
                                   f"{ {k: float(v) for k, v in terms.items()} }")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
            if teacher is not None:
                teacher.update(model)
            # summed on the device in float64, read once an epoch, as stage 1's (a read waits for the step)
            for k, v in {"loss": total, **terms}.items():
                v = v.detach().double()
                sums[k] = sums[k] + v if k in sums else v
            if progress and step % max(1, t["log_every"]) == 0:
                bar.set_postfix({k: f"{float(v):.3f}" for k, v in {"loss": total.detach(), **terms}.items()})
        sums = {k: float(v) for k, v in sums.items()}
        epoch_train_s = time.time() - t0
        train_s += epoch_train_s
        sums = mean_over_ranks(sums, world, device)  # log the global batch's losses, not rank 0's share
        entry = {"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()},
                 "train_s": round(epoch_train_s, 2), "lr": optimizer.param_groups[-1]["lr"]}
        if main_rank:
            last = epoch == s2["epochs"] - 1  # its scores per expression, for paired claims (bench.check)
            # eval.every, as stage 1: every that many epochs and after the last (the run's metrics); the weights are
            # the same either way (evaluation draws no randomness). At the gpu profile's 5, 3 of 15 epochs evaluate
            # (each evaluation about an eighth of an epoch's training on an H100, session 45's Stage-2 record).
            if evaluates(epoch, s2["epochs"], cfg):
                t1 = time.time()
                entry.update(evaluate(model_map_fn(model, device, amp, stage=2), eval_ds,
                                      batch_size=cfg["eval"]["batch_size"], stage=2, desc="val", progress=progress,
                                      per_expression=out_dir / PER_EXPRESSION if last else None))
                entry["eval_s"] = round(time.time() - t1, 2)
            history.append(entry)
            log.epoch(entry)
            save_atomic({"kind": "stage2", "config": cfg, "config_hash": config_hash(cfg), "epoch": epoch,
                         "pseudo": str(pseudo), "pseudo_meta": {k: meta.get(k) for k in ("dataset", "split", "quality")},
                         "model": model.state_dict(), "backbone_quick_gelu": model.backbone.quick_gelu,
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "ema": teacher.model.state_dict() if teacher is not None else None,
                         "torch_rng": torch.get_rng_state(), "history": history}, ckpt_path)
            if progress:
                shown = format_metrics(entry, ("iou", "point_mask")) if "iou" in entry else "not evaluated"
                print(f"stage2 epoch {epoch + 1}: loss {entry['loss']:.4f}  {shown}  ({epoch_train_s:.1f}s train)")
            if on_epoch is not None:
                on_epoch(entry)
        else:
            history.append(entry)
        barrier(world)

    if log is not None:
        log.close()
    result = {
        **run_summary(history, train_s, t_start, device),  # other ranks evaluate nothing: no metrics
        "world_size": world,
        "config_hash": config_hash(cfg),
        "pseudo": str(pseudo),
        "pseudo_refs_missing": train_ds.missing,
    }
    if main_rank:
        with open(out_dir / "result.json", "w") as f:
            json.dump(result, f, indent=1)
    return result


def parser() -> argparse.ArgumentParser:
    p = command_parser("python -m ehin.train_stage2", __doc__)
    p.add_argument("--pseudo", required=True, help="pseudo-label file from python -m ehin.pseudo_labels (required)")
    add_run_args(p, "stage2.epochs=5")
    return p


@command
def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    out = Path(args.out)
    cfg = config_for_run(p, args)
    try:
        result = run(cfg, out, args.pseudo, resume=args.resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if dist_env()[0] == 0:
        # the paper's column names (the metric registry); result.json keeps the code's keys for programs
        print(format_result(f"final {cfg['eval']['split']}", result["metrics"]) + f"; {out / 'result.json'}")


if __name__ == "__main__":
    main()
