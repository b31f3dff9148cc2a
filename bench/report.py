"""Write reports/index.html: every rendered table and plot, with where each number came from, and the
README's results summary (between its `results:begin` / `results:end` markers) from the same files.

    python -m bench.report [--reports reports] [--readme README.md]

It links what `bench.run` rendered (reports/<table>/ for the synthetic profile,
reports/<profile>/<table>/ for the others), the claims reports of `bench.check --claims`, and the
GPU performance JSON under reports/perf/. Each table's line names its profile, data, code version
and hardware, read from the table's cells.json.
"""
from __future__ import annotations

import argparse
import html
import json
import time
from pathlib import Path

from ehin.cli import UserError, command


def _tables(reports: Path) -> list[tuple[Path, dict]]:
    found = []
    for cells in sorted(reports.glob("**/cells.json")):
        try:
            info = json.loads(cells.read_text())["header"]
        except (OSError, json.JSONDecodeError, KeyError):
            continue
        found.append((cells.parent, info))

    def order(item):
        folder, info = item
        name = info.get("table", folder.name)
        digits = "".join(c for c in name if c.isdigit())
        return (info.get("profile", ""), 0 if name.startswith("table") else 1, int(digits or 0), name)

    return sorted(found, key=order)


def _table_section(folder: Path, info: dict, reports: Path) -> str:
    rel = folder.relative_to(reports)
    links = " · ".join(f'<a href="{html.escape(str(rel / f))}">{f}</a>'
                       for f in ("table.html", "table.md", "table.tex") if (folder / f).exists())
    plots = sorted(folder.glob("*.png"))
    imgs = "".join(f'<a href="{html.escape(str(rel / p.name))}"><img src="{html.escape(str(rel / p.name))}" '
                   f'alt="{html.escape(p.stem)}"></a>' for p in plots)
    claims = folder / "claims.html"
    claims_link = f' · <a href="{html.escape(str(rel / "claims.html"))}">claims</a>' if claims.exists() else ""
    meta = [
        f"profile <b>{html.escape(str(info.get('profile')))}</b>, seeds {html.escape(str(info.get('seeds')))}",
        "data: " + html.escape("; ".join(info.get("datasets", []))),
        "code: " + html.escape(", ".join(info.get("code_versions", [])) or "-"),
        "evaluation: " + html.escape(", ".join(info.get("metrics_protocols", [])) or "-"),
        "hardware: " + html.escape(", ".join(info.get("hardware", [])) or "-"),
    ]
    return (f'<section><h2>{html.escape(info.get("title", folder.name))}</h2>'
            f'<p class="links">{links}{claims_link}</p><ul>' + "".join(f"<li>{m}</li>" for m in meta) +
            f'</ul><div class="plots">{imgs}</div></section>')


