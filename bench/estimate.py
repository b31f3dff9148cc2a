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
no DDP). Several cells packed on one GPU run faster than this (the GPU is far from busy), so packing
can only shorten these serial figures; a ">=" figure leaves out work the JSON has no rate for.

Sizes: RefCOCO+ (unc) as released (REFER, Yu et al. 2016): 42,278 train refs; 10,758 / 5,726 / 4,889
expressions in val / testA / testB. Every dataset is taken at that size.

    python -m bench.estimate --profile gpu --perf reports/perf/h200_gpu_ehin_tris_procs16_mps_ro.json
    python -m bench.estimate --profile gpu --results reports/gpu/store   # + what that store holds, and the rest

A synthetic profile (gpu) is estimated from a packed measurement (`bench.perf --size gpu --procs N`, the
rate summed over N processes sharing one GPU, as bench.run --jobs packs cells): each training costs its
share of the GPU, epochs x train refs / summed rate, at the TRIS-like rate for a cell of the TRIS-like
config (bench.perf's CONFIGS["tris"]) and at EHIN's for every other, plus its evaluations counted as
training images (forward only costs less). An estimate, not a bound: rows with fewer BP layers or a
smaller K cost less than EHIN, rows with more layers, K = 9 or a smaller batch (more steps for the same
images) cost more, and the measurement's step does not clip gradients. Sizes are each cell's own dataset,
generated into the cache if it is not there yet. With many cells packed the GPU is busy throughout, so the
shares add up to the wall time; a cell alone runs slower than its share.

With --results, each table also says how many of its trainings that store holds (a cell with a record; a
training several cells or tables share, once; a Table 2 chain once its Stage-2 cell is stored) and the
estimated time of the rest: a sweep run over several sittings, counted from its records.
"""
from __future__ import annotations

import json
from pathlib import Path

from ehin.cli import UserError, command, command_parser

TRAIN_REFS = 42_278
EVAL_EXPRESSIONS = {"val": 10_758, "testA": 5_726, "testB": 4_889}
DEFAULT_PERF = "reports/perf/h200_bf16_cl_fused.json"
DEFAULT_PACKED_PERF = "reports/perf/h200_gpu_ehin_tris_procs16_mps_ro.json"
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
    evals = (1 + bool(cfg["eval"].get("select_split"))) * _evaluations(cfg)
    s = epochs * TRAIN_REFS / train + evals * _expressions(cfg["eval"]["split"]) / infer
    if stage != "2":
        return s, True
    s += TRAIN_REFS / infer  # pseudo-labels: one inference pass over the train refs
    stage2 = ehin.get("stage2", {}).get("train_images_per_s")
    if not stage2:
        return s, False
    epochs2 = int(cfg["stage2"]["epochs"])
    evals2 = _evaluations(cfg, epochs2)
    return s + epochs2 * TRAIN_REFS / stage2 + evals2 * _expressions(cfg["eval"]["split"]) / infer, True


def _evaluations(cfg: dict, epochs: int | None = None) -> int:
    """How often a training of `epochs` (default train.epochs) evaluates: every eval.every epochs, and after the last."""
    epochs, every = int(cfg["train"]["epochs"] if epochs is None else epochs), int(cfg["eval"].get("every", 1))
    return epochs // every + bool(epochs % every)


def _packed_rate(cfg: dict, perf: dict) -> float:
    """The summed stage-1 training rate of cells like `cfg` packed on one GPU (a `--procs` measurement)."""
    from bench.perf import CONFIGS

    def value(dotted: str):
        section, key = dotted.split(".")
        return cfg.get(section, {}).get(key)

    name = "tris" if all(value(k) == v for k, v in CONFIGS["tris"].items()) else "ehin"
    rate = perf["results"].get(name, {}).get("stage1_train", {}).get("images_per_s")
    if not rate:
        raise UserError(f"the perf JSON holds no {name} stage-1 training rate (bench.perf --configs ehin,tris)")
    return rate


_SIZES: dict[tuple, tuple[dict[str, int], dict[str, int]]] = {}


def dataset_sizes(cfg: dict) -> tuple[int, dict[str, int]]:
    """(refs of data.train_split, expressions per split) of the dataset `cfg` names, generated into the
    cache if needed."""
    from ehin.data import prepare_dataset

    d = cfg["data"]
    key = (d["dataset"], d["split_by"], json.dumps(cfg.get("synthetic"), sort_keys=True, default=str), d.get("root"))
    if key not in _SIZES:
        refer = prepare_dataset(cfg, progress=False)
        splits = {split: refer.refs(split) for split in refer.splits()}
        _SIZES[key] = ({k: len(v) for k, v in splits.items()},
                       {k: sum(len(r["sentences"]) for r in v) for k, v in splits.items()})
    refs, expressions = _SIZES[key]
    if d["train_split"] not in refs:
        raise UserError(f"{d['dataset']} has no split {d['train_split']!r} (data.train_split)")
    return refs[d["train_split"]], expressions


def _split_expressions(cfg: dict, split: str) -> int:
    expressions = dataset_sizes(cfg)[1]
    if split not in expressions:
        raise UserError(f"{cfg['data']['dataset']} has no split {split!r} to evaluate")
    return expressions[split]


def packed_training_seconds(cfg: dict, stage: str, perf: dict) -> tuple[float, bool]:
    """One training's share of a GPU packed with others (a synthetic profile; the module's docstring):
    stage 1 with its evaluations at the packed training rate; a chain's stage 2 is not measured packed,
    so it counts its stage 1 only and says so."""
    rate = _packed_rate(cfg, perf)
    train_refs, _ = dataset_sizes(cfg)
    evaluated = sum(_split_expressions(cfg, split) for split in (cfg["eval"]["split"], cfg["eval"].get("select_split"))
                    if split)
    return (int(cfg["train"]["epochs"]) * train_refs + _evaluations(cfg) * evaluated) / rate, stage != "2"


def makespan(durations: list[float], gpus: int) -> float:
    """Wall time of independent jobs on `gpus` GPUs, longest first onto the least loaded GPU."""
    loads = [0.0] * gpus
    for d in sorted(durations, reverse=True):
        loads[loads.index(min(loads))] += d
    return max(loads)


def estimate(tables: list[str], perf: dict, profile: str = "paper", seeds: int | None = None,
             stored: set[str] | None = None) -> list[dict]:
    """Per table (and `all`, the one queue with identical cells run once): cells, trainings and the
    wall time on one and two GPUs in seconds, and whether every part was measured. With `stored` (the
    cell ids a results store holds) also how many of the trainings are stored and the share of one GPU
    the others still take."""
    from bench.run import DEFAULT_SEEDS, build_specs, cell_identity, one_queue
    from bench.sweeps import load_sweep

    seeds = seeds or DEFAULT_SEEDS[profile]
    packed = profile != "paper"
    if packed:
        infer = 0.0  # evaluations count at the packed training rate; Table 10 times untrained models
    else:
        infer = perf["results"].get("ehin", {}).get("stage1_infer", {}).get("images_per_s_bs64")
        if not infer:
            raise UserError("the perf JSON holds no EHIN batch-64 inference rate")
    specs_of = {name: build_specs(load_sweep(name), profile, seeds, Path("/nonexistent")) for name in tables}
    queue = [spec for specs in specs_of.values() for spec in specs]
    if stored:
        # a cell identical to a stored one (Table 6's EHIN is Table 5's full loss) is stored too: bench.run
        # copies that record instead of training it again (reuse_identical_cells)
        same = {}
        for spec in queue:
            same.setdefault(cell_identity(spec), []).append(spec.cell_id)
        stored = set(stored) | {c for ids in same.values() if stored.intersection(ids) for c in ids}
    rows = [_row(name, specs, perf, infer, packed, stored) for name, specs in specs_of.items()]
    if len(tables) > 1:
        rows.append(_row("all", one_queue(queue)[0], perf, infer, packed, stored))
    return rows


def _row(name: str, specs: list, perf: dict, infer: float, packed: bool = False,
         stored: set[str] | None = None) -> dict:
    from bench.jobs import training_config, training_dir
    from bench.run import one_queue

    n_cells = len(specs)
    specs = one_queue(specs)[0]  # identical cells of one table train once too (Table 8's N=24 and K=6)
    trainings: dict[str, tuple[float, bool]] = {}
    chains: set[str] = set()
    extra_eval = 0.0
    # What is stored: a training whose cell (any of the cells sharing it) has a record, a chain whose
    # Stage-2 cell has; the rest, and the evaluations of cells not stored, are what is left to run.
    stored = stored or set()
    done = {training_dir(s) for s in specs if s.cell_id in stored and s.stage != "2"}
    done_chains = {training_dir(s) for s in specs if s.cell_id in stored and s.stage == "2"}
    stage1_cells = {training_dir(s) for s in specs if s.stage != "2"}
    left: dict[str, float] = {}
    left_eval = 0.0
    for spec in specs:
        if spec.stage == "inference":
            share = 0.0 if packed else _expressions(spec.config["eval"]["split"]) / infer
            extra_eval += share
            left_eval += 0.0 if spec.cell_id in stored else share
            continue
        trained = spec.extra.get("trained")
        key = training_dir(spec)
        seconds = packed_training_seconds if packed else training_seconds
        cfg = training_config(spec)
        stage1 = spec.extra.get("stage1_dir")
        if spec.stage == "2" and stage1:
            # the chain builds on the Stage-1 cell's model (bench.run.share_trainings): that training is
            # counted once, under its folder, and this chain adds its pseudo-labels and stage 2 to it
            if key not in chains:
                chains.add(key)
                s1, _ = seconds(cfg, "1", perf)
                whole, ok = seconds(cfg, "2", perf)
                base, base_ok = trainings.get(stage1, (s1, True))
                trainings[stage1] = (base + whole - s1, base_ok and ok)
                if stage1 not in stage1_cells and key in done_chains:
                    done.add(stage1)  # a stored chain trained its stage 1 too
                left[stage1] = (left.get(stage1, 0.0 if stage1 in done else s1)
                                + (0.0 if key in done_chains else whole - s1))
        elif key not in trainings:  # else counted already: a shared training, or the model a chain built on
            trainings[key] = seconds(cfg, spec.stage, perf)
            if key not in done:
                left[key] = trainings[key][0]
        if trained and trained["split"] != spec.config["eval"]["split"]:
            # the shared model's final evaluation on this split (stage 1 and stage 2 for a chain)
            split = spec.config["eval"]["split"]
            share = (_split_expressions(spec.config, split) / _packed_rate(spec.config, perf) if packed
                     else _expressions(split) / infer)
            extra_eval += share * (1 + (spec.stage == "2"))
            left_eval += 0.0 if spec.cell_id in stored else share * (1 + (spec.stage == "2"))
    durations = [d for d, _ in trainings.values()]
    return {"table": name, "cells": n_cells, "trainings": len(trainings) + len(chains),  # a chain's stage 2 too
            "one_gpu_s": sum(durations) + extra_eval, "two_gpus_s": makespan(durations, 2) + extra_eval / 2,
            "complete": all(ok for _, ok in trainings.values()),
            "stored": len(done & trainings.keys()) + len(done_chains & chains),
            "left_one_gpu_s": sum(left.values()) + left_eval}


def _hours(seconds: float, complete: bool = True) -> str:
    # the unit chosen after rounding: 3,590 s is "1.0 h", not "60 min"; 59.6 s is "1 min"
    minutes = round(seconds / 60)
    text = f"{seconds / 3600:.1f} h" if minutes >= 60 else f"{minutes} min" if minutes >= 1 else "< 1 min"
    return text if complete else f">= {text}"


def markdown(rows: list[dict], perf: dict, perf_path: str, profile: str, seeds: int,
             results: str | None = None) -> str:
    """The README's estimate block; `results`: the store the rows' `stored` counts came from."""
    gpu = perf.get("environment", {}).get("gpu", perf.get("device", "?"))
    levers = ", ".join(k for k, v in perf.get("levers", {}).items() if v) or "none"
    if profile != "paper":
        mps = " under MPS" if perf.get("environment", {}).get("mps") else ""
        lines = [f"Estimated from `{perf_path}` ({gpu}; {perf.get('procs')} processes at once{mps}; levers: "
                 f"{', '.join(f'{k}={v}' if v is not True else k for k, v in perf.get('levers', {}).items() if v)}) "
                 f"by `{command_line(profile, results)}`: {seeds} seed(s), each cell's own dataset, "
                 "cells packed on each GPU, so a training costs its share of the summed rate (an estimate: "
                 "every cell not TRIS-like at EHIN's rate, though rows with more BP layers, K = 9 or smaller "
                 "batches cost more and those with fewer less, evaluations as training images; each wave's "
                 "process start and compilation, minutes, are not counted; \">=\": a two-stage chain counts "
                 "its stage 1 only; \"-\": Table 10's timing cells, run alone, are not counted).",
                 ""]
        return "\n".join(lines + _table(rows, results)) + "\n"
    lines = [f"Estimated from `{perf_path}` ({gpu}; levers: {levers}) by `{command_line(profile, results)}`: profile "
             f"{profile}, {seeds} seed(s), every dataset at RefCOCO+'s size, cells one after another on each GPU "
             "(packing cells would shorten them; \">=\": the JSON has no stage-2 rate, so the two-stage chains "
             "count their stage 1 and pseudo-labels only).", ""]
    return "\n".join(lines + _table(rows, results)) + "\n"


def _table(rows: list[dict], results: str | None) -> list[str]:
    """The estimate's table; with `results`, how many trainings that store holds and what the rest take."""
    lines = []
    head = "| table | cells | trainings | one GPU | two GPUs |"
    if results:
        lines = [f"Stored: the trainings with a record in `{results}` (one shared by several cells or tables "
                 "counted once, as in `trainings`); the rest: what the others take on one GPU, estimated as "
                 "above.", ""]
        head += " stored | the rest, one GPU |"
    return lines + [head, "|" + "---|" + "---:|" * (head.count("|") - 2)] + [_table_row(r, results) for r in rows]


