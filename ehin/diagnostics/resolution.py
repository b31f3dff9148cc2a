"""The resolution ceiling: how much of a split a model's score map can point at, whatever it learns.

Stage 1's map is the backbone's feature grid (8 x 8 for clip-tiny-rn at 64 px). PointM scores its
argmax after the evaluation's resizes (ehin.metrics.stage1_map: bilinear to the input size, ReLU,
bilinear to the original size). A bilinear surface peaks at its grid nodes, so the argmax can only
land on the few pixels next to a map cell's centre (`peak_pixels`). A referent
whose mask holds none of them cannot be hit by any map of that size, and small or occluded referents
between the nodes cap PointM below 100 % for every model, the language-blind guess (which points at
an object's own pixel) excepted. `pointable_share` measures that cap on a split: a property of the
scenes and the model's map size, read from no trained model (TESTBED §2).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


def _axis_reach(cells: int, n_input: int, n_original: int) -> np.ndarray:
    """bool [n_original]: the pixels of one axis where an evaluated map can peak. The evaluation's
    resizes are linear along each axis, so a ramp 0..cells-1 comes out as each pixel's position in
    map cells; a piecewise-bilinear surface sampled on a grid peaks at a sample next to a node (the
    nearest pixel on either side of a map cell's position; every pixel of a run that the resize
    clamps to the edge node, where float rounding breaks the tie)."""
    from ehin.metrics import _resize

    ramp = torch.arange(cells, dtype=torch.float64).view(1, 1, 1, cells)
    pos = _resize(_resize(ramp, (1, n_input), align_corners=False), (1, n_original), align_corners=True)[0, 0, 0]
    pos = pos.numpy()
    out = np.zeros(n_original, bool)
    for k in range(cells):
        at = np.isclose(pos, k, atol=1e-9)
        if at.any():  # pixels on the node itself: their neighbours never beat them
            out |= at
            continue
        below, above = np.nonzero(pos < k - 1e-9)[0], np.nonzero(pos > k + 1e-9)[0]
        if below.size:
            out[below[np.argmax(pos[below])]] = True
        if above.size:
            out[above[np.argmin(pos[above])]] = True
    return out


@lru_cache(maxsize=16)
def peak_pixels(map_hw: tuple[int, int], input_hw: tuple[int, int], original_hw: tuple[int, int]) -> np.ndarray:
    """bool [H0, W0]: the pixels where the evaluated map (ehin.metrics.stage1_map) of an [h, w] score
    map can have its argmax: about 2 x 2 per map cell, the pixels around the cell's centre. Exact when
    the original size is the input size (the synthetic datasets); with another original size the
    second resize's own nodes are not counted (a close approximation)."""
    rows = _axis_reach(map_hw[0], input_hw[0], original_hw[0])
    cols = _axis_reach(map_hw[1], input_hw[1], original_hw[1])
    return rows[:, None] & cols[None, :]


def map_size(cfg: dict) -> tuple[int, int]:
    """The [h, w] of the stage-1 score map the config's model makes at data.image_size (one forward
    of an untrained model on a blank image)."""
    from ehin.model import build_model

    empty = {**cfg, "backbone": {**cfg["backbone"], "pretrained": None}}
    model = build_model(empty).eval()
    side = int(cfg["data"]["image_size"])
    with torch.no_grad():
        maps = model.predict(torch.zeros(1, 3, side, side), model.backbone.tokenize(["a"]))
    return int(maps.shape[-2]), int(maps.shape[-1])


def pointable_share(ds, split: str, map_hw: tuple[int, int], image_size: int) -> float:
    """Share of the split's expressions whose referent's mask holds a pixel where a map of size
    `map_hw`, evaluated at input `image_size`, can peak (a ceiling on PointM)."""
    hits = total = 0
    for ref in ds.refs(split):
        info = ds.image_info(ref["image_id"])
        reach = peak_pixels(tuple(map_hw), (image_size, image_size), (int(info["height"]), int(info["width"])))
        n = len(ref["sentences"])
        total += n
        hits += n * bool((ds.ann_mask(ref["ann_id"]).astype(bool) & reach).any())
    return hits / total if total else float("nan")
