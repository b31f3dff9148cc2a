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
