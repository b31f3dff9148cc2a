"""bench.run end to end on tiny cells: store resume, executor independence, kills, failures, SLURM."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.run import main as run_main
from bench.store import ResultStore

ROOT = Path(__file__).resolve().parents[1]

# Seconds per cell: random-weight tiny CLIP, 60 scenes, 1 epoch, 1 thread (numerics independent of cores).
TINY = ["backbone.pretrained=null", "synthetic.images=60", "train.epochs=1", "eval.max_items=40",
        "train.threads=1", "model.hidden_dim=32"]


def args(*extra, results, reports, rows="bg+fg,fg+cl"):
    a = ["table5", "--profile", "smoke", "--rows", rows, "--results", str(results), "--reports", str(reports),
         "--executor", "inline"]  # a later --executor in `extra` wins
    for s in TINY:
        a += ["--set", s]
    return a + list(extra)


def metrics_by_row(results: Path) -> dict:
    return {r["row"]: r["metrics"] for r in ResultStore(results).read()}


def test_inline_run_renders_and_second_run_is_instant(tmp_path, capsys):
    assert run_main(args(results=tmp_path / "res", reports=tmp_path / "rep")) == 0
    out = tmp_path / "rep" / "smoke" / "table5"
    for f in ("table.md", "table.tex", "table.html", "cells.json"):
        assert (out / f).exists(), f
    assert len(ResultStore(tmp_path / "res").read()) == 2
    capsys.readouterr()
    t0 = time.time()
    assert run_main(args(results=tmp_path / "res", reports=tmp_path / "rep")) == 0
    assert "0 to run" in capsys.readouterr().out
    assert len(ResultStore(tmp_path / "res").read()) == 2
    assert time.time() - t0 < 60  # no training happened (generous: rendering imports seaborn)


def test_inline_and_local_executors_agree(tmp_path):
    assert run_main(args(results=tmp_path / "inline", reports=tmp_path / "r1", rows="bg+fg")) == 0
    assert run_main(args("--executor", "local", "--jobs", "1", results=tmp_path / "local", reports=tmp_path / "r2",
                         rows="bg+fg")) == 0
    a, b = metrics_by_row(tmp_path / "inline"), metrics_by_row(tmp_path / "local")
    assert a == b


def test_failed_cell_is_reported_and_sweep_goes_on(tmp_path, capsys):
    # No CUDA here: every cell fails at start, and the sweep reports each with its log, exit code 1.
    rc = run_main(args("--set", "train.device=cuda", results=tmp_path / "res", reports=tmp_path / "rep"))
    assert rc == 1
    err = capsys.readouterr().err
    assert err.count("FAILED") == 2 and "no CUDA device" in err and "error.txt" in err
    assert ResultStore(tmp_path / "res").read() == []
    # The rendered table says "failed" for those rows, not "pending" (issue 18); the others stay pending.
    lines = (tmp_path / "rep" / "smoke" / "table5" / "table.md").read_text().splitlines()
    status = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in lines if line.startswith("| ")}
    assert status["bg+fg"] == status["fg+cl"] == "failed" and status["fg"] == "pending"
    assert run_main(args("--dry-run", results=tmp_path / "res", reports=tmp_path / "rep")) == 0
    assert capsys.readouterr().out.count("[failed]") == 2


def test_kill_midway_then_resume(tmp_path):
    """SIGKILL the sweep while cells run: the store stays readable and a rerun runs only what is missing."""
    res = tmp_path / "res"
    cmd = [sys.executable, "-m", "bench.run"] + args(results=res, reports=tmp_path / "rep",
                                                     rows="bg+fg+cl,bg+fg,bg+cl,fg+cl")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    store = ResultStore(res)
    deadline = time.time() + 300
    while time.time() < deadline and len(store.read()) < 1:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = store.read()
    assert 1 <= len(before) < 4
    assert run_main(args(results=res, reports=tmp_path / "rep", rows="bg+fg+cl,bg+fg,bg+cl,fg+cl")) == 0
    after = store.read()
    assert sorted(r["row"] for r in after) == sorted(["bg+fg+cl", "bg+fg", "bg+cl", "fg+cl"])
    assert after[: len(before)] == before  # finished cells were kept, not rerun


@pytest.mark.slurm
def test_slurm_executor_runs_cells_and_surfaces_failures(tmp_path, slurm_cluster):
    rc = run_main(args("--executor", "slurm", "--slurm-cpus", "1", "--slurm-time", "10",
                       "--slurm-partition", slurm_cluster.partition,
                       results=tmp_path / "res", reports=tmp_path / "rep", rows="bg+fg"))
    assert rc == 0
    recs = ResultStore(tmp_path / "res").read()
    assert len(recs) == 1 and recs[0]["row"] == "bg+fg"
    assert run_main(args("--executor", "inline", results=tmp_path / "inline", reports=tmp_path / "rep2",
                         rows="bg+fg")) == 0
    assert recs[0]["metrics"] == metrics_by_row(tmp_path / "inline")["bg+fg"]
    # A job that fails on the cluster is a failed cell, not a hang.
    rc = run_main(args("--executor", "slurm", "--slurm-cpus", "1", "--slurm-partition", slurm_cluster.partition,
                       "--set", "train.device=cuda", results=tmp_path / "bad", reports=tmp_path / "rep3",
                       rows="bg+fg"))
    assert rc == 1


def test_dry_run_lists_cells(tmp_path, capsys):
    assert run_main(args("--dry-run", results=tmp_path / "res", reports=tmp_path / "rep")) == 0
    out = capsys.readouterr().out
    assert out.count("[todo]") == 2


def test_render_only_renders_what_is_stored_and_runs_nothing(tmp_path, capsys):
    """A sweep run over several sittings: the tables show the stored cells and the rest as pending."""
    res, rep = tmp_path / "res", tmp_path / "rep"
    assert run_main(args(results=res, reports=rep, rows="bg+fg")) == 0
    before = (res / "store.jsonl").read_text()
    (rep / "smoke" / "table5" / "table.md").unlink()
    capsys.readouterr()
    assert run_main(args("--render-only", results=res, reports=rep)) == 0
    assert "1 cells not stored yet: rendered as pending (--render-only)" in capsys.readouterr().out
    assert (res / "store.jsonl").read_text() == before  # nothing ran
    md = (rep / "smoke" / "table5" / "table.md").read_text()
    assert "| fg+cl | pending |" in md and md.count("| 1 | done |") == 1  # bg+fg, from the store
    with pytest.raises(SystemExit):
        run_main(args("--render-only", "--dry-run", results=res, reports=rep))
    assert "--render-only renders without running" in capsys.readouterr().err


def test_unknown_table_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        run_main(["table99"])
    assert "unknown table 'table99'" in capsys.readouterr().err


def test_store_records_are_complete(tmp_path):
    assert run_main(args(results=tmp_path / "res", reports=tmp_path / "rep", rows="bg+fg")) == 0
    (rec,) = ResultStore(tmp_path / "res").read()
    for key in ("table", "row", "seed", "profile", "config_hash", "code_version", "metrics", "history", "timings",
                "host", "device", "finished_at", "run_dir", "cell_id"):
        assert key in rec, key
    cfg = (Path(rec["run_dir"]) / "config.yaml").read_text()
    assert "hidden_dim: 32" in cfg
    json.dumps(rec)


def test_local_cells_get_a_gpu_each_round_robin():
    """submitit's LocalExecutor hides every GPU unless given some (CUDA_VISIBLE_DEVICES=""): on a GPU
    host the local executor gives each cell one, round-robin; on a CPU host it asks for none."""
    from bench.executors import gpu_slot

    assert gpu_slot(0, 0) == {} and gpu_slot(5, 0) == {}
    assert [gpu_slot(k, 2)["visible_gpus"] for k in range(4)] == [(0,), (1,), (0,), (1,)]
    assert all(gpu_slot(k, 3)["gpus_per_node"] == 1 for k in range(3))
    # a cell of 2 ranks (bench.run --ranks 2) gets 2 distinct GPUs, one a rank
    assert [gpu_slot(k, 2, 2)["visible_gpus"] for k in range(3)] == [(0, 1), (0, 1), (0, 1)]
    assert [gpu_slot(k, 4, 2)["visible_gpus"] for k in range(3)] == [(0, 1), (2, 3), (0, 1)]
    assert gpu_slot(0, 4, 2)["gpus_per_node"] == 2


@pytest.mark.parametrize("seeds", ["0", "-1", "two"])
def test_seeds_must_be_positive(tmp_path, capsys, seeds):
    with pytest.raises(SystemExit) as exc:
        run_main(args("--seeds", seeds, "--dry-run", results=tmp_path / "res", reports=tmp_path / "rep"))
    assert exc.value.code == 2
    assert "--seeds: must be a whole number >= 1" in capsys.readouterr().err


def test_unknown_rows_are_an_error_listing_the_rows(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_main(args(results=tmp_path / "res", reports=tmp_path / "rep", rows="bg+fg,bg+fgg"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown row 'bg+fgg'" in err and "bg+fg+cl, bg+fg, bg+cl, fg+cl, bg, fg, cl" in err
    assert not (tmp_path / "rep").exists()


def test_a_table_never_mixes_configs(tmp_path, capsys):
    # The issue-18 case: a one-row run with another setting must not land in the declared table.
    res, rep = tmp_path / "res", tmp_path / "rep"
    assert run_main(args(results=res, reports=rep)) == 0
    cells = tmp_path / "rep" / "smoke" / "table5" / "cells.json"
    first = json.loads(cells.read_text())
    assert first["header"]["left_out"] == []
    shown = {c["row"]: c["mean"] for c in first["cells"] if c["metric"] == "point_mask" and c["mean"] is not None}
    assert set(shown) == {"bg+fg", "fg+cl"}

    assert run_main(args("--set", "train.epochs=2", results=res, reports=rep, rows="fg+cl")) == 0
    other = json.loads(cells.read_text())  # the table of *that* invocation: only its own config
    states = {c["row"]: c["status"] for c in other["cells"]}
    assert states["fg+cl"] == "done" and states["bg+fg"] == "pending"
    assert {r["row"] for r in other["header"]["left_out"]} == {"bg+fg", "fg+cl"}

    capsys.readouterr()
    assert run_main(args(results=res, reports=rep)) == 0  # the declared table again, from the store
    again = json.loads(cells.read_text())
    assert {c["row"]: c["mean"] for c in again["cells"] if c["metric"] == "point_mask" and c["mean"] is not None} == shown
    (left,) = again["header"]["left_out"]
    assert left["row"] == "fg+cl" and left["config_hash"] not in again["header"]["config_hashes"]["fg+cl"]
    md = (tmp_path / "rep" / "smoke" / "table5" / "table.md").read_text()
    assert "left out 1 stored record(s) of other configs or older runs (fg+cl 1)" in md


def test_several_tables_share_one_queue_and_run_a_shared_cell_once(tmp_path, capsys):
    # Table 5's full loss (bg+fg+cl) and Table 6's EHIN are one config: one training, two records.
    res, rep = tmp_path / "res", tmp_path / "rep"
    a = args(results=res, reports=rep, rows="bg+fg+cl,EHIN")
    a[0] = "table5,table6"
    assert run_main(a) == 0
    out = capsys.readouterr().out
    assert "one queue: 1 cells to run for 2 tables (1 more are the same computation as one of them)" in out
    records = {r["table"]: r for r in ResultStore(res).read()}
    assert set(records) == {"table5", "table6"}
    assert records["table6"]["reused_from"] == records["table5"]["cell_id"]
    assert records["table6"]["metrics"] == records["table5"]["metrics"]
    assert len(list(res.glob("runs/*/*/*/checkpoints/last.pt"))) == 1      # trained once
    for table in ("table5", "table6"):
        assert (rep / "smoke" / table / "table.md").exists()                # both rendered


class _StampingRunner:
    """A runner for dispatch's compile groups (picklable for submitit): spec = (name, marker or None, folder).
    It writes NAME.start; a cell with a marker writes it after a pause, as a trainer after its first step."""

    def __call__(self, spec):
        name, marker, folder = spec
        Path(folder, f"{name}.start").write_text(str(time.time()))
        if marker is not None:
            time.sleep(3.0)  # longer than a process start under load: the other group's cell starts meanwhile
            Path(marker).write_text(str(time.time()))
        time.sleep(0.3)
        return {"name": name}

    def label(self, spec):
        return spec[0]

    def error_log(self, spec):
        return None


def test_cells_of_one_compile_group_wait_for_its_first_cell_to_step(tmp_path, monkeypatch):
    """On a GPU host the local executor starts the first cell of each compile group alone and the group's
    other cells once it has stepped (its marker): they then read inductor's cache instead of all compiling
    the same graph at once. Other groups start beside it; a stale marker of an earlier attempt is removed."""
    from bench import executors

    monkeypatch.setattr(executors, "local_gpus", lambda: 1)  # grouping applies on a GPU host only
    monkeypatch.setattr(executors, "gpu_slot", lambda index, n, ranks=1: {})
    marker_a, marker_d = tmp_path / "a.marker", tmp_path / "d.marker"
    marker_a.write_text("stale")
    first = {"a": marker_a, "d": marker_d}
    specs = [(name, first.get(name), str(tmp_path)) for name in "abcd"]
    group = {"a": "k", "b": "k", "c": "k", "d": "j"}
    markers = {"k": marker_a, "j": marker_d}
    out = executors.dispatch(specs, "local", jobs=3, folder=tmp_path / "submitit", poll_s=0.05,
                             runner=_StampingRunner(), compile_group=lambda s: (group[s[0]], markers[group[s[0]]]))
    assert all(o.ok for o in out) and len(out) == 4
    start = {n: float((tmp_path / f"{n}.start").read_text()) for n in "abcd"}
    stepped_a = float(marker_a.read_text())  # rewritten by this run: the stale one was removed first
    assert start["b"] >= stepped_a and start["c"] >= stepped_a  # group k waited for a's first step
    assert start["d"] < stepped_a  # group j did not wait for group k
    # Without a GPU (torch.compile is a CUDA lever) nothing waits.
    monkeypatch.setattr(executors, "local_gpus", lambda: 0)
    for n in "abcd":
        (tmp_path / f"{n}.start").unlink()
    specs = [(name, None, str(tmp_path)) for name in "abc"]
    executors.dispatch(specs, "local", jobs=3, folder=tmp_path / "submitit2", poll_s=0.05, runner=_StampingRunner(),
                       compile_group=lambda s: ("k", tmp_path / "never"))
    assert all((tmp_path / f"{n}.start").exists() for n in "abc")


def test_compile_group_is_the_compiled_graph_not_the_dataset_or_seed(tmp_path):
    """Cells that differ only in dataset, seed or schedule compile one graph; the model or the levers make
    another; no group without train.compile or for a stage-2 cell; the marker is where the trainer writes it."""
    from bench.jobs import compile_group
    from bench.run import build_specs
    from bench.sweeps import load_sweep
    from ehin.train_stage1 import FIRST_STEP

    def groups(sweep, **extra):
        return {(s.row, s.seed): compile_group(s) for s in build_specs(load_sweep(sweep), "smoke", 2, tmp_path, None,
                                                                       extra)}

    control = groups("table9", **{"train.compile": "reduce-overhead"})  # K varies by row there
    plain = groups("table9")
    assert all(g is None for g in plain.values())
    by_row = {}
    for (row, seed), (key, marker) in control.items():
        assert marker.name == FIRST_STEP and marker.parent.name
        by_row.setdefault(row, set()).add(key)
    assert all(len(keys) == 1 for keys in by_row.values())  # the seed does not change the graph
    k_of = {row: row.split("K=")[1] for row in by_row}  # "refcocog K=3": the dataset does not either; K does
    for a in by_row:
        for b in by_row:
            assert (by_row[a] == by_row[b]) == (k_of[a] == k_of[b]), (a, b)
    t2 = groups("table2", **{"train.compile": "reduce-overhead"})  # datasets and splits of one method share it
    methods = {}
    for (row, _), g in t2.items():
        if g is not None:
            methods.setdefault(g[0], []).append(row)
    assert any(len({r.split(" ")[-1] for r in rows}) > 1 for rows in methods.values())


@pytest.fixture
def dispatched(monkeypatch) -> dict:
    """bench.run's dispatch replaced by one that runs nothing and keeps the keyword arguments it got."""
    from bench import run as run_module

    seen = {}

    def fake_dispatch(specs, executor, **kw):
        seen.update(kw)
        return []

    monkeypatch.setattr(run_module, "dispatch", fake_dispatch)
    return seen


