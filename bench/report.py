"""Write reports/index.html: every rendered table and plot, with where each number came from, and the
README's results summary (between its `results:begin` / `results:end` markers) from the same files.

    python -m bench.report [--reports reports] [--readme README.md]

It links what `bench.run` rendered (reports/<table>/ for the synthetic profile,
reports/<profile>/<table>/ for the others), the claims reports of `bench.check --claims`, and the
GPU performance JSON under reports/perf/. Per profile shown (synthetic, and every profile with a
rendered table) it lists every sweep in sweeps/*.yaml: a rendered one with its provenance (profile,
seeds, data, code version, config hashes, evaluation protocol, hardware: the header of its cells.json),
the table itself and its plots; one without results as "not run yet: <command>".

    python -m bench.report --rerender   # first redraw tables and plots from each cells.json
"""
from __future__ import annotations

import html
import json
import re
import time
from collections import Counter
from pathlib import Path

from bench.render import header_lines, rewrite_tables, set_flags
from bench.sweeps import list_sweeps, load_sweep
from ehin.cli import command, command_parser, UserError


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


def _table_section(folder: Path, info: dict, reports: Path, heading: str, anchor: str,
                   others: list[Path] = ()) -> str:
    """A rendered table: its files, where its numbers came from, the table itself, its plots, and links to
    the other renderings of the same table and profile (`others`: diagnostics from other stores)."""
    rel = folder.relative_to(reports)
    files = [f for f in ("table.html", "table.md", "table.tex", "cells.json", "claims.html") if (folder / f).exists()]
    links = " · ".join(f'<a href="{_esc(rel / f)}">{f}</a>' for f in files)
    provenance = "".join(f"<li>{html.escape(line)}</li>" for line in header_lines(_complete(info)))
    hashes = info.get("config_hashes") or {}
    if hashes:  # one hash per row and seed: folded, as a table can list dozens
        provenance += ("<li><details><summary>config hashes by row</summary>" + "".join(
            f"<div><b>{html.escape(row)}</b>: {html.escape(', '.join(hs))}</div>" for row, hs in hashes.items())
            + "</details></li>")
    plots = "".join(f'<a href="{_esc(rel / p.name)}"><img src="{_esc(rel / p.name)}" alt="{_esc(p.stem)}"></a>'
                    for p in sorted(folder.glob("*.png")))
    also = ("<p class=\"links\">also rendered from other stores: " + " · ".join(
        f'<a href="{_esc(o.relative_to(reports) / "table.html")}">{html.escape(str(o.relative_to(reports)))}</a>'
        for o in others) + "</p>") if others else ""
    return (f'<section id="{anchor}"><h3>{html.escape(heading)}</h3><p class="links">{links}</p>'
            f'<ul class="provenance">{provenance}</ul>{_embedded_table(folder)}'
            f'<div class="plots">{plots}</div>{also}</section>')


def _not_run_section(heading: str, command: str, anchor: str) -> str:
    return (f'<section id="{anchor}" class="missing"><h3>{html.escape(heading)}</h3>'
            f'<p>not run yet: <code>{html.escape(command)}</code></p></section>')


def run_command(table: str, profile: str) -> str:
    """The command that renders `table` for `profile` (synthetic is bench.run's default)."""
    return f"python -m bench.run {table}" + ("" if profile == "synthetic" else f" --profile {profile}")


def _embedded_table(folder: Path) -> str:
    """The <table> of table.html, in a box that scrolls sideways: the numbers on the index itself,
    and an 18-column table never cut off at the page edge."""
    path = folder / "table.html"
    found = re.search(r"<table>.*?</table>", path.read_text(), re.S) if path.exists() else None
    return f'<div class="scroll">{found.group(0)}</div>' if found else ""


def _complete(info: dict) -> dict:
    # header_lines wants every header key; an older cells.json may lack a few.
    return {"seeds": [], "records": 0, "datasets": [], "code_versions": [], "hardware": [], **info}


def _esc(x: object) -> str:
    return html.escape(str(x))


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
    return "<section><h3>Performance (bench.perf)</h3><ul>" + "".join(items) + "</ul></section>"


def _profiles_shown(tables: list[tuple[Path, dict]]) -> list[str]:
    """synthetic (the default profile) first, then every other profile with a rendered table."""
    rendered = {str(info.get("profile")) for _, info in tables}
    return ["synthetic"] + sorted(rendered - {"synthetic"})


