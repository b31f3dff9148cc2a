"""docs/findings.md is written from the committed records (bench.findings) and kept current."""
import json
import shutil
from pathlib import Path

from bench.findings import FINDINGS, findings, main

ROOT = Path(__file__).resolve().parents[1]


def test_findings_file_is_what_the_records_give():
    assert (ROOT / FINDINGS).read_text() == findings(ROOT / "reports", ROOT), \
        "docs/findings.md is stale: run python -m bench.findings"


VARIANTS = ("refcoco", "refcoco+", "refcocog (google)", "refcocog (umd)", "referit")


def _control(margins, seeds=3, variants=VARIANTS, **extra):
    return {"profile": "gpu", "overrides": {"synthetic.size": 128}, "power": {"seeds": seeds, "pooled_std": 2.5},
            "environment": {"device": "NVIDIA H200", "code_version": "abc"},
            "variants": [{"variant": name, "margin": m} for name, m in zip(variants, margins)], **extra}


def test_each_section_reads_its_records(tmp_path):
    reports = tmp_path / "reports"
    (reports / "testbed").mkdir(parents=True)
    (reports / "perf").mkdir()
    (reports / "testbed" / "control-x.json").write_text(json.dumps(_control([13.0, 30.0, 4.0, 2.6, -0.5])))
    cut = _control([13.0, 30.0, 4.0, 2.6, -0.5], seeds=10)  # a sitting cut short: the seeds stored, not those asked
    for r, n in zip(cut["variants"], (10, 7, 10, 10, 10)):
        r.update(seeds_run=n, seeds_declared=10)
    (reports / "testbed" / "control-w.json").write_text(json.dumps(cut))
    # A pilot of two variants, rerun in bf16: its margins go under their own variants' columns, its pooled std
    # (over two variants, not TESTBED's) is left out, and the paired rerun gets its own table.
    pilot = _control([35.3, 18.1], seeds=10, variants=("refcoco+", "referit"), rows=["refcoco+", "referit"],
                     rerun_overrides={"train.amp": True})
    pilot["variants"][0].update(std=6.39, run_to_run={"cells": 10, "mean_abs": 5.6, "max_abs": 16.94,
                                                      "mean_diff": -1.96, "within_seed_std": True})
    (reports / "testbed" / "control-y.json").write_text(json.dumps(pilot))
    (reports / "testbed" / "scenes-x.json").write_text(json.dumps([{
        "dataset": "synth-refcoco", "split_by": "unc", "size": 128, "map_size": [16, 16], "pointable_share": 0.999,
        "language_blind_expected": 14.1, "category_aware_pointm": 27.3, "location_blind_pointm": 50.8}]))
    (reports / "testbed" / "scorer-x.json").write_text(json.dumps([{
        "dataset": "synth-refcoco", "split_by": "unc", "scorer": "clip.pt", "scenes": "cluttered", "size": 128,
        "isolated_rec": 48.6, "random_object_rate": 0.141, "isolated_rec_ratio": 3.45, "isolation_gain": 12.0,
        "clutter_share": 0.3, "same_category_share": 0.9, "median_objects": 7, "occluded_share": 0.5,
        "distractor_size_ratio": 1.0}]))
    (reports / "perf" / "h200.json").write_text(json.dumps({
        "size": "paper", "levers": {"amp": True, "cuda_graph": False}, "environment": {"gpu": "NVIDIA H200"},
        "results": {"ehin": {"stage1_train": {"images_per_s": 209.09, "peak_mem_gb": 7.36},
                             "stage1_infer": {"forward_ms_bs1": 2.311, "images_per_s_bs64": 3607.4}}}}))
    (reports / "testbed" / "fidelity.json").write_text(json.dumps({
        "profile": "gpu", "overrides": {}, "rows": "rows.json", "control": "ctl", "pooled_std": None, "all_met": False,
        "frozen": {"checkpoints": [{"file": "clip.pt", "sha256": "ab"}], "datasets": {"synth-refcoco:unc": "cd"}},
        "variants": {"synth-refcoco": {"isolated_rec_ratio": 3.37, "isolation_gain": 12.06, "language_blind": 14.8,
                                       "tris_like_mean": 25.75, "tris_like_std": 2.3, "tris_like_seeds": [25.0] * 10,
                                       "run_to_run": None, "met": {"scenes": True, "scorer": True, "control": False,
                                                                   "power": True}}}}))
    text = findings(reports, tmp_path)
    assert "| synth-refcoco | yes | 3.37 | +12.1 | yes | 14.8 | 25.8 | 2.3 | 10 | no | yes | — |" in text
    assert "`clip.pt` ab; synth-refcoco:unc cd." in text
    assert ("| `reports/testbed/control-x.json` | gpu: synthetic.size=128 | 3 | NVIDIA H200, code abc | "
            "+13.0 | +30.0 | +4.0 | +2.6 | -0.5 | 2.50 |") in text
    assert "| `reports/testbed/control-w.json` | gpu: synthetic.size=128 | 7–10 of 10 | NVIDIA H200, code abc |" in text
    assert ("| `reports/testbed/control-y.json` | gpu: synthetic.size=128; rerun with train.amp=True (pilot: refcoco+, "
            "referit) | 10 | NVIDIA H200, code abc | — | +35.3 | — | — | +18.1 | — |") in text
    assert "| `reports/testbed/control-y.json` | train.amp=True | refcoco+ | 10 | -1.96 | 5.60 | 16.94 | 6.39 | yes |" in text
    assert "| `reports/testbed/scenes-x.json` | synth-refcoco (unc) | 128 px | 16×16 | 99.9 % | 14.1 | 27.3 | 50.8 |" in text
    assert "| `reports/perf/h200.json` | paper | NVIDIA H200 | amp | ehin | 209.1 | 7.4 | 2.31 | 3607 | — |" in text
    assert ("| `reports/testbed/scorer-x.json` | `clip.pt` | cluttered, 128 px | synth-refcoco (unc) | 48.6 | 14.1 | "
            "3.45 | +12.0 | yes |") in text
    assert "Nothing rendered yet" in text                       # no paper table in this reports folder


