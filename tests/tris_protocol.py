"""TRIS's evaluation protocol, written here from what its validate.py does, to check ehin.metrics against.

`tris_expression` scores one map the way TRIS's validate.py and utils/box_eval_utils.generate_bbox do
(our own code: the steps, not their source). Each deliberate deviation of ehin.metrics (its module
docstring, docs/method.md §5) is a switch; with every switch on, the result must equal
`ehin.metrics.score_expression` exactly (tests/test_metrics.py). With one switch off at a time, the
random-map families below show how often that deviation changes a per-expression result:

    python -m tests.tris_protocol            # prints the table
    python -m tests.tris_protocol --write    # rewrites docs/metric_deviations.md (a test keeps it current)
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib import colormaps

import ehin  # noqa: F401  (torchvision shim before torchvision.ops)
from torchvision.ops import nms

from ehin import metrics as M

DOC = Path(__file__).resolve().parent.parent / "docs" / "metric_deviations.md"
RESULT_KEYS = ("iou", "point_mask", "point_box", "box_acc")


@dataclass(frozen=True)
class Deviations:
    """True = ehin.metrics' choice, False = what TRIS's code does (numbers: ehin.metrics' docstring)."""
    flat_map_misses: bool = True  # 1: TRIS takes argmax of a flat map, pixel (0, 0)
    nms_on_corner_boxes: bool = True  # 2: TRIS passes [x, y, w, h] to NMS as corners
    external_contours: bool = True  # 3: TRIS's RETR_TREE also boxes holes
    empty_union_is_zero: bool = True  # 4: TRIS: 0 / 0 = NaN
    constant_foreground_box: bool = True  # 5: TRIS: NaN normalisation, box [0, 0, 1, 1]
    stage2_logit_sign: bool = True  # 6: TRIS divides by a negative max and flips every sign


OURS = Deviations()
TRIS = Deviations(**{f.name: False for f in fields(Deviations)})
NAMES = {
    "flat_map_misses": "1. a flat map is a miss",
    "nms_on_corner_boxes": "2. NMS on corner boxes",
    "external_contours": "3. external contours only",
    "empty_union_is_zero": "4. an empty union scores 0",
    "constant_foreground_box": "5. a full (empty) foreground gives the image's box (no box)",
    "stage2_logit_sign": "6. stage 2: all-negative logits predict nothing",
}


def tris_boxes(binary: np.ndarray, dev: Deviations) -> list[tuple[float, float, float, float, float]]:
    """generate_bbox on a binary map: (x1, y1, x2, y2, confidence) per kept box."""
    x = binary.astype(np.float64)
    x = x - x.min()
    if x.max() == 0 and dev.constant_foreground_box and binary.all():
        x = np.ones_like(x)  # ours: a full foreground is foreground
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            x = x / x.max()  # TRIS: a constant map becomes NaN, which the colormap paints black
    rgb = (colormaps["cubehelix"](x)[..., :3].astype(np.float32) * 255.0).astype(np.uint8)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    _, thr = cv2.threshold(gray, int(0.5 * np.max(gray)), 255, cv2.THRESH_TOZERO)
    mode = cv2.RETR_EXTERNAL if dev.external_contours else cv2.RETR_TREE
    contours = cv2.findContours(thr, mode, cv2.CHAIN_APPROX_SIMPLE)[-2]
    if not contours:
        return [(0, 0, 1, 1, 0.0)]
    props = [cv2.boundingRect(c) for c in contours]
    conf = [float(thr[y:y + h, x:x + w].mean() / 255) for x, y, w, h in props]
    as_given = [(x, y, x + w, y + h) if dev.nms_on_corner_boxes else (x, y, w, h) for x, y, w, h in props]
    keep = nms(torch.tensor(as_given, dtype=torch.float32), torch.tensor(conf, dtype=torch.float32), M.NMS_IOU)
    best = max(conf)
    return [(x, y, x + w, y + h, conf[i]) for i in keep.tolist() for x, y, w, h in [props[i]]
            if conf[i] > M.CONFIDENCE_RATIO * best]


def tris_expression(pred: np.ndarray, gt: np.ndarray, box, objects: np.ndarray, stage: int = 1,
                    dev: Deviations = TRIS) -> dict:
    """One expression scored as TRIS's validate.py does, with `dev`'s switches (pred at the original size)."""
    pred = np.asarray(pred, dtype=np.float64)
    norm = pred / (pred.max() + M.NORM_EPS)  # pred /= adaptive_max_pool2d(pred) + 1e-5
    if stage == 2 and dev.stage2_logit_sign:
        fg, heat = pred > 0, pred
    else:
        fg, heat = norm > M.FG_EPS, norm
    heat = heat.astype(np.float32)
    inter, union = int((fg & gt).sum()), int((fg | gt).sum())
    iou = inter / union if union else (0.0 if dev.empty_union_is_zero else math.nan)
    x1, y1, x2, y2 = (float(v) for v in box)
    if dev.flat_map_misses and not heat.max() > heat.min():
        point_mask = point_box = point_any = False
    else:
        r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
        point_mask, point_any = bool(gt[r, c]), bool(objects[r, c])
        point_box = bool(x1 <= c <= x2 and y1 <= r <= y2)
    if fg.any() or not dev.constant_foreground_box:
        boxes = tris_boxes(fg, dev)
    else:
        boxes = []  # ours: an empty foreground has no box (TRIS's [0, 0, 1, 1] fallback never hits a real GT)
    box_acc = any(M.box_iou(b[:4], (x1, y1, x2, y2)) > M.BOX_HIT_IOU for b in boxes)
    return {"inter": inter, "union": union, "iou": iou, "point_mask": point_mask, "point_box": point_box,
            "box_acc": bool(box_acc), "point_any_object": point_any}


# ---- random-map families ----------------------------------------------------------------------------

@dataclass
class Case:
    pred: np.ndarray  # at the original size (stage1_map / stage2_map of a grid map)
    gt: np.ndarray
    box: tuple[float, float, float, float]
    objects: np.ndarray
    stage: int


def _rect(rng, h, w, lo=0.15, hi=0.6):
    rh, rw = (max(1, int(rng.uniform(lo, hi) * n)) for n in (h, w))
    y, x = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
    return y, x, rh, rw


def _case(rng, grid_map: np.ndarray, stage: int, target=None) -> Case:
    s = 32
    h0, w0 = (int(v) for v in rng.integers(24, 49, size=2))
    to_original = M.stage1_map if stage == 1 else M.stage2_map
    pred = to_original(torch.from_numpy(grid_map.astype(np.float32)), (s, s), (h0, w0))
    y, x, rh, rw = target if target is not None else _rect(rng, h0, w0)
    y, x = min(y, h0 - 1), min(x, w0 - 1)
    gt = np.zeros((h0, w0), bool)
    gt[y:y + rh, x:x + rw] = True
    oy, ox, orh, orw = _rect(rng, h0, w0)
    objects = gt.copy()
    objects[oy:oy + orh, ox:ox + orw] = True
    ys, xs = np.nonzero(gt)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    return Case(pred, gt, box, objects, stage)


def _blob_map(rng, g: int, centre, radius, amplitude=1.0) -> np.ndarray:
    yy, xx = np.mgrid[0:g, 0:g] + 0.5
    return amplitude * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * radius ** 2))


