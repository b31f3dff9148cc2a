"""Sweep declarations: one YAML per paper table (`sweeps/<name>.yaml`), loaded and validated.

A sweep is base overrides + ordered rows of dotted-key overrides + the paper's numbers + metrics +
claims + plot kinds (docs/architecture.md "Harness"; sweeps/README.md describes the YAML). A cell
is one (table, row, seed, profile); its config is `ehin.config.load_config(profile, overrides)`,
resolved once by `Sweep.cells` and carried by the cell (and then by bench.jobs.CellSpec) to the job.

Every row is resolved through `load_config` for every profile when the sweep loads, so a typo in
a sweep fails at once with the sweep and row named, never after hours of training a default.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml

from ehin.cli import UserError
from ehin.config import PROFILES, ConfigError, config_hash, get, load_config
from ehin.metrics import REGISTRY

REPO = Path(__file__).resolve().parent.parent
SWEEPS_DIR = REPO / "sweeps"
PAPER_DIR = REPO / "reports" / "paper"

# Paper column -> our metric name: the metric registry (ehin.metrics.REGISTRY).
METRIC_NAMES = {m.column: m.key for m in REGISTRY if m.in_paper}
CLAIM_KINDS = ("best", "worst", "greater", "less", "approx")
PLOT_KINDS = ("curve", "heatmap", "bars", "history")
STAGES = ("1", "2", "1+2", "inference")

_TOP_KEYS = {"table", "title", "stage", "dataset", "split", "paper_csv", "paper_row_key", "metrics",
             "base", "rows", "methods", "cells", "plots", "claims", "profiles", "decimals"}


class SweepError(UserError):
    """A sweep file that cannot be used; the message names the file and the offending entry."""


@dataclass
class Cell:
    """One (table, row, seed, profile) with its config, resolved once (`Sweep.cells`)."""

    table: str
    row: str
    seed: int
    profile: str
    stage: str                     # "1", "2" or "inference" (what bench.jobs.run_cell runs)
    overrides: dict[str, Any]      # flat dotted keys on top of the profile, incl. train.seed (for records)
    config: dict[str, Any]         # load_config(profile, overrides): resolved and validated
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Stable id: independent of the code and of the base config (see config_hash for those)."""
        return f"{self.profile}/{self.table}/{self.row}/seed{self.seed}"

    def config_hash(self) -> str:
        """The cell's hash as bench names it: stage-1 cells leave out the stage-2 sections."""
        return config_hash(self.config, stage="1" if self.stage == "1" else None)


@dataclass
class Sweep:
    name: str
    title: str
    stage: str
    dataset: str | list[str]       # real dataset name(s), as the paper reports
    split: str | list[str]
    metrics: dict[str, str]        # paper column -> our metric name, in the paper's column order
    rows: dict[str, dict[str, Any]]  # ordered: row name -> dotted overrides (without base)
    base: dict[str, Any]
    paper: pd.DataFrame            # index = our rows (declared order), columns = our metric names
    claims: list[dict]
    plots: list[dict]
    stages: dict[str, str] = field(default_factory=dict)   # row -> stage
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    paper_csv: str | None = None
    paper_approx: set[tuple[str, str]] = field(default_factory=set)  # (row, metric) printed as "~x"
    paper_unmatched: list[str] = field(default_factory=list)  # paper rows we do not run (other methods)
    row_meta: dict[str, dict[str, str]] = field(default_factory=dict)  # Table 2: method / column per row
    layout: str = "rows"           # "rows", or "grid" (Table 2: metric x method rows, split columns)
    decimals: int = 2
    path: Path | None = None

    def row_overrides(self, row: str, profile: str | None = None) -> dict[str, Any]:
        """base <- the profile's sweep knobs <- row, as the paper declares them (real dataset names)."""
        if row not in self.rows:
            raise KeyError(f"{self.name}: no row {row!r} (rows: {', '.join(self.rows)})")
        flat: dict[str, Any] = {}
        if isinstance(self.dataset, str):
            flat["data.dataset"] = self.dataset
        if isinstance(self.split, str):
            flat["eval.split"] = self.split
        flat.update(self.base)
        if profile is not None:
            flat.update(self.profiles.get(profile, {}))
        flat.update(self.rows[row])
        return flat

    def run_overrides(self, row: str, profile: str | None) -> dict[str, Any]:
        """`row_overrides` as a cell of `profile` runs them: the dataset mapped to the profile's synth-*
        mirror (`dataset_for_profile`); the declaration itself when profile is None."""
        flat = self.row_overrides(row, profile)
        if profile is not None and "data.dataset" in flat:
            flat["data.dataset"] = dataset_for_profile(flat["data.dataset"], profile)
        return flat

    def resolved(self, row: str, key: str) -> Any:
        """The value a row uses for a dotted key: its overrides, else base.yaml's default."""
        flat = self.row_overrides(row)
        if key in flat:
            return flat[key]
        return get(_defaults(), key)

    def cells(self, profile: str, seeds: list[int] | range | int,
              extra_overrides: dict[str, Any] | None = None, rows: list[str] | None = None) -> list[Cell]:
        """Every (row, seed) in row order, its config resolved (the one place a cell's config is built);
        synthetic profiles map each dataset to its synth-* mirror. `extra_overrides` (dotted keys, e.g.
        bench.run's --set) go over every cell; `rows` picks a subset (default: every row)."""
        if isinstance(seeds, int):
            seeds = range(seeds)
        out = []
        for row in self.rows:
            if rows and row not in rows:
                continue
            base = self.run_overrides(row, profile)
            for seed in seeds:
                overrides = {**base, "train.seed": int(seed), **(extra_overrides or {})}
                try:
                    cfg = load_config(profile=profile, overrides=overrides)
                except ConfigError as e:
                    raise ConfigError(f"sweep {self.name}, row {row!r}, profile {profile}: {e}") from None
                out.append(Cell(table=self.name, row=row, seed=int(seed), profile=profile,
                                stage=self.stages.get(row, self.stage), overrides=overrides, config=cfg))
        return out

    def datasets_used(self, profile: str | None) -> dict[str, str]:
        """row -> "<dataset> <split>" as run under `profile` (the real one when profile is None)."""
        out = {}
        for row in self.rows:
            flat = self.run_overrides(row, profile)
            out[row] = dataset_text(flat["data.dataset"], lambda: flat.get("data.split_by")
                                    or self.resolved(row, "data.split_by"), flat.get("eval.split", "val"))
        return out


