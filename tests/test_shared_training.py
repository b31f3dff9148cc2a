"""Table 2 trains one model per (method, dataset, split_by, seed) and evaluates it on every split of
its dataset, as the paper does (bench.run.share_trainings, bench.jobs._run_shared)."""
import json
from pathlib import Path

import pytest
import yaml

from bench.jobs import evaluate_checkpoint
from bench.run import build_specs, leaders_first, main as run_main
from bench.store import ResultStore
from bench.sweeps import load_sweep
from tests.test_bench_run import TINY


def test_table2_trains_once_per_method_dataset_and_split_by(tmp_path):
    specs = build_specs(load_sweep("table2"), "smoke", 1, tmp_path)
    assert len(specs) == 40
    trainings = {s.extra["trained"]["dir"] if "trained" in s.extra else s.run_dir for s in specs}
    # 4 methods x (refcoco, refcoco+, refcocog google, refcocog umd, referit): 20 trainings, not 40
    assert len(trainings) == 20
    refcoco = [s for s in specs if s.row.startswith("TRIS (Stage-1) | refcoco_")]
    assert [s.config["eval"]["split"] for s in refcoco] == ["val", "testA", "testB"]
    assert len({json.dumps(s.extra["trained"]) for s in refcoco}) == 1
    assert refcoco[0].extra["trained"]["split"] == "val"
    # a dataset with one split (referit test) trains in its own cell folder as before
    referit = [s for s in specs if s.row == "EHIN (Stage-1) | referit_test"]
    assert "trained" not in referit[0].extra
    # the cells that only evaluate a shared model queue after every cell that trains one
    queue = leaders_first(specs)
    waits = [s.extra.get("trained", {}).get("split", s.config["eval"]["split"]) != s.config["eval"]["split"] for s in queue]
    assert waits == sorted(waits) and sum(waits) == 20
    # other tables are untouched: one split each
    assert not any("trained" in s.extra for s in build_specs(load_sweep("table5"), "smoke", 1, tmp_path))


def test_split_cells_share_one_training_and_evaluate_their_own_split(tmp_path):
    rows = "TRIS (Stage-1) | refcoco_val,TRIS (Stage-1) | refcoco_testA"
    argv = ["table2", "--profile", "smoke", "--rows", rows, "--results", str(tmp_path / "res"),
            "--reports", str(tmp_path / "rep"), "--executor", "inline"]
    for s in TINY:
        argv += ["--set", s]
    assert run_main(argv) == 0
    recs = {r["row"]: r for r in ResultStore(tmp_path / "res").read()}
    val, test_a = recs["TRIS (Stage-1) | refcoco_val"], recs["TRIS (Stage-1) | refcoco_testA"]
    assert val["trained_in"] == test_a["trained_in"] and val["history_split"] == test_a["history_split"] == "val"
    shared = Path(val["trained_in"])
    assert len((shared / "metrics.jsonl").read_text().splitlines()) == 1  # one epoch, trained once
    assert val["metrics"] != test_a["metrics"]  # each cell evaluated its own split (mean IoU of other expressions)
    # testA's figures are the shared model's on testA; val's are the training's own last epoch
    specs = {s.row: s for s in build_specs(load_sweep("table2"), "smoke", 1, tmp_path / "res",
                                           rows.split(","), {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in TINY)})}
    ckpt = shared / "checkpoints" / "last.pt"
    assert evaluate_checkpoint(specs["TRIS (Stage-1) | refcoco_testA"].config, ckpt, stage=1) == test_a["metrics"]
    assert evaluate_checkpoint(specs["TRIS (Stage-1) | refcoco_val"].config, ckpt, stage=1) == val["metrics"]
    # each cell's scores per expression are kept beside the store, and they are the cell's own split's
    from ehin.evaluate import read_per_expression

    for rec in (val, test_a):
        z = read_per_expression(tmp_path / "res" / rec["per_expression"])
        assert len(z["point_mask"]) == rec["metrics"]["n"]
        assert 100 * z["point_mask"].mean() == pytest.approx(rec["metrics"]["point_mask"])
    # and each record names its inputs by content (ehin.provenance): the same checkpoint and dataset
    assert val["inputs"] == test_a["inputs"] and "error" not in val["inputs"]
    assert len(val["inputs"]["dataset"]["sha256"]) == 64


def test_stage2_split_cells_share_the_two_stage_chain(tmp_path):
    rows = "TRIS (Stage-2) | refcoco_val,TRIS (Stage-2) | refcoco_testB"
    argv = ["table2", "--profile", "smoke", "--rows", rows, "--results", str(tmp_path / "res"),
            "--reports", str(tmp_path / "rep"), "--executor", "inline", "--set", "stage2.epochs=1"]
    for s in TINY:
        argv += ["--set", s]
    assert run_main(argv) == 0
    recs = {r["row"]: r for r in ResultStore(tmp_path / "res").read()}
    val, test_b = recs["TRIS (Stage-2) | refcoco_val"], recs["TRIS (Stage-2) | refcoco_testB"]
    shared = Path(val["trained_in"])
    assert test_b["trained_in"] == str(shared)
    assert len((shared / "stage2" / "metrics.jsonl").read_text().splitlines()) == 1  # stage 2 trained once
    specs = {s.row: s for s in build_specs(load_sweep("table2"), "smoke", 1, tmp_path / "res", rows.split(","),
                                           {"stage2.epochs": 1, **{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in TINY)}})}
    cfg_b = specs["TRIS (Stage-2) | refcoco_testB"].config
    assert evaluate_checkpoint(cfg_b, shared / "stage2" / "checkpoints" / "last.pt", stage=2) == test_b["metrics"]
    assert evaluate_checkpoint(specs["TRIS (Stage-2) | refcoco_val"].config,
                               shared / "stage2" / "checkpoints" / "last.pt", stage=2) == val["metrics"]