def _profile_sections(reports: Path, tables: list[tuple[Path, dict]]) -> tuple[list[str], list[str]]:
    """(sections, contents lines): per profile shown, every sweep in sweeps/*.yaml, rendered or with
    the command that would render it; then any rendered table no sweep declares any more."""
    # Several renderings of one (profile, table): the section shows the one run as its sweep declares it
    # (no --set) from the shallowest folder (reports/table5/ before reports/testbed/diag-*/table5/), and
    # links the others (diagnostics) under it.
    by_key: dict[tuple[str, str], list[tuple[Path, dict]]] = {}
    for folder, info in tables:
        by_key.setdefault((str(info.get("profile")), str(info.get("table", folder.name))), []).append((folder, info))
    for group in by_key.values():
        group.sort(key=lambda t: (bool(t[1].get("set")), len(t[0].relative_to(reports).parts), str(t[0])))
    rendered = {key: group[0] for key, group in by_key.items()}
    sections, contents = [], []
    for profile in _profiles_shown(tables):
        sections.append(f'<h2 id="{profile}">Profile: {html.escape(profile)}</h2>')
        links = []
        names = list_sweeps() + sorted(t for p, t in rendered if p == profile and t not in list_sweeps())
        for name in names:
            anchor = f"{profile}-{name}"
            title = _sweep_title(name, rendered.get((profile, name)))
            # The profile in every heading: the same table under two profiles is two distinct sections.
            heading = f"{title} [{profile}]"
            if (profile, name) in rendered:
                folder, info = rendered[(profile, name)]
                others = [f for f, _ in by_key[(profile, name)][1:]]
                sections.append(_table_section(folder, info, reports, heading, anchor, others))
                links.append(f'<a href="#{anchor}">{html.escape(name)}</a>')
            else:
                sections.append(_not_run_section(heading, run_command(name, profile), anchor))
                links.append(f'<a class="missing" href="#{anchor}">{html.escape(name)} (not run)</a>')
        contents.append(f'<li><a href="#{profile}">{html.escape(profile)}</a>: {" · ".join(links)}</li>')
    return sections, contents


