"""Optuna hyper-parameter search over EHIN stage 1, on the same executors as the sweeps.

    python -m bench.search default --profile smoke --trials 8 --workers 2 --executor local
    python -m bench.search default --profile smoke --trials 12 --set train.epochs=3   # continues the study
    python -m bench.search default --executor slurm --workers 8 --trials 64 --slurm-partition gpu --slurm-gpus 1
    python -m bench.search my_space.yaml --storage sqlite:///search.db --study my-study --no-final

SPACE is a file in sweeps/search/ (by name) or a path to one (sweeps/search/README.md describes it).
Every trial is one independent stage-1 run in RESULTS/<study>/trial-<n>/ (config.yaml, metrics.jsonl,
checkpoints), configured exactly like a sweep cell: load_config(profile, fixed overrides + sampled
params). Trials are selected on eval.split (val); a test split is refused for selection.

Workers: each is one job (inline: in this process, one after another; local: submitit processes;
slurm: a submitit job array) that loads the study and runs trials until the study holds --trials
counted trials (complete, pruned, running, or failed without a retry), so W workers run T trials in
all and a rerun with the same --study continues up to T instead of starting over.
Storage: an Optuna JournalStorage file (RESULTS/<study>/journal.log; no database server, works on
a shared filesystem) or any RDB URL via --storage. MedianPruner stops trials on per-epoch val
metrics. A worker killed mid-trial stops beating its heartbeat; after --grace seconds another worker
marks the trial FAIL and enqueues its parameters again (RetryHeartbeatStaleTrialCallback).

Reports go to REPORTS/search/<study>/: best.json/.md, trials.csv/.md, history/intermediate/
importances/slices PNGs, and final.md: the best configuration and the profile's default config
(the paper's α 0.1, β 0.05, n 2, N 24; K as the profile sets it) trained with --final-seeds seeds
and evaluated on the test split.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import optuna
import submitit
import yaml
from filelock import FileLock
from optuna.trial import FrozenTrial, TrialState

from bench.executors import EXECUTORS, SlurmOptions, add_slurm_args, slurm_options
from ehin.config import PROFILES, ConfigError, config_hash, dotted_to_nested, get, load_config
from ehin.cli import UserError, command
from ehin.metrics import METRIC_KEYS, PAPER_COLUMNS

REPO = Path(__file__).resolve().parent.parent
SPACES_DIR = REPO / "sweeps" / "search"

PARAM_TYPES = ("float", "int", "categorical")
_SPACE_KEYS = {"title", "profile", "metric", "direction", "trials", "fixed", "params", "sampler", "pruner",
               "final_split", "profiles", "enqueue_defaults"}
_PARAM_KEYS = {"type", "low", "high", "log", "step", "choices"}
_SAMPLER_KEYS = {"n_startup_trials", "n_ei_candidates", "multivariate", "group", "constant_liar"}
_PRUNER_KEYS = {"n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"}
# Short names in reports (the paper's symbols).
LABELS = {"model.alpha": "α", "model.beta": "β", "model.n_layers": "n", "data.K": "K", "train.batch_size": "N",
          "loss.fg": "λ_FG", "loss.cl": "λ_CL", "loss.bg": "λ_BG", "train.lr": "lr", "model.fusion_scale": "s",
          "loss.cl_variant": "L_CL"}
PAPER_METRICS = PAPER_COLUMNS  # the paper's five columns (ehin.metrics.REGISTRY)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class SearchError(UserError):
    """A search space or study that cannot be used; the message names the file or the study."""


# --------------------------------------------------------------------------------------------
# Search spaces
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One searched config key (dotted) and its distribution."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, list(self.choices))

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and value != int(value):
            return False
        return self.low <= value <= self.high

    def extremes(self) -> list[Any]:
        """Values that together cover the space's corners, to validate at load time."""
        if self.type == "categorical":
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]

    def describe(self) -> str:
        if self.type == "categorical":
            return "{" + ", ".join(str(c) for c in self.choices) + "}"
        return f"[{_fmt(self.low)}, {_fmt(self.high)}]" + (" log" if self.log else "") + \
            (f" step {_fmt(self.step)}" if self.step else "")


