"""Checks, kept apart.

1. Drift of our own numbers (detectron2 EXPECTED_RESULTS style):

    python -m bench.check --profile smoke                      # compare results/smoke with reports/baselines/smoke.json
    python -m bench.check --profile smoke --update --spread results/smoke-seeds   # rewrite baselines, on purpose

   Each baseline cell holds, per metric, the expected value, an absolute tolerance and the measured
   spread it came from (seed-to-seed std over the spread store's seeds, and the run-to-run
   difference of a repeated run). The check exits 1 with a diff table naming table, cell, metric,
   expected, got and tolerance when a number leaves its band, when a cell is missing, or when a
   cell's config hash changed (a default moved: rerun and `--update` deliberately).

   Training is chaotic, so the same code gives other numbers on another CPU unless both runs use
   portable numerics (EHIN_PORTABLE_NUMERICS=1, ehin/numerics.py). The baseline file records the
   environment it was made in. Where this run's environment matches it (numerics mode, torch,
   threads, CPU ISA and CPU model), the same code gives the same floats, so any difference fails;
   across environments each value must stay within its band. (Portable numerics were meant to make
   the CPU model irrelevant, but an Intel Xeon gave other floats than the AMD EPYC the smoke baselines
   were made on: ehin/numerics.py.)

2. The paper's claims (declared in sweeps/*.yaml):

    python -m bench.check --claims --profile synthetic

   For each claim: does it hold on our results, by what margin, and does the margin exceed the noise:
   paired over the same expressions and seeds where the cells kept their per-expression scores (the
   store's per_expression/ folder; a bootstrap over expressions plus the per-seed differences' spread,
   since a training's noise moves every expression of a row at once), else over the means of the seeds
   both rows have. The report's test column says which; with one seed the noise is unknown. Beyond noise:
   |margin| > t x SE, t Student's at the error's degrees of freedom (few seeds, few degrees, a large t). A
   claim over several pairs of rows (a best row against each other, a row against a list) is judged pair
   by pair and names the pair that decides it; one whose rows lack results is incomplete until its pairs
   so far decide it. A claim that does not hold is a finding, never a CI failure (exit 0).

3. Two rows of one table compared by the same paired test, whatever config their records ran (a
   diagnostic run with `bench.run --set`, which the claims leave out because its hashes are not the sweep's):

    python -m bench.check --pair fg+cl fg --tables table5 --results reports/testbed/diag-refcoco-k6

4. The same rows of two stores, by the same paired test: the same cells run two ways (data-parallel
   against one process, a speed lever against none):

    python -m bench.check --against reports/gpu/store --tables table5 --rows bg+fg+cl --results results/ranks2
"""
from __future__ import annotations

import html
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bench.render import format_df, format_margin
from bench.store import ResultStore
from ehin.cli import command, command_parser, UserError

DEFAULT_TABLES = ("table3", "table5", "table6")
from ehin.metrics import QUALITY_KEYS as METRICS  # the paper's five columns (the metric registry)
# Tolerance = max(TOL_FLOOR, TOL_K x measured spread). 2 x seed std: a change of seed is our proxy for
# an irrelevant perturbation (another BLAS, another CPU); the floor absorbs tiny spreads.
TOL_K = 2.0
TOL_FLOOR = 1.0


def baseline_path(profile: str, reports: str | Path = "reports") -> Path:
    return Path(reports) / "baselines" / f"{profile}.json"


# ---------------------------------------------------------------------------------------------- drift

def _cells(store: ResultStore, profile: str, tables) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in store.select(profile=profile):
        if r.get("table") in tables:
            out.setdefault((r["table"], r["row"]), []).append(r)
    return out


