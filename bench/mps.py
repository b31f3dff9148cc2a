"""NVIDIA's Multi-Process Service (MPS) for the cells packed on one GPU (`--mps` of bench.run, bench.testbed,
and bench.perf's `--procs`).

Cells packed on a GPU are separate processes, and without MPS the GPU time-slices between their CUDA
contexts: a small cell's launch-bound step leaves most of the GPU idle in its slice. Under the MPS
daemon the processes share one context and their kernels run side by side. On one H200, 16 gpu-profile
TRIS-like cells at once trained fastest under MPS with `train.compile=reduce-overhead` (the four
`reports/perf/h200_gpu_tris_fp32_cl_fused_procs16*.json`; `bench.perf --procs 16` measures it again).

`mps_daemon()` starts a private daemon (its pipe and log folders in a temporary folder, so it never
meets another user's) and exports CUDA_MPS_PIPE_DIRECTORY to the processes this process starts; it
quits the daemon on the way out, also after an error. SLURM clusters give MPS through their own
configuration (`--gres=mps`), so `--mps` is for `--executor local` only.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ehin.cli import UserError, sigterm_unwinds

CONTROL = "nvidia-cuda-mps-control"
ENV_KEYS = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")


def add_mps_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mps", action="store_true",
                   help="with --executor local on a CUDA GPU: run the cells under a private NVIDIA MPS daemon, so "
                        "the cells packed on a GPU share it instead of taking turns (bench.mps; default: off)")


def active() -> bool:
    """Whether this process is an MPS client (a daemon's pipe folder is exported to it)."""
    return bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def mps_control() -> str:
    """The MPS control binary, or a one-line UserError naming why MPS cannot start here."""
    control = shutil.which(CONTROL)
    if control is None:
        raise UserError(f"--mps: {CONTROL} is not on PATH (it comes with the NVIDIA driver); leave out --mps")
    if not cuda_available():
        raise UserError("--mps needs a CUDA GPU on this machine; leave out --mps")
    return control


@contextmanager
def mps_daemon() -> Iterator[Path]:
    """Run the block with a private MPS daemon serving the processes it starts; yields its folder."""
    control = mps_control()
    folder = Path(tempfile.mkdtemp(prefix="ehin-mps-"))
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
    for path in env.values():
        Path(path).mkdir()
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    os.environ.update(env)
    # A SIGTERM (timeout, scancel) would end the process without `finally` and leave the daemon running.
    try:
        with sigterm_unwinds():
            subprocess.run([control, "-d"], stdin=subprocess.DEVNULL, check=True)
            print(f"MPS daemon started ({folder}); the cells share the GPU's context", flush=True)
            yield folder
    finally:
        subprocess.run([control], input="quit\n", text=True, timeout=60, check=False)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(folder, ignore_errors=True)