def dataset_text(dataset: str, split_by: Callable[[], Any], split: str) -> str:
    """ "<dataset> [(<split_by>)] <split>", as table headers name what a row ran on; `split_by()` is asked
    only for refcocog, the one dataset with two split schemes (google / umd)."""
    return f"{dataset} ({split_by()}) {split}" if "refcocog" in str(dataset) else f"{dataset} {split}"


@lru_cache(maxsize=1)
def _defaults() -> dict:
    return load_config()  # base.yaml alone; read-only here


@lru_cache(maxsize=None)
def _profile_is_synthetic(profile: str) -> bool:
    # A profile whose own default dataset is synth-* runs every table on the synthetic mirrors.
    return str(load_config(profile=profile)["data"]["dataset"]).startswith("synth-")


def dataset_for_profile(dataset: str, profile: str) -> str:
    """refcoco+ -> synth-refcoco+ under smoke/synthetic; unchanged under paper or if already synth-*."""
    if dataset.startswith("synth-") or not _profile_is_synthetic(profile):
        return dataset
    return f"synth-{dataset}"


def list_sweeps(sweeps_dir: Path | None = None) -> list[str]:
    """Sweep names in reading order: table2 ... table10, then figures."""
    names = [p.stem for p in (sweeps_dir or SWEEPS_DIR).glob("*.yaml")]

    def order(name: str) -> tuple:
        m = re.fullmatch(r"([a-z]+)(\d+)", name)
        return (name.startswith("fig"), m.group(1) if m else name, int(m.group(2)) if m else 0)

    return sorted(names, key=order)


def control_sweep() -> Sweep:
    """TESTBED §2.3's positive control, the TRIS-like config on every variant (sweeps/testbed/control.yaml):
    run by bench.testbed, its variants the columns of docs/findings.md's control table."""
    return load_sweep("control", sweeps_dir=SWEEPS_DIR / "testbed")


