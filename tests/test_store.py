"""The results store survives kills and concurrent writers."""
import json
import os
import signal
import subprocess
import sys
import time

from bench.store import ResultStore

WRITER = r"""
import sys, itertools
from bench.store import ResultStore
store = ResultStore(sys.argv[1])
pad = "x" * 20000   # long lines make a kill mid-write likely
for i in itertools.count():
    store.append({"cell_id": f"{sys.argv[2]}-{i}", "i": i, "pad": pad})
"""


def test_roundtrip_and_latest(tmp_path):
    store = ResultStore(tmp_path)
    store.append({"cell_id": "a", "table": "t", "profile": "p", "row": "r", "seed": 0, "v": 1})
    store.append({"cell_id": "b", "table": "t", "profile": "p", "row": "r", "seed": 0, "v": 2})
    store.append({"cell_id": "c", "table": "u", "profile": "p", "row": "r", "seed": 0, "v": 3})
    assert [r["v"] for r in store.read()] == [1, 2, 3]
    assert store.finished_ids() == {"a", "b", "c"}
    latest = store.select(table="t", profile="p")
    assert [r["v"] for r in latest] == [2]


def test_partial_last_line_is_skipped_and_repaired(tmp_path):
    store = ResultStore(tmp_path)
    store.append({"cell_id": "a"})
    with open(store.path, "a") as f:
        f.write('{"cell_id": "half')          # a writer killed mid-line
    assert store.finished_ids() == {"a"}
    store.append({"cell_id": "b"})
    assert store.finished_ids() == {"a", "b"}
    with open(store.path, "ab") as f:
        f.write(b"\x00" * 64 + b"\xff" * 8)     # a crashed node's garbage tail: not even UTF-8
    assert store.finished_ids() == {"a", "b"}
    store.append({"cell_id": "c"})
    assert store.finished_ids() == {"a", "b", "c"}


def test_seal_keeps_append_order_in_bounded_segments(tmp_path):
    store = ResultStore(tmp_path)
    for i in range(5):
        store.append({"cell_id": f"a{i}", "table": "t", "row": "r", "seed": 0, "pad": "x" * 300})
    assert [p.name for p in store.seal(max_bytes=1000)] == ["store-001.jsonl", "store-002.jsonl", "store-003.jsonl"]
    assert all(p.stat().st_size <= 1000 for p in store.files()) and store.path.read_bytes() == b""
    store.append({"cell_id": "b", "table": "t", "row": "r", "seed": 0})
    assert [p.name for p in store.seal()] == ["store-004.jsonl"]  # numbering goes on after the last segment
    store.append({"cell_id": "c", "table": "t", "row": "r", "seed": 0})
    assert [r["cell_id"] for r in store.read()] == ["a0", "a1", "a2", "a3", "a4", "b", "c"]
    assert store.select(table="t")[0]["cell_id"] == "c"  # the newest record of (row, seed) is the last appended


def _lines(folder) -> int:
    path = folder / "store.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_kill_never_corrupts(tmp_path):
    """SIGKILL writers at arbitrary moments: every complete line stays valid JSON and readable."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for round_ in range(4):
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), f"w{round_}{k}"], env=env)
                 for k in range(2)]
        # Kill once the writers are writing (Python's start-up is slow on a loaded machine), at a moment that
        # differs from round to round.
        before = _lines(tmp_path)
        deadline = time.monotonic() + 60
        while _lines(tmp_path) < before + 3:
            assert time.monotonic() < deadline, "the writers wrote nothing in 60 s"
            time.sleep(0.02)
        time.sleep(0.1 * round_)
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
    store = ResultStore(tmp_path)
    records = store.read()
    assert len(records) > 10
    lines = store.path.read_bytes().split(b"\n")
    complete = [ln for ln in lines if ln.strip()]
    bad = [ln for ln in complete if not _is_json(ln)]
    assert len(bad) <= 8  # at most one cut line per killed writer
    ids = [r["cell_id"] for r in records]
    assert len(ids) == len(set(ids))


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def test_code_version_is_dirty_for_code_changes_only(tmp_path):
    """A sweep renders reports/ while later cells still run: that must not mark their code '+dirty'."""
    import shutil
    import subprocess

    from bench import store as store_mod

    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    shutil.copy(store_mod.__file__, repo / "bench" / "store.py")
    (repo / "reports").mkdir()
    (repo / "reports" / "table.md").write_text("old\n")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(git + ["add", "-A"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", "x"], cwd=repo, check=True)
    probe = [sys.executable, "-c", "import sys; sys.path.insert(0, 'bench'); import store; print(store.code_version())"]

    def version() -> str:
        env = {k: v for k, v in os.environ.items() if k != "EHIN_CODE_VERSION"}
        return subprocess.run(probe, cwd=repo, capture_output=True, text=True, check=True, env=env).stdout.strip()

    clean = version()
    assert clean and not clean.endswith("+dirty")
    (repo / "reports" / "table.md").write_text("rendered\n")
    assert version() == clean
    (repo / "bench" / "store.py").write_text((repo / "bench" / "store.py").read_text() + "\n# edit\n")
    assert version() == clean + "+dirty"


def test_host_info_names_the_packages_that_make_a_runs_floats():
    import numpy

    from bench.store import host_info

    info = host_info()
    assert info["packages"]["numpy"] == numpy.__version__ and "pillow" in info["packages"]


def test_committed_stores_keep_per_expression_files_only_for_their_records():
    """A cell that fails after its scores were copied beside the store leaves a file no record names
    (session 26's Table 7 cell did; a rerun of the cell overwrites it): a committed store holds neither
    such a file nor a record whose file is missing (claims read them paired, bench.check)."""
    from pathlib import Path

    folders = sorted(Path(__file__).resolve().parents[1].glob("reports/**/per_expression"))
    assert folders  # the gpu store and the testbed's controls are committed
    for folder in folders:
        named = {r["per_expression"] for r in ResultStore(folder.parent).read() if r.get("per_expression")}
        kept = {f"per_expression/{f.name}" for f in folder.iterdir()}
        assert kept == named, (folder.parent, sorted(kept ^ named)[:3])


def test_a_store_of_sealed_segments_alone_is_a_store(tmp_path):
    from bench.check import _existing_store

    store = ResultStore(tmp_path)
    store.append({"cell_id": "a", "table": "t", "row": "r", "seed": 0})
    store.seal()
    store.path.unlink()  # segments only: their records are the store's
    assert [r["cell_id"] for r in _existing_store(tmp_path, "--results").read()] == ["a"]


def test_seal_numbers_after_the_highest_segment(tmp_path):
    store = ResultStore(tmp_path)
    for cell in ("a", "b"):
        store.append({"cell_id": cell, "table": "t", "row": "r", "seed": 0})
        store.seal()
    (tmp_path / "store-001.jsonl").unlink()  # a gap: two segments' count would name store-002, which holds "b"
    store.append({"cell_id": "c", "table": "t", "row": "r", "seed": 0})
    assert [p.name for p in store.seal()] == ["store-003.jsonl"]
    assert [r["cell_id"] for r in store.read()] == ["b", "c"]