def build_baselines(store: ResultStore, profile: str, tables, spread_store: ResultStore | None,
                    rerun_store: ResultStore | None = None) -> dict:
    """Expected = this store's value (the seeds CI runs); tolerance from the spread stores."""
    cells = _cells(store, profile, tables)
    spread_cells = _cells(spread_store, profile, tables) if spread_store else {}
    rerun_cells = _cells(rerun_store, profile, tables) if rerun_store else {}
    out: dict = {"profile": profile, "created": time.strftime("%Y-%m-%d %H:%M"),
                 "environment": environment([r for recs in cells.values() for r in recs]),
                 "rule": f"tolerance = max({TOL_FLOOR}, {TOL_K} x max(seed std, run-to-run |diff|)): seed std over "
                         "this cell's seeds in the spread store; run-to-run = |this cell's value for the same "
                         "seeds in the rerun store - expected| (a rerun in another environment measures what a "
                         "change of environment does); a cell without seed runs of its own takes the largest "
                         "seed std measured on any cell",
                 # Where the spread and the repeated run were measured (bands from another environment
                 # are what a run across environments is held to).
                 "spread_environment": environment([r for recs in spread_cells.values() for r in recs]),
                 "rerun_environment": environment([r for recs in rerun_cells.values() for r in recs]),
                 "tables": {}}
    # The largest measured seed std per metric stands in for cells whose seeds were not run.
    fallback: dict[str, float] = {}
    for recs in spread_cells.values():
        for m in METRICS:
            vals = [r["metrics"][m] for r in recs if m in r.get("metrics", {})]
            if len(vals) > 1:
                fallback[m] = max(fallback.get(m, 0.0), float(np.std(vals, ddof=1)))
    for (table, row), recs in sorted(cells.items()):
        entry: dict[str, Any] = {"config_hash": recs[0]["config_hash"], "seeds": sorted(r["seed"] for r in recs),
                                 "metrics": {}}
        for m in METRICS:
            vals = [r["metrics"][m] for r in recs if m in r.get("metrics", {})]
            if not vals:
                continue
            seeds = [r["metrics"][m] for r in spread_cells.get((table, row), []) if m in r.get("metrics", {})]
            seed_std = float(np.std(seeds, ddof=1)) if len(seeds) > 1 else None
            rerun = [r["metrics"][m] for r in rerun_cells.get((table, row), [])
                     if m in r.get("metrics", {}) and r["seed"] in entry["seeds"]]
            rerun_diff = float(abs(np.mean(rerun) - np.mean(vals))) if rerun else None
            borrowed = seed_std is None and m in fallback
            spread = max(seed_std if seed_std is not None else fallback.get(m, 0.0), rerun_diff or 0.0)
            entry["metrics"][m] = {"expected": round(float(np.mean(vals)), 3),
                                   "tol": round(max(TOL_FLOOR, TOL_K * spread), 3),
                                   "seed_std": round(fallback[m], 3) if borrowed else
                                   (None if seed_std is None else round(seed_std, 3)),
                                   "seed_std_from": "largest measured on any cell" if borrowed else "this cell",
                                   "n_seeds_spread": len(seeds),
                                   "run_to_run": None if rerun_diff is None else round(rerun_diff, 4)}
        out["tables"].setdefault(table, {})[row] = entry
    return out


ENV_KEYS = ("numerics", "torch", "threads", "cpu_capability", "cpu_model")


def environment(records: list[dict]) -> dict[str, list]:
    """The values of what decides a CPU run's floats, over these records (ehin/numerics.py)."""
    return {k: sorted({str(r.get(k, "?")) for r in records}) for k in ENV_KEYS}


def environment_notes(store: ResultStore, baselines: dict) -> list[str]:
    """Where this store's runs were made differently from the baseline's (not a failure in itself)."""
    base = baselines.get("environment")
    if not base:
        return ["the baseline file records no environment (made before portable numerics existed)"]
    recs = [r for r in store.select(profile=baselines["profile"]) if r.get("table") in baselines["tables"]]
    here = environment(recs)
    notes = [f"{k}: baseline {', '.join(base.get(k, ['?']))}; this run {', '.join(here[k])}"
             for k in ("numerics", "torch", "threads") if here[k] != base.get(k)]
    if not notes and here.get("cpu_model") != base.get("cpu_model"):
        notes.append(f"{'/'.join(here['numerics'])} numerics on another CPU "
                     f"(baseline {', '.join(base.get('cpu_model', ['?']))}; this run {', '.join(here['cpu_model'])}): "
                     "values may differ by seed-level noise, so each must stay within its band")
    return notes


def environment_matches(store: ResultStore, baselines: dict) -> bool:
    """True when this store's runs were made where the baseline's were (ENV_KEYS), so that the same code
    must give the same floats: numerics, torch, threads, CPU ISA and CPU model equal. The CPU model
    counts under portable numerics too: an Intel Xeon (AVX-512, held to AVX2 loops) and the AMD EPYC of
    the smoke baselines gave other floats with the same code, torch and threads (session 19)."""
    base = baselines.get("environment")
    if not base:
        return False
    recs = [r for r in store.select(profile=baselines["profile"]) if r.get("table") in baselines["tables"]]
    here = environment(recs)
    return all(here[k] == base.get(k) for k in ENV_KEYS)


def compare(store: ResultStore, baselines: dict, tables=None, exact: bool = False,
            rows_wanted: list[str] | None = None) -> list[dict]:
    """One row per (table, cell, metric) checked; `ok` False for drift, missing cells or config changes.
    `exact` (same environment as the baseline's): any difference in the stored precision fails.
    `rows_wanted`: check only these cells (row names) of the tables."""
    profile = baselines["profile"]
    tables = tables or list(baselines["tables"])
    cells = _cells(store, profile, tables)
    rows = []
    for table in tables:
        for row, entry in baselines["tables"].get(table, {}).items():
            if rows_wanted and row not in rows_wanted:
                continue
            recs = cells.get((table, row), [])
            if not recs:
                rows.append(dict(table=table, cell=row, metric="-", expected=None, got=None, tol=None, ok=False,
                                 why="missing from the results store"))
                continue
            hashes = {r["config_hash"] for r in recs}
            if hashes != {entry["config_hash"]}:
                rows.append(dict(table=table, cell=row, metric="config", expected=entry["config_hash"],
                                 got=",".join(sorted(hashes)), tol=None, ok=False,
                                 why="config changed (a default or the sweep moved)"))
            for m, b in entry["metrics"].items():
                vals = [r["metrics"][m] for r in recs if m in r.get("metrics", {})]
                got = float(np.mean(vals)) if vals else None
                if exact:  # expected values are stored to 3 decimals
                    ok = got is not None and round(got, 3) == b["expected"]
                    why = "differs, in the baseline's environment (the same code gives the same floats)"
                else:
                    ok, why = got is not None and abs(got - b["expected"]) <= b["tol"], "outside tolerance"
                rows.append(dict(table=table, cell=row, metric=m, expected=b["expected"], got=got,
                                 tol=0.0 if exact else b["tol"], ok=ok, why="" if ok else why))
    return rows