@dataclass
class SearchSpace:
    name: str
    title: str
    params: dict[str, Param]
    fixed: dict[str, Any] = field(default_factory=dict)
    metric: str = "iou"
    direction: str = "maximize"
    trials: int = 20
    profile: str | None = None
    final_split: str | None = None
    sampler: dict[str, Any] = field(default_factory=dict)
    pruner: dict[str, Any] | None = field(default_factory=dict)   # None: no pruning
    profiles: dict[str, dict] = field(default_factory=dict)
    enqueue_defaults: bool = False  # the first trial of a new study runs the profile's defaults
    path: Path | None = None

    def for_profile(self, profile: str) -> "SearchSpace":
        """Apply `profiles[profile]`: extra fixed overrides and per-param changes (e.g. lr range)."""
        extra = self.profiles.get(profile) or {}
        params = dict(self.params)
        for name, changes in (extra.get("params") or {}).items():
            if name not in params:
                raise SearchError(f"{self._where()}: profiles.{profile}.params names {name!r}, not a searched param")
            params[name] = _read_param(name, {**_param_dict(params[name]), **changes}, self._where())
        fixed = {**self.fixed, **(extra.get("fixed") or {})}
        return SearchSpace(**{**self.__dict__, "params": params, "fixed": fixed, "profiles": {}})

    def as_json(self) -> dict:
        """What identifies the space in the study (a rerun must search the same one)."""
        return {name: _param_dict(p) for name, p in self.params.items()}

    def _where(self) -> str:
        return f"search space {self.path.name if self.path else self.name}"


def _param_dict(p: Param) -> dict:
    d = {"type": p.type, "low": p.low, "high": p.high, "log": p.log, "step": p.step,
         "choices": list(p.choices) if p.choices is not None else None}
    return {k: v for k, v in d.items() if v is not None and not (k == "log" and v is False)}