def test_compile_wait_reaches_the_executor_and_zero_turns_the_groups_off(tmp_path, dispatched):
    from bench.jobs import compile_group

    seen = dispatched
    run_main(args("--no-render", "--compile-wait", "0", results=tmp_path / "res", reports=tmp_path / "rep"))
    assert seen["compile_group"] is None
    run_main(args("--no-render", "--compile-wait", "120", results=tmp_path / "res", reports=tmp_path / "rep"))
    assert seen["compile_group"] is compile_group and seen["compile_wait_s"] == 120


class _SleepingRunner(_StampingRunner):
    """spec = (name, folder): writes NAME.start (the time) and NAME.pid (its process), and takes `seconds`."""
    seconds = 1.5

    def __call__(self, spec):
        name, folder = spec
        Path(folder, f"{name}.start").write_text(str(time.time()))
        Path(folder, f"{name}.pid").write_text(str(os.getpid()))
        time.sleep(self.seconds)
        return {"name": name}


@pytest.mark.parametrize("executor", ["inline", "local"])
def test_no_cell_starts_after_start_within_and_the_started_ones_end(tmp_path, executor):
    """--start-within: with one slot and cells of 1.5 s, a window of 1 s (not less: dispatch may take a moment to
    begin on a loaded machine) starts the first cell only; it runs to its end, and the others get no outcome (a
    sweep shows them pending) and never start."""
    from bench import executors

    specs = [(name, str(tmp_path)) for name in "abc"]
    out = executors.dispatch(specs, executor, jobs=1, folder=tmp_path / "submitit", poll_s=0.05,
                             runner=_SleepingRunner(), start_within_s=1.0)
    assert [o.spec[0] for o in out] == ["a"] and out[0].ok and out[0].seconds >= 1.5
    assert sorted(p.stem for p in tmp_path.glob("*.start")) == ["a"]
    # without the window every cell runs
    out = executors.dispatch(specs[1:], executor, jobs=1, folder=tmp_path / "submitit2", poll_s=0.05,
                             runner=_SleepingRunner())
    assert [o.spec[0] for o in out] == ["b", "c"]
    with pytest.raises(ValueError, match="inline and local"):
        executors.dispatch(specs, "slurm", start_within_s=1.0, runner=_SleepingRunner())


