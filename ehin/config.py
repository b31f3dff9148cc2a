"""Configs: a base YAML, a profile, an optional file, and `key=value` overrides, merged in that order.

A config is resolved once (`load_config`) into a plain nested dict: picklable, what config.yaml and
checkpoints hold, and what bench carries in each cell's spec. `Config` is its typed view: one
dataclass per base.yaml section, field for field; `Config.from_dict` checks every key's type and
range once, at load time, with a one-line ConfigError naming the key, so a typo in a sweep or on the
command line never silently trains the default. Modules take the typed fields by keyword
(`ehin.model.build_model`). `config_hash` is the one hash of a config.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from ehin.cli import UserError

CONFIG_DIR = Path(__file__).parent / "configs"
PROFILES = ("smoke", "synthetic", "gpu", "paper")
# What a command uses without --profile and --config: the embedded synthetic data and small CLIP, the
# only setting that runs on a fresh machine (base.yaml alone names RefCOCO+, which must be supplied).
# Library calls (load_config, bench) are unaffected: they name their profile or take base.yaml alone.
DEFAULT_PROFILE = "synthetic"
CACHE_NOTE = ("Generated synth-* datasets and the pretrained small CLIP are cached in $EHIN_CACHE "
              "(default ~/.cache/ehin-bench).")


class ConfigError(UserError):
    """A config key or value that cannot be used."""


def cache_dir() -> Path:
    """Where generated datasets and pretrained checkpoints live (shared by every run and cell)."""
    return Path(os.environ.get("EHIN_CACHE", Path.home() / ".cache" / "ehin-bench")).expanduser()


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def merge(base: dict, override: Mapping, *, path: str = "", strict: bool = True) -> dict:
    """Deep-merge `override` into a copy of `base`. With strict, keys absent from base are errors."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        dotted = f"{path}{key}"
        if strict and key not in out:
            raise ConfigError(f"unknown config key '{dotted}' (known here: {', '.join(sorted(out))})")
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, path=dotted + ".", strict=strict)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dotted_to_nested(flat: Mapping[str, Any]) -> dict:
    """{'model.alpha': 0.2} -> {'model': {'alpha': 0.2}}."""
    nested: dict = {}
    for key, value in flat.items():
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def parse_overrides(items: Iterable[str]) -> dict:
    """`parse_assignments`, nested: {'model': {'alpha': 0.2}}."""
    return dotted_to_nested(parse_assignments(items))


def parse_assignments(items: Iterable[str]) -> dict:
    """Parse `a.b=value` strings into {'a.b': value}; values are read as YAML scalars (1e-3, true, null, [1, 2])."""
    flat = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': cannot parse value: {e}") from None
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        flat[key.strip()] = value
    return flat