def _read_param(name: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict):
        raise SearchError(f"{where}: param {name!r} must be a mapping with a type, got {spec!r}")
    unknown = set(spec) - _PARAM_KEYS
    if unknown:
        raise SearchError(f"{where}: param {name!r}: unknown key(s) {sorted(unknown)} (known: {sorted(_PARAM_KEYS)})")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise SearchError(f"{where}: param {name!r}: type {kind!r} must be one of {PARAM_TYPES}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SearchError(f"{where}: param {name!r}: categorical needs a non-empty 'choices' list")
        if any(c is not None and not isinstance(c, (bool, int, float, str)) for c in choices):
            raise SearchError(f"{where}: param {name!r}: choices must be numbers, strings, booleans or null")
        return Param(name, kind, choices=tuple(choices))
    try:
        # float(): PyYAML reads "1e-4" (no dot) as a string.
        low, high = float(spec["low"]), float(spec["high"])
        step = float(spec["step"]) if spec.get("step") is not None else None
    except KeyError as e:
        raise SearchError(f"{where}: param {name!r}: {kind} needs {e}") from None
    except (TypeError, ValueError):
        raise SearchError(f"{where}: param {name!r}: low/high/step must be numbers") from None
    log = bool(spec.get("log", False))
    if not low < high:
        raise SearchError(f"{where}: param {name!r}: low {low} must be below high {high}")
    if log and low <= 0:
        raise SearchError(f"{where}: param {name!r}: a log scale needs low > 0")
    if log and step is not None:
        raise SearchError(f"{where}: param {name!r}: step and log cannot be combined")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise SearchError(f"{where}: param {name!r}: int bounds must be integers")
    return Param(name, kind, low=low, high=high, log=log, step=step)


def list_spaces(spaces_dir: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (spaces_dir or SPACES_DIR).glob("*.yaml"))


def load_space(name_or_path: str | Path, *, spaces_dir: Path | None = None) -> SearchSpace:
    """Read `sweeps/search/<name>.yaml` (or a path to a YAML file) and check its form."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = (spaces_dir or SPACES_DIR) / f"{name_or_path}.yaml"
    if not path.exists():
        raise SearchError(f"no search space {str(name_or_path)!r}: {path} does not exist "
                          f"(known: {', '.join(list_spaces(spaces_dir)) or 'none'})")
    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    where = f"search space {path.name}"
    if not isinstance(spec, dict):
        raise SearchError(f"{where}: must hold a mapping")
    unknown = [k for k in spec if k not in _SPACE_KEYS and not str(k).startswith("_")]
    if unknown:
        raise SearchError(f"{where}: unknown key(s) {unknown} (known: {', '.join(sorted(_SPACE_KEYS))})")
    if not spec.get("params"):
        raise SearchError(f"{where}: no params")
    params = {str(n): _read_param(str(n), p, where) for n, p in spec["params"].items()}
    fixed = dict(spec.get("fixed") or {})
    both = sorted(set(fixed) & set(params))
    if both:
        raise SearchError(f"{where}: {both} are both fixed and searched")
    metric = spec.get("metric", "iou")
    if metric not in METRIC_KEYS:
        raise SearchError(f"{where}: metric {metric!r} must be one of {METRIC_KEYS}")
    from ehin.metrics import BY_KEY

    # The registry says which way the metric improves; a space may still say so explicitly.
    direction = spec.get("direction", "maximize" if BY_KEY[metric].higher_is_better else "minimize")
    if direction not in ("maximize", "minimize"):
        raise SearchError(f"{where}: direction must be maximize or minimize")
    sampler = dict(spec.get("sampler") or {})
    if set(sampler) - _SAMPLER_KEYS:
        raise SearchError(f"{where}: sampler: unknown key(s) {sorted(set(sampler) - _SAMPLER_KEYS)}")
    pruner = spec.get("pruner", {})
    if pruner is False or pruner is None:
        pruner = None
    elif not isinstance(pruner, dict) or set(pruner) - _PRUNER_KEYS:
        raise SearchError(f"{where}: pruner must be false or a mapping of MedianPruner's {sorted(_PRUNER_KEYS)}")
    profiles = {str(k): dict(v or {}) for k, v in (spec.get("profiles") or {}).items()}
    for prof, extra in profiles.items():
        if prof not in PROFILES:
            raise SearchError(f"{where}: profiles: {prof!r} is not a profile ({', '.join(PROFILES)})")
        if set(extra) - {"fixed", "params"}:
            raise SearchError(f"{where}: profiles.{prof} may only hold 'fixed' and 'params'")
    profile = spec.get("profile")
    if profile is not None and profile not in PROFILES:
        raise SearchError(f"{where}: profile {profile!r} is not a profile ({', '.join(PROFILES)})")
    trials = spec.get("trials", 20)
    if not isinstance(trials, int) or trials < 1:
        raise SearchError(f"{where}: trials must be a positive integer")
    return SearchSpace(name=path.stem, title=str(spec.get("title", path.stem)), params=params, fixed=fixed,
                       metric=metric, direction=direction, trials=trials, profile=profile,
                       final_split=spec.get("final_split"), sampler=sampler, pruner=pruner, profiles=profiles,
                       enqueue_defaults=bool(spec.get("enqueue_defaults", False)), path=path)


def validate_space(space: SearchSpace, profile: str, fixed: dict[str, Any]) -> dict:
    """Resolve the base config and every corner of the space through load_config (like sweeps do
    for their rows), so a misspelt key or an invalid range fails before any training. Returns the
    base config (profile <- fixed overrides)."""
    where = space._where()
    try:
        base = load_config(profile=profile, overrides=dotted_to_nested(fixed))
    except ConfigError as e:
        raise SearchError(f"{where}: fixed overrides under profile {profile!r}: {e}") from None
    check_selection_split(base)
    for p in space.params.values():
        try:
            current = get(base, p.name)
        except (KeyError, TypeError):
            raise SearchError(f"{where}: param {p.name!r} is not a config key") from None
        if isinstance(current, dict):
            raise SearchError(f"{where}: param {p.name!r} names a config section, not a key")
        for value in p.extremes():
            try:
                load_config(profile=profile, overrides=dotted_to_nested({**fixed, p.name: value}))
            except ConfigError as e:
                raise SearchError(f"{where}: param {p.name!r} = {value!r} under profile {profile!r}: {e}") from None
    return base


def is_test_split(split: str | None) -> bool:
    """test, testA, testB (RefCOCO/+), test of RefCOCOg umd and ReferIt."""
    return split is not None and str(split).lower().startswith("test")


def check_selection_split(cfg: dict) -> None:
    """Hyper-parameters are selected on validation data only: a trial's eval.split (the metric it
    reports) and eval.select_split (checkpoint selection) must not be test splits."""
    for key in ("split", "select_split"):
        split = cfg["eval"][key]
        if is_test_split(split):
            raise SearchError(f"eval.{key} = {split!r}: a search selects hyper-parameters and must never see a "
                              f"test split; use val (the test split is only used by the final re-evaluation)")


# --------------------------------------------------------------------------------------------
# Storage, budget, heartbeats
# --------------------------------------------------------------------------------------------

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
            except sqlalchemy.exc.IntegrityError:
                # Two processes opening a new database at once both create Optuna's schema; the
                # loser's insert of the schema version fails. The schema exists now: open it again.
                if attempt == 4:
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


# --------------------------------------------------------------------------------------------
# Workers (submitit jobs)
# --------------------------------------------------------------------------------------------

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
    return load_config(profile=profile, overrides=dotted_to_nested({**fixed, **params}))


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
            trial.set_user_attr("stopped", _last_line(e))
            raise optuna.TrialPruned(f"diverged: {_last_line(e)}") from None
        except Exception as e:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text(traceback.format_exc())
            try:
                trial.set_user_attr("error", _last_line(e))
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
                        print(f"[search] worker {spec.index}: could not finish its trial: {_last_line(e)}",
                              file=sys.stderr)
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


def _finished_elsewhere(e: BaseException) -> bool:
    """Optuna's errors for writing to a trial that another process already finished."""
    return isinstance(e, optuna.exceptions.UpdateFinishedTrialError) or "Cannot tell a" in str(e)