def test_start_within_reaches_the_executor_and_slurm_refuses_it(tmp_path, dispatched, capsys):
    seen = dispatched
    # The fake dispatch starts nothing: with a window, the cells left unstarted make the exit status 3 (not 0,
    # which a script would read as complete); without one, an empty outcome list is not read as cells left.
    assert run_main(args("--no-render", "--start-within", "600", results=tmp_path / "res",
                         reports=tmp_path / "rep")) == 3
    assert seen["start_within_s"] == 600
    assert "not started before --start-within ran out" in capsys.readouterr().err
    seen.clear()
    assert run_main(args("--no-render", results=tmp_path / "res", reports=tmp_path / "rep")) == 0
    assert seen["start_within_s"] is None
    with pytest.raises(SystemExit):
        run_main(args("--no-render", "--executor", "slurm", "--start-within", "60", results=tmp_path / "res",
                      reports=tmp_path / "rep"))
    assert "--start-within is for --executor local or inline" in capsys.readouterr().err


def test_a_failed_cell_and_cells_not_started_exit_1_naming_both(tmp_path, monkeypatch, capsys):
    from bench import run as run_module
    from bench.executors import Outcome

    monkeypatch.setattr(run_module, "dispatch", lambda specs, executor, **kw: [Outcome(specs[0], False, 1.0)])
    assert run_main(args("--no-render", "--start-within", "60", results=tmp_path / "res",
                         reports=tmp_path / "rep")) == 1
    err = capsys.readouterr().err
    assert "1 cell(s) failed and 1 were not started before --start-within ran out; rerun the same command" in err


