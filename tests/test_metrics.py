"""Metrics (METHOD §5) on hand-made maps, masks and boxes with hand-worked answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ehin.metrics import PAPER_COLUMNS, METRIC_KEYS, aggregate, boxes_from_map, score_expression, upsample_to


def _mask(shape, *rects):
    """Boolean mask with the given [r0:r1, c0:c1] rectangles set."""
    m = np.zeros(shape, bool)
    for r0, r1, c0, c1 in rects:
        m[r0:r1, c0:c1] = True
    return m


def test_iou_mean_and_overall_differ_on_expressions_of_different_sizes():
    # A: 4x4 image, GT = top-left 2x2 (4 px); prediction covers row 0 (4 px): inter 2, union 6 -> 1/3
    gt_a = _mask((4, 4), (0, 2, 0, 2))
    pred_a = np.zeros((4, 4))
    pred_a[0, :] = [1.0, 0.5, 0.2, 0.1]
    a = score_expression(pred_a, gt_a, [0, 0, 2, 2], gt_a)
    assert (a["inter"], a["union"]) == (2, 6) and a["iou"] == pytest.approx(1 / 3)
    # B: 10x10 image, GT = left half (50 px); prediction = 40 px inside it: inter 40, union 50 -> 0.8
    gt_b = _mask((10, 10), (0, 10, 0, 5))
    pred_b = np.where(_mask((10, 10), (0, 8, 0, 5)), 2.0, -1.0)  # negatives vanish under ReLU
    b = score_expression(pred_b, gt_b, [0, 0, 5, 10], gt_b)
    assert (b["inter"], b["union"]) == (40, 50) and b["iou"] == pytest.approx(0.8)
    agg = aggregate([a, b])
    assert agg["n"] == 2
    assert agg["iou"] == pytest.approx(100 * (1 / 3 + 0.8) / 2)  # 56.67: mean of ratios
    assert agg["overall_iou"] == pytest.approx(100 * 42 / 56)  # 75.0: ratio of sums (D9)


def test_all_zero_map_misses_everywhere_not_at_pixel_0_0():
    gt = _mask((6, 6), (0, 3, 0, 3))  # GT, box and objects all contain pixel (0, 0)
    for pred in (np.zeros((6, 6)), -np.ones((6, 6))):  # all zero / all negative (zero after ReLU)
        r = score_expression(pred, gt, [0, 0, 3, 3], np.ones((6, 6), bool))
        assert r["inter"] == 0 and r["union"] == 9 and r["iou"] == 0.0
        assert not r["point_mask"] and not r["point_box"] and not r["point_any_object"]
        assert not r["box_acc"]


def test_argmax_on_the_box_edge_counts_inclusive():
    box = [2, 2, 5, 5]  # x1, y1, x2, y2
    gt = np.zeros((10, 10), bool)
    for (r, c), inside in {(3, 5): True, (5, 5): True, (2, 2): True, (3, 6): False, (6, 3): False}.items():
        pred = np.zeros((10, 10))
        pred[r, c] = 1.0
        assert score_expression(pred, gt, box, gt)["point_box"] is inside, (r, c)


def test_pointing_uses_the_mask_and_all_objects():
    gt = _mask((8, 8), (0, 2, 0, 2))
    objects = gt | _mask((8, 8), (5, 8, 5, 8))
    pred = np.zeros((8, 8))
    pred[6, 6] = 3.0  # on another object
    pred[1, 1] = 1.0
    r = score_expression(pred, gt, [0, 0, 2, 2], objects)
    assert not r["point_mask"] and not r["point_box"] and r["point_any_object"]
    pred[1, 1] = 5.0  # now the peak is on the target
    r = score_expression(pred, gt, [0, 0, 2, 2], objects)
    assert r["point_mask"] and r["point_box"] and r["point_any_object"]


def _two_blobs(second_value=0.8):
    m = np.zeros((20, 20))
    m[2:6, 2:6] = 1.0  # blob A: box [2, 2, 6, 6]
    m[12:18, 10:18] = second_value  # blob B: box [10, 12, 18, 18]
    return m


def test_boxacc_disjoint_blobs():
    m = _two_blobs()
    boxes, conf = boxes_from_map(m)
    assert sorted(map(tuple, boxes.tolist())) == [(2, 2, 6, 6), (10, 12, 18, 18)]
    assert conf.tolist() == pytest.approx([1.0, 0.8])
    none = np.zeros((20, 20), bool)
    assert score_expression(m, none, [10, 12, 18, 18], none)["box_acc"]  # matches blob B exactly
    assert score_expression(m, none, [2, 2, 6, 6], none)["box_acc"]  # matches blob A
    # blob B's box is 8 x 6 = 48 px. GT [10, 12, 18, 24] (8 x 12 = 96) contains it: IoU = 48 / 96 = 0.5,
    # not > 0.5 -> miss; GT [10, 12, 18, 23] (88): IoU = 48 / 88 = 0.545 -> hit
    assert not score_expression(m, none, [10, 12, 18, 24], none)["box_acc"]
    assert score_expression(m, none, [10, 12, 18, 23], none)["box_acc"]
    assert not score_expression(m, none, [0, 10, 6, 19], none)["box_acc"]  # matches neither


def test_boxacc_threshold_is_half_of_the_max():
    m = _two_blobs(second_value=0.45)  # under 0.5 of the max: no contour for blob B
    none = np.zeros((20, 20), bool)
    assert not score_expression(m, none, [10, 12, 18, 18], none)["box_acc"]
    # scaling the whole map changes nothing (divided by its max)
    assert score_expression(7 * _two_blobs(), none, [10, 12, 18, 18], none)["box_acc"]


def test_boxacc_drops_low_confidence_blobs():
    # Blob B is a hollow 8x8 square ring of value 0.6: 28 of its box's 64 px are on, so its
    # confidence (mean over its box) is 0.6 * 28 / 64 = 0.2625 < 0.5 * 1.0 (blob A's) -> dropped.
    m = np.zeros((20, 20))
    m[2:6, 2:6] = 1.0
    m[10:18, 10:18] = 0.6
    m[11:17, 11:17] = 0.0
    boxes, conf = boxes_from_map(m)
    assert boxes.tolist() == [[2, 2, 6, 6]] and conf.tolist() == pytest.approx([1.0])
    none = np.zeros((20, 20), bool)
    assert not score_expression(m, none, [10, 10, 18, 18], none)["box_acc"]
    m[11:17, 11:17] = 0.6  # filled: confidence 0.6 >= 0.5, kept -> hit
    assert score_expression(m, none, [10, 10, 18, 18], none)["box_acc"]


def test_boxacc_nms_suppresses_an_overlapping_weaker_box():
    # An L-shaped blob (box [0, 0, 10, 10], 51 of 100 px on -> confidence 0.51) around a 4x4 square
    # (box [4, 2, 8, 6], confidence 1). IoU = 16 / 100 = 0.16 > 0.05: NMS keeps only the square.
    m = np.zeros((12, 12))
    m[0:10, 0:3] = 1.0
    m[7:10, 0:10] = 1.0
    m[2:6, 4:8] = 1.0
    boxes, conf = boxes_from_map(m)
    assert boxes.tolist() == [[4, 2, 8, 6]]
    none = np.zeros((12, 12), bool)
    assert not score_expression(m, none, [0, 0, 10, 10], none)["box_acc"]
    assert score_expression(m, none, [4, 2, 8, 6], none)["box_acc"]


def test_stage2_all_negative_logits_predict_empty_foreground():
    gt = _mask((6, 6), (1, 4, 1, 4))
    logits = np.full((6, 6), -3.0)
    logits[2, 2] = -0.5
    r = score_expression(logits, gt, [1, 1, 4, 4], gt, stage=2)
    assert (r["inter"], r["union"], r["iou"]) == (0, 9, 0.0)
    assert not r["box_acc"]
    assert r["point_mask"]  # the peak of the logits is still where the model points
    # stage 2 foreground = logit > 0, however small
    logits[1:4, 1:4] = 0.01
    r = score_expression(logits, gt, [1, 1, 4, 4], gt, stage=2)
    assert (r["inter"], r["union"]) == (9, 9) and r["box_acc"]
    # the same map read as stage 1 keeps every positive value too, but its negatives vanish
    r1 = score_expression(logits, gt, [1, 1, 4, 4], gt, stage=1)
    assert (r1["inter"], r1["union"]) == (9, 9)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="match"):
        score_expression(np.zeros((4, 4)), np.zeros((4, 5), bool), [0, 0, 1, 1], np.zeros((4, 5), bool))


def test_upsample_to():
    m = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    up = upsample_to(m, (4, 6))
    assert isinstance(up, np.ndarray) and up.shape == (4, 6) and up.dtype == np.float32
    ref = torch.nn.functional.interpolate(m[None, None], size=(4, 6), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(up, ref[0, 0].numpy())
    assert up[0, 0] == 0.0 and up[-1, -1] == 3.0  # align_corners=False clamps at the borders
    np.testing.assert_allclose(upsample_to(torch.full((3, 3), 2.5), (7, 5)), 2.5)


def test_aggregate_keys_and_paper_columns():
    gt = _mask((4, 4), (0, 2, 0, 2))
    rows = [score_expression(np.where(gt, 1.0, 0.0), gt, [0, 0, 2, 2], gt),
            score_expression(np.zeros((4, 4)), gt, [0, 0, 2, 2], gt)]
    agg = aggregate(rows)
    assert set(METRIC_KEYS) | {"n"} == set(agg)
    assert set(PAPER_COLUMNS.values()) <= set(agg)
    assert agg["point_mask"] == 50.0 and agg["iou"] == 50.0 and agg["overall_iou"] == pytest.approx(100 * 4 / 8)
    assert agg["box_acc"] == 50.0 and agg["n"] == 2
    empty = aggregate([])
    assert empty["n"] == 0 and math.isnan(empty["iou"])
