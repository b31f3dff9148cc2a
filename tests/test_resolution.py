"""ehin.diagnostics.resolution: where a stage-1 map of a given size can peak, and the share of a
split's referents that holds such a pixel (the resolution ceiling on PointM)."""
import numpy as np
import pytest
import torch

from ehin.diagnostics import resolution
from ehin.metrics import _peak, stage1_map


def test_peak_pixels_sit_around_each_cells_centre():
    reach = resolution.peak_pixels((8, 8), (64, 64), (64, 64))
    rows = sorted(set(np.nonzero(reach)[0].tolist()))
    # interior cells: the two pixels either side of the centre (8k + 3.5); the edge cells: the runs
    # the resize clamps to the edge value (0-3 and 60-63)
    assert rows == [0, 1, 2, 3] + [p for k in range(1, 7) for p in (8 * k + 3, 8 * k + 4)] + [60, 61, 62, 63]
    assert reach.sum() == len(rows) ** 2 and (reach == reach.T).all()


def test_any_map_peaks_on_a_reachable_pixel():
    """The ceiling's premise: a random (non one-hot) map's peak lies on one of those pixels."""
    reach = resolution.peak_pixels((8, 8), (64, 64), (64, 64))
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        peak = _peak(stage1_map(torch.randn(8, 8, generator=g), (64, 64), (64, 64)))
        assert reach[peak]


class _Split:
    """Two refs on one 64 x 64 image: one covering the pixel (11, 11), one between the nodes."""

    def __init__(self):
        self.masks = {1: np.zeros((64, 64), np.uint8), 2: np.zeros((64, 64), np.uint8)}
        self.masks[1][10:13, 10:13] = 1  # holds (11, 11), the peak pixel of cell (1, 1)
        self.masks[2][14:18, 14:18] = 1  # between cells (1, 1) and (2, 2): no map of 8 x 8 peaks here

    def refs(self, split):
        return [{"image_id": 0, "ann_id": 1, "sentences": [{}, {}, {}]}, {"image_id": 0, "ann_id": 2, "sentences": [{}]}]

    def image_info(self, image_id):
        return {"height": 64, "width": 64}

    def ann_mask(self, ann_id):
        return self.masks[ann_id]


def test_pointable_share_counts_expressions_whose_referent_holds_a_peak_pixel():
    assert resolution.pointable_share(_Split(), "val", (8, 8), 64) == pytest.approx(3 / 4)
    # a map twice as fine has a centre at (15.5, 15.5): both referents become pointable
    assert resolution.pointable_share(_Split(), "val", (16, 16), 128) == pytest.approx(1.0)
