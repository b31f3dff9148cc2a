"""Render a sweep's stored results beside the paper's numbers: one table, three formats.

Input is the sweep and the store's records (docs/architecture.md: `{table, row, seed, profile,
config_hash, code_version, metrics, history, timings, host, device, ...}`). Output is the reproduced
mean ± std over seeds, the paper's number and the difference, in the paper's row and column order.
Rows without records stay in the table as "pending", or "failed" when the caller names them as
rows whose cell failed (the store holds finished cells only). Nothing here invents a number: every
value shown is either a record's or the paper CSV's.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
import yaml

from bench.sweeps import Sweep, dataset_text
from ehin.config import HASH_IGNORE, HASH_PINNED, STAGE2_KEYS

PENDING, PARTIAL, DONE, FAILED = "pending", "partial", "done", "failed"
CELL_FIELDS = ["n", "mean", "std", "paper", "diff"]


def format_margin(x) -> str:
    """A margin or its noise: two decimals, or two significant digits below 0.1 (Table 10's seconds would
    all read +0.00)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.2f}" if x == 0 or abs(x) >= 0.1 else f"{x:+.2g}"


def format_df(df: float | None) -> str:
    """An error's degrees of freedom (bench.check): one decimal below 100, whole above, '-' when unknown."""
    if df is None or math.isnan(df):
        return "-"
    return f"{df:.1f}" if df < 100 else f"{df:.0f}"