class SearchWorker(submitit.helpers.Checkpointable):
    """The submitit job of one worker. On SLURM preemption/timeout it requeues itself; the trial it
    was running goes stale and is retried by whichever worker notices first."""

    def __call__(self, spec: WorkerSpec) -> dict:
        return run_worker(spec)

    def checkpoint(self, spec: WorkerSpec) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(SearchWorker(), spec)


def launch_workers(specs: list[WorkerSpec], executor: str, *, folder: Path, slurm: SlurmOptions,
                   watch: Callable[[], None] = lambda: None, poll_s: float = 2.0) -> list[str]:
    """Run the workers; returns one line per worker job that failed (trial failures are not job failures)."""
    errors: list[str] = []
    if executor == "inline":
        for spec in specs:  # one after another: the first usually runs the whole budget
            try:
                run_worker(spec)
            except Exception as e:
                traceback.print_exc(limit=5)
                errors.append(f"worker {spec.index}: {_last_line(e)}")
        return errors
    folder.mkdir(parents=True, exist_ok=True)
    if executor == "local":
        from bench.executors import gpu_slot, local_gpus

        ex = submitit.LocalExecutor(folder=str(folder / "%j"))
        ex.update_parameters(timeout_min=7 * 24 * 60)
        n_gpus = local_gpus()
        jobs = []
        for k, spec in enumerate(specs):
            ex.update_parameters(**gpu_slot(k, n_gpus))
            jobs.append(ex.submit(SearchWorker(), spec))
    elif executor == "slurm":
        ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm")
        params: dict[str, Any] = dict(timeout_min=slurm.time_min, cpus_per_task=slurm.cpus_per_task,
                                      slurm_array_parallelism=len(specs), slurm_setup=list(slurm.setup))
        if slurm.partition:
            params["slurm_partition"] = slurm.partition
        if slurm.gpus_per_node:
            params["gpus_per_node"] = slurm.gpus_per_node
        if slurm.mem_gb:
            params["mem_gb"] = slurm.mem_gb
        ex.update_parameters(**params)
        jobs = ex.map_array(SearchWorker(), specs)  # one array: W workers
    else:
        raise ValueError(f"unknown executor {executor!r} (choose from {', '.join(EXECUTORS)})")
    print(f"[search] {len(jobs)} worker job(s): {', '.join(str(j.job_id) for j in jobs)}; logs in {folder}/",
          file=sys.stderr)
    while not all(j.done() for j in jobs):
        watch()
        time.sleep(poll_s)
    watch()
    for spec, job in zip(specs, jobs):
        try:
            job.result()
        except Exception as e:
            errors.append(f"worker {spec.index} (job {job.job_id}): {_last_line(e)}\n         log: {job.paths.stderr}")
    return errors


class ProgressLine:
    """`[search] study: 5/12 counted (3 complete, 2 pruned, 0 failed), 2 running | best ...` on change."""

    def __init__(self, study_name: str, storage: optuna.storages.BaseStorage, budget: int, metric: str):
        self.study_name, self.storage, self.budget, self.metric = study_name, storage, budget, metric
        self.start, self._last = time.time(), ""

    def __call__(self) -> None:
        try:
            trials = optuna.load_study(study_name=self.study_name, storage=self.storage).get_trials(deepcopy=False)
        except Exception:
            return  # a read racing a writer; the next poll shows it
        n = {s: sum(t.state == s for t in trials) for s in TrialState}
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = max(complete, key=lambda t: t.value, default=None)
        line = (f"[search] {self.study_name}: {budget_used(trials)}/{self.budget} counted "
                f"({n[TrialState.COMPLETE]} complete, {n[TrialState.PRUNED]} pruned, {n[TrialState.FAIL]} failed), "
                f"{n[TrialState.RUNNING]} running"
                + (f" | best {self.metric} {best.value:.2f} (trial {best.number})" if best else ""))
        if line != self._last:
            self._last = line
            print(f"{line} | {_hms(time.time() - self.start)} elapsed", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Study set-up and reports
# --------------------------------------------------------------------------------------------

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


def _value_str(v: Any) -> str:
    if isinstance(v, float):
        return _fmt(v)
    return str(v)


def trials_frame(study: optuna.Study):
    import pandas as pd

    trials = study.get_trials(deepcopy=False)
    names = list(study.user_attrs.get("space") or {})
    rows = []
    for t in trials:
        row = {"number": t.number, "state": t.state.name,
               "value": t.value if t.state == TrialState.COMPLETE else None,
               "last_epoch": t.last_step,
               "duration_s": round(t.duration.total_seconds(), 1) if t.duration is not None else None}
        for n in names:
            row[n] = t.params.get(n)
        row["retry_of"] = t.system_attrs.get("failed_trial")
        row["note"] = t.user_attrs.get("error") or t.user_attrs.get("stopped") or t.user_attrs.get("enqueued") or ""
        row["run_dir"] = t.user_attrs.get("run_dir", "")
        rows.append(row)
    columns = ["number", "state", "value", "last_epoch", "duration_s", *names, "retry_of", "note", "run_dir"]
    return pd.DataFrame(rows, columns=columns)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join("" if v is None or (isinstance(v, float) and math.isnan(v)) else
                                       _value_str(v) for v in r) + " |")
    return "\n".join(lines) + "\n"


