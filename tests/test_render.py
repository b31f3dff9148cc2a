"""The renderer on hand-made records (NOT results: made-up values with known means and stds).

Golden files under tests/golden/ were rendered from these records and checked by hand; the cells
are compared with an absolute tolerance of 1e-6 (lm-evaluation-harness style), the markdown
exactly. After an intended change of the format, regenerate them with
`UPDATE_GOLDEN=1 pytest tests/test_render.py` and review the diff.
"""
from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path

import pandas as pd
import pytest

from bench.render import render_cells, render_table, select_records, write_tables
from bench.sweeps import PAPER_DIR, Sweep, load_sweep

GOLDEN = Path(__file__).parent / "golden"
TOL = 1e-6
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


@lru_cache(maxsize=None)
def sweep(name: str) -> Sweep:
    return load_sweep(name, validate=False)  # test_sweeps validates; here only rendering matters


def record(table: str, row: str, seed: int, metrics: dict, **extra) -> dict:
    return {"table": table, "row": row, "seed": seed, "profile": "synthetic", "config_hash": "0123456789ab",
            "code_version": "abc1234567", "metrics": metrics, "history": [], "timings": {},
            "host": "testhost", "device": "cpu", **extra}


def table5_records() -> list[dict]:
    """Row i, metric j: seed 0 -> 10 i + j, seed 1 -> 10 i + j + 2 (mean 10 i + j + 1, std sqrt 2).

    "fg" has seed 0 only (partial); "cl" has nothing (pending).
    """
    s = sweep("table5")
    out = []
    for i, row in enumerate(s.rows):
        for seed in (0, 1):
            if row == "cl" or (row == "fg" and seed == 1):
                continue
            out.append(record("table5", row, seed,
                              {m: 10.0 * i + j + 2 * seed for j, m in enumerate(s.metrics.values())}))
    return out