def family_noise(rng) -> Case:
    """Uniform noise in [-1, 1] on a 2x2 to 10x10 grid (the issue's 'random cases')."""
    g = int(rng.integers(2, 11))
    return _case(rng, rng.uniform(-1, 1, (g, g)), 1)


def family_blobs(rng) -> Case:
    """Plausible 10x10 score grids: a positive blob over the target, sometimes a weaker distractor."""
    g, h0, w0 = 10, 40, 40
    y, x, rh, rw = _rect(rng, h0, w0, 0.15, 0.45)
    centre = ((y + rh / 2) * g / h0, (x + rw / 2) * g / w0)
    m = _blob_map(rng, g, centre, max(rh, rw) * g / h0 / 2.5, 2.0) - rng.uniform(0.2, 0.8)
    if rng.random() < 0.5:
        m += _blob_map(rng, g, rng.uniform(0, g, 2), rng.uniform(0.8, 2.0), rng.uniform(0.5, 1.5))
    m += rng.normal(0, 0.1, (g, g))
    return _case(rng, m, 1, target=(y, x, rh, rw))


def family_rings(rng) -> Case:
    """Positive rings on a 10x10 grid (a blob with a negative hole): shapes with holes."""
    g = 10
    cy, cx = rng.uniform(3, 7, 2)
    yy, xx = np.mgrid[0:g, 0:g] + 0.5
    d = np.hypot(yy - cy, xx - cx)
    r = rng.uniform(2.0, 3.5)
    m = 1.0 - np.abs(d - r) * rng.uniform(0.8, 1.6) + rng.normal(0, 0.15, (g, g))
    return _case(rng, m, 1)


