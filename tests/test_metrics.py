"""Metrics (METHOD §5) on hand-made maps, masks and boxes with hand-worked answers."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import torch.nn.functional as F

from ehin.metrics import (PAPER_COLUMNS, METRIC_KEYS, aggregate, boxes_from_foreground, score_expression, stage1_map,
                          stage2_map)
from ehin import metrics as M
from tests import tris_protocol as T


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


def _two_blobs():
    m = np.zeros((20, 20))
    m[2:6, 2:6] = 1.0  # blob A: box [2, 2, 6, 6]
    m[12:18, 10:18] = 0.05  # blob B: box [10, 12, 18, 18]; any positive value is foreground
    return m


def test_boxacc_boxes_the_binary_foreground():
    m = _two_blobs()
    boxes, conf = boxes_from_foreground(m > 0)
    assert sorted(map(tuple, boxes.tolist())) == [(2, 2, 6, 6), (10, 12, 18, 18)]
    assert conf.tolist() == pytest.approx([1.0, 1.0])  # both full: the map's values do not matter
    none = np.zeros((20, 20), bool)
    assert score_expression(m, none, [10, 12, 18, 18], none)["box_acc"]  # the faint blob B still boxes
    assert score_expression(m, none, [2, 2, 6, 6], none)["box_acc"]
    # blob B's box is 8 x 6 = 48 px. GT [10, 12, 18, 24] (8 x 12 = 96) contains it: IoU = 48 / 96 = 0.5,
    # not > 0.5 -> miss; GT [10, 12, 18, 23] (88): IoU = 48 / 88 = 0.545 -> hit
    assert not score_expression(m, none, [10, 12, 18, 24], none)["box_acc"]
    assert score_expression(m, none, [10, 12, 18, 23], none)["box_acc"]
    assert not score_expression(m, none, [0, 10, 6, 19], none)["box_acc"]  # matches neither


def test_boxacc_a_faint_halo_joins_the_target_box():
    # The 10x10 example: 1.0 on the 4x4 target [2, 2, 6, 6], 0.1 elsewhere in [0, 8)^2. TRIS
    # boxes the foreground (map > 0): one box [0, 0, 8, 8], IoU 16 / 64 with the GT -> a miss. The old
    # threshold at 0.5 of the max boxed [2, 2, 6, 6], a hit.
    m = np.zeros((10, 10))
    m[0:8, 0:8] = 0.1
    m[2:6, 2:6] = 1.0
    boxes, conf = boxes_from_foreground(m > 0)
    assert boxes.tolist() == [[0, 0, 8, 8]] and conf.tolist() == [1.0]
    none = np.zeros((10, 10), bool)
    assert not score_expression(m, none, [2, 2, 6, 6], none)["box_acc"]
    assert score_expression(m, none, [0, 0, 8, 8], none)["box_acc"]


def test_boxacc_confidence_is_the_share_of_foreground_in_the_box():
    # Blob B is a hollow 8x8 square ring: 28 of its box's 64 px are on -> confidence 0.4375, not above
    # 0.5 * 1.0 (blob A's) -> dropped.
    m = np.zeros((20, 20))
    m[2:6, 2:6] = 1.0
    m[10:18, 10:18] = 0.6
    m[11:17, 11:17] = 0.0
    boxes, conf = boxes_from_foreground(m > 0)
    assert boxes.tolist() == [[2, 2, 6, 6]] and conf.tolist() == pytest.approx([1.0])
    none = np.zeros((20, 20), bool)
    assert not score_expression(m, none, [10, 10, 18, 18], none)["box_acc"]
    m[11:17, 11:17] = 0.6  # filled: confidence 1.0, kept -> hit
    assert score_expression(m, none, [10, 10, 18, 18], none)["box_acc"]


def test_boxacc_keeps_only_boxes_strictly_above_half_the_best():
    # A 7-px staircase in a 4x4 box plus one more pixel: 8 / 16 = exactly 0.5 of the full square's 1.0.
    # TRIS keeps `conf > 0.5 * max`, so it is dropped; a ninth pixel (9 / 16) keeps it.
    m = np.zeros((20, 20))
    m[2:6, 2:6] = 1.0
    for r, c in [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (3, 3), (3, 2)]:
        m[10 + r, 10 + c] = 1.0
    boxes, conf = boxes_from_foreground(m > 0)
    assert boxes.tolist() == [[2, 2, 6, 6]]
    m[11, 10] = 1.0
    boxes, conf = boxes_from_foreground(m > 0)
    assert sorted(map(tuple, boxes.tolist())) == [(2, 2, 6, 6), (10, 10, 14, 14)]
    assert sorted(conf.tolist()) == pytest.approx([9 / 16, 1.0])


def test_boxacc_nms_suppresses_an_overlapping_weaker_box():
    # An L-shaped blob (box [0, 0, 10, 10], 51 of 100 px on -> confidence 0.51) around a 4x4 square
    # (box [4, 2, 8, 6], confidence 1). IoU = 16 / 100 = 0.16 > 0.05: NMS keeps only the square.
    boxes, conf = boxes_from_foreground(_l_and_square() > 0)
    assert boxes.tolist() == [[4, 2, 8, 6]]
    none = np.zeros((12, 12), bool)
    assert not score_expression(_l_and_square(), none, [0, 0, 10, 10], none)["box_acc"]
    assert score_expression(_l_and_square(), none, [4, 2, 8, 6], none)["box_acc"]


def _l_and_square():
    m = np.zeros((12, 12))
    m[0:10, 0:3] = 1.0
    m[7:10, 0:10] = 1.0
    m[2:6, 4:8] = 1.0
    return m


# ---- the map pipeline (METHOD §3.6) ---------------------------------------------------------------

def test_stage1_map_applies_relu_after_upsampling():
    # The 2x2 grid [[1, -1], [-1, -1]] taken to 8x8: ReLU after the upsampling keeps 15 px;
    # ReLU on the grid first (the old pipeline) spreads the one positive cell over 36.
    grid = torch.tensor([[1.0, -1.0], [-1.0, -1.0]])
    m = stage1_map(grid, (8, 8), (8, 8))
    assert isinstance(m, np.ndarray) and m.shape == (8, 8) and m.dtype == np.float32
    assert int((m > 0).sum()) == 15
    relu_first = F.interpolate(F.relu(grid)[None, None], size=(8, 8), mode="bilinear", align_corners=False)
    assert int((relu_first > 0).sum()) == 36
    gt = np.zeros((8, 8), bool)
    gt[:4, :4] = True
    r = score_expression(m, gt, [0, 0, 4, 4], gt)
    assert (r["inter"], r["union"]) == (15, 16)


def test_stage1_map_resizes_input_then_original_as_tris():
    torch.manual_seed(0)
    raw = torch.randn(5, 5)
    m = stage1_map(raw, (20, 20), (13, 31))
    at_input = F.relu(F.interpolate(raw[None, None], size=(20, 20), mode="bilinear", align_corners=False))
    expected = F.interpolate(at_input, size=(13, 31), mode="bilinear", align_corners=True)[0, 0]
    np.testing.assert_allclose(m, expected.numpy(), rtol=0, atol=1e-6)
    assert m[0, 0] == pytest.approx(float(at_input[0, 0, 0, 0]))  # align_corners=True keeps the corners
    assert m[-1, -1] == pytest.approx(float(at_input[0, 0, -1, -1]))
    assert (m >= 0).all()


def test_stage2_map_keeps_the_sign_of_the_logits():
    logits = torch.tensor([[2.0, -3.0], [-1.0, -4.0]])
    m = stage2_map(logits, (8, 8), (6, 6))
    at_input = F.interpolate(logits[None, None], size=(8, 8), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(m, F.interpolate(at_input, size=(6, 6), mode="bilinear", align_corners=True)[0, 0].numpy(),
                               atol=1e-6)
    assert (m < 0).any() and (m > 0).any()


def test_stage1_map_rejects_a_batch():
    with pytest.raises(ValueError, match="one map"):
        stage1_map(torch.zeros(2, 3, 3), (8, 8), (8, 8))


# ---- each listed deviation from TRIS's code (tests/tris_protocol.py), shown on a hand-made case -----

def _both(name: str, pred, gt, box, objects, stage: int = 1) -> tuple[dict, dict]:
    ours = score_expression(pred, gt, box, objects, stage=stage)
    assert ours == T.tris_expression(pred, gt, box, objects, stage, T.OURS)
    return ours, T.tris_expression(pred, gt, box, objects, stage, replace(T.OURS, **{name: False}))


def test_deviation_flat_map_is_a_miss():
    gt = _mask((6, 6), (0, 3, 0, 3))
    ours, tris = _both("flat_map_misses", np.zeros((6, 6)), gt, [0, 0, 3, 3], gt)
    assert not ours["point_mask"] and not ours["point_box"]
    assert tris["point_mask"] and tris["point_box"]  # argmax of zeros is pixel (0, 0), inside the GT


def test_deviation_nms_on_corner_boxes():
    # TRIS passes the square's (x, y, w, h) = (4, 2, 4, 4) to NMS as corners: a zero-area box, so the
    # L-shape's box (0, 0, 10, 10) is not suppressed and its 0.51 confidence keeps it.
    none = np.zeros((12, 12), bool)
    ours, tris = _both("nms_on_corner_boxes", _l_and_square(), none, [0, 0, 10, 10], none)
    assert not ours["box_acc"] and tris["box_acc"]


def test_deviation_external_contours_only():
    # A 10x10 square ring (hole [2, 8)^2) with a long 1-px tail: the outer box [0, 0, 30, 30] holds
    # 104 foreground px of 900 (0.116). RETR_TREE adds the hole's box [1, 1, 9, 9] (28 / 64 = 0.4375),
    # which then wins NMS (IoU 64 / 900 > 0.05) and suppresses the outer box.
    m = np.zeros((30, 30))
    m[0:10, 0:10] = 1.0
    m[2:8, 2:8] = 0.0
    m[0, 10:] = 1.0
    m[10:, 0] = 1.0
    none = np.zeros((30, 30), bool)
    ours, tris = _both("external_contours", m, none, [1, 1, 9, 9], none)
    assert not ours["box_acc"] and tris["box_acc"]
    assert boxes_from_foreground(m > 0)[0].tolist() == [[0, 0, 30, 30]]


def test_deviation_empty_union_scores_zero():
    empty = np.zeros((4, 4), bool)
    ours, tris = _both("empty_union_is_zero", np.zeros((4, 4)), empty, [0, 0, 1, 1], empty)
    assert ours["iou"] == 0.0 and math.isnan(tris["iou"])


def test_deviation_full_foreground_is_boxed():
    # A map positive everywhere: one box around the image. TRIS's min-max normalisation of the
    # all-ones foreground divides by zero and its fallback box is [0, 0, 1, 1].
    m = np.random.default_rng(0).uniform(0.5, 1.0, (8, 8))
    gt = np.ones((8, 8), bool)
    ours, tris = _both("constant_foreground_box", m, gt, [0, 0, 8, 8], gt)
    assert ours["box_acc"] and not tris["box_acc"]


def test_deviation_stage2_all_negative_logits():
    gt = _mask((6, 6), (1, 4, 1, 4))
    logits = np.full((6, 6), -3.0)
    logits[2, 2] = -0.5
    ours, tris = _both("stage2_logit_sign", logits, gt, [1, 1, 4, 4], gt, stage=2)
    assert (ours["inter"], ours["union"]) == (0, 9) and ours["point_mask"]
    assert (tris["inter"], tris["union"]) == (9, 36)  # dividing by the negative max made all foreground


def test_tris_protocol_reference_equals_ours_on_every_random_family():
    for family in T.FAMILIES:
        for c in T.cases(family, 60, seed=1):
            assert score_expression(c.pred, c.gt, c.box, c.objects, stage=c.stage) == \
                T.tris_expression(c.pred, c.gt, c.box, c.objects, c.stage, T.OURS), family


def test_deviation_table_in_the_docs_is_current():
    assert T.DOC.read_text() == T.render(T.deviation_table()), "run: python -m tests.tris_protocol --write"


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


def test_one_metric_registry_names_everything():
    from bench import check, search, sweeps
    from ehin.metrics import BY_KEY, QUALITY_KEYS, REGISTRY, format_metrics

    assert list(PAPER_COLUMNS) == ["IoU", "mIoU", "PointIt", "PointM", "BoxAcc"]  # the paper's column order
    assert tuple(PAPER_COLUMNS.values()) == QUALITY_KEYS == tuple(check.METRICS)
    assert search.PAPER_METRICS == PAPER_COLUMNS
    assert {sweeps.METRIC_NAMES[c] for c in PAPER_COLUMNS} == set(QUALITY_KEYS)
    assert sweeps.METRIC_NAMES["seconds_per_sample"] == "seconds_per_sample"
    assert not BY_KEY["seconds_per_sample"].higher_is_better and len({m.key for m in REGISTRY}) == len(REGISTRY)
    text = format_metrics({"iou": 12.345, "point_mask": 50.0, "n": 3})
    assert text == "IoU 12.35  PointM 50.00"  # the paper's labels, in the registry's order, n left out


@pytest.mark.parametrize("stage", [1, 2])
def test_maps_to_original_equals_each_map_on_its_own(stage):
    """The batched resize evaluation uses gives every map exactly what stage1_map / stage2_map give it,
    also when a batch mixes original sizes (kept in batch order)."""
    torch.manual_seed(0)
    raw = torch.randn(5, 8, 8)
    sizes = [(64, 48), (30, 30), (64, 48), (17, 90), (30, 30)]
    one = M.stage1_map if stage == 1 else M.stage2_map
    got = M.maps_to_original(raw, (64, 64), sizes, stage=stage)
    for m, r, size in zip(got, raw, sizes):
        assert m.shape == size and np.array_equal(m, one(r, (64, 64), size))
    with pytest.raises(ValueError):
        M.maps_to_original(raw, (64, 64), sizes[:4])