def _golden_csv(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        frame.to_csv(path, index=False, float_format="%.10g")
    return pd.read_csv(path, dtype={"row": str})


def test_cells_match_golden_within_tolerance():
    got = render_cells(sweep("table5"), table5_records(), seeds=[0, 1])
    want = _golden_csv("table5_cells.csv", got)
    assert list(got.columns) == list(want.columns)
    assert len(got) == len(want)
    for g, w in zip(got.to_dict("records"), want.to_dict("records")):
        for key in ("row", "metric", "n", "status"):
            assert g[key] == w[key], (g, w)
        for key in ("mean", "std", "paper", "diff"):
            if math.isnan(w[key]):
                assert math.isnan(g[key]), (key, g, w)
            else:
                assert abs(g[key] - w[key]) <= TOL, (key, g, w)


def test_mean_and_std_on_known_numbers():
    cells = render_cells(sweep("table5"), table5_records(), seeds=[0, 1]).set_index(["row", "metric"])
    c = cells.loc[("bg+cl", "point_box")]          # row 2, metric 2: seeds give 22 and 24
    assert c["n"] == 2 and c["mean"] == pytest.approx(23.0) and c["std"] == pytest.approx(math.sqrt(2))
    assert c["paper"] == pytest.approx(62.75) and c["diff"] == pytest.approx(23.0 - 62.75)
    assert c["status"] == "done"
    fg = cells.loc[("fg", "iou")]                   # one seed: a mean, no std, partial
    assert fg["n"] == 1 and fg["mean"] == 50.0 and math.isnan(fg["std"]) and fg["status"] == "partial"
    three = [record("table3", "2", s, {"iou": v}) for s, v in enumerate([1.0, 2.0, 6.0])]
    c3 = render_cells(sweep("table3"), three).set_index(["row", "metric"]).loc[("2", "iou")]
    assert c3["mean"] == pytest.approx(3.0) and c3["std"] == pytest.approx(math.sqrt(7.0))  # sample std


def test_rows_in_papers_order_and_pending_rows_kept():
    table = render_table(sweep("table5"), table5_records(), seeds=[0, 1])
    paper_rows = list(pd.read_csv(PAPER_DIR / "table5_losses.csv", dtype=str)["losses"])
    assert list(table.index) == paper_rows
    assert list(dict.fromkeys(c[0] for c in table.columns)) == ["IoU", "mIoU", "PointIt", "PointM", "BoxAcc", "status"]
    assert table.loc["cl", ("status", "")] == "pending"
    assert table.loc["fg", ("status", "")] == "partial"
    assert table.loc["bg+fg+cl", ("status", "")] == "done"
    assert math.isnan(table.loc["cl", ("IoU", "mean")]) and table.loc["cl", ("mIoU", "paper")] == 1.0
    empty = render_table(sweep("table5"), [])
    assert list(empty.index) == paper_rows and set(empty[("status", "")]) == {"pending"}


def test_write_tables_formats_and_golden_markdown(tmp_path):
    paths = write_tables(sweep("table5"), table5_records(), tmp_path, seeds=[0, 1])
    assert set(paths) == {"md", "tex", "html", "json"} and all(p.exists() for p in paths.values())
    md = paths["md"].read_text()
    if UPDATE:
        (GOLDEN / "table5.md").write_text(md)
    assert md == (GOLDEN / "table5.md").read_text()
    assert "profile: synthetic; seeds: 0, 1" in md
    assert "dataset: synth-refcoco+ val (paper: RefCOCO+ val)" in md
    assert "code: abc1234567" in md and "hardware: cpu on testhost" in md
    assert "| cl | pending | – | – | pending | ≈1.00 |" in md
    tex = paths["tex"].read_text()
    assert "\\begin{tabular}" in tex and "$\\pm$" in tex and "bg+fg+cl" in tex
    html = paths["html"].read_text()
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html and "<tr class='pending'>" in html
    cells = json.loads(paths["json"].read_text())
    assert cells["header"]["profile"] == "synthetic" and len(cells["cells"]) == 7 * 5
    assert cells["cells"][-1]["mean"] is None  # cl / box_acc: pending, NaN written as null


def test_header_names_the_metrics_protocol_of_its_records(tmp_path):
    from ehin.metrics import PROTOCOL, PROTOCOL_BEFORE

    recs = table5_records()
    md = write_tables(sweep("table5"), recs, tmp_path / "old")["md"].read_text()
    assert f"evaluation: {PROTOCOL_BEFORE}" in md  # records written before the protocol was recorded
    recs = [{**r, "metrics_protocol": PROTOCOL} for r in recs]
    md = write_tables(sweep("table5"), recs, tmp_path / "new")["md"].read_text()
    assert f"evaluation: {PROTOCOL}\n" in md and PROTOCOL_BEFORE not in md


def test_tex_escapes_special_characters(tmp_path):
    recs = [record("table6", "EHIN without HIPM & ECLM", 0, {"iou": 1.0})]
    tex = write_tables(sweep("table6"), recs, tmp_path)["tex"].read_text()
    assert "EHIN without HIPM \\& ECLM" in tex


def test_newest_record_wins_and_foreign_records_are_ignored():
    s = sweep("table4")
    recs = [record("table4", "repeat_once", 0, {"iou": 1.0}),
            record("table4", "repeat_once", 0, {"iou": 5.0}),        # a rerun of the same cell
            record("table4", "renamed_row", 0, {"iou": 99.0}),      # a row no longer declared
            record("table3", "repeat_once", 0, {"iou": 77.0})]      # another table
    cells = render_cells(s, recs).set_index(["row", "metric"])
    assert cells.loc[("repeat_once", "iou"), "mean"] == 5.0 and cells.loc[("repeat_once", "iou"), "n"] == 1
    assert list(cells.index.get_level_values(0).unique()) == ["repeat_once", "repeat_twice"]


def test_one_profile_at_a_time():
    s = sweep("table4")
    recs = [record("table4", "repeat_once", 0, {"iou": 1.0}),
            {**record("table4", "repeat_once", 0, {"iou": 2.0}), "profile": "smoke"}]
    with pytest.raises(ValueError, match="profiles"):
        render_cells(s, recs)
    assert render_cells(s, recs, profile="smoke").iloc[0]["mean"] == 2.0
    assert select_records(s, recs, "synthetic")[0] == "synthetic"


def test_table2_grid_layout(tmp_path):
    recs = [record("table2", "EHIN (Stage-1) | referit_test", s, {"iou": 30.0 + s, "point_mask": 50.0})
            for s in (0, 1)]
    md = write_tables(sweep("table2"), recs, tmp_path)["md"].read_text()
    lines = md.splitlines()
    header = next(l for l in lines if l.startswith("| Metric"))
    assert header.split(" | ")[2:4] == ["refcoco_val", "refcoco_testA"]
    ehin_iou = next(l for l in lines if l.startswith("| IoU | EHIN (Stage-1) |"))
    assert ehin_iou.endswith("| 30.50 ± 0.71 (36.14) |")
    assert "| pending (25.10) |" in ehin_iou
    assert "synth-referit test (paper: ReferIt test)" in md
    assert "synth-refcocog (google) val (paper: RefCOCOg (google) val)" in md
    # with the sweep's seeds known, a cell short of them says how many it has and its line is partial
    paths = write_tables(sweep("table2"), recs[:1], tmp_path / "partial", seeds=[0, 1])
    ehin_iou = next(l for l in paths["md"].read_text().splitlines() if l.startswith("| IoU | EHIN (Stage-1) |"))
    assert ehin_iou.endswith("| 30.00 (36.14), 1 seed |")
    assert "<tr class='partial'>" in paths["html"].read_text()


def test_timing_may_come_from_timings():
    recs = [record("table10", "EHIN", 0, {}, timings={"seconds_per_sample": 0.5}),
            record("table10", "TRIS", 0, {"seconds_per_sample": 0.75})]
    cells = render_cells(sweep("table10"), recs).set_index("row")
    assert cells.loc["EHIN", "mean"] == 0.5 and cells.loc["TRIS", "mean"] == 0.75
    assert cells.loc["TRIS", "paper"] == 2.18


def test_plots_are_written(tmp_path):
    from bench.plots import write_plots

    recs = table5_records()
    s7 = sweep("table7")
    recs += [record("table7", row, seed, {m: 20.0 + seed for m in s7.metrics.values()})
             for row in list(s7.rows)[:4] for seed in (0, 1)]
    recs += [record("fig7", "early", seed, {"iou": 1.0},
                    history=[{"epoch": e, "iou": 10.0 * e + seed, "point_mask": 5.0 * e} for e in range(3)])
             for seed in (0, 1)]
    paths = []
    for name in ("table3", "table5", "table7", "fig7"):  # one of each kind; table3 has no records
        paths += write_plots(sweep(name), recs, tmp_path)
    assert [p.name for p in paths] == ["table3_curve.png", "table5_bars.png", "table7_heatmap.png",
                                       "fig7_history.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_index_links_claims_searches_and_perf(tmp_path):
    from bench.report import write_index

    reports = tmp_path / "reports"
    (reports / "claims").mkdir(parents=True)
    (reports / "claims" / "synthetic.html").write_text("<p>claims</p>")
    (reports / "search" / "default-synthetic").mkdir(parents=True)
    (reports / "search" / "default-synthetic" / "summary.md").write_text("# Search\n")
    (reports / "perf").mkdir()
    (reports / "perf" / "h100.json").write_text(json.dumps(
        {"size": "paper", "environment": {"gpu": "NVIDIA H100", "torch": "2.11"}}))
    page = write_index(reports).read_text()
    assert 'href="claims/synthetic.html"' in page
    assert 'href="search/default-synthetic/summary.md"' in page and "importances.png" in page
    assert 'href="perf/h100.json"' in page and "NVIDIA H100" in page


def test_results_summary_reads_the_rendered_cells(tmp_path):
    from bench.report import results_summary, update_readme

    reports = tmp_path / "reports"
    write_tables(sweep("table5"), table5_records(), reports / "table5", seeds=[0, 1])
    text = results_summary(reports)
    assert "**Table 5: loss components (RefCOCO+ val)** (`reports/table5/`" in text
    assert "| row | PointM | IoU | mIoU | BoxAcc |" in text
    cells = json.loads((reports / "table5" / "cells.json").read_text())
    full = next(c for c in cells["cells"] if c["row"] == "bg+fg+cl" and c["metric"] == "point_mask")
    assert f"| bg+fg+cl | {full['mean']:.1f} ± {full['std']:.1f} |" in text
    # a row with no result in any column is named under the table, not listed as a line of dashes
    assert "| cl |" not in text and "\nNo results yet: cl.\n" in text
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin (python -m bench.report) -->\nold\n<!-- results:end -->\nend\n")
    assert update_readme(readme, reports) and not update_readme(readme, reports)
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("<!-- results:end -->\nend\n")
    assert "old" not in readme.read_text()


def test_results_summary_names_unrun_tables_and_keeps_timings_and_split_rows(tmp_path):
    """A table rendered before any cell ran (bench.run --render-only) has no rows, only its name on the
    line of tables without results; Table 10 shows its
    own column at its sweep's decimals (seconds, not 0.0); Table 2's 'method | split' rows stay one cell."""
    from bench.report import results_summary

    reports = tmp_path / "reports"
    write_tables(sweep("table5"), [], reports / "table5", seeds=[])
    t10 = [record("table10", row, seed, {"seconds_per_sample": v + 0.001 * seed})
           for row, v in (("TRIS", 0.016), ("EHIN", 0.020)) for seed in (0, 1)]
    write_tables(sweep("table10"), t10, reports / "table10", seeds=[0, 1])
    text = results_summary(reports)
    assert "**Table 5" not in text and "Rendered with no results yet: Table 5" in text and "**Table 10" in text
    decimals = sweep("table10").decimals
    assert f"| TRIS | {0.0165:.{decimals}f} ± " in text and "| row | seconds_per_sample |" in text
    rows = sweep("table2").rows
    split_row = next(r for r in rows if "|" in r)
    t2 = [record("table2", split_row, 0, {"point_mask": 50.0, "iou": 30.0})]
    write_tables(sweep("table2"), t2, reports / "table2", seeds=[0])
    line = next(x for x in results_summary(reports).splitlines() if x.startswith("| " + split_row.split("|")[0]))
    assert line == "| " + split_row.replace("|", "\\|") + " | 50.0 | 30.0 |"  # row, PointM, IoU: three cells
    # its 39 other rows, none run, are counted rather than named
    assert f"\n{len(rows) - 1} of {len(rows)} rows have no results yet (`reports/table2/table.md` lists every row).\n" \
        in results_summary(reports)


def test_the_readme_results_block_is_current():
    from bench.report import README_BEGIN, README_END, results_summary

    root = Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text()
    block = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    assert block == "\n" + results_summary(root / "reports"), "run: python -m bench.report --readme README.md"


def test_failed_rows_say_failed_not_pending(tmp_path):
    """A row whose cell failed (no record; the caller names it) renders "failed" (issue 18)."""
    s = sweep("table5")
    recs = table5_records()  # "cl": no record, "fg": one of two seeds
    cells = render_cells(s, recs, seeds=[0, 1], failed={"cl", "fg", "bg"})
    status = dict(zip(cells.row, cells.status))
    assert status["cl"] == status["fg"] == "failed" and status["bg"] == "done"  # bg has both seeds
    assert render_table(s, recs, seeds=[0, 1], failed={"cl"}).loc["cl", ("status", "")] == "failed"
    paths = write_tables(s, recs, tmp_path, seeds=[0, 1], failed={"cl"})
    cl = next(line for line in paths["md"].read_text().splitlines() if line.startswith("| cl |"))
    assert "failed" in cl and "pending" not in cl
    assert "<tr class='failed'>" in paths["html"].read_text()
    grid = write_tables(sweep("table2"), [], tmp_path / "t2", failed=set(sweep("table2").rows))
    assert "pending" not in grid["md"].read_text().split("| Metric")[1]


def _fidelity(**overrides) -> dict:
    """A testbed verdicts file as `bench.testbed --fidelity` writes it (made-up verdicts): two variants,
    §2.3 missed on one, §2.4's pooled std missed and one variant's std too."""
    met = {"scenes": True, "scorer": True, "control": True, "power": True}
    power = {"complete": True, "seeds": 10, "enough_seeds": True, "expressions_met": True, "met": False,
             "seeds_asked": 10, "pooled_std_max": 3.0, "variant_std_max": 4.0, "min_expressions": 2000}
    return {"profile": "gpu", "overrides": {"train.epochs": 20}, "pooled_std": 5.2216, "pooled_met": False,
            "power": power, "all_met": False,
            "frozen": {"checkpoints": [{"file": "clip.pt", "sha256": "c" * 64}],
                       "datasets": {"synth-refcoco:unc": "d" * 64, "synth-referit:berkeley": "e" * 64}},
            "variants": {"synth-refcoco": {"met": {**met, "power": False}},
                         "synth-referit": {"met": {**met, "control": False}}}, **overrides}


def _testbed_record(row: str, seed: int, dataset_sha: str = "d" * 64) -> dict:
    clip = {"file": "clip.pt", "sha256": "c" * 64}
    return record("table5", row, seed, {"point_mask": 20.0}, profile="gpu",
                  inputs={"backbone": clip, "scorer": clip,
                          "dataset": {"name": "synth-refcoco", "split_by": "unc", "sha256": dataset_sha}})


def test_header_names_the_testbed_criteria_its_records_miss(tmp_path, monkeypatch):
    """The testbed's rule: every table run on it names the TESTBED criteria it misses, read from the verdicts
    file, when its records loaded the datasets and CLIP that file judged; otherwise it says they were not."""
    from bench.render import testbed_status

    row = next(iter(sweep("table5").rows))
    recs = [_testbed_record(row, 0), _testbed_record(row, 1)]
    src = "reports/testbed/fidelity.json"
    assert testbed_status(recs, "gpu", _fidelity(), src) == (
        f"judged in {src} (its control: train.epochs=20); met: §2.1, §2.2; "
        "missed: §2.3 (synth-referit), §2.4 (pooled seed std 5.22 > 3, std > 4 on synth-refcoco)")
    every = {"scenes": True, "scorer": True, "control": True, "power": True}
    met = _fidelity(pooled_met=True, overrides={}, all_met=True, variants={"v": {"met": every}})
    met["power"]["met"] = True
    assert testbed_status(recs, "gpu", met, src) == f"judged in {src}; met: §2.1, §2.2, §2.3, §2.4; missed: none"
    # §2.4 is more than the stds: an incomplete control, too few seeds or expressions are misses too.
    short = _fidelity(pooled_std=None, pooled_met=None, variants={"v": {"met": every}})
    short["power"].update(complete=False, seeds=4, enough_seeds=False, expressions_met=False)
    assert testbed_status(recs, "gpu", short, src).endswith(
        "missed: §2.4 (the control incomplete, 4 seeds, not 10, fewer than 2000 expressions on a split, "
        "pooled seed std not computed)")
    old = {k: v for k, v in met.items() if k != "power"}  # a file from before §2.4's other checks were written
    assert testbed_status(recs, "gpu", old, src).endswith("missed: none")
    assert testbed_status(recs, "gpu", {**old, "all_met": False}, src).endswith(
        "missed: §2.4 (its seeds and expressions not recorded)")
    # Another dataset than the judged one, or no checksums at all: not this testbed's verdicts.
    other = [_testbed_record(row, 0), _testbed_record(row, 1, dataset_sha="f" * 64)]
    assert testbed_status(other, "gpu", _fidelity(), src) == (
        f"not the one judged in {src}: 1 of 2 records loaded other datasets or CLIP weights")
    assert testbed_status([record("table5", row, 0, {}, profile="gpu")], "gpu", _fidelity(), src).startswith(
        "not the one judged")
    assert testbed_status(recs, "synthetic", _fidelity(), src) == f"not judged (TESTBED judges the gpu profile: {src})"
    assert testbed_status(recs, "gpu", None, src).startswith(f"not judged (no {src}")
    # Table 10's cells time the model on generated inputs: no dataset to judge, with or without the file
    timing = [{**record("table10", "EHIN", 0, {"seconds_per_sample": 0.01}, profile="gpu"), "stage": "inference"}]
    for fidelity in (_fidelity(), None):
        assert testbed_status(timing, "gpu", fidelity, src).startswith("does not apply")

    fid = tmp_path / "fidelity.json"
    fid.write_text(json.dumps(_fidelity()))
    paths = write_tables(sweep("table5"), recs, tmp_path / "out", fidelity_file=fid)
    assert f"testbed: judged in {fid} (its control: train.epochs=20)" in paths["md"].read_text()  # not under cwd
    assert json.loads(paths["json"].read_text())["header"]["testbed"].startswith("judged in")
    monkeypatch.chdir(tmp_path)  # under the working directory the header names it relative to it
    assert "testbed: judged in fidelity.json (" in write_tables(sweep("table5"), recs, "rel", fidelity_file=fid)["md"].read_text()
    plain = write_tables(sweep("table5"), recs, tmp_path / "plain")  # no verdicts file asked for: no line
    assert "testbed:" not in plain["md"].read_text()


def test_header_names_collapsed_cells(tmp_path):
    """A cell whose last evaluation gave empty maps on ≥ COLLAPSED_PCT % of the expressions is named in
    the header (its zeros are not a ranking); an earlier collapse that recovered is not."""
    from ehin.metrics import COLLAPSED_PCT

    recs = table5_records()
    bg0 = next(i for i, r in enumerate(recs) if r["row"] == "bg" and r["seed"] == 0)
    recs[bg0] = {**recs[bg0], "history": [{"epoch": 1, "empty_maps": 0.0}, {"epoch": 2, "loss": 0.1},
                                          {"epoch": 3, "empty_maps": 100.0}, {"epoch": 4, "loss": 0.1}]}
    fg0 = next(i for i, r in enumerate(recs) if r["row"] == "fg" and r["seed"] == 0)
    recs[fg0] = {**recs[fg0], "history": [{"epoch": 1, "empty_maps": 100.0}, {"epoch": 2, "empty_maps": 3.0}]}
    out = write_tables(sweep("table5"), recs, tmp_path)
    md = out["md"].read_text()
    assert f"- collapsed (an empty map on ≥ {COLLAPSED_PCT:g} % " in md
    assert md.count("collapsed") == 1 and ": bg, seed 0 (100 %)\n" in md
    assert json.loads(out["json"].read_text())["header"]["collapsed"] == [{"row": "bg", "seed": 0, "empty_maps": 100.0}]
    recs[bg0]["history"][2]["empty_maps"] = COLLAPSED_PCT - 1
    assert "collapsed" not in write_tables(sweep("table5"), recs, tmp_path / "below")["md"].read_text()


def test_header_names_cells_below_the_language_blind_guess(tmp_path):
    """A cell whose PointM is under the random-object guess of the split it was evaluated on (fidelity.json's
    `language_blind`, TESTBED §2.3) is named in the header, rows in the table's order, with the share of its
    peaks on any object; a cell above it is compared but not named; one on a split or dataset without a
    guess, or without checksums, is counted as not compared; another profile's table is not checked."""
    from bench.render import language_blind_check

    guess = {"dataset": "synth-refcoco", "split_by": "unc", "split": "val", "language_blind": 14.1}
    fidelity = _fidelity(variants={"synth-refcoco": {"met": {}, **guess}})
    first, second = list(sweep("table5").rows)[:2]

    def cell(row: str, seed: int, point_m: float, split: str = "val", sha: str = "d" * 64,
             on_object: float | None = 3.0) -> dict:
        r = _testbed_record(row, seed, dataset_sha=sha)
        metrics = {"point_mask": point_m, **({"point_any_object": on_object} if on_object is not None else {})}
        return {**r, "metrics": metrics, "overrides": {"eval.split": split}}

    recs = [cell(first, 0, 0.4), cell(first, 1, 20.0), cell(first, 2, 0.0, split="testA"),
            cell(first, 3, 0.0, sha="f" * 64), {**cell(first, 4, 0.0), "inputs": {}}]
    assert language_blind_check(recs, "gpu", fidelity) == {
        "below": [{"row": first, "seed": 0, "point_mask": 0.4, "language_blind": 14.1, "point_any_object": 3.0}],
        "compared": {first: 2}, "not_compared": 3}
    assert language_blind_check(recs, "synthetic", fidelity) is None
    assert language_blind_check(recs, "gpu", None) is None
    fid = tmp_path / "fidelity.json"
    fid.write_text(json.dumps(fidelity))
    shown = [cell(second, 1, 2.0, on_object=None), cell(first, 1, 20.0), cell(first, 0, 0.4)]  # not in row order
    md = write_tables(sweep("table5"), shown, tmp_path / "out", fidelity_file=fid)["md"].read_text()
    line = next(x for x in md.splitlines() if x.startswith("- below the language-blind guess ("))
    assert line.endswith(f": {first}, seed 0 (0.4 against 14.1; 3.0 % on an object); {second}, seed 1 (2.0 against 14.1)")
    above = write_tables(sweep("table5"), shown[1:2], tmp_path / "above", fidelity_file=fid)["md"].read_text()
    assert "language-blind" not in above
    # The results summary (README's block, docs/findings.md) names the rows under their table, with how many
    # of each row's compared seeds were below
    from bench.report import results_summary

    assert f"header details: {first} (1 of 2 seeds), {second} (1 of 1 seeds).\n" in results_summary(tmp_path / "out")
    assert "language-blind" not in results_summary(tmp_path / "above")


def test_header_names_stage2_cells_on_another_training_of_stage1(tmp_path):
    """Session 50: a Stage-2 chain run in a later sitting trained stage 1 again, and on synth-refcocog umd that
    training scored PointM 0.0 where the Stage-1 row's scored 39.1. A Stage-2 cell whose labels came from another
    stage-1 model than its Stage-1 row's (other `stage1_weights`; without them, other stage-1 figures) is named
    with both PointM; one on the same model, one with no stage-1 figures (or no PointM among them), or one whose
    Stage-1 row is of another seed or config is not."""
    from bench.render import stage1_retrained
    from bench.report import results_summary

    common = {"data.dataset": "synth-refcoco", "data.split_by": "unc", "eval.split": "val", "train.threads": 2}
    stage1 = {"point_mask": 41.1, "iou": 2.8}

    def cell(method: str, stage: str, seed: int, metrics: dict, **extra) -> dict:
        overrides = {**common, **({"data.K": 3} if method == "TRIS" else {}), **extra.pop("overrides", {})}
        return record("table2", f"{method} (Stage-{stage}) | refcoco_val", seed, metrics, stage=stage,
                      overrides=overrides, **extra)

    recs = [
        cell("EHIN", "1", 0, stage1, stage1_weights="aaaa"),
        cell("EHIN", "2", 0, {"point_mask": 8.2, "iou": 6.9}, stage1_metrics={"point_mask": 40.2, "iou": 3.5},
             stage1_weights="bbbb", overrides={"pseudo.workers": 12, "train.threads": 8}),  # another model: named
        cell("EHIN", "1", 1, stage1, stage1_weights="cccc"),
        cell("EHIN", "2", 1, {"point_mask": 9.0}, stage1_metrics={"point_mask": 1.0, "iou": 1.0},
             stage1_weights="cccc"),  # the same weights: not named, whatever its figures
        cell("TRIS", "1", 0, stage1),  # records before stage1_weights: the figures decide
        cell("TRIS", "2", 0, {"point_mask": 42.7}, stage1_metrics=dict(stage1)),
        cell("TRIS", "1", 1, stage1),
        cell("TRIS", "2", 1, {"point_mask": 42.7}, stage1_metrics={**stage1, "iou": 2.9}),  # named
        cell("TRIS", "2", 2, {"point_mask": 42.7}, stage1_metrics={"point_mask": 0.0}),  # no Stage-1 cell of seed 2
        cell("EHIN", "2", 2, {"point_mask": 5.0}),  # no stage-1 figures
        cell("EHIN", "1", 3, stage1),
        cell("EHIN", "2", 3, {"point_mask": 5.0}, stage1_metrics={"iou": 9.0}),  # no stage-1 PointM to show
    ]
    assert [(c["row"], c["seed"], c["stage1_point_mask"], c["stage1_row_point_mask"])
            for c in stage1_retrained(recs)] == [("EHIN (Stage-2) | refcoco_val", 0, 40.2, 41.1),
                                                ("TRIS (Stage-2) | refcoco_val", 1, 41.1, 41.1)]
    other_config = [recs[0], {**recs[1], "overrides": {**recs[1]["overrides"], "loss.bg": 0}}]
    assert stage1_retrained(other_config) == []  # not this Stage-2 cell's Stage-1 row

    md = write_tables(sweep("table2"), recs, tmp_path / "table2")["md"].read_text()
    line = next(x for x in md.splitlines() if x.startswith("- on another training of stage 1 than their Stage-1 row's"))
    assert line.endswith("): TRIS (Stage-2) | refcoco_val, seed 1 (41.1 against 41.1); "
                         "EHIN (Stage-2) | refcoco_val, seed 0 (40.2 against 41.1)")  # the table's row order
    assert ("as the table's header details: TRIS (Stage-2) | refcoco_val seed 1 (41.1 against 41.1), "
            "EHIN (Stage-2) | refcoco_val seed 0 (40.2 against 41.1).\n") in results_summary(tmp_path)
    same = write_tables(sweep("table2"), [recs[0], {**recs[1], "stage1_weights": "aaaa"}],
                        tmp_path / "same" / "table2")["md"].read_text()
    assert "another training of stage 1" not in same
    assert "another training of stage 1" not in results_summary(tmp_path / "same")


def test_header_names_the_dataset_the_records_ran_on(tmp_path):
    """A row run with `bench.run --set data.dataset=...` (its records' overrides) is named with the dataset
    it ran on, not the sweep's; a row whose records follow the declaration, or with no records, keeps it."""
    recs = [r for r in table5_records() if r["row"] in ("fg", "bg+fg+cl")]
    for r in recs:
        moved = r["row"] == "fg"
        r["overrides"] = {"data.dataset": "synth-refcocog" if moved else "synth-refcoco+",
                          "data.K": 1, "eval.split": "val", **({"data.split_by": "umd"} if moved else {})}
    md = write_tables(sweep("table5"), recs, tmp_path)["md"].read_text()
    assert ("- dataset: synth-refcoco+ val (paper: RefCOCO+ val); synth-refcocog (umd) val (paper: RefCOCO+ val)\n"
            in md)
    # ... and says the table ran beyond its declaration (data.K is declared by no row of Table 5)
    assert ("- run with `--set data.K=1 --set data.dataset=synth-refcocog --set data.split_by=umd` (not the paper's "
            "configuration)\n" in md)
    # how and where a cell ran is not a change (speed levers, data and weight paths); values as YAML
    for r in recs:
        r["overrides"] = {"data.dataset": "synth-refcoco+", "train.channels_last": True, "data.root": "/data",
                          "backbone.pretrained": "/w/RN50.pt", "train.seed": r["seed"], "train.grad_clip": None,
                          "pseudo.workers": 12, "model.residual": False}
    md = write_tables(sweep("table5"), recs, tmp_path / "paths")["md"].read_text()
    assert "- run with `--set model.residual=false --set train.grad_clip=null` (not the paper's configuration)\n" in md
    untouched = write_tables(sweep("table5"), table5_records(), tmp_path / "declared")["md"].read_text()
    assert "- dataset: synth-refcoco+ val (paper: RefCOCO+ val)\n" in untouched and "--set" not in untouched


def test_header_names_paper_lines_not_run_and_rows_without_a_paper_line(tmp_path):
    """Review, session 41: Table 2's other methods (in the paper's CSV, not run) and a declared row the CSV has
    no line for were dropped without a word; the header names both."""
    import copy

    md = write_tables(sweep("table2"), [], tmp_path / "t2")["md"].read_text()
    assert "- the paper's table also has, not run here: AMR+, GbS+, WWbL+, PCNet_F, ICICS\n" in md
    t3 = copy.deepcopy(sweep("table3"))
    t3.paper.loc["4"] = math.nan  # as if the CSV had no line "4" ...
    t3.paper_unmatched = ["5"]    # ... and a line "5" the sweep does not declare
    md = write_tables(t3, [], tmp_path / "t3")["md"].read_text()
    assert "- the paper's table also has, not run here: 5\n" in md
    assert "- rows without a line in the paper's table: 4\n" in md
    assert "not run here" not in write_tables(sweep("table3"), [], tmp_path / "t3b")["md"].read_text()