_REAL_NAMES = {"refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "RefCOCOg", "referit": "ReferIt"}


# ---------------------------------------------------------------------------- records -> numbers

def select_records(sweep: Sweep, records: Iterable[dict], profile: str | None = None) -> tuple[str | None, list[dict]]:
    """This table's records of one profile, the newest per (row, seed) (later in the list wins)."""
    mine = [r for r in records if r.get("table") == sweep.name]
    profiles = sorted({str(r.get("profile")) for r in mine})
    if profile is None:
        if len(profiles) > 1:
            raise ValueError(f"{sweep.name}: records of several profiles {profiles}; pass profile=")
        profile = profiles[0] if profiles else None
    newest: dict[tuple[str, int], dict] = {}
    for r in mine:
        if str(r.get("profile")) == profile:
            newest[(str(r.get("row")), int(r.get("seed", 0)))] = r
    return profile, list(newest.values())


def split_by_config(records: Iterable[dict], expected: dict[tuple[str, int], str]) -> tuple[list[dict], list[dict]]:
    """(shown, left_out): the newest record of each expected cell, (row, seed) -> config hash, and every
    other record of those rows. A table never mixes configs: a `--set` run of one row stays out of the
    table of the declared sweep, and the header says so."""
    shown: dict[tuple[str, int], dict] = {}
    left = []
    for r in records:  # append order: a later record of the same cell replaces an earlier one
        key = (str(r.get("row")), int(r.get("seed", 0)))
        if key in expected and r.get("config_hash") == expected[key]:
            if key in shown:
                left.append(shown[key])
            shown[key] = r
        else:
            left.append(r)
    return list(shown.values()), left


def _metric_value(record: dict, metric: str) -> float | None:
    # Table 10 reports time; a runner may keep it under timings rather than metrics.
    for section in ("metrics", "timings"):
        value = (record.get(section) or {}).get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def seed_values(sweep: Sweep, records: Iterable[dict], profile: str | None = None) -> pd.DataFrame:
    """Long table of every stored number: columns row, seed, metric, value (rows of this sweep only)."""
    _, recs = select_records(sweep, records, profile)
    out = []
    for r in recs:
        if r.get("row") not in sweep.rows:
            continue  # a row no longer declared: never shown under another row's name
        for metric in sweep.metrics.values():
            value = _metric_value(r, metric)
            if value is not None:
                out.append({"row": r["row"], "seed": int(r.get("seed", 0)), "metric": metric, "value": value})
    return pd.DataFrame(out, columns=["row", "seed", "metric", "value"])


def render_cells(sweep: Sweep, records: Iterable[dict], *, profile: str | None = None,
                 seeds: Iterable[int] | None = None, failed: Iterable[str] = ()) -> pd.DataFrame:
    """One line per (row, metric) in the paper's order: n, mean, std (sample, ddof 1), paper, diff, status.

    `seeds`: the seeds the sweep was meant to run; rows with fewer are "partial".
    `failed`: rows with a failed cell; they are "failed" unless every seed is done.
    """
    values = seed_values(sweep, records, profile)
    expected = len(set(seeds)) if seeds is not None else None
    failed = set(failed)
    lines = []
    for row in sweep.rows:
        for metric in sweep.metrics.values():
            v = values.loc[(values.row == row) & (values.metric == metric), "value"]
            n = int(len(v))
            mean = float(v.mean()) if n else math.nan
            std = float(v.std(ddof=1)) if n > 1 else math.nan
            paper = float(sweep.paper.loc[row, metric]) if metric in sweep.paper.columns else math.nan
            status = PENDING if n == 0 else PARTIAL if expected is not None and n < expected else DONE
            if row in failed and status != DONE:
                status = FAILED
            lines.append({"row": row, "metric": metric, "n": n, "mean": mean, "std": std, "paper": paper,
                          "diff": mean - paper, "status": status})
    return pd.DataFrame(lines, columns=["row", "metric", *CELL_FIELDS, "status"])


def render_table(sweep: Sweep, records: Iterable[dict], *, profile: str | None = None,
                 seeds: Iterable[int] | None = None, failed: Iterable[str] = ()) -> pd.DataFrame:
    """Wide table: index = rows (paper order); columns (paper metric label, field) + ("status", "")."""
    cells = render_cells(sweep, records, profile=profile, seeds=seeds, failed=failed)
    label = {ours: col for col, ours in sweep.metrics.items()}
    columns = pd.MultiIndex.from_tuples([(label[m], f) for m in sweep.metrics.values() for f in CELL_FIELDS]
                                        + [("status", "")])
    table = pd.DataFrame(index=pd.Index(list(sweep.rows), name="row"), columns=columns, dtype=object)
    for line in cells.itertuples(index=False):
        for f in CELL_FIELDS:
            table.loc[line.row, (label[line.metric], f)] = getattr(line, f)
    for row in sweep.rows:
        table.loc[row, ("status", "")] = row_status(set(cells.loc[cells.row == row, "status"]))
    return table


def row_status(states: set[str]) -> str:
    """A row's status from its metrics': failed if a cell failed, pending only if no metric has a
    value, partial if any metric lacks seeds."""
    if FAILED in states:
        return FAILED
    return PENDING if states == {PENDING} else PARTIAL if states & {PARTIAL, PENDING} else DONE


# ---------------------------------------------------------------------------- header

def header(sweep: Sweep, records: Iterable[dict], *, profile: str | None = None,
           left_out: Iterable[dict] = (), fidelity: dict | None = None,
           fidelity_source: str | None = None) -> dict[str, Any]:
    """What the numbers are: profile, seeds, datasets used vs the paper's, code versions, config
    hashes shown and records left out (`split_by_config`), metrics protocol, hardware, and, where
    `fidelity_source` names the testbed's verdicts file (`fidelity` its content, None if it does not
    exist), what TESTBED.md says of the testbed they ran on (`testbed_status`)."""
    profile, recs = select_records(sweep, records, profile)
    recs = [r for r in recs if r.get("row") in sweep.rows]
    real = sweep.datasets_used(None)
    used = sweep.datasets_used(profile) if profile else {}
    beyond = overrides_beyond_rows(sweep, recs, profile)
    # a --set of the data leaves the declaration of the rows not run yet untrue too: they are left out
    data_moved = any(a.split("=", 1)[0] in ("data.dataset", "data.split_by", "eval.split") for a in beyond)
    for row in list(used):  # what the records ran on, where a --set changed the declared dataset or split
        ran = sorted({text for r in recs if r.get("row") == row
                      and (text := _dataset_run(r, lambda: sweep.resolved(row, "data.split_by")))})
        if ran:
            used[row] = " / ".join(ran)
        elif data_moved:
            del used[row]
    pairs: list[str] = []
    for row in sweep.rows:
        if data_moved and row not in used:
            continue
        paper_ds = _pretty_dataset(real[row])
        text = f"{used[row]} (paper: {paper_ds})" if row in used else f"paper: {paper_ds}"
        if text not in pairs:
            pairs.append(text)
    hardware = sorted({_hardware(r) for r in recs})
    order = {row: i for i, row in enumerate(sweep.rows)}
    in_order = sorted(recs, key=lambda r: (order[r["row"]], int(r.get("seed", 0))))  # rows as declared, seeds up
    from ehin.metrics import COLLAPSED_PCT, PROTOCOL_BEFORE  # PROTOCOL_BEFORE: records before it was recorded

    return {
        "table": sweep.name,
        "title": sweep.title,
        "profile": profile or "none (no records)",
        "seeds": sorted({int(r.get("seed", 0)) for r in recs}),
        "records": len(recs),
        "datasets": pairs,
        "code_versions": sorted({str(r.get("code_version", "unknown")) for r in recs}),
        "config_hashes": {row: sorted({str(r.get("config_hash")) for r in recs if r.get("row") == row})
                          for row in sweep.rows if any(r.get("row") == row for r in recs)},
        "left_out": [{"row": r.get("row"), "seed": r.get("seed"), "config_hash": r.get("config_hash"),
                      "code_version": r.get("code_version")} for r in left_out],
        "metrics_protocols": sorted({str(r.get("metrics_protocol", PROTOCOL_BEFORE)) for r in recs}),
        "hardware": hardware,
        "collapsed": collapsed_cells(in_order, COLLAPSED_PCT),
        "language_blind": language_blind_check(in_order, profile, fidelity),
        "stage1_retrained": stage1_retrained(in_order),
        "set": beyond,
        # the paper's lines this sweep does not run (other methods) and rows the paper has no line for
        "paper_only": list(sweep.paper_unmatched),
        "without_paper": [row for row in sweep.rows if sweep.paper_csv and sweep.paper.loc[row].isna().all()],
        "testbed": (testbed_status(recs, profile, fidelity, fidelity_source) if recs else "-")
        if fidelity_source is not None else None,
    }


# Overrides that say how or where a cell ran, not what: the seed (a row's seeds are the table's), the
# speed levers that leave results alone (HASH_IGNORE, HASH_PINNED), and where the data and weights lie (the
# paper profile's documented --set; the records' `inputs` hold the files' sha256).
NOT_A_CHANGE = ("train.seed", *HASH_IGNORE, *HASH_PINNED, "data.root", "data.image_root",
                "backbone.pretrained", "scorer.pretrained")


def overrides_beyond_rows(sweep: Sweep, records: Iterable[dict], profile: str | None) -> list[str]:
    """ "key=value" (the value as YAML, as `--set` reads it) of every override the records ran with beyond
    their rows' declaration (a `bench.run --set`), sorted: a table run so is not the paper's table, and
    its header says how not."""
    out: set[str] = set()
    for r in records:
        if r.get("row") not in sweep.rows:
            continue
        declared = sweep.run_overrides(r["row"], profile)
        out |= {f"{k}={_yaml_scalar(v)}" for k, v in (r.get("overrides") or {}).items()
                if k not in NOT_A_CHANGE and (k not in declared or declared[k] != v)}
    return sorted(out)


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def collapsed_cells(records: Iterable[dict], threshold: float) -> list[dict[str, Any]]:
    """The cells whose last evaluation gave an empty map (no pixel > 0) on at least `threshold` percent of
    the val expressions (the trainer's `empty_maps`): row, seed and that share, in the records' order."""
    out = []
    for r in records:
        evaluated = [h for h in r.get("history") or [] if "empty_maps" in h]
        if evaluated and evaluated[-1]["empty_maps"] >= threshold:
            out.append({"row": r.get("row"), "seed": r.get("seed"), "empty_maps": evaluated[-1]["empty_maps"]})
    return out


def language_blind_check(records: Iterable[dict], profile: str | None,
                         fidelity: dict | None) -> dict[str, Any] | None:
    """Each record's PointM against the language-blind guess of the split it was evaluated on (TESTBED §2.3:
    the random-object guess, `language_blind` of fidelity.json's variant of that dataset, split_by and
    split; computed from the scenes alone, no model). Only records that loaded the dataset fidelity.json
    froze (its sha256) are compared. Returns {"below": [row, seed, PointM, the guess and the share of
    expressions whose peak fell on any annotated object (`point_any_object`, None in older records)],
    "compared": {row: records compared}, "not_compared": records without a guess (another split, dataset
    or no checksum)}, in the records' order; None where `fidelity` does not judge `profile`."""
    if fidelity is None or profile != fidelity.get("profile"):
        return None
    guess = {(v.get("dataset"), v.get("split_by"), v.get("split")): v["language_blind"]
             for v in (fidelity.get("variants") or {}).values() if v.get("language_blind") is not None}
    frozen = (fidelity.get("frozen") or {}).get("datasets") or {}
    below, compared, not_compared = [], {}, 0
    for r in records:
        ds = (r.get("inputs") or {}).get("dataset") or {}
        same_data = ds.get("sha256") and frozen.get(f"{ds.get('name')}:{ds.get('split_by')}") == ds.get("sha256")
        split = (r.get("overrides") or {}).get("eval.split", "val")
        blind = guess.get((ds.get("name"), ds.get("split_by"), split)) if same_data else None
        point_m = _metric_value(r, "point_mask")
        if blind is None or point_m is None:
            not_compared += 1
            continue
        compared[r.get("row")] = compared.get(r.get("row"), 0) + 1
        if point_m < blind:
            below.append({"row": r.get("row"), "seed": r.get("seed"), "point_mask": point_m, "language_blind": blind,
                          "point_any_object": _metric_value(r, "point_any_object")})
    return {"below": below, "compared": compared, "not_compared": not_compared}


def stage1_retrained(records: Iterable[dict]) -> list[dict[str, Any]]:
    """The Stage-2 cells whose labels came from another training of stage 1 than the model their Stage-1 row
    evaluated: a chain run in a later sitting than its Stage-1 cell, with that checkpoint gone, trains stage 1
    again, and a GPU training is not bit-reproducible, so the two stage-1 models differ and can differ a lot (a
    Stage-2 row then does not build on the Stage-1 row beside it, as the paper's do). A cell's Stage-1 row is the
    stored Stage-1 record of its table, seed, split and overrides, the stage-2-only sections (STAGE2_KEYS) and
    NOT_A_CHANGE aside; the models are the same when both records name the same `stage1_weights` or, in records
    before that key, when the stage-1 figures the Stage-2 cell stored equal the Stage-1 cell's. Returns [row,
    seed, the PointM of the stage 1 its labels came from (`stage1_metrics`) and the Stage-1 cell's], in the
    records' order; cells without `stage1_metrics`, a Stage-1 record or PointM in both are not named."""
    def stage1_key(r: dict) -> tuple:
        kept = {k: v for k, v in (r.get("overrides") or {}).items()
                if k not in NOT_A_CHANGE and k.split(".")[0] not in STAGE2_KEYS}
        return r.get("table"), r.get("seed"), json.dumps(kept, sort_keys=True, default=str)

    recs = list(records)
    stage1 = {stage1_key(r): r for r in recs if str(r.get("stage")) == "1"}
    out = []
    for r in recs:
        own = r.get("stage1_metrics")
        partner = stage1.get(stage1_key(r)) if str(r.get("stage")) == "2" and own else None
        if partner is None:
            continue
        figures = {m: (_metric_value({"metrics": own}, m), _metric_value(partner, m)) for m in ("point_mask", "iou")}
        weights, partner_weights = r.get("stage1_weights"), partner.get("stage1_weights")
        same = weights == partner_weights if weights and partner_weights else all(a == b for a, b in figures.values())
        pointm = figures["point_mask"]
        if not same and None not in pointm:
            out.append({"row": r.get("row"), "seed": r.get("seed"), "stage1_point_mask": pointm[0],
                        "stage1_row_point_mask": pointm[1], "stage1_row": partner.get("row")})
    return out


# TESTBED §2's criteria as bench.testbed --fidelity names them in fidelity.json's per-variant "met".
TESTBED_CRITERIA = {"scenes": "§2.1", "scorer": "§2.2", "control": "§2.3", "power": "§2.4"}


def testbed_status(records: Iterable[dict], profile: str | None, fidelity: dict | None, source: str) -> str:
    """What TESTBED.md says of the testbed these records ran on, from `fidelity` (reports/testbed/fidelity.json,
    written by `bench.testbed --fidelity`; `source` names it): the criteria met and missed, if every record
    loaded the datasets and CLIP checkpoints that file judged (their sha256 in the records' `inputs`).
    The testbed's rule (reports/testbed/README.md) has every table run on it name the criteria it misses."""
    recs = list(records)
    if recs and all(r.get("stage") == "inference" for r in recs):  # Table 10: seconds per sample
        return "does not apply (these cells time the model on generated inputs; they read no dataset)"
    if fidelity is None:
        return f"not judged (no {source}: `python -m bench.testbed --fidelity`)"
    if profile != fidelity["profile"]:
        return f"not judged (TESTBED judges the {fidelity['profile']} profile: {source})"
    frozen = fidelity["frozen"]
    weights = {c["sha256"] for c in frozen["checkpoints"]}

    def judged(r: dict) -> bool:
        inputs = r.get("inputs") or {}
        ds = inputs.get("dataset") or {}
        shas = [w.get("sha256") for role in ("backbone", "scorer") if (w := inputs.get(role))]
        frozen_ds = frozen["datasets"].get(f"{ds.get('name')}:{ds.get('split_by')}")
        return bool(shas) and all(sha in weights for sha in shas) and frozen_ds is not None and frozen_ds == ds.get("sha256")

    other = sum(not judged(r) for r in recs)
    if other:
        return f"not the one judged in {source}: {other} of {len(recs)} records loaded other datasets or CLIP weights"
    met, missed = [], []
    for key, section in TESTBED_CRITERIA.items():
        off = [name for name, v in fidelity["variants"].items() if v["met"].get(key) is not True]
        if key == "power":
            off = _power_misses(fidelity, off)
        (missed if off else met).append(section if not off else f"{section} ({', '.join(off)})")
    settings = ", ".join(f"{k}={v}" for k, v in fidelity.get("overrides", {}).items())
    return (f"judged in {source}" + (f" (its control: {settings})" if settings else "")
            + f"; met: {', '.join(met) or 'none'}; missed: {', '.join(missed) or 'none'}")


def _power_misses(fidelity: dict, variants_off: list[str]) -> list[str]:
    """What TESTBED §2.4 misses by fidelity.json: the control incomplete, too few seeds or expressions, the
    pooled seed std, each variant whose std is over its bound (`variants_off`)."""
    power = fidelity.get("power")
    if power is None:  # a file from before bench.testbed recorded §2.4's other checks
        return [] if fidelity.get("all_met") is True else ["its seeds and expressions not recorded"]
    off = [] if power["complete"] else ["the control incomplete"]
    if not power["enough_seeds"]:
        off.append(f"{power['seeds']} seeds, not {power['seeds_asked']}")
    if not power["expressions_met"]:
        off.append(f"fewer than {power['min_expressions']} expressions on a split")
    pooled = fidelity.get("pooled_std")
    if pooled is None:
        off.append("pooled seed std not computed")
    elif fidelity.get("pooled_met") is not True:
        off.append(f"pooled seed std {pooled:.2f} > {power['pooled_std_max']:g}")
    if variants_off:
        off.append(f"std > {power['variant_std_max']:g} on {', '.join(variants_off)}")
    return off


def _dataset_run(record: dict, declared_split_by: Callable[[], Any]) -> str | None:
    """ "<dataset> [(<split_by>)] <split>" as the record ran it (its overrides, with `bench.run --set`'s),
    in `Sweep.datasets_used`'s form; None for a record that names no dataset. The split scheme: the
    record's override, else the one its inputs name, else `declared_split_by()` (the row's resolved one)."""
    o = record.get("overrides") or {}
    if not o.get("data.dataset"):
        return None
    return dataset_text(o["data.dataset"], lambda: o.get("data.split_by") or (
        (record.get("inputs") or {}).get("dataset") or {}).get("split_by") or declared_split_by(),
        o.get("eval.split", "val"))


def _pretty_dataset(text: str) -> str:
    name, _, rest = text.partition(" ")
    return f"{_REAL_NAMES.get(name, name)} {rest}".strip()


def _hardware(record: dict) -> str:
    host = record.get("host")
    if isinstance(host, dict):  # host_info() stored whole
        record = {**host, **record}
        host = host.get("host")
    device = str(record.get("device") or "?")
    gpu = record.get("gpu")
    if gpu and str(gpu) not in device:
        device = f"{device} ({gpu})"
    cpu = record.get("cpu_model")
    if cpu and device == "cpu":
        device = f"cpu ({cpu}, {record.get('threads', '?')} threads, {record.get('numerics', 'native')} numerics)"
    return f"{device} on {host}" if host else device


def header_lines(info: dict[str, Any]) -> list[str]:
    # cells.json files written before a key existed lack it (testbed, collapsed, language_blind): no line then
    seeds = ", ".join(map(str, info["seeds"])) or "none"
    return [
        f"profile: {info['profile']}; seeds: {seeds} ({info['records']} records)",
        "dataset: " + "; ".join(info["datasets"]),
        "code: " + (", ".join(info["code_versions"]) or "-"),
        "configs: " + _configs_line(info),
        "evaluation: " + (", ".join(info.get("metrics_protocols", [])) or "-"),
        "hardware: " + (", ".join(info["hardware"]) or "-"),
    ] + ([f"testbed: {info['testbed']}"] if info.get("testbed") else []) + (
        [f"run with `{set_flags(info['set'])}` (not the paper's configuration)"] if info.get("set") else []
    ) + ([f"the paper's table also has, not run here: {', '.join(info['paper_only'])}"]
         if info.get("paper_only") else []) + (
        [f"rows without a line in the paper's table: {', '.join(info['without_paper'])}"]
        if info.get("without_paper") else []) + _collapsed_lines(info) + _below_language_blind_lines(info) + (
        _stage1_retrained_lines(info))


def set_flags(assignments: Iterable[str]) -> str:
    """The `bench.run` flags that give these overrides: one `--set KEY=VALUE` each."""
    return " ".join(f"--set {a}" for a in assignments)


def _collapsed_lines(info: dict[str, Any]) -> list[str]:
    from ehin.metrics import COLLAPSED_PCT

    cells = info.get("collapsed") or []
    if not cells:
        return []
    rows = _seeds_by_row(cells, lambda c: f"{c['empty_maps']:.0f} %")
    return [f"collapsed (an empty map on ≥ {COLLAPSED_PCT:g} % of the val expressions at the last evaluation: "
            f"the scores of predicting no foreground, not of ranking regions): {rows}"]


def _seeds_by_row(cells: list[dict[str, Any]], describe: Callable[[dict[str, Any]], str]) -> str:
    """ "row, seed 0 (what), 1 (what); row2, seed ..." for a header line naming cells (in their order)."""
    by_row: dict[str, list[str]] = {}
    for c in cells:
        by_row.setdefault(str(c["row"]), []).append(f"{c['seed']} ({describe(c)})")
    return "; ".join(f"{row}, seed {', '.join(seeds)}" for row, seeds in by_row.items())


def _below_language_blind_lines(info: dict[str, Any]) -> list[str]:
    check = info.get("language_blind") or {}
    cells = check.get("below") or []
    if not cells:
        return []
    rows = _seeds_by_row(cells, lambda c: f"{c['point_mask']:.1f} against {c['language_blind']:.1f}" + (
        f"; {c['point_any_object']:.1f} % on an object" if c.get("point_any_object") is not None else ""))
    skipped = check.get("not_compared") or 0
    return ["below the language-blind guess (PointM under the random-object guess of its split, TESTBED §2.3, "
            "from the testbed's verdicts file; in parentheses the cell's PointM, the guess and the share of "
            f"expressions whose peak fell on any annotated object): {rows}"
            + (f" ({skipped} records not compared: no guess for their split or dataset)" if skipped else "")]


def _stage1_retrained_lines(info: dict[str, Any]) -> list[str]:
    cells = info.get("stage1_retrained") or []
    if not cells:
        return []
    rows = _seeds_by_row(cells, lambda c: f"{c['stage1_point_mask']:.1f} against {c['stage1_row_point_mask']:.1f}")
    return ["on another training of stage 1 than their Stage-1 row's (the chain trained stage 1 again in a later "
            "sitting, and GPU trainings are not bit-reproducible; in parentheses the stage-1 PointM of the model "
            f"its labels came from, and the Stage-1 row's): {rows}"]


def _configs_line(info: dict[str, Any]) -> str:
    hashes = sorted({h for hs in info.get("config_hashes", {}).values() for h in hs})
    shown = (f"{hashes[0]}" if len(hashes) == 1 else f"{len(hashes)} config hashes (one per row and seed; "
             "cells.json lists them)") if hashes else "none"
    left = info.get("left_out", [])
    if not left:
        return f"{shown}; no stored record of another config left out"
    by_row: dict[str, int] = {}
    for r in left:
        by_row[str(r["row"])] = by_row.get(str(r["row"]), 0) + 1
    rows = ", ".join(f"{row} {n}" for row, n in by_row.items())
    return f"{shown}; left out {len(left)} stored record(s) of other configs or older runs ({rows})"


# ---------------------------------------------------------------------------- display strings

def _fmt(x: float, d: int, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.{d}f}" if signed else f"{x:.{d}f}"


def _ours(line: Any, d: int) -> str:
    if line.n == 0:
        return FAILED if line.status == FAILED else PENDING
    text = _fmt(line.mean, d)
    return text + (f" ± {_fmt(line.std, d)}" if line.n > 1 else "")


def _paper(sweep: Sweep, row: str, metric: str, value: float, d: int) -> str:
    text = _fmt(value, d)
    return "≈" + text if (row, metric) in sweep.paper_approx else text


def display(sweep: Sweep, cells: pd.DataFrame) -> tuple[list[str], list[list[str]], list[str]]:
    """(column names, rows of strings, status per row) for every output format."""
    d = sweep.decimals
    label = {ours: col for col, ours in sweep.metrics.items()}
    by = {(c.row, c.metric): c for c in cells.itertuples(index=False)}
    has_paper = bool(sweep.paper_csv)
    if sweep.layout == "grid":
        # Table 2: rows (metric, method), one column per dataset split; "ours ± std (paper)", and the seeds
        # of a cell that has fewer than the sweep's (no seeds column here); a line's status is its cells'.
        methods = list(dict.fromkeys(m["method"] for m in sweep.row_meta.values()))
        columns = list(dict.fromkeys(m["column"] for m in sweep.row_meta.values()))
        names = {(m["method"], m["column"]): row for row, m in sweep.row_meta.items()}
        out, states = [], []
        for metric in sweep.metrics.values():
            for method in methods:
                line = [label[metric], method]
                line_states = set()
                for column in columns:
                    row = names.get((method, column))
                    if row is None:
                        line.append("")
                        continue
                    c = by[(row, metric)]
                    line_states.add(c.status)
                    seeds = f", {c.n} seed{'s' if c.n != 1 else ''}" if c.status == PARTIAL else ""
                    line.append(f"{_ours(c, d)} ({_paper(sweep, row, metric, c.paper, d)}){seeds}")
                out.append(line)
                states.append(row_status(line_states))
        return ["Metric", "Method", *columns], out, states
    columns = ["Row"]
    for metric in sweep.metrics.values():
        columns += [label[metric]] + ([f"{label[metric]} paper", f"{label[metric]} Δ"] if has_paper else [])
    columns += ["seeds", "status"]
    out, states = [], []
    for row in sweep.rows:
        line = [row]
        ns, row_states = [], set()
        for metric in sweep.metrics.values():
            c = by[(row, metric)]
            ns.append(c.n)
            row_states.add(c.status)
            line.append(_ours(c, d))
            if has_paper:
                line += [_paper(sweep, row, metric, c.paper, d), _fmt(c.diff, d, signed=True)]
        status = row_status(row_states)
        line += [str(max(ns)), status]
        out.append(line)
        states.append(status)
    return columns, out, states


# ---------------------------------------------------------------------------- formats

def to_markdown(title: str, lines: list[str], columns: list[str], rows: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    out = [f"### {title}", ""] + [f"- {x}" for x in lines] + [""]
    out.append("| " + " | ".join(esc(c) for c in columns) + " |")
    n_names = 2 if columns[:2] == ["Metric", "Method"] else 1
    out.append("|" + "|".join("---" if i < n_names else "---:" for i in range(len(columns))) + "|")
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
        "±": r"$\pm$", "≈": r"$\approx$", "Δ": r"$\Delta$", "–": "--", "α": r"$\alpha$", "β": r"$\beta$"}


def tex_escape(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in s)


def to_latex(title: str, lines: list[str], columns: list[str], rows: list[list[str]], label: str) -> str:
    spec = "l" * (2 if columns[:2] == ["Metric", "Method"] else 1)
    spec += "r" * (len(columns) - len(spec))
    out = [
        "% Generated by bench.render from the results store; needs \\usepackage{booktabs}.",
        "\\begin{table}[t]", "\\centering", "\\scriptsize",
        f"\\caption{{{tex_escape(title)}. {tex_escape('; '.join(lines))}}}",
        f"\\label{{tab:{label}}}",
        f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
        " & ".join(tex_escape(c) for c in columns) + " \\\\", "\\midrule",
    ]
    out += [" & ".join(tex_escape(c) for c in r) + " \\\\" for r in rows]
    out += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
h3{margin-bottom:.3em} ul{color:#555;font-size:.9em;margin-top:0}
.scroll{overflow-x:auto;max-width:100%} table{border-collapse:collapse;font-size:.85em}
th,td{padding:.3em .6em;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}
th{background:#f3f3f3;border-bottom:2px solid #999} td.name{text-align:left;font-weight:600}
tr :first-child{position:sticky;left:0;background:#fff} th:first-child{background:#f3f3f3}
tr.pending td{color:#999;font-style:italic} tr.partial td{color:#8a6d00} tr.failed td{color:#b00020}"""


def to_html(title: str, lines: list[str], columns: list[str], rows: list[list[str]], states: list[str]) -> str:
    n_names = 2 if columns[:2] == ["Metric", "Method"] else 1
    out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h3>{html.escape(title)}</h3>", "<ul>"]
    out += [f"<li>{html.escape(x)}</li>" for x in lines]
    # The scroll box lets an 18-column table scroll sideways instead of running off the page.
    out += ["</ul>", "<div class='scroll'><table>",
            "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"]
    for r, state in zip(rows, states):
        tds = "".join(f"<td class='name'>{html.escape(c)}</td>" if i < n_names else f"<td>{html.escape(c)}</td>"
                      for i, c in enumerate(r))
        out.append(f"<tr class='{state}'>{tds}</tr>")
    out += ["</table></div>", "</body></html>"]
    return "\n".join(out) + "\n"


def _json_safe(x: Any) -> Any:
    return None if isinstance(x, float) and math.isnan(x) else x


def write_tables(sweep: Sweep, records: Iterable[dict], out_dir: str | Path, *, profile: str | None = None,
                 seeds: Iterable[int] | None = None, failed: Iterable[str] = (),
                 left_out: Iterable[dict] = (), fidelity_file: str | Path | None = None) -> dict[str, Path]:
    """Write table.md, table.tex, table.html and cells.json into out_dir; return their paths.
    `failed`: rows with a failed cell (shown "failed" rather than "pending"); `left_out`: stored records
    not shown (`split_by_config`), named in the header; `fidelity_file`: the testbed's verdicts
    (reports/testbed/fidelity.json), read if it exists, for the header's testbed line."""
    records = list(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    profile, _ = select_records(sweep, records, profile)
    cells = render_cells(sweep, records, profile=profile, seeds=seeds, failed=failed)
    fid = Path(fidelity_file) if fidelity_file is not None else None
    info = header(sweep, records, profile=profile, left_out=left_out,
                  fidelity=json.loads(fid.read_text()) if fid is not None and fid.exists() else None,
                  fidelity_source=_shown_path(fid) if fid is not None else None)
    # The per-seed values let the plots be redrawn from cells.json alone (the store is not committed).
    values = seed_values(sweep, records, profile)
    payload = {"header": info,
               "metrics": sweep.metrics,
               "cells": [{k: _json_safe(v) for k, v in rec.items()} for rec in cells.to_dict("records")],
               "values": values.to_dict("records")}
    (out / "cells.json").write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    return {**_write_formats(sweep, cells, info, out), "json": out / "cells.json"}


def _shown_path(path: Path) -> str:
    """`path` as a header shows it: relative to the working directory where it lies under it (cells.json
    is committed; a machine's absolute path is not what a reader needs)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def load_cells(folder: str | Path) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """(header, cells, per-seed values) of a rendered table's cells.json; values is empty for tables
    rendered before cells.json kept them."""
    payload = json.loads((Path(folder) / "cells.json").read_text())
    cells = pd.DataFrame(payload["cells"], columns=["row", "metric", *CELL_FIELDS, "status"])
    # JSON null is NaN again, so the display and plot code sees the numbers write_tables saw.
    cells[["mean", "std", "paper", "diff"]] = cells[["mean", "std", "paper", "diff"]].astype(float)
    values = pd.DataFrame(payload.get("values", []), columns=["row", "seed", "metric", "value"])
    return payload["header"], cells, values


def rewrite_tables(sweep: Sweep, folder: str | Path) -> dict[str, Path]:
    """Rewrite table.md, table.tex and table.html from the folder's cells.json (no store needed),
    e.g. after a change to how tables are drawn."""
    info, cells, _ = load_cells(folder)
    return _write_formats(sweep, cells, info, Path(folder))


def _write_formats(sweep: Sweep, cells: pd.DataFrame, info: dict[str, Any], out: Path) -> dict[str, Path]:
    lines = header_lines(info)
    columns, rows, states = display(sweep, cells)
    paths = {"md": out / "table.md", "tex": out / "table.tex", "html": out / "table.html"}
    paths["md"].write_text(to_markdown(sweep.title, lines, columns, rows))
    paths["tex"].write_text(to_latex(sweep.title, lines, columns, rows, sweep.name))
    paths["html"].write_text(to_html(sweep.title, lines, columns, rows, states))
    return paths
