"""Real submitit jobs on the local SLURM cluster (fixture `slurm_cluster`, tests/slurm_fixture.py).

Every job runs stdlib functions (pickled by reference) so the worker needs nothing from tests/; the
DDP job runs bench.jobs.DistributedTraining, imported from this repository (PYTHONPATH).
Each wait has its own deadline (a thread around `job.result()`), so a job whose failure submitit
could not see (no sacct record) fails the test instead of hanging the suite.
"""
from __future__ import annotations

import json
import math
import operator
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

pytestmark = pytest.mark.slurm

DEADLINE_S = 120
# The node has the CI machine's 2 CPUs, and the other pytest worker's SLURM tests (the same cluster in CI)
# may hold them: a job may wait this long in the queue before the deadlines below, which count from its start.
QUEUE_S = 600


def no_result_grace(job, seconds: int = 1):
    """submitit waits 15 s for the result pickle of a job that ended without one (slow network
    filesystems); the cluster's filesystem is local, so a second is plenty."""
    job._results_timeout_s = seconds
    return job


def result_within(job, timeout: float = DEADLINE_S, *, tasks: bool = False):
    """job.result() (job.results(), every task's, with `tasks`) in a daemon thread; returns the value /
    re-raises its exception, or fails the test if it has not returned after `timeout` seconds."""
    box: dict = {}
    wait_while_pending(job.job_id)

    def target():
        try:
            box["value"] = job.results() if tasks else job.result()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        subprocess.run(["scancel", str(job.job_id)], check=False)
        pytest.fail(f"job {job.job_id}: result() still waiting after {timeout:.0f} s "
                    f"(sacct: {sacct_states([job.job_id], timeout=0)})")
    if "error" in box:
        raise box["error"]
    return box["value"]


def sacct_states(job_ids, timeout: float = 30) -> dict[str, str]:
    """JobID -> State of the allocations (not the steps) `job_ids` ("12", or "12_0" for an array
    task), as sacct reports them. Records reach slurmdbd asynchronously, so this waits (up to
    `timeout`) until every one of them is listed in a final state, then returns what sacct says."""
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}
    job_ids = [str(j) for j in job_ids]
    deadline = time.monotonic() + timeout
    while True:
        cmd = ["sacct", "-n", "-P", "-X", "-o", "JobID,State"]
        for jid in job_ids:
            cmd += ["-j", jid]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        states = {}
        for line in out.splitlines():
            jid, _, state = line.partition("|")
            states[jid] = state.split()[0] if state else ""   # "CANCELLED by 0" -> "CANCELLED"
        if all(states.get(j) in final for j in job_ids) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def squeue_state(job_id) -> str:
    return subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True,
                          text=True, check=False).stdout.strip()


