"""bench.check: drift against baselines (with a real code change on a copy) and the claims report."""
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.check import build_baselines, compare, diff_table, evaluate_claim
from bench.check import main as check_main
from bench.store import ResultStore
from bench.sweeps import load_sweep

REPO = Path(__file__).resolve().parents[1]
TINY = ["backbone.pretrained=null", "synthetic.images=60", "train.epochs=1", "eval.max_items=40",
        "train.threads=1", "model.hidden_dim=32"]


def rec(table, row, seed, metrics, h="h1", profile="smoke"):
    return {"table": table, "row": row, "seed": seed, "profile": profile, "config_hash": h,
            "cell_id": f"{profile}/{table}/{row}/seed{seed}/{h}", "metrics": metrics}


@functools.lru_cache(maxsize=None)
def _sweep(table):
    return load_sweep(table)


def declared(table, row, seed, metrics, profile="synthetic"):
    """A record of the config `table`'s sweep declares for (row, seed) on `profile` (its real hash)."""
    (cell,) = _sweep(table).cells(profile, [seed], rows=[row])
    return rec(table, row, seed, metrics, h=cell.config_hash(), profile=profile)


def test_baselines_tolerance_comes_from_seed_spread(tmp_path):
    ci, spread = ResultStore(tmp_path / "ci"), ResultStore(tmp_path / "spread")
    ci.append(rec("table3", "2", 0, {"iou": 20.0, "point_mask": 50.0}))
    for seed, v in enumerate([48.0, 50.0, 52.0]):
        spread.append(rec("table3", "2", seed, {"iou": 20.0 + seed * 0.1, "point_mask": v}))
    b = build_baselines(ci, "smoke", ["table3"], spread)
    pm = b["tables"]["table3"]["2"]["metrics"]["point_mask"]
    assert pm["expected"] == 50.0
    assert pm["seed_std"] == pytest.approx(2.0)
    assert pm["tol"] == pytest.approx(4.0)          # 2 x seed std
    assert b["tables"]["table3"]["2"]["metrics"]["iou"]["tol"] == 1.0  # the floor
    assert all(r["ok"] for r in compare(ci, b))


def test_each_cell_gets_its_own_band_from_its_seeds_and_a_rerun(tmp_path):
    """Issue 18: two cells with different spreads get different bands; a rerun elsewhere widens a band
    only where it moved more than the seeds did; the environments of both are written beside them."""
    ci, spread = ResultStore(tmp_path / "ci"), ResultStore(tmp_path / "spread")
    for row, seeds in {"fg": [30.0, 36.0, 42.0], "bg": [10.0, 10.5, 11.0]}.items():
        ci.append({**rec("table5", row, 0, {"point_mask": seeds[0]}), "torch": "2.13", "numerics": "portable"})
        for seed, v in enumerate(seeds):  # the spread store was run elsewhere: it is also the rerun
            moved = v + (4.0 if (row, seed) == ("bg", 0) else 0.0)
            spread.append({**rec("table5", row, seed, {"point_mask": moved}), "torch": "2.11", "numerics": "portable"})
    b = build_baselines(ci, "smoke", ["table5"], spread, rerun_store=spread)
    fg, bg = (b["tables"]["table5"][r]["metrics"]["point_mask"] for r in ("fg", "bg"))
    assert fg["seed_std_from"] == bg["seed_std_from"] == "this cell"
    assert (fg["seed_std"], fg["run_to_run"], fg["tol"]) == (pytest.approx(6.0), 0.0, pytest.approx(12.0))
    assert bg["seed_std"] == pytest.approx(float(np.std([14.0, 10.5, 11.0], ddof=1)), abs=1e-3)
    assert bg["run_to_run"] == 4.0 and bg["tol"] == pytest.approx(8.0)  # the rerun moved more than the seeds
    assert b["environment"]["torch"] == ["2.13"] and b["spread_environment"]["torch"] == ["2.11"]
    assert b["rerun_environment"]["torch"] == ["2.11"]


