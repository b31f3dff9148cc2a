"""Session fixture `slurm_cluster`: a real single-node SLURM cluster (bench/slurm/local_cluster.sh).

- `EHIN_SLURM_DIR` set (CI starts the cluster there): that cluster is used; `start` is idempotent, so
  it is only (re)started if it is not running, and it is stopped at the end only if this fixture
  started it.
- otherwise a cluster is started in a fresh temp dir and stopped (and the dir removed) at the end.
- where the script says it cannot run here at all (exit 3: not root, apt-get failed, not Debian),
  the tests skip with its reason; any other start failure fails them, with the script's log tail
  (in a temp dir after a second try in a fresh one).

The fixture sets `SLURM_CONF` in `os.environ` (sbatch/squeue/sacct and submitit find the cluster
through it) and yields a `SlurmCluster` with `.dir`, `.partition`, `.slurm_conf`.
The state lives at module level so that however many times the fixture is registered, one process
starts one cluster.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "slurm" / "local_cluster.sh"
CANNOT_RUN_HERE = 3          # local_cluster.sh's exit code for "not root / no apt / not Debian"
START_TIMEOUT_S = 900        # a first start may apt-get install the packages


@dataclass(frozen=True)
class SlurmCluster:
    dir: Path
    partition: str
    slurm_conf: Path
    started_here: bool

    def env(self) -> dict[str, str]:
        """os.environ plus what a client (sbatch, sacct, submitit) needs to reach this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.slurm_conf)}


_state: dict = {"cluster": None, "skip": None, "users": 0, "tmp": None, "old_conf": None}


def _run_script(cmd: str, directory: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), cmd, str(directory)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _reason(proc: subprocess.CompletedProcess) -> str:
    errors = [ln for ln in proc.stderr.splitlines() if "ERROR" in ln]
    return (errors[-1] if errors else (proc.stderr.strip().splitlines() or ["(no output)"])[-1]).strip()


def _exports(stdout: str) -> dict[str, str]:
    env = {}
    for line in stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line[len("export "):].partition("=")
            env[key.strip()] = value.strip()
    return env


def _acquire() -> SlurmCluster:
    if _state["skip"] is not None:
        pytest.skip(_state["skip"])
    if _state["cluster"] is not None:
        _state["users"] += 1
        return _state["cluster"]

    preset = os.environ.get("EHIN_SLURM_DIR")
    if preset:
        directory = Path(preset)
        was_running = (directory / "etc" / "slurm.conf").is_file() and \
            _run_script("status", directory, 60).returncode == 0
    else:
        directory = Path(tempfile.mkdtemp(prefix="ehin-slurm-"))
        _state["tmp"] = directory
        was_running = False

    proc = _run_script("start", directory, START_TIMEOUT_S)
    if proc.returncode not in (0, CANNOT_RUN_HERE) and not preset:
        # Once, under the README's test command (two workers, a training beside it), slurmdbd exited while
        # starting, and the same tests passed when run again (session 30; the cause was not found): one more
        # try, in a fresh dir (fresh ports), before the tests fail. The failure below names the second try.
        _run_script("stop", directory, 120)
        _cleanup_tmp()
        directory = _state["tmp"] = Path(tempfile.mkdtemp(prefix="ehin-slurm-"))
        proc = _run_script("start", directory, START_TIMEOUT_S)
    if proc.returncode == CANNOT_RUN_HERE:
        _state["skip"] = f"local SLURM cluster cannot run here: {_reason(proc)}"
        _cleanup_tmp()
        pytest.skip(_state["skip"])
    if proc.returncode != 0:
        if not was_running:
            _run_script("stop", directory, 120)
        _cleanup_tmp()
        pytest.fail(f"local SLURM cluster failed to start in {directory} (exit {proc.returncode}):\n"
                    f"{proc.stderr[-4000:]}", pytrace=False)

    env = _exports(proc.stdout)
    cluster = SlurmCluster(dir=directory,
                           partition=env.get("EHIN_SLURM_PARTITION", "debug"),
                           slurm_conf=Path(env.get("SLURM_CONF", directory / "etc" / "slurm.conf")),
                           started_here=not was_running)
    _state["old_conf"] = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.slurm_conf)
    _state["cluster"] = cluster
    _state["users"] = 1
    return cluster


def _cleanup_tmp() -> None:
    if _state["tmp"] is not None:
        shutil.rmtree(_state["tmp"], ignore_errors=True)
        _state["tmp"] = None


def _release() -> None:
    _state["users"] -= 1
    if _state["users"] > 0 or _state["cluster"] is None:
        return
    cluster: SlurmCluster = _state["cluster"]
    _state["cluster"] = None
    if _state["old_conf"] is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = _state["old_conf"]
    if cluster.started_here:
        proc = _run_script("stop", cluster.dir, 300)
        if proc.returncode != 0:
            print(f"local_cluster.sh stop {cluster.dir} failed:\n{proc.stderr[-2000:]}")
    _cleanup_tmp()


@pytest.fixture(scope="session")
def slurm_cluster():
    cluster = _acquire()
    try:
        yield cluster
    finally:
        _release()
