"""One search worker: the job that loads the study and runs trials until its budget is used.

A trial is one stage-1 run in <study_dir>/trial-<n>/, configured exactly like a sweep cell
(load_config(profile, fixed overrides + sampled params)) and reporting its val metric per epoch,
so MedianPruner can stop it. `SearchWorker` is the `bench.executors.Runner` that bench.search.launch
hands to `dispatch`, like `CellRunner` for a sweep's cells.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import submitit
from filelock import FileLock
from optuna.trial import TrialState

from bench.executors import last_line
from bench.search.space import Param, check_selection_split
from bench.search.study import FileHeartbeat, Heartbeat, budget_used, is_rdb_url, open_storage
from ehin.config import config_hash, load_config


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker job needs, picklable and small."""

    study: str
    storage: str                  # RDB URL or journal file path
    study_dir: str                # trial-<n>/ folders, heartbeats/, the budget lock
    profile: str
    fixed: dict[str, Any]         # flat dotted overrides for every trial
    params: dict[str, dict]       # name -> Param fields
    metric: str
    n_trials: int                 # the study's total budget
    seed: int
    index: int = 0
    sampler: dict[str, Any] = field(default_factory=dict)
    pruner: dict[str, Any] | None = field(default_factory=dict)
    heartbeat_s: int = 30
    grace_s: int = 120
    max_retry: int | None = 3


def worker_seed(seed: int, index: int, n_existing: int) -> int:
    """The sampler seed of one worker: distinct per worker (same-seeded workers would propose the
    same random start-up points) and per rerun (a continued study must not replay its first trials),
    yet a function of --seed alone for a fresh single-worker study."""
    import numpy as np

    return int(np.random.SeedSequence([seed, index, n_existing]).generate_state(1)[0])


def make_pruner(pruner: dict | None) -> optuna.pruners.BasePruner:
    return optuna.pruners.NopPruner() if pruner is None else optuna.pruners.MedianPruner(**pruner)


def trial_config(profile: str, fixed: dict[str, Any], params: dict[str, Any]) -> dict:
    """The trial's config through the sweeps' mechanism: profile <- fixed overrides <- params."""
    return load_config(profile=profile, overrides={**fixed, **params})


class Objective:
    """One trial = one stage-1 run in <study_dir>/trial-<n>/, reporting the val metric per epoch."""

    def __init__(self, spec: WorkerSpec, lock: FileLock, heart: Heartbeat):
        self.spec, self.lock, self.heart = spec, lock, heart
        self.params = {n: Param(n, **p) for n, p in spec.params.items()}
        self.numbers: list[int] = []   # trials this worker ran

    def __call__(self, trial: optuna.Trial) -> float:
        self.numbers.append(trial.number)
        try:
            self.heart.start(trial)
        finally:
            if self.lock.is_locked:
                self.lock.release()  # taken in run_worker before ask(): the trial now exists
        try:
            return self._run(trial)
        finally:
            self.heart.stop(trial)

    def _run(self, trial: optuna.Trial) -> float:
        from ehin.train_stage1 import NonFiniteLossError, run

        spec = self.spec
        params = {name: p.suggest(trial) for name, p in self.params.items()}
        run_dir = Path(spec.study_dir) / f"trial-{trial.number}"
        try:
            cfg = trial_config(spec.profile, spec.fixed, params)
            check_selection_split(cfg)
            if run_dir.exists():
                shutil.rmtree(run_dir)  # left by a deleted study of the same name: trials are fresh runs
            trial.set_user_attr("run_dir", str(run_dir))
            trial.set_user_attr("config_hash", config_hash(cfg))
            trial.set_user_attr("worker", {"index": spec.index, "host": socket.gethostname(), "pid": os.getpid()})

            def on_epoch(entry: dict) -> None:
                value = float(entry[spec.metric])
                epoch = int(entry["epoch"])
                trial.report(value, step=epoch)
                # After the last epoch there is nothing left to save: a finished run is complete.
                if epoch < cfg["train"]["epochs"] and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {entry['epoch']} ({spec.metric} {value:.2f})")

            result = run(cfg, run_dir, resume=False, progress=False, on_epoch=on_epoch)
        except optuna.TrialPruned:
            raise
        except NonFiniteLossError as e:
            # A diverged run is an unpromising one stopped early: pruned, so the budget and TPE see it.
            trial.set_user_attr("stopped", last_line(e))
            raise optuna.TrialPruned(f"diverged: {last_line(e)}") from None
        except Exception as e:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text(traceback.format_exc())
            try:
                trial.set_user_attr("error", last_line(e))
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                pass  # already failed by another worker (see run_worker)
            raise
        return float(result["metrics"][spec.metric])