def test_dry_run_names_a_started_cell_with_its_epochs(tmp_path):
    """A cell whose run folder exists but has no record (running now, or stopped): --dry-run says how far
    its trainings got, each epoch once, in the folders they train in (a shared training's, a stage 1 made
    for another cell)."""
    from bench.jobs import CellSpec
    from bench.run import cell_state

    def spec(run_dir, stage="1", extra=None):
        return CellSpec("table5", "bg+fg", 0, "smoke", stage, {}, {"train": {"epochs": 3}, "stage2": {"epochs": 2}},
                        "h", str(run_dir), str(tmp_path), "smoke/table5/bg+fg/seed0/h", extra or {})

    def log(folder, *epochs):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.jsonl").write_text("".join(f'{{"epoch": {e}}}\n' for e in epochs))

    own = tmp_path / "own"
    log(own, 1, 2, 2)  # epoch 2 logged twice: killed before its checkpoint, then resumed
    assert cell_state(spec(own), set()) == "todo"  # epochs of an earlier run, but this cell has not started
    (own / "config.yaml").write_text("{}")
    assert cell_state(spec(own), set()) == "started, epochs logged: 2 of 3"
    assert cell_state(spec(own), {"smoke/table5/bg+fg/seed0/h"}) == "done"

    follower = tmp_path / "follower"
    (follower).mkdir()
    (follower / "config.yaml").write_text("{}")
    assert cell_state(spec(follower, extra={"trained": {"dir": str(own)}}), set()) == "started, epochs logged: 2 of 3"
    stage1 = tmp_path / "stage1_elsewhere"
    log(stage1, 1, 2, 3)
    log(follower / "stage2", 1)
    assert cell_state(spec(follower, "2", {"stage1_dir": str(stage1)}), set()) == \
        "started, epochs logged: stage 1 3 of 3, stage 2 1 of 2"
    assert cell_state(spec(follower, "inference"), set()) == "started"
    (own / "error.txt").write_text("boom")
    assert cell_state(spec(own), set()) == "failed"