def diff_table(rows: list[dict], only_failures: bool = True) -> str:
    shown = [r for r in rows if not (only_failures and r["ok"])]
    head = f"{'table':<8} {'cell':<24} {'metric':<12} {'expected':>12} {'got':>12} {'delta':>8} {'tol':>6}  status"
    lines = [head, "-" * len(head)]
    for r in shown:
        exp, got = r["expected"], r["got"]
        num = isinstance(exp, (int, float)) and isinstance(got, (int, float))
        delta = f"{got - exp:+8.2f}" if num else f"{'-':>8}"
        fmt = lambda v: f"{v:12.2f}" if isinstance(v, (int, float)) else f"{str(v if v is not None else '-')[:12]:>12}"  # noqa: E731
        tol = f"{r['tol']:6.2f}" if r["tol"] is not None else f"{'-':>6}"
        lines.append(f"{r['table']:<8} {r['cell'][:24]:<24} {r['metric']:<12} {fmt(exp)} {fmt(got)} {delta} {tol}  "
                     f"{'ok' if r['ok'] else 'FAIL: ' + r['why']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- claims

def _row_stats(sweep, records: list[dict], row: str, metric: str) -> tuple[float, float, int]:
    vals = [r["metrics"][metric] for r in records if r.get("row") == row and metric in r.get("metrics", {})]
    if not vals:
        return math.nan, math.nan, 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan, len(vals)


def _noise(*stats) -> tuple[float, float]:
    """Standard error of a difference of means and its degrees of freedom (Welch-Satterthwaite); NaN
    when a row has one seed."""
    parts = [(s ** 2 / n, n - 1) for _, s, n in stats if n]
    if not parts or any(math.isnan(v) for v, _ in parts):
        return math.nan, math.nan
    return math.sqrt(sum(v for v, _ in parts)), effective_df(parts)


def effective_df(parts: list[tuple[float, float]]) -> float:
    """Welch-Satterthwaite degrees of freedom of a sum of independent variance estimates, each given as
    (variance, its degrees of freedom): (sum v)^2 / sum(v^2 / df). It lies between the smallest part's
    df and the sum of them, so an error whose larger part comes from two seeds has about one degree."""
    num = sum(v for v, _ in parts) ** 2
    den = sum(v * v / df for v, df in parts if v > 0)
    return num / den if den > 0 else float(max(df for _, df in parts))  # no spread at all: any df


def student_t_quantile(p: float, df: float) -> float:
    """The p-quantile (p > 0.5) of Student's t with df > 0 degrees of freedom, by bisection on its CDF
    (Simpson's rule over the density from 0); the normal's beyond 1e6 degrees."""
    from statistics import NormalDist

    if df > 1e6:
        return NormalDist().inv_cdf(p)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        t = np.linspace(0.0, x, 4001)
        f = np.exp(log_c - (df + 1) / 2 * np.log1p(t * t / df))
        return 0.5 + (x / 12000) * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 2.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


# Metrics that are means over expressions (ehin.metrics.aggregate) and so split into per-expression
# scores, in percent: their claims are tested paired over the same expressions and seeds.
PAIRED_METRICS = {"point_mask": 100.0, "point_box": 100.0, "box_acc": 100.0, "point_any_object": 100.0, "iou": 100.0}
BOOTSTRAP_SAMPLES = 2000


# A margin is beyond noise when it lies outside the two-sided 95 % band of its error: |margin| > t x SE,
# t Student's at the error's degrees of freedom. An error estimated from a few seeds is itself uncertain
# (two seeds: one degree, t = 12.7; five: about four, t = 2.8); with many, t tends to 1.96.
BEYOND_NOISE_P = 0.975


def _beyond(margin: float, noise: float, df: float) -> bool | None:
    """|margin| > t(df) standard errors; None where the error is unknown (one seed)."""
    if math.isnan(noise) or math.isnan(df):
        return None
    return bool(abs(margin) > student_t_quantile(BEYOND_NOISE_P, df) * noise)


def _scores(records: list[dict], row: str, metric: str, store_root: Path | None) -> dict[int, dict]:
    """seed -> {(ref_id, sent_id): score} of a row, from the per-expression files its records name."""
    from ehin.evaluate import read_per_expression

    out = {}
    for r in records:
        rel = r.get("per_expression")
        if r.get("row") != row or not rel or store_root is None or not (store_root / rel).is_file():
            continue
        z = read_per_expression(store_root / rel)
        out[int(r["seed"])] = {(int(a), int(b)): PAIRED_METRICS[metric] * float(v)
                               for a, b, v in zip(z["ref_id"], z["sent_id"], z[metric])}
    return out


class Paired(NamedTuple):
    diff: float         # row a minus row b, mean over expressions and seeds
    se: float           # its standard error (NaN with one seed)
    df: float           # the error's degrees of freedom (Welch-Satterthwaite over its two parts)
    expressions: int
    seeds: int


def paired_difference(a: dict[int, dict], b: dict[int, dict], seed: int = 0) -> Paired | None:
    """Row a minus row b over the seeds and expressions both have; None when nothing pairs. The error has
    two parts, added in quadrature (their degrees of freedom: expressions - 1 and seeds - 1):
    - the expressions': a bootstrap resampling expressions, each one unit across seeds (its seeds'
      differences averaged first), so an expression counts once however many seeds share it;
    - the training's: the spread of the per-seed mean differences over seeds (std / sqrt(seeds)). A
      training's noise moves all of a row's expressions together, which resampling expressions cannot
      see (even a cell run twice on a GPU does not repeat its number: reports/testbed/control-gpu-clip1.md,
      run-to-run), so one seed cannot measure it and the error is NaN (noise unknown) until a second
      seed pairs.
    The sum counts the expression-by-seed interaction in both parts, so it errs large, never small."""
    seeds = sorted(set(a) & set(b))
    keys = sorted(set.intersection(*[set(a[s]) & set(b[s]) for s in seeds])) if seeds else []
    if not keys:
        return None
    diffs = np.array([[a[s][k] - b[s][k] for s in seeds] for k in keys])  # [expressions, seeds]
    d = diffs.mean(axis=1)
    if len(seeds) < 2:  # no error to give, so no bootstrap to draw
        return Paired(float(d.mean()), math.nan, math.nan, len(keys), 1)
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), size=(BOOTSTRAP_SAMPLES, len(d)))].mean(axis=1).std(ddof=1)
    training = diffs.mean(axis=0).std(ddof=1) / math.sqrt(len(seeds))
    df = effective_df([(boot ** 2, len(keys) - 1), (training ** 2, len(seeds) - 1)])
    return Paired(float(d.mean()), float(math.hypot(boot, training)), df, len(keys), len(seeds))