def load_config(
    file: str | Path | None = None,
    *,
    profile: str | None = None,
    overrides: Iterable[str] | Mapping | None = None,
) -> dict:
    """base.yaml <- profiles/<profile>.yaml <- file <- overrides, then validated (`Config.from_dict`).

    `overrides`: `key=value` strings, or a mapping of dotted keys ({'model.alpha': 0.2}, as sweeps
    declare them) and/or nested sections ({'model': {'alpha': 0.2}})."""
    cfg = _read_yaml(CONFIG_DIR / "base.yaml")
    if profile is not None:
        if profile not in PROFILES:
            raise ConfigError(f"unknown profile '{profile}' (choose from {', '.join(PROFILES)})")
        cfg = merge(cfg, _read_yaml(CONFIG_DIR / "profiles" / f"{profile}.yaml"))
    if file is not None:
        cfg = merge(cfg, _read_yaml(Path(file)))
    if overrides:
        extra = dotted_to_nested(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
        cfg = merge(cfg, extra)
    validate(cfg)
    return cfg


# The generator's scene recipes (ehin.data.synthetic.SCENE_RECIPES; a test keeps the two equal), named
# here so that loading a config does not import the generator.
SCENE_RECIPES = ("simple", "cluttered")
# The cluttered recipe's version: its datasets' cache folder ends -cluttered<N> from 2 on, and config_hash
# hashes it, so results of another version never resume or pass for these. 2: synth-referit names the
# category in every expression (TESTBED §1: ReferIt's words carry a category or stuff name).
CLUTTERED_VERSION = 2


def recipe_tag(scenes: str) -> str:
    """A scene recipe's name with its version where it has one ("cluttered2"): how its datasets' cache
    folder and config_hash tell one version's results from another's."""
    return f"{scenes}{CLUTTERED_VERSION}" if scenes == "cluttered" and CLUTTERED_VERSION > 1 else scenes
DENSE_MODES = ("tokens", "values")  # ehin.clip_model.DENSE_MODES, named here for the same reason


# ---- the typed config: one dataclass per base.yaml section, field for field ----------------------
# A field's type is what `_check` enforces; `_RULES` adds ranges and choices. Values are checked, never
# converted: the dict stays the stored form and config_hash hashes it, so 10 must stay 10 (not 10.0).

@dataclass(frozen=True)
class DataConfig:
    dataset: str
    split_by: str
    root: Optional[str]
    image_root: Optional[str]
    image_size: int
    train_split: str
    K: int
    num_workers: int


@dataclass(frozen=True)
class SyntheticConfig:
    size: int
    images: int
    seed: int
    scenes: str


@dataclass(frozen=True)
class BackboneConfig:
    arch: str
    pretrained: Optional[str]
    image_size: Optional[int]
    dense: str


@dataclass(frozen=True)
class ScorerConfig:
    arch: str
    pretrained: Optional[str]
    image_size: Optional[int]


@dataclass(frozen=True)
class ModelConfig:
    hidden_dim: int
    n_layers: int
    alpha: float
    beta: float
    residual: str
    fusion_scale: float
    bp_attention: str
    logit_scale_init: float
    pair_norm: str = "module"


@dataclass(frozen=True)
class LossConfig:
    fg: float
    cl: float
    bg: float
    cl_variant: str


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int
    epochs: int
    lr: float
    backbone_lr_mult: float
    weight_decay: float
    poly_power: float
    seed: int
    device: str
    amp: bool
    channels_last: bool
    fused_adamw: bool
    compile: Optional[str]
    threads: Optional[int]
    log_every: int
    grad_clip: Optional[float]


@dataclass(frozen=True)
class EvalConfig:
    split: str
    select_split: Optional[str]
    batch_size: int
    max_items: Optional[int]
    every: int


@dataclass(frozen=True)
class Stage2Config:
    batch_size: int
    epochs: int
    lr: float
    backbone_lr_mult: float
    poly_power: float
    hidden_dim: int
    ema: Optional[str]
    ema_decay: float
    ema_weight: float
    dice_weight: float


@dataclass(frozen=True)
class PseudoConfig:
    prms: bool
    crf: bool
    random_walk: bool
    map_threshold: float
    fg_threshold: float
    bg_threshold: float
    crf_gt_prob: float
    crf_iterations: int
    irnet_epochs: int
    irnet_batch_size: int
    irnet_lr: float
    irnet_weight_decay: float
    irnet_radius: int
    rw_radius: int
    rw_beta: float
    rw_exp_times: int
    rw_threshold: float
    chunk_size: int
    workers: int


@dataclass(frozen=True)
class Config:
    data: DataConfig
    synthetic: SyntheticConfig
    backbone: BackboneConfig
    scorer: ScorerConfig
    model: ModelConfig
    loss: LossConfig
    train: TrainConfig
    eval: EvalConfig
    stage2: Stage2Config
    pseudo: PseudoConfig

    @classmethod
    def from_dict(cls, cfg: Mapping) -> "Config":
        """The typed view of a resolved config; raises ConfigError naming the first bad key."""
        sections = {}
        for sec in fields(cls):
            node = cfg.get(sec.name)
            if not isinstance(node, Mapping):
                raise ConfigError(f"{sec.name}: must be a section (a mapping), got {node!r}")
            sections[sec.name] = _section(_SECTIONS[sec.name], sec.name, node)
        typed = cls(**sections)
        typed._check_across()
        return typed

    def to_dict(self) -> dict:
        """The plain nested dict (what config.yaml, checkpoints and config_hash use)."""
        return asdict(self)

    def _check_across(self) -> None:
        """Rules that tie two keys together."""
        if self.train.batch_size < 2 and self.loss.fg > 0:
            raise ConfigError("train.batch_size must be >= 2: L_FG needs in-batch negatives (Eq. 18)")
        sel = self.eval.select_split
        if sel is not None and sel == self.eval.split:
            raise ConfigError(f"eval.select_split = eval.split = {sel!r}: checkpoint selection must not use "
                              "the split it reports")
        if sel is not None and self.eval.every != 1:
            raise ConfigError(f"eval.every = {self.eval.every} with eval.select_split: checkpoint selection "
                              "evaluates every epoch (leave eval.every at 1)")


_SECTIONS = {name: hint for name, hint in get_type_hints(Config).items()}  # section -> its dataclass

# Ranges and choices beyond the type: "pos" >= 1, "nonneg" >= 0, "unit" in [0, 1], or a tuple of choices.
_RULES: dict[str, Any] = {
    "data.image_size": "pos", "data.K": "nonneg", "data.num_workers": "nonneg",
    "synthetic.size": "pos", "synthetic.images": "pos", "synthetic.scenes": SCENE_RECIPES,
    "backbone.image_size": "pos", "backbone.dense": DENSE_MODES, "scorer.image_size": "pos",
    "model.hidden_dim": "pos", "model.n_layers": "pos", "model.alpha": "nonneg", "model.beta": "nonneg",
    "model.residual": ("once", "twice"), "model.fusion_scale": "nonneg",
    "model.bp_attention": ("pixels", "tokens"), "model.pair_norm": ("module", "fast"), "model.logit_scale_init": "gt0",
    "loss.fg": "nonneg", "loss.cl": "nonneg", "loss.bg": "nonneg", "loss.cl_variant": ("early", "late"),
    "train.batch_size": "pos", "train.epochs": "pos", "train.lr": "nonneg", "train.backbone_lr_mult": "nonneg",
    "train.weight_decay": "nonneg", "train.poly_power": "nonneg", "train.device": ("auto", "cpu", "cuda"),
    "train.compile": (None, "default", "reduce-overhead", "max-autotune"),
    "train.threads": "pos", "train.log_every": "pos", "train.grad_clip": "gt0",
    "eval.batch_size": "pos", "eval.max_items": "pos", "eval.every": "pos",
    "stage2.batch_size": "pos", "stage2.epochs": "nonneg", "stage2.lr": "nonneg",
    "stage2.backbone_lr_mult": "nonneg", "stage2.poly_power": "nonneg", "stage2.hidden_dim": "pos",
    "stage2.ema": (None, "mse", "kl"), "stage2.ema_decay": "unit", "stage2.ema_weight": "nonneg",
    "stage2.dice_weight": "nonneg",
    "pseudo.crf_gt_prob": "unit", "pseudo.crf_iterations": "nonneg", "pseudo.irnet_epochs": "nonneg",
    "pseudo.irnet_batch_size": "pos", "pseudo.irnet_lr": "nonneg", "pseudo.irnet_weight_decay": "nonneg",
    "pseudo.irnet_radius": "pos", "pseudo.rw_radius": "pos", "pseudo.rw_beta": "nonneg",
    "pseudo.rw_exp_times": "nonneg", "pseudo.chunk_size": "pos", "pseudo.workers": "nonneg",
}
_RANGE_TEXT = {"pos": ">= 1", "nonneg": ">= 0", "gt0": "> 0", "unit": "in [0, 1]"}


def _section(cls: type, name: str, node: Mapping):
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    unknown = [k for k in node if k not in known]
    if unknown:
        raise ConfigError(f"unknown config key '{name}.{unknown[0]}' (known here: {', '.join(sorted(known))})")
    values = {}
    for key in known:
        dotted = f"{name}.{key}"
        if key not in node:
            raise ConfigError(f"{dotted}: missing")
        values[key] = _check(dotted, node[key], hints[key])
    return cls(**values)


def _check(dotted: str, value: Any, hint: Any) -> Any:
    """`value` if it has the field's type and obeys its rule; else a ConfigError naming `dotted`."""
    rule = _RULES.get(dotted)
    if isinstance(rule, tuple):  # choices decide alone (None may be one of them)
        if value not in rule:
            raise ConfigError(f"{dotted} = {value!r}: must be one of {rule}")
        return value
    optional = get_origin(hint) is Union and type(None) in get_args(hint)
    if value is None:
        if optional:
            return value
        raise ConfigError(f"{dotted} = None: must be set (null is not allowed here)")
    base = next(a for a in get_args(hint) if a is not type(None)) if optional else hint
    # bool is an int to Python: reject it for numbers, and accept ints for floats (lr: 1, say).
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v,
          str: lambda v: isinstance(v, str)}[base](value)
    if not ok:
        what = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[base]
        raise ConfigError(f"{dotted} = {value!r}: must be {what}{' or null' if optional else ''}")
    if rule is not None:
        low, high = {"pos": (1, None), "nonneg": (0, None), "gt0": (0, None), "unit": (0, 1)}[rule]
        if value < low or (high is not None and value > high) or (rule == "gt0" and value == 0):
            raise ConfigError(f"{dotted} = {value!r}: must be {_RANGE_TEXT[rule]}")
    return value


