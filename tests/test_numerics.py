"""Portable numerics (ehin/numerics.py): the switches take effect, and the CPU's ISA stops mattering."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A few training steps through the kernels a stage-1 step uses (conv, GEMM, layer norm, GELU,
# softmax, exp/log); prints the mode and a hash of the trained weights.
WORKLOAD = r"""
import hashlib, ehin, torch
from ehin import numerics
torch.set_num_threads(2)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 4, stride=4), torch.nn.Flatten(2))
head = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
opt = torch.optim.AdamW(list(net.parameters()) + list(head.parameters()), lr=1e-2)
x = torch.randn(8, 3, 32, 32)
for _ in range(20):
    t = head(net(x).transpose(1, 2))
    att = torch.softmax(t @ t.transpose(1, 2) / 4.0, -1)
    loss = -torch.log(att.diagonal(dim1=1, dim2=2) + 1e-6).mean() + torch.exp(-t.pow(2)).mean()
    opt.zero_grad(); loss.backward(); opt.step()
h = hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in list(net.parameters()) + list(head.parameters())))
print(numerics.mode(), torch.backends.cpu.get_cpu_capability(), h.hexdigest())
"""


def _run(**env: str) -> list[str]:
    full = {k: v for k, v in os.environ.items()
            if k not in ("EHIN_PORTABLE_NUMERICS", "ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
                         "ONEDNN_MAX_CPU_ISA")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", WORKLOAD], env=full, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_native_by_default():
    mode, _, _ = _run()
    assert mode == "native"


def test_portable_switches_take_effect():
    mode, capability, _ = _run(EHIN_PORTABLE_NUMERICS="1")
    assert (mode, capability) == ("portable", "AVX2")


# What another CPU or a user's shell would select: ATen's plain loops (a CPU whose dispatch picks
# other loops than AVX2) and MKL's automatic per-CPU code path.
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AUTO"}


def test_portable_numerics_override_the_kernel_selection():
    """The same kernel-selection environment that changes native floats leaves portable ones as they
    are: portable mode overrides it (with os.environ.setdefault, say, this would fail)."""
    assert _run(**OTHER_KERNELS)[2] != _run()[2]  # the control: natively these variables matter
    assert _run(EHIN_PORTABLE_NUMERICS="1", **OTHER_KERNELS)[2] == _run(EHIN_PORTABLE_NUMERICS="1")[2]


def test_native_numerics_do_depend_on_the_isa():
    """Why portable mode exists: ATen's loops for one ISA give other floats than those for another."""
    assert _run(ATEN_CPU_CAPABILITY="default")[2] != _run(ATEN_CPU_CAPABILITY="avx2")[2]


def test_portable_checkpoints_do_not_mix_with_native_ones(monkeypatch, tmp_path):
    from ehin import numerics
    from ehin.pretrain_clip import checkpoint_path, recipe_for

    monkeypatch.setenv("EHIN_CACHE", str(tmp_path))
    native = checkpoint_path(recipe_for("clip-tiny", 64))
    monkeypatch.setattr(numerics, "mode", lambda: "portable")
    assert checkpoint_path(recipe_for("clip-tiny", 64)) != native
