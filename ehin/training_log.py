"""Training curves of a run: metrics.jsonl (one JSON line per epoch) and TensorBoard event files.

Every training command writes both (stage 1, stage 2, small-CLIP pretraining): the JSON lines are what
the harness reads back, the event files are what a person opens:

    tensorboard --logdir RUN/tb          # or a folder of runs: --logdir results/synthetic/runs

Scalars are grouped by kind: `loss/<term>` (the total and each loss term, mean over the epoch),
`val/<paper column>` (the metric registry's labels: PointM, IoU, ...), `lr/<group>` and `time/<what>`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

LOSS_KEYS = ("loss", "fg", "cl", "bg", "bce", "dice", "consistency")  # stage 1 and stage 2 terms
METRICS = "metrics.jsonl"  # one JSON line per epoch, in the run folder


def _tag(key: str) -> str | None:
    from ehin.metrics import BY_KEY

    if key in LOSS_KEYS or key.startswith("loss_"):
        return f"loss/{key}"
    if key in BY_KEY:
        return f"val/{BY_KEY[key].column}"
    if key.startswith("select_") and key[len("select_"):] in BY_KEY:
        return f"select/{BY_KEY[key[len('select_'):]].column}"
    if key.startswith("lr"):
        return f"lr/{key}"
    if key.endswith("_s"):
        return f"time/{key}"
    if key in ("empty_maps",):
        return f"val/{key}"
    return None


def run_summary(history: list[dict], train_s: float, t_start: float, device) -> dict[str, Any]:
    """What a training command returns and writes to result.json: the last epoch's metrics (the
    metric registry's keys and n), the history, timings and the device."""
    import time

    import torch

    from ehin.metrics import METRIC_KEYS

    final = history[-1] if history else {}
    return {
        "metrics": {k: final[k] for k in (*METRIC_KEYS, "n") if k in final},
        "history": history,
        "timings": {"train_s": round(train_s, 2), "total_s": round(time.time() - t_start, 2),
                    "s_per_epoch": round(train_s / max(1, len(history)), 2)},
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
    }


def logged_epochs(out_dir: str | Path) -> int:
    """The epochs a run folder's metrics.jsonl holds, each once: a run killed between an epoch's line
    and its checkpoint logs that epoch again when it resumes (TrainingLog appends unless fresh)."""
    log = Path(out_dir) / METRICS
    if not log.is_file():
        return 0
    return len({json.loads(line).get("epoch") for line in log.read_text().splitlines() if line.strip()})


class TrainingLog:
    """`log = TrainingLog(out_dir, fresh=...)`, then `log.epoch(entry)` per epoch and `log.close()`."""

    def __init__(self, out_dir: str | Path, *, fresh: bool, jsonl: bool = True, tb: str = "tb") -> None:
        """Event files under out_dir/tb (out_dir itself with tb=""); metrics.jsonl unless jsonl=False."""
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out_dir / METRICS if jsonl else None
        if fresh and self.jsonl is not None and self.jsonl.exists():
            self.jsonl.unlink()  # a fresh run does not append to an old run's lines
        self.writer = SummaryWriter(str(self.out_dir / tb))

    def scalars(self, values: dict[str, Any], step: int) -> None:
        for key, value in values.items():
            tag = _tag(key) if "/" not in key else key
            if tag is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(float(value)):
                self.writer.add_scalar(tag, float(value), step)

    def epoch(self, entry: dict[str, Any]) -> None:
        """One epoch's line: appended to metrics.jsonl and written as scalars at step = epoch."""
        if self.jsonl is not None:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(entry) + "\n")
        self.scalars(entry, int(entry["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