def test_dry_run_writes_nothing(tmp_path, capsys):
    """Table 6's EHIN is Table 5's full loss: a dry run names it as a copy to make and leaves the store as it was."""
    res, rep = tmp_path / "res", tmp_path / "rep"
    assert run_main(args(results=res, reports=rep, rows="bg+fg+cl")) == 0
    before = (res / "store.jsonl").read_text()
    capsys.readouterr()
    a = ["table6", "--profile", "smoke", "--rows", "EHIN", "--results", str(res), "--reports", str(rep),
         "--executor", "inline", "--dry-run"]
    for t in TINY:
        a += ["--set", t]
    assert run_main(a) == 0
    assert "[a stored cell's copy, written when run]" in capsys.readouterr().out
    assert (res / "store.jsonl").read_text() == before


@pytest.mark.slow
def test_ranks_train_each_cell_as_one_data_parallel_job(tmp_path, capsys):
    """--ranks 2 on CPU (gloo): each stage-1 cell trains as one job of two processes, whose record says so;
    the tiny CLIP holds no batch statistics, so the job computes one process's gradient on the same global
    batch (D-DDP) and its epoch's mean loss equals the single process's up to float rounding. bench.check
    --against then pairs the two stores' rows."""
    from bench.check import main as check_main

    one, two = tmp_path / "one", tmp_path / "two"
    assert run_main(args(results=one, reports=tmp_path / "rep", rows="bg+fg")) == 0
    assert run_main(args("--ranks", "2", results=two, reports=tmp_path / "rep", rows="bg+fg")) == 0
    [single], [ddp] = ResultStore(one).read(), ResultStore(two).read()
    assert "world_size" not in single and ddp["world_size"] == 2
    assert ddp["cell_id"] == single["cell_id"]  # the same cell, trained another way
    assert ddp["history"][0]["loss"] == pytest.approx(single["history"][0]["loss"], rel=1e-4)
    assert ddp["metrics"]["n"] == single["metrics"]["n"] > 0
    run_dir = Path(ddp["run_dir"])
    assert {p.name for p in (run_dir / "ranks").iterdir()} == {"config.yaml", "rank0.log", "rank1.log"}
    assert (two / ddp["per_expression"]).is_file()

    capsys.readouterr()
    assert check_main(["--against", str(one), "--results", str(two), "--tables", "table5"]) == 0
    out = capsys.readouterr().out
    assert f"table5: bg+fg [{two}] - bg+fg [{one}], paired over the same expressions and seeds" in out
    assert "point_mask" in out and "nothing pairs" not in out and "processes per training: 2 against 1" in out


