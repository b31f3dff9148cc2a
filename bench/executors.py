"""Run cells in-process, as local processes (submitit LocalExecutor) or as SLURM array tasks.

All three go through `dispatch`, which keeps a live view (done / running / failed / pending and
an ETA) and never lets one failed cell stop the others: a failure is reported with its log path
and the last line of its error, and the sweep goes on.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import submitit

from bench.jobs import CellRunner, CellSpec

EXECUTORS = ("inline", "local", "slurm")


@dataclass
class SlurmOptions:
    partition: str | None = None
    time_min: int = 60
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: float | None = None
    setup: list[str] = field(default_factory=list)   # e.g. ["module load cuda/12.4"]
    array_parallelism: int = 64


def add_slurm_args(p: argparse.ArgumentParser, per: str, time_min: int) -> None:
    """The --slurm-* options of bench.run and bench.search; `per` names what one SLURM job runs."""
    g = p.add_argument_group("slurm")
    g.add_argument("--slurm-partition", help="partition (default: the cluster's default partition)")
    g.add_argument("--slurm-time", type=int, default=time_min, help=f"minutes per {per} (default: {time_min})")
    g.add_argument("--slurm-gpus", type=int, default=0, help=f"GPUs per {per} (default: 0)")
    g.add_argument("--slurm-cpus", type=int, default=2, help=f"CPUs per {per} (default: 2)")
    g.add_argument("--slurm-mem-gb", type=float, help=f"memory per {per} in GB (default: the partition's)")
    g.add_argument("--slurm-setup", action="append", default=[],
                   help="a shell line run before the job (repeatable; default: none)")


def slurm_options(args: argparse.Namespace, array_parallelism: int) -> SlurmOptions:
    """SlurmOptions from the options `add_slurm_args` declared."""
    return SlurmOptions(partition=args.slurm_partition, time_min=args.slurm_time, gpus_per_node=args.slurm_gpus,
                        cpus_per_task=args.slurm_cpus, mem_gb=args.slurm_mem_gb, setup=args.slurm_setup,
                        array_parallelism=array_parallelism)


@dataclass
class Outcome:
    spec: CellSpec
    ok: bool
    seconds: float
    record: dict | None = None
    error: str | None = None
    log: str | None = None


class LiveView:
    """One status line, rewritten in place on a terminal and printed on change otherwise."""

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
            eta = f" | ETA {_fmt(remaining)}"
        line = (f"[sweep] {done}/{self.total} done, {running} running, {failed} failed, {pending} pending"
                f" | {_fmt(time.time() - self.start)} elapsed{eta}")
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


def dispatch(
    specs: Sequence[CellSpec],
    executor: str = "inline",
    *,
    jobs: int = 1,
    folder: str | Path = "results/submitit",
    slurm: SlurmOptions | None = None,
    poll_s: float = 1.0,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r} (choose from {', '.join(EXECUTORS)})")
    if not specs:
        return []
    if executor == "inline":
        return _run_inline(specs, on_outcome)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if executor == "local":
        return _run_local(specs, jobs, folder, poll_s, on_outcome)
    return _run_slurm(specs, slurm or SlurmOptions(), folder, poll_s, on_outcome)


def _run_inline(specs, on_outcome) -> list[Outcome]:
    view = LiveView(len(specs), 1)
    outcomes: list[Outcome] = []
    runner = CellRunner()
    for spec in specs:
        view.update(sum(o.ok for o in outcomes), 1, sum(not o.ok for o in outcomes))
        t0 = time.time()
        try:
            record = runner(spec)
            outcome = Outcome(spec, True, time.time() - t0, record=record)
        except Exception as e:  # one failed cell never stops the sweep
            log = str(Path(spec.run_dir) / "error.txt")
            outcome = Outcome(spec, False, time.time() - t0, error=_last_line(e), log=log)
            view.note(f"[sweep] FAILED {spec.cell_id}: {outcome.error}\n         log: {log}")
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


def gpu_slot(index: int, n_gpus: int) -> dict:
    """LocalExecutor parameters for the `index`-th cell: one GPU each, round-robin (small cells
    share a GPU well); none without GPUs."""
    return dict(gpus_per_node=1, visible_gpus=(index % n_gpus,)) if n_gpus else {}


def _run_local(specs, jobs, folder, poll_s, on_outcome) -> list[Outcome]:
    ex = submitit.LocalExecutor(folder=str(folder / "%j"))
    ex.update_parameters(timeout_min=24 * 60)
    n_gpus = local_gpus()
    submitted = 0
    queue = list(specs)
    running: list[tuple[submitit.Job, CellSpec, float]] = []
    outcomes: list[Outcome] = []
    view = LiveView(len(specs), jobs)
    # LocalExecutor starts every submitted job at once, so keep at most `jobs` in flight.
    while queue or running:
        while queue and len(running) < max(1, jobs):
            spec = queue.pop(0)
            ex.update_parameters(**gpu_slot(submitted, n_gpus))
            running.append((ex.submit(CellRunner(), spec), spec, time.time()))
            submitted += 1
        running = _harvest(running, outcomes, view, on_outcome)
        view.update(sum(o.ok for o in outcomes), len(running), sum(not o.ok for o in outcomes))
        if running:
            time.sleep(poll_s)
    view.note("")
    return outcomes


def _run_slurm(specs, opts: SlurmOptions, folder, poll_s, on_outcome) -> list[Outcome]:
    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm")
    params = dict(timeout_min=opts.time_min, cpus_per_task=opts.cpus_per_task,
                  slurm_array_parallelism=opts.array_parallelism, slurm_setup=list(opts.setup))
    if opts.partition:
        params["slurm_partition"] = opts.partition
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    if opts.mem_gb:
        params["mem_gb"] = opts.mem_gb
    ex.update_parameters(**params)
    t0 = time.time()
    submitted = ex.map_array(CellRunner(), list(specs))  # one job array for the whole sweep
    pending = [(job, spec, t0) for job, spec in zip(submitted, specs)]
    outcomes: list[Outcome] = []
    view = LiveView(len(specs), opts.array_parallelism)
    while pending:
        pending = _harvest(pending, outcomes, view, on_outcome)
        running = sum(1 for job, _, _ in pending if job.state in ("RUNNING", "COMPLETING"))
        view.update(sum(o.ok for o in outcomes), running, sum(not o.ok for o in outcomes))
        if pending:
            time.sleep(poll_s)
    view.note("")
    return outcomes


def _harvest(in_flight: list, outcomes: list[Outcome], view: LiveView, on_outcome) -> list:
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
            view.note(f"[sweep] FAILED {spec.cell_id}: {outcome.error}\n         log: {outcome.log}")
        if on_outcome:
            on_outcome(outcome)
    return still


def _collect(job: submitit.Job, spec: CellSpec, t0: float) -> Outcome:
    seconds = time.time() - t0
    log = str(job.paths.stderr)
    try:
        record = job.result()
        return Outcome(spec, True, seconds, record=record, log=log)
    except Exception as e:
        return Outcome(spec, False, seconds, error=_last_line(e), log=log)


def _last_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"