def _paired(records, a_row: str, b_row: str, metric: str, store_root: Path | None):
    if metric not in PAIRED_METRICS:
        return None
    return paired_difference(_scores(records, a_row, metric, store_root), _scores(records, b_row, metric, store_root))


def pair_rows(records: list[dict], store_root: Path, a_row: str, b_row: str) -> dict[str, Paired | None]:
    """Row a minus row b, per paired metric, over the records given (one table's, the newest per seed),
    paired over the same expressions and seeds as the claims are."""
    return pair_stores(records, store_root, a_row, records, store_root, b_row)


def pair_stores(a: list[dict], a_root: Path, a_row: str, b: list[dict], b_root: Path, b_row: str
                ) -> dict[str, Paired | None]:
    """Row a_row of records `a` (store a_root) minus row b_row of records `b` (store b_root), per paired
    metric, paired over the same expressions and seeds: two rows of one store, or the same cells run two
    ways (bench.run --ranks 2 against one process, a speed lever against none, two sittings of a GPU)."""
    return {m: paired_difference(_scores(a, a_row, m, a_root), _scores(b, b_row, m, b_root)) for m in PAIRED_METRICS}


def _pair_text(a_row: str, b_row: str, table: str, pairs: dict[str, Paired | None]) -> str:
    lines = [f"{table}: {a_row} - {b_row}, paired over the same expressions and seeds (beyond noise: |diff| > t x SE)"]
    for m, pr in pairs.items():
        if pr is None:
            lines.append(f"  {m:<17} nothing pairs")
            continue
        beyond = _beyond(pr.diff, pr.se, pr.df)
        verdict = {None: "noise unknown (one seed)", True: "beyond noise", False: "within noise"}[beyond]
        lines.append(f"  {m:<17} {pr.diff:+7.2f} SE {pr.se:5.2f} (df {format_df(pr.df)})  {verdict}; {_paired_n(pr)}")
    return "\n".join(lines)


def _paired_n(paired: Paired) -> str:
    return f"{paired.expressions} expressions x {paired.seeds} seed{'s' if paired.seeds != 1 else ''}"


def _paired_test(paired: Paired) -> str:
    return f"paired ({_paired_n(paired)})"


