"""bench.estimate: the paper's tables' time from measured throughput, on hand-worked figures."""
import json
import shutil
from pathlib import Path

import pytest

from bench import estimate as E

ROOT = Path(__file__).resolve().parent.parent


def perf(train=1000.0, infer=500.0, stage2=None) -> dict:
    ehin = {"stage1_train": {"images_per_s": train}, "stage1_infer": {"images_per_s_bs64": infer}}
    if stage2:
        ehin["stage2"] = {"train_images_per_s": stage2}
    return {"size": "paper", "device": "cuda", "levers": {"amp": True}, "environment": {"gpu": "test GPU"},
            "results": {"ehin": ehin}}


def cfg(epochs=2, split="val", select=None, stage2_epochs=3) -> dict:
    return {"train": {"epochs": epochs}, "eval": {"split": split, "select_split": select},
            "stage2": {"epochs": stage2_epochs}}


def test_training_seconds_by_hand():
    s, ok = E.training_seconds(cfg(), "1", perf())
    assert ok and s == pytest.approx(2 * (42_278 / 1000 + 10_758 / 500))
    s, ok = E.training_seconds(cfg(split="testA", select="val"), "1", perf())
    assert s == pytest.approx(2 * (42_278 / 1000 + 2 * 5_726 / 500))  # the selection split evaluated too
    # a two-stage chain: + pseudo-labels (one pass over the train refs) + stage-2 epochs
    s1, _ = E.training_seconds(cfg(), "1", perf())
    s, ok = E.training_seconds(cfg(), "2", perf(stage2=2000.0))
    assert ok and s == pytest.approx(s1 + 42_278 / 500 + 3 * (42_278 / 2000 + 10_758 / 500))
    s, ok = E.training_seconds(cfg(), "2", perf())  # no stage-2 rate: a lower bound, flagged
    assert not ok and s == pytest.approx(s1 + 42_278 / 500)
    thin = cfg(epochs=5)
    thin["eval"]["every"] = 2  # evaluated after epochs 2, 4 and 5
    s, _ = E.training_seconds(thin, "1", perf())
    assert s == pytest.approx(5 * 42_278 / 1000 + 3 * 10_758 / 500)
    # stage 2 evaluates as stage 1 does: its 3 epochs at eval.every 2 after epochs 2 and 3
    s1, _ = E.training_seconds(thin, "1", perf())
    s, _ = E.training_seconds(thin, "2", perf(stage2=2000.0))
    assert s == pytest.approx(s1 + 42_278 / 500 + 3 * 42_278 / 2000 + 2 * 10_758 / 500)


def test_makespan_longest_first():
    assert E.makespan([3, 3, 2, 2, 2], 2) == 7  # longest first: 3+2+2 | 3+2 (the optimum, 6, is not sought)
    assert E.makespan([5, 1, 1], 2) == 5 and E.makespan([1, 2, 3], 1) == 6


def test_table2_counts_its_shared_trainings():
    (row,) = E.estimate(["table2"], perf())
    assert (row["cells"], row["trainings"], row["complete"]) == (40, 20, False)
    (full,) = E.estimate(["table2"], perf(stage2=1000.0))
    assert full["complete"] and full["one_gpu_s"] > row["one_gpu_s"]
    rows = E.estimate(["table5", "table6"], perf())
    # the queue of both runs Table 6's EHIN (Table 5's full loss) once
    assert rows[-1]["table"] == "all" and rows[-1]["trainings"] < rows[0]["trainings"] + rows[1]["trainings"]


