"""User errors end the commands in one or two lines and exit 2, without a traceback (ehin/cli.py)."""
import pytest

from ehin.config import ConfigError


def _fails_cleanly(main, argv, capsys, *expected: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert 1 <= len(err.strip().splitlines()) <= 2, err
    for text in expected:
        assert text in err, err
    return err


def test_unknown_config_key_is_one_line(tmp_path, capsys):
    from ehin.train_stage1 import main

    _fails_cleanly(main, ["--profile", "smoke", "--set", "model.alpah=0.2", "--out", str(tmp_path / "run")], capsys,
                   "error: unknown config key 'model.alpah'", "--debug")


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    from ehin.evaluate import main as evaluate_main
    from ehin.predict import main as predict_main

    missing = str(tmp_path / "nope.pt")
    _fails_cleanly(evaluate_main, ["--checkpoint", missing], capsys, "checkpoint not found", missing)
    _fails_cleanly(predict_main, ["--checkpoint", missing, "--image", "x.png", "--text", "red"], capsys,
                   "checkpoint not found")


def test_bad_data_root_is_one_line(tmp_path, capsys):
    from ehin.train_stage1 import main

    _fails_cleanly(main, ["--profile", "smoke", "--set", "data.dataset=refcoco", "--set",
                          f"data.root={tmp_path / 'nowhere'}", "--out", str(tmp_path / "run")], capsys,
                   "data.root", "does not exist")


def test_bench_commands_share_the_handler(tmp_path, capsys):
    from bench.run import main as run_main

    _fails_cleanly(run_main, ["table5", "--profile", "smoke", "--set", "model.alpah=1", "--results",
                              str(tmp_path / "res"), "--dry-run"], capsys, "unknown config key 'model.alpah'")


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from ehin.train_stage1 import main

    argv = ["--profile", "smoke", "--set", "model.alpah=0.2", "--out", str(tmp_path / "run")]
    with pytest.raises(ConfigError):
        main(argv + ["--debug"])
    monkeypatch.setenv("EHIN_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(argv)


def test_a_bug_keeps_its_traceback():
    from ehin.cli import command

    @command
    def main(argv):
        raise KeyError("not a user error")

    with pytest.raises(KeyError):
        main([])


# ---- every command's options: help text with defaults; the default profile ---------------------------

import argparse  # noqa: E402
import importlib  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    """Every `python -m` module of ehin/ and bench/ (a __main__.py, or a file with a __main__ guard)."""
    out = []
    for path in sorted([*ROOT.glob("ehin/**/*.py"), *ROOT.glob("bench/**/*.py")]):
        if path.name == "__main__.py" or 'if __name__ == "__main__":' in path.read_text():
            out.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return out


class _Parsed(Exception):
    """Stops a command where it parses its arguments, with the parser (or the config it asked for)."""


def _parser(module: str, monkeypatch) -> argparse.ArgumentParser:
    def grab(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(_Parsed) as got:
        importlib.import_module(module).main([])
    return got.value.args[0]


def test_the_command_list_is_complete():
    assert {"ehin.train_stage1", "ehin.two_stage", "ehin.diagnostics.scorer_probe", "ehin.pseudo_labels.__main__",
            "ehin.data.fidelity", "bench.run", "bench.search.__main__", "bench.launch_ddp"} <= set(_commands())


@pytest.mark.parametrize("module", _commands())
def test_every_option_has_help_with_its_default(module, monkeypatch):
    """--help tells what each option does and, where it has a default, what that is."""
    missing = []
    for action in _parser(module, monkeypatch)._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        text = (action.help or "").lower()
        has_default = action.default not in (None, False, [], argparse.SUPPRESS)
        if not text or (has_default and "default" not in text):
            missing.append(f"{name} (default {action.default!r}): {action.help!r}")
        if action.dest == "profile" and module.startswith("ehin."):
            assert "default: synthetic" in text, f"{module} --profile: {action.help!r}"
    assert not missing, f"{module}: " + "; ".join(missing)


def _profile_asked(module: str, argv: list[str], monkeypatch) -> tuple[str | None, str | None]:
    """(profile, config file) the command loads its config with, stopping it there."""
    import ehin.config
    import ehin.pretrain_clip

    def spy(file=None, *, profile=None, overrides=None):
        raise _Parsed(profile, file)

    monkeypatch.setattr(ehin.config, "load_config", spy)
    monkeypatch.setattr(ehin.pretrain_clip, "load_config", spy)  # imported at module level there
    with pytest.raises(_Parsed) as got:
        importlib.import_module(module).main(argv)
    return got.value.args


COMMANDS_WITH_PROFILE = [
    ("ehin.train_stage1", ["--out", "OUT"]),
    ("ehin.train_stage2", ["--out", "OUT", "--pseudo", "p.npz"]),
    ("ehin.two_stage", ["--out", "OUT"]),
    ("ehin.evaluate", ["--baselines-only"]),
    ("ehin.data.fidelity", ["--variants", "synth-refcoco"]),
    ("ehin.diagnostics.scorer_probe", []),
    ("ehin.pretrain_clip", []),
]


@pytest.mark.parametrize("module,argv", COMMANDS_WITH_PROFILE, ids=[m for m, _ in COMMANDS_WITH_PROFILE])
def test_commands_default_to_the_synthetic_profile(module, argv, tmp_path, monkeypatch):
    """Without --profile and --config a command runs on the synthetic data (base.yaml alone names
    RefCOCO+, which a fresh machine does not have); --profile wins; a --config file without --profile
    goes over base.yaml alone, as before."""
    argv = [str(tmp_path / a) if a in ("OUT", "p.npz") else a for a in argv]
    assert _profile_asked(module, argv, monkeypatch) == ("synthetic", None)
    assert _profile_asked(module, argv + ["--profile", "smoke"], monkeypatch)[0] == "smoke"
    if module != "ehin.pretrain_clip":  # it takes no --config
        cfg = tmp_path / "c.yaml"
        cfg.write_text("train:\n  epochs: 1\n")
        assert _profile_asked(module, argv + ["--config", str(cfg)], monkeypatch) == (None, str(cfg))


def test_real_data_without_a_root_names_the_fix(tmp_path, capsys):
    """A --config over base.yaml (RefCOCO+) without data.root: one line naming both ways out."""
    from ehin.train_stage1 import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochs: 1\n")
    _fails_cleanly(main, ["--config", str(cfg), "--out", str(tmp_path / "run")], capsys,
                   "data.root is null", "--set data.root=DIR", "--profile synthetic")


def test_printouts_use_the_papers_column_names():
    from ehin.metrics import format_result
    from ehin.pseudo_labels.__main__ import format_quality

    line = format_result("final val", {"iou": 12.5, "overall_iou": 11.0, "point_mask": 40.0, "box_acc": 3.0, "n": 7})
    assert line == "final val: IoU 12.50  mIoU 11.00  PointM 40.00  BoxAcc 3.00  (n=7)"
    table = format_quality({"maps": {"iou": 15.0, "overall_iou": 20.0, "n": 3}, "final": "maps"})
    assert "mIoU" in table.splitlines()[0] and "overall" not in table
