"""How long the paper's tables take on one and two GPUs at RefCOCO+'s size, from measured throughput.

    python -m bench.estimate                                  # every table, the H200 bf16 measurement
    python -m bench.estimate table2,table5 --perf reports/perf/h100_fp32.json
    python -m bench.estimate --readme README.md               # rewrite the README's estimate block

Nothing here is timed: the figures are the cells of each sweep on the paper profile (bench.run's own
specs, Table 2's shared trainings included) times the throughput a `bench.perf --size paper` JSON
measured. Per training: epochs x train refs / training img/s, plus each epoch's evaluation of the
val split and each extra split's final evaluation at the batch-64 inference rate. Stage-2 cells add
pseudo-labels (one inference pass over the train refs; the CPU's dense CRF is not counted) and stage-2
epochs at the JSON's stage-2 rate; without one they count stage 1 and the pseudo-labels and show ">=". Cells run one
after another on one GPU; on two, the trainings are spread by longest-first (cells are independent:
no DDP). Several cells packed on one GPU run faster than this (the GPU is far from busy), so these are
upper bounds for the levers the JSON names.

Sizes: RefCOCO+ (unc) as released (REFER, Yu et al. 2016): 42,278 train refs; 10,758 / 5,726 / 4,889
expressions in val / testA / testB. Every dataset is taken at that size.
"""
from __future__ import annotations

import json
from pathlib import Path

from ehin.cli import UserError, command, command_parser

TRAIN_REFS = 42_278
EVAL_EXPRESSIONS = {"val": 10_758, "testA": 5_726, "testB": 4_889}
DEFAULT_PERF = "reports/perf/h200_bf16_cl_fused.json"
README_BEGIN, README_END = "<!-- estimate:begin (python -m bench.estimate) -->", "<!-- estimate:end -->"


def _expressions(split: str | None) -> int:
    return EVAL_EXPRESSIONS.get(split or "val", EVAL_EXPRESSIONS["val"])


