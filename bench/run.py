"""Run a paper table as a sweep and render it beside the paper's numbers.

    python -m bench.run table5                         # synthetic profile, 3 seeds, 2 local processes
    python -m bench.run table5 --profile smoke         # CI-sized, 1 seed
    python -m bench.run table3 --executor inline       # in this process, one cell after another
    python -m bench.run table5 --jobs 21               # a GPU machine: each cell on a GPU, round-robin
    python -m bench.run table5 --executor slurm --slurm-partition gpu --slurm-gpus 1 \\
        --slurm-setup "module load cuda"
    python -m bench.run all --profile smoke            # every table
    python -m bench.run all --profile gpu --results reports/gpu/store --render-only   # the tables stored so far

Every (row, seed) is one cell and one job. Several tables (or `all`) form one queue: the executor's
--jobs slots stay busy across tables (on a GPU machine --jobs above the GPU count packs several cells
on each GPU), and a cell that several tables declare runs once and is recorded for each. Finished cells are appended to RESULTS/store.jsonl; a
rerun skips them, so an interrupted sweep resumes where it stopped and a finished one re-renders
at once. Shared prerequisites (the generated dataset, the pretrained small CLIP) are built once
here, before any job starts. Tables go to reports/<table>/ (synthetic profile) or
reports/<profile>/<table>/ (other profiles).
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext
from pathlib import Path

from bench.executors import COMPILE_WAIT_S, EXECUTORS, add_slurm_args, dispatch, slurm_options
from bench.jobs import CellSpec, compile_group, hand_over_labels, training_config, training_dir
from bench.mps import add_mps_arg, mps_control, mps_daemon
from bench.store import ResultStore, cell_id
from ehin.cli import UserError, command, command_parser
from ehin.config import config_hash
from ehin.training_log import logged_epochs

PROJECT_REPORTS = Path(__file__).resolve().parents[1] / "reports"  # the committed reports beside README.md

DEFAULT_SEEDS = {"smoke": 1, "synthetic": 3, "gpu": 5, "paper": 1}


def results_root(profile: str, results: str | None) -> Path:
    return Path(results) if results else Path("results") / profile


def reports_dir(table: str, profile: str, reports: str | Path = "reports") -> Path:
    return Path(reports) / table if profile == "synthetic" else Path(reports) / profile / table


def build_specs(sweep, profile: str, seeds: int, root: Path, rows: list[str] | None = None,
                extra_overrides: dict | None = None) -> list[CellSpec]:
    """One CellSpec per cell, carrying the config `Sweep.cells` resolved (jobs never resolve it again); `rows`:
    those rows' cells only, sharing trainings as they do in the whole table."""
    specs = []
    for cell in sweep.cells(profile, list(range(seeds)), extra_overrides):
        # A stage-1 cell's identity leaves out what only stage 2 reads, so changing a profile's stage-2
        # or pseudo-label settings does not invalidate stage-1 results; the trainer's resume guard
        # compares the same hash (ehin.config.config_hash(cfg, stage="1")).
        h = cell.config_hash()
        cid = cell_id(sweep.name, cell.row, cell.seed, profile, h)
        run_dir = root / "runs" / sweep.name / _safe(cell.row) / f"seed{cell.seed}-{h}"
        specs.append(CellSpec(table=sweep.name, row=cell.row, seed=cell.seed, profile=profile,
                              stage=cell.stage, overrides=cell.overrides, config=cell.config,
                              config_hash=h, run_dir=str(run_dir), store_root=str(root), cell_id=cid,
                              extra=dict(cell.extra)))
    # Shared trainings are found among every cell of the table, then the rows picked: a --rows run trains
    # in the same folder, evaluating the same split per epoch, as the whole table (a training shared by
    # fewer columns would evaluate another split there, and its resume guard would refuse the other run's
    # checkpoint), and a Stage-2 row alone still builds on its Stage-1 row's model.
    share_trainings(specs, root)
    return [s for s in specs if s.row in rows] if rows else specs


