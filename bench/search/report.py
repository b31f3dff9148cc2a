"""Reports of a study: trials.csv/.md, best.json/.md, Optuna's plots and summary.md.

They go to REPORTS/search/<study>/ and are read from the study alone (its trials and the user
attributes it was created with), so a report can be rewritten from the storage at any time.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import yaml
from optuna.trial import TrialState

from bench.executors import last_line
from bench.search.space import Param, short_number
from ehin.config import get

if TYPE_CHECKING:
    import pandas as pd

# Short names in reports (the paper's symbols).
LABELS = {"model.alpha": "α", "model.beta": "β", "model.n_layers": "n", "data.K": "K", "train.batch_size": "N",
          "loss.fg": "λ_FG", "loss.cl": "λ_CL", "loss.bg": "λ_BG", "train.lr": "lr", "model.fusion_scale": "s",
          "loss.cl_variant": "L_CL"}


def _value_str(v: Any) -> str:
    if isinstance(v, float):
        return short_number(v)
    return str(v)


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row a trial: state, value, last epoch, duration, the searched params, retry and note."""
    import pandas as pd

    trials = study.get_trials(deepcopy=False)
    names = list(study.user_attrs.get("space") or {})
    rows = []
    for t in trials:
        row = {"number": t.number, "state": t.state.name,
               "value": t.value if t.state == TrialState.COMPLETE else None,
               "last_epoch": t.last_step,
               "duration_s": round(t.duration.total_seconds(), 1) if t.duration is not None else None}
        for n in names:
            row[n] = t.params.get(n)
        row["retry_of"] = t.system_attrs.get("failed_trial")
        row["note"] = t.user_attrs.get("error") or t.user_attrs.get("stopped") or t.user_attrs.get("enqueued") or ""
        row["run_dir"] = t.user_attrs.get("run_dir", "")
        rows.append(row)
    columns = ["number", "state", "value", "last_epoch", "duration_s", *names, "retry_of", "note", "run_dir"]
    return pd.DataFrame(rows, columns=columns)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join("" if v is None or (isinstance(v, float) and math.isnan(v)) else
                                       _value_str(v) for v in r) + " |")
    return "\n".join(lines) + "\n"


def write_reports(study: optuna.Study, out: Path, base_cfg: dict) -> dict[str, Any]:
    """best.json/.md, trials.csv/.md and the plots; returns what was written and notes."""
    out.mkdir(parents=True, exist_ok=True)
    attrs = study.user_attrs
    metric, space = attrs["metric"], attrs.get("space") or {}
    df = trials_frame(study)
    df.to_csv(out / "trials.csv", index=False)
    cols = ["number", "state", "value", "last_epoch", "duration_s", *space, "retry_of", "note"]
    header = [LABELS.get(c, c) if c in space else c for c in cols]
    shown = df[cols].astype(object).where(df[cols].notna(), None)
    shown["value"] = [None if v is None else f"{v:.2f}" for v in shown["value"]]
    (out / "trials.md").write_text(
        f"# Trials of study `{study.study_name}` ({metric} on {base_cfg['eval']['split']}, {attrs['direction']})\n\n"
        "`value` is the final epoch's metric of complete trials; `last_epoch` the last epoch reported "
        "(pruned trials stop early).\n\n"
        + md_table(header, shown.values.tolist()))
    counts = {s.name.lower(): int((df["state"] == s.name).sum()) if len(df) else 0 for s in TrialState}
    written: dict[str, Any] = {"trials.csv": out / "trials.csv", "trials.md": out / "trials.md", "notes": []}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = study.best_trial if complete else None
    best_json = {"study": study.study_name, "metric": metric, "direction": attrs["direction"],
                 "eval_split": base_cfg["eval"]["split"], "profile": attrs["profile"], "counts": counts,
                 "value": best.value if best else None, "trial": best.number if best else None,
                 "params": best.params if best else None,
                 "defaults": {n: get(base_cfg, n) for n in space},
                 "fixed": attrs.get("fixed", {}), "run_dir": best.user_attrs.get("run_dir") if best else None}
    (out / "best.json").write_text(json.dumps(best_json, indent=1, default=str) + "\n")
    lines = [f"# Best trial of study `{study.study_name}`\n"]
    if best is None:
        lines.append("No trial completed yet.\n")
    else:
        lines.append(f"Trial {best.number}: **{metric} {best.value:.2f}** on {base_cfg['eval']['split']} "
                     f"(profile {attrs['profile']}; {counts['complete']} complete, {counts['pruned']} pruned, "
                     f"{counts['fail']} failed trials).\n")
        lines.append(md_table(["param", "key", "best", "profile default", "searched"],
                               [[LABELS.get(n, n), f"`{n}`", best.params.get(n), get(base_cfg, n),
                                 Param(n, **p).describe()] for n, p in space.items()]))
        sets = " ".join(f"--set {k}={_cli_value(v)}" for k, v in {**attrs.get("fixed", {}), **best.params}.items())
        lines.append(f"\nRerun it: `python -m ehin.train_stage1 --profile {attrs['profile']} {sets} --out runs/best`\n")
    (out / "best.md").write_text("\n".join(lines))
    written.update({"best.json": out / "best.json", "best.md": out / "best.md"})
    written["notes"] = write_plots(study, out)
    return written


