"""Configs: a base YAML, a profile, an optional file, and `key=value` overrides, merged in that order.

A config is a plain nested dict (detectron2-style variants are small dicts of dotted keys).
Unknown keys and out-of-range values fail at load time with a message that names the key, so a
typo in a sweep or on the command line never silently trains the default.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from ehin.cli import UserError

CONFIG_DIR = Path(__file__).parent / "configs"
PROFILES = ("smoke", "synthetic", "paper")
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
    """Parse `a.b=value` strings; values are read as YAML scalars (1e-3, true, null, [1, 2])."""
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
    return dotted_to_nested(flat)


def load_config(
    file: str | Path | None = None,
    *,
    profile: str | None = None,
    overrides: Iterable[str] | Mapping | None = None,
) -> dict:
    """base.yaml <- profiles/<profile>.yaml <- file <- overrides, then validated."""
    cfg = _read_yaml(CONFIG_DIR / "base.yaml")
    if profile is not None:
        if profile not in PROFILES:
            raise ConfigError(f"unknown profile '{profile}' (choose from {', '.join(PROFILES)})")
        cfg = merge(cfg, _read_yaml(CONFIG_DIR / "profiles" / f"{profile}.yaml"))
    if file is not None:
        cfg = merge(cfg, _read_yaml(Path(file)))
    if overrides:
        extra = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
        cfg = merge(cfg, extra)
    validate(cfg)
    return cfg


_CHOICES = {
    ("model", "residual"): ("once", "twice"),
    ("model", "bp_attention"): ("pixels", "tokens"),
    ("loss", "cl_variant"): ("early", "late"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("stage2", "ema"): (None, "mse", "kl"),
}
_POSITIVE_INT = [("data", "image_size"), ("model", "hidden_dim"), ("model", "n_layers"),
                 ("train", "batch_size"), ("train", "epochs"), ("eval", "batch_size")]
_NON_NEGATIVE = [("data", "K"), ("loss", "fg"), ("loss", "cl"), ("loss", "bg"), ("train", "lr"),
                 ("train", "weight_decay"), ("model", "alpha"), ("model", "beta"),
                 ("model", "fusion_scale")]


# The generator's scene recipes (ehin.data.synthetic.SCENE_RECIPES; a test keeps the two equal), named
# here so that loading a config does not import the generator.
SCENE_RECIPES = ("simple", "cluttered")


def validate(cfg: dict) -> None:
    """Raise ConfigError naming the first bad key."""
    scenes = cfg["synthetic"].get("scenes", "simple")
    if scenes not in SCENE_RECIPES:
        raise ConfigError(f"synthetic.scenes = {scenes!r}: must be one of {SCENE_RECIPES}")
    for (section, key), choices in _CHOICES.items():
        value = cfg[section][key]
        if value not in choices:
            raise ConfigError(f"{section}.{key} = {value!r}: must be one of {choices}")
    for section, key in _POSITIVE_INT:
        value = cfg[section][key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{section}.{key} = {value!r}: must be a positive integer")
    for section, key in _NON_NEGATIVE:
        value = cfg[section][key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or value != value:
            raise ConfigError(f"{section}.{key} = {value!r}: must be a non-negative number")
    if cfg["train"]["batch_size"] < 2 and cfg["loss"]["fg"] > 0:
        raise ConfigError("train.batch_size must be >= 2: L_FG needs in-batch negatives (Eq. 18)")
    sel = cfg["eval"]["select_split"]
    if sel is not None and sel == cfg["eval"]["split"]:
        raise ConfigError(
            f"eval.select_split = eval.split = {sel!r}: checkpoint selection must not use the split it reports"
        )


HASH_IGNORE = ("train.device", "train.threads", "data.num_workers")  # change speed, not results
STAGE2_KEYS = ("stage2", "pseudo")  # sections only pseudo-labels and stage 2 read
# Keys added after results were committed: left out of the hash while at this value, so that the hashes
# of the committed cells (bench.check) stay valid; any other value is hashed as usual.
HASH_OMIT_AT_DEFAULT = {"synthetic.scenes": "simple"}


def config_hash(cfg: Mapping, *, ignore: Iterable[str] = HASH_IGNORE) -> str:
    """A short stable hash of everything that changes results (devices and thread counts excluded)."""
    c = copy.deepcopy(dict(cfg))
    for dotted, default in HASH_OMIT_AT_DEFAULT.items():
        section, key = dotted.split(".")
        if isinstance(c.get(section), dict) and c[section].get(key, default) == default:
            c[section] = {k: v for k, v in c[section].items() if k != key}
    for dotted in ignore:
        node = c
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part, {})
        node.pop(parts[-1], None)
    blob = json.dumps(c, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


def stage1_hash(cfg: Mapping) -> str:
    """The identity of a stage-1 run: config_hash without what only stage 2 reads (STAGE2_KEYS).

    bench names a stage-1 cell by it and the trainer's resume guard compares it, so changing a
    profile's stage-2 or pseudo-label settings neither invalidates nor blocks a stage-1 run."""
    return config_hash(cfg, ignore=HASH_IGNORE + STAGE2_KEYS)


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
