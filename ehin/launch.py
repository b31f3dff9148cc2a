"""Train stage 1 or 2 in this process, or as one data-parallel job of several processes on this machine.

`bench.run --ranks N` trains each cell's model(s) so (bench.jobs, ehin.two_stage): N processes with
torchrun's environment (ehin.distributed.run_local_ranks), one GPU each or gloo on CPU, each running the
trainer's own command on the config saved in the run folder's ranks/. Stage 1 then computes the single process's
gradient on the same global batch (docs/method.md, D-DDP); stage 2's losses are means over samples, so
plain DDP does. Lives above both trainers and ehin.distributed, which they import.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ehin.cli import UserError
from ehin.config import config_hash, save_config
from ehin.distributed import resolve_device, run_local_ranks


def train_stage(stage: int, cfg: dict, out_dir: str | Path, *, pseudo: str | Path | None = None, ranks: int = 1,
                resume: bool = True, progress: bool = True) -> dict:
    """Train stage 1 or 2 (`pseudo`: its label file) into `out_dir` and return the trainer's result: in
    this process, or as one data-parallel job of `ranks` processes on this machine (bench.run --ranks; one
    GPU each, gloo on CPU), the single process's gradient on the same global batch (D-DDP, and a mean over
    samples in stage 2). The ranks run the trainer's command on the config saved in out_dir/ranks/; rank
    r's output goes to out_dir/ranks/rank{r}.log beside it."""
    out_dir = Path(out_dir)
    if ranks == 1:
        if stage == 1:
            from ehin.train_stage1 import run

            return run(cfg, out_dir, resume=resume, progress=progress)
        from ehin.train_stage2 import run as run_stage2

        return run_stage2(cfg, out_dir, pseudo, resume=resume, progress=progress)
    device = resolve_device(cfg)
    if device.type == "cuda" and torch.cuda.device_count() < ranks:
        raise UserError(f"{ranks} ranks need a GPU each, and this process sees {torch.cuda.device_count()} "
                        "(with SLURM: --slurm-gpus at least the ranks)")
    # The ranks' config beside their logs: the run's own config.yaml is the trainer's to write, after its
    # resume check (a refused resume leaves the run as it was). Their threads: this process's share each.
    threads = int(cfg["train"]["threads"] or 0)
    rank_cfg = {**cfg, "train": {**cfg["train"], "threads": max(1, threads // ranks) if threads else 0}}
    (out_dir / "ranks").mkdir(parents=True, exist_ok=True)
    save_config(rank_cfg, out_dir / "ranks" / "config.yaml")
    if not resume:  # as the trainer in this process: a new run over whatever the folder held
        (out_dir / "checkpoints" / "last.pt").unlink(missing_ok=True)
    result_file = out_dir / "result.json"  # rank 0 writes it when the training ends
    result_file.unlink(missing_ok=True)
    argv = ["-m", f"ehin.train_stage{stage}", "--config", str(out_dir / "ranks" / "config.yaml"), "--out",
            str(out_dir), "--resume", *(["--pseudo", str(pseudo)] if stage == 2 else [])]
    run_local_ranks(argv, ranks, device.type, logs=out_dir / "ranks", what=f"stage-{stage} training in {out_dir}")
    result = json.loads(result_file.read_text())
    want = config_hash(cfg, stage="1") if stage == 1 else config_hash(cfg)
    if result.get("config_hash") != want:  # the ranks trained what this process was asked to
        raise RuntimeError(f"the ranks in {out_dir} trained config {result.get('config_hash')}, not {want}")
    return result