def run_worker(spec: WorkerSpec) -> dict:
    """Load the study and run trials until the study's budget is used; returns what it ran."""
    storage = open_storage(spec.storage, heartbeat_s=spec.heartbeat_s, grace_s=spec.grace_s, max_retry=spec.max_retry)
    heart: Heartbeat = Heartbeat(spec.grace_s, spec.max_retry) if is_rdb_url(spec.storage) else \
        FileHeartbeat(Path(spec.study_dir) / "heartbeats", spec.heartbeat_s, spec.grace_s, spec.max_retry)
    n_existing = len(optuna.load_study(study_name=spec.study, storage=storage).get_trials(deepcopy=False))
    sampler = optuna.samplers.TPESampler(**{"constant_liar": True, **spec.sampler,
                                            "seed": worker_seed(spec.seed, spec.index, n_existing)})
    study = optuna.load_study(study_name=spec.study, storage=storage, sampler=sampler, pruner=make_pruner(spec.pruner))
    # One lock for "count the budget, then create the trial": without it two workers could both see
    # T-1 trials and run T+1 (MaxTrialsCallback alone is checked after a trial, so W workers overshoot).
    lock = FileLock(str(Path(spec.study_dir) / "budget.lock"))
    objective = Objective(spec, lock, heart)
    while True:
        lock.acquire()
        try:
            heart.fail_stale(study)
            trials = study.get_trials(deepcopy=False)
            if budget_used(trials) < spec.n_trials:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    try:
                        # The objective releases the lock once ask() has created its trial.
                        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
                    except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as e:
                        # Our trial was failed by another worker that missed our heartbeats for longer
                        # than the grace period (a frozen node, a stalled filesystem); its retry runs.
                        if not _finished_elsewhere(e):
                            raise
                        print(f"[search] worker {spec.index}: could not finish its trial: {last_line(e)}",
                              file=sys.stderr)
                    except KeyboardInterrupt:
                        requeue_interrupted(study, objective.numbers, spec.max_retry)
                        raise
                continue
            # Budget used. Trials still running elsewhere may yet turn out dead and need a retry.
            others_running = any(t.state == TrialState.RUNNING for t in trials)
        finally:
            if lock.is_locked:
                lock.release()
        if not others_running:
            break
        time.sleep(spec.heartbeat_s)
    return {"worker": spec.index, "trials": objective.numbers}


def requeue_interrupted(study: optuna.Study, numbers: list[int], max_retry: int | None) -> None:
    """Ctrl-C (or SIGINT) during a trial: Optuna has failed it, and a FAIL nobody retries counts towards the
    budget (budget_used), so the search would end one trial short. Enqueue its parameters again, as a killed
    worker's stale trial is (Heartbeat.fail_stale), and the same command runs it when rerun."""
    if not numbers:
        return  # interrupted before this worker's first trial existed
    trial = study.get_trials(deepcopy=False)[numbers[-1]]
    if trial.state == TrialState.FAIL and "error" not in trial.user_attrs:  # not an objective's own error
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, trial)
        print(f"[search] trial {trial.number}: interrupted, its params enqueued again", file=sys.stderr)


def _finished_elsewhere(e: BaseException) -> bool:
    """Optuna's errors for writing to a trial that another process already finished."""
    return isinstance(e, optuna.exceptions.UpdateFinishedTrialError) or "Cannot tell a" in str(e)


class SearchWorker(submitit.helpers.Checkpointable):
    """The submitit job of one worker. On SLURM preemption/timeout it requeues itself; the trial it
    was running goes stale and is retried by whichever worker notices first."""

    def __call__(self, spec: WorkerSpec) -> dict:
        return run_worker(spec)

    def checkpoint(self, spec: WorkerSpec) -> submitit.helpers.DelayedSubmission:
        from bench.jobs import let_requeue_outlive_sigterm

        let_requeue_outlive_sigterm()  # as a sweep cell's: else a killed `scontrol requeue` fails the running trial
        return submitit.helpers.DelayedSubmission(SearchWorker(), spec)

    def label(self, spec: WorkerSpec) -> str:
        return f"worker {spec.index}"

    def error_log(self, spec: WorkerSpec) -> None:
        return None  # a worker run inline prints its traceback; each trial keeps its own error.txt
