"""Evaluation metrics for stage 1 and stage 2 (METHOD §3.6, §5), following TRIS's validate.py.

Maps reach the original image size the way TRIS's evaluation brings them there (METHOD §3.6):
  * `stage1_map(raw, input_hw, original_hw)`: the raw stage-1 score map R_ii (logits on the feature
    grid, before any ReLU) is upsampled to the network's input size (bilinear, align_corners=False),
    ReLU'd there, then resized to the original image size (bilinear, align_corners=True). ReLU before
    the first upsampling would grow the foreground by up to a grid cell on every side.
  * `stage2_map(logits, input_hw, original_hw)`: the same two resizes without the ReLU (TRIS's stage-2
    network upsamples its logits to the input size; its validation resizes them to the original size).

Per expression (`score_expression`), with the map already at the original image size:
  * the map is divided by its maximum (+1e-5, as TRIS). Stage 1: foreground = normalised map > 1e-9
    (TRIS's `pred.gt(1e-9)`, i.e. > 0). Stage 2: foreground = logit > 0.
  * inter / union / iou: |P & G|, |P | G|, their ratio.
  * point_mask / point_box / point_any_object: the argmax pixel lies in the GT mask / in the GT box
    (inclusive on pixel indices: pixel (r, c) is in [x1, y1, x2, y2] iff x1 <= c <= x2 and
    y1 <= r <= y2, as TRIS's isCorrectHit) / on any annotated object. Ties between equal maxima go to
    the first in row-major order (np.argmax).
  * box_acc (TRIS's generate_bbox on the binary foreground): one box per contour of the foreground,
    pixel (r, c) covering [c, c+1) x [r, r+1), so a contour over columns x..x+w-1 gives [x, y, x+w, y+h]
    (GT boxes from COCO's [x, y, w, h] use the same convention); its confidence is the share of
    foreground pixels inside the box; NMS at IoU 0.05; boxes whose confidence is not above 0.5 of
    the best are dropped; a hit if any kept box has IoU > 0.5 with the GT box.

Deliberate deviations from TRIS's code (docs/method.md §5 lists each with how often it changes a
result on the random-map families of tests/tris_protocol.py):
  1. A flat map (max == min: all zero after ReLU, say) has no peak and misses every pointing metric;
     TRIS takes np.argmax of a flat map, pixel (0, 0), and may "hit" there.
  2. NMS runs on corner boxes; TRIS passes [x, y, w, h] to NMS as if they were corners.
  3. External contours only (cv2.RETR_EXTERNAL); TRIS's RETR_TREE also boxes every hole.
  4. An empty union (empty GT and empty prediction) scores IoU 0; TRIS divides 0 by 0 (NaN).
  5. A foreground covering every pixel gives one box around the image; TRIS's min-max normalisation
     of that binary map divides by zero and returns the box [0, 0, 1, 1].
  6. Stage 2: an all-negative logit map predicts an empty foreground and points at its largest logit;
     TRIS divides by the (negative) maximum, which flips the signs and makes every pixel foreground.

`aggregate` turns a list of per-expression dicts into percentages: iou (mean IoU, the paper's "IoU"),
overall_iou (sum inter / sum union, the paper's "mIoU": D9), point_mask, point_box, box_acc,
point_any_object, and n.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

import ehin  # noqa: F401  (torchvision shim before torchvision.ops)
from torchvision.ops import nms



@dataclass(frozen=True)
class Metric:
    """One entry of the metric registry: every module names, orders, compares and prints metrics
    through REGISTRY (trainers, evaluation, rendering, checks, search, the CLIs)."""
    key: str  # the name in code, records and cells.json
    column: str  # the paper's column header, or the diagnostic's label
    higher_is_better: bool = True
    fmt: str = ".2f"
    in_paper: bool = True  # a column of the paper's tables (point_any_object is a diagnostic)
    scored: bool = True  # computed per expression by score_expression/aggregate (not a timing)


REGISTRY: tuple[Metric, ...] = (
    Metric("iou", "IoU"),  # mean IoU over expressions
    Metric("overall_iou", "mIoU"),  # Σ inter / Σ union (D9)
    Metric("point_box", "PointIt"),
    Metric("point_mask", "PointM"),
    Metric("box_acc", "BoxAcc"),
    Metric("point_any_object", "PointAny", in_paper=False),
    Metric("seconds_per_sample", "seconds_per_sample", higher_is_better=False, fmt=".4f", scored=False),  # Table 10
)
BY_KEY: dict[str, Metric] = {m.key: m for m in REGISTRY}
BY_COLUMN: dict[str, Metric] = {m.column: m for m in REGISTRY}
METRIC_KEYS: tuple[str, ...] = tuple(m.key for m in REGISTRY if m.scored)  # what `aggregate` returns (+ n)
QUALITY_KEYS: tuple[str, ...] = tuple(m.key for m in REGISTRY if m.scored and m.in_paper)  # the paper's five
PAPER_COLUMNS: dict[str, str] = {m.column: m.key for m in REGISTRY if m.scored and m.in_paper}


def format_metrics(values: dict, keys: Sequence[str] = METRIC_KEYS) -> str:
    """'IoU 12.34  mIoU 11.02  ...' in the registry's order, labels and formats (the CLIs' printouts)."""
    return "  ".join(f"{BY_KEY[k].column} {values[k]:{BY_KEY[k].fmt}}" for k in keys if k in values)


def format_result(label: str, values: dict, keys: Sequence[str] = METRIC_KEYS) -> str:
    """'<label>: IoU 12.34  mIoU 11.02 ...  (n=400)': a command's closing line, by the paper's column names."""
    n = f"  (n={values['n']})" if "n" in values else ""
    return f"{label}: {format_metrics(values, keys)}{n}"


# What these metrics compute, recorded in every result (bench.jobs) and shown by every rendered table.
# Records without it were scored by the earlier protocol (ReLU on the grid, BoxAcc at 0.5 of the max).
PROTOCOL = "tris-validate"
PROTOCOL_BEFORE = "pre-tris (ReLU on the grid, BoxAcc at 0.5 of the max)"
# Share of val expressions with an empty stage-1 map (no pixel > 0) at or above which a run is called
# collapsed: its scores are those of predicting no foreground, not of ranking regions (the trainer warns;
# a rendered table names such rows).
COLLAPSED_PCT = 95.0

NORM_EPS = 1e-5  # TRIS: pred / (max + 1e-5)
FG_EPS = 1e-9  # TRIS: foreground = normalised map > 1e-9
NMS_IOU = 0.05
CONFIDENCE_RATIO = 0.5  # keep boxes whose confidence is above this fraction of the best
BOX_HIT_IOU = 0.5

HW = Sequence[int]


def _resize(m: torch.Tensor, size: HW, align_corners: bool) -> torch.Tensor:
    return F.interpolate(m, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=align_corners)


def _to_original(raw, input_hw: HW, original_hw: HW, relu: bool) -> np.ndarray:
    m = torch.as_tensor(raw).detach().float()
    if m.dim() != 2:
        raise ValueError(f"expected one map [h, w], got shape {tuple(m.shape)}")
    return _batch_to_original(m[None, None], input_hw, original_hw, relu)[0, 0].cpu().numpy()


def _batch_to_original(m: torch.Tensor, input_hw: HW, original_hw: HW, relu: bool) -> torch.Tensor:
    m = _resize(m, input_hw, align_corners=False)  # TRIS: Upsample to the input size
    if relu:
        m = F.relu(m)  # METHOD §3.6: ReLU at the input size, after the upsampling
    return _resize(m, original_hw, align_corners=True)  # validate.py: to the original size


def maps_to_original(raw: torch.Tensor, input_hw: HW, original_hws: Sequence[HW], stage: int = 1) -> list[np.ndarray]:
    """A batch of maps [B, h, w] -> `stage1_map` (stage 1) or `stage2_map` (stage 2) of each, at its own
    original size: the maps of one size are resized together and copied to the host once (per map, on a
    GPU shared by several runs, each copy waited for the device: most of an evaluation's time)."""
    raw = torch.as_tensor(raw).detach().float()
    if raw.dim() != 3 or raw.shape[0] != len(original_hws):
        raise ValueError(f"expected maps [B, h, w] for {len(original_hws)} sizes, got shape {tuple(raw.shape)}")
    out: list[np.ndarray | None] = [None] * len(original_hws)
    for size in dict.fromkeys(tuple(int(v) for v in hw) for hw in original_hws):
        idx = [i for i, hw in enumerate(original_hws) if tuple(int(v) for v in hw) == size]
        maps = _batch_to_original(raw[idx][:, None], input_hw, size, relu=stage == 1)[:, 0].cpu().numpy()
        for i, m in zip(idx, maps):
            out[i] = m
    return out


def stage1_map(raw, input_hw: HW, original_hw: HW) -> np.ndarray:
    """Raw stage-1 score map R_ii [h, w] (logits, no ReLU) -> float32 [H0, W0] (METHOD §3.6)."""
    return _to_original(raw, input_hw, original_hw, relu=True)


def stage2_map(logits, input_hw: HW, original_hw: HW) -> np.ndarray:
    """Stage-2 logits [h, w] (finest head) -> float32 logits [H0, W0], resized as TRIS's stage 2."""
    return _to_original(logits, input_hw, original_hw, relu=False)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two corner boxes [x1, y1, x2, y2] (continuous coordinates)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, iw) * max(0.0, ih)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def boxes_from_foreground(fg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Corner boxes [K, 4] and confidences [K] kept from a binary foreground (module doc, box_acc)."""
    binary = np.asarray(fg, dtype=np.uint8)
    if not binary.any():
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    contours = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[-2]  # deviation 3
    boxes, conf = [], []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        boxes.append([x, y, x + w, y + h])
        conf.append(float(binary[y:y + h, x:x + w].mean()))  # share of foreground in the box (TRIS)
    b, s = torch.tensor(boxes, dtype=torch.float32), torch.tensor(conf, dtype=torch.float32)
    keep = nms(b, s, NMS_IOU)  # corner boxes (deviation 2); sorted by decreasing confidence
    b, s = b[keep], s[keep]
    ok = s > CONFIDENCE_RATIO * s[0]  # strictly above, as TRIS's `conf > max_drop_th * max`
    return b[ok].numpy(), s[ok].numpy()


def _peak(m: np.ndarray) -> tuple[int, int] | None:
    if m.size == 0 or not m.max() > m.min():  # flat (or all-zero) map: no peak, a miss (deviation 1)
        return None
    r, c = np.unravel_index(int(np.argmax(m)), m.shape)
    return int(r), int(c)


def score_expression(pred, gt_mask, gt_box_xyxy, objects_mask, stage: int = 1) -> dict:
    """Metrics of one (ref, sentence); pred [H0, W0] at the original size: stage 1 the output of
    `stage1_map`, stage 2 logits (`stage2_map`)."""
    pred = np.asarray(pred.detach().cpu() if torch.is_tensor(pred) else pred, dtype=np.float64)
    gt = np.asarray(gt_mask, dtype=bool)
    objects = np.asarray(objects_mask, dtype=bool)
    if pred.shape != gt.shape or objects.shape != gt.shape:
        raise ValueError(f"pred {pred.shape}, gt_mask {gt.shape} and objects_mask {objects.shape} must match")
    x1, y1, x2, y2 = (float(v) for v in np.asarray(gt_box_xyxy, dtype=np.float64).reshape(4))

    if stage == 1:
        m = np.maximum(pred, 0.0)  # already ReLU'd by stage1_map; a no-op there
        score = m / (m.max() + NORM_EPS)  # divide by the max (METHOD §5, TRIS)
        fg = score > FG_EPS
        peak = _peak(score)
    elif stage == 2:
        fg = pred > 0  # logit > 0; all-negative -> empty foreground (deviation 6)
        peak = _peak(pred)
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
    boxes, _ = boxes_from_foreground(fg)
    box_acc = any(box_iou(b, (x1, y1, x2, y2)) > BOX_HIT_IOU for b in boxes)
    return {
        "inter": inter,
        "union": union,
        "iou": inter / union if union > 0 else 0.0,  # deviation 4
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
    for k in METRIC_KEYS:
        if k not in out:  # the pointing and box metrics: shares of expressions
            out[k] = 100.0 * sum(bool(r[k]) for r in rows) / n
    out["n"] = n
    return {k: out[k] for k in (*METRIC_KEYS, "n")}