def family_degenerate(rng) -> Case:
    """All-negative, all-zero, constant and everywhere-positive maps (the edge cases)."""
    g = int(rng.integers(2, 9))
    kind = int(rng.integers(4))
    m = [-rng.uniform(0.1, 1, (g, g)), np.zeros((g, g)), np.full((g, g), rng.uniform(0.1, 2)),
         rng.uniform(0.2, 1, (g, g))][kind]
    return _case(rng, m, 1)


def family_stage2(rng) -> Case:
    """Stage-2 logits on an 8x8 grid: a blob minus an offset, a fifth of them all negative."""
    g = 8
    m = _blob_map(rng, g, rng.uniform(1, 7, 2), rng.uniform(1, 2.5), rng.uniform(1, 4)) - rng.uniform(0.5, 2)
    if rng.random() < 0.2:
        m = m - m.max() - rng.uniform(0.1, 1)
    return _case(rng, m + rng.normal(0, 0.2, (g, g)), 2)


FAMILIES = {"noise": family_noise, "blobs": family_blobs, "rings": family_rings,
            "degenerate": family_degenerate, "stage2": family_stage2}


def cases(family: str, n: int, seed: int = 0) -> list[Case]:
    rng = np.random.default_rng([seed, list(FAMILIES).index(family)])
    return [FAMILIES[family](rng) for _ in range(n)]


def _differs(a: dict, b: dict) -> list[str]:
    out = []
    for k in RESULT_KEYS:
        x, y = a[k], b[k]
        same = (math.isnan(x) and math.isnan(y)) if isinstance(x, float) and math.isnan(x) else x == y
        if not same:
            out.append(k)
    return out


def deviation_table(n: int = 300, seed: int = 0) -> list[dict]:
    """Per family: how many cases each deviation alone changes (and which results), and TRIS overall."""
    rows = []
    for family in FAMILIES:
        cs = cases(family, n, seed)
        ours = [tris_expression(c.pred, c.gt, c.box, c.objects, c.stage, OURS) for c in cs]
        row = {"family": family, "n": n, "changed": {}}
        for name in NAMES:
            changed, keys = 0, set()
            for c, o in zip(cs, ours):
                d = _differs(o, tris_expression(c.pred, c.gt, c.box, c.objects, c.stage,
                                                replace(OURS, **{name: False})))
                changed += bool(d)
                keys.update(d)
            row["changed"][name] = (changed, sorted(keys))
        row["any"] = sum(bool(_differs(o, tris_expression(c.pred, c.gt, c.box, c.objects, c.stage, TRIS)))
                         for c, o in zip(cs, ours))
        rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    lines = ["# How often each deviation from TRIS's evaluation code changes a result", "",
             "Generated by `python -m tests.tris_protocol --write` (do not edit by hand; a test checks it).",
             "Each cell: cases whose per-expression IoU, PointM, PointIt or BoxAcc changes when that one",
             "deviation is replaced by what TRIS's code does, out of the family's cases, and which results",
             "change. The families are random maps on small grids taken to the original size by",
             "`ehin.metrics.stage1_map` / `stage2_map` (tests/tris_protocol.py says how each is drawn).", "",
             "| deviation | " + " | ".join(r["family"] for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for name, label in NAMES.items():
        cells = []
        for r in rows:
            c, keys = r["changed"][name]
            cells.append(f"{c} / {r['n']}" + (f" ({', '.join(keys)})" if keys else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| all six at once (TRIS's code) | " + " | ".join(f"{r['any']} / {r['n']}" for r in rows) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.tris_protocol", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help=f"rewrite {DOC.relative_to(DOC.parent.parent)}")
    args = p.parse_args(argv)
    text = render(deviation_table())
    if args.write:
        DOC.write_text(text)
        print(f"wrote {DOC}")
    else:
        print(text)


if __name__ == "__main__":
    main()