def section(cfg: Mapping, name: str):
    """One section's typed view (e.g. ModelConfig), checked key by key. For readers of a single
    section, such as build_model given a checkpoint's config written before later sections grew."""
    if not isinstance(cfg.get(name), Mapping):
        raise ConfigError(f"{name}: must be a section (a mapping), got {cfg.get(name)!r}")
    return _section(_SECTIONS[name], name, cfg[name])


def validate(cfg: Mapping) -> Config:
    """Raise ConfigError naming the first bad key; return the typed view."""
    return Config.from_dict(cfg)


# Change speed, not results (beyond float rounding, as the device and thread count do).
# eval.every only thins the learning curve: the weights and the final metrics are the same (tested; it
# is refused beside eval.select_split, whose choice it would change). A record's history then holds val
# metrics for the evaluated epochs only.
HASH_IGNORE = ("train.device", "train.threads", "train.channels_last", "train.fused_adamw", "train.compile",
               "data.num_workers", "eval.every")
# Speed levers the hash held before they were known to be: hashed at the value every committed record ran
# with, whatever a run sets, so the committed hashes stay (Table 10's cells hash the pseudo section).
# pseudo.workers (session 44): the CRF processes label each ref alone, in order (the same labels, tested; the
# work folder's identity leaves it out too), so a Stage-2 chain labels with the machine's cores and stays the
# same cell.
HASH_PINNED = {"pseudo.workers": 2}
STAGE2_KEYS = ("stage2", "pseudo")  # sections only pseudo-labels and stage 2 read
# Keys added after results were committed: left out of the hash while at this value, so that the hashes
# of the committed cells (bench.check) stay valid; any other value is hashed as usual.
HASH_OMIT_AT_DEFAULT = {"synthetic.scenes": "simple", "model.pair_norm": "module", "train.grad_clip": None}