def _perf_section(reports: Path) -> str:
    items = []
    for path in sorted((reports / "perf").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        env = data.get("environment", {})
        device = env.get("gpu") or env.get("cpu") or data.get("device")
        items.append(f'<li><a href="{html.escape(str(path.relative_to(reports)))}">{html.escape(path.name)}</a>: '
                     f'{html.escape(str(device))}, torch {html.escape(str(env.get("torch")))}, size {data.get("size")}</li>')
    if not items:
        return ""
    return "<section><h2>Performance (bench.perf)</h2><ul>" + "".join(items) + "</ul></section>"


def write_index(reports: str | Path = "reports") -> Path:
    reports = Path(reports)
    reports.mkdir(parents=True, exist_ok=True)
    sections = [_table_section(folder, info, reports) for folder, info in _tables(reports)]
    claims = sorted(p for p in reports.glob("claims/*.html"))
    if claims:
        sections.insert(0, "<section><h2>The paper's claims</h2><ul>" + "".join(
            f'<li><a href="{html.escape(str(p.relative_to(reports)))}">{html.escape(p.stem)}</a></li>' for p in claims)
            + "</ul></section>")
    searches = sorted(reports.glob("search/*/summary.md"))
    if searches:
        sections.append("<section><h2>Hyper-parameter searches (bench.search)</h2><ul>" + "".join(
            f'<li><a href="{html.escape(str(p.relative_to(reports)))}">{html.escape(p.parent.name)}</a> · '
            f'<a href="{html.escape(str((p.parent / "history.png").relative_to(reports)))}">history</a> · '
            f'<a href="{html.escape(str((p.parent / "importances.png").relative_to(reports)))}">importances</a></li>'
            for p in searches) + "</ul></section>")
    perf = _perf_section(reports)
    if perf:
        sections.append(perf)
    if not sections:
        sections = ["<p>Nothing rendered yet: run <code>python -m bench.run table5</code>.</p>"]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ehin-bench reports</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
section {{ border-top: 1px solid #ddd; padding: 0.5em 0 1em; }}
h2 {{ font-size: 1.15em; margin-bottom: 0.2em; }}
ul {{ margin: 0.3em 0; color: #444; font-size: 0.9em; }}
.plots img {{ max-height: 240px; margin: 4px; border: 1px solid #eee; }}
.links a {{ margin-right: 0.3em; }}
</style></head><body>
<h1>ehin-bench: reproduced tables</h1>
<p>Reproduced numbers beside the EHIN paper's. Synthetic-profile numbers come from synthetic referring
datasets and a small self-pretrained CLIP, so they test the method's mechanics, not its RefCOCO scores.
Generated {time.strftime('%Y-%m-%d %H:%M')} by <code>python -m bench.report</code>.</p>
{''.join(sections)}
</body></html>
"""
    out = reports / "index.html"
    out.write_text(page)
    return out


README_BEGIN, README_END = "<!-- results:begin (python -m bench.report) -->", "<!-- results:end -->"
SUMMARY_COLUMNS = ("PointM", "IoU", "mIoU", "BoxAcc")


def results_summary(reports: str | Path = "reports") -> str:
    """Markdown: per rendered table, its provenance and each row's mean ± std of the paper's main
    columns, read from the committed cells.json (no number typed by hand)."""
    reports = Path(reports)
    parts = []
    # The README's main job (the synthetic profile) first, then the others in _tables' order.
    for folder, info in sorted(_tables(reports), key=lambda t: t[1].get("profile") != "synthetic"):
        data = json.loads((folder / "cells.json").read_text())
        metric_of = data.get("metrics", {})
        cells = {(c["row"], c["metric"]): c for c in data.get("cells", [])}
        rows = list(dict.fromkeys(c["row"] for c in data.get("cells", [])))
        cols = [c for c in SUMMARY_COLUMNS if c in metric_of]

        def cell(row: str, col: str) -> str:
            c = cells.get((row, metric_of[col]))
            if not c or c.get("mean") is None:
                return "–"
            return f"{c['mean']:.1f} ± {c['std']:.1f}" if c.get("std") is not None and c.get("n", 0) > 1 \
                else f"{c['mean']:.1f}"

        rel = folder.relative_to(reports)
        parts.append(
            f"**{info.get('title', folder.name)}** (`reports/{rel}/`; profile {info.get('profile')}, seeds "
            f"{', '.join(map(str, info.get('seeds', [])))}; code {', '.join(info.get('code_versions', []))}; "
            f"evaluation {', '.join(info.get('metrics_protocols', [])) or 'pre-tris'})\n\n"
            + "| row | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols) + "\n"
            + "".join(f"| {r} | " + " | ".join(cell(r, c) for c in cols) + " |\n" for r in rows))
    return "\n".join(parts) if parts else "Nothing rendered yet: run `python -m bench.run table5`.\n"


def update_readme(readme: str | Path, reports: str | Path = "reports") -> bool:
    """Rewrite the block between the README's markers; True when it changed."""
    readme = Path(readme)
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise UserError(f"{readme}: no results markers ({README_BEGIN} ... {README_END})")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_BEGIN}\n{results_summary(reports)}{README_END}{tail}"
    readme.write_text(new)
    return new != text


@command
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reports", default="reports", help="the reports folder to index (default: reports)")
    p.add_argument("--readme", help="also rewrite this README's results block (README.md in the repository)")
    args = p.parse_args(argv)
    print(f"wrote {write_index(args.reports)}")
    if args.readme:
        print(f"{args.readme}: results block {'updated' if update_readme(args.readme, args.reports) else 'unchanged'}")


if __name__ == "__main__":
    main()
