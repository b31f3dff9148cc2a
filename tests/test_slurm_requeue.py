"""A training cell requeued mid-run on the local SLURM cluster resumes from its epoch checkpoint and
ends bit-identical to an uninterrupted run (issue 18; fixture `slurm_cluster`, tests/slurm_fixture.py).

Two ways a SLURM job is requeued, both tested on the same stage-1 cell through `bench.jobs.CellRunner`,
the callable every executor submits:
- preempted: SLURM sends SIGTERM then USR2 (submitit's `job._interrupt()` does what the scheduler does);
  submitit calls `CellRunner.checkpoint`, pickles the DelayedSubmission it returns and runs
  `scontrol requeue` itself;
- requeued by an operator: `scontrol requeue JOB` kills the running job and queues the same
  submission again.
Either way the new attempt calls the trainer with resume=True, which continues from
<run_dir>/checkpoints/last.pt. Bit-identical needs the same floats in both runs: every job runs under
portable numerics (ehin/numerics.py, set before torch runs a kernel) with one thread.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import submitit
import torch

from bench.jobs import CellRunner, CellSpec
from ehin.config import load_config
from tests.test_slurm_cluster import result_within, sacct_states, wait_while_pending

pytestmark = pytest.mark.slurm

EPOCHS = 8
# The tiny stage-1 config of tests/test_train_stage1.py (random-weight tiny CLIP, 60 scenes), with
# enough epochs that the job is still training when the first epoch's checkpoint appears, and still
# when SLURM kills it KillWait (3 s, bench/slurm/local_cluster.sh) after the requeue's SIGTERM: at about
# 2 s an epoch, 4 epochs once let the first attempt finish and store its record first (CI, session 36).
OVERRIDES = {"backbone.pretrained": None, "synthetic.images": 60, "train.epochs": EPOCHS,
             "eval.max_items": 20, "train.threads": 1, "model.hidden_dim": 32}
START_S = 120       # until the job has written its first epoch
FINISH_S = 300      # until the requeued job has finished


def _spec(root: Path, name: str) -> CellSpec:
    return CellSpec(table="requeue", row=name, seed=0, profile="smoke", stage="1", overrides=OVERRIDES,
                    config=load_config(profile="smoke", overrides=OVERRIDES),
                    config_hash="-", run_dir=str(root / name / "run"), store_root=str(root / name / "store"),
                    cell_id=f"requeue-{name}")


def _executor(cluster, folder: Path) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm")
    ex.update_parameters(timeout_min=10, slurm_partition=cluster.partition, cpus_per_task=1, name="ehin-requeue")
    return ex


def _release_when_pending(job_id: str, timeout_s: float) -> None:
    """Start the requeued job soon: slurmctld holds a requeued job back (BeginTime about two minutes
    ahead), which would only make this test wait. Not at once: slurmd refuses to launch a job in the same
    second as it killed the job's last attempt ("Job credential revoked", "already killed, do not launch
    batch job"; the job then ends FAILED with no second attempt: CI, session 36), so two seconds on."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"],
                               capture_output=True, text=True).stdout.strip()
        if state == "PENDING":
            subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now+2"], check=True)
            return
        if state in ("", "COMPLETED", "FAILED", "CANCELLED"):
            return
        time.sleep(0.2)


def _result_after_requeue(job, timeout_s: float) -> dict:
    """The requeued attempt's result. submitit's watcher polls sacct, which can show the first attempt's
    end (FAILED, its srun step killed) for a moment around the requeue; a watcher that has seen a finished
    state asks no more, and result() then raises while the second attempt runs (CI, session 28). So wait
    for the result file, which only a finished attempt writes."""
    deadline = time.monotonic() + timeout_s
    while not job.paths.result_pickle.exists():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job.job_id)], check=False)
            pytest.fail(f"job {job.job_id}: no result after {timeout_s:.0f} s "
                        f"(sacct: {sacct_states([job.job_id], timeout=0)})")
        time.sleep(0.5)
    return result_within(job, 60)


def _epochs_done(run_dir: Path) -> int:
    log = run_dir / "metrics.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture(scope="module")
def jobs_env(slurm_cluster):
    """Portable numerics in the jobs' environment (sbatch passes the submitter's environment on)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EHIN_PORTABLE_NUMERICS", "1")
    yield slurm_cluster
    mp.undo()


@pytest.fixture(scope="module")
def uninterrupted(jobs_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    from ehin.config import load_config
    from ehin.train_stage1 import prepare

    prepare(load_config(profile="smoke", overrides=[f"{k}={v if v is not None else 'null'}"
                                                    for k, v in OVERRIDES.items()]))  # the scenes, once
    spec = _spec(root, "straight")
    record = result_within(_executor(jobs_env, root).submit(CellRunner(), spec), FINISH_S)
    return spec, record


@pytest.mark.parametrize("how", ["preempted", "operator"])
def test_requeued_cell_resumes_and_ends_bit_identical(jobs_env, uninterrupted, tmp_path, how):
    spec = _spec(tmp_path, how)
    job = _executor(jobs_env, tmp_path).submit(CellRunner(), spec)
    wait_while_pending(job.job_id)  # START_S counts from the job's start, not from a queue behind other tests
    deadline = time.monotonic() + START_S
    # The epoch's checkpoint, not its metrics line: the trainer writes the line first, and a requeue
    # between the two would find nothing to resume from (atomic rename: existing means complete).
    while not (Path(spec.run_dir) / "checkpoints" / "last.pt").exists():
        assert time.monotonic() < deadline, f"job {job.job_id} wrote no epoch in {START_S} s: {job.state}"
        time.sleep(0.2)
    assert _epochs_done(Path(spec.run_dir)) < EPOCHS, "the job finished before it could be requeued"
    t_requeue = time.time()
    if how == "preempted":
        job._interrupt()        # SIGTERM, then USR2: CellRunner.checkpoint, then submitit's scontrol requeue
    else:
        subprocess.run(["scontrol", "requeue", str(job.job_id)], check=True)
    _release_when_pending(job.job_id, START_S)
    record = _result_after_requeue(job, FINISH_S)

    # it was requeued (sacct --duplicates lists the first attempt as REQUEUED) ...
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", str(job.job_id)],
                         capture_output=True, text=True, check=True).stdout
    assert "REQUEUED" in out, out
    assert sacct_states([job.job_id]).get(str(job.job_id)) == "COMPLETED"
    # ... the second attempt resumed from a checkpoint instead of starting over ...
    assert "resuming" in job.stdout(), job.stdout()
    if how == "preempted":  # submitit pickled what CellRunner.checkpoint returned over the submission
        assert job.paths.submitted_pickle.stat().st_mtime >= t_requeue - 1
        assert isinstance(submitit.helpers.DelayedSubmission.load(job.paths.submitted_pickle).function, CellRunner)
    else:                   # an operator's requeue runs the submission as it was
        assert job.paths.submitted_pickle.stat().st_mtime < t_requeue
    # ... and it ends where the uninterrupted run ended, to the bit
    straight_spec, straight = uninterrupted
    assert record["metrics"] == straight["metrics"]
    assert [h["point_mask"] for h in record["history"]] == [h["point_mask"] for h in straight["history"]]
    a = torch.load(Path(straight_spec.run_dir) / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(Path(spec.run_dir) / "checkpoints" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == EPOCHS - 1
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    stored = [json.loads(x) for x in (Path(spec.store_root) / "store.jsonl").read_text().splitlines()]
    assert [r["cell_id"] for r in stored] == [spec.cell_id]     # one record, from the attempt that finished
