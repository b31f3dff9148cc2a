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
    # a Stage-2 cell's chain trains its stage 1 where the Stage-1 cell of its method, dataset and seed does
    by_row = {s.row: s for s in specs}
    stage2 = [s for s in specs if s.stage == "2"]
    assert len(stage2) == 20
    for s in stage2:
        twin = by_row[s.row.replace("(Stage-2)", "(Stage-1)")]
        assert s.extra["stage1_dir"] == twin.extra.get("trained", {}).get("dir", twin.run_dir), s.row
    assert len({s.extra["stage1_dir"] for s in stage2}) == 10
    # a --rows run shares as the whole table does: the same folder and per-epoch split for a subset of its
    # columns (else the resume guard refuses one run's checkpoint in the other), the same Stage-1 model
    picked = ["TRIS (Stage-1) | refcoco_testA", "TRIS (Stage-1) | refcoco_testB", "EHIN (Stage-2) | refcoco+_val"]
    some = {s.row: s for s in build_specs(load_sweep("table2"), "smoke", 1, tmp_path, picked)}
    assert list(some) == picked
    assert some[picked[0]].extra["trained"] == some[picked[1]].extra["trained"] == refcoco[0].extra["trained"]
    assert some[picked[2]].extra == by_row[picked[2]].extra


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


