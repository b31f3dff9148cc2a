"""bench.search end to end on tiny trials: parallel local workers with pruning, a worker killed
mid-trial (SIGKILL) and retried, inline + sqlite storage, continuing a study, SLURM workers."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from bench.search import (FileHeartbeat, SearchError, budget_used, check_selection_split, enqueue_defaults,
                          list_spaces, load_space, main, open_storage, validate_space)
from ehin.config import PROFILES, load_config

# ~1 s per epoch: random-weight tiny CLIP, 40 scenes, 40 val expressions, 1 thread.
TINY = ["backbone.pretrained=null", "synthetic.images=40", "train.epochs=2", "eval.max_items=40",
        "train.threads=1", "model.hidden_dim=32"]

# lr up to 30 wrecks training, so MedianPruner (after 2 complete trials, from epoch 1) has clear
# losers to stop; the other params make sure several kinds of distribution reach the trainer.
SPACE = {
    "title": "tiny test space",
    "metric": "iou",
    "final_split": "testA",
    "params": {
        "train.lr": {"type": "float", "low": 1.0e-3, "high": 30.0, "log": True},
        "model.alpha": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
        "model.n_layers": {"type": "int", "low": 1, "high": 3},
        "loss.cl_variant": {"type": "categorical", "choices": ["early", "late"]},
    },
    "sampler": {"n_startup_trials": 4},
    "pruner": {"n_startup_trials": 2, "n_warmup_steps": 0},
}


@pytest.fixture
def space(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return path


def args(space, tmp, *extra, trials, study="s", sets=TINY):
    a = [str(space), "--profile", "smoke", "--trials", str(trials), "--study", study,
         "--results", str(tmp / "res"), "--reports", str(tmp / "rep"), "--heartbeat", "1", "--grace", "3"]
    for s in sets:
        a += ["--set", s]
    return a + list(extra)


def journal(tmp, study="s") -> optuna.Study:
    storage = open_storage(str(tmp / "res" / study / "journal.log"), heartbeat_s=1, grace_s=3, max_retry=3)
    return optuna.load_study(study_name=study, storage=storage)


def states(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def test_two_local_workers_prune_and_report(tmp_path):
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump({**SPACE, "enqueue_defaults": True}))
    t0 = time.time()
    # --grace 30: nothing is killed here, and a worker stalled for 3 s on a loaded machine between its heartbeat's
    # last beat and its tell would have its trial failed by the other worker
    assert main(args(space, tmp_path, "--executor", "local", "--workers", "2", "--no-final", "--grace", "30",
                     trials=10)) == 0
    print(f"10 trials, 2 local workers: {time.time() - t0:.1f}s")
    study = journal(tmp_path)
    n = states(study)
    assert n.get("COMPLETE", 0) + n.get("PRUNED", 0) == 10 and set(n) <= {"COMPLETE", "PRUNED"}, n
    assert n.get("PRUNED", 0) >= 1, n
    trials = study.get_trials()
    # Trial 0 measured the profile's defaults (enqueue_defaults); the others were sampled.
    assert trials[0].params == {"train.lr": 1e-3, "model.alpha": 0.1, "model.n_layers": 2, "loss.cl_variant": "early"}
    # Both workers ran trials, and at the same time.
    assert {t.user_attrs["worker"]["index"] for t in trials} == {0, 1}
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "no two trials overlapped"
    # Each trial is its own run with its own resolved config.
    for t in trials:
        cfg = yaml.safe_load((tmp_path / "res" / "s" / f"trial-{t.number}" / "config.yaml").read_text())
        assert cfg["train"]["lr"] == t.params["train.lr"] and cfg["model"]["n_layers"] == t.params["model.n_layers"]
        assert cfg["eval"]["split"] == "val" and cfg["model"]["hidden_dim"] == 32
        if t.state == TrialState.PRUNED:
            assert t.last_step is None or t.last_step < 2  # stopped before the last epoch (None: before any)
    out = tmp_path / "rep" / "search" / "s"
    for f in ("best.json", "best.md", "trials.csv", "trials.md", "history.png", "intermediate.png", "slices.png",
              "summary.md"):
        assert (out / f).stat().st_size > 0, f
    best = json.loads((out / "best.json").read_text())
    assert best["trial"] == study.best_trial.number and best["value"] == pytest.approx(study.best_value)
    assert best["counts"]["complete"] + best["counts"]["pruned"] == 10
    assert (out / "trials.md").read_text().count("PRUNED") == n["PRUNED"]
    # Importances need >= 2 complete trials; drawn or explained, never a crash.
    assert (out / "importances.png").exists() or "importances.png" in (out / "summary.md").read_text()
    assert "evaluation tris-validate." in (out / "summary.md").read_text()  # the metrics protocol is named


def _reported_epochs(load) -> int:
    import sqlalchemy.exc

    try:
        trials = load().get_trials(deepcopy=False)
    except (KeyError, sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):
        # the study (or the database's schema) is not there yet, or the worker is writing it right now
        return 0
    return len(trials[0].intermediate_values) if trials else 0


@pytest.mark.parametrize("backend", ["journal", "sqlite"])
def test_killed_worker_trial_is_failed_and_retried(tmp_path, space, backend):
    """SIGKILL a worker mid-trial: the study stays readable, and the next worker marks the trial
    FAIL once its heartbeat is older than the grace period and reruns its params to completion.
    The journal uses bench.search's heartbeat files, sqlite Optuna's own RDB heartbeat."""
    sets = [s for s in TINY if not s.startswith("train.epochs")] + ["train.epochs=3"]
    extra = ["--no-final"]
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'search.db'}"
        extra += ["--storage", url]

        def load():
            if not (tmp_path / "search.db").exists():
                raise KeyError("no db yet")
            # open_storage: the poller and the starting worker may both create the schema (see its retries)
            return optuna.load_study(study_name="s", storage=open_storage(url, heartbeat_s=1, grace_s=3,
                                                                          max_retry=3))
    else:
        def load():
            if not (tmp_path / "res" / "s" / "journal.log").exists():
                raise KeyError("no journal yet")
            return journal(tmp_path)
    cmd = [sys.executable, "-m", "bench.search", *args(space, tmp_path, *extra, trials=1, sets=sets)]
    log = open(tmp_path / "worker.log", "w")
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline and not _reported_epochs(load):
        assert proc.poll() is None, ("the search ended before it could be killed:\n"
                                     + (tmp_path / "worker.log").read_text()[-2000:])
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-trial: 1 of 3 epochs done
    proc.wait()

    (killed,) = load().get_trials()
    assert killed.state == TrialState.RUNNING and killed.intermediate_values  # readable, left running

    assert main(args(space, tmp_path, *extra, trials=1, sets=sets)) == 0
    study = load()
    first, retry = study.get_trials()
    assert first.state == TrialState.FAIL
    assert retry.state == TrialState.COMPLETE and retry.params == first.params
    assert retry.system_attrs["failed_trial"] == 0
    assert budget_used(study.get_trials()) == 1
    assert len((tmp_path / "res" / "s" / "trial-1" / "metrics.jsonl").read_text().splitlines()) == 3  # a full run


def test_inline_sqlite_continue_and_final(tmp_path, space):
    sets = [s for s in TINY if not s.startswith("train.epochs")] + ["train.epochs=1"]
    url = f"sqlite:///{tmp_path / 'search.db'}"
    a = lambda trials, *extra: args(space, tmp_path, "--storage", url, *extra, trials=trials, sets=sets)  # noqa: E731
    assert main(a(2, "--no-final")) == 0
    study = optuna.load_study(study_name="s", storage=url)
    first = [(t.number, t.params, t.state) for t in study.get_trials()]
    assert len(first) == 2
    # A rerun continues the study up to the new budget; the finished trials stay as they were.
    assert main(a(3, "--no-final")) == 0
    trials = optuna.load_study(study_name="s", storage=url).get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    assert [(t.number, t.params, t.state) for t in trials[:2]] == first
    # Same budget again: nothing to run; the final re-evaluation trains best and default on testA.
    assert main(a(3, "--final-seeds", "1")) == 0
    assert len(optuna.load_study(study_name="s", storage=url).get_trials()) == 3
    final = (tmp_path / "rep" / "search" / "s" / "final.md").read_text()
    assert "testA" in final and "best (trial" in final and "profile default" in final
    runs = sorted((tmp_path / "res" / "s" / "final" / "runs").glob("*/seed0-*/config.yaml"))
    assert len(runs) == 2
    assert all(yaml.safe_load(p.read_text())["eval"]["split"] == "testA" for p in runs)
    # The same seed gives the same first proposal whatever the storage (journal here).
    assert main(args(space, tmp_path, "--no-final", trials=1, study="j", sets=sets)) == 0
    assert journal(tmp_path, "j").get_trials()[0].params == first[0][1]
    # Continuing with another fixed config is refused instead of mixing two searches.
    with pytest.raises(SystemExit):
        main(a(4, "--no-final", "--set", "model.beta=0.2"))


@pytest.mark.slurm
def test_slurm_workers(tmp_path, space, slurm_cluster):
    sets = [s for s in TINY if not s.startswith("train.epochs")] + ["train.epochs=1"]
    rc = main(args(space, tmp_path, "--executor", "slurm", "--workers", "2", "--slurm-cpus", "1",
                   "--slurm-time", "10", "--slurm-partition", slurm_cluster.partition, "--no-final",
                   trials=3, sets=sets))
    assert rc == 0
    study = journal(tmp_path)
    n = states(study)
    assert n.get("COMPLETE", 0) + n.get("PRUNED", 0) == 3, n
    assert list((tmp_path / "res" / "s" / "submitit").glob("*/*_log.err"))  # ran as SLURM jobs


# ---- fast checks (no training) ----

def test_spaces_in_repo_resolve_under_every_profile():
    assert "default" in list_spaces()
    for name in list_spaces():
        for profile in PROFILES:
            space = load_space(name).for_profile(profile)
            validate_space(space, profile, space.fixed)
    default = load_space("default")
    for key in ("model.alpha", "model.beta", "model.n_layers", "data.K", "train.batch_size", "loss.fg", "loss.cl",
                "loss.bg", "train.lr", "model.fusion_scale", "loss.cl_variant"):
        assert key in default.params, key
    assert load_space("default").for_profile("paper").params["train.lr"].high <= 1e-4


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "unknown key"),
    ({"params": {"model.alpha": {"type": "float", "low": 0, "high": 1, "log": True}}}, "log scale"),
    ({"params": {"model.alhpa": {"type": "float", "low": 0.1, "high": 1}}}, "not a config key"),
    ({"params": {"train.batch_size": {"type": "int", "low": 1, "high": 4}}}, "batch_size"),
    ({"fixed": {"train.lr": 0.1}}, "both fixed and searched"),
    ({"metric": "accuracy"}, "metric"),
])
def test_bad_spaces_fail_at_load(tmp_path, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**SPACE, **change}))
    with pytest.raises(SearchError, match=message):
        space = load_space(path)
        validate_space(space, "smoke", space.fixed)


def test_test_split_is_never_used_for_selection(tmp_path, space, capsys):
    check_selection_split(load_config(profile="smoke"))
    for key in ("eval.split=testA", "eval.select_split=testB"):
        with pytest.raises(SearchError, match="test split"):
            check_selection_split(load_config(profile="smoke", overrides=[key]))
        with pytest.raises(SystemExit):
            main(args(space, tmp_path, "--set", key, trials=1))
        assert "test split" in capsys.readouterr().err
    assert not (tmp_path / "res").exists()  # refused before anything ran


def test_budget_counts_retries_once():
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}

    def trial(state, **system_attrs):
        value = 1.0 if state == TrialState.COMPLETE else None
        return optuna.trial.create_trial(state=state, value=value, params={"x": 0.5}, distributions=dist,
                                         system_attrs=system_attrs)

    study = optuna.create_study()
    for t in (trial(TrialState.COMPLETE), trial(TrialState.PRUNED), trial(TrialState.FAIL),  # 2: killed
              trial(TrialState.FAIL),                                                       # 3: an error
              trial(TrialState.WAITING, failed_trial=2, retry_history=[2])):
        study.add_trial(t)
    assert budget_used(study.get_trials()) == 3  # complete, pruned, the error; the retry waits
    study.ask()  # picks up the waiting retry
    assert budget_used(study.get_trials()) == 4


def test_stale_running_trial_is_failed_and_enqueued(tmp_path):
    storage = open_storage(str(tmp_path / "journal.log"), heartbeat_s=1, grace_s=1, max_retry=1)
    study = optuna.create_study(study_name="h", storage=storage, direction="maximize")
    heart = FileHeartbeat(tmp_path / "heartbeats", interval_s=1, grace_s=1, max_retry=1)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    heart.beat(trial.number)
    assert heart.fail_stale(study) == []  # fresh heartbeat: alive
    os.utime(tmp_path / "heartbeats" / f"trial-{trial.number}", (time.time() - 10, time.time() - 10))
    assert heart.fail_stale(study) == [0]
    failed, retry = study.get_trials()
    assert failed.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.params == failed.params and retry.system_attrs["failed_trial"] == 0


def test_defaults_are_enqueued_as_the_first_trial():
    space = load_space("default").for_profile("smoke")
    base = validate_space(space, "smoke", {"train.lr": 0.05})  # outside the space's lr range
    study = optuna.create_study(direction="maximize")
    params = enqueue_defaults(study, space, base)
    assert params["model.alpha"] == 0.1 and params["model.beta"] == 0.05 and params["model.n_layers"] == 2
    assert params["data.K"] == 3 and params["train.batch_size"] == 24  # the smoke profile's K
    assert "train.lr" not in params  # left to the sampler
    (waiting,) = study.get_trials()
    assert waiting.state == TrialState.WAITING and waiting.system_attrs["fixed_params"] == params


def test_failing_trials_use_the_budget_and_are_reported(tmp_path, space, capsys):
    # No CUDA here: every trial raises at start. Errors count towards the budget (no endless
    # retrying of a broken config), the trial keeps its error, and the search exits 1.
    assert main(args(space, tmp_path, "--no-final", "--set", "train.device=cuda", trials=2)) == 1
    trials = journal(tmp_path).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    assert all("no CUDA device" in t.user_attrs["error"] for t in trials)
    assert (tmp_path / "res" / "s" / "trial-0" / "error.txt").exists()
    assert "no trial completed" in capsys.readouterr().err


def test_rdb_storage_opened_while_another_process_creates_its_schema(tmp_path, monkeypatch):
    """Two processes opening a new database at once both create Optuna's schema and the loser's insert
    of the schema version raises IntegrityError (seen in CI: the kill test's poller against a starting
    worker). open_storage opens it again instead of failing the worker."""
    import sqlalchemy.exc

    from bench import search

    real, calls = optuna.storages.RDBStorage, []

    def racing(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE"))
        return real(*a, **k)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    storage = search.open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_s=5, grace_s=20, max_retry=1)
    assert len(calls) == 2 and isinstance(storage, real)


def _open_at_barrier(url: str, barrier) -> str:
    from bench.search.study import open_storage

    barrier.wait()
    try:
        open_storage(url, heartbeat_s=60, grace_s=120, max_retry=None)
        return "opened"
    except Exception as e:  # reported, so the assertion names what the loser saw
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"


def test_rdb_storage_opened_by_several_processes_at_once(tmp_path):
    """The real race, no mock: four processes released together on a new sqlite database. Before the
    fix about one round in five failed a worker with "table studies already exists" (seen in CI, where
    the kill test's poller raced its worker); twelve rounds all open it."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    with ctx.Manager() as manager, ctx.Pool(4) as pool:
        for round_ in range(12):
            url = f"sqlite:///{tmp_path / f's{round_}.db'}"
            barrier = manager.Barrier(4)
            assert pool.starmap(_open_at_barrier, [(url, barrier)] * 4) == ["opened"] * 4, round_


def test_rdb_storage_error_that_is_not_a_race_is_raised(tmp_path):
    """Only the schema race is retried: a database that cannot be opened is the user's one clear error."""
    import sqlalchemy.exc

    from bench.search.study import open_storage

    with pytest.raises(sqlalchemy.exc.OperationalError, match="unable to open"):
        open_storage(f"sqlite:///{tmp_path / 'missing' / 's.db'}", heartbeat_s=5, grace_s=20, max_retry=1)


def test_an_interrupted_inline_trial_is_enqueued_again_not_spent(tmp_path, space, monkeypatch):
    """Ctrl-C in an inline search: Optuna fails the running trial, which then counted towards --trials with
    nobody to retry it. It is enqueued again as a killed worker's trial is, so rerunning the command runs it."""
    import ehin.train_stage1

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ehin.train_stage1, "run", interrupted)
    with pytest.raises(SystemExit):  # the CLI's "interrupted" exit
        main(args(space, tmp_path, "--no-final", "--executor", "inline", trials=2))
    trials = journal(tmp_path).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].system_attrs["retry_history"] == [0] and trials[1].params == trials[0].params
    assert budget_used(trials) == 0