def training_hash(spec: CellSpec) -> str:
    """The hash of what a cell trains: its config with the evaluated split left out."""
    cfg = {**spec.config, "eval": {**spec.config["eval"], "split": None}}
    return config_hash(cfg, stage="1" if spec.stage == "1" else None)


def share_trainings(specs: list[CellSpec], root: Path) -> None:
    """Cells of one table that differ only in the split they evaluate (Table 2's columns of one
    dataset) train one model and evaluate it on each split, as the paper does: each gets
    extra["trained"] = {dir, split}, the shared run folder and the split that training evaluates
    per epoch (the group's first); bench.jobs.run_cell trains there once and evaluates its own split."""
    groups: dict[tuple, list[CellSpec]] = {}
    for spec in specs:
        if spec.stage in ("1", "2"):
            groups.setdefault((spec.table, spec.stage, spec.seed, training_hash(spec)), []).append(spec)
    for (table, stage, seed, h), group in groups.items():
        if len({s.config["eval"]["split"] for s in group}) < 2:
            continue
        trained = {"dir": str(root / "runs" / table / f"_stage{stage}" / f"seed{seed}-{h}"),
                   "split": group[0].config["eval"]["split"]}
        for spec in group:
            spec.extra["trained"] = trained
    # A Stage-2 cell builds on the model of the Stage-1 cell with the same stage-1 config and seed, as the
    # paper's Stage-2 rows build on its Stage-1 rows: its chain trains stage 1 in that cell's folder (or
    # finds it trained there) instead of a second copy, which would be another model on a GPU (its runs are
    # not bit-reproducible) and as much training again.
    stage1_dirs = {}
    for spec in specs:
        if spec.stage == "1":
            stage1_dirs.setdefault((spec.table, spec.seed, _stage1_hash(spec)), training_dir(spec))
    for spec in specs:
        if spec.stage == "2":
            found = stage1_dirs.get((spec.table, spec.seed, _stage1_hash(spec)))
            if found is not None:
                spec.extra["stage1_dir"] = found


def _stage1_hash(spec: CellSpec) -> str:
    """The stage-1 hash of the run a cell's stage 1 is (the resume guard's): its config evaluating its
    training's split per epoch, without the sections only stage 2 reads."""
    return config_hash(training_config(spec), stage="1")


def cell_state(spec: CellSpec, done: set[str]) -> str:
    """--dry-run's word for a cell: done (stored), failed (its error.txt), started (its run folder exists
    but no record: running now, or stopped, and then the same command resumes it), else todo. A started
    cell says how many epochs of each stage its trainings have logged (the folder it trains in, which a
    shared training or a Stage-2 cell's stage 1 may place elsewhere), so a lent machine's poll can name
    what a lost machine takes with it."""
    if spec.cell_id in done:
        return "done"
    run_dir = Path(spec.run_dir)
    if (run_dir / "error.txt").exists():
        return "failed"
    if not (run_dir / "config.yaml").exists():  # bench.jobs.run_cell writes it first
        labels = f"pseudo/{spec.config['data']['train_split']}.npz" if spec.stage == "2" else None
        if labels and (Path(training_dir(spec)) / labels).exists():
            return "todo, its chain's labels made"  # bench.run --hand-over made them, here or on another machine
        return "todo"
    cfg = spec.config
    if spec.stage == "1":
        logs = [(training_dir(spec), cfg["train"]["epochs"], "")]
    elif spec.stage == "2":
        trained = Path(training_dir(spec))  # ehin.two_stage's layout: stage1/ (or a stage 1 made elsewhere), stage2/
        logs = [(spec.extra.get("stage1_dir") or trained / "stage1", cfg["train"]["epochs"], "stage 1 "),
                (trained / "stage2", cfg["stage2"]["epochs"], "stage 2 ")]
    else:
        return "started"
    return "started, epochs logged: " + ", ".join(f"{name}{logged_epochs(d)} of {n}" for d, n, name in logs)