def load_sweep(name: str, *, sweeps_dir: Path | None = None, paper_dir: Path | None = None,
               validate: bool = True) -> Sweep:
    """Read `sweeps/<name>.yaml`, join the paper's CSV and (with validate) resolve every row."""
    path = (sweeps_dir or SWEEPS_DIR) / f"{name}.yaml"
    if not path.exists():
        raise SweepError(f"no sweep {name!r}: {path} does not exist (known: {', '.join(list_sweeps(sweeps_dir))})")
    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    where = f"sweep {path.name}"
    unknown = [k for k in spec if k not in _TOP_KEYS and not str(k).startswith("_")]
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {unknown} (known: {', '.join(sorted(_TOP_KEYS))})")
    for key in ("table", "title", "stage", "dataset", "split", "metrics"):
        if key not in spec:
            raise SweepError(f"{where}: missing '{key}'")
    if spec["table"] != name:
        raise SweepError(f"{where}: table is {spec['table']!r}, expected the file name {name!r}")
    stage = str(spec["stage"])
    if stage not in STAGES:
        raise SweepError(f"{where}: stage {stage!r} must be one of {STAGES}")

    metrics = dict(spec["metrics"])
    for col, ours in metrics.items():
        if METRIC_NAMES.get(col) != ours:
            raise SweepError(f"{where}: metric column {col!r} must map to {METRIC_NAMES.get(col)!r}, not {ours!r}")

    rows, stages, row_meta, layout = _read_rows(spec, where, stage)
    sweep = Sweep(
        name=name, title=spec["title"], stage=stage, dataset=spec["dataset"], split=spec["split"],
        metrics=metrics, rows=rows, base=dict(spec.get("base") or {}),
        paper=pd.DataFrame(index=pd.Index(list(rows), name="row"), columns=list(metrics.values()), dtype=float),
        claims=list(spec.get("claims") or []), plots=list(spec.get("plots") or []), stages=stages,
        profiles={str(k): dict(v or {}) for k, v in (spec.get("profiles") or {}).items()},
        paper_csv=spec.get("paper_csv"), row_meta=row_meta, layout=layout,
        decimals=int(spec.get("decimals", 2)), path=path,
    )
    for prof in sweep.profiles:
        if prof not in PROFILES:
            raise SweepError(f"{where}: profiles: {prof!r} is not a profile ({', '.join(PROFILES)})")
    if sweep.paper_csv:
        _join_paper(sweep, spec.get("paper_row_key"), paper_dir or PAPER_DIR, where)
    _check_claims(sweep, where)
    _check_plots(sweep, where)
    if validate:
        validate_sweep(sweep)
    return sweep


def _read_rows(spec: dict, where: str, stage: str) -> tuple[dict, dict, dict, str]:
    rows: dict[str, dict[str, Any]] = {}
    stages: dict[str, str] = {}
    meta: dict[str, dict[str, str]] = {}
    if "cells" in spec:
        # Table 2: (method, dataset, split_by, split) cells; a method carries its stage and overrides.
        key = spec.get("paper_row_key") or {}
        if not isinstance(key, dict) or key.get("layout") != "grid":
            raise SweepError(f"{where}: 'cells' needs paper_row_key with layout: grid")
        methods = spec.get("methods") or {}
        for entry in spec["cells"]:
            if not isinstance(entry, list) or len(entry) != 4:
                raise SweepError(f"{where}: cell {entry!r} must be [method, dataset, split_by, split]")
            method, dataset, split_by, split = (str(x) for x in entry)
            if method not in methods:
                raise SweepError(f"{where}: cell {entry!r} names unknown method {method!r}")
            template = key["column"].get(dataset)
            if template is None:
                raise SweepError(f"{where}: no paper column template for dataset {dataset!r}")
            column = template.format(dataset=dataset, split_by=split_by, split=split)
            name = key["row"].format(method=method, column=column)
            if name in rows:
                raise SweepError(f"{where}: duplicate cell {entry!r}")
            rows[name] = {**(methods[method].get("overrides") or {}), "data.dataset": dataset,
                          "data.split_by": split_by, "eval.split": split}
            stages[name] = str(methods[method]["stage"])
            meta[name] = {"method": method, "column": column}
        return rows, stages, meta, "grid"
    if not spec.get("rows"):
        raise SweepError(f"{where}: no rows")
    for row, overrides in spec["rows"].items():
        if overrides is not None and not isinstance(overrides, dict):
            raise SweepError(f"{where}: row {row!r} must map dotted keys to values, got {overrides!r}")
        rows[str(row)] = dict(overrides or {})
        stages[str(row)] = stage
    return rows, stages, meta, "rows"


def _paper_value(raw: str) -> tuple[float, bool]:
    """'25.53' -> (25.53, False); '~1' -> (1.0, True); '' or '-' -> (nan, False)."""
    raw = raw.strip()
    if raw in ("", "-"):
        return math.nan, False
    approx = raw.startswith("~")
    return float(raw.lstrip("~")), approx


