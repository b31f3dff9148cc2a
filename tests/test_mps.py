"""--mps (bench/mps.py): refused in one line where it cannot work, before any cell runs; the daemon's
environment reaches the cells and is taken back afterwards, also after an error.

No machine of CI has NVIDIA's MPS: the lifecycle test stands a small script in for
nvidia-cuda-mps-control that writes down how it was called, which is all bench.mps asks of it."""
import os
import stat

import pytest

from tests.test_cli import _fails_cleanly


def test_mps_outside_the_local_executor_is_one_line(tmp_path, capsys):
    from bench.run import main

    _fails_cleanly(main, ["table6", "--profile", "smoke", "--executor", "inline", "--mps", "--results",
                          str(tmp_path / "res")], capsys, "--mps is for --executor local")
    assert not (tmp_path / "res" / "store.jsonl").exists()


def test_mps_without_its_daemon_is_one_line_before_any_cell(tmp_path, capsys, monkeypatch):
    from bench.testbed import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-cuda-mps-control here
    _fails_cleanly(main, ["--profile", "smoke", "--seeds", "1", "--rows", "refcoco", "--mps", "--results",
                          str(tmp_path / "res"), "--out", str(tmp_path / "out")], capsys,
                   "nvidia-cuda-mps-control is not on PATH")
    assert not (tmp_path / "res").exists()


def test_mps_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    from bench.run import main

    _stand_in_control(tmp_path, monkeypatch)
    monkeypatch.setattr("bench.mps.cuda_available", lambda: False)
    _fails_cleanly(main, ["table6", "--profile", "smoke", "--mps", "--results", str(tmp_path / "res")], capsys,
                   "--mps needs a CUDA GPU")


def _stand_in_control(tmp_path, monkeypatch):
    calls = tmp_path / "calls.txt"
    script = tmp_path / "bin" / "nvidia-cuda-mps-control"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\nread line || line=""\necho "$* [$line] $CUDA_MPS_PIPE_DIRECTORY" >> {calls}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_the_daemon_serves_the_block_and_quits_after_an_error(tmp_path, monkeypatch):
    from bench.mps import mps_daemon

    calls = _stand_in_control(tmp_path, monkeypatch)
    monkeypatch.setattr("bench.mps.cuda_available", lambda: True)
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    with pytest.raises(RuntimeError, match="a cell broke"):
        with mps_daemon() as folder:
            pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
            assert pipe == str(folder / "pipe") and os.path.isdir(pipe)  # what the cells' processes inherit
            raise RuntimeError("a cell broke")
    started, quit_ = calls.read_text().splitlines()
    assert started.startswith("-d ") and started.endswith(pipe)
    assert quit_.startswith(" [quit]") and quit_.endswith(pipe)  # quit sent to the same daemon
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and not folder.exists()


def test_a_sigterm_in_the_block_still_quits_the_daemon(tmp_path, monkeypatch):
    """timeout(1) and scancel send SIGTERM, which would otherwise end Python without its `finally`."""
    import signal

    from bench.mps import mps_daemon

    calls = _stand_in_control(tmp_path, monkeypatch)
    monkeypatch.setattr("bench.mps.cuda_available", lambda: True)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        with mps_daemon():
            os.kill(os.getpid(), signal.SIGTERM)
    assert exc.value.code == 128 + signal.SIGTERM
    assert [line.split(" ")[0] for line in calls.read_text().splitlines()] == ["-d", ""]  # started, then quit
    assert signal.getsignal(signal.SIGTERM) is before


def test_perf_mps_needs_packed_processes(tmp_path, capsys, monkeypatch):
    from bench.perf import main

    _fails_cleanly(main, ["--device", "cpu", "--size", "small", "--mps"], capsys, "--procs N")
    monkeypatch.setenv("PATH", str(tmp_path))
    _fails_cleanly(main, ["--device", "cpu", "--size", "small", "--procs", "2", "--mps"], capsys,
                   "nvidia-cuda-mps-control is not on PATH")