def test_check_says_when_the_file_is_stale(tmp_path, capsys):
    out = tmp_path / "findings.md"
    out.write_text("old\n")
    assert main(["--reports", str(ROOT / "reports"), "--out", str(out), "--check"]) == 1
    assert "stale" in capsys.readouterr().out
    assert main(["--reports", str(ROOT / "reports"), "--out", str(out)]) == 0
    assert main(["--reports", str(ROOT / "reports"), "--out", str(out), "--check"]) == 0


def test_rendering_into_the_project_reports_refreshes_its_views(tmp_path):
    """bench.run.refresh_views (run after a table is rendered into the project's reports/): the
    README's results block, docs/findings.md and the index are rewritten from that folder, so the
    README's main job followed by its tests finds them current."""
    from bench.report import README_BEGIN, README_END, results_summary
    from bench.run import refresh_views

    reports = tmp_path / "reports"
    shutil.copytree(ROOT / "reports" / "table5", reports / "table5")
    (tmp_path / "README.md").write_text(f"# x\n{README_BEGIN}\nstale\n{README_END}\ntail\n")
    refresh_views(reports)
    block = (tmp_path / "README.md").read_text().split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    assert block == "\n" + results_summary(reports) and "Table 5" in block
    assert (tmp_path / FINDINGS).read_text() == findings(reports, tmp_path)
    assert (reports / "index.html").is_file()


