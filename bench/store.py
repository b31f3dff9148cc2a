"""The results store: one JSON line per finished cell, appended atomically.

Why JSON lines and not a database: a sweep on SLURM writes from many nodes onto a shared
filesystem with no server. Each record is one `os.write` of one line on a file opened with
O_APPEND under an exclusive `flock`, then fsync'd, so concurrent writers never interleave and a
process killed at any moment leaves at most a partial *last* line, which `read` skips (and the
next `append` repairs by starting on a fresh line). A rerun skips every cell already present.

A store that is committed (reports/gpu/store) would grow past what a repository should track in one
file, so `seal` moves the lines written so far to a numbered segment, store-001.jsonl, ... that no
writer touches again; `read` reads the segments in order, then store.jsonl, so file order stays
append order.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

STORE_NAME = "store.jsonl"
SEGMENT_GLOB = "store-[0-9][0-9][0-9].jsonl"  # sealed segments; never appended to


CODE_PATHS = ("ehin", "bench", "sweeps", "pyproject.toml")  # what decides a result (not reports/, docs/)


def code_version() -> str:
    """git describe of the checkout the code runs from ('+dirty' when the code has uncommitted changes:
    CODE_PATHS only, since a sweep renders reports/ itself while later cells still run).

    EHIN_CODE_VERSION overrides it, for copies of the tree that travel without .git (remote runs)."""
    if os.environ.get("EHIN_CODE_VERSION"):
        return os.environ["EHIN_CODE_VERSION"]
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
                               cwd=here.parent, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not sha:
        return "unknown"
    return sha + ("+dirty" if dirty else "")


# Packages besides torch whose kernels make a CPU run's floats (the datasets' pixels, the metrics):
# recorded so that two environments that differ can be told apart (ehin/numerics.py, bench.check).
FLOAT_PACKAGES = ("numpy", "opencv-python-headless", "pillow", "scipy", "open_clip_torch", "pycocotools")


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in FLOAT_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def host_info() -> dict[str, Any]:
    import platform

    import torch

    from bench import mps
    from ehin import numerics

    info = {"host": socket.gethostname(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "packages": package_versions(), **numerics.describe()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        # Under MPS (bench.mps) packed cells share one CUDA context: their timings are not a lone cell's.
        info["mps"] = mps.active()
    return info


def cell_id(table: str, row: str, seed: int, profile: str, config_hash: str) -> str:
    return f"{profile}/{table}/{row}/seed{seed}/{config_hash}"


class ResultStore:
    """Append-only JSONL store of finished cells under `root/store.jsonl` (and its sealed segments)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / STORE_NAME

    def append(self, record: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        record = dict(record)
        record.setdefault("finished_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        line = json.dumps(record, sort_keys=True, default=_jsonable)
        if "\n" in line:
            raise ValueError("a record must serialise to one line")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A writer killed mid-line left a partial last line: start ours on a fresh one.
            size = os.fstat(fd).st_size
            prefix = b""
            if size:
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        prefix = b"\n"
            os.write(fd, prefix + line.encode() + b"\n")
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def files(self) -> list[Path]:
        """The sealed segments in order, then the file appends go to: together, append order."""
        return sorted(self.root.glob(SEGMENT_GLOB)) + ([self.path] if self.path.exists() else [])

    def read(self) -> list[dict]:
        records, bad = [], 0
        for path in self.files():
            with open(path, "rb") as f:
                for raw in f:
                    raw = raw.strip()
                    if not raw:
                        continue
                    try:
                        records.append(json.loads(raw))
                    except ValueError:  # JSON cut short, or bytes that are not UTF-8 (a crashed node's garbage)
                        bad += 1  # a line cut by a kill; never a finished cell
        if bad:
            warnings.warn(f"{self.root}: skipped {bad} incomplete or unreadable line(s) left by an interrupted write")
        return records

    def finished_ids(self) -> set[str]:
        return {r["cell_id"] for r in self.read() if "cell_id" in r}

    def select(self, *, table: str | None = None, profile: str | None = None,
               latest_only: bool = True) -> list[dict]:
        """Records of a table/profile; with latest_only, the newest record per (row, seed)."""
        rows = [r for r in self.read()
                if (table is None or r.get("table") == table) and (profile is None or r.get("profile") == profile)]
        if not latest_only:
            return rows
        newest: dict[tuple, dict] = {}
        for r in rows:  # file order is append order
            newest[(r.get("table"), r.get("row"), r.get("seed"))] = r
        return list(newest.values())

    def seal(self, max_bytes: int = 1 << 20) -> list[Path]:
        """Move store.jsonl's lines to the next segments, none over max_bytes unless one line is, and leave
        store.jsonl empty. Run it while no cell writes here: a maintainer's step before committing a store."""
        lines = self.path.read_bytes().splitlines(keepends=True) if self.path.exists() else []
        chunks: list[list[bytes]] = []
        size = 0  # bytes in chunks[-1]
        for line in lines:
            if not chunks or size + len(line) > max_bytes:
                chunks.append([])
                size = 0
            chunks[-1].append(line)
            size += len(line)
        # after the highest segment, not their count: a missing one must not make the next overwrite the last
        n = max((int(p.stem.split("-")[1]) for p in self.root.glob(SEGMENT_GLOB)), default=0)
        if n + len(chunks) > 999:  # SEGMENT_GLOB reads three digits
            raise ValueError(f"{self.root}: sealed segments would be numbered past 999")
        segments = [self.root / f"store-{n + i:03d}.jsonl" for i in range(1, len(chunks) + 1)]
        for segment, chunk in zip(segments, chunks):
            segment.write_bytes(b"".join(chunk))
        self.path.write_bytes(b"")
        return segments


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (set, tuple)):
        return list(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")