def write_reports(study: optuna.Study, out: Path, base_cfg: dict) -> dict[str, Any]:
    """best.json/.md, trials.csv/.md and the plots; returns what was written and notes."""
    out.mkdir(parents=True, exist_ok=True)
    attrs = study.user_attrs
    metric, space = attrs["metric"], attrs.get("space") or {}
    df = trials_frame(study)
    df.to_csv(out / "trials.csv", index=False)
    cols = ["number", "state", "value", "last_epoch", "duration_s", *space, "retry_of", "note"]
    header = [LABELS.get(c, c) if c in space else c for c in cols]
    shown = df[cols].astype(object).where(df[cols].notna(), None)
    shown["value"] = [None if v is None else f"{v:.2f}" for v in shown["value"]]
    (out / "trials.md").write_text(
        f"# Trials of study `{study.study_name}` ({metric} on {base_cfg['eval']['split']}, {attrs['direction']})\n\n"
        "`value` is the final epoch's metric of complete trials; `last_epoch` the last epoch reported "
        "(pruned trials stop early).\n\n"
        + _md_table(header, shown.values.tolist()))
    counts = {s.name.lower(): int((df["state"] == s.name).sum()) if len(df) else 0 for s in TrialState}
    written: dict[str, Any] = {"trials.csv": out / "trials.csv", "trials.md": out / "trials.md", "notes": []}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = study.best_trial if complete else None
    best_json = {"study": study.study_name, "metric": metric, "direction": attrs["direction"],
                 "eval_split": base_cfg["eval"]["split"], "profile": attrs["profile"], "counts": counts,
                 "value": best.value if best else None, "trial": best.number if best else None,
                 "params": best.params if best else None,
                 "defaults": {n: get(base_cfg, n) for n in space},
                 "fixed": attrs.get("fixed", {}), "run_dir": best.user_attrs.get("run_dir") if best else None}
    (out / "best.json").write_text(json.dumps(best_json, indent=1, default=str) + "\n")
    lines = [f"# Best trial of study `{study.study_name}`\n"]
    if best is None:
        lines.append("No trial completed yet.\n")
    else:
        lines.append(f"Trial {best.number}: **{metric} {best.value:.2f}** on {base_cfg['eval']['split']} "
                     f"(profile {attrs['profile']}; {counts['complete']} complete, {counts['pruned']} pruned, "
                     f"{counts['fail']} failed trials).\n")
        lines.append(_md_table(["param", "key", "best", "profile default", "searched"],
                               [[LABELS.get(n, n), f"`{n}`", best.params.get(n), get(base_cfg, n),
                                 Param(n, **p).describe()] for n, p in space.items()]))
        sets = " ".join(f"--set {k}={_cli_value(v)}" for k, v in {**attrs.get("fixed", {}), **best.params}.items())
        lines.append(f"\nRerun it: `python -m ehin.train_stage1 --profile {attrs['profile']} {sets} --out runs/best`\n")
    (out / "best.md").write_text("\n".join(lines))
    written.update({"best.json": out / "best.json", "best.md": out / "best.md"})
    written["notes"] = write_plots(study, out)
    return written