def test_claims_section_says_how_far_each_verdict_is_from_noise(tmp_path):
    """Per profile, from reports/claims/<profile>.json: judged pairs listed with margin / SE and the error's
    degrees of freedom, the verdict as bench.check judged it; pairs without results counted; a report without
    JSON named."""
    claims = tmp_path / "reports" / "claims"
    claims.mkdir(parents=True)
    rows = [{"table": "table6", "text": "HIPM helps", "metric": "point_mask", "compared": "EHIN vs w/o HIPM",
             "margin": 3.0, "noise": 1.0, "noise_df": 6.2, "test": "paired (100 expressions x 5 seeds)", "status": "holds",
             "significant": True},
            {"table": "table5", "text": "full loss best", "metric": "iou", "compared": "all vs fg", "margin": -0.5,
             "noise": 1.0, "noise_df": 1.0, "test": "seeds", "status": "does not hold", "significant": False},
            {"table": "table9", "text": "K=6 best", "metric": "iou", "margin": 1.2, "noise": None, "test": "seeds",
             "status": "holds"},
            {"table": "table2", "text": "EHIN beats TRIS", "metric": "iou", "status": "no results"}]
    (claims / "gpu.json").write_text(json.dumps({"profile": "gpu", "store": "reports/gpu/store", "claims": rows}))
    (claims / "smoke.md").write_text("# old\n")
    text = findings(tmp_path / "reports", tmp_path)
    assert ("**gpu** (`reports/claims/gpu.json`, from `reports/gpu/store`): 2 of 3 judged pairs hold, 1 of them "
            "beyond noise; 1 do not, 0 of them beyond noise; 1 without results.") in text
    assert ("| table6 | HIPM helps | point_mask | EHIN vs w/o HIPM | +3.00 | 1.00 | 6.2 | +3.0 | paired (100 expressions x 5 "
            "seeds) | holds, beyond noise |") in text
    assert "| table5 | full loss best | iou | all vs fg | -0.50 | 1.00 | 1.0 | -0.5 | seeds | does not hold, within noise |" in text
    assert "| table9 | K=6 best | iou | — | +1.20 | — | — | — | seeds | holds, noise unknown (one seed) |" in text
    assert "EHIN beats TRIS" not in text and "`reports/claims/smoke.md`" in text
    assert "## What this testbed cannot show" in text


def test_claims_incomplete_zero_noise_and_one_seed_are_shown_as_they_are(tmp_path):
    """Review, session 41: a profile whose claims were all incomplete read 'no pair judged yet (N without
    results)' and listed none; a noise of exactly 0 showed as unknown; one seed's df showed as 0.0."""
    claims = tmp_path / "reports" / "claims"
    claims.mkdir(parents=True)
    rows = [{"table": "table5", "text": "full loss best", "metric": "iou", "compared": "all vs fg (1 of 5 pairs hold)",
             "margin": 10.0, "noise": 1.0, "noise_df": 8.0, "test": "seeds", "status": "incomplete"},
            {"table": "table5", "text": "cl collapses", "metric": "iou", "compared": "cl vs 1.0", "margin": 1.5,
             "noise": 0.0, "noise_df": 4, "test": "seeds (std)", "status": "holds", "significant": True},
            {"table": "table5", "text": "cl collapses", "metric": "point_mask", "compared": "cl vs 1.0", "margin": 1.5,
             "noise": float("nan"), "noise_df": 0, "test": "seeds (std)", "status": "holds", "significant": None}]
    (claims / "gpu.json").write_text(json.dumps({"profile": "gpu", "store": "s", "claims": rows[:1]}))
    text = findings(tmp_path / "reports", tmp_path)
    assert "1 incomplete; 0 without results." in text and "| +10.00 | 1.00 | 8.0 | +10.0 | seeds | incomplete |" in text
    (claims / "gpu.json").write_text(json.dumps({"profile": "gpu", "store": "s", "claims": rows[1:]}))
    text = findings(tmp_path / "reports", tmp_path)
    assert "| cl vs 1.0 | +1.50 | 0.00 | 4.0 | +∞ | seeds (std) | holds, beyond noise |" in text
    assert "| cl vs 1.0 | +1.50 | — | — | — | seeds (std) | holds, noise unknown (one seed) |" in text


def test_what_the_testbed_cannot_show_names_the_sizes_the_configs_give():
    from bench.sweeps import load_sweep
    from ehin.config import load_config

    text = findings()
    assert f"synthetic shapes at {load_config(profile='gpu')['data']['image_size']} px" in text
    assert f"small model at {load_sweep('table10').base['data.image_size']} px" in text