def _table_row(r: dict, results: str | None) -> str:
    cols = [r["table"], r["cells"], r["trainings"]]
    timed = r["one_gpu_s"] > 0  # else Table 10's timing cells on a packed profile: not counted
    cols += [_hours(r["one_gpu_s"], r["complete"]), _hours(r["two_gpus_s"], r["complete"])] if timed else ["-", "-"]
    if results:
        rest = r["left_one_gpu_s"]
        cols += [r["stored"], "-" if not timed else _hours(rest, r["complete"]) if rest > 0 else "none"]
    return "| " + " | ".join(str(c) for c in cols) + " |"


def command_line(profile: str = "paper", results: str | None = None) -> str:
    """The command that writes an estimate block (the README's markers name it)."""
    return ("python -m bench.estimate" + (f" --profile {profile}" if profile != "paper" else "")
            + (f" --results {results}" if results else ""))


def update_readme(readme: str | Path, block: str, profile: str = "paper", results: str | None = None) -> bool:
    """Rewrite the README's estimate block of `profile` (of `results` too); True when it changed."""
    from bench.report import replace_block

    if profile == "paper" and not results:
        return replace_block(readme, README_BEGIN, README_END, block)
    return replace_block(readme, f"<!-- estimate-{profile}:begin ({command_line(profile, results)}) -->",
                         f"<!-- estimate-{profile}:end -->", block)


