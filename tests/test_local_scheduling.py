"""The local executor's scheduling of packed cells (bench.executors._run_local), with fake cells that sleep: a
compile group whose leader ends without a step, a shared training that fails, a training whose maker is stored
(a later sitting), and --start-within with cells that only evaluate a model trained in the sitting or only wait
for their graph to compile. Found by review (session 41) and on a GPU (session 51); each case wasted GPU time or
lost a trained model."""
from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

from bench import executors
from bench.run import build_specs, leaders_first, shared_training
from bench.sweeps import load_sweep

TRAIN_S = 2.0


class Sleeper:
    """spec = (name, folder, fail, marker): writes <name>.start, then the compile marker after 1 s (its
    first step), then sleeps; `fail`: raises at once, before any step."""

    def __call__(self, spec):
        name, folder, fail, marker = spec
        Path(folder, f"{name}.start").write_text(repr(time.time()))
        if fail:
            raise RuntimeError(f"{name} failed before its first step")
        time.sleep(1.0)
        Path(marker).write_text("stepped")
        time.sleep(0.5)
        return {"name": name}

    def label(self, spec):
        return spec[0]

    def error_log(self, spec):
        return None


class SharedTrainer:
    """A Table 2 cell as bench.jobs runs it: under the training folder's lock, trains TRAIN_S s unless that folder
    holds a model (fails instead with `fail`), then evaluates 0.2 s; its start, lock and end times go to `log`."""

    def __init__(self, log: str, fail: bool = False):
        self.log, self.fail = log, fail

    def __call__(self, spec):
        from filelock import FileLock

        from bench.jobs import training_dir

        times = {"start": time.time()}
        folders = ([spec.extra["stage1_dir"]] if spec.stage == "2" and spec.extra.get("stage1_dir") else []) + [
            training_dir(spec)]
        for d in folders:
            Path(d).mkdir(parents=True, exist_ok=True)
            with FileLock(d + ".lock"):
                times.setdefault("locked", time.time())
                if not Path(d, "model").exists():
                    with open(Path(self.log, "trainings"), "a") as f:
                        f.write(f"{Path(d).name}\n")
                    time.sleep(TRAIN_S)
                    if self.fail:
                        raise RuntimeError("NonFiniteLossError: the loss became nan")
                    Path(d, "model").write_text("trained")
        time.sleep(0.2)
        times["end"] = time.time()
        Path(self.log, spec.cell_id.replace("/", "_")).write_text(repr(times))
        return {"cell_id": spec.cell_id}

    def label(self, spec):
        return spec.cell_id

    def error_log(self, spec):
        return None


def _times(log: Path, spec) -> dict | None:
    f = log / spec.cell_id.replace("/", "_")
    return ast.literal_eval(f.read_text()) if f.exists() else None


@pytest.fixture
def gpu_host(monkeypatch):
    """The local executor as on a host with one GPU: compile groups apply (torch.compile is a CUDA lever)."""
    monkeypatch.setattr(executors, "local_gpus", lambda: 1)
    monkeypatch.setattr(executors, "gpu_slot", lambda *a, **k: {})


@pytest.fixture
def ehin_refcoco(tmp_path):
    """EHIN's Table 2 cells on refcoco, one seed: Stage-1 val (makes the training), testA, testB; Stage-2 val
    (its chain), testA, testB."""
    specs = build_specs(load_sweep("table2"), "gpu", 1, tmp_path / "root", None, {})
    return [s for s in specs if s.row.startswith("EHIN") and "refcoco_" in s.row]


def test_a_compile_leader_that_fails_before_a_step_passes_the_lead_on(tmp_path, gpu_host):
    marker = tmp_path / "graph.marker"
    specs = [("a", str(tmp_path), True, str(marker))] + [(n, str(tmp_path), False, str(marker)) for n in "bcd"]
    out = executors.dispatch(specs, "local", jobs=4, folder=tmp_path / "sub", poll_s=0.05, runner=Sleeper(),
                             compile_group=lambda s: ("graph", marker), compile_wait_s=60)
    start = {n: float((tmp_path / f"{n}.start").read_text()) for n in "abcd"}
    assert [(o.spec[0], o.ok) for o in out if not o.ok] == [("a", False)]
    # b leads once a has failed; c and d wait for b's first step (1 s) instead of compiling beside it
    assert min(start["c"], start["d"]) - start["b"] >= 0.9


