"""The study: its storage, the trial budget, the heartbeats of running trials, creating or continuing it.

Storage is an Optuna JournalStorage file (no database server; works on a shared filesystem) or any
RDB URL. A worker killed mid-trial stops beating its heartbeat; after the grace period another
worker marks the trial FAIL and enqueues its parameters again (RetryHeartbeatStaleTrialCallback).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import optuna
from optuna.trial import FrozenTrial, TrialState

from bench.search.space import SearchError, SearchSpace
from ehin.config import get


def is_rdb_url(storage: str) -> bool:
    return "://" in storage


def open_storage(storage: str, *, heartbeat_s: int, grace_s: int, max_retry: int | None) -> optuna.storages.BaseStorage:
    """An RDB URL gets Optuna's own heartbeat; anything else is a JournalStorage file path."""
    if is_rdb_url(storage):
        import sqlalchemy.exc

        for attempt in range(5):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(
                        storage, heartbeat_interval=heartbeat_s, grace_period=grace_s,
                        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                            max_retry=max_retry))
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as e:
                # Two processes opening a new database at once both create Optuna's schema; the
                # loser's CREATE TABLE ("already exists") or insert of the schema version (IntegrityError)
                # fails. The schema exists now: open it again. Other errors (a bad path) are the user's.
                racing = isinstance(e, sqlalchemy.exc.IntegrityError) or any(
                    s in str(e.orig) for s in ("already exists", "database is locked"))
                if attempt == 4 or not racing:
                    raise
                time.sleep(0.2 * (attempt + 1))
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(storage)))


def retried_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that were enqueued again (their retry carries the history)."""
    out: set[int] = set()
    for t in trials:
        out.update(t.system_attrs.get("retry_history", []))
    return out


def budget_used(trials: list[FrozenTrial]) -> int:
    """Trials that count towards --trials: complete, pruned and running ones, and failures that
    will not be retried (an error in the objective). A killed trial's FAIL does not count: its
    retry does. WAITING retries do not count until a worker picks them up."""
    retried = retried_numbers(trials)
    return sum(1 for t in trials
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
               or (t.state == TrialState.FAIL and t.number not in retried))


class Heartbeat:
    """Liveness of running trials. RDB storages beat natively inside study.optimize; JournalStorage
    has no heartbeat in Optuna 5.0, so the journal variant below touches a file per trial."""

    def __init__(self, grace_s: int, max_retry: int | None):
        self.grace_s, self.max_retry = grace_s, max_retry

    def start(self, trial: optuna.Trial) -> None: ...

    def stop(self, trial: optuna.Trial) -> None: ...

    def fail_stale(self, study: optuna.Study) -> list[int]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # also calls the storage's retry callback
        return []


class FileHeartbeat(Heartbeat):
    """`<dir>/trial-<n>` is touched every `interval_s` by a thread of the worker running trial n.
    A RUNNING trial whose file (or, before its first beat, its start time) is older than `grace_s`
    is marked FAIL and its parameters enqueued again, as RDBStorage's heartbeat does."""

    def __init__(self, directory: Path, interval_s: int, grace_s: int, max_retry: int | None):
        super().__init__(grace_s, max_retry)
        self.dir, self.interval_s = Path(directory), interval_s
        self._threads: dict[int, tuple[threading.Thread, threading.Event]] = {}

    def _path(self, number: int) -> Path:
        return self.dir / f"trial-{number}"

    def beat(self, number: int) -> None:
        path = self._path(number)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        os.utime(path)

    def start(self, trial: optuna.Trial) -> None:
        self.beat(trial.number)  # before the budget lock is released: never seen without a beat
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.interval_s):
                self.beat(trial.number)

        thread = threading.Thread(target=loop, daemon=True, name=f"heartbeat-{trial.number}")
        thread.start()
        self._threads[trial.number] = (thread, stop)

    def stop(self, trial: optuna.Trial) -> None:
        # The file stays: the trial is told COMPLETE/PRUNED only after this, and until then a fresh
        # file is what keeps another worker from taking it for dead. Finished trials are never checked.
        thread, stop = self._threads.pop(trial.number, (None, None))
        if thread is not None:
            stop.set()
            thread.join()

    def last_beat(self, trial: FrozenTrial) -> float:
        try:
            return self._path(trial.number).stat().st_mtime
        except FileNotFoundError:
            start = trial.datetime_start
            return start.timestamp() if start is not None else time.time()

    def fail_stale(self, study: optuna.Study) -> list[int]:
        now = time.time()
        failed = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            age = now - self.last_beat(t)
            if age <= self.grace_s:
                continue
            try:
                frozen = study.tell(t.number, state=TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # another worker finished or failed it first
            failed.append(t.number)
            print(f"[search] trial {t.number}: no heartbeat for {age:.0f}s (> grace {self.grace_s}s): "
                  f"marked FAIL, its params enqueued again", file=sys.stderr)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=self.max_retry)(study, frozen)
        return failed


def create_or_continue(study_name: str, storage: optuna.storages.BaseStorage, meta: dict) -> optuna.Study:
    """Create the study, or load it and check that it searches the same thing (a rerun continues it)."""
    study = optuna.create_study(study_name=study_name, storage=storage, direction=meta["direction"],
                                load_if_exists=True)
    old = study.user_attrs
    if not old.get("search"):
        from ehin.metrics import PROTOCOL

        for key, value in meta.items():
            study.set_user_attr(key, value)
        study.set_user_attr("metrics_protocol", PROTOCOL)  # how the trials' metrics are computed
        study.set_user_attr("search", True)
        return study
    for key in ("space", "metric", "direction", "profile", "base_config_hash"):
        if json.dumps(old.get(key), sort_keys=True) != json.dumps(meta[key], sort_keys=True):
            raise SearchError(f"study {study_name!r} was started with another {key} ({old.get(key)!r}, now "
                              f"{meta[key]!r}); continue it with the same space/--profile/--set/--metric, or "
                              f"choose a new --study")
    return study


def enqueue_defaults(study: optuna.Study, space: SearchSpace, base_cfg: dict) -> dict[str, Any]:
    """Queue the profile's default config (the paper's α, β, n, K, N, ...) as the next trial, so the
    search measures the baseline on val like any other point. Defaults outside the space are left
    to the sampler. Returns the enqueued params."""
    params = {n: get(base_cfg, n) for n, p in space.params.items() if p.contains(get(base_cfg, n))}
    study.enqueue_trial(params, user_attrs={"enqueued": "profile defaults"}, skip_if_exists=True)
    return params
