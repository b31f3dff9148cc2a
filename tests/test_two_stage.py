"""The whole chain (Table 2's stage-2 cells): stage 1 -> pseudo-labels -> stage 2, on synth-refcoco+
at smoke size, in one call of `run_two_stage`; then a second call resumes without redoing work."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ehin.config import load_config

OVERRIDES = [
    "train.epochs=2", "stage2.epochs=2", "stage2.lr=1.0e-3", "stage2.backbone_lr_mult=0.1", "stage2.hidden_dim=64",
    "pseudo.irnet_epochs=1", "pseudo.chunk_size=128", "eval.max_items=120",
    "synthetic.images=60", "model.hidden_dim=32",  # a test-sized chain; the profile sizes are for results
    "train.threads=1",  # 2 OpenMP threads on 2 shared cores was measured ~30x slower per step
]


@pytest.mark.slow
def test_two_stage_chain_on_smoke(tmp_path):
    from ehin.two_stage import run_two_stage
    from ehin.pseudo_labels.pipeline import load_pseudo_labels

    cfg = load_config(profile="smoke", overrides=OVERRIDES)
    res = run_two_stage(cfg, tmp_path / "run", progress=False)

    keys = {"iou", "overall_iou", "point_mask", "point_box", "box_acc"}
    assert keys <= set(res["metrics"]) and keys <= set(res["stage1_metrics"])
    assert res["metrics"]["n"] == 120 and len(res["history"]) == 2
    q = res["pseudo_quality"]
    assert {"maps", "crf", "rw"} <= set(q) and q["final"] == "rw"
    assert q["maps"]["n"] == q["crf"]["n"] == q["rw"]["n"] > 100
    assert {"stage1_s", "pseudo_s", "stage2_s", "total_s"} <= set(res["timings"])
    assert res["device"]

    run = tmp_path / "run"
    labels = load_pseudo_labels(run / "pseudo" / "train.npz")
    assert labels.image_size == cfg["data"]["image_size"] and len(labels) == q["maps"]["n"]
    # stage 1's result names its weights as its labels do (what a chain handed over without the checkpoint checks)
    from ehin.checkpoint import load_stage1, weights_digest

    stage1, _ = load_stage1(run / "stage1" / "checkpoints" / "last.pt")
    digest = json.loads((run / "stage1" / "result.json").read_text())["weights_digest"]
    assert digest == weights_digest(stage1) == res["stage1_weights"] == labels.meta["stage1_weights"]
    # The reported quality of the final (random-walk) labels is what the stored labels score against
    # the train ground truth, recomputed here from the file (IoU per ref, then Σ∩ / Σ∪).
    from ehin.data import prepare_dataset
    from ehin.pseudo_labels.pipeline import overlap

    refer = prepare_dataset(cfg)
    ann_of = {int(r["ref_id"]): r["ann_id"] for r in refer.refs(cfg["data"]["train_split"])}
    counts = np.array([overlap(labels.label(int(r)), refer.ann_mask(ann_of[int(r)])) for r in labels.ref_ids])
    assert q["rw"]["iou"] == pytest.approx(100 * np.mean(counts[:, 0] / np.maximum(counts[:, 1], 1)), abs=1e-3)
    assert q["rw"]["overall_iou"] == pytest.approx(100 * counts[:, 0].sum() / counts[:, 1].sum(), abs=1e-3)
    assert json.loads((run / "two_stage.json").read_text())["metrics"] == res["metrics"]

    # the stage-2 checkpoint serves ehin.predict
    from ehin.predict import Predictor

    pred = Predictor(run / "stage2" / "checkpoints" / "last.pt")
    heat, mask = pred(np.zeros((50, 70, 3), np.uint8), "red circle")
    assert pred.stage == 2 and heat.shape == (50, 70) and mask.dtype == bool

    # everything resumes: nothing is retrained or regenerated, same metrics
    mtime = (run / "pseudo" / "train.npz").stat().st_mtime_ns
    again = run_two_stage(cfg, run, progress=False)
    assert again["metrics"] == res["metrics"] and again["pseudo_quality"] == q
    assert (run / "pseudo" / "train.npz").stat().st_mtime_ns == mtime
    assert again["timings"]["total_s"] < res["timings"]["total_s"]

    # labels made again (here: their file gone; in a sweep: another stage-1 model) restart stage 2, which
    # was trained on the old ones, instead of resuming it
    stage2_ckpt = run / "stage2" / "checkpoints" / "last.pt"
    trained_at = stage2_ckpt.stat().st_mtime_ns
    (run / "pseudo" / "train.npz").unlink()
    third = run_two_stage(cfg, run, progress=False)
    assert stage2_ckpt.stat().st_mtime_ns > trained_at and len(third["history"]) == 2
    assert len((run / "stage2" / "metrics.jsonl").read_text().splitlines()) == 2  # one run's epochs, not three


@pytest.mark.slow
def test_two_stage_chain_with_two_ranks(tmp_path):
    """ranks=2 (bench.run --ranks): each stage trains as one data-parallel job of two processes (gloo on
    CPU), the labels are made in between in this process, and the chain's result says so; a second call
    resumes both trainings as done."""
    from ehin.two_stage import run_two_stage

    cfg = load_config(profile="smoke", overrides=OVERRIDES)
    run = tmp_path / "run"
    res = run_two_stage(cfg, run, progress=False, ranks=2)
    assert res["world_size"] == 2 and res["metrics"]["n"] == 120 and res["stage1_metrics"]["n"] == 120
    for stage in ("stage1", "stage2"):
        assert json.loads((run / stage / "result.json").read_text())["world_size"] == 2
        assert sorted(p.name for p in (run / stage / "ranks").iterdir()) == ["config.yaml", "rank0.log", "rank1.log"]
    assert len(res["history"]) == 2 and res["pseudo_quality"]["maps"]["n"] > 100
    again = run_two_stage(cfg, run, progress=False, ranks=2)
    assert again["metrics"] == res["metrics"] and again["timings"]["total_s"] < res["timings"]["total_s"]