def leaders_first(specs: list[CellSpec]) -> list[CellSpec]:
    """The queue with the cells that train a shared model first and those that only evaluate it after
    (stable otherwise): the later ones then mostly find the model trained instead of waiting for it."""
    return sorted(specs, key=lambda spec: training_config(spec)["eval"]["split"] != spec.config["eval"]["split"])


def shared_training(spec: CellSpec) -> tuple[str | None, tuple[str, ...]]:
    """For the local executor (bench.executors.dispatch): (the folder this cell trains a model in, or None
    when it only evaluates one; the folders whose trainings it needs first). Table 2's other splits need
    their group's training; a Stage-2 cell needs its Stage-1 cell's (share_trainings), and one of a
    Stage-2 group's other splits both (its group's training may be stored already, its stage 1 not)."""
    if spec.stage not in ("1", "2"):
        return None, ()
    leads = training_config(spec)["eval"]["split"] == spec.config["eval"]["split"]
    needs = () if leads else (training_dir(spec),)
    if spec.stage == "2" and spec.extra.get("stage1_dir"):
        needs += (spec.extra["stage1_dir"],)
    return (training_dir(spec) if leads else None), needs


def cell_identity(spec_or_record) -> tuple:
    """What makes two cells the same computation: config hash, seed, stage and the job's extra
    arguments (inference cells differ only there), less the ranks that train it (bench.run --ranks: the
    same gradient on the same global batch; its records say world_size)."""
    get = spec_or_record.get if isinstance(spec_or_record, dict) else lambda k, d=None: getattr(spec_or_record, k, d)
    extra = {k: v for k, v in (get("extra") or {}).items() if k != "ranks"}
    return get("config_hash"), get("seed"), get("stage"), repr(sorted(extra.items()))


def reuse_identical_cells(todo: list[CellSpec], store: ResultStore, write: bool = True) -> list[CellSpec]:
    """A cell whose exact config and seed already ran for another table (Table 6's EHIN is Table 5's
    full loss) gets a copy of that record instead of a second training run; returns the rest. With
    write=False (a dry run) nothing is stored: the copies are only left out of the rest."""
    ran = {cell_identity(r): r for r in store.read() if "config_hash" in r}
    rest = []
    for spec in todo:
        src = ran.get(cell_identity(spec))
        if src is None:
            rest.append(spec)
            continue
        if write:
            store.append({**src, "table": spec.table, "row": spec.row, "cell_id": spec.cell_id,
                          "overrides": spec.overrides, "extra": spec.extra, "reused_from": src["cell_id"]})
    return rest


def one_queue(todo: list[CellSpec]) -> tuple[list[CellSpec], list[CellSpec]]:
    """Split the cells of several tables into (to run, copies): one cell per identity runs, and the
    cells identical to it across tables get its record afterwards (reuse_identical_cells)."""
    first: dict[tuple, CellSpec] = {}
    copies = []
    for spec in todo:
        if cell_identity(spec) in first:
            copies.append(spec)
        else:
            first[cell_identity(spec)] = spec
    return list(first.values()), copies


def prepare_prerequisites(specs: list[CellSpec]) -> None:
    """Generate datasets and pretrain the small CLIP once per distinct need, before any job starts."""
    from ehin.train_stage1 import prepare

    seen = set()
    for spec in specs:
        cfg = spec.config
        key = repr((cfg["data"], cfg["synthetic"], cfg["backbone"], cfg["scorer"]))
        if key in seen:
            continue
        seen.add(key)
        prepare(cfg)


def failed_rows(specs: list[CellSpec], store: ResultStore, outcomes=()) -> set[str]:
    """Rows with a cell missing from the store whose last attempt failed: in this run, or earlier
    (the job leaves RUN_DIR/error.txt), so that the table says "failed" rather than "pending"."""
    done = store.finished_ids()
    bad = {cell_identity(o.spec) for o in outcomes if not o.ok}  # a copy of a failed cell failed with it
    return {s.row for s in specs if s.cell_id not in done
            and (cell_identity(s) in bad or (Path(s.run_dir) / "error.txt").exists())}


