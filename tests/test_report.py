"""reports/index.html (python -m bench.report, issue 19): one section per (profile, sweep) with a
distinct title, the table's provenance and numbers inline, "not run yet: <command>" for a sweep
without results; and tables and plots redrawn from cells.json alone (--rerender)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from bench.plots import write_plots
from bench.render import write_tables
from bench.report import rerender, write_index
from bench.sweeps import list_sweeps
from tests.test_render import sweep, table5_records


def _reports(tmp_path: Path) -> Path:
    """table5 rendered for the synthetic profile (reports/table5/) and for smoke (reports/smoke/table5/)."""
    reports = tmp_path / "reports"
    recs = table5_records()
    write_tables(sweep("table5"), recs, reports / "table5", seeds=[0, 1])
    smoke = [{**r, "profile": "smoke"} for r in recs if r["seed"] == 0]
    write_tables(sweep("table5"), smoke, reports / "smoke" / "table5", seeds=[0])
    return reports


def test_index_sections_have_distinct_titles_provenance_and_numbers(tmp_path):
    reports = _reports(tmp_path)
    page = write_index(reports).read_text()
    headings = re.findall(r"<h[23][^>]*>(.*?)</h[23]>", page)
    assert len(headings) == len(set(headings)), "repeated section titles"
    assert "Table 5: loss components (RefCOCO+ val) [synthetic]" in headings
    assert "Table 5: loss components (RefCOCO+ val) [smoke]" in headings
    # Every sweep of every profile shown has a section, rendered or not.
    for profile in ("synthetic", "smoke"):
        for name in list_sweeps():
            assert f'id="{profile}-{name}"' in page
    for line in ("profile: synthetic; seeds: 0, 1", "profile: smoke; seeds: 0", "code: abc1234567",
                 "configs: 0123456789ab", "evaluation: ", "dataset: ", "config hashes by row"):
        assert line in page, line
    # The numbers themselves, in a box that scrolls sideways.
    assert "<div class=\"scroll\"><table>" in page and "<td class='name'>bg+fg+cl</td>" in page
    assert "overflow-x: auto" in page and "width: 100%" in page


def test_a_sweep_without_results_says_not_run_yet_with_its_command(tmp_path):
    page = write_index(_reports(tmp_path)).read_text()
    assert "not run yet: <code>python -m bench.run table8</code>" in page
    assert "not run yet: <code>python -m bench.run table8 --profile smoke</code>" in page
    assert "python -m bench.run table5</code>" not in page  # rendered for synthetic: no such line


def test_rerender_from_cells_json_matches_the_store_render(tmp_path):
    """--rerender redraws table.md/.tex/.html and the plots from cells.json (the store is not committed)."""
    reports = tmp_path / "reports"
    folder = reports / "table5"
    write_tables(sweep("table5"), table5_records(), folder, seeds=[0, 1])
    write_plots(sweep("table5"), table5_records(), folder)
    before = {f: (folder / f).read_text() for f in ("table.md", "table.tex", "table.html")}
    values = json.loads((folder / "cells.json").read_text())["values"]
    assert {"row": "bg+fg+cl", "seed": 1, "metric": "iou", "value": 2.0} in values  # per-seed, for the plots
    (folder / "table5_bars.png").unlink()
    assert rerender(reports) == [folder]
    assert {f: (folder / f).read_text() for f in before} == before
    assert (folder / "table5_bars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_diagnostic_rendering_does_not_replace_the_profiles_table_in_the_index(tmp_path):
    """reports/testbed/diag/table5/ (a `--set` run of the same table and profile) sorts after reports/table5/;
    the section still shows reports/table5/'s numbers, and links the diagnostic under them."""
    reports = _reports(tmp_path)
    diag = reports / "testbed" / "diag" / "table5"
    write_tables(sweep("table5"), [{**r, "metrics": {k: v + 50 for k, v in r["metrics"].items()}}
                                   for r in table5_records()], diag, seeds=[0, 1])
    cells = json.loads((diag / "cells.json").read_text())
    cells["header"]["set"] = {"data.dataset": "synth-refcoco"}
    (diag / "cells.json").write_text(json.dumps(cells))
    page = write_index(reports).read_text()
    section = page.split('id="synthetic-table5"')[1].split("</section>")[0]
    assert '<a href="table5/table.html">' in section and "run with" not in section
    assert 'also rendered from other stores: <a href="testbed/diag/table5/table.html">testbed/diag/table5</a>' in section
    assert page.count("also rendered from other stores") == 1     # the smoke section has one rendering


def test_the_results_summary_says_when_a_row_has_fewer_seeds_than_its_heading(tmp_path):
    """Review, session 41: a row of 1 of 2 seeds read like a complete one (table.md marks it partial)."""
    from bench.report import results_summary

    reports = tmp_path / "reports"
    recs = [r for r in table5_records() if not (r["row"] == "fg" and r["seed"] == 1)]
    write_tables(sweep("table5"), recs, reports / "table5", seeds=[0, 1])
    text = results_summary(reports)
    fg = next(line for line in text.splitlines() if line.startswith("| fg |"))
    full = next(line for line in text.splitlines() if line.startswith("| bg+fg+cl |"))
    assert "(1 of 2 seeds)" in fg and "seeds)" not in full


def test_the_results_summary_names_tables_rendered_without_results(tmp_path):
    from bench.report import results_summary

    reports = _reports(tmp_path)
    write_tables(sweep("table3"), [], reports / "table3")  # bench.run --render-only before any cell ran
    text = results_summary(reports)
    assert "Rendered with no results yet: Table 3" in text and "(`reports/table3/`)." in text
    assert "Rendered with no results yet" not in results_summary(_reports(tmp_path / "b"))