def test_ranks_refuse_a_global_batch_they_cannot_split(tmp_path, capsys):
    """Before any cell runs: stage 1's batch, and a Stage-2 chain's stage-2 batch."""
    with pytest.raises(SystemExit) as e:
        run_main(["table2", "--profile", "smoke", "--ranks", "2", "--set", "stage2.batch_size=9",
                  "--results", str(tmp_path / "res")])
    assert e.value.code == 2 and "--ranks 2: stage2.batch_size 9 of table2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_main(args("--ranks", "5", results=tmp_path / "res", reports=tmp_path / "rep", rows="bg+fg"))
    assert e.value.code == 2 and "train.batch_size 24 of table5 'bg+fg' is not divisible by the 5 ranks" in capsys.readouterr().err
    assert not (tmp_path / "res" / "store.jsonl").exists()


def test_a_table_rendered_elsewhere_reads_the_committed_testbed_verdicts(tmp_path):
    """Rendering into another --reports folder dropped the header's testbed and language-blind lines (it looked
    for that folder's own fidelity.json); the folder's own file still wins where there is one."""
    from bench.run import PROJECT_REPORTS, testbed_verdicts

    assert testbed_verdicts(tmp_path) == PROJECT_REPORTS / "testbed" / "fidelity.json"
    own = tmp_path / "testbed" / "fidelity.json"
    own.parent.mkdir()
    own.write_text("{}")
    assert testbed_verdicts(tmp_path) == own