def _claim_pairs(sweep, claim: dict) -> tuple[list[tuple[str, str]], int, int]:
    """A comparative claim as (a row, b row) pairs, the sign that makes a - b > 0 the claim's side, and how
    many pairs must hold: `best`/`worst` pair the row with every row of `over` (all must hold); `greater`/
    `less` pair a and b element-wise, a single row standing against each row of a list (all must hold, or
    more than half with `quantifier: most`)."""
    kind = claim["kind"]
    if kind in ("best", "worst"):
        row = str(claim["row"])
        over = [str(x) for x in claim.get("over") or [r for r in sweep.rows if r != row]]
        return [(row, o) for o in over], (1 if kind == "best" else -1), len(over)
    aa, bb = ([str(x) for x in (v if isinstance(v, list) else [v])] for v in (claim["a"], claim["b"]))
    if len(aa) == 1:
        aa = aa * len(bb)
    if len(bb) == 1:
        bb = bb * len(aa)
    pairs = list(zip(aa, bb))
    must = len(pairs) // 2 + 1 if claim.get("quantifier") == "most" else len(pairs)
    return pairs, (1 if kind == "greater" else -1), must


def _compare_rows(records: list[dict], a_row: str, b_row: str, metric: str, store_root: Path | None
                  ) -> tuple[float, float, float, str] | None:
    """Row a minus row b: (difference, its standard error, the error's df, test), over the seeds both rows
    have; None when they share none. Paired over the same expressions and seeds where both have
    per-expression scores, else the difference of the seeds' means (Welch)."""
    paired = _paired(records, a_row, b_row, metric, store_root)
    if paired is not None:
        return paired.diff, paired.se, paired.df, _paired_test(paired)
    by_seed = [{int(r.get("seed", 0)): r["metrics"][metric] for r in records
                if r.get("row") == row and metric in r.get("metrics", {})} for row in (a_row, b_row)]
    seeds = sorted(set(by_seed[0]) & set(by_seed[1]))
    if not seeds:
        return None
    def stats(values: dict[int, float]) -> tuple[float, float, int]:  # mean, std, n over the shared seeds
        v = [values[s] for s in seeds]
        return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v)

    a, b = stats(by_seed[0]), stats(by_seed[1])
    noise, df = _noise(a, b)
    return a[0] - b[0], noise, df, f"seeds ({len(seeds)} seed{'s' if len(seeds) != 1 else ''})"


def _verdict(judged: list[dict], n_pairs: int, must: int) -> tuple[str, bool | None, dict]:
    """A claim over `n_pairs` pairs of which `must` must hold, from the pairs `judged` so far (margin > 0:
    the pair holds): its status, whether that is beyond noise, and the pair that decides it. It holds once
    `must` pairs hold and fails once more than `n_pairs - must` fail, however the pairs without results
    turn out; else it is incomplete. Beyond noise: as many of its pairs beyond noise on its side (None where
    that needs pairs whose noise is unknown). The deciding pair: the must-th largest margin once it holds,
    the (n_pairs - must + 1)-th smallest once it fails (all pairs: the smallest either way), the smallest so
    far while incomplete."""
    held = [j for j in judged if j["margin"] > 0]
    failed = [j for j in judged if j["margin"] <= 0]
    desc = sorted(judged, key=lambda j: -j["margin"])
    if len(held) >= must:
        status, side, needed, decider = "holds", held, must, desc[must - 1]
    elif len(failed) > n_pairs - must:
        status, side, needed, decider = "does not hold", failed, n_pairs - must + 1, desc[::-1][n_pairs - must]
    else:
        return "incomplete", None, desc[-1]
    beyond = [_beyond(j["margin"], j["noise"], j["noise_df"]) for j in side]
    sure, unknown = sum(b is True for b in beyond), sum(b is None for b in beyond)
    return status, (True if sure >= needed else None if sure + unknown >= needed else False), decider


