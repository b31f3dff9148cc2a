"""Plots of a sweep's stored results beside the paper's numbers (seaborn/matplotlib, Agg backend).

Each sweep lists its plot kinds (`plots:` in sweeps/<name>.yaml):
- `curve`   (Tables 3, 8, 9): metric against a dotted config key, ours with seed error bars (± std),
            the paper as a dashed line; `hue` splits by another key (Table 9: dataset), `rows` picks
            a sub-sweep (Table 8: the N rows, the K rows).
- `heatmap` (Table 7): metric over two keys (x, y), ours above, the paper below.
- `bars`    (Tables 4, 5, 6, 10): one bar per row with ± std and seed dots, the paper as a red tick.
- `history` (Fig. 7): per-epoch metrics from each record's `history`, mean ± std band over seeds.
Rows without records are left out of "ours" (the paper's values are still drawn).

Figures are sized for a page about 1,100 px wide (reports/index.html scales them to its width): at
most three panels a line and fonts large enough to stay legible after that scaling.
`replot` redraws a rendered table's plots from its cells.json when the results store is not at hand.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from bench.render import header, load_cells, render_cells, seed_values, select_records  # noqa: E402
from bench.sweeps import Sweep  # noqa: E402

OURS_NOTE = "no results yet"
PANELS_PER_LINE = 3  # more panels a line shrink to unreadable text at page width
DPI = 100
# seaborn's "notebook" context scaled up: tick labels ~14 px, titles ~17 px at page width.
FONT_SCALE = 1.35


def write_plots(sweep: Sweep, records: Iterable[dict], out_dir: str | Path, *, profile: str | None = None) -> list[Path]:
    """Draw every plot the sweep declares into out_dir; return the PNG paths."""
    records = list(records)
    profile, _ = select_records(sweep, records, profile)
    ctx = _Context(sweep, render_cells(sweep, records, profile=profile), seed_values(sweep, records, profile),
                   header(sweep, records, profile=profile), records, profile)
    return _draw_all(ctx, sweep.plots, Path(out_dir))


def replot(sweep: Sweep, folder: str | Path) -> list[Path]:
    """Redraw the plots of a rendered table from its cells.json. Per-epoch histories are not in
    cells.json, so `history` plots are left as they are."""
    info, cells, values = load_cells(folder)
    ctx = _Context(sweep, cells, values, info, [], info.get("profile"))
    return _draw_all(ctx, [s for s in sweep.plots if s["kind"] != "history"], Path(folder))


def _draw_all(ctx: "_Context", specs: list[dict], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec in specs:
        draw = {"curve": plot_curve, "heatmap": plot_heatmap, "bars": plot_bars, "history": plot_history}[spec["kind"]]
        name = f"{ctx.sweep.name}_{spec['kind']}" + (f"_{spec['name']}" if spec.get("name") else "") + ".png"
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=FONT_SCALE):
            fig = draw(ctx, spec)
            fig.savefig(out / name, dpi=DPI, bbox_inches="tight")
            plt.close(fig)
        paths.append(out / name)
    return paths


class _Context:
    """The numbers every plot needs: cells (render_cells' frame), per-seed values, the header, and the
    records themselves for per-epoch histories (empty when drawn from cells.json)."""

    def __init__(self, sweep: Sweep, cells: pd.DataFrame, values: pd.DataFrame, info: dict,
                 records: list[dict], profile: str | None):
        self.sweep, self.records, self.profile = sweep, records, profile
        self.cells, self.values = cells, values
        seeds = len(info["seeds"])
        self.subtitle = ((f"ours: {info['profile']}, {seeds} seed{'s' if seeds != 1 else ''}, " if info["records"]
                          else "ours: no records yet; ") + "; ".join(info["datasets"]))
        self.label = {ours: col for col, ours in sweep.metrics.items()}

    def metrics(self, spec: dict) -> list[str]:
        return list(spec.get("metrics") or self.sweep.metrics.values())

    def cell(self, row: str, metric: str) -> SimpleNamespace:
        c = self.cells
        # A namespace, not a Series: Series.mean / .std are methods, not the cell's numbers.
        return SimpleNamespace(**c[(c.row == row) & (c.metric == metric)].iloc[0].to_dict())

    def title(self, fig: plt.Figure) -> None:
        # Once the panels are drawn, so rotated tick labels get room between the lines of panels.
        fig.tight_layout(h_pad=2.0, w_pad=1.5)
        # Above the axes (bottom-anchored at the top edge) so it never covers panel titles.
        fig.suptitle(f"{self.sweep.title}\n{self.subtitle}", fontsize="large", y=1.0, va="bottom")


def _axes(n: int, width: float = 4.5, height: float = 3.8, per_line: int = PANELS_PER_LINE) -> tuple[plt.Figure, list]:
    """n panels, at most per_line a line; returns the figure and the n axes in reading order."""
    cols = min(n, per_line)
    lines = -(-n // cols)
    fig, grid = plt.subplots(lines, cols, figsize=(width * cols, height * lines), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.remove()  # the unused slots of the last line
    return fig, axes[:n]


def _value(x: Any) -> Any:
    # Plot numeric keys on a numeric axis; anything else (a dataset name) stays a label.
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x


def plot_curve(ctx: _Context, spec: dict) -> plt.Figure:
    sweep = ctx.sweep
    rows = list(spec.get("rows") or sweep.rows)
    groups: dict[Any, list[str]] = {}
    for row in rows:
        key = sweep.resolved(row, spec["hue"]) if spec.get("hue") else None
        groups.setdefault(key, []).append(row)
    metrics = ctx.metrics(spec)
    fig, axes = _axes(len(metrics))
    palette = sns.color_palette("deep", len(groups))
    for ax, metric in zip(axes, metrics):
        any_ours = False
        for color, (group, members) in zip(palette, groups.items()):
            xs = [_value(sweep.resolved(r, spec["x"])) for r in members]
            cells = [ctx.cell(r, metric) for r in members]
            tag = f"{group} " if group is not None else ""
            paper = [c.paper for c in cells]
            ax.plot(xs, paper, "--", marker="s", mfc="none", color=color, alpha=0.8, label=f"{tag}paper")
            done = [(x, c) for x, c in zip(xs, cells) if c.n > 0]
            if done:
                any_ours = True
                ax.errorbar([x for x, _ in done], [c.mean for _, c in done],
                            yerr=[0 if c.n < 2 else c.std for _, c in done],
                            marker="o", color=color, capsize=3, label=f"{tag}ours (± std)")
        if not any_ours:
            ax.text(0.5, 0.5, OURS_NOTE, transform=ax.transAxes, ha="center", color="grey")
        ax.set_xticks(sorted({_value(sweep.resolved(r, spec["x"])) for r in rows}))
        ax.set_xlabel(spec.get("xlabel", spec["x"]))
        ax.set_title(ctx.label[metric])
    _legend(fig, axes)
    ctx.title(fig)
    return fig


def plot_heatmap(ctx: _Context, spec: dict) -> plt.Figure:
    sweep = ctx.sweep
    metrics = ctx.metrics(spec)
    # Per metric one line: ours beside the paper, so the two grids are compared at a glance.
    fig, axes = _axes(2 * len(metrics), width=4.2, height=3.2, per_line=2)
    for j, metric in enumerate(metrics):
        frame = pd.DataFrame([{"x": sweep.resolved(r, spec["x"]), "y": sweep.resolved(r, spec["y"]),
                               "ours": ctx.cell(r, metric).mean, "paper": ctx.cell(r, metric).paper}
                              for r in sweep.rows])
        for i, source in enumerate(("ours", "paper")):
            grid = frame.pivot(index="y", columns="x", values=source).astype(float)
            ax = axes[2 * j + i]
            if grid.isna().all().all():
                ax.text(0.5, 0.5, OURS_NOTE, transform=ax.transAxes, ha="center", color="grey")
                ax.set_xticks([]), ax.set_yticks([])
            else:
                sns.heatmap(grid, ax=ax, annot=True, fmt=".1f", cmap="viridis", cbar=False, square=True)
            ax.set_title(f"{ctx.label[metric]} ({source})")
            ax.set_xlabel(spec.get("xlabel", spec["x"]))
            ax.set_ylabel(spec.get("ylabel", spec["y"]))
    ctx.title(fig)
    return fig


def plot_bars(ctx: _Context, spec: dict) -> plt.Figure:
    sweep = ctx.sweep
    rows = list(spec.get("rows") or sweep.rows)
    metrics = ctx.metrics(spec)
    fig, axes = _axes(len(metrics), width=max(4.5, 0.6 * len(rows) + 1), height=4.6)
    color = sns.color_palette("deep")[0]
    for ax, metric in zip(axes, metrics):
        cells = [ctx.cell(r, metric) for r in rows]
        xs = range(len(rows))
        means = [c.mean if c.n else 0.0 for c in cells]
        errs = [c.std if c.n > 1 else 0.0 for c in cells]
        ax.bar(xs, means, yerr=errs, color=color, alpha=0.75, capsize=3, label="ours (± std)")
        v = ctx.values[(ctx.values.metric == metric) & ctx.values.row.isin(rows)]
        if not v.empty:  # a cells.json written before it kept per-seed values has none to draw
            ax.scatter([rows.index(r) for r in v.row], v.value, s=14, color="black", zorder=3, label="ours, per seed")
        ax.scatter(list(xs), [c.paper for c in cells], marker="_", s=500, color="tab:red", zorder=4,
                   linewidths=2, label="paper")
        for x, c in zip(xs, cells):
            if c.n == 0:
                ax.text(x, 0, "pending", rotation=90, ha="center", va="bottom", color="grey", fontsize="small")
        ax.set_xticks(list(xs), rows, rotation=35, ha="right")
        ax.set_title(ctx.label[metric])
    _legend(fig, axes)
    ctx.title(fig)
    return fig


def history_frame(sweep: Sweep, records: Iterable[dict], profile: str | None = None,
                  metrics: list[str] | None = None) -> pd.DataFrame:
    """Long table row, seed, epoch, metric, value from every record's per-epoch history."""
    _, recs = select_records(sweep, records, profile)
    wanted = metrics or list(sweep.metrics.values())
    out = []
    for r in recs:
        if r.get("row") not in sweep.rows:
            continue
        for entry in r.get("history") or []:
            for metric in wanted:
                value = entry.get(metric)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and "epoch" in entry:
                    out.append({"row": r["row"], "seed": r.get("seed", 0), "epoch": entry["epoch"],
                                "metric": metric, "value": float(value)})
    return pd.DataFrame(out, columns=["row", "seed", "epoch", "metric", "value"])


def plot_history(ctx: _Context, spec: dict) -> plt.Figure:
    sweep = ctx.sweep
    wanted = ctx.metrics(spec)
    frame = history_frame(sweep, ctx.records, ctx.profile, wanted)
    present = [m for m in wanted if m in set(frame.metric)] or wanted[:1]
    fig, axes = _axes(len(present))
    palette = dict(zip(sweep.rows, sns.color_palette("deep", len(sweep.rows))))
    for ax, metric in zip(axes, present):
        data = frame[frame.metric == metric]
        if data.empty:
            ax.text(0.5, 0.5, OURS_NOTE, transform=ax.transAxes, ha="center", color="grey")
        else:
            # Mean over seeds with a ± 1 std band (errorbar="sd").
            sns.lineplot(data=data, x="epoch", y="value", hue="row", hue_order=list(sweep.rows), palette=palette,
                         errorbar="sd", marker="o", ax=ax, legend=False)
        ax.set_title(ctx.label.get(metric, metric))
        ax.set_ylabel("")
    done = set(frame.row)
    handles = [plt.Line2D([], [], color=palette[r], marker="o", label=r if r in done else f"{r} ({OURS_NOTE})")
               for r in sweep.rows]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 4), bbox_to_anchor=(0.5, 0.0),
               frameon=False)
    ctx.title(fig)
    return fig


def _legend(fig: plt.Figure, axes: list) -> None:
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:  # collect entries that only some panels have
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    # Hung below the figure (bbox_inches="tight" keeps it), whatever the number of panel lines.
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4), bbox_to_anchor=(0.5, 0.0),
               frameon=False)
