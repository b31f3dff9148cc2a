"""Portable CPU numerics: one set of kernels on any x86-64 CPU with AVX2, switched on with EHIN_PORTABLE_NUMERICS=1.

Why: training is chaotic. A last-bit difference in one kernel grows into several points of PointM over
a few epochs, and the native CPU kernels differ between CPUs: ATen picks AVX-512 or AVX2 loops at run
time, MKL takes per-CPU code paths, oneDNN JIT-compiles convolutions for the CPU it finds. The smoke
baselines made on one machine were missed by 5-10 points on another (CI, 2026-11-24) with the same
code, data and seed. In portable mode:

- ATEN_CPU_CAPABILITY=avx2: ATen's AVX2 loops on every CPU that has AVX2 (an AVX-512 CPU would pick
  others). They use exact IEEE operations (division and sqrt, not the rcp/rsqrt approximations that
  differ between vendors), so they give the same floats on Intel and AMD. The plain loops
  (`default`) would too, but softmax and exp run 8-10x slower in them;
- MKL_CBWR=COMPATIBLE: MKL's conditional numerical reproducibility, one code path on every x86 CPU
  (about 2x slower GEMMs; MKL's AVX2 branch is only promised on Intel CPUs);
- torch.backends.mkldnn off: convolutions go through im2col + MKL GEMM, not oneDNN's JIT kernels.

Thread counts must match too (the profiles fix train.threads). A CPU without AVX2 cannot run this
mode; `mode()` then says "native" and bench.check names the difference.

Measured limit (session 19): on a 2-core Intel Xeon with AVX-512, the regression check's two smoke cells
(same code, torch 2.13.0+cpu, 2 threads, portable) differed from the baselines made on an AMD EPYC by
several points (each within its band), while the dataset's bytes were the same with numpy's AVX-512
paths on and off. Which kernel (or package: records name their packages since, `packages`) differs is
not known, so bit-identity is claimed only on the same CPU model: bench.check compares exactly there, and
within each cell's measured band elsewhere. Synthetic data needs nothing: it is
byte-identical with numpy's SIMD dispatch limited to its baseline (checked with NPY_DISABLE_CPU_FEATURES).

The environment variables must be set before torch runs its first kernel, so `apply_env()` runs from
`ehin/__init__.py`, before torch is imported.
"""
from __future__ import annotations

import os
from typing import Any

ENV = "EHIN_PORTABLE_NUMERICS"
_PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}


def requested() -> bool:
    return os.environ.get(ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def apply_env() -> None:
    """Set the kernel-selection variables (before torch is imported) when portable mode is asked for."""
    if requested():
        for k, v in _PORTABLE_ENV.items():
            os.environ[k] = v


def apply_torch() -> None:
    """The part that needs torch: oneDNN off, so convolutions take the portable GEMM path."""
    if requested():
        import torch

        torch.backends.mkldnn.enabled = False


def mode() -> str:
    """'portable' when every switch took effect, else 'native'."""
    import torch

    ok = (requested() and torch.backends.cpu.get_cpu_capability() == "AVX2"
          and not torch.backends.mkldnn.enabled and os.environ.get("MKL_CBWR") == "COMPATIBLE")
    return "portable" if ok else "native"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def describe() -> dict[str, Any]:
    """What decides the floats of a CPU run; stored with every result."""
    import torch

    return {"numerics": mode(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_model": cpu_model(), "threads": torch.get_num_threads()}
