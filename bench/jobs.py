"""One cell of a sweep as a submitit job (dinov2/MAE launcher style).

`CellRunner` is the callable every executor runs: inline, local processes or SLURM array tasks.
Heavy imports stay inside `__call__` so the driver and submitit's pickling stay light. The job
writes its own record into the store when it finishes, so a result survives the driver dying.
When SLURM preempts or times a job out, submitit calls `checkpoint`, which requeues the same
cell; the trainer then resumes from the run folder's last epoch checkpoint.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import submitit


@dataclass(frozen=True)
class CellSpec:
    """Everything a job needs, picklable and small."""

    table: str
    row: str
    seed: int
    profile: str
    stage: str                      # "1", "2" or "inference"
    overrides: dict[str, Any]       # flat dotted keys, applied on top of the profile
    config_hash: str
    run_dir: str
    store_root: str
    cell_id: str
    extra: dict[str, Any] = field(default_factory=dict)


def run_cell(spec: CellSpec) -> dict:
    """Train/evaluate one cell in this process and return its metrics dict (no store write)."""
    from ehin.config import load_config, save_config

    cfg = load_config(profile=spec.profile, overrides=_nested(spec.overrides))
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")  # the resolved config beside its results
    if spec.stage == "1":
        from ehin.train_stage1 import run

        return run(cfg, run_dir, resume=True)
    if spec.stage == "2":
        from ehin.two_stage import run_two_stage

        return run_two_stage(cfg, run_dir, resume=True)
    if spec.stage == "inference":
        from bench.perf import inference_time_cell

        return inference_time_cell(cfg, run_dir, **spec.extra)
    raise ValueError(f"unknown stage {spec.stage!r} for cell {spec.cell_id}")


class CellRunner(submitit.helpers.Checkpointable):
    """`runner(spec)` runs a cell and appends its record; used with `map_array` on SLURM."""

    def __call__(self, spec: CellSpec) -> dict:
        from bench.store import ResultStore, code_version, host_info
        from ehin.metrics import PROTOCOL

        start = time.time()
        # error.txt marks the last attempt as failed (bench.run renders the cell "failed"): a new attempt clears it.
        (Path(spec.run_dir) / "error.txt").unlink(missing_ok=True)
        try:
            result = run_cell(spec)
        except Exception:
            Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(spec.run_dir) / "error.txt").write_text(traceback.format_exc())
            raise
        record = {
            **{k: v for k, v in asdict(spec).items() if k not in ("store_root", "extra")},
            "metrics": result.get("metrics", {}),
            "history": result.get("history", []),
            "timings": {**result.get("timings", {}), "cell_s": round(time.time() - start, 2)},
            "code_version": code_version(),
            "metrics_protocol": PROTOCOL,  # how the metrics were computed (ehin.metrics)
            **host_info(),
            "device": result.get("device", "cpu"),
        }
        ResultStore(spec.store_root).append(record)
        return record

    def checkpoint(self, spec: CellSpec) -> submitit.helpers.DelayedSubmission:
        # Requeue the same cell; the trainer resumes from <run_dir>/checkpoints/last.pt.
        return submitit.helpers.DelayedSubmission(CellRunner(), spec)


def _nested(flat: dict[str, Any]) -> dict:
    from ehin.config import dotted_to_nested

    return dotted_to_nested(flat)
