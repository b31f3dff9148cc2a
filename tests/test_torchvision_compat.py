"""The torchvision shim (ehin/_torchvision_compat.py): NMS answers worked out by hand, the reference
kernel against torchvision's entry point, and which branch the shim takes."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import ehin  # noqa: F401  (installs the shim before torchvision is imported)
import torchvision
from ehin import _torchvision_compat as compat


def _boxes(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# Two overlapping pairs, far apart:
#   A = [0,0,10,10] (0.90) and B = [1,1,11,11] (0.80): inter 9*9 = 81, union 100+100-81 = 119, IoU 0.681
#   C = [20,20,30,30] (0.70) and D = [21,20,31,30] (0.95): inter 9*10 = 90, union 110, IoU 0.818
# Score order D, A, B, C. At 0.5: D kept, A kept, B (0.68 with A) and C (0.82 with D) dropped.
# At 0.7: B survives (0.68 <= 0.7), C still dropped. At 0.9: nothing overlaps enough.
PAIRS = _boxes([0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [21, 20, 31, 30])
PAIR_SCORES = torch.tensor([0.90, 0.80, 0.70, 0.95])


@pytest.mark.parametrize("thr, expected", [(0.5, [3, 0]), (0.7, [3, 0, 1]), (0.9, [3, 0, 1, 2])])
def test_nms_overlapping_pairs_by_hand(thr: float, expected: list[int]) -> None:
    keep = torchvision.ops.nms(PAIRS, PAIR_SCORES, thr)
    assert keep.dtype == torch.int64
    assert keep.tolist() == expected  # sorted by decreasing score


def test_nms_iou_equal_to_threshold_is_kept() -> None:
    # [0,0,10,5] lies inside [0,0,10,10]: IoU = 50 / 100 = 0.5 exactly; suppression needs IoU > thr.
    boxes = _boxes([0, 0, 10, 10], [0, 0, 10, 5])
    scores = torch.tensor([0.9, 0.8])
    assert torchvision.ops.nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert torchvision.ops.nms(boxes, scores, 0.49).tolist() == [0]


def test_nms_ties() -> None:
    # Identical boxes with identical scores: exactly one survives (which one is unspecified).
    same = _boxes([5, 5, 15, 15], [5, 5, 15, 15])
    keep = torchvision.ops.nms(same, torch.tensor([0.5, 0.5]), 0.5)
    assert len(keep) == 1 and keep.item() in (0, 1)
    # Tied scores on disjoint boxes: both kept, ahead of the lower-scoring one.
    boxes = _boxes([0, 0, 4, 4], [10, 10, 14, 14], [20, 20, 24, 24])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.6, 0.6, 0.3]), 0.1).tolist()
    assert sorted(keep[:2]) == [0, 1] and keep[2] == 2


def test_nms_empty_input() -> None:
    keep = torchvision.ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert keep.shape == (0,) and keep.dtype == torch.int64
    assert compat.nms_reference(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)


def test_batched_nms_keeps_other_categories() -> None:
    # B is in another category than A, so A cannot suppress it; C is still suppressed by D.
    keep = torchvision.ops.batched_nms(PAIRS, PAIR_SCORES, torch.tensor([0, 1, 0, 0]), 0.5)
    assert keep.tolist() == [3, 0, 1]


def test_reference_equals_torchvision_on_random_boxes() -> None:
    g = torch.Generator().manual_seed(1234)
    for _ in range(20):
        n = int(torch.randint(1, 60, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 50
        wh = torch.rand(n, 2, generator=g) * 20 + 0.5
        boxes = torch.cat([xy, xy + wh], 1)
        scores = torch.rand(n, generator=g)  # continuous: no ties, so the order is unique
        for thr in (0.05, 0.3, 0.7):
            assert torch.equal(compat.nms_reference(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr))


def test_branch_taken_on_this_machine() -> None:
    if compat.NATIVE_OPS:
        pytest.skip("torchvision's compiled ops load here: the fallback is not installed (nothing to check)")
    # CPU torch wheel: the compiled library does not load, so the shim defined the operators and
    # torchvision.ops.nms runs the reference kernel.
    assert compat._LIB is not None
    assert hasattr(torch.ops.torchvision, "nms") and hasattr(torch.ops.torchvision, "qnms")
    assert torch.ops.torchvision.nms(PAIRS, PAIR_SCORES, 0.5).tolist() == [3, 0]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_bare_torchvision_import_needs_the_shim() -> None:
    """Why the shim exists: without it `import torchvision` dies on this torch wheel."""
    if compat.NATIVE_OPS:
        pytest.skip("torchvision's compiled ops load here; a bare import works")
    r = _run("import torchvision")
    assert r.returncode != 0 and "torchvision::nms" in r.stderr


def test_native_branch_does_nothing() -> None:
    """Simulate a machine where torchvision's compiled library loads: the shim must define no
    operators, patch nothing and not import torchvision."""
    r = _run(
        """
        import sys, torch
        calls = []
        def fake_load_library(path):
            # what loading torchvision/_C.so does: register the torchvision operators
            calls.append(path)
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.impl("nms", lambda d, s, t: torch.full((1,), 7, dtype=torch.long), "CPU")
            fake_load_library.lib = lib
        torch.ops.load_library = fake_load_library
        from ehin import _torchvision_compat as c
        assert calls and calls[0].endswith(".so"), calls
        assert c.NATIVE_OPS is True
        assert c._LIB is None                      # no fallback operators defined
        assert "torchvision" not in sys.modules    # nothing imported or patched
        assert not hasattr(torch.ops.torchvision, "qnms")
        out = torch.ops.torchvision.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
        assert out.tolist() == [7], out            # the "native" kernel, untouched
        print("ok")
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")
