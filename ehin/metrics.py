"""Evaluation metrics for stage 1 and stage 2 (METHOD §5).

Per expression (`score_expression`), with the prediction already at the original image size:
  * the map is divided by its maximum. Stage 1: foreground = map > 0 after ReLU. Stage 2 (logits):
    foreground = logit > 0, so an all-negative map predicts an empty foreground.
  * inter / union / iou: |P & G|, |P | G|, their ratio (0 when the union is empty, as LAVT/TRIS do).
  * point_mask / point_box / point_any_object: the argmax pixel lies in the GT mask / in the GT box /
    on any annotated object. A flat map (max == min, e.g. all zero after ReLU) has no peak and misses
    everywhere: it never "points" at pixel (0, 0). Ties between equal maxima of a non-flat map go to the
    first in row-major order (np.argmax).
    Box containment is inclusive on pixel indices: pixel (row r, col c) is in the box [x1, y1, x2, y2]
    iff x1 <= c <= x2 and y1 <= r <= y2, so a peak exactly on the box edge (c == x2, say) is a hit.
  * box_acc: boxes from the map (threshold at 0.5 of its max, external contours with
    cv2.findContours, one corner box per contour), NMS at IoU 0.05, then boxes whose confidence is
    under 0.5 of the best are dropped; a hit if any remaining box has IoU > 0.5 with the GT box.
    Confidence = mean of the normalised map over the box's rectangle (below-threshold pixels
    included). Why not the max or the mean over the blob itself: every blob's pixels are >= 0.5 of the
    global max after thresholding, so both would always pass the "0.5 of the best" rule and the drop
    step would be a no-op; the box mean penalises faint, sparse or hollow blobs.
    Pixel/box convention: pixel (r, c) covers [c, c+1) x [r, r+1), so a contour spanning columns
    x..x+w-1 gives the box [x, y, x+w, y+h], the convention of GT boxes from COCO's [x, y, w, h].
    Stage 2 takes its boxes from sigmoid(logit) restricted to the predicted foreground.

`aggregate` turns a list of per-expression dicts into percentages: iou (mean IoU, the paper's "IoU"),
overall_iou (sum inter / sum union, the paper's "mIoU": D9), point_mask, point_box, box_acc,
point_any_object, and n.
"""
from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

import ehin  # noqa: F401  (torchvision shim before torchvision.ops)
from torchvision.ops import nms

PAPER_COLUMNS = {"IoU": "iou", "mIoU": "overall_iou", "PointIt": "point_box", "PointM": "point_mask",
                 "BoxAcc": "box_acc"}
METRIC_KEYS = ("iou", "overall_iou", "point_mask", "point_box", "box_acc", "point_any_object")

BOX_THRESHOLD = 0.5  # of the map's max
NMS_IOU = 0.05
CONFIDENCE_RATIO = 0.5  # drop boxes under this fraction of the best confidence
BOX_HIT_IOU = 0.5


def upsample_to(m: torch.Tensor, size: Sequence[int]) -> np.ndarray:
    """[h, w] map -> float32 np.ndarray [H0, W0] (bilinear, align_corners=False)."""
    m = torch.as_tensor(m).detach().float().cpu()[None, None]
    return F.interpolate(m, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)[0, 0].numpy()


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two corner boxes [x1, y1, x2, y2] (continuous coordinates)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, iw) * max(0.0, ih)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def boxes_from_map(score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Corner boxes [K, 4] and confidences [K] kept from a map normalised to max 1 (see module doc)."""
    binary = (score >= BOX_THRESHOLD).astype(np.uint8)
    if not binary.any():
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    contours = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[-2]
    boxes, conf = [], []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        boxes.append([x, y, x + w, y + h])
        conf.append(float(score[y:y + h, x:x + w].mean()))
    b, s = torch.tensor(boxes, dtype=torch.float32), torch.tensor(conf, dtype=torch.float32)
    keep = nms(b, s, NMS_IOU)  # sorted by decreasing confidence
    b, s = b[keep], s[keep]
    ok = s >= CONFIDENCE_RATIO * s[0]
    return b[ok].numpy(), s[ok].numpy()


def _peak(m: np.ndarray) -> tuple[int, int] | None:
    if m.size == 0 or not m.max() > m.min():  # flat (or all-zero) map: no peak, a miss
        return None
    r, c = np.unravel_index(int(np.argmax(m)), m.shape)
    return int(r), int(c)


def score_expression(pred, gt_mask, gt_box_xyxy, objects_mask, stage: int = 1) -> dict:
    """Metrics of one (ref, sentence); pred [H0, W0] (stage 1: response map, stage 2: logits)."""
    pred = np.asarray(pred.detach().cpu() if torch.is_tensor(pred) else pred, dtype=np.float64)
    gt = np.asarray(gt_mask, dtype=bool)
    objects = np.asarray(objects_mask, dtype=bool)
    if pred.shape != gt.shape or objects.shape != gt.shape:
        raise ValueError(f"pred {pred.shape}, gt_mask {gt.shape} and objects_mask {objects.shape} must match")
    x1, y1, x2, y2 = (float(v) for v in np.asarray(gt_box_xyxy, dtype=np.float64).reshape(4))

    if stage == 1:
        m = np.maximum(pred, 0.0)  # ReLU
        peak = _peak(m)
        score = m / m.max() if m.max() > 0 else np.zeros_like(m)  # divide by the max (METHOD §5)
        fg = score > 0
    elif stage == 2:
        fg = pred > 0  # logit > 0; all-negative -> empty foreground
        peak = _peak(pred)
        prob = np.where(fg, 0.5 * (1.0 + np.tanh(0.5 * pred)), 0.0)  # sigmoid without overflow
        score = prob / prob.max() if fg.any() else np.zeros_like(prob)
    else:
        raise ValueError(f"stage must be 1 or 2, got {stage}")

    inter = int(np.logical_and(fg, gt).sum())
    union = int(np.logical_or(fg, gt).sum())
    if peak is None:
        point_mask = point_box = point_any = False
    else:
        r, c = peak
        point_mask, point_any = bool(gt[r, c]), bool(objects[r, c])
        point_box = bool(x1 <= c <= x2 and y1 <= r <= y2)  # inclusive edges (module doc)
    boxes, _ = boxes_from_map(score)
    box_acc = any(box_iou(b, (x1, y1, x2, y2)) > BOX_HIT_IOU for b in boxes)
    return {
        "inter": inter,
        "union": union,
        "iou": inter / union if union > 0 else 0.0,
        "point_mask": point_mask,
        "point_box": point_box,
        "box_acc": bool(box_acc),
        "point_any_object": point_any,
    }


def aggregate(rows: Sequence[dict]) -> dict:
    """Per-expression dicts -> percentages (METHOD §5) and n."""
    n = len(rows)
    if n == 0:
        return {**{k: math.nan for k in METRIC_KEYS}, "n": 0}
    inter = sum(r["inter"] for r in rows)
    union = sum(r["union"] for r in rows)
    out = {"iou": 100.0 * sum(r["iou"] for r in rows) / n,
           "overall_iou": 100.0 * inter / union if union > 0 else 0.0}  # D9
    for k in ("point_mask", "point_box", "box_acc", "point_any_object"):
        out[k] = 100.0 * sum(bool(r[k]) for r in rows) / n
    out["n"] = n
    return out