def write_plots(study: optuna.Study, out: Path) -> list[str]:
    """Optuna's matplotlib plots; one that cannot be drawn yet (too few trials) is a note, not an error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from optuna.visualization import matplotlib as ovm

    metric = study.user_attrs.get("metric", "value")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    notes = []
    if 2 <= len(complete) < 10:
        notes.append(f"importances and slices rest on {len(complete)} complete trial(s): read them as anecdotes")
    plots = {"history.png": lambda: ovm.plot_optimization_history(study, target_name=metric),
             "intermediate.png": lambda: ovm.plot_intermediate_values(study),
             "importances.png": lambda: ovm.plot_param_importances(study, target_name=metric),
             "slices.png": lambda: ovm.plot_slice(study, target_name=metric)}
    for name, draw in plots.items():
        (out / name).unlink(missing_ok=True)
        if name in ("importances.png", "slices.png") and len(complete) < 2:
            notes.append(f"{name}: needs at least 2 complete trials ({len(complete)} so far)")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            axes = list(ax.flat) if hasattr(ax, "flat") else [ax]
            fig = axes[0].figure
            if name == "slices.png":  # one panel per param in a row: give each some width
                fig.set_size_inches(max(6.0, 2.4 * len(axes)), 3.2)
                for a in axes:  # log axes: minor tick labels overlap
                    a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            if name == "intermediate.png":
                axes[0].set_xlabel("epoch")
                axes[0].set_ylabel(f"val {metric}")
            fig.savefig(out / name, dpi=110, bbox_inches="tight")
            plt.close(fig)
        except Exception as e:  # e.g. importances when every complete trial scored the same
            plt.close("all")
            notes.append(f"{name}: not drawn ({last_line(e)})")
    return notes


def write_summary(out: Path, study: optuna.Study, written: dict, final_md: Path | None) -> Path:
    from ehin.metrics import PROTOCOL_BEFORE

    parts = [f"# Search `{study.study_name}`\n",
             f"Space `{study.user_attrs.get('space_name')}`, profile {study.user_attrs.get('profile')}, "
             f"objective {study.user_attrs.get('metric')} ({study.user_attrs.get('direction')}); evaluation "
             f"{study.user_attrs.get('metrics_protocol', PROTOCOL_BEFORE)}.\n",
             (out / "best.md").read_text().split("\n", 1)[1]]
    if final_md is not None and final_md.exists():
        parts.append("## Test split\n" + final_md.read_text().split("\n", 1)[1])
    for name, title in (("history.png", "Optimisation history"), ("intermediate.png", "Per-epoch values (pruning)"),
                        ("importances.png", "Parameter importances"), ("slices.png", "Slices")):
        if (out / name).exists():
            parts.append(f"## {title}\n\n![{title}]({name})\n")
    if written.get("notes"):
        parts.append("Notes: " + "; ".join(written["notes"]) + "\n")
    parts.append("All trials: [trials.md](trials.md) ([csv](trials.csv)).\n")
    (out / "summary.md").write_text("\n".join(parts))
    return out / "summary.md"


def _cli_value(v: Any) -> str:
    """A value as `--set` reads it back (YAML scalars: null, true, 0.001)."""
    if isinstance(v, float):
        return repr(v)
    text = yaml.safe_dump(v, default_flow_style=True).strip()
    return text[:-4].strip() if text.endswith("...") else text
