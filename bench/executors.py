"""Run cells in-process, as local processes (submitit LocalExecutor) or as SLURM array tasks.

All three go through `dispatch`, which keeps a live view (done / running / failed / pending and
an ETA) and never lets one failed cell stop the others: a failure is reported with its log path
and the last line of its error, and the sweep goes on. Local cells end with their run (Ctrl-C,
SIGTERM, an error); SLURM's array tasks stay in the cluster's queue (scancel ends them).

A job is a `Runner` called with one spec: `bench.jobs.CellRunner` for the cells of a sweep (the
default), `bench.search.worker.SearchWorker` for the workers of a hyper-parameter search.

`submit_distributed` submits one training as one SLURM job of nodes x tasks_per_node DDP ranks
(`python -m bench.launch_ddp`).
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Protocol, Sequence

import submitit

from bench.jobs import CellRunner, DistributedTraining
from ehin.cli import on_sigterm, sigterm_unwinds

EXECUTORS = ("inline", "local", "slurm")


# How long a compiled graph's other cells wait for its first cell's first step (dispatch's compile_group):
# a paper-size graph compiled with max-autotune can take minutes.
COMPILE_WAIT_S = 900.0


@dataclass
class SlurmOptions:
    partition: str | None = None
    time_min: int = 60
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: float | None = None
    setup: list[str] = field(default_factory=list)   # e.g. ["module load cuda/12.4"]
    array_parallelism: int = 64
    nodes: int = 1                                   # submit_distributed only: a sweep cell is one task
    tasks_per_node: int = 1                          # DDP ranks per node (one per GPU)


def add_slurm_args(p: argparse.ArgumentParser, *, time_min: int = 60, job: str = "job") -> None:
    """The --slurm-* options of bench.run, bench.search and bench.launch_ddp (`slurm_options` reads
    them back); `job` names what one SLURM job runs in the help ("worker job" for a search)."""
    g = p.add_argument_group("slurm")
    g.add_argument("--slurm-partition", help="partition (default: the cluster's default partition)")
    g.add_argument("--slurm-time", type=int, default=time_min, help=f"minutes per {job} (default: {time_min})")
    g.add_argument("--slurm-gpus", type=int, default=0,
                   help=f"GPUs per {job}, per node for bench.launch_ddp (default: 0)")
    g.add_argument("--slurm-cpus", type=int, default=2,
                   help=f"CPUs per {job}, per task for bench.launch_ddp (default: 2)")
    g.add_argument("--slurm-mem-gb", type=float, help=f"memory per {job} in GB (default: the partition's)")
    g.add_argument("--slurm-setup", action="append", default=[],
                   help="a shell line run before the job (repeatable; default: none)")


def slurm_options(args: argparse.Namespace, **extra) -> SlurmOptions:
    return SlurmOptions(partition=args.slurm_partition, time_min=args.slurm_time, gpus_per_node=args.slurm_gpus,
                        cpus_per_task=args.slurm_cpus, mem_gb=args.slurm_mem_gb, setup=args.slurm_setup, **extra)


def slurm_params(opts: SlurmOptions) -> dict:
    """submitit parameters of a job (array or distributed) from `opts`."""
    params = dict(timeout_min=opts.time_min, cpus_per_task=opts.cpus_per_task, slurm_setup=list(opts.setup))
    if opts.partition:
        params["slurm_partition"] = opts.partition
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    if opts.mem_gb:
        params["mem_gb"] = opts.mem_gb
    return params


class Runner(Protocol):
    """A job: picklable (submitit sends it to the job's process) and called there with one spec."""

    def __call__(self, spec: Any) -> Any: ...

    def label(self, spec: Any) -> str:
        """The job's name in the live view and in a failure's line."""

    def error_log(self, spec: Any) -> str | None:
        """Where an inline (in-process) run that raised left its traceback; None: on stderr only."""


@dataclass
class Outcome:
    spec: Any                       # a CellSpec, or the spec of another Runner
    ok: bool
    seconds: float
    record: dict | None = None
    error: str | None = None
    log: str | None = None

    def summary(self, label: str) -> str:
        """`label: error`, and the log's path on a second line where there is one."""
        return f"{label}: {self.error}" + (f"\n         log: {self.log}" if self.log else "")


class LiveView:
    """One status line, rewritten in place on a terminal and printed on change otherwise."""

    prefix = "[sweep]"

    def __init__(self, total: int, parallel: int, stream=None):
        self.total, self.parallel, self.stream = total, max(1, parallel), stream or sys.stderr
        self.start = time.time()
        self.durations: list[float] = []
        self._last = ""

    def update(self, done: int, running: int, failed: int) -> None:
        pending = self.total - done - running - failed
        eta = ""
        if self.durations:
            mean = sum(self.durations) / len(self.durations)
            remaining = (pending + running) * mean / min(self.parallel, max(1, pending + running))
            eta = f" | ETA {hms(remaining)}"
        line = (f"{self.prefix} {done}/{self.total} done, {running} running, {failed} failed, {pending} pending"
                f" | {hms(time.time() - self.start)} elapsed{eta}")
        if line == self._last:
            return
        self._last = line
        if self.stream.isatty():
            self.stream.write("\r" + line.ljust(100))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.stream.isatty():
            self.stream.write("\n")
        self.stream.write(text + "\n")
        self.stream.flush()
        self._last = ""

    def submitted(self, job: submitit.Job, label: str) -> None:
        """A job was handed to submitit (local or SLURM). Nothing to say: the line counts it as running."""

    def failed(self, label: str, outcome: Outcome) -> None:
        self.note(f"{self.prefix} FAILED {outcome.summary(label)}")


def dispatch(
    specs: Sequence[Any],
    executor: str = "inline",
    *,
    jobs: int = 1,
    folder: str | Path = "results/submitit",
    slurm: SlurmOptions | None = None,
    poll_s: float = 1.0,
    on_outcome: Callable[[Outcome], None] | None = None,
    runner: Runner | None = None,
    view: LiveView | None = None,
    local_timeout_min: int = 24 * 60,
    compile_group: Callable[[Any], tuple[Hashable, Path] | None] | None = None,
    compile_wait_s: float = COMPILE_WAIT_S,
    shared_training: Callable[[Any], tuple[Hashable | None, tuple[Hashable, ...]]] | None = None,
    start_within_s: float | None = None,
) -> list[Outcome]:
    """Run `runner(spec)` for every spec (default: `CellRunner`, specs are `CellSpec`s) on `executor`,
    at most `jobs` at a time locally. `view` replaces the sweep's status line (a search shows its
    study's progress instead); `local_timeout_min` is a local job's time limit (SLURM's is `slurm`'s).

    `compile_group(spec)` -> (group, marker) or None: locally, on a host with a GPU, the first cell of
    each group starts alone and the group's other cells wait until it writes `marker` (its first training
    step: torch.compile has then filled inductor's cache on this host's disk for the others to read; cells
    compiling one graph at once all miss that cache) or `compile_wait_s` passes; a first cell that ends
    without writing it (it failed before a step) passes the lead to the group's next cell.

    `shared_training(spec)` -> (the training it makes or None, the trainings it needs): locally, a
    cell that needs a model another cell of this dispatch trains (Table 2's other splits and Stage-2 cells,
    bench.run.share_trainings) waits, without taking a slot, until that cell ends, and then runs before
    every cell still queued: the model it reads lives only on this machine (a GPU lent for a sitting is
    gone with it, and a later sitting would train that model again). A needed training that no cell of
    this dispatch makes (its maker's record is stored, its folder is not here) is made by the first cell
    that needs it, a Stage-1 one first, while the others wait likewise. When a shared training fails, the
    cells that need it fail unstarted instead of each training it again.

    `start_within_s`: inline or local, no spec starts later than this many seconds after the dispatch
    began (locally, a cell that only evaluates a model whose training started in this dispatch still
    does: a short evaluation, without which that model is lost with the machine; so does a cell that had a
    free slot in time and waited only for its compile group's graph); the ones not started
    get no outcome (a sweep shows them pending, and the same command runs them). A machine lent for a
    known time loses every cell still running when it goes, and cells started late also slow the ones
    already running; so a sitting starts its cells early and lets them end."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r} (choose from {', '.join(EXECUTORS)})")
    if start_within_s is not None and executor == "slurm":
        raise ValueError("start_within_s is for the inline and local executors (SLURM queues the whole array at once)")
    if not specs:
        return []
    deadline = None if start_within_s is None else time.time() + start_within_s
    runner = runner or CellRunner()
    if executor == "inline":
        return _run_inline(specs, runner, view or LiveView(len(specs), 1), on_outcome, deadline)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if executor == "local":
        with sigterm_unwinds():
            return _run_local(specs, runner, view or LiveView(len(specs), jobs), jobs, folder, poll_s, on_outcome,
                              local_timeout_min, compile_group, compile_wait_s, shared_training, deadline)
    opts = slurm or SlurmOptions()
    return _run_slurm(specs, runner, view or LiveView(len(specs), opts.array_parallelism), opts, folder, poll_s,
                      on_outcome)


def _not_started(view: LiveView, n: int) -> None:
    if n:
        view.note(f"{view.prefix} {n} cell(s) not started: the time to start cells (--start-within) has passed; "
                  "the same command runs them")


def _run_inline(specs, runner: Runner, view: LiveView, on_outcome, deadline: float | None = None) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for i, spec in enumerate(specs):
        if deadline is not None and time.time() > deadline:
            _not_started(view, len(specs) - i)
            break
        view.update(sum(o.ok for o in outcomes), 1, sum(not o.ok for o in outcomes))
        t0 = time.time()
        try:
            record = runner(spec)
            outcome = Outcome(spec, True, time.time() - t0, record=record)
        except Exception as e:  # one failed cell never stops the sweep
            outcome = Outcome(spec, False, time.time() - t0, error=last_line(e), log=runner.error_log(spec))
            view.failed(runner.label(spec), outcome)
            traceback.print_exc(limit=3)
        view.durations.append(outcome.seconds)
        outcomes.append(outcome)
        if on_outcome:
            on_outcome(outcome)
    view.update(sum(o.ok for o in outcomes), 0, sum(not o.ok for o in outcomes))
    view.note("")
    return outcomes


def local_gpus() -> int:
    """GPUs this host shows (0 without CUDA). submitit's LocalExecutor hides every GPU from a job
    (CUDA_VISIBLE_DEVICES="") unless it is given some, so cells would silently train on the CPU."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_slot(index: int, n_gpus: int, ranks: int = 1) -> dict:
    """LocalExecutor parameters for the `index`-th cell: one GPU each, round-robin (small cells
    share a GPU well), or `ranks` distinct GPUs for a cell trained by that many ranks (bench.run --ranks:
    one GPU a rank); none without GPUs."""
    if not n_gpus:
        return {}
    ranks = min(ranks, n_gpus)  # bench.run.data_parallel_cells refuses more ranks than GPUs
    first = (index * ranks) % n_gpus
    return dict(gpus_per_node=ranks, visible_gpus=tuple((first + r) % n_gpus for r in range(ranks)))


def _run_local(specs, runner: Runner, view: LiveView, jobs, folder, poll_s, on_outcome,
               timeout_min: int, compile_group=None, compile_wait_s: float = COMPILE_WAIT_S,
               shared_training=None, deadline: float | None = None) -> list[Outcome]:
    ex = submitit.LocalExecutor(folder=str(folder / "%j"))
    ex.update_parameters(timeout_min=timeout_min)
    n_gpus = local_gpus()
    group_of = compile_group if n_gpus else None  # torch.compile is a CUDA lever (train.compile)
    submitted = 0
    queue = [(spec, group_of(spec) if group_of else None) for spec in specs]  # each spec's group, found once
    shared = {id(spec): shared_training(spec) for spec in specs} if shared_training else {}
    makes, needs = {}, {}  # each spec's training it makes (or None) and those it needs, found once
    training = {}  # a training -> the cell that makes it, queued or running
    for spec in specs:
        makes[id(spec)], needs[id(spec)] = shared.get(id(spec), (None, ()))
        if makes[id(spec)] is not None:
            training.setdefault(makes[id(spec)], spec)
    # A training no queued cell makes (its maker is stored, its folder is not on this machine: a later sitting)
    # is made by the first cell that needs it, a Stage-1 evaluation before a Stage-2 chain; the others wait for
    # it without holding a slot (they would queue on the training's lock, each in a slot, for a whole training).
    for spec in sorted(specs, key=lambda s: getattr(s, "stage", None) != "1"):
        for key in needs[id(spec)]:
            training.setdefault(key, spec)
    made_here = set(training)  # the trainings this dispatch makes: cells that only evaluate them may start late

    def evaluates_only(item, starters: list) -> bool:
        """The queued `item` makes no training and needs only ones made here, by cells among `starters` or done."""
        return makes[id(item[0])] is None and bool(needs[id(item[0])]) and all(
            k in made_here and (k not in training or any(training[k] is s for s in starters))
            for k in needs[id(item[0])])

    running: list[tuple[submitit.Job, Any, float]] = []
    outcomes: list[Outcome] = []
    compiling: dict[Hashable, tuple[submitit.Job, Path, float]] = {}  # group -> its first cell, marker, start
    compiled: set[Hashable] = set()
    # LocalExecutor starts every submitted job at once, so keep at most `jobs` in flight.
    # submitit's local jobs outlive their submitter, and a `kill` reaches this process alone: on any way out
    # (dispatch turns SIGTERM into SystemExit) the running cells are ended (_end_cells), else they train on as
    # orphans beside the cells a rerun starts in their folders.
    try:
        while queue or running:
            if queue and deadline is not None and time.time() > deadline:
                # past --start-within, a cell that only evaluates a model trained in this sitting still runs (a short
                # evaluation; else the model goes with the machine and a later sitting trains it again)
                started = [s for _, s, _ in running]
                late = {id(item) for item in queue if evaluates_only(item, started)}
                # and so does a cell that had a free slot in time and waits only for its graph to compile in another
                # cell (no training it needs is another cell's): a wave's measured time (h200_session.sh's
                # TABLE_WAVE_S) includes that wait, and a window shorter than one compilation otherwise starts one
                # cell per graph (session 51: 3 of a wave of 12, 9 slots idle)
                held = [item for item in queue if id(item) not in late and item[1] is not None
                        and item[1][0] in compiling
                        and not any(k in training and training[k] is not item[0] for k in needs[id(item[0])])]
                held = held[:max(0, max(1, jobs) - len(running) - len(late))]
                started += [item[0] for item in held]  # the evaluations of what a held cell trains go with it
                kept = {id(item) for item in held} | {id(item) for item in queue if evaluates_only(item, started)}
                _not_started(view, len(queue) - len(kept))
                queue = [item for item in queue if id(item) in kept]
                deadline = None  # the queue now holds only the cells allowed to start late
            for group, (job, marker, t0) in list(compiling.items()):
                if marker.exists() or time.time() - t0 > compile_wait_s:
                    compiled.add(group)
                    del compiling[group]
                elif job.done():  # ended without a step (failed, or nothing left to train): the next cell leads
                    del compiling[group]
            i = 0
            while i < len(queue) and len(running) < max(1, jobs):
                found = queue[i][1]
                if found is not None and found[0] in compiling:  # its graph is compiling in another cell: wait
                    i += 1
                    continue
                if any(k in training and training[k] is not queue[i][0] for k in needs[id(queue[i][0])]):
                    # a model it needs is being trained, or is about to be by another cell: wait
                    i += 1
                    continue
                spec = queue.pop(i)[0]
                first = found is not None and found[0] not in compiled  # this cell compiles its group's graph
                if first:
                    Path(found[1]).unlink(missing_ok=True)  # a marker of an earlier attempt says nothing of this cache
                ranks = (getattr(spec, "extra", None) or {}).get("ranks", 1)
                ex.update_parameters(**gpu_slot(submitted, n_gpus, ranks))
                job = ex.submit(runner, spec)
                view.submitted(job, runner.label(spec))
                running.append((job, spec, time.time()))
                submitted += 1
                if first:
                    compiling[found[0]] = (job, Path(found[1]), time.time())
            before = running
            running = _harvest(running, outcomes, runner, view, on_outcome)
            for _, spec, _ in before:
                if any(s is spec for _, s, _ in running):
                    continue
                for made in [k for k, maker in training.items() if maker is spec]:
                    del training[made]
                    if not next(o.ok for o in reversed(outcomes) if o.spec is spec):
                        # the cells that need it would train it again, each failing as it did: they fail unstarted
                        # (rerunning the command retries them with it)
                        queue = _fail_dependents(queue, made, needs, spec, runner, view, outcomes, on_outcome)
                    else:  # the cells that need it go first
                        queue.sort(key=lambda item, made=made: made not in needs[id(item[0])])
            view.update(sum(o.ok for o in outcomes), len(running), sum(not o.ok for o in outcomes))
            if running:
                time.sleep(poll_s)
    except BaseException:
        _end_cells(running)
        raise
    view.note("")
    return outcomes


def _end_cells(running: list, grace_s: float = 5, wait_s: float = 30) -> None:
    """End the running local jobs and wait until they have, so that what outlives them (an MPS daemon) can go.
    Ctrl-C reached the controllers too (the process group): a controller given SIGINT ends its task (SIGINT,
    then SIGKILL a second later), and a second SIGINT would cut that short, so the jobs get `grace_s` to end
    by themselves first. Those still running are then cancelled (submitit: SIGINT to the controller), as
    after a SIGTERM, which a submitit task ignores even where it reaches it (`timeout` signals the whole
    group). Meanwhile a further SIGTERM is ignored: leaving now would leave the cells."""
    with on_sigterm(signal.SIG_IGN):
        for seconds, cancel in ((grace_s, False), (wait_s, True)):
            if cancel:
                for job, _, _ in running:
                    if not job.done():
                        job.cancel(check=False)
            deadline = time.time() + seconds
            while any(not job.done() for job, _, _ in running) and time.time() < deadline:
                time.sleep(0.1)


def _fail_dependents(queue: list, made: str, needs: dict, maker, runner: Runner, view: LiveView,
                     outcomes: list[Outcome], on_outcome) -> list:
    """Fail, without starting them, the queued cells that need the training `made`, whose maker failed; returns
    the rest of the queue."""
    rest = []
    for item in queue:
        spec = item[0]
        if made not in needs.get(id(spec), ()):
            rest.append(item)
            continue
        outcome = Outcome(spec, False, 0.0, error=f"not started: the training it needs failed in {runner.label(maker)}")
        view.failed(runner.label(spec), outcome)
        outcomes.append(outcome)
        if on_outcome:
            on_outcome(outcome)
    return rest


def _run_slurm(specs, runner: Runner, view: LiveView, opts: SlurmOptions, folder, poll_s,
               on_outcome) -> list[Outcome]:
    if opts.nodes != 1 or opts.tasks_per_node != 1:
        raise ValueError("a sweep cell runs as one SLURM task; nodes / tasks_per_node are for submit_distributed")
    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm")
    ex.update_parameters(**slurm_params(opts), slurm_array_parallelism=opts.array_parallelism)
    t0 = time.time()
    submitted = ex.map_array(runner, list(specs))  # one job array for the whole sweep
    for job, spec in zip(submitted, specs):
        view.submitted(job, runner.label(spec))
    pending = [(job, spec, t0) for job, spec in zip(submitted, specs)]
    outcomes: list[Outcome] = []
    while pending:
        pending = _harvest(pending, outcomes, runner, view, on_outcome)
        running = sum(1 for job, _, _ in pending if job.state in ("RUNNING", "COMPLETING"))
        view.update(sum(o.ok for o in outcomes), running, sum(not o.ok for o in outcomes))
        if pending:
            time.sleep(poll_s)
    view.note("")
    return outcomes


def submit_distributed(stage: str, cfg: dict, out_dir: str | Path, opts: SlurmOptions, *,
                       pseudo: str | Path | None = None, folder: str | Path | None = None) -> submitit.Job:
    """Submit one stage-1 or stage-2 training of `cfg` into `out_dir` as ONE SLURM job of
    opts.nodes x opts.tasks_per_node tasks, one DDP rank each (give each a GPU: gpus_per_node =
    tasks_per_node). The batch size in `cfg` is the global batch. submitit's logs go to `folder`
    (default OUT/submitit/<job id>/); `job.results()` holds every task's result, rank 0's first."""
    from ehin.cli import UserError

    world = opts.nodes * opts.tasks_per_node
    key = {"1": ("train", "batch_size"), "2": ("stage2", "batch_size")}.get(stage)
    if key is None:
        raise UserError(f"unknown stage {stage!r}: 1 or 2")
    if stage == "2" and pseudo is None:
        raise UserError("stage 2 needs the pseudo-label file (--pseudo)")
    batch = cfg[key[0]][key[1]]
    if batch % world:  # the trainers would refuse it in every task; say it before queueing
        raise UserError(f"{'.'.join(key)} {batch} is not divisible by the {world} ranks "
                        f"({opts.nodes} nodes x {opts.tasks_per_node} tasks)")
    folder = Path(folder) if folder is not None else Path(out_dir) / "submitit"
    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm")
    ex.update_parameters(**slurm_params(opts), nodes=opts.nodes, tasks_per_node=opts.tasks_per_node,
                         name=f"ehin-stage{stage}")
    return ex.submit(DistributedTraining(), stage, cfg, str(out_dir), None if pseudo is None else str(pseudo))


def _harvest(in_flight: list, outcomes: list[Outcome], runner: Runner, view: LiveView, on_outcome) -> list:
    """Collect the finished (job, spec, t0) of `in_flight` into `outcomes`; return those still running."""
    still = []
    for job, spec, t0 in in_flight:
        if not job.done():
            still.append((job, spec, t0))
            continue
        outcome = _collect(job, spec, t0)
        outcomes.append(outcome)
        view.durations.append(outcome.seconds)
        if not outcome.ok:
            view.failed(runner.label(spec), outcome)
        if on_outcome:
            on_outcome(outcome)
    return still


def _collect(job: submitit.Job, spec: Any, t0: float) -> Outcome:
    seconds = time.time() - t0
    log = str(job.paths.stderr)
    try:
        record = job.result()
        return Outcome(spec, True, seconds, record=record, log=log)
    except Exception as e:
        return Outcome(spec, False, seconds, error=last_line(e), log=log)


def last_line(e: BaseException) -> str:
    """`TypeName: the last line of its message`: an error in one line of a report."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"


def hms(seconds: float) -> str:
    """A duration as m:ss, or h:mm:ss from an hour."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"