def test_drift_is_reported_cell_by_cell(tmp_path):
    base, now = ResultStore(tmp_path / "base"), ResultStore(tmp_path / "now")
    base.append(rec("table5", "bg+fg", 0, {"iou": 20.0, "point_mask": 50.0}))
    now.append(rec("table5", "bg+fg", 0, {"iou": 20.5, "point_mask": 43.0}))
    b = build_baselines(base, "smoke", ["table5"], None)
    rows = compare(now, b)
    bad = [r for r in rows if not r["ok"]]
    assert [(r["table"], r["cell"], r["metric"]) for r in bad] == [("table5", "bg+fg", "point_mask")]
    text = diff_table(rows)
    assert "table5" in text and "bg+fg" in text and "point_mask" in text and "50.00" in text and "43.00" in text
    assert "outside tolerance" in text


def test_missing_cell_and_changed_config_fail(tmp_path):
    base = ResultStore(tmp_path / "base")
    base.append(rec("table5", "bg+fg", 0, {"iou": 20.0}))
    base.append(rec("table5", "fg+cl", 0, {"iou": 21.0}))
    b = build_baselines(base, "smoke", ["table5"], None)
    now = ResultStore(tmp_path / "now")
    now.append(rec("table5", "bg+fg", 0, {"iou": 20.0}, h="other"))
    why = {(r["cell"], r["metric"]): r["why"] for r in compare(now, b) if not r["ok"]}
    assert "config changed" in why[("bg+fg", "config")]
    assert "missing" in why[("fg+cl", "-")]


def test_same_environment_any_difference_fails(tmp_path):
    """Where the environment is the baseline's, the same code gives the same floats: one flipped
    expression (0.72 PointM, well inside a seed band) fails; elsewhere the band applies."""
    from bench.check import environment_matches

    env = {"numerics": "portable", "torch": "2.13.0+cpu", "threads": 2, "cpu_capability": "AVX2", "cpu_model": "A"}
    base, same, other, cpu = (ResultStore(tmp_path / n) for n in ("base", "same", "other", "cpu"))
    base.append({**rec("table5", "fg", 0, {"point_mask": 37.152777}), **env})
    same.append({**rec("table5", "fg", 0, {"point_mask": 37.152777 + 100 / 139}), **env})
    other.append({**rec("table5", "fg", 0, {"point_mask": 37.152777 + 100 / 139}), **env, "threads": 1})
    # another CPU model, portable numerics too: not the same floats (an Intel Xeon against an AMD EPYC)
    cpu.append({**rec("table5", "fg", 0, {"point_mask": 37.152777 + 100 / 139}), **env, "cpu_model": "B"})
    b = build_baselines(base, "smoke", ["table5"], None)
    assert environment_matches(same, b) and not environment_matches(other, b) and not environment_matches(cpu, b)
    (row,) = compare(same, b, exact=True)
    assert not row["ok"] and "differs" in row["why"] and row["expected"] == 37.153
    assert all(r["ok"] for r in compare(other, b))  # another thread count: within the band (tol 1.0 floor)
    assert all(r["ok"] for r in compare(cpu, b))
    assert all(r["ok"] for r in compare(base, b, exact=True))
    native = ResultStore(tmp_path / "native")
    native.append({**rec("table5", "fg", 0, {"point_mask": 37.152777}), **env, "numerics": "native"})
    b_native = build_baselines(native, "smoke", ["table5"], None)
    moved = ResultStore(tmp_path / "moved")
    moved.append({**rec("table5", "fg", 0, {"point_mask": 37.152777}), **env, "numerics": "native", "cpu_model": "B"})
    assert not environment_matches(moved, b_native)  # native numerics on another CPU: floats may differ


def _changed_copy(copy: Path, path: str, old: str, new: str) -> Path:
    """A copy of the project's code with one edit: `old` replaced by `new` in `path`."""
    for part in ("ehin", "bench", "sweeps", "reports/paper"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    text = (copy / path).read_text()
    assert old in text, (path, old)
    (copy / path).write_text(text.replace(old, new))
    return copy


def _tiny_sweep(tmp_path: Path, code_root: Path, results: Path) -> None:
    cmd = [sys.executable, "-m", "bench.run", "table3", "--profile", "smoke", "--rows", "2",
           "--results", str(results), "--reports", str(tmp_path / "rep"), "--no-render"]
    for s in TINY:
        cmd += ["--set", s]
    subprocess.run(cmd, cwd=code_root, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(code_root), "EHIN_CODE_VERSION": "test"})