def evaluate_claim(sweep, claim: dict, records: list[dict], store_root: Path | None = None) -> list[dict]:
    """Each metric of a claim: its margin (> 0: it holds) and whether it is beyond noise. Two rows are
    compared paired over the same expressions and seeds where both have per-expression scores (a
    paired bootstrap over expressions, `test` = "paired"), else by their means over the seeds both have
    (`test` = "seeds": the standard error of a difference of means). A claim over several pairs (`best`,
    `worst`, lists of rows) is judged pair by pair (`_verdict`); a margin is the difference beyond the
    one the claim requires (`margin` in the sweep, 0 unless the paper names a gap)."""
    metrics = claim["metric"] if isinstance(claim["metric"], list) else [claim["metric"]]
    out = []
    for m in metrics:
        kind = claim["kind"]
        res: dict[str, Any] = {"table": sweep.name, "id": claim["id"], "text": claim["text"], "metric": m, "kind": kind}
        if kind == "approx":
            a = _row_stats(sweep, records, str(claim["row"]), m)
            if not a[2]:
                out.append({**res, "status": "no results"})
                continue
            tol = max(2.0, 2 * a[1]) if not math.isnan(a[1]) else 2.0
            margin = tol - abs(a[0] - float(claim["value"]))
            res.update(compared=f"{claim['row']} vs {claim['value']}", value=a[0], margin=margin, noise=a[1],
                       noise_df=a[2] - 1 if a[2] > 1 else math.nan, test="seeds (std)")  # one seed: noise NaN, unknown
            res["status"] = "holds" if margin > 0 else "does not hold"
            res["significant"] = _beyond(margin, res["noise"], res["noise_df"])
            out.append(res)
            continue
        if kind not in ("best", "worst", "greater", "less"):
            out.append({**res, "status": f"unknown kind {kind}"})
            continue
        pairs, sign, must = _claim_pairs(sweep, claim)
        need = float(claim.get("margin") or 0.0)
        judged, missing = [], []
        for a_row, b_row in pairs:
            compared = _compare_rows(records, a_row, b_row, m, store_root)
            if compared is None:
                missing.append(f"{a_row} vs {b_row}")
                continue
            diff, noise, df, test = compared
            judged.append(dict(compared=f"{a_row} vs {b_row}", margin=sign * diff - need, noise=noise, noise_df=df,
                               test=test))
        if not judged:
            out.append({**res, "status": "no results"})
            continue
        status, significant, decider = _verdict(judged, len(pairs), must)
        compared = decider["compared"]
        if len(pairs) > 1:
            compared += (f" ({sum(j['margin'] > 0 for j in judged)} of {len(pairs)} pairs hold"
                         + (f", {must} must" if must < len(pairs) else "")
                         + (f"; without results: {', '.join(missing)}" if missing else "") + ")")
        res.update(decider, compared=compared, required_margin=need, status=status, significant=significant)
        out.append(res)
    return out


def claims_report(profile: str, store: ResultStore, reports: str | Path = "reports",
                  seeds: int | None = None) -> tuple[list[dict], Path]:
    """The paper's claims judged on the records each table's sweep declares: its rows, seeds 0..`seeds`-1
    (default: the profile's, as bench.run renders them) and their config hashes."""
    from bench.run import DEFAULT_SEEDS, declared_records
    from bench.sweeps import list_sweeps, load_sweep

    rows = []
    for name in list_sweeps():
        sweep = load_sweep(name)
        # the records its rendered table shows: a --set run of a row, or cells of the profile before it
        # changed, are not the table's claim
        records, _ = declared_records(sweep, profile, store, seeds or DEFAULT_SEEDS[profile])
        for claim in sweep.claims:
            rows.extend(evaluate_claim(sweep, claim, records, store.root))
    out = Path(reports) / "claims"
    out.mkdir(parents=True, exist_ok=True)
    md = _claims_markdown(profile, rows)
    (out / f"{profile}.md").write_text(md)
    (out / f"{profile}.html").write_text(_claims_html(profile, rows))
    # the same rows as data, which docs/findings.md reads (bench.findings)
    data = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    (out / f"{profile}.json").write_text(json.dumps({"profile": profile, "store": str(store.root), "claims": data},
                                                    indent=1) + "\n")
    return rows, out / f"{profile}.md"


def _beyond_text(r: dict) -> str:
    return {True: "yes", False: "no"}.get(r.get("significant"), "-")


def _claims_markdown(profile: str, rows: list[dict]) -> str:
    lines = [f"# The paper's claims on the {profile} profile", "",
             "margin: the difference beyond the gap the claim requires (0 unless the paper names one); > 0 means "
             "the claim holds. A claim over several pairs of rows (best, worst, lists of rows) holds when all of "
             "them hold (or more than half, where it says 'most'), fails once enough of them fail, and is "
             "'incomplete' while rows it needs have no results; 'compared' names the pair that decides it (all "
             "pairs: the closest) and how many hold, and it is beyond noise when as many pairs are. "
             "'beyond noise' = |margin| > t x its standard error, t the "
             f"{100 * BEYOND_NOISE_P:g} % point of Student's t at the error's degrees of freedom (df; 12.7 at one, "
             "2.8 at four, 1.96 at many), '-' where a row has one seed: a training's own spread needs two to "
             "measure. Test: 'paired' compares the two rows over the same expressions and seeds (the error of a "
             f"bootstrap over expressions of the per-expression differences, {BOOTSTRAP_SAMPLES} samples, df "
             "expressions - 1, and of the per-seed mean differences over seeds, df seeds - 1, added in quadrature, "
             "their df by Welch-Satterthwaite); 'seeds' compares the rows' means over the seeds both have (the "
             "standard error of a difference of means, Welch's df), used where a row has no per-expression "
             "scores.", "",
             "| table | claim | metric | compared | margin | noise (SE) | df | test | status | beyond noise |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['table']} | {r['text']} | {r['metric']} | {r.get('compared', '-')} | "
                     f"{format_margin(r.get('margin'))} | {format_margin(r.get('noise'))} | {format_df(r.get('noise_df'))} | "
                     f"{r.get('test', '-')} | {r['status']} | {_beyond_text(r)} |")
    held = sum(r["status"] == "holds" for r in rows)
    evaluated = sum(r["status"] in ("holds", "does not hold") for r in rows)
    incomplete = sum(r["status"] == "incomplete" for r in rows)
    lines += ["", f"{held} of {evaluated} evaluated claim-metric pairs hold; "
                  f"{sum(bool(r.get('significant')) and r['status'] == 'holds' for r in rows)} of them beyond noise"
                  + (f"; {incomplete} incomplete (rows they need have no results)." if incomplete else ".")]
    return "\n".join(lines) + "\n"


