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


def test_kill_never_corrupts(tmp_path):
    """SIGKILL writers at arbitrary moments: every complete line stays valid JSON and readable."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for round_ in range(4):
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), f"w{round_}{k}"], env=env)
                 for k in range(2)]
        time.sleep(0.6 + 0.1 * round_)
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