def test_a_failed_shared_training_is_not_trained_again_by_each_cell_that_needs_it(tmp_path, ehin_refcoco):
    log = tmp_path / "log"
    log.mkdir()
    out = executors.dispatch(leaders_first(ehin_refcoco), "local", jobs=6, folder=tmp_path / "sub", poll_s=0.05,
                             runner=SharedTrainer(str(log), fail=True), shared_training=shared_training)
    assert len(out) == 6 and not any(o.ok for o in out)
    assert len((log / "trainings").read_text().splitlines()) == 1  # was 6, one after another, each in a slot
    assert sum("not started: the training it needs failed" in (o.error or "") for o in out) == 5


def test_a_training_whose_maker_is_stored_is_made_once_while_the_others_wait_without_a_slot(tmp_path, ehin_refcoco):
    """A later sitting: Stage-1 val is stored, its model not on this machine. The testA evaluation trains it and
    testB waits for it unstarted (before, testB, testA and the chain all started and queued on the lock)."""
    log = tmp_path / "log"
    log.mkdir()
    todo = [s for s in ehin_refcoco if not (s.stage == "1" and shared_training(s)[0])]
    out = executors.dispatch(leaders_first(todo), "local", jobs=6, folder=tmp_path / "sub", poll_s=0.05,
                             runner=SharedTrainer(str(log)), shared_training=shared_training)
    assert all(o.ok for o in out) and len(out) == 5
    t = {(s.stage, s.config["eval"]["split"]): _times(log, s) for s in todo}
    maker = min((v for k, v in t.items() if k[0] == "1"), key=lambda v: v["start"])
    waited = [v for k, v in t.items() if v is not maker]
    assert all(v["start"] >= maker["end"] - 0.05 for v in waited)  # none held a slot while it trained
    assert (log / "trainings").read_text().count("\n") == 2  # stage 1 once, the chain's stage 2 once


def test_after_start_within_cells_that_only_evaluate_a_model_trained_here_still_run(tmp_path, ehin_refcoco):
    """The window passes while Stage-1 val trains: its testA and testB evaluations run when it ends (before, they
    were dropped with the queue and the model went with the machine); the Stage-2 chain, a training, does not
    start."""
    log = tmp_path / "log"
    log.mkdir()
    specs = leaders_first(ehin_refcoco)
    out = executors.dispatch(specs, "local", jobs=6, folder=tmp_path / "sub", poll_s=0.05,
                             runner=SharedTrainer(str(log)), shared_training=shared_training, start_within_s=1.0)
    ran = {(s.stage, s.config["eval"]["split"]) for s in specs if _times(log, s)}
    assert ran == {("1", "val"), ("1", "testA"), ("1", "testB")} and all(o.ok for o in out)


def test_after_start_within_cells_that_only_waited_for_their_graph_to_compile_still_start(tmp_path, gpu_host):
    """The window passes while a, the first cell of a graph, compiles it: b and c, which had free slots in time
    and waited only for that, start once a has stepped; d, beyond the three slots, does not (before, only a ran:
    session 51's window of 68 s started 3 cells of a wave of 12)."""
    marker = tmp_path / "graph.marker"
    specs = [(n, str(tmp_path), False, str(marker)) for n in "abcd"]
    out = executors.dispatch(specs, "local", jobs=3, folder=tmp_path / "sub", poll_s=0.05, runner=Sleeper(),
                             compile_group=lambda s: ("graph", marker), start_within_s=0.5)
    assert sorted(o.spec[0] for o in out) == ["a", "b", "c"] and all(o.ok for o in out)
    start = {p.stem: float(p.read_text()) for p in tmp_path.glob("*.start")}
    assert sorted(start) == ["a", "b", "c"]
    assert min(start["b"], start["c"]) - start["a"] >= 0.9  # after a's first step, past the window


def test_the_evaluations_of_a_model_that_a_cell_waiting_for_its_graph_trains_start_with_it(tmp_path, gpu_host):
    """Past the window, m (a training, waiting for a's compilation, kept with the free slot) starts late, and so do
    e1 and e2, which evaluate m's model: dropped, they would leave it to go with the machine."""
    marker = tmp_path / "graph.marker"
    specs = [(n, str(tmp_path), False, str(marker)) for n in ("a", "m", "e1", "e2")]
    out = executors.dispatch(
        specs, "local", jobs=2, folder=tmp_path / "sub", poll_s=0.05, runner=Sleeper(), start_within_s=0.5,
        compile_group=lambda s: ("graph", marker) if s[0] in ("a", "m") else None,
        shared_training=lambda s: {"m": ("T", ()), "e1": (None, ("T",)), "e2": (None, ("T",))}.get(s[0], (None, ())))
    assert sorted(o.spec[0] for o in out) == ["a", "e1", "e2", "m"] and all(o.ok for o in out)
    start = {p.stem: float(p.read_text()) for p in tmp_path.glob("*.start")}
    assert min(start["e1"], start["e2"]) >= start["m"] + 1.4  # after m's training (1.5 s), past the window