def test_stage2_split_cells_share_the_two_stage_chain_on_the_stage1_cells_model(tmp_path):
    rows = "TRIS (Stage-1) | refcoco_val,TRIS (Stage-2) | refcoco_val,TRIS (Stage-2) | refcoco_testB"
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
    # stage 1 was trained once, where the Stage-1 cell trains (the folder its refcoco columns share, as in the
    # whole table), and the chain built on that model
    stage1 = recs["TRIS (Stage-1) | refcoco_val"]
    assert not (shared / "stage1").exists() and stage1["trained_in"] != str(shared)
    assert len((Path(stage1["trained_in"]) / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((shared / "two_stage.json").read_text())["stage1_metrics"] == stage1["metrics"]
    assert val["stage1_metrics"] == stage1["metrics"]  # the record says so
    assert test_b["stage1_metrics"] == evaluate_checkpoint(cfg_b, Path(stage1["trained_in"]) / "checkpoints" / "last.pt",
                                                           stage=1)


def test_a_chain_handed_over_without_its_stage1_checkpoint_trains_stage2_on_its_labels(tmp_path, capsys):
    """bench.run --hand-over: one machine trains the Stage-1 cells and makes the chain's labels, another, which
    holds their store and the handed-over files but no checkpoint, trains stage 2 on exactly those labels; its
    records name the stage-1 weights the Stage-1 records evaluated and give those records' figures."""
    import shutil

    s1_rows = "TRIS (Stage-1) | refcoco_val,TRIS (Stage-1) | refcoco_testB"
    s2_rows = "TRIS (Stage-2) | refcoco_val,TRIS (Stage-2) | refcoco_testB"
    a, b, handed = tmp_path / "a", tmp_path / "b", tmp_path / "handed"
    common = ["--profile", "smoke", "--reports", str(tmp_path / "rep"), "--executor", "inline",
              "--set", "stage2.epochs=1"]
    for s in TINY:
        common += ["--set", s]
    # before stage 1 is trained there is nothing to hand over
    assert run_main(["table2", "--rows", s2_rows, "--results", str(a), "--hand-over", str(handed), *common]) == 3
    assert run_main(["table2", "--rows", s1_rows, "--results", str(a), *common]) == 0
    assert run_main(["table2", "--rows", s2_rows, "--results", str(a), "--hand-over", str(handed), *common]) == 0
    stage1 = {r["row"]: r for r in ResultStore(a).read()}
    assert set(stage1) == set(s1_rows.split(","))  # the labels were made, nothing was stored
    # stage 1's result, the labels and their timings, each whole (no temporary left), and no checkpoint
    assert sorted(f.name for f in handed.rglob("*") if f.is_file()) == ["result.json", "train.npz", "train.timings.json"]
    # while the chain's Stage-2 cell runs (its lock held here), the labels it made are handed over as they are,
    # and nothing while they are not made
    from filelock import FileLock

    timings = next(a.rglob("train.timings.json"))
    with FileLock(str(timings.parent.parent) + ".lock"):
        assert run_main(["table2", "--rows", s2_rows, "--results", str(a), "--hand-over", str(tmp_path / "h2"), *common]) == 0
        assert {f.relative_to(tmp_path / "h2"): f.read_bytes() for f in (tmp_path / "h2").rglob("*") if f.is_file()} == \
            {f.relative_to(handed): f.read_bytes() for f in handed.rglob("*") if f.is_file()}
        timings.rename(timings.with_suffix(".aside"))
        assert run_main(["table2", "--rows", s2_rows, "--results", str(a), "--hand-over", str(tmp_path / "h3"), *common]) == 3
        assert "has not made the labels: not handed over" in capsys.readouterr().out
        assert not (tmp_path / "h3").exists()
        timings.with_suffix(".aside").rename(timings)
    # the other machine: the store (records, scores per expression) and the handed-over files
    b.mkdir()
    shutil.copyfile(a / "store.jsonl", b / "store.jsonl")
    shutil.copytree(a / "per_expression", b / "per_expression")
    shutil.copytree(handed, b, dirs_exist_ok=True)
    capsys.readouterr()
    assert run_main(["table2", "--rows", s2_rows, "--results", str(b), "--dry-run", *common]) == 0
    assert capsys.readouterr().out.count("[todo, its chain's labels made]") == 2
    assert run_main(["table2", "--rows", s2_rows, "--results", str(b), *common]) == 0
    recs = {r["row"]: r for r in ResultStore(b).read()}
    val, test_b = recs["TRIS (Stage-2) | refcoco_val"], recs["TRIS (Stage-2) | refcoco_testB"]
    s1_val, s1_b = stage1["TRIS (Stage-1) | refcoco_val"], stage1["TRIS (Stage-1) | refcoco_testB"]
    assert val["labels_handed_over"] and test_b["labels_handed_over"]
    assert val["stage1_weights"] == test_b["stage1_weights"] == s1_val["stage1_weights"] == s1_b["stage1_weights"]
    assert val["stage1_metrics"] == s1_val["metrics"] and test_b["stage1_metrics"] == s1_b["metrics"]
    assert not list(b.rglob("*_stage1/*/checkpoints"))  # stage 1 was not trained again
    chain = Path(val["trained_in"])
    made = Path(str(chain).replace(str(b), str(a))) / "pseudo" / "train.npz"
    assert (chain / "pseudo" / "train.npz").read_bytes() == made.read_bytes()  # nor were the labels made again
    assert len((chain / "stage2" / "metrics.jsonl").read_text().splitlines()) == 1
    # a Stage-1 cell of that model run there would train over it: refused, in one line
    assert run_main(["table2", "--rows", "TRIS (Stage-1) | refcoco_testA", "--results", str(b), *common]) == 1
    error = next(b.rglob("error.txt")).read_text()
    assert "without its checkpoint (handed over" in error and not list(b.rglob("*_stage1/*/checkpoints"))


class _TimedRunner:
    """A picklable runner for dispatch: spec = (name, seconds, folder); writes NAME.start and NAME.end."""

    def __call__(self, spec):
        name, seconds, folder = spec
        Path(folder, f"{name}.start").write_text(repr(__import__("time").time()))
        __import__("time").sleep(seconds)
        Path(folder, f"{name}.end").write_text(repr(__import__("time").time()))
        return {"name": name}

    def label(self, spec):
        return spec[0]

    def error_log(self, spec):
        return None


def test_the_local_executor_holds_an_evaluation_until_its_training_ends_then_runs_it_first(tmp_path):
    """Locally a cell that only evaluates a shared training waits without a slot while the cell that trains
    it runs, and once that cell ends it runs before the cells still queued: on a GPU lent for one sitting
    the trained model is gone with the machine, so the evaluation must not be left for a later sitting."""
    from bench import executors

    # 'lead' trains model m, 'early' and 'late' evaluate it; 'x', 'y', 'z' are cells of their own
    names = [("lead", 3.0), ("early", 0.1), ("x", 0.2), ("y", 6.0), ("z", 0.2), ("late", 0.1)]
    specs = [(n, sec, str(tmp_path)) for n, sec in names]
    role = {"lead": ("m", ()), "early": (None, ("m",)), "late": (None, ("stored already", "m"))}
    out = executors.dispatch(specs, "local", jobs=2, folder=tmp_path / "submitit", poll_s=0.05,
                             runner=_TimedRunner(), shared_training=lambda s: role.get(s[0], (None, ())))
    assert all(o.ok for o in out) and len(out) == 6
    t = {n: (float((tmp_path / f"{n}.start").read_text()), float((tmp_path / f"{n}.end").read_text()))
         for n, _ in names}
    assert t["early"][0] >= t["lead"][1]            # held until its training ended
    assert t["x"][0] < t["lead"][1]                 # its slot went to the next cell meanwhile
    assert t["late"][0] >= t["lead"][1]
    assert t["late"][0] <= t["z"][0]                # then ahead of the cells queued before it


def _stub_chain(cfg, run_dir, **kw):
    """Stands for ehin.two_stage.run_two_stage: writes when it began and ended (the chain's pseudo-labels and
    stage 2), one file per process."""
    import os
    import time

    began = time.time()
    time.sleep(0.5)
    Path(run_dir, f"ran-{os.getpid()}").write_text(f"{began} {time.time()}")
    return {"metrics": {}}


def test_two_attempts_of_one_stage2_chain_take_turns(tmp_path, monkeypatch):
    """A chain's pseudo-labels and stage 2 live in its run folder: two attempts of one Stage-2 cell (a rerun
    while a SLURM array still runs it) must not regenerate and delete them under each other."""
    import multiprocessing

    import ehin.two_stage
    from bench.jobs import run_cell

    (spec,) = build_specs(load_sweep("table2"), "smoke", 1, tmp_path, ["EHIN (Stage-2) | referit_test"])
    assert spec.stage == "2" and "trained" not in spec.extra  # one split: the chain runs in its own folder
    monkeypatch.setattr(ehin.two_stage, "run_two_stage", _stub_chain)
    ctx = multiprocessing.get_context("fork")  # the stub goes with the forked children
    procs = [ctx.Process(target=run_cell, args=(spec,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    spans = sorted(tuple(map(float, f.read_text().split())) for f in Path(spec.run_dir).glob("ran-*"))
    assert len(spans) == 2 and spans[0][1] <= spans[1][0]  # one after the other