def declared_records(sweep, profile: str, store: ResultStore, seeds: int,
                     extra_overrides: dict | None = None) -> tuple[list[dict], list[dict]]:
    """(shown, left_out) of a table's stored records: the newest of each cell the command declares (every
    row, seeds 0..`seeds`-1, the --set overrides, by config hash) and every other record of the table.
    Rendered tables and the claims report (bench.check --claims) both read these."""
    from bench.render import split_by_config

    stored = store.select(table=sweep.name, profile=profile, latest_only=False)
    if not stored:
        return [], []
    expected = {(c.row, c.seed): c.config_hash() for c in sweep.cells(profile, list(range(seeds)), extra_overrides)}
    return split_by_config(stored, expected)


def testbed_verdicts(reports: str | Path) -> Path:
    """The testbed's verdicts file (bench.testbed --fidelity) a table's header reads: REPORTS' own, else the
    committed one, so a table rendered into another folder names the criteria its records' testbed met as the
    committed table does (testbed_status judges only records whose dataset and CLIP checksums that file froze)."""
    own = Path(reports) / "testbed" / "fidelity.json"
    return own if own.is_file() else PROJECT_REPORTS / "testbed" / "fidelity.json"


def render(sweep, profile: str, root: Path, reports: str | Path = "reports", seeds: int | None = None,
           failed: set[str] | frozenset[str] = frozenset(), extra_overrides: dict | None = None) -> Path:
    """Render the table of the cells this invocation declares (every row, `seeds` seeds, the same
    --set overrides): records of any other config stay out and the header counts them."""
    from bench.plots import write_plots
    from bench.render import write_tables

    n = seeds or DEFAULT_SEEDS[profile]
    records, left_out = declared_records(sweep, profile, ResultStore(root), n, extra_overrides)
    out = reports_dir(sweep.name, profile, reports)
    write_tables(sweep, records, out, profile=profile, seeds=list(range(n)), failed=failed, left_out=left_out,
                 fidelity_file=testbed_verdicts(reports))
    write_plots(sweep, records, out, profile=profile)
    return out


