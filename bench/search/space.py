"""Search spaces: the YAML files of sweeps/search/ (sweeps/search/README.md describes them).

`load_space` reads one and checks its form; `validate_space` resolves the base config and every
corner of the space through load_config, so a bad space fails before any training. A search
selects on validation data only: `check_selection_split` refuses a test split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from ehin.cli import UserError
from ehin.config import PROFILES, ConfigError, get, load_config
from ehin.metrics import METRIC_KEYS

REPO = Path(__file__).resolve().parents[2]
SPACES_DIR = REPO / "sweeps" / "search"

PARAM_TYPES = ("float", "int", "categorical")
_SPACE_KEYS = {"title", "profile", "metric", "direction", "trials", "fixed", "params", "sampler", "pruner",
               "final_split", "profiles", "enqueue_defaults"}
_PARAM_KEYS = {"type", "low", "high", "log", "step", "choices"}
_SAMPLER_KEYS = {"n_startup_trials", "n_ei_candidates", "multivariate", "group", "constant_liar"}
_PRUNER_KEYS = {"n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"}


class SearchError(UserError):
    """A search space or study that cannot be used; the message names the file or the study."""


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
        return f"[{short_number(self.low)}, {short_number(self.high)}]" + (" log" if self.log else "") + \
            (f" step {short_number(self.step)}" if self.step else "")


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
        base = load_config(profile=profile, overrides=fixed)
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
                load_config(profile=profile, overrides={**fixed, p.name: value})
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


def short_number(x: float | None) -> str:
    """A bound or value in four significant digits (reports, a space's description)."""
    if x is None:
        return ""
    return f"{x:.4g}"