def wait_while_pending(job_id, timeout: float = QUEUE_S) -> None:
    """Return once the job has left the queue (running, or already over); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while squeue_state(job_id) == "PENDING":
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job_id)], check=False)  # not left queued for the tests after
            pytest.fail(f"job {job_id} still pending after {timeout:.0f} s")
        time.sleep(0.2)


@pytest.fixture
def executor(slurm_cluster, tmp_path):
    ex = submitit.AutoExecutor(folder=str(tmp_path / "%j"), cluster="slurm")
    ex.update_parameters(timeout_min=5, slurm_partition=slurm_cluster.partition, cpus_per_task=1,
                         name="ehin-test")
    return ex


def test_cluster_is_up(slurm_cluster):
    assert os.environ["SLURM_CONF"] == str(slurm_cluster.slurm_conf)
    assert slurm_cluster.slurm_conf.is_file()
    out = subprocess.run(["sinfo", "-h", "-p", slurm_cluster.partition, "-o", "%T"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out and out[0] in {"idle", "mixed", "allocated", "completing"}, out


def test_job_returns_value(executor):
    job = executor.submit(operator.mul, 6, 7)
    assert isinstance(job, submitit.SlurmJob)
    assert result_within(job) == 42
    # it really ran as that SLURM job
    job2 = executor.submit(os.getenv, "SLURM_JOB_ID")
    assert result_within(job2) == str(job2.job_id)


def test_map_array_returns_every_result(executor):
    jobs = executor.map_array(operator.add, [1, 2, 3], [10, 20, 30])
    assert len(jobs) == 3
    assert len({j.job_id.split("_")[0] for j in jobs}) == 1          # one array
    assert [result_within(j) for j in jobs] == [11, 22, 33]
    states = sacct_states([j.job_id for j in jobs])
    assert {j.job_id: states.get(j.job_id) for j in jobs} == {j.job_id: "COMPLETED" for j in jobs}, states


def test_raising_job_surfaces_its_exception(executor):
    job = executor.submit(math.sqrt, -1.0)
    with pytest.raises(FailedJobError, match="math domain error"):
        result_within(job)
    # submitit pickles the traceback as the job's result, then re-raises: the step exits non-zero
    assert sacct_states([job.job_id]).get(job.job_id) == "FAILED"


def test_hard_killed_job_fails_through_sacct(executor):
    # os._exit: the worker dies without writing a result, only sacct can tell submitit it is over
    job = no_result_grace(executor.submit(os._exit, 3))
    with pytest.raises(UncompletedJobError, match="FAILED"):
        result_within(job)
    assert sacct_states([job.job_id]).get(job.job_id) == "FAILED"


def test_scancelled_job_fails_through_sacct(executor):
    job = no_result_grace(executor.submit(time.sleep, 300))
    wait_while_pending(job.job_id)
    deadline = time.monotonic() + 60
    while (state := squeue_state(job.job_id)) != "RUNNING":
        assert time.monotonic() < deadline, f"job {job.job_id} never started: {state}"
        time.sleep(0.2)
    job.cancel(check=True)
    with pytest.raises(UncompletedJobError, match="CANCELLED"):
        result_within(job)
    assert sacct_states([job.job_id]).get(job.job_id) == "CANCELLED"


def test_sacct_lists_the_jobs(executor, slurm_cluster):
    job = executor.submit(operator.neg, 5)
    assert result_within(job) == -5
    # slurmctld sends job records to slurmdbd asynchronously: right after the end, sacct may
    # still show a provisional record (name "allocation", no partition) for a few seconds
    expected = ["ehin-test", slurm_cluster.partition, "COMPLETED", "0:0"]
    deadline = time.monotonic() + 30
    while True:
        out = subprocess.run(["sacct", "-n", "-P", "-o", "JobID,JobName,Partition,State,ExitCode",
                              "-j", str(job.job_id)], capture_output=True, text=True, check=True).stdout
        rows = [line.split("|") for line in out.splitlines()]
        top = [r for r in rows if r[0] == str(job.job_id)]
        if (top and top[0][1:] == expected) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert top and top[0][1:] == expected, out
    assert any(r[0].startswith(f"{job.job_id}.") for r in rows), out   # its steps too


def test_ddp_training_as_one_job_of_two_tasks(slurm_cluster, tmp_path, monkeypatch):
    """bench.executors.submit_distributed: one job of 1 node x 2 tasks (1 CPU each, gloo) trains the tiny
    stage 1 of tests/test_ddp.py; each task is one DDP rank, from the environment submitit exports."""
    from bench.executors import SlurmOptions, submit_distributed
    from ehin.config import load_config
    from tests.test_ddp import TINY

    repo = str(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    cfg = load_config(profile="smoke", overrides=TINY)
    opts = SlurmOptions(partition=slurm_cluster.partition, time_min=5, cpus_per_task=1, tasks_per_node=2)
    job = no_result_grace(submit_distributed("1", cfg, tmp_path / "run", opts))
    ranks = result_within(job, 300, tasks=True)  # one result per task, in rank order
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["metrics"]["n"] == 16 and ranks[1]["metrics"] == {}  # rank 0 alone evaluates
    assert json.loads((tmp_path / "run" / "result.json").read_text())["world_size"] == 2
    assert sacct_states([job.job_id]).get(job.job_id) == "COMPLETED"