def _claims_html(profile: str, rows: list[dict]) -> str:
    body = "".join(
        f"<tr class='{'ok' if r['status'] == 'holds' else ('bad' if r['status'] == 'does not hold' else '')}'>"
        + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            r["table"], r["text"], r["metric"], r.get("compared", "-"), format_margin(r.get("margin")),
            format_margin(r.get("noise")), format_df(r.get("noise_df")), r.get("test", "-"), r["status"],
            _beyond_text(r))) + "</tr>"
        for r in rows)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>claims: {profile}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}td,th{{border-bottom:1px solid #ddd;padding:3px 8px;
font-size:0.9em}}tr.ok td{{background:#eefbea}}tr.bad td{{background:#fdecea}}</style></head><body>
<h1>The paper's claims on the {profile} profile</h1><p>margin: the difference beyond the gap the claim requires (0
unless the paper names one); &gt; 0: the claim holds. A claim over several pairs of rows holds when all hold (or most,
where it says so), fails once enough fail, and is incomplete while rows it needs have no results; 'compared' names the
deciding pair. Beyond noise: |margin| &gt; t x
its standard error (t: Student's two-sided 95 % point at the error's degrees of freedom, df): paired over the same expressions and seeds (a bootstrap over expressions, and the
per-seed differences' spread over seeds) where both rows have per-expression scores, else over the means of the seeds both have
(the test column says which); unknown (-) where a row has one seed.</p><table><tr><th>table</th>
<th>claim</th><th>metric</th><th>compared</th><th>margin</th><th>noise (SE)</th><th>df</th><th>test</th><th>status</th>
<th>beyond noise</th></tr>{body}</table></body></html>
"""


# ---------------------------------------------------------------------------------------------- CLI

@command
def main(argv: list[str] | None = None) -> int:
    p = command_parser("python -m bench.check", __doc__)
    p.add_argument("--profile", default="smoke", help="whose results and baselines (default: smoke)")
    p.add_argument("--results", help="results folder (default results/<profile>)")
    p.add_argument("--reports", default="reports", help="reports folder, for --claims (default: reports)")
    p.add_argument("--baselines", help="baseline JSON (default reports/baselines/<profile>.json)")
    p.add_argument("--tables", default=",".join(DEFAULT_TABLES), help="tables to check or update (default: %(default)s)")
    p.add_argument("--rows", help="comma-separated cells (row names) of those tables to check (default: every "
                                  "cell of the baseline; as bench.run --rows)")
    p.add_argument("--update", action="store_true", help="rewrite the baselines from the store (on purpose only)")
    p.add_argument("--spread", help="with --update: a results folder holding several seeds of the same cells")
    p.add_argument("--rerun", help="with --update: a results folder holding a repeated run (run-to-run spread)")
    p.add_argument("--claims", action="store_true", help="report the paper's claims instead of drift")
    p.add_argument("--seeds", type=int, help="with --claims: seeds per row, as bench.run --seeds (default: the "
                                             "profile's)")
    p.add_argument("--all", action="store_true", help="print every checked metric, not only failures")
    p.add_argument("--pair", nargs=2, metavar=("ROW_A", "ROW_B"),
                   help="print row A minus row B of the one table --tables names, paired over expressions and seeds")
    p.add_argument("--against", metavar="RESULTS_B",
                   help="print each row of the one table --tables names (--rows: those) in --results minus the same "
                        "row in the store RESULTS_B, paired over expressions and seeds (the same cells run two ways)")
    args = p.parse_args(argv)

    store = _existing_store(args.results or Path("results") / args.profile, "--results")
    if args.against:
        if args.pair or args.claims or args.update:
            raise UserError("--against compares two stores; it goes with neither --pair, --claims nor --update")
        print(_against(store, _existing_store(args.against, "--against"), args.tables, args.rows))
        return 0
    if args.pair:
        table = _one_table(args.tables, "--pair compares two rows")
        records = store.select(table=table)
        have = {r.get("row") for r in records}
        missing = [r for r in args.pair if r not in have]
        if missing:
            raise UserError(f"--pair: {store.path} holds no {table} record of row {missing[0]!r} "
                            f"(rows: {', '.join(sorted(map(str, have))) or 'none'})")
        print(_pair_text(*args.pair, table, pair_rows(records, store.root, *args.pair)))
        return 0
    if args.claims:
        rows, path = claims_report(args.profile, store, args.reports, args.seeds)
        print(path.read_text())
        return 0
    tables = [t for t in args.tables.split(",") if t]
    path = Path(args.baselines) if args.baselines else baseline_path(args.profile, args.reports)
    if args.update:
        spread = _existing_store(args.spread, "--spread") if args.spread else None
        rerun = _existing_store(args.rerun, "--rerun") if args.rerun else None
        data = build_baselines(store, args.profile, tables, spread, rerun)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
        n = sum(len(v) for v in data["tables"].values())
        print(f"wrote {path}: {n} cells of {', '.join(data['tables'])}")
        return 0
    if not path.exists():
        print(f"no baselines at {path}; create them with --update", file=sys.stderr)
        return 2
    baselines = json.loads(path.read_text())
    same_env = environment_matches(store, baselines)
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    if wanted:
        known = {row for t in tables for row in baselines["tables"].get(t, {})}
        bad = [r for r in wanted if r not in known]
        if bad:
            raise UserError(f"--rows: no cell {bad[0]!r} in the baseline's {', '.join(tables)} "
                            f"(cells: {', '.join(sorted(known))})")
    rows = compare(store, baselines, tables, exact=same_env, rows_wanted=wanted)
    failures = [r for r in rows if not r["ok"]]
    print(diff_table(rows, only_failures=not args.all))
    exact = sum(r["ok"] and isinstance(r["got"], float) and round(r["got"], 3) == r["expected"] for r in rows)
    mode = ("exact: this run's environment is the baseline's, so any difference fails" if same_env else
            "within each cell's band: this run's environment differs from the baseline's")
    print(f"\n{len(rows) - len(failures)} of {len(rows)} checks pass, {exact} exact; mode {mode} "
          f"({path}, store {store.path})")
    for note in environment_notes(store, baselines):
        print(f"note: run environment differs from the baseline's: {note}")
    return 1 if failures else 0


def _one_table(tables: str, what: str) -> str:
    """The one table --tables names for --pair and --against."""
    names = [t for t in tables.split(",") if t]
    if len(names) != 1:
        raise UserError(f"{what} of one table: give it with --tables (got {tables!r})")
    return names[0]


def _against(store: ResultStore, other: ResultStore, tables: str, rows: str | None) -> str:
    """bench.check --against: each row both stores hold (or those of `rows`) of the one table, this
    store's minus the other's, with each seed's PointM and IoU; a note where a seed ran another config."""
    table = _one_table(tables, "--against compares the rows")
    a, b = store.select(table=table), other.select(table=table)
    both = [r for r in dict.fromkeys(str(x.get("row")) for x in a) if r in {str(x.get("row")) for x in b}]
    wanted = [r.strip() for r in rows.split(",") if r.strip()] if rows else both
    missing = [r for r in wanted if r not in both]
    if missing or not wanted:
        raise UserError(f"--against: {table} row {missing[0]!r} is not in both {store.path} and {other.path}"
                        if missing else f"--against: no {table} row is in both {store.path} and {other.path}")
    out = []
    for row in wanted:
        out.append(_pair_text(f"{row} [{store.root}]", f"{row} [{other.root}]", table,
                              pair_stores(a, store.root, row, b, other.root, row)))
        mine, theirs = ({int(r["seed"]): r for r in recs if str(r.get("row")) == row} for recs in (a, b))
        seeds = sorted(set(mine) & set(theirs))
        for m in ("point_mask", "iou"):  # PointM and IoU of each seed, this store's and the other's
            x, y = ({s: recs[s].get("metrics", {}).get(m, math.nan) for s in seeds} for recs in (mine, theirs))
            out.append(f"  by seed, {m}: " + ", ".join(f"{s}: {x[s]:.2f} - {y[s]:.2f} = {x[s] - y[s]:+.2f}" for s in seeds))
        # a seed's hash names its seed too, so hashes compare seed by seed
        changed = [s for s in seeds if mine[s].get("config_hash") != theirs[s].get("config_hash")]
        if changed:
            s = changed[0]
            out.append(f"  note: the stores ran other configs of this row (seed {s}: config hashes "
                       f"{mine[s].get('config_hash')} and {theirs[s].get('config_hash')})")
        sizes = [sorted({r.get("world_size", 1) for r in recs.values()}) for recs in (mine, theirs)]
        if sizes[0] != sizes[1]:
            out.append(f"  processes per training: {'/'.join(map(str, sizes[0]))} against {'/'.join(map(str, sizes[1]))}")
    return "\n".join(out)


def _existing_store(root: str | Path, option: str) -> ResultStore:
    """The store under `root`; a folder that does not exist (a typo) is one error, not a failure per cell."""
    store = ResultStore(root)
    if not store.root.is_dir():
        raise UserError(f"{option} {store.root}: no such folder (give the folder that python -m bench.run "
                        "--results wrote)")
    if not store.files():
        raise UserError(f"{option} {store.root}: holds no results store ({store.path.name})")
    return store


if __name__ == "__main__":
    sys.exit(main())
