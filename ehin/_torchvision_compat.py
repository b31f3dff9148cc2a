"""Make `import torchvision` work on the CPU torch wheel.

torchvision 0.28.0's compiled ops (`torchvision/_C*.so`) are built against CUDA libraries. On the
CPU-only torch 2.13.0 wheel they fail to load, and `import torchvision` then dies with
"operator torchvision::nms does not exist" (its fake-kernel registrations need the operator).
open_clip imports torchvision, so this module runs before anything else in `ehin` does.

Where the compiled ops load (a CUDA machine) this does nothing. Where they do not, it defines the
two operators torchvision needs at import time, `torchvision::nms` and `torchvision::qnms`, with a
plain-torch kernel, and lets `torchvision.ops.nms` use them. Other compiled ops (roi_align,
deform_conv2d, ...) stay unavailable and raise torchvision's own error; the project does not use them.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

import torch

__all__ = ["NATIVE_OPS", "nms_reference"]


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS in plain torch; same contract as `torchvision.ops.nms` (x1, y1, x2, y2 boxes).

    Returns the kept indices sorted by decreasing score; a box is dropped when its IoU with a kept,
    higher-scoring box is > iou_threshold.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    boxes = boxes.float()
    order = torch.argsort(scores.float(), descending=True, stable=True)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    # Pairwise IoU once, then a cheap greedy pass over a boolean matrix.
    xx1 = torch.maximum(x1[:, None], x1[None, :])
    yy1 = torch.maximum(y1[:, None], y1[None, :])
    xx2 = torch.minimum(x2[:, None], x2[None, :])
    yy2 = torch.minimum(y2[:, None], y2[None, :])
    inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
    iou = inter / (areas[:, None] + areas[None, :] - inter)
    overlaps = (iou > iou_threshold).cpu()
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in order.cpu().tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlaps[i]
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


def _qnms_reference(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    # torchvision passes int_repr() of quantized tensors; the arithmetic is the same in float.
    return nms_reference(dets.float(), scores.float(), iou_threshold)


def _compiled_ops_load() -> bool:
    """Try to load torchvision's compiled library without importing torchvision."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    libs = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    if not libs:
        return False
    try:
        torch.ops.load_library(libs[0])
    except (OSError, RuntimeError):
        return False
    return hasattr(torch.ops.torchvision, "nms")


_LIB = None


def _define_fallback_ops() -> None:
    global _LIB
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    for key in ("CPU", "CUDA"):
        _LIB.impl("nms", nms_reference, key)
        _LIB.impl("qnms", _qnms_reference, key)


def _install() -> bool:
    if "torchvision" in sys.modules:  # imported before us: whatever happened has happened
        return hasattr(torch.ops.torchvision, "nms")
    if _compiled_ops_load():
        return True
    _define_fallback_ops()
    import torchvision.ops.boxes as boxes  # noqa: E402  (now imports cleanly)

    # torchvision.ops.nms asserts that the compiled library loaded; our operator stands in for it.
    boxes._assert_has_ops = lambda: None
    return False


NATIVE_OPS: bool = _install()