@pytest.mark.slow
def test_changes_on_a_copy_of_the_project_fail_the_check(tmp_path, capsys):
    """Baselines from one cell run with the code as it is, then the same sweep on two copies of the
    project. (1) The loss code changed (the focal penalty's offset, not a config key: the hash stays):
    the check fails as a difference, naming table, cell, metric, expected and got. (2) The default α
    moved in base.yaml: the check fails as "config changed"."""
    _tiny_sweep(tmp_path, REPO, tmp_path / "orig")
    base = ["--profile", "smoke", "--tables", "table3", "--baselines", str(tmp_path / "baselines.json")]
    assert check_main(["--results", str(tmp_path / "orig"), "--update", *base]) == 0
    assert check_main(["--results", str(tmp_path / "orig"), *base]) == 0

    code = _changed_copy(tmp_path / "code", "ehin/losses.py", "FOCAL_POWER, FOCAL_OFFSET = 3, 0.01",
                         "FOCAL_POWER, FOCAL_OFFSET = 3, 0.02")
    _tiny_sweep(tmp_path, code, tmp_path / "code-changed")
    hashes = {r["config_hash"] for d in ("orig", "code-changed") for r in ResultStore(tmp_path / d).read()}
    assert len(hashes) == 1  # the same config: only the code differs
    capsys.readouterr()
    rc = check_main(["--results", str(tmp_path / "code-changed"), *base])
    out = capsys.readouterr().out
    assert rc == 1 and "config changed" not in out
    failing = [line for line in out.splitlines() if "FAIL" in line]
    assert failing and all(line.startswith("table3") and " 2 " in line and "differs" in line for line in failing)
    for word in ("table", "cell", "metric", "expected", "got", "tol"):
        assert word in out.splitlines()[0]

    config = _changed_copy(tmp_path / "config", "ehin/configs/base.yaml", "  alpha: 0.1 ", "  alpha: 0.9 ")
    _tiny_sweep(tmp_path, config, tmp_path / "config-changed")
    capsys.readouterr()
    assert check_main(["--results", str(tmp_path / "config-changed"), *base]) == 1
    out = capsys.readouterr().out
    assert "table3" in out and "config changed" in out


def test_claims_on_hand_made_results():
    sweep = load_sweep("table3")
    records = []
    for seed in range(3):
        for row, iou in (("1", 20.0), ("2", 25.0), ("3", 22.0), ("4", 21.0)):
            records.append(rec("table3", row, seed, {m: iou + seed * 0.5 for m in
                                                     ("iou", "overall_iou", "point_box", "point_mask", "box_acc")}))
    claim = next(c for c in sweep.claims if c["id"] == "two_layers_best")
    (res,) = evaluate_claim(sweep, claim, records)
    assert res["status"] == "holds"
    assert res["margin"] == pytest.approx(3.0)          # 2 layers vs the best rival (3 layers)
    assert res["significant"]                           # SE of the diff: sqrt(2 * 0.25 / 3) ~ 0.41
    records = [r for r in records if not (r["row"] == "3")] + [
        rec("table3", "3", s, {m: 30.0 for m in ("iou", "overall_iou", "point_box", "point_mask", "box_acc")})
        for s in range(3)]
    (res,) = evaluate_claim(sweep, claim, records)
    assert res["status"] == "does not hold" and res["margin"] < 0


