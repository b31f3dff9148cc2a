"""The typed config (issue 19): every base.yaml key validated once, one hash, old configs still read."""
from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

import pytest
import yaml

from ehin.config import (CONFIG_DIR, Config, ConfigError, ModelConfig, config_hash, load_config, section,
                         validate)

BASE = yaml.safe_load((CONFIG_DIR / "base.yaml").read_text())
KEYS = [f"{sec}.{key}" for sec, node in BASE.items() for key in node]


def test_the_dataclasses_mirror_base_yaml_exactly():
    """Same sections and keys in the same order: a key added to base.yaml needs its field (and rule)."""
    typed = {name: [f.name for f in fields(cls)] for name, cls in get_type_hints(Config).items()}
    assert typed == {sec: list(node) for sec, node in BASE.items()}


def test_every_profile_and_base_yaml_validate_and_round_trip():
    for profile in (None, "smoke", "synthetic", "paper"):
        cfg = load_config(profile=profile)
        assert validate(cfg).to_dict() == cfg


@pytest.mark.parametrize("key", KEYS)
def test_a_wrong_type_for_any_key_is_a_config_error_naming_it(key):
    # A list is the wrong type for every key (strings, numbers, flags, nullable ones alike).
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} = \[1, 2\]: must be"):
        load_config(overrides={key: [1, 2]})


@pytest.mark.parametrize("key, value, says", [
    ("model.alpha", -0.1, ">= 0"), ("model.n_layers", 0, ">= 1"), ("model.hidden_dim", 1.5, "an integer"),
    ("train.amp", 1, "true or false"), ("train.lr", True, "a number"), ("train.threads", 0, ">= 1"),
    ("stage2.ema_decay", 1.5, "in [0, 1]"), ("model.logit_scale_init", 0, "> 0"),
    ("model.residual", "thrice", "one of"), ("backbone.dense", "cls", "one of"),
    ("data.dataset", None, "must be set"), ("model.alpha", float("nan"), "a number"),
])
def test_ranges_and_choices(key, value, says):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} = .*{re.escape(says)}"):
        load_config(overrides={key: value})


def test_nullable_keys_take_null_and_ints_are_numbers():
    cfg = load_config(overrides={"train.threads": None, "eval.max_items": None, "train.lr": 1})
    assert validate(cfg).train.lr == 1 and cfg["train"]["lr"] == 1  # checked, not converted: the hash sees 1


def test_dense_modes_match_the_backbone():
    from ehin.clip_model import DENSE_MODES
    from ehin.config import DENSE_MODES as NAMED

    assert NAMED == DENSE_MODES


def test_load_config_takes_dotted_nested_and_string_overrides_alike():
    a = load_config(profile="smoke", overrides={"model.alpha": 0.2})
    b = load_config(profile="smoke", overrides={"model": {"alpha": 0.2}})
    c = load_config(profile="smoke", overrides=["model.alpha=0.2"])
    assert a == b == c and a["model"]["alpha"] == 0.2


def test_one_hash_function_for_both_conventions():
    cfg = load_config(profile="smoke")
    moved = load_config(profile="smoke", overrides={"stage2.lr": 0.5})
    assert config_hash(cfg, stage="1") == config_hash(moved, stage="1")
    assert config_hash(cfg) != config_hash(moved)
    assert config_hash(cfg, stage="1") != config_hash(cfg)
    with pytest.raises(ValueError):
        config_hash(cfg, stage="2")


def test_speed_levers_leave_the_hash_alone():
    """Device, threads, loader workers, channels-last, fused AdamW and torch.compile change speed (and float
    rounding), not what a run means: a cell run with them resumes and is compared as the same cell."""
    cfg = load_config(profile="gpu")
    fast = load_config(profile="gpu", overrides={"train.channels_last": True, "train.fused_adamw": True,
                                                 "train.compile": "reduce-overhead",
                                                 "train.threads": 4, "data.num_workers": 2, "train.device": "cpu"})
    assert config_hash(cfg) == config_hash(fast) and config_hash(cfg, stage="1") == config_hash(fast, stage="1")
    assert config_hash(cfg) != config_hash(load_config(profile="gpu", overrides={"train.amp": True}))
    # the CRF's processes too: a Stage-2 chain labels with as many as a machine has cores
    assert config_hash(cfg) == config_hash(load_config(profile="gpu", overrides={"pseudo.workers": 14}))
    assert config_hash(cfg) != config_hash(load_config(profile="gpu", overrides={"pseudo.crf_iterations": 5}))