def _sweep_title(name: str, rendered: tuple[Path, dict] | None) -> str:
    if rendered:
        return str(rendered[1].get("title", name))
    try:
        return load_sweep(name, validate=False).title
    except Exception:  # a broken sweep file still gets its line in the index
        return name


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h2 { font-size: 1.4em; margin-top: 1.5em; border-bottom: 2px solid #999; }
h3 { font-size: 1.15em; margin-bottom: 0.2em; }
section { border-top: 1px solid #ddd; padding: 0.5em 0 1em; }
section.missing p { color: #8a6d00; }
ul { margin: 0.3em 0; color: #444; font-size: 0.9em; }
ul.provenance details div { font-family: monospace; font-size: 0.9em; }
.contents a.missing { color: #8a6d00; }
/* Plots drawn for this width (bench/plots.py) and shrunk to it, never enlarged past their pixels. */
.plots img { display: block; max-width: 100%; height: auto; margin: 0.8em 0; border: 1px solid #eee; }
/* Wide tables scroll sideways inside their box instead of running off the page. */
.scroll { overflow-x: auto; max-width: 100%; margin: 0.6em 0; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { padding: 0.3em 0.6em; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; border-bottom: 2px solid #999; } td.name { text-align: left; font-weight: 600; }
/* The row name stays in view while a wide table scrolls. */
tr > :first-child { position: sticky; left: 0; background: #fff; } th:first-child { background: #f3f3f3; }
tr.pending td { color: #999; font-style: italic; } tr.partial td { color: #8a6d00; } tr.failed td { color: #b00020; }
.links a { margin-right: 0.3em; }
"""


def write_index(reports: str | Path = "reports") -> Path:
    reports = Path(reports)
    reports.mkdir(parents=True, exist_ok=True)
    sections, contents = _profile_sections(reports, _tables(reports))
    claims = sorted(p for p in reports.glob("claims/*.html"))
    if claims:
        sections.insert(0, '<h2 id="claims">The paper\'s claims</h2><ul>' + "".join(
            f'<li><a href="{_esc(p.relative_to(reports))}">{_esc(p.stem)}</a></li>' for p in claims) + "</ul>")
    others = []
    searches = sorted(reports.glob("search/*/summary.md"))
    if searches:
        others.append("<section><h3>Hyper-parameter searches (bench.search)</h3><ul>" + "".join(
            f'<li><a href="{_esc(p.relative_to(reports))}">{_esc(p.parent.name)}</a> · '
            f'<a href="{_esc((p.parent / "history.png").relative_to(reports))}">history</a> · '
            f'<a href="{_esc((p.parent / "importances.png").relative_to(reports))}">importances</a></li>'
            for p in searches) + "</ul></section>")
    perf = _perf_section(reports)
    if perf:
        others.append(perf)
    if others:
        sections += ['<h2 id="other">Searches and performance</h2>', *others]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ehin-bench reports</title>
<style>{_CSS}</style></head><body>
<h1>ehin-bench: reproduced tables</h1>
<p>Reproduced numbers beside the EHIN paper's. Synthetic-profile numbers come from synthetic referring
datasets and a small self-pretrained CLIP, so they test the method's mechanics, not its RefCOCO scores.
Each table lists its profile, seeds, data, code version, config hashes, evaluation protocol and hardware,
read from its cells.json. Generated {time.strftime('%Y-%m-%d %H:%M')} by <code>python -m bench.report</code>.</p>
<ul class="contents">{''.join(contents)}</ul>
{''.join(sections)}
</body></html>
"""
    out = reports / "index.html"
    out.write_text(page)
    return out


def rerender(reports: str | Path = "reports") -> list[Path]:
    """Redraw every rendered table's table.md/.tex/.html and plots from its cells.json: how the
    committed reports follow a change in bench/render.py or bench/plots.py without the results store."""
    from bench.plots import replot

    done = []
    for folder, info in _tables(Path(reports)):
        sweep = load_sweep(str(info.get("table", folder.name)))
        rewrite_tables(sweep, folder)
        replot(sweep, folder)
        done.append(folder)
    return done


README_BEGIN, README_END = "<!-- results:begin (python -m bench.report) -->", "<!-- results:end -->"
SUMMARY_COLUMNS = ("PointM", "IoU", "mIoU", "BoxAcc")


def results_summary(reports: str | Path = "reports") -> str:
    """Markdown: per rendered table, its provenance and each row's mean ± std of the paper's main
    columns, read from the committed cells.json (no number typed by hand)."""
    reports = Path(reports)
    parts, empty = [], []
    # The README's main job (the synthetic profile) first, then the others in _tables' order.
    for folder, info in sorted(_tables(reports), key=lambda t: t[1].get("profile") != "synthetic"):
        data = json.loads((folder / "cells.json").read_text())
        if all(c.get("mean") is None for c in data.get("cells", [])):
            # rendered before any of its cells ran (bench.run --render-only): named below, nothing to summarise
            empty.append(f"{info.get('title', folder.name)} (`reports/{folder.relative_to(reports)}/`)")
            continue
        metric_of = data.get("metrics", {})
        cells = {(c["row"], c["metric"]): c for c in data.get("cells", [])}
        rows = list(dict.fromkeys(c["row"] for c in data.get("cells", [])))
        cols = [c for c in SUMMARY_COLUMNS if c in metric_of]
        d = 1
        if not cols:  # Table 10: its own columns (seconds), at its sweep's decimals
            cols, d = list(metric_of), load_sweep(info.get("table", folder.name)).decimals

        def cell(row: str, col: str) -> str:
            c = cells.get((row, metric_of[col]))
            if not c or c.get("mean") is None:
                return "–"
            text = f"{c['mean']:.{d}f} ± {c['std']:.{d}f}" if c.get("std") is not None and c.get("n", 0) > 1 \
                else f"{c['mean']:.{d}f}"
            # a cell short of the heading's seeds says so, as table.md's "partial" does
            short = c.get("n") is not None and c["n"] < len(info.get("seeds", []))
            return text + (f" ({c['n']} of {len(info['seeds'])} seeds)" if short else "")

        # rows with no result in any column are named under the table, not listed as lines of dashes (Table 2
        # fills its 40 rows over many sittings)
        unrun = [r for r in rows if all(cell(r, c) == "–" for c in cols)]
        rows = [r for r in rows if r not in unrun]
        rel = folder.relative_to(reports)
        parts.append(
            f"**{info.get('title', folder.name)}** (`reports/{rel}/`; profile {info.get('profile')}, seeds "
            f"{', '.join(map(str, info.get('seeds', [])))}; code {', '.join(info.get('code_versions', []))}; "
            f"evaluation {', '.join(info.get('metrics_protocols', [])) or 'pre-tris'}"
            + (f"; run with `{set_flags(info['set'])}`, not the paper's configuration" if info.get("set") else "")
            + ")\n\n"
            + "| row | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols) + "\n"
            # a row may name its split after a '|' (Table 2): escaped, or it would open a column
            + "".join(f"| {r.replace('|', chr(92) + '|')} | " + " | ".join(cell(r, c) for c in cols) + " |\n"
                      for r in rows)
            + _unrun_rows(unrun, len(rows) + len(unrun), f"reports/{rel}/table.md")
            + _below_language_blind(info) + _stage1_retrained(info))
    if empty:
        parts.append("Rendered with no results yet: " + "; ".join(empty) + ".\n")
    return "\n".join(parts) if parts else "Nothing rendered yet: run `python -m bench.run table5`.\n"


def _unrun_rows(unrun: list[str], n_rows: int, table_md: str) -> str:
    """A sentence under a table's rows naming those with no results yet (up to five; beyond, their count)."""
    if not unrun:
        return ""
    if len(unrun) > 5:
        return f"\n{len(unrun)} of {n_rows} rows have no results yet (`{table_md}` lists every row).\n"
    return "\nNo results yet: " + "; ".join(unrun) + ".\n"


def _below_language_blind(info: dict) -> str:
    """A sentence under a table's rows naming those with seeds below the language-blind guess (the header's
    `language_blind`, bench.render), of how many of the row's seeds were compared with it: their numbers are
    of maps that point off every object or are empty, so a comparison between them is not a ranking. Empty
    when none is."""
    check = info.get("language_blind") or {}
    if not check.get("below"):
        return ""
    below = Counter(str(c["row"]) for c in check["below"])  # rows in the header's order
    compared = check.get("compared") or {}
    named = ", ".join(f"{row} ({n} of {compared.get(row, n)} seeds)" for row, n in below.items())
    return (f"\nBelow the language-blind guess of their split (PointM; TESTBED §2.3), as the table's header "
            f"details: {named}.\n")


def _stage1_retrained(info: dict) -> str:
    """A sentence under a table's rows naming the Stage-2 rows whose labels came from another training of stage 1
    than the model of the Stage-1 row beside them (the header's `stage1_retrained`, bench.render): a gap between
    those two rows is then partly the two stage-1 trainings'. Empty when none is."""
    cells = info.get("stage1_retrained") or []
    if not cells:
        return ""
    named = ", ".join(f"{c['row']} seed {c['seed']} ({c['stage1_point_mask']:.1f} against "
                      f"{c['stage1_row_point_mask']:.1f})" for c in cells)
    return (f"\nOn another training of stage 1 than their Stage-1 row's (stage-1 PointM of the model their labels "
            f"came from, against the Stage-1 row's), as the table's header details: {named}.\n")


def replace_block(path: str | Path, begin: str, end: str, block: str) -> bool:
    """Rewrite the text between a file's `begin` and `end` markers with `block` (a generated section
    of the README); True when it changed."""
    path = Path(path)
    text = path.read_text()
    if begin not in text or end not in text:
        raise UserError(f"{path}: no markers ({begin} ... {end})")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{begin}\n{block}{end}{tail}"
    path.write_text(new)
    return new != text


def update_readme(readme: str | Path, reports: str | Path = "reports") -> bool:
    """Rewrite the block between the README's results markers; True when it changed."""
    return replace_block(readme, README_BEGIN, README_END, results_summary(reports))


@command
def main(argv: list[str] | None = None) -> None:
    p = command_parser("python -m bench.report", __doc__)
    p.add_argument("--reports", default="reports", help="the reports folder to index (default: reports)")
    p.add_argument("--readme", help="also rewrite this README's results block (README.md in the repository)")
    p.add_argument("--rerender", action="store_true",
                   help="first redraw every table's table.md/.tex/.html and plots from its cells.json "
                        "(no results store needed; default: off)")
    args = p.parse_args(argv)
    if args.rerender:
        for folder in rerender(args.reports):
            print(f"re-rendered {folder}/ from its cells.json")
    print(f"wrote {write_index(args.reports)}")
    if args.readme:
        print(f"{args.readme}: results block {'updated' if update_readme(args.readme, args.reports) else 'unchanged'}")


if __name__ == "__main__":
    main()