def training_seconds(cfg: dict, stage: str, perf: dict) -> tuple[float, bool]:
    """One training of a cell (stage 1, or the two-stage chain), its per-epoch evaluations included,
    and whether every part of it was measured (a chain without a stage-2 rate counts its stage 1
    and pseudo-labels only)."""
    ehin = perf["results"].get("ehin", {})
    train = ehin.get("stage1_train", {}).get("images_per_s")
    infer = ehin.get("stage1_infer", {}).get("images_per_s_bs64")
    if not train or not infer:
        raise UserError("the perf JSON holds no EHIN stage-1 training and batch-64 inference rates")
    epochs = int(cfg["train"]["epochs"])
    every = int(cfg["eval"].get("every", 1))
    evals = (1 + bool(cfg["eval"].get("select_split"))) * (epochs // every + bool(epochs % every))
    s = epochs * TRAIN_REFS / train + evals * _expressions(cfg["eval"]["split"]) / infer
    if stage != "2":
        return s, True
    s += TRAIN_REFS / infer  # pseudo-labels: one inference pass over the train refs
    stage2 = ehin.get("stage2", {}).get("train_images_per_s")
    if not stage2:
        return s, False
    return s + int(cfg["stage2"]["epochs"]) * (TRAIN_REFS / stage2 + _expressions(cfg["eval"]["split"]) / infer), True


def makespan(durations: list[float], gpus: int) -> float:
    """Wall time of independent jobs on `gpus` GPUs, longest first onto the least loaded GPU."""
    loads = [0.0] * gpus
    for d in sorted(durations, reverse=True):
        loads[loads.index(min(loads))] += d
    return max(loads)


def estimate(tables: list[str], perf: dict, profile: str = "paper", seeds: int | None = None) -> list[dict]:
    """Per table (and `all`, the one queue with identical cells run once): cells, trainings and the
    wall time on one and two GPUs in seconds, and whether every part was measured."""
    from bench.run import DEFAULT_SEEDS, build_specs, one_queue
    from bench.sweeps import load_sweep

    seeds = seeds or DEFAULT_SEEDS[profile]
    infer = perf["results"].get("ehin", {}).get("stage1_infer", {}).get("images_per_s_bs64")
    if not infer:
        raise UserError("the perf JSON holds no EHIN batch-64 inference rate")
    rows, queue = [], []
    for name in tables:
        specs = build_specs(load_sweep(name), profile, seeds, Path("/nonexistent"))
        queue += specs
        rows.append(_row(name, specs, perf, infer))
    if len(tables) > 1:
        rows.append(_row("all", one_queue(queue)[0], perf, infer))
    return rows


def _row(name: str, specs: list, perf: dict, infer: float) -> dict:
    trainings: dict[str, tuple[float, bool]] = {}
    extra_eval = 0.0
    for spec in specs:
        if spec.stage == "inference":
            extra_eval += _expressions(spec.config["eval"]["split"]) / infer
            continue
        trained = spec.extra.get("trained")
        key = trained["dir"] if trained else spec.run_dir
        if key not in trainings:
            cfg = spec.config if not trained else {**spec.config, "eval": {**spec.config["eval"], "split": trained["split"]}}
            trainings[key] = training_seconds(cfg, spec.stage, perf)
        if trained and trained["split"] != spec.config["eval"]["split"]:
            # the shared model's final evaluation on this split (stage 1 and stage 2 for a chain)
            extra_eval += _expressions(spec.config["eval"]["split"]) / infer * (1 + (spec.stage == "2"))
    durations = [d for d, _ in trainings.values()]
    return {"table": name, "cells": len(specs), "trainings": len(trainings),
            "one_gpu_s": sum(durations) + extra_eval, "two_gpus_s": makespan(durations, 2) + extra_eval / 2,
            "complete": all(ok for _, ok in trainings.values())}


def _hours(seconds: float, complete: bool = True) -> str:
    text = (f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min" if seconds >= 60
            else "< 1 min")
    return text if complete else f">= {text}"


def markdown(rows: list[dict], perf: dict, perf_path: str, profile: str, seeds: int) -> str:
    gpu = perf.get("environment", {}).get("gpu", perf.get("device", "?"))
    levers = ", ".join(k for k, v in perf.get("levers", {}).items() if v) or "none"
    lines = [f"Estimated from `{perf_path}` ({gpu}; levers: {levers}) by `python -m bench.estimate`: profile "
             f"{profile}, {seeds} seed(s), every dataset at RefCOCO+'s size, cells one after another on each GPU "
             "(upper bounds; \">=\": the JSON has no stage-2 rate, so the two-stage chains count their stage 1 "
             "and pseudo-labels only).", "",
             "| table | cells | trainings | one GPU | two GPUs |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['table']} | {r['cells']} | {r['trainings']} | {_hours(r['one_gpu_s'], r['complete'])} | "
                     f"{_hours(r['two_gpus_s'], r['complete'])} |")
    return "\n".join(lines) + "\n"


def update_readme(readme: str | Path, block: str) -> bool:
    """Rewrite the README's estimate block; True when it changed."""
    from bench.report import replace_block

    return replace_block(readme, README_BEGIN, README_END, block)


@command
def main(argv: list[str] | None = None) -> None:
    from bench.run import DEFAULT_SEEDS
    from bench.sweeps import list_sweeps

    p = command_parser("python -m bench.estimate", __doc__)
    p.add_argument("tables", nargs="?", default="all", help="sweep names joined by commas, or all (default)")
    p.add_argument("--perf", default=DEFAULT_PERF, help=f"a bench.perf --size paper JSON (default: {DEFAULT_PERF})")
    p.add_argument("--seeds", type=int, help="seeds per row (default: the paper profile's)")
    p.add_argument("--readme", help="rewrite this README's estimate block instead of printing only")
    args = p.parse_args(argv)
    tables = list_sweeps() if args.tables == "all" else args.tables.split(",")
    unknown = sorted(set(tables) - set(list_sweeps()))
    if unknown:
        raise UserError(f"unknown table(s) {', '.join(unknown)} (have: {', '.join(list_sweeps())})")
    if not Path(args.perf).exists():
        raise UserError(f"{args.perf}: no such perf JSON (python -m bench.perf --size paper --out ... makes one)")
    perf = json.loads(Path(args.perf).read_text())
    if perf.get("size") != "paper":
        raise UserError(f"{args.perf} was measured at size {perf.get('size')!r}; the estimate needs --size paper")
    seeds = args.seeds or DEFAULT_SEEDS["paper"]
    block = markdown(estimate(tables, perf, "paper", seeds), perf, args.perf, "paper", seeds)
    print(block)
    if args.readme:
        print(f"{args.readme}: estimate block {'updated' if update_readme(args.readme, block) else 'unchanged'}")


if __name__ == "__main__":
    main()
