"""Launching the workers: through `bench.executors.dispatch`, the launcher of the sweeps' cells.

The W workers of a search are W jobs of `SearchWorker` (inline: in this process, one after another;
local: submitit processes, all at once; slurm: one job array), and each runs trials until the study's
budget is used. While they run, `ProgressLine` shows the study's trials instead of the sweep's
count of jobs.
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
import submitit
from optuna.trial import TrialState

from bench.executors import LiveView, SlurmOptions, dispatch, hms
from bench.search.study import budget_used
from bench.search.worker import SearchWorker, WorkerSpec

LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # a local worker runs as long as the budget takes; a sweep cell gets a day


class ProgressLine(LiveView):
    """`[search] study: 5/12 counted (3 complete, 2 pruned, 0 failed), 2 running | best ...` on change.

    dispatch's view of a search: a worker job runs many trials, so the study is what shows progress."""

    prefix = "[search]"

    def __init__(self, study_name: str, storage: optuna.storages.BaseStorage, budget: int, metric: str):
        super().__init__(total=budget, parallel=1)
        self.study_name, self.storage, self.budget, self.metric = study_name, storage, budget, metric

    def update(self, done: int, running: int, failed: int) -> None:
        try:
            study = optuna.load_study(study_name=self.study_name, storage=self.storage)
            trials = study.get_trials(deepcopy=False)
        except Exception:
            return  # a read racing a writer; the next poll shows it
        n = {s: sum(t.state == s for t in trials) for s in TrialState}
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        sign = -1 if study.direction == optuna.study.StudyDirection.MINIMIZE else 1  # the space's direction
        best = max(complete, key=lambda t: sign * t.value, default=None)
        line = (f"[search] {self.study_name}: {budget_used(trials)}/{self.budget} counted "
                f"({n[TrialState.COMPLETE]} complete, {n[TrialState.PRUNED]} pruned, {n[TrialState.FAIL]} failed), "
                f"{n[TrialState.RUNNING]} running"
                + (f" | best {self.metric} {best.value:.2f} (trial {best.number})" if best else ""))
        if line != self._last:
            self._last = line
            print(f"{line} | {hms(time.time() - self.start)} elapsed", file=sys.stderr, flush=True)

    def submitted(self, job: submitit.Job, label: str) -> None:
        self.note(f"[search] {label}: job {job.job_id}, log {job.paths.stderr}")

    def note(self, text: str) -> None:
        # Every line is printed whole (never rewritten in place), so there is no line to end first.
        if text:
            print(text, file=sys.stderr, flush=True)


def launch_workers(specs: list[WorkerSpec], executor: str, *, folder: Path, slurm: SlurmOptions,
                   view: ProgressLine | None = None, poll_s: float = 2.0) -> list[str]:
    """Run the workers; returns one line per worker job that failed (trial failures are not job failures)."""
    runner = SearchWorker()
    # Every worker at once (jobs, array parallelism): each takes trials until the budget is used, so the
    # workers are the search's parallelism, not a queue.
    outcomes = dispatch(specs, executor, jobs=len(specs), folder=folder, poll_s=poll_s,
                        slurm=replace(slurm, array_parallelism=len(specs)),
                        runner=runner, view=view, local_timeout_min=LOCAL_TIMEOUT_MIN)
    return [o.summary(runner.label(o.spec)) for o in outcomes if not o.ok]
