"""TESTBED.md §2.3-2.4 on a profile: the positive control against the language-blind guess, and its power.

    python -m bench.testbed --profile gpu --seeds 10 --jobs 10      # run the control, write the verdicts
    python -m bench.testbed --profile gpu --seeds 10 --rerun results/gpu-rerun   # + run-to-run spread
    python -m bench.testbed --profile gpu --seeds 10 --report-only --rerun results/gpu-bf16 --rerun-set train.amp=true
    python -m bench.testbed --profile gpu --seeds 10 --report-only  # verdicts from the stored records
    python -m bench.testbed ... --report-only --fidelity ROWS.json  # + reports/testbed/fidelity.json

`--fidelity ROWS.json` takes the rows `python -m ehin.data.fidelity --pointable --ceilings --scorer --json`
wrote for the same profile and frozen CLIP (§2.1-2.2) and writes fidelity.json beside the verdicts: every
criterion's figures and verdict per variant, the pooled std, and the frozen inputs' checksums (from the
control's records). It refuses rows whose scorer or datasets are not the ones the control's cells loaded.

The control is `sweeps/testbed/control.yaml` (the TRIS-like configuration, METHOD §8, on every variant's
val), run through the same queue, executors and results store as the paper's tables (bench.run). The
language-blind guess is measured on the very dataset each control cell evaluates (ehin.data.fidelity).
Writes reports/testbed/control-<profile>.{json,md}; every figure there comes from the stored records.

- §2.3: per variant, the control's mean PointM over the seeds >= language-blind + 15, and the
  language-blind guess <= 30.
- §2.4 (power): the pooled seed-to-seed std of PointM (root of the mean of the variants' variances)
  <= 3 and every variant's <= 4, over >= 2,000 evaluated expressions per split; TESTBED asks for 10
  seeds. With --rerun, the same cells run a second time (another results folder) give the run-to-run
  spread: per cell |PointM of run 1 - PointM of run 2|, its mean and maximum. With --rerun-set the second
  folder's cells carry extra overrides (--rerun-set train.amp=true: bf16 against fp32, seed for seed) and
  each variant also gets the mean signed difference and whether it lies within the control's seed std.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from bench.executors import EXECUTORS
from bench.mps import add_mps_arg
from bench.run import (DEFAULT_SEEDS, add_compile_wait_arg, add_start_within_arg, build_specs, positive_int,
                       results_root, run_tables)
from bench.store import ResultStore
from bench.sweeps import control_sweep
from ehin.cli import UserError, command, command_parser
from ehin.config import parse_assignments

MARGIN = 15.0            # §2.3: control >= language-blind + 15 PointM
BLIND_MAX = 30.0         # §2.3: language-blind <= 30 PointM
POOLED_STD_MAX = 3.0     # §2.4
VARIANT_STD_MAX = 4.0    # §2.4
MIN_EXPRESSIONS = 2000   # §2.4
POWER_SEEDS = 10         # §2.4
CONTROL_SEEDS = 5        # §2.3: the control's mean is of 5 seeds (fewer: not judged yet)


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def language_blind(cfg: dict) -> dict:
    """The language-blind PointM and the size of the split a control cell evaluates; on a synthetic
    dataset also what reading some of the words is worth (ehin.diagnostics.word_ceilings)."""
    from ehin.data import prepare_dataset
    from ehin.data.fidelity import measure

    ds = prepare_dataset(cfg, progress=False)
    row = measure(ds, cfg["eval"]["split"])
    out = {"language_blind_pointm": row["language_blind_pointm"], "expressions": row["expressions"],
           "random_object_rate": row["random_object_rate"]}
    if cfg["data"]["dataset"].startswith("synth-"):  # its annotations keep each thing's appearance
        from ehin.diagnostics.word_ceilings import ceilings

        c = ceilings(ds, cfg["eval"]["split"])
        out.update(category_aware_pointm=c["category_aware"], location_blind_pointm=c["location_blind"])
    return out


def kinds_of(dataset, split: str, records: list[dict], root: Path) -> dict | None:
    """The control's PointM and any-object rate per kind of expression (ehin.diagnostics.expression_kinds),
    pooled over the seeds whose records kept per-expression scores; None when none did. The sentences
    come from the dataset by sent_id (the scores files hold ids only)."""
    from ehin.diagnostics.expression_kinds import breakdown
    from ehin.evaluate import read_per_expression

    files = [Path(root) / r["per_expression"] for r in records
             if r and r.get("per_expression") and (Path(root) / r["per_expression"]).is_file()]
    if not files:
        return None
    text = {int(s["sent_id"]): dataset.sentence(s) for ref in dataset.refs(split) for s in ref["sentences"]}
    rows = []
    for f in files:
        z = read_per_expression(f)
        rows += [{"sentence": text[int(i)], "point_mask": pm, "point_any_object": pa}
                 for i, pm, pa in zip(z["sent_id"], z["point_mask"], z["point_any_object"])]
    return breakdown(rows)


def _kinds(cfg: dict, records: list[dict], root: Path) -> dict | None:
    if not any(r and r.get("per_expression") for r in records):
        return None
    from ehin.data import prepare_dataset

    return kinds_of(prepare_dataset(cfg, progress=False), cfg["eval"]["split"], records, root)


def verdicts(profile: str, seeds: int, root: Path, rerun: Path | None = None, blind=language_blind,
             extra: dict | None = None, rows: list[str] | None = None, rerun_extra: dict | None = None) -> dict:
    """Per variant (the control's rows, or the subset `rows`): the control's PointM by seed, mean, std,
    the language-blind guess and the checks; the pooled figures are over those variants.
    `blind(cfg)` measures the language-blind guess on a cell's dataset (`language_blind`).
    `rerun`: a folder holding the same cells run again, paired by row and seed; with `rerun_extra` its
    cells carry these overrides too (train.amp=true: bf16 against fp32, seed for seed), and each row
    says whether the mean paired difference lies within the control's seed std."""
    sweep = control_sweep()
    specs = build_specs(sweep, profile, seeds, root, None, extra)
    by_id = {r["cell_id"]: r for r in ResultStore(root).read() if "cell_id" in r}
    again = {r["cell_id"]: r for r in ResultStore(rerun).read() if "cell_id" in r} if rerun else {}
    twin = {(s.row, s.seed): s.cell_id
            for s in build_specs(sweep, profile, seeds, rerun, None, {**(extra or {}), **(rerun_extra or {})})} if rerun else {}
    pilot = list(dict.fromkeys(rows)) if rows else None
    names, rows = pilot or list(sweep.rows), []
    for row in names:
        cells = [s for s in specs if s.row == row]
        recs = [by_id.get(s.cell_id) for s in cells]
        values = [r["metrics"]["point_mask"] for r in recs if r]
        n_eval = [r["metrics"].get("n") for r in recs if r and r["metrics"].get("n") is not None]
        out = {"variant": row, "dataset": cells[0].config["data"]["dataset"],
               "split_by": cells[0].config["data"]["split_by"], "split": cells[0].config["eval"]["split"],
               "seeds_run": len(values), "seeds_declared": len(cells),
               "pointm_by_seed": {s.seed: r["metrics"]["point_mask"] for s, r in zip(cells, recs) if r},
               **blind(cells[0].config)}
        out["evaluated"] = min(n_eval) if n_eval else None
        out["by_kind"] = _kinds(cells[0].config, recs, root)
        if values:
            out["mean"], out["std"] = _mean_std(values)
            out["margin"] = out["mean"] - out["language_blind_pointm"]
            out["control_met"] = (out["margin"] >= MARGIN and out["language_blind_pointm"] <= BLIND_MAX
                                  if len(values) >= CONTROL_SEEDS else None)
            out["std_met"] = None if out["std"] is None else out["std"] <= VARIANT_STD_MAX
        if again:
            diffs = [again[twin[s.row, s.seed]]["metrics"]["point_mask"] - by_id[s.cell_id]["metrics"]["point_mask"]
                     for s in cells if twin[s.row, s.seed] in again and s.cell_id in by_id]
            moves = [abs(d) for d in diffs]
            out["run_to_run"] = {"cells": len(moves), "mean_abs": sum(moves) / len(moves) if moves else None,
                                 "max_abs": max(moves) if moves else None,
                                 "mean_diff": sum(diffs) / len(diffs) if diffs else None}
            if rerun_extra and diffs and out.get("std") is not None:
                out["run_to_run"]["within_seed_std"] = abs(out["run_to_run"]["mean_diff"]) <= out["std"]
        rows.append(out)
    variances = [r["std"] ** 2 for r in rows if r.get("std") is not None]
    pooled = math.sqrt(sum(variances) / len(variances)) if len(variances) == len(rows) else None
    complete = all(r["seeds_run"] == r["seeds_declared"] for r in rows)
    power = {
        "pooled_std": pooled, "seeds": seeds,
        "pooled_met": None if pooled is None else pooled <= POOLED_STD_MAX,
        "expressions_met": all((r["evaluated"] or 0) >= MIN_EXPRESSIONS for r in rows),
        "enough_seeds": seeds >= POWER_SEEDS,
    }
    power["met"] = bool(complete and power["enough_seeds"] and power["pooled_met"] and power["expressions_met"]
                        and all(r.get("std_met") for r in rows))
    return {"profile": profile, "overrides": dict(extra or {}), "results": str(root),
            "rerun": str(rerun) if rerun else None, "rerun_overrides": dict(rerun_extra or {}), "rows": pilot,
            "complete": complete, "control_met": complete and all(r.get("control_met") for r in rows),
            "power": power, "variants": rows, "environment": _environment(by_id, specs)}


# fidelity.json's variants (TESTBED §2; refcocog on umd is "synth-refcocog", google rides along)
FIDELITY_VARIANTS = {("synth-refcoco", "unc"): "synth-refcoco", ("synth-refcoco+", "unc"): "synth-refcoco+",
                     ("synth-refcocog", "umd"): "synth-refcocog", ("synth-refcocog", "google"): "synth-refcocog:google",
                     ("synth-referit", "berkeley"): "synth-referit"}
SCENE_KEYS = ("same_category_share", "median_objects", "clutter_share", "occluded_share", "distractor_size_ratio")
SCORER_KEYS = ("isolated_rec", "isolated_rec_se", "random_object_rate", "isolated_rec_ratio", "isolation_gain",
               "isolation_gain_se")


def frozen_inputs(root: Path) -> dict:
    """The checksums of what the control's cells loaded (their records' `inputs`): the one small CLIP
    (backbone and scorer) and each dataset. More than one checkpoint is reported, not merged; a variant
    whose cells loaded different datasets, or a cell whose inputs are not known, is an error (TESTBED §3:
    one frozen dataset per variant, its checksum in every result)."""
    checkpoints, datasets = set(), {}
    for r in ResultStore(root).read():
        inputs = r.get("inputs") or {}
        if not inputs or inputs.get("error"):
            raise UserError(f"{root}: cell {r.get('cell_id')} records no checksums of its inputs "
                            f"({inputs.get('error', 'no inputs')}): the frozen inputs cannot be told")
        for role in ("backbone", "scorer"):
            if inputs.get(role):
                checkpoints.add((inputs[role]["file"], inputs[role]["sha256"]))
        if inputs.get("dataset", {}).get("sha256"):
            d = inputs["dataset"]
            datasets.setdefault(f"{d['name']}:{d['split_by']}", set()).add(d["sha256"])
    mixed = {k: v for k, v in datasets.items() if len(v) > 1}
    if mixed:
        k, v = next(iter(mixed.items()))
        raise UserError(f"{root}: the control's cells of {k} loaded {len(v)} different datasets "
                        f"({', '.join(sorted(h[:12] for h in v))}): not one frozen dataset")
    return {"checkpoints": [{"file": f, "sha256": h} for f, h in sorted(checkpoints)],
            "datasets": {k: next(iter(v)) for k, v in sorted(datasets.items())}}


def fidelity_summary(v: dict, rows: list[dict], rows_file: str) -> dict:
    """fidelity.json: per variant the figures and verdicts of TESTBED §2.1-2.4, from the scene/scorer rows of
    `ehin.data.fidelity` and the control's verdicts `v` (`verdicts`); top level the pooled std, whether
    everything holds, and the frozen inputs' checksums."""
    from ehin.data.fidelity import passes
    from ehin.model.scorer_criteria import passes as scorer_passes

    frozen = frozen_inputs(Path(v["results"]))
    by_key = {(r["dataset"], r["split_by"]): r for r in rows}
    shas = {c["sha256"] for c in frozen["checkpoints"]}
    out = {}
    for c in v["variants"]:
        key = (c["dataset"], c["split_by"])
        name = FIDELITY_VARIANTS.get(key, f"{key[0]}:{key[1]}")
        row = by_key.get(key)
        if row is None:
            raise UserError(f"{rows_file} has no row for {key[0]} ({key[1]}): measure it with ehin.data.fidelity")
        if "isolated_rec" not in row:
            raise UserError(f"{rows_file}: no scorer figures for {key[0]} ({key[1]}); run ehin.data.fidelity with --scorer")
        if shas and row.get("scorer_sha256") not in shas:
            raise UserError(f"{rows_file}: the scorer of {key[0]} ({key[1]}) is not the checkpoint the control loaded "
                            f"({row.get('scorer_sha256')} vs {', '.join(sorted(shas))})")
        ds_sha = frozen["datasets"].get(f"{key[0]}:{key[1]}")
        if ds_sha and row.get("dataset_sha256") != ds_sha:
            raise UserError(f"{rows_file}: the dataset {key[0]} ({key[1]}) is not the one the control's cells loaded")
        scenes_ok = {k: ok for k, ok in passes(row).items() if k in SCENE_KEYS}
        seeds = [c["pointm_by_seed"][k] for k in sorted(c["pointm_by_seed"], key=int)]
        rerun = c.get("run_to_run") or {}
        out[name] = {
            "dataset": key[0], "split_by": key[1], "split": c["split"],
            **{k: row[k] for k in SCENE_KEYS}, **{k: row[k] for k in SCORER_KEYS},
            "language_blind": c["language_blind_pointm"], "expressions": c["evaluated"],
            "tris_like_seeds": seeds, "tris_like_mean": c.get("mean"), "tris_like_std": c.get("std"),
            # the mean move of a cell run twice, of how many (TESTBED §2.4: the same seeds), and the largest
            "run_to_run": rerun.get("mean_abs"), "run_to_run_cells": rerun.get("cells"),
            "run_to_run_max": rerun.get("max_abs"),
            "met": {"scenes": all(scenes_ok.values()), "scorer": all(scorer_passes(row).values()),
                    "control": c.get("control_met"), "power": c.get("std_met")},
        }
    power = v["power"]
    every = [ok for r in out.values() for ok in r["met"].values()]
    # §2.4 beyond the stds, with its thresholds, so a reader of this file alone (bench.render) can say what is missed.
    power_checks = {"complete": v["complete"], **{k: power[k] for k in ("seeds", "enough_seeds", "expressions_met", "met")},
                    "seeds_asked": POWER_SEEDS, "pooled_std_max": POOLED_STD_MAX, "variant_std_max": VARIANT_STD_MAX,
                    "min_expressions": MIN_EXPRESSIONS}
    return {"profile": v["profile"], "overrides": v["overrides"], "control": v["results"], "rows": rows_file,
            "pooled_std": power["pooled_std"], "pooled_met": power["pooled_met"], "power": power_checks,
            "all_met": bool(v["complete"] and power["met"] and all(ok is True for ok in every)),
            "frozen": frozen, "variants": out}


def _environment(by_id: dict, specs) -> dict:
    """Where the records were made (device, torch, numerics, code: every distinct value, since a control
    may be stored over sessions) and the small CLIP checkpoints the cells loaded, by content (every
    distinct one: a frozen testbed has one)."""
    recs = [by_id[s.cell_id] for s in specs if s.cell_id in by_id]
    if not recs:
        return {}
    env = {}
    for k in ("device", "torch", "numerics", "code_version"):
        seen = list(dict.fromkeys(str(r[k]) for r in recs if r.get(k) is not None))
        if seen:
            env[k] = ", ".join(seen)
    weights = sorted({f"{w['file']} sha256 {w['sha256'][:16]}" for r in recs for role in ("backbone", "scorer")
                      if (w := (r.get("inputs") or {}).get(role))})
    if weights:
        env["checkpoints"] = "; ".join(weights)
    # How the cells ran where it is not in their hash: torch.compile's mode, MPS (bench.mps).
    modes = sorted({str(m) for r in recs if (m := (r.get("overrides") or {}).get("train.compile"))})
    if modes:
        env["train.compile"] = ", ".join(modes)
    if any(r.get("mps") for r in recs):
        env["under MPS"] = "yes" if all(r.get("mps") for r in recs) else "some cells"
    return env


def _fmt(x, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def _yes(flag) -> str:
    return "—" if flag is None else ("yes" if flag else "no")


def markdown(v: dict) -> str:
    p = v["power"]
    rerun = v["rerun"] is not None
    twin = " ".join(f"{k}={val}" for k, val in v.get("rerun_overrides", {}).items())  # the rerun's own overrides
    lines = [
        f"# Positive control (TESTBED.md §2.3-2.4), profile `{v['profile']}`",
        "",
        f"Generated by `python -m bench.testbed --profile {v['profile']} --seeds {p['seeds']}"
        + "".join(f" --set {k}={val}" for k, val in v.get("overrides", {}).items())
        + (f" --rerun {v['rerun']}" if rerun else "") + "".join(f" --rerun-set {k}={val}" for k, val in
                                                              v.get("rerun_overrides", {}).items())
        + (f" --rows \"{','.join(v['rows'])}\"" if v.get("rows") else "")
        + f" --report-only` from `{v['results']}/store.jsonl`. "
        "The control is `sweeps/testbed/control.yaml` (TRIS-like, METHOD §8); the language-blind guess "
        "is measured on the same val split (`ehin.data.fidelity`).",
        "",
        "| variant | expressions evaluated | language-blind PointM | control PointM by seed | mean | std |"
        f" margin | ≥ LB + {MARGIN:.0f} and LB ≤ {BLIND_MAX:.0f} | std ≤ {VARIANT_STD_MAX:.0f} |"
        + ((f" with {twin} − without, paired by seed: mean / mean abs / max abs | within the seed std |" if twin
            else " run-to-run mean / max abs |") if rerun else ""),
        "|---|---:|---:|---|---:|---:|---:|---|---|" + (("---|---|" if twin else "---|") if rerun else ""),
    ]
    for r in v["variants"]:
        seeds = " / ".join(f"{x:.1f}" for x in r["pointm_by_seed"].values()) or "not run"
        line = (f"| {r['dataset']} ({r['split_by']}, {r['split']}) | {_fmt(r['evaluated'], 'd')} | "
                f"{r['language_blind_pointm']:.1f} | {seeds} | {_fmt(r.get('mean'))} | {_fmt(r.get('std'))} | "
                f"{_fmt(r.get('margin'), '+.1f')} | {_yes(r.get('control_met'))} | {_yes(r.get('std_met'))} |")
        if rerun:
            rr = r.get("run_to_run") or {}
            if twin:
                line += (f" {_fmt(rr.get('mean_diff'), '+.2f')} / {_fmt(rr.get('mean_abs'), '.2f')} / "
                         f"{_fmt(rr.get('max_abs'), '.2f')} ({rr.get('cells', 0)} cells) | {_yes(rr.get('within_seed_std'))} |")
            else:
                line += f" {_fmt(rr.get('mean_abs'), '.2f')} / {_fmt(rr.get('max_abs'), '.2f')} ({rr.get('cells', 0)} cells) |"
        lines.append(line)
    lines += [
        "",
        (f"- §2.3 (every variant): {_yes(v['control_met'])}" if not v.get("rows") else
         f"- §2.3 (a pilot: only {', '.join(v['rows'])}): {_yes(v['control_met'])}")
        + ("" if v["complete"] else " (not every cell has run)"),
        f"- §2.4: pooled seed std {_fmt(p['pooled_std'], '.2f')} (≤ {POOLED_STD_MAX:.0f}: {_yes(p['pooled_met'])}); "
        f"≥ {MIN_EXPRESSIONS} expressions evaluated on every split: {_yes(p['expressions_met'])}; "
        f"{p['seeds']} seeds (TESTBED asks for {POWER_SEEDS}): {_yes(p['enough_seeds'])}; "
        f"every variant's std ≤ {VARIANT_STD_MAX:.0f}: {_yes(all(r.get('std_met') for r in v['variants']))}; "
        f"§2.4 as a whole: {'met' if p['met'] else 'not met'}",
    ]
    if twin:
        within = [(r.get("run_to_run") or {}).get("within_seed_std") for r in v["variants"]]
        lines.append(f"- {twin} against without, paired by seed: the mean difference lies within the control's seed "
                     f"std on every variant: {_yes(all(within) if None not in within else None)}")
    if v["environment"]:
        lines.append("- made on: " + ", ".join(f"{k} {val}" for k, val in v["environment"].items()))
    read = [r for r in v["variants"] if r.get("location_blind_pointm") is not None]
    if read:
        lines += ["", "What reading some of the words is worth (`ehin.diagnostics.word_ceilings`): PointM of a random "
                  "annotated object among those the words allow, the category alone or every appearance word of the "
                  "referent (no location word, no relation: the ceiling of a model that has not learnt them):", "",
                  "| variant | language-blind | category-aware | location-blind | control |", "|---|---:|---:|---:|---:|"]
        for r in read:
            lines.append(f"| {r['dataset']} ({r['split_by']}) | {r['language_blind_pointm']:.1f} | "
                         f"{r['category_aware_pointm']:.1f} | {r['location_blind_pointm']:.1f} | {_fmt(r.get('mean'))} |")
    kinds = [r for r in v["variants"] if r.get("by_kind")]
    if kinds:
        from ehin.diagnostics.expression_kinds import markdown as kinds_markdown

        lines += ["", "By kind of expression (`ehin.diagnostics.expression_kinds`), pooled over the seeds whose "
                  "cells kept per-expression scores:", "",
                  kinds_markdown({f"{r['dataset']} ({r['split_by']})": r["by_kind"] for r in kinds}, first="variant").rstrip("\n")]
    return "\n".join(lines) + "\n"


@command
def main(argv: list[str] | None = None) -> int:
    p = command_parser("python -m bench.testbed", __doc__)
    p.add_argument("--profile", default="gpu", choices=sorted(DEFAULT_SEEDS),
                   help="the profile whose testbed is measured (default: gpu)")
    p.add_argument("--seeds", type=positive_int, default=5, help="seeds per variant (default: 5; §2.4 asks for 10)")
    p.add_argument("--executor", default="local", choices=EXECUTORS, help="as bench.run (default: local)")
    p.add_argument("--jobs", type=int, default=2, help="cells at once, as bench.run (default: 2)")
    add_mps_arg(p)
    add_compile_wait_arg(p)
    add_start_within_arg(p)
    p.add_argument("--results", help="results folder (default results/<profile>)")
    p.add_argument("--rerun", help="a second results folder holding the same cells run again (default: none)")
    p.add_argument("--rerun-set", dest="rerun_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an override the --rerun cells carry beside --set's (train.amp=true: bf16 against fp32, "
                   "paired by seed; default: none, the same cells)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every control cell (changes their hash; default: none)")
    p.add_argument("--rows", help="comma-separated subset of the control's rows to run and judge (a pilot; "
                   "default: every row)")
    p.add_argument("--report-only", action="store_true", help="write the verdicts without running any cell")
    p.add_argument("--out", default="reports/testbed", help="where control-<profile>.{json,md} go (default: reports/testbed)")
    p.add_argument("--name", help="file name stem of the verdicts (default: control-<profile>)")
    p.add_argument("--fidelity", metavar="ROWS.json",
                   help="also write fidelity.json (TESTBED §2.1-2.4) from these ehin.data.fidelity --scorer rows")
    args = p.parse_args(argv)
    root = results_root(args.profile, args.results)
    extra = parse_assignments(args.overrides)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    unknown = [r for r in rows or () if r not in control_sweep().rows]
    if unknown:
        p.error(f"unknown row {unknown[0]!r} in --rows; rows: {', '.join(control_sweep().rows)}")
    if rows and args.fidelity:
        p.error("--fidelity judges every variant: leave out --rows")
    if args.rerun_overrides and not args.rerun:
        p.error("--rerun-set needs --rerun (the folder holding the cells with those overrides)")
    rc = 0
    if not args.report_only:
        rc = run_tables([control_sweep()], args.profile, args.seeds, root, executor=args.executor,
                        jobs=args.jobs, rows=rows, extra=extra, render_tables=False, mps=args.mps,
                        compile_wait_s=args.compile_wait, start_within_s=args.start_within)
    v = verdicts(args.profile, args.seeds, root, Path(args.rerun) if args.rerun else None, extra=extra, rows=rows,
                 rerun_extra=parse_assignments(args.rerun_overrides))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"control-{args.profile}" + ("-pilot" if rows else "")  # never over the full verdicts
    (out / f"{name}.json").write_text(json.dumps(v, indent=1) + "\n")
    md = markdown(v)
    (out / f"{name}.md").write_text(md)
    print(md)
    if args.fidelity:
        summary = fidelity_summary(v, json.loads(Path(args.fidelity).read_text()), args.fidelity)
        (out / "fidelity.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"wrote {out / 'fidelity.json'} (every criterion met: {_yes(summary['all_met'])})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