@command
def main(argv: list[str] | None = None) -> int:
    from bench.sweeps import list_sweeps, load_sweep
    from ehin.config import parse_assignments

    p = command_parser("python -m bench.run", __doc__)
    p.add_argument("table", help=f"a sweep name ({', '.join(list_sweeps())}), several joined by commas, or 'all'")
    p.add_argument("--profile", default="synthetic", choices=sorted(DEFAULT_SEEDS),
                   help="smoke (CI-sized), synthetic (default), gpu (the testbed at TESTBED.md's size), paper (real data, GPU)")
    p.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="local (default): submitit local processes, --jobs at once, the cores shared "
                        "between them; inline: this process, one cell after another; slurm: SLURM job arrays")
    p.add_argument("--seeds", type=positive_int, help="seeds per row (default: 1 smoke, 3 synthetic, 5 gpu, 1 paper)")
    p.add_argument("--jobs", type=int, default=2,
                   help="cells at once with --executor local, array tasks at once with slurm (default: 2)")
    p.add_argument("--results", help="results folder holding store.jsonl (default results/<profile>)")
    p.add_argument("--reports", default="reports", help="where rendered tables and plots go (default: reports)")
    p.add_argument("--rows", help="comma-separated subset of rows (default: every row)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every cell (changes the cells' config hash; the rendered "
                        "table's header names it and the dataset the cells ran on)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells: done, started (epochs logged, no record), failed or todo")
    p.add_argument("--ranks", type=positive_int, default=1,
                   help="train each cell's stage 1 (a Stage-2 chain's stage 2 too) as one data-parallel job of this "
                        "many processes on its machine (one GPU each; gloo on CPU): the same gradient as one process "
                        "on the global batch (docs/method.md, D-DDP); records say world_size; give it its own "
                        "--results to compare with one process (bench.check --against) (default: 1)")
    add_mps_arg(p)
    add_compile_wait_arg(p)
    add_start_within_arg(p)
    p.add_argument("--no-render", action="store_true", help="run the cells without rendering the tables")
    p.add_argument("--render-only", action="store_true",
                   help="render the tables from the stored records without running a cell (a sweep run over "
                        "several sittings: the cells not stored yet show as pending; a cell whose computation another "
                        "table stored, Table 6's EHIN as Table 5's full loss, gets its copy of that record, once)")
    p.add_argument("--hand-over", metavar="DIR",
                   help="Table 2's Stage-2 cells not stored: make their chains' pseudo-labels on the stage-1 models "
                        "trained in RESULTS, in this process, training no stage 2 and storing nothing, and copy into "
                        "DIR what another machine needs to train their stage 2 without the stage-1 checkpoints (stage "
                        "1's result and the labels): copy DIR's contents into that machine's RESULTS and run the cells "
                        "there (ehin.two_stage; a GPU lent for less time than a chain takes); exits 3 when a chain's "
                        "stage 1 is not trained")
    add_slurm_args(p)
    args = p.parse_args(argv)

    names = list_sweeps() if args.table == "all" else [t for t in args.table.split(",") if t]
    unknown = [n for n in names if n not in list_sweeps()]
    if unknown:
        p.error(f"unknown table {unknown[0]!r}; choose from {', '.join(list_sweeps())} or 'all'")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    if rows:
        # A misspelt row would otherwise select nothing and render an all-pending table.
        known = list(dict.fromkeys(row for name in names for row in load_sweep(name).rows))
        bad = [r for r in rows if r not in known]
        if bad:
            p.error(f"unknown row {bad[0]!r} in --rows for {', '.join(names)}; rows: {', '.join(known)}")
    if args.render_only and (args.dry_run or args.no_render):
        p.error("--render-only renders without running; it goes with neither --dry-run nor --no-render")
    seeds = args.seeds if args.seeds is not None else DEFAULT_SEEDS[args.profile]
    extra = parse_assignments(args.overrides)
    if args.hand_over:
        if args.render_only or args.dry_run:
            p.error("--hand-over makes labels and copies them; it goes with neither --render-only nor --dry-run")
        return hand_over([load_sweep(name) for name in names], args.profile, seeds,
                         results_root(args.profile, args.results), Path(args.hand_over), rows, extra, args.start_within)
    return run_tables([load_sweep(name) for name in names], args.profile, seeds,
                      results_root(args.profile, args.results), executor=args.executor, jobs=args.jobs,
                      rows=rows, extra=extra, slurm=slurm_options(args, array_parallelism=args.jobs),
                      reports=args.reports, render_tables=not args.no_render, dry_run=args.dry_run,
                      mps=args.mps, compile_wait_s=args.compile_wait, run_cells=not args.render_only,
                      start_within_s=args.start_within, ranks=args.ranks)


def add_compile_wait_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-wait", type=float, default=COMPILE_WAIT_S, metavar="SECONDS",
                   help="with train.compile on a GPU host, the local executor starts one cell of each compiled graph "
                        "and holds the graph's other cells until it has taken a step (a warm compile cache) or this "
                        f"long (default: {COMPILE_WAIT_S:.0f}; 0: start them all at once)")


def add_start_within_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--start-within", type=float, metavar="SECONDS",
                   help="inline or local: start no cell later than this many seconds after the first (local: but a "
                        "cell that only evaluates a model trained in this run, Table 2's other splits, or that had a "
                        "free slot in time and waited only for its graph to compile: it starts up to --compile-wait "
                        "later, or later still if the compiling cell fails before its first step), and end when the "
                        "started ones have (a machine lent for a known time loses the cells still running when it "
                        "goes); the cells not started stay pending for the same command, and this one exits 3 "
                        "(default: no limit)")