def test_claims_report_is_written(tmp_path):
    store = ResultStore(tmp_path / "res")
    for seed in range(2):
        for row in ("1", "2", "3", "4"):
            store.append(declared("table3", row, seed, {m: 10.0 + int(row) for m in
                                                        ("iou", "overall_iou", "point_box", "point_mask", "box_acc")}))
    assert check_main(["--claims", "--profile", "synthetic", "--results", str(tmp_path / "res"),
                       "--reports", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "claims" / "synthetic.md").read_text()
    assert "two BP layers beat 1, 3 and 4 on IoU" in md and "does not hold" in md
    assert (tmp_path / "rep" / "claims" / "synthetic.html").exists()
    # the same rows as JSON (docs/findings.md reads them): strict JSON, a missing noise as null
    data = json.loads((tmp_path / "rep" / "claims" / "synthetic.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    (bp,) = [r for r in data["claims"] if r["text"] == "two BP layers beat 1, 3 and 4 on IoU"]
    assert bp["status"] == "does not hold" and bp["margin"] == pytest.approx(-2.0) and data["profile"] == "synthetic"
    assert any(r["status"] == "no results" for r in data["claims"])  # the other tables' claims


def test_claims_show_small_margins_in_seconds_not_as_zero(tmp_path):
    """Table 10's claim compares seconds per sample: a margin of 4 ms must not read +0.00."""
    store = ResultStore(tmp_path / "res")
    for seed in range(3):
        for row, s in (("TRIS", 0.016), ("EHIN", 0.020)):
            store.append(declared("table10", row, seed, {"seconds_per_sample": s + 0.001 * seed}))
    assert check_main(["--claims", "--profile", "synthetic", "--results", str(tmp_path / "res"),
                       "--reports", str(tmp_path / "rep")]) == 0
    line = next(x for x in (tmp_path / "rep" / "claims" / "synthetic.md").read_text().splitlines()
                if x.startswith("| table10 "))
    assert "| -0.004 |" in line and "does not hold" in line  # EHIN 4 ms slower: below TRIS's time fails


def test_claims_judge_only_the_declared_config(tmp_path):
    """As the rendered table: records of another config (a --set run, the profile before it changed) are
    not the claim's, even when they are the only ones or the newest."""
    store = ResultStore(tmp_path / "res")
    for seed in range(3):
        store.append(declared("table10", "TRIS", seed, {"seconds_per_sample": 0.030}))
        store.append(declared("table10", "EHIN", seed, {"seconds_per_sample": 0.020}))
        store.append(rec("table10", "EHIN", seed, {"seconds_per_sample": 0.040}, h="other", profile="synthetic"))
    args = ["--claims", "--profile", "synthetic", "--results", str(tmp_path / "res"), "--reports", str(tmp_path / "rep")]
    assert check_main(args) == 0
    md = (tmp_path / "rep" / "claims" / "synthetic.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| table10 "))
    assert "| +0.01 |" in line and "| holds |" in line  # the newest EHIN records (0.040) are another config's
    for seed in (3, 4):  # beyond the synthetic profile's 3 seeds: judged only when --seeds asks for them
        store.append(declared("table10", "TRIS", seed, {"seconds_per_sample": 0.010}))
        store.append(declared("table10", "EHIN", seed, {"seconds_per_sample": 0.050}))
    assert check_main(args) == 0
    md = (tmp_path / "rep" / "claims" / "synthetic.md").read_text()
    assert "| holds |" in next(x for x in md.splitlines() if x.startswith("| table10 "))
    assert check_main([*args, "--seeds", "5"]) == 0
    md = (tmp_path / "rep" / "claims" / "synthetic.md").read_text()
    assert "| does not hold |" in next(x for x in md.splitlines() if x.startswith("| table10 "))
    other = ResultStore(tmp_path / "only-other")
    for seed in range(3):
        for row in ("TRIS", "EHIN"):
            other.append(rec("table10", row, seed, {"seconds_per_sample": 0.02}, h="other", profile="synthetic"))
    assert check_main([*args[:4], str(tmp_path / "only-other"), *args[5:]]) == 0
    md = (tmp_path / "rep" / "claims" / "synthetic.md").read_text()
    assert "no results" in next(x for x in md.splitlines() if x.startswith("| table10 "))


def test_environment_is_recorded_and_differences_are_named(tmp_path):
    from bench.check import environment_notes

    env = {"numerics": "portable", "torch": "2.13.0+cpu", "threads": 2, "cpu_model": "A"}
    base, same, other = (ResultStore(tmp_path / n) for n in ("base", "same", "other"))
    base.append({**rec("table5", "fg", 0, {"iou": 20.0}), **env})
    same.append({**rec("table5", "fg", 0, {"iou": 20.0}), **env})
    other.append({**rec("table5", "fg", 0, {"iou": 20.0}), **env, "numerics": "native"})
    cpu = ResultStore(tmp_path / "cpu")
    cpu.append({**rec("table5", "fg", 0, {"iou": 20.0}), **env, "cpu_model": "B"})  # another CPU, portable
    b = build_baselines(base, "smoke", ["table5"], None)
    assert b["environment"]["numerics"] == ["portable"]
    assert environment_notes(same, b) == []
    (note,) = environment_notes(cpu, b)
    assert "portable numerics on another CPU (baseline A; this run B)" in note
    notes = environment_notes(other, b)
    assert len(notes) == 1 and "numerics: baseline portable; this run native" in notes[0]


def test_committed_smoke_baselines_match_the_current_smoke_cells(tmp_path):
    """CI compares a fresh smoke run with reports/baselines/smoke.json; a config change that moves a
    cell's hash (a new config key, say) must re-key or regenerate the baselines in the same commit."""
    from bench.run import build_specs
    from bench.sweeps import load_sweep

    baselines = json.loads((Path(__file__).parent.parent / "reports" / "baselines" / "smoke.json").read_text())
    for table, rows in baselines["tables"].items():
        specs = {s.row: s.config_hash for s in build_specs(load_sweep(table), "smoke", 1, tmp_path)}
        assert {row: entry["config_hash"] for row, entry in rows.items()} == {row: specs[row] for row in rows}


def test_stage1_cells_ignore_stage2_settings(tmp_path):
    from bench.run import build_specs
    from bench.sweeps import load_sweep

    sweep = load_sweep("table5")
    plain = build_specs(sweep, "smoke", 1, tmp_path, rows=["bg+fg+cl"])[0]
    moved = build_specs(sweep, "smoke", 1, tmp_path, rows=["bg+fg+cl"],
                        extra_overrides={"stage2.lr": 0.5, "pseudo.random_walk": False})[0]
    other = build_specs(sweep, "smoke", 1, tmp_path, rows=["bg+fg+cl"], extra_overrides={"model.alpha": 0.2})[0]
    assert plain.config_hash == moved.config_hash != other.config_hash


def test_a_missing_results_folder_is_one_error(tmp_path, capsys):
    """Not one 'missing from the results store' failure per baseline cell (issue 18)."""
    for extra in ([], ["--claims"], ["--update", "--baselines", str(tmp_path / "b.json")]):
        with pytest.raises(SystemExit) as exc:
            check_main(["--profile", "smoke", "--results", str(tmp_path / "nope"), *extra])
        assert exc.value.code == 2
        out, err = capsys.readouterr()
        assert f"--results {tmp_path / 'nope'}: no such folder" in err
        assert "missing from the results store" not in out + err and len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "b.json").exists()


def test_rows_checks_only_the_cells_named(tmp_path, capsys):
    """CI checks two cells of a table (.ci/run): --rows leaves the others out instead of reporting
    them missing, still fails a named cell that drifted, and refuses a cell the baseline lacks."""
    base, now = ResultStore(tmp_path / "base"), ResultStore(tmp_path / "now")
    for row, v in (("EHIN", 30.0), ("EHIN without HIPM", 20.0), ("EHIN without ECLM", 10.0)):
        base.append(rec("table6", row, 0, {"point_mask": v}))
    now.append(rec("table6", "EHIN", 0, {"point_mask": 30.0}))
    now.append(rec("table6", "EHIN without ECLM", 0, {"point_mask": 14.0}))
    path = tmp_path / "smoke.json"
    path.write_text(json.dumps(build_baselines(base, "smoke", ["table6"], None)))
    args = ["--tables", "table6", "--results", str(tmp_path / "now"), "--baselines", str(path)]
    assert check_main(args + ["--rows", "EHIN"]) == 0
    assert "1 of 1 checks pass" in capsys.readouterr().out
    assert check_main(args + ["--rows", "EHIN,EHIN without ECLM"]) == 1
    assert "EHIN without ECLM" in capsys.readouterr().out
    assert check_main(args) == 1                             # every cell: one is missing
    assert "missing from the results store" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        check_main(args + ["--rows", "EHIN with both"])
    assert "no cell 'EHIN with both'" in capsys.readouterr().err