def test_the_readme_block_is_current(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    p = json.loads((ROOT / E.DEFAULT_PERF).read_text())
    from bench.run import DEFAULT_SEEDS
    from bench.sweeps import list_sweeps

    block = E.markdown(E.estimate(list_sweeps(), p), p, E.DEFAULT_PERF, "paper", DEFAULT_SEEDS["paper"])
    assert not E.update_readme(readme, block), "README's estimate block is stale: python -m bench.estimate --readme README.md"


def packed_perf(ehin=600.0, tris=1200.0, procs=16) -> dict:
    return {"size": "gpu", "device": "cuda", "procs": procs, "levers": {"channels_last": True},
            "environment": {"gpu": "test GPU", "mps": True},
            "results": {"ehin": {"stage1_train": {"images_per_s": ehin}},
                        "tris": {"stage1_train": {"images_per_s": tris}}}}


@pytest.fixture
def sizes(monkeypatch):
    """Every dataset 1,000 train refs and 300 val expressions (the real ones need the gpu profile's datasets)."""
    monkeypatch.setattr(E, "dataset_sizes", lambda cfg: (1000, {"val": 300, "testA": 200, "testB": 100}))


def test_packed_training_seconds_by_hand(sizes):
    from bench.perf import CONFIGS
    from ehin.config import load_config

    ehin = load_config(profile="gpu")  # 20 epochs, evaluated every 5 on val
    s, ok = E.packed_training_seconds(ehin, "1", packed_perf())
    assert ok and s == pytest.approx((20 * 1000 + 4 * 300) / 600)
    tris = load_config(profile="gpu", overrides=CONFIGS["tris"])
    s, _ = E.packed_training_seconds(tris, "1", packed_perf())
    assert s == pytest.approx((20 * 1000 + 4 * 300) / 1200)  # the TRIS-like architecture at its own rate
    s, ok = E.packed_training_seconds(ehin, "2", packed_perf())
    assert not ok and s == pytest.approx((20 * 1000 + 4 * 300) / 600)  # stage 2 not measured packed


def test_packed_estimate_adds_shares_and_runs_identical_cells_once(sizes):
    (t5,) = E.estimate(["table5"], packed_perf(), profile="gpu")
    assert (t5["cells"], t5["trainings"]) == (35, 35) and t5["complete"]
    assert t5["one_gpu_s"] == pytest.approx(35 * (20 * 1000 + 4 * 300) / 600)
    (t10,) = E.estimate(["table10"], packed_perf(), profile="gpu")
    assert t10["trainings"] == 0 and t10["one_gpu_s"] == 0
    rows = E.estimate(["table5", "table6"], packed_perf(), profile="gpu")
    assert rows[-1]["trainings"] < rows[0]["trainings"] + rows[1]["trainings"]
    (t8,) = E.estimate(["table8"], packed_perf(), profile="gpu")  # N=24 and K=6 are one config: trained once
    assert (t8["cells"], t8["trainings"]) == (40, 35)
    md = E.markdown(rows + [t10], packed_perf(), "p.json", "gpu", 5)
    assert "16 processes at once under MPS" in md and "| table10 | 10 | 0 | - | - |" in md


def test_dataset_sizes_count_the_generated_splits():
    from ehin.config import load_config
    from ehin.data import prepare_dataset

    cfg = load_config(profile="smoke")
    refer = prepare_dataset(cfg, progress=False)
    train, expressions = E.dataset_sizes(cfg)
    assert train == len(refer.refs(cfg["data"]["train_split"])) > 0
    assert expressions["val"] == sum(len(r["sentences"]) for r in refer.refs("val")) > 0


def test_packed_profile_refuses_a_single_process_measurement(tmp_path, capsys):
    one = tmp_path / "one.json"
    one.write_text(json.dumps(packed_perf(procs=1)))
    with pytest.raises(SystemExit):
        E.main(["--profile", "gpu", "--perf", str(one)])
    assert "needs a packed measurement" in capsys.readouterr().err
    paper = tmp_path / "paper.json"
    paper.write_text(json.dumps(perf()))
    with pytest.raises(SystemExit):
        E.main(["--profile", "gpu", "--perf", str(paper)])
    assert "--size gpu" in capsys.readouterr().err


def test_a_chain_builds_on_its_stage1_cell_without_training_it_again():
    """Table 2's Stage-2 cells reuse the Stage-1 cell's model (bench.run.share_trainings): the estimate adds
    each chain's pseudo-labels (and stage 2, unmeasured here) to that training, not a second stage 1."""
    from bench.run import build_specs
    from bench.sweeps import load_sweep

    specs = build_specs(load_sweep("table2"), "paper", 1, Path("/nonexistent"))
    chains = {s.extra["trained"]["dir"] if s.extra.get("trained") else s.run_dir for s in specs if s.stage == "2"}
    assert chains and all(s.extra.get("stage1_dir") for s in specs if s.stage == "2")
    p = perf()
    stage1 = E._row("s1", [s for s in specs if s.stage == "1"], p, 500.0)
    both = E._row("all", specs, p, 500.0)
    # a chain's model evaluated on its other splits: stage 1's and stage 2's (bench.jobs)
    other_splits = sum(2 * E._expressions(s.config["eval"]["split"]) / 500.0 for s in specs
                       if s.stage == "2" and s.extra.get("trained")
                       and s.extra["trained"]["split"] != s.config["eval"]["split"])
    pseudo = len(chains) * 42_278 / 500.0
    assert both["one_gpu_s"] == pytest.approx(stage1["one_gpu_s"] + pseudo + other_splits)
    assert both["trainings"] == stage1["trainings"] + len(chains)


def test_stored_trainings_and_the_rest(sizes):
    """A training counts as stored once any cell of it has a record; the rest is the others' share."""
    from bench.run import build_specs
    from bench.sweeps import load_sweep

    specs = build_specs(load_sweep("table5"), "gpu", 5, Path("/nonexistent"))
    share = (20 * 1000 + 4 * 300) / 600  # one EHIN training's share, as in the test above
    stored = {s.cell_id for s in specs if s.seed == 0} | {"gpu/table5/not-declared/seed0/0"}
    (t5,) = E.estimate(["table5"], packed_perf(), profile="gpu", stored=stored)
    assert t5["stored"] == 7 and t5["left_one_gpu_s"] == pytest.approx(28 * share)
    (none,) = E.estimate(["table5"], packed_perf(), profile="gpu")
    assert none["stored"] == 0 and none["left_one_gpu_s"] == pytest.approx(none["one_gpu_s"])
    (both,) = E.estimate(["table5"], packed_perf(), profile="gpu", stored={s.cell_id for s in specs})
    assert both["stored"] == 35 and both["left_one_gpu_s"] == 0
    full = {s.cell_id for s in specs if s.row == "bg+fg+cl" and s.seed == 0}
    t5, t6, _ = E.estimate(["table5", "table6"], packed_perf(), profile="gpu", stored=full)
    assert t5["stored"] == t6["stored"] == 1  # Table 6's EHIN is Table 5's full loss: bench.run copies its record
    md = E.markdown([E.estimate(["table5"], packed_perf(), profile="gpu", stored=stored)[0]], packed_perf(),
                    "p.json", "gpu", 5, "some/store")
    assert "--results some/store" in md and "| table5 | 35 | 35 | 21 min | 11 min | 7 | 16 min |" in md  # 35 and 28 shares of 35.3 s


def test_a_stored_chain_stores_its_stage1_and_its_stage2():
    """Table 2: a Stage-2 cell's record means its chain ran (stage 1 included); a Stage-1 cell's record
    leaves the chain's pseudo-labels and stage 2 to run."""
    from bench.run import build_specs
    from bench.sweeps import load_sweep

    specs = build_specs(load_sweep("table2"), "paper", 1, Path("/nonexistent"))
    p = perf(stage2=1000.0)
    (full,) = E.estimate(["table2"], p)
    stage1 = {s.cell_id for s in specs if s.stage == "1"}
    (half,) = E.estimate(["table2"], p, stored=stage1)
    chains = len({s.extra["trained"]["dir"] if s.extra.get("trained") else s.run_dir for s in specs if s.stage == "2"})
    assert half["stored"] == full["trainings"] - chains
    s1_only = E._row("s1", [s for s in specs if s.stage == "1"], p, 500.0)
    assert half["left_one_gpu_s"] == pytest.approx(full["one_gpu_s"] - s1_only["one_gpu_s"])
    (done,) = E.estimate(["table2"], p, stored={s.cell_id for s in specs})
    assert done["stored"] == full["trainings"] and done["left_one_gpu_s"] == 0


def test_the_readme_counts_what_the_gpu_store_holds(monkeypatch):
    """The README's gpu estimate block names reports/gpu/store; its `stored` column must be that store's
    (the times need the gpu profile's datasets, so only the counts are compared here)."""
    splits = {"val": 300, "testA": 200, "testB": 100, "test": 100}  # every split the tables evaluate
    monkeypatch.setattr(E, "dataset_sizes", lambda cfg: (1000, splits))
    from bench.run import DEFAULT_SEEDS
    from bench.store import ResultStore
    from bench.sweeps import list_sweeps

    text = (ROOT / "README.md").read_text()
    marker = f"<!-- estimate-gpu:begin ({E.command_line('gpu', 'reports/gpu/store')}) -->"
    assert marker in text, "the README's gpu estimate block no longer names reports/gpu/store"
    block = text.split(marker, 1)[1].split("<!-- estimate-gpu:end -->", 1)[0]
    shown = {line.split("|")[1].strip(): int(line.split("|")[6]) for line in block.splitlines()
             if line.startswith("| ") and not line.startswith("| table |")}
    stored = ResultStore(ROOT / "reports/gpu/store").finished_ids()
    rows = E.estimate(list_sweeps(), packed_perf(), "gpu", DEFAULT_SEEDS["gpu"], stored)
    assert shown == {r["table"]: r["stored"] for r in rows}, (
        "README's gpu estimate block is stale: python -m bench.estimate --profile gpu --results reports/gpu/store "
        "--readme README.md")


def test_durations_choose_their_unit_after_rounding():
    assert E._hours(3590) == "1.0 h" and E._hours(3540) == "59 min" and E._hours(7200) == "2.0 h"
    assert E._hours(59.6) == "1 min" and E._hours(29) == "< 1 min" and E._hours(90, complete=False) == ">= 2 min"