@command
def main(argv: list[str] | None = None) -> None:
    from bench.run import DEFAULT_SEEDS
    from bench.sweeps import list_sweeps

    p = command_parser("python -m bench.estimate", __doc__)
    p.add_argument("tables", nargs="?", default="all", help="sweep names joined by commas, or all (default)")
    p.add_argument("--profile", default="paper", choices=("paper", "gpu"),
                   help="paper: RefCOCO+'s size, cells one after another; gpu: the synthetic testbed's own "
                        "datasets, cells packed (default: paper)")
    p.add_argument("--perf", help=f"a bench.perf JSON: --size paper (default: {DEFAULT_PERF}), or for "
                                  f"--profile gpu a --size gpu --procs N one (default: {DEFAULT_PACKED_PERF})")
    p.add_argument("--seeds", type=int, help="seeds per row (default: the profile's)")
    p.add_argument("--results", help="a results folder holding store.jsonl: also count the trainings it holds "
                                     "and estimate the rest")
    p.add_argument("--readme", help="rewrite this README's estimate block of the profile instead of printing only")
    args = p.parse_args(argv)
    args.perf = args.perf or (DEFAULT_PERF if args.profile == "paper" else DEFAULT_PACKED_PERF)
    tables = list_sweeps() if args.tables == "all" else args.tables.split(",")
    unknown = sorted(set(tables) - set(list_sweeps()))
    if unknown:
        raise UserError(f"unknown table(s) {', '.join(unknown)} (have: {', '.join(list_sweeps())})")
    if not Path(args.perf).exists():
        raise UserError(f"{args.perf}: no such perf JSON (python -m bench.perf --size {args.profile}"
                        f"{' --procs 16 --mps' if args.profile != 'paper' else ''} --out ... makes one)")
    perf = json.loads(Path(args.perf).read_text())
    if perf.get("size") != args.profile:
        raise UserError(f"{args.perf} was measured at size {perf.get('size')!r}; --profile {args.profile} needs "
                        f"bench.perf --size {args.profile}")
    if args.profile != "paper" and (perf.get("procs") or 1) < 2:
        raise UserError(f"{args.perf} timed one process; --profile {args.profile} needs a packed measurement "
                        "(bench.perf --procs N)")
    stored = None
    if args.results:
        from bench.store import STORE_NAME, ResultStore

        store = ResultStore(args.results)
        if not store.files():  # store.jsonl or its sealed segments
            raise UserError(f"{args.results}: no {STORE_NAME} here (--results names the folder bench.run --results wrote)")
        stored = store.finished_ids()
    seeds = args.seeds or DEFAULT_SEEDS[args.profile]
    block = markdown(estimate(tables, perf, args.profile, seeds, stored), perf, args.perf, args.profile, seeds,
                     args.results)
    print(block)
    if args.readme:
        changed = update_readme(args.readme, block, args.profile, args.results)
        print(f"{args.readme}: {args.profile} estimate block {'updated' if changed else 'unchanged'}")


if __name__ == "__main__":
    main()