def write_plots(study: optuna.Study, out: Path) -> list[str]:
    """Optuna's matplotlib plots; one that cannot be drawn yet (too few trials) is a note, not an error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from optuna.visualization import matplotlib as ovm

    metric = study.user_attrs.get("metric", "value")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    notes = []
    if 2 <= len(complete) < 10:
        notes.append(f"importances and slices rest on {len(complete)} complete trial(s): read them as anecdotes")
    plots = {"history.png": lambda: ovm.plot_optimization_history(study, target_name=metric),
             "intermediate.png": lambda: ovm.plot_intermediate_values(study),
             "importances.png": lambda: ovm.plot_param_importances(study, target_name=metric),
             "slices.png": lambda: ovm.plot_slice(study, target_name=metric)}
    for name, draw in plots.items():
        (out / name).unlink(missing_ok=True)
        if name in ("importances.png", "slices.png") and len(complete) < 2:
            notes.append(f"{name}: needs at least 2 complete trials ({len(complete)} so far)")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            axes = list(ax.flat) if hasattr(ax, "flat") else [ax]
            fig = axes[0].figure
            if name == "slices.png":  # one panel per param in a row: give each some width
                fig.set_size_inches(max(6.0, 2.4 * len(axes)), 3.2)
                for a in axes:  # log axes: minor tick labels overlap
                    a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            if name == "intermediate.png":
                axes[0].set_xlabel("epoch")
                axes[0].set_ylabel(f"val {metric}")
            fig.savefig(out / name, dpi=110, bbox_inches="tight")
            plt.close(fig)
        except Exception as e:  # e.g. importances when every complete trial scored the same
            plt.close("all")
            notes.append(f"{name}: not drawn ({_last_line(e)})")
    return notes


# --------------------------------------------------------------------------------------------
# Final re-evaluation on the test split
# --------------------------------------------------------------------------------------------

def choose_final_split(requested: str | None, refer) -> str:
    splits = sorted(refer.splits())
    if requested:
        if requested not in splits:
            raise SearchError(f"final split {requested!r} is not a split of the dataset ({', '.join(splits)})")
        return requested
    tests = [s for s in splits if is_test_split(s)]
    if not tests:
        raise SearchError(f"the dataset has no test split ({', '.join(splits)}); pass --final-split or --no-final")
    return "test" if "test" in tests else tests[0]


def final_evaluation(study: optuna.Study, *, profile: str, fixed: dict[str, Any], split: str, seeds: int,
                     executor: str, jobs: int, root: Path, slurm: SlurmOptions, out: Path) -> tuple[Path, bool]:
    """Train the best params and the profile's defaults with `seeds` seeds each, evaluate on `split`
    (a test split: the only place the search touches it) and write final.md/json. Cells go through
    bench.executors.dispatch and the results store, so a rerun only trains what is missing."""
    from bench.executors import dispatch
    from bench.jobs import CellSpec
    from bench.run import reuse_identical_cells
    from bench.store import ResultStore, cell_id

    best = study.best_trial
    table = f"search-{study.study_name}"
    rows = {"best": {**fixed, **best.params}, "default": dict(fixed)}
    specs = []
    for row, overrides in rows.items():
        for seed in range(seeds):
            o = {**overrides, "eval.split": split, "train.seed": seed}
            cfg = load_config(profile=profile, overrides=dotted_to_nested(o))
            h = config_hash(cfg)
            specs.append(CellSpec(table=table, row=row, seed=seed, profile=profile, stage="1", overrides=o,
                                  config_hash=h, run_dir=str(root / "runs" / row / f"seed{seed}-{h}"),
                                  store_root=str(root), cell_id=cell_id(table, row, seed, profile, h)))
    store = ResultStore(root)
    done = store.finished_ids()
    todo = reuse_identical_cells([s for s in specs if s.cell_id not in done], store)
    ok = True
    if todo:
        print(f"[search] final: {len(todo)} run(s) on {split} ({executor})", file=sys.stderr)
        outcomes = dispatch(todo, executor, jobs=jobs, folder=root / "submitit", slurm=slurm)
        ok = all(o.ok for o in outcomes)
    by_id = {r["cell_id"]: r for r in store.read() if "cell_id" in r}
    space = study.user_attrs.get("space") or {}
    base_cfg = load_config(profile=profile, overrides=dotted_to_nested(fixed))
    summary: dict[str, Any] = {"split": split, "seeds": list(range(seeds)), "rows": {}}
    md_rows = []
    for row in rows:
        recs = [by_id[s.cell_id] for s in specs if s.row == row and s.cell_id in by_id]
        stats = {}
        for col, key in PAPER_METRICS.items():
            vals = [float(r["metrics"][key]) for r in recs if key in r.get("metrics", {})]
            stats[key] = _mean_std(vals)
        values = {n: (best.params[n] if row == "best" else get(base_cfg, n)) for n in space}
        summary["rows"][row] = {"params": values, "n_seeds": len(recs), "metrics": stats}
        label = f"best (trial {best.number})" if row == "best" else "profile default"
        md_rows.append([label, *[values[n] for n in space],
                        *[_pm(*stats[k]) for k in PAPER_METRICS.values()], len(recs)])
    out.mkdir(parents=True, exist_ok=True)
    (out / "final.json").write_text(json.dumps(summary, indent=1) + "\n")
    header = ["config", *[LABELS.get(n, n) for n in space], *PAPER_METRICS, "seeds"]
    (out / "final.md").write_text(
        f"# Best configuration vs the profile's defaults on {split}\n\n"
        f"Profile {profile}; each row trained with seeds {', '.join(map(str, range(seeds)))} and evaluated on "
        f"**{split}** (mean ± std over seeds). The search itself only saw {base_cfg['eval']['split']}.\n\n"
        + _md_table(header, md_rows))
    return out / "final.md", ok


def _mean_std(vals: list[float]) -> tuple[float, float, int]:
    if not vals:
        return math.nan, math.nan, 0
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std, len(vals)


def _pm(mean: float, std: float, n: int) -> str:
    if n == 0:
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def write_summary(out: Path, study: optuna.Study, written: dict, final_md: Path | None) -> Path:
    from ehin.metrics import PROTOCOL_BEFORE

    parts = [f"# Search `{study.study_name}`\n",
             f"Space `{study.user_attrs.get('space_name')}`, profile {study.user_attrs.get('profile')}, "
             f"objective {study.user_attrs.get('metric')} ({study.user_attrs.get('direction')}); evaluation "
             f"{study.user_attrs.get('metrics_protocol', PROTOCOL_BEFORE)}.\n",
             (out / "best.md").read_text().split("\n", 1)[1]]
    if final_md is not None and final_md.exists():
        parts.append("## Test split\n" + final_md.read_text().split("\n", 1)[1])
    for name, title in (("history.png", "Optimisation history"), ("intermediate.png", "Per-epoch values (pruning)"),
                        ("importances.png", "Parameter importances"), ("slices.png", "Slices")):
        if (out / name).exists():
            parts.append(f"## {title}\n\n![{title}]({name})\n")
    if written.get("notes"):
        parts.append("Notes: " + "; ".join(written["notes"]) + "\n")
    parts.append("All trials: [trials.md](trials.md) ([csv](trials.csv)).\n")
    (out / "summary.md").write_text("\n".join(parts))
    return out / "summary.md"


@command
def main(argv: list[str] | None = None) -> int:
    from bench.run import _flat_overrides

    p = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("space", help=f"a space in sweeps/search/ ({', '.join(list_spaces()) or 'none'}) or a YAML path")
    p.add_argument("--profile", choices=PROFILES,
                   help="smoke | synthetic | paper (default: the space's, else synthetic)")
    p.add_argument("--trials", type=int, help="the study's total trial budget, over all workers and reruns "
                                              "(default: the space's)")
    p.add_argument("--workers", type=int, default=1, help="parallel workers (jobs), each running trials until "
                                                          "the budget is used (default 1)")
    p.add_argument("--executor", default="inline", choices=EXECUTORS,
                   help="inline: this process; local: submitit processes; slurm: a SLURM job array "
                        "(default: inline)")
    p.add_argument("--storage", help="RDB URL (sqlite:///x.db, postgresql://...) or journal file path "
                                     "(default: RESULTS/<study>/journal.log)")
    p.add_argument("--study", help="study name (default: <space>-<profile>); an existing study is continued")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed (default 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed config override for every trial (and the final runs), e.g. train.epochs=3")
    p.add_argument("--metric", choices=METRIC_KEYS, help="val metric to optimise (default: the space's, else iou)")
    p.add_argument("--results", default="results/search", help="study folders go here (default results/search)")
    p.add_argument("--reports", default="reports", help="reports go to REPORTS/search/<study>/ (default reports)")
    g = p.add_argument_group("fault tolerance")
    g.add_argument("--heartbeat", type=int, default=30,
                   help="seconds between a running trial's heartbeats (default 30)")
    g.add_argument("--grace", type=int, default=120, help="seconds without a heartbeat before a trial is "
                                                          "failed and retried (default 120)")
    g.add_argument("--max-retry", type=int, default=3, help="retries of one killed trial (default 3)")
    g = p.add_argument_group("final re-evaluation on the test split")
    g.add_argument("--final-seeds", type=int, default=3, help="seeds for best vs default (default 3)")
    g.add_argument("--final-split", help="test split (default: the space's final_split, else test/testA)")
    g.add_argument("--no-final", action="store_true", help="skip the final re-evaluation")
    add_slurm_args(p, "worker job", 24 * 60)
    args = p.parse_args(argv)

    try:
        space = load_space(args.space)
        profile = args.profile or space.profile or "synthetic"
        space = space.for_profile(profile)
        metric = args.metric or space.metric
        budget = args.trials or space.trials
        if budget < 1 or args.workers < 1:
            p.error("--trials and --workers must be positive")
        fixed = {**space.fixed, **_flat_overrides(args.overrides)}
        if "data.dataset" in fixed:
            from bench.sweeps import dataset_for_profile

            fixed["data.dataset"] = dataset_for_profile(str(fixed["data.dataset"]), profile)
        both = sorted(set(fixed) & set(space.params))
        if both:
            p.error(f"--set {both[0]} fixes a searched param; remove it from the space or the command line")
        if args.executor == "local":
            # Share the cores between the workers (thread counts are not part of the config hash).
            fixed.setdefault("train.threads", max(1, (os.cpu_count() or 1) // args.workers))
        base_cfg = validate_space(space, profile, fixed)
    except (SearchError, ConfigError) as e:
        p.error(str(e))

    from ehin.train_stage1 import prepare

    study_name = args.study or f"{space.name}-{profile}"
    study_dir = Path(args.results) / study_name
    study_dir.mkdir(parents=True, exist_ok=True)
    storage_url = args.storage or str(study_dir / "journal.log")
    out = Path(args.reports) / "search" / study_name
    slurm = slurm_options(args, array_parallelism=args.workers)

    refer = prepare(base_cfg)  # the dataset and the small CLIP once, before any worker starts
    final_split = None
    if not args.no_final:
        try:
            final_split = choose_final_split(args.final_split or space.final_split, refer)
        except SearchError as e:
            p.error(str(e))
    storage = open_storage(storage_url, heartbeat_s=args.heartbeat, grace_s=args.grace, max_retry=args.max_retry)
    meta = {"space": space.as_json(), "space_name": space.name, "metric": metric, "direction": space.direction,
            "profile": profile, "base_config_hash": config_hash(base_cfg),
            "fixed": {k: v for k, v in fixed.items() if k != "train.threads"}}
    try:
        study = create_or_continue(study_name, storage, meta)
    except SearchError as e:
        p.error(str(e))
    before = budget_used(study.get_trials(deepcopy=False))
    if space.enqueue_defaults and not study.get_trials(deepcopy=False):
        enqueue_defaults(study, space, base_cfg)
    print(f"search {study_name}: {space.title}\n  profile {profile}, {metric} on {base_cfg['eval']['split']} "
          f"({space.direction}), {len(space.params)} params, budget {budget} trials ({before} already counted), "
          f"{args.workers} worker(s) via {args.executor}\n  storage {storage_url}\n  trial runs in {study_dir}/")

    specs = [WorkerSpec(study=study_name, storage=storage_url, study_dir=str(study_dir), profile=profile,
                        fixed=fixed, params=space.as_json(), metric=metric, n_trials=budget, seed=args.seed,
                        index=i, sampler=space.sampler, pruner=space.pruner, heartbeat_s=args.heartbeat,
                        grace_s=args.grace, max_retry=args.max_retry)
             for i in range(args.workers)]
    t0 = time.time()
    errors = launch_workers(specs, args.executor, folder=study_dir / "submitit", slurm=slurm,
                            watch=ProgressLine(study_name, storage, budget, metric))
    elapsed = time.time() - t0

    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    written = write_reports(study, out, base_cfg)
    final_md, final_ok = None, True
    has_complete = any(t.state == TrialState.COMPLETE for t in trials)
    if final_split and has_complete and args.final_seeds > 0:
        final_md, final_ok = final_evaluation(study, profile=profile, fixed=fixed, split=final_split,
                                              seeds=args.final_seeds, executor=args.executor, jobs=args.workers,
                                              root=study_dir / "final", slurm=slurm, out=out)
    summary = write_summary(out, study, written, final_md)

    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    print(f"\n{study_name}: {budget_used(trials)}/{budget} trials counted ({counts['complete']} complete, "
          f"{counts['pruned']} pruned, {counts['fail']} failed) in {_hms(elapsed)}")
    print((out / "best.md").read_text())
    if final_md is not None:
        print(final_md.read_text())
    print(f"reports in {out}/ (summary: {summary})")
    for line in errors:
        print(f"[search] FAILED {line}", file=sys.stderr)
    if not has_complete:
        errs = sorted({t.user_attrs["error"] for t in trials if t.user_attrs.get("error")})
        print("[search] no trial completed" + (f"; errors: {'; '.join(errs)}" if errs else ""), file=sys.stderr)
    return 0 if (not errors and has_complete and final_ok) else 1


def _last_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"


def _cli_value(v: Any) -> str:
    """A value as `--set` reads it back (YAML scalars: null, true, 0.001)."""
    if isinstance(v, float):
        return repr(v)
    text = yaml.safe_dump(v, default_flow_style=True).strip()
    return text[:-4].strip() if text.endswith("...") else text


def _fmt(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.4g}"


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


if __name__ == "__main__":
    sys.exit(main())
