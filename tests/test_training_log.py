"""Training curves: metrics.jsonl and TensorBoard event files (ehin/training_log.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ehin.training_log import TrainingLog


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under log_dir: tag -> [(step, value)], read with TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_epochs_reach_both_files_with_paper_names(tmp_path):
    log = TrainingLog(tmp_path, fresh=True)
    log.epoch({"epoch": 1, "loss": 2.5, "fg": 0.4, "point_mask": 31.0, "box_acc": 12.5, "lr_head": 1e-3,
               "train_s": 3.0, "n": 120, "note": "text is not a scalar", "empty_maps": 0.0})
    log.epoch({"epoch": 2, "loss": 2.0, "fg": 0.3, "point_mask": 35.0, "box_acc": 15.0, "lr_head": 5e-4,
               "train_s": 3.1, "n": 120, "note": "x", "empty_maps": 0.0})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2] and lines[1]["note"] == "x"
    tb = read_scalars(tmp_path / "tb")
    assert tb["val/PointM"] == [(1, 31.0), (2, 35.0)] and tb["val/BoxAcc"] == [(1, 12.5), (2, 15.0)]
    assert tb["loss/loss"] == [(1, 2.5), (2, 2.0)] and tb["loss/fg"][1] == (2, pytest.approx(0.3))
    assert tb["lr/lr_head"][0] == (1, pytest.approx(1e-3)) and tb["time/train_s"][0][1] == pytest.approx(3.0)
    assert not any("note" in t or t.endswith("/n") for t in tb)  # strings and counts are not curves


def test_stage2_terms_are_loss_curves(tmp_path):
    log = TrainingLog(tmp_path, fresh=True)
    log.epoch({"epoch": 1, "loss": 1.0, "bce": 0.6, "dice": 0.4, "consistency": 0.1, "lr": 1e-3, "iou": 20.0})
    log.close()
    tb = read_scalars(tmp_path / "tb")
    assert {"loss/bce", "loss/dice", "loss/consistency", "lr/lr", "val/IoU"} <= set(tb)


def test_a_fresh_run_starts_a_new_metrics_file_and_a_resumed_one_appends(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    TrainingLog(tmp_path, fresh=False).close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    TrainingLog(tmp_path, fresh=True).close()
    assert not (tmp_path / "metrics.jsonl").exists()