def run_tables(sweeps: list, profile: str, seeds: int, root: Path, *, executor: str = "local",
               jobs: int = 2, rows: list[str] | None = None, extra: dict | None = None,
               slurm: dict | None = None, reports: str | Path = "reports", render_tables: bool = True,
               dry_run: bool = False, mps: bool = False, compile_wait_s: float = COMPILE_WAIT_S,
               run_cells: bool = True, start_within_s: float | None = None, ranks: int = 1) -> int:
    """Run the cells of `sweeps` missing from ROOT/store.jsonl as one queue, then render each table;
    returns the exit status (1 when a cell failed, else 3 when start_within_s left cells unstarted).
    `mps`: the local cells run under NVIDIA's MPS daemon (bench.mps). `compile_wait_s`: how long a
    compiled graph's other cells wait for its first cell's first step (`bench.jobs.compile_group`; 0: they
    all start at once). `run_cells=False` renders what is stored without running anything.
    `start_within_s`: no cell starts later than this many seconds after the first (executors.dispatch).
    `ranks`: each trained cell's stage 1 (and stage 2) trains as one data-parallel job of that many
    processes (ehin.launch.train_stage)."""
    if start_within_s is not None and executor == "slurm":
        raise UserError("--start-within is for --executor local or inline (a SLURM array is queued at once: --slurm-time)")
    if mps and executor != "local":
        raise UserError("--mps is for --executor local (on SLURM, ask the cluster for MPS: --gres=mps)")
    if mps and not dry_run and run_cells:
        mps_control()  # refuse before any dataset is prepared, not after
    store = ResultStore(root)
    extra = dict(extra or {})
    if executor == "local":
        # Share the cores between the cells running at once (thread count is not part of the hash).
        extra.setdefault("train.threads", max(1, (os.cpu_count() or 1) // max(1, jobs * ranks)))
    # One queue for every table named (`all` included): the executor keeps its --jobs slots busy
    # across tables, and a cell that several tables declare (Table 6's EHIN is Table 5's full loss)
    # trains once; the tables are rendered when the queue is empty.
    done = store.finished_ids()
    all_specs, queue = {}, []
    for sweep in sweeps:
        specs = all_specs[sweep.name] = build_specs(sweep, profile, seeds, root, rows, extra)
        if ranks > 1:
            data_parallel_cells(specs, ranks)
        todo = reuse_identical_cells([s for s in specs if s.cell_id not in done], store, write=not dry_run)
        queue += todo
        print(f"{sweep.name}: {sweep.title}\n  {len(specs)} cells ({len(specs) - len(todo)} already in "
              f"{store.path}, {len(todo)} to run), profile {profile}, executor {executor}")
        if dry_run:
            copied = {s.cell_id for s in specs if s.cell_id not in done} - {s.cell_id for s in todo}
            for s in specs:
                state = "a stored cell's copy, written when run" if s.cell_id in copied else cell_state(s, done)
                print(f"  [{state}] {s.cell_id}")
    if dry_run:
        return 0
    to_run, copies = one_queue(queue)
    to_run = leaders_first(to_run)
    outcomes = []
    if to_run and not run_cells:
        print(f"{len(to_run)} cells not stored yet: rendered as pending (--render-only)")
    elif to_run:
        if len(sweeps) > 1:
            print(f"one queue: {len(to_run)} cells to run for {len(sweeps)} tables"
                  f" ({len(copies)} more are the same computation as one of them)")
        prepare_prerequisites(to_run)
        with mps_daemon() if mps else nullcontext():
            outcomes = dispatch(to_run, executor, jobs=jobs, folder=root / "submitit", slurm=slurm,
                                compile_group=compile_group if compile_wait_s > 0 else None,
                                compile_wait_s=compile_wait_s, shared_training=shared_training,
                                start_within_s=start_within_s)
    reuse_identical_cells(copies, store)  # a copy whose cell failed stays missing, as that cell
    failed = sum(not o.ok for o in outcomes)
    if render_tables:
        for sweep in sweeps:
            out = render(sweep, profile, root, reports, seeds, failed_rows(all_specs[sweep.name], store, outcomes), extra)
            md = out / "table.md"
            if md.exists():
                print(md.read_text())
            print(f"  rendered into {out}/")
        if Path(reports).resolve() == PROJECT_REPORTS and (PROJECT_REPORTS.parent / "README.md").is_file():
            refresh_views(PROJECT_REPORTS)
    # A script's `bench.run ... && next-step` must not read a sitting cut short by --start-within as complete.
    unstarted = len(to_run) - len(outcomes) if run_cells and start_within_s is not None else 0
    if failed:
        print(f"{failed} cell(s) failed" + (f" and {unstarted} were not started before --start-within ran out"
                                           if unstarted else "")
              + "; rerun the same command to run only those.", file=sys.stderr)
        return 1
    if unstarted:
        print(f"{unstarted} cell(s) not started before --start-within ran out; rerun the same command to run them "
              "(exit 3).", file=sys.stderr)
        return 3
    return 0


def hand_over(sweeps: list, profile: str, seeds: int, root: Path, dest: Path, rows: list[str] | None,
              extra: dict, start_within_s: float | None) -> int:
    """bench.run --hand-over (bench.jobs.hand_over_labels) for the Stage-2 cells of `sweeps` not stored yet."""
    done = ResultStore(root).finished_ids()
    extra = {"train.threads": os.cpu_count() or 1, **extra}  # one process makes the labels (not hashed)
    specs = [s for sweep in sweeps for s in build_specs(sweep, profile, seeds, root, rows, extra)]
    if not any(s.stage == "2" for s in specs):
        raise UserError("--hand-over: the cells picked have no Stage-2 cell (Table 2's two-stage chains)")
    todo = [s for s in specs if s.stage == "2" and s.cell_id not in done]
    print(f"handing over the labels of the chains of {len(todo)} Stage-2 cells not stored in {root}")
    n, chains = hand_over_labels(todo, dest, start_within_s)
    print(f"{n} of {chains} chains handed over into {dest}")
    return 0 if n == chains else 3


def data_parallel_cells(specs: list[CellSpec], ranks: int) -> None:
    """Mark each trained cell (a stage-1 cell, a Stage-2 chain's two trainings) to train as one job of `ranks`
    processes (spec.extra["ranks"]: not hashed, so the cell and its store record keep their identity, and
    the local executor gives the cell a GPU a rank: executors.gpu_slot). Refuses, before anything runs, a global
    batch the ranks cannot split, or more ranks than this machine has GPUs."""
    import torch

    for spec in specs:
        if spec.stage not in ("1", "2"):
            continue  # Table 10's timing cells run as they are
        for key in ("train", "stage2") if spec.stage == "2" else ("train",):
            batch = spec.config[key]["batch_size"]
            if batch % ranks:
                raise UserError(f"--ranks {ranks}: {key}.batch_size {batch} of {spec.table} {spec.row!r} "
                                f"is not divisible by the {ranks} ranks")
        spec.extra["ranks"] = ranks
    if torch.cuda.is_available() and ranks > torch.cuda.device_count():
        raise UserError(f"--ranks {ranks}: one GPU per rank, and this machine has {torch.cuda.device_count()}")


def refresh_views(reports: Path) -> None:
    """Rewrite what the tests keep equal to the project's reports/ (tests/test_render.py,
    tests/test_findings.py): reports/index.html, the README's results block and docs/findings.md. A
    table rendered there (the README's main job) changes them too, so the README's test command
    that follows it finds the checkout consistent."""
    from bench.findings import FINDINGS, findings
    from bench.report import update_readme, write_index

    root = reports.parent
    write_index(reports)
    update_readme(root / "README.md", reports)
    (root / FINDINGS).parent.mkdir(parents=True, exist_ok=True)
    (root / FINDINGS).write_text(findings(reports, root))
    print(f"  refreshed {reports / 'index.html'}, README.md's results block and {FINDINGS} from {reports}/")


def positive_int(text: str) -> int:
    """argparse type of counts: 0 or a negative number is an error, not 'the default'."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


if __name__ == "__main__":
    sys.exit(main())