def test_compile_takes_torch_compiles_modes_only():
    for mode in (None, "default", "reduce-overhead", "max-autotune"):
        assert load_config(profile="smoke", overrides={"train.compile": mode})["train"]["compile"] == mode
    with pytest.raises(ConfigError, match="train.compile = 'graphs': must be one of"):
        load_config(profile="smoke", overrides={"train.compile": "graphs"})


def test_committed_cell_hashes_are_unchanged():
    """Every cell's hash equals the one its committed record carries (reports/*/cells.json and the
    smoke baselines), which CI compares exactly."""
    from bench.run import build_specs
    from bench.sweeps import load_sweep

    reports = Path(__file__).parent.parent / "reports"
    baselines = json.loads((reports / "baselines" / "smoke.json").read_text())
    for table, rows in baselines["tables"].items():
        specs = {s.row: s for s in build_specs(load_sweep(table), "smoke", 1, Path("/r"))}
        for row, entry in rows.items():
            assert specs[row].config_hash == entry["config_hash"], (table, row)
            # the spec carries the config its hash names: the job runs exactly that
            stage = "1" if specs[row].stage == "1" else None
            assert config_hash(specs[row].config, stage=stage) == entry["config_hash"]


def test_committed_tables_name_hashes_the_code_still_gives():
    """Every config hash a committed table names (reports/**/cells.json's header, per row) is one its row's
    cells get now, with the --set the table ran with: a change that moved them (session 44's first way of
    leaving pseudo.workers out of the hash moved Table 10's, whose cells hash the pseudo section) leaves
    those records out of their table at the next render."""
    from bench.run import build_specs
    from bench.sweeps import load_sweep
    from ehin.config import parse_assignments

    tables = sorted((Path(__file__).parent.parent / "reports").rglob("cells.json"))
    assert len(tables) >= 10
    for path in tables:
        header = json.loads(path.read_text())["header"]
        seeds = max(header["seeds"] or [0]) + 1
        specs = build_specs(load_sweep(header["table"]), header["profile"], seeds, Path("/r"),
                            extra_overrides=parse_assignments(header.get("set") or []) or None)
        now: dict[str, set[str]] = {}
        for spec in specs:
            now.setdefault(spec.row, set()).add(spec.config_hash)
        for row, hashes in (header.get("config_hashes") or {}).items():
            assert set(hashes) <= now.get(row, set()), (str(path), row)


def test_a_checkpoint_config_of_an_older_layout_still_builds_the_model():
    """Checkpoints carry a plain config dict, possibly from before a key existed: build_model reads
    only the model section (typed), so a config lacking later keys (synthetic.scenes, backbone.dense,
    whole sections) still loads."""
    from ehin.model import build_model

    cfg = load_config(profile="smoke", overrides=["backbone.pretrained=null", "model.hidden_dim=16"])
    old = {k: v for k, v in cfg.items() if k not in ("stage2", "pseudo")}
    old["synthetic"] = {k: v for k, v in cfg["synthetic"].items() if k != "scenes"}
    old["backbone"] = {k: v for k, v in cfg["backbone"].items() if k != "dense"}
    model = build_model(old)
    assert model.hipm.alpha == cfg["model"]["alpha"] and model.vis_proj.out_channels == 16
    assert isinstance(section(old, "model"), ModelConfig)
    with pytest.raises(ConfigError, match="model.alpha"):
        build_model({**old, "model": {**old["model"], "alpha": "0.1"}})


def test_the_cell_spec_carries_its_config_and_the_job_does_not_resolve_it_again(tmp_path, monkeypatch):
    """Resolved once (Sweep.cells), carried by the spec through pickling (local and SLURM executors),
    run as is by run_cell and prepare_prerequisites; the store's records stay without it."""
    import pickle

    import ehin.config
    import ehin.train_stage1
    from bench.jobs import run_cell
    from bench.run import build_specs, prepare_prerequisites
    from bench.sweeps import load_sweep

    (spec,) = build_specs(load_sweep("table7"), "smoke", 1, tmp_path, rows=["alpha=0.2 beta=0.1"])
    assert spec.config["model"]["alpha"] == 0.2 and spec.config["model"]["beta"] == 0.1
    spec = pickle.loads(pickle.dumps(spec))

    def no_resolving(*args, **kwargs):
        raise AssertionError("a job resolved its config again")

    seen = []
    monkeypatch.setattr(ehin.config, "load_config", no_resolving)
    monkeypatch.setattr(ehin.train_stage1, "run", lambda cfg, out, resume, **_: seen.append(cfg) or {"metrics": {}})
    monkeypatch.setattr(ehin.train_stage1, "prepare", seen.append)
    prepare_prerequisites([spec])
    run_cell(spec)
    assert seen == [spec.config, spec.config]
    assert yaml.safe_load((Path(spec.run_dir) / "config.yaml").read_text()) == spec.config