class _StubbornRunner(_SleepingRunner):
    """A minute long, and deaf to SIGINT (a cell stuck in a blocking call): only a SIGKILL ends it."""
    seconds = 60

    def __call__(self, spec):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return super().__call__(spec)


def _alive(pid: int) -> bool:
    try:  # a zombie (nobody left to reap it) has ended
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", ["SIGTERM to the run", "Ctrl-C"])
def test_a_terminated_local_run_ends_its_cells(tmp_path, how):
    """submitit's local jobs outlive their submitter. A SIGTERM (a `kill`) reaches bench.run's process alone:
    the cells trained on as orphans, beside the ones a rerun starts in the same folders; now the dispatch ends
    them on its way out. Ctrl-C reaches the process group, whose controllers end their cells themselves (SIGINT,
    then SIGKILL): the dispatch must not cut that short. The cells here ignore SIGINT, so only the SIGKILL ends
    them."""
    # The run starts as from a terminal: SIGINT and SIGTERM handled and not blocked. A child inherits its parent
    # thread's signal mask through exec, and once (session 48, the full suite on 2 busy cores) the run, its
    # controllers and cells all let a Ctrl-C pass unseen; the state the run inherited is kept in inherited.txt.
    script = ("import signal, sys; from pathlib import Path\n"
              "Path(sys.argv[1], 'inherited.txt').write_text(repr((signal.pthread_sigmask(signal.SIG_BLOCK, []), "
              "signal.getsignal(signal.SIGINT))))\n"
              "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "from bench import executors; from tests.test_bench_run import _StubbornRunner\n"
              "specs = [(n, sys.argv[1]) for n in 'ab']\n"
              "executors.dispatch(specs, 'local', jobs=2, folder=sys.argv[1] + '/sub', poll_s=0.05, "
              "runner=_StubbornRunner())\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("*.pid"))) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, "the cells never started"
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    if how == "Ctrl-C":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) != 0, (tmp_path / "inherited.txt").read_text()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        assert not any(_alive(p) for p in pids), "the cells outlived the run"
    finally:
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