def _join_paper(sweep: Sweep, key: Any, paper_dir: Path, where: str) -> None:
    csv = paper_dir / sweep.paper_csv
    if not csv.exists():
        raise SweepError(f"{where}: paper_csv {csv} does not exist")
    # Read as text: row names such as "0.1" must keep the paper's spelling to join.
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    found: list[str] = []
    if isinstance(key, dict):  # grid: one line per (metric, method), one column per split
        ours = {m["method"] for m in sweep.row_meta.values()}
        for _, line in df.iterrows():
            method, metric = line[key["method"]], METRIC_NAMES.get(line[key["metric"]])
            if method not in ours:
                if method not in found:
                    found.append(method)  # another paper's method: shown from the CSV only
                continue
            if metric not in sweep.metrics.values():
                continue
            for column in df.columns:
                name = key["row"].format(method=method, column=column)
                if name in sweep.rows:
                    _set_paper(sweep, name, metric, line[column])
        sweep.paper_unmatched = found
        return
    if not isinstance(key, str):
        raise SweepError(f"{where}: paper_row_key must be a CSV column name or a '{{col}}' template")
    for _, line in df.iterrows():
        try:
            name = key.format(**line.to_dict()) if "{" in key else line[key]
        except KeyError as e:
            raise SweepError(f"{where}: paper_row_key {key!r} names a column {e} not in {csv.name}") from None
        if name not in sweep.rows:
            found.append(name)
            continue
        for col, ours in sweep.metrics.items():
            if col not in df.columns:
                raise SweepError(f"{where}: metric column {col!r} not in {csv.name}")
            _set_paper(sweep, name, ours, line[col])
    sweep.paper_unmatched = found


def _set_paper(sweep: Sweep, row: str, metric: str, raw: str) -> None:
    value, approx = _paper_value(raw)
    sweep.paper.loc[row, metric] = value
    if approx:
        sweep.paper_approx.add((row, metric))


def _check_claims(sweep: Sweep, where: str) -> None:
    ids = set()
    for claim in sweep.claims:
        cid = claim.get("id")
        if not cid or cid in ids:
            raise SweepError(f"{where}: every claim needs a unique id ({claim!r})")
        ids.add(cid)
        kind = claim.get("kind")
        if kind not in CLAIM_KINDS:
            raise SweepError(f"{where}: claim {cid}: kind {kind!r} not in {CLAIM_KINDS}")
        needs = {"best": ("row",), "worst": ("row",), "greater": ("a", "b"), "less": ("a", "b"),
                 "approx": ("row", "value")}[kind] + ("metric", "text")
        missing = [k for k in needs if claim.get(k) is None]
        if missing:
            raise SweepError(f"{where}: claim {cid} ({kind}) lacks {missing}")
        metrics = claim.get("metric")
        for m in metrics if isinstance(metrics, list) else [metrics]:
            if m not in sweep.metrics.values():
                raise SweepError(f"{where}: claim {cid}: metric {m!r} not among {list(sweep.metrics.values())}")
        named = []
        for field_ in ("row", "a", "b", "over"):
            v = claim.get(field_)
            named += v if isinstance(v, list) else ([v] if v is not None else [])
        for row in named:
            if str(row) not in sweep.rows:
                raise SweepError(f"{where}: claim {cid}: unknown row {row!r}")
        a, b = claim.get("a"), claim.get("b")
        if isinstance(a, list) and isinstance(b, list) and len(a) != len(b):
            raise SweepError(f"{where}: claim {cid}: a and b must pair up ({len(a)} vs {len(b)})")
        if claim.get("quantifier") not in (None, "all", "most"):
            raise SweepError(f"{where}: claim {cid}: quantifier {claim['quantifier']!r} is neither 'all' nor 'most'")


def _check_plots(sweep: Sweep, where: str) -> None:
    for plot in sweep.plots:
        if plot.get("kind") not in PLOT_KINDS:
            raise SweepError(f"{where}: plot kind {plot.get('kind')!r} not in {PLOT_KINDS}")
        for row in plot.get("rows") or []:
            if row not in sweep.rows:
                raise SweepError(f"{where}: plot {plot!r} names unknown row {row!r}")


def validate_sweep(sweep: Sweep, profiles: tuple[str, ...] = PROFILES) -> None:
    """Every row's overrides are keys of base.yaml and resolve through load_config under each profile."""
    default = _defaults()
    for row in sweep.rows:
        for prof in (None, *profiles):
            for key in sweep.row_overrides(row, prof):
                try:
                    leaf = get(default, key)
                except (KeyError, TypeError):
                    raise ConfigError(f"sweep {sweep.name}, row {row!r}: unknown config key '{key}'") from None
                if isinstance(leaf, dict):
                    raise ConfigError(f"sweep {sweep.name}, row {row!r}: '{key}' is a section, not a key")
    for prof in profiles:
        sweep.cells(prof, [0])  # resolves every row's config; a ConfigError names the row