def config_hash(cfg: Mapping, *, stage: str | None = None) -> str:
    """The one hash of a config: a short stable digest of everything that changes results.

    Devices, thread counts and loader workers are left out (HASH_IGNORE); the CRF's processes are hashed at
    one value (HASH_PINNED). With stage="1" the sections only stage 2 reads (STAGE2_KEYS) are left out too:
    bench names a stage-1 cell by that hash and the trainer's resume guard compares it, so changing a
    profile's stage-2 or pseudo-label settings neither invalidates nor blocks a stage-1 run. The values equal
    those committed in reports/ (bench.check compares them exactly): the digest is of the plain dict, as it
    always was."""
    if stage not in (None, "1"):
        raise ValueError(f"stage must be None or '1', got {stage!r}")
    c = copy.deepcopy(dict(cfg))
    for dotted, default in HASH_OMIT_AT_DEFAULT.items():
        section, key = dotted.split(".")
        if isinstance(c.get(section), dict) and c[section].get(key, default) == default:
            c[section] = {k: v for k, v in c[section].items() if k != key}
    syn = c.get("synthetic")
    if isinstance(syn, dict) and "scenes" in syn:  # a recipe's versions give different datasets
        c["synthetic"] = {**syn, "scenes": recipe_tag(syn["scenes"])}
    for dotted, value in HASH_PINNED.items():
        section, key = dotted.split(".")
        if isinstance(c.get(section), dict) and key in c[section]:
            c[section] = {**c[section], key: value}
    for dotted in HASH_IGNORE + (STAGE2_KEYS if stage == "1" else ()):
        node = c
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part, {})
        node.pop(parts[-1], None)
    blob = json.dumps(c, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


def save_config(cfg: Mapping, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(dict(cfg), f, sort_keys=False)


def get(cfg: Mapping, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def clip_spec(cfg: dict, role: str) -> tuple[str, Any, int]:
    """(arch, pretrained, image size) of a config's trainable `backbone` or frozen `scorer` CLIP: each
    runs at data.image_size unless its own image_size says otherwise; the scorer's weights default to
    the backbone's (METHOD §2)."""
    b = cfg["backbone"]
    if role == "backbone":
        return b["arch"], b["pretrained"], int(b["image_size"] or cfg["data"]["image_size"])
    if role == "scorer":
        sc = cfg["scorer"]
        return sc["arch"], sc["pretrained"] or b["pretrained"], int(sc["image_size"] or cfg["data"]["image_size"])
    raise ValueError(f"role must be 'backbone' or 'scorer', got {role!r}")


def add_config_args(p: argparse.ArgumentParser, example: str = "model.alpha=0.2", scope: str = "") -> None:
    """--config, --profile and --set, as every command that builds a config has them; `scope` ends each
    help (e.g. " (with --baselines-only)"). Resolve them with `profile_for` / `config_from_args`."""
    p.add_argument("--config", help="YAML config merged over base.yaml (and over --profile when given); "
                   f"default: none{scope}")
    p.add_argument("--profile", help=f"{' | '.join(PROFILES)} (default: {DEFAULT_PROFILE}; "
                   f"with --config and no --profile: base.yaml and that file){scope}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key, e.g. --set {example} (repeatable; default: none){scope}")
    if not p.epilog:
        p.epilog = CACHE_NOTE


def profile_for(args: argparse.Namespace) -> str | None:
    """The profile a command's --profile / --config ask for: --profile, else DEFAULT_PROFILE unless a
    --config file is given (the file then goes over base.yaml alone, as it always did)."""
    if args.profile:
        return args.profile
    return None if args.config else DEFAULT_PROFILE


def config_from_args(args: argparse.Namespace) -> dict:
    """base.yaml <- the profile (`profile_for`) <- --config <- --set."""
    return load_config(args.config, profile=profile_for(args), overrides=args.overrides)


def add_run_args(p: argparse.ArgumentParser, example: str = "model.alpha=0.2") -> None:
    """The config and run-folder options every training command shares."""
    add_config_args(p, example)
    p.add_argument("--out", required=True, help="run folder (required)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints/last.pt (alone: with OUT/config.yaml)")


def config_for_run(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """--resume alone reuses OUT/config.yaml; otherwise build the config and refuse to overwrite a run."""
    out = Path(args.out)
    if args.resume and (out / "config.yaml").exists() and not (args.config or args.profile or args.overrides):
        return load_config(out / "config.yaml")
    cfg = config_from_args(args)
    if not args.resume and (out / "checkpoints" / "last.pt").exists():
        p.error(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return cfg
