"""The final re-evaluation: the best configuration against the profile's defaults on the test split.

Both are trained with several seeds as the cells of a table named `search-<study>`, through
bench.executors.dispatch and a results store in RESULTS/<study>/final/, so a rerun only trains
what is missing. This is the only place a search touches a test split.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from bench.executors import SlurmOptions, dispatch
from bench.jobs import CellSpec
from bench.search.report import LABELS, md_table
from bench.search.space import SearchError, is_test_split
from ehin.config import config_hash, get, load_config
from ehin.metrics import PAPER_COLUMNS

if TYPE_CHECKING:
    from ehin.data.refer import ReferDataset

PAPER_METRICS = PAPER_COLUMNS  # the paper's five columns (ehin.metrics.REGISTRY)


def choose_final_split(requested: str | None, refer: ReferDataset) -> str:
    """The split the final runs are evaluated on: `requested`, else the dataset's test split (test, or
    the first of testA, testB)."""
    splits = sorted(refer.splits())
    if requested:
        if requested not in splits:
            raise SearchError(f"final split {requested!r} is not a split of the dataset ({', '.join(splits)})")
        return requested
    tests = [s for s in splits if is_test_split(s)]
    if not tests:
        raise SearchError(f"the dataset has no test split ({', '.join(splits)}); pass --final-split or --no-final")
    return "test" if "test" in tests else tests[0]


def final_evaluation(study: optuna.Study, *, profile: str, fixed: dict[str, Any], split: str, seeds: int,
                     executor: str, jobs: int, root: Path, slurm: SlurmOptions, out: Path) -> tuple[Path, bool]:
    """Train the best params and the profile's defaults with `seeds` seeds each, evaluate on `split`
    (a test split: the only place the search touches it) and write final.md/json. Cells go through
    bench.executors.dispatch and the results store, so a rerun only trains what is missing."""
    from bench.run import reuse_identical_cells
    from bench.store import ResultStore, cell_id

    best = study.best_trial
    table = f"search-{study.study_name}"
    rows = {"best": {**fixed, **best.params}, "default": dict(fixed)}
    specs = []
    for row, overrides in rows.items():
        for seed in range(seeds):
            o = {**overrides, "eval.split": split, "train.seed": seed}
            cfg = load_config(profile=profile, overrides=o)
            h = config_hash(cfg)
            specs.append(CellSpec(table=table, row=row, seed=seed, profile=profile, stage="1", overrides=o, config=cfg,
                                  config_hash=h, run_dir=str(root / "runs" / row / f"seed{seed}-{h}"),
                                  store_root=str(root), cell_id=cell_id(table, row, seed, profile, h)))
    store = ResultStore(root)
    done = store.finished_ids()
    todo = reuse_identical_cells([s for s in specs if s.cell_id not in done], store)
    ok = True
    if todo:
        print(f"[search] final: {len(todo)} run(s) on {split} ({executor})", file=sys.stderr)
        outcomes = dispatch(todo, executor, jobs=jobs, folder=root / "submitit", slurm=slurm)
        ok = all(o.ok for o in outcomes)
    by_id = {r["cell_id"]: r for r in store.read() if "cell_id" in r}
    space = study.user_attrs.get("space") or {}
    base_cfg = load_config(profile=profile, overrides=fixed)
    summary: dict[str, Any] = {"split": split, "seeds": list(range(seeds)), "rows": {}}
    md_rows = []
    for row in rows:
        recs = [by_id[s.cell_id] for s in specs if s.row == row and s.cell_id in by_id]
        stats = {}
        for col, key in PAPER_METRICS.items():
            vals = [float(r["metrics"][key]) for r in recs if key in r.get("metrics", {})]
            stats[key] = _mean_std(vals)
        values = {n: (best.params[n] if row == "best" else get(base_cfg, n)) for n in space}
        summary["rows"][row] = {"params": values, "n_seeds": len(recs), "metrics": stats}
        label = f"best (trial {best.number})" if row == "best" else "profile default"
        md_rows.append([label, *[values[n] for n in space],
                        *[_pm(*stats[k]) for k in PAPER_METRICS.values()], len(recs)])
    out.mkdir(parents=True, exist_ok=True)
    (out / "final.json").write_text(json.dumps(summary, indent=1) + "\n")
    header = ["config", *[LABELS.get(n, n) for n in space], *PAPER_METRICS, "seeds"]
    (out / "final.md").write_text(
        f"# Best configuration vs the profile's defaults on {split}\n\n"
        f"Profile {profile}; each row trained with seeds {', '.join(map(str, range(seeds)))} and evaluated on "
        f"**{split}** (mean ± std over seeds). The search itself only saw {base_cfg['eval']['split']}.\n\n"
        + md_table(header, md_rows))
    return out / "final.md", ok


def _mean_std(vals: list[float]) -> tuple[float, float, int]:
    if not vals:
        return math.nan, math.nan, 0
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std, len(vals)


def _pm(mean: float, std: float, n: int) -> str:
    if n == 0:
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"
