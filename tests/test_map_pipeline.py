"""Every caller takes a stage-1 map to the original size through ehin.metrics.stage1_map (METHOD §3.6):
evaluation (model_map_fn) and ehin.predict give exactly stage1_map of the raw R_ii."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ehin import metrics as M
from ehin.checkpoint import save_atomic
from ehin.evaluate import model_map_fn
from ehin.model import build_model
from tests.test_model import tiny_cfg


def _model():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    return build_model(cfg).eval(), cfg


def test_evaluation_maps_are_stage1_map_of_the_raw_response():
    model, _ = _model()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=g)
    tokens = model.backbone.tokenize(["red circle", "the blue square"])
    sizes = [(48, 80), (64, 64)]
    maps = model_map_fn(model, "cpu")({"image": images, "tokens": tokens, "orig_size": sizes})
    with torch.no_grad():
        raw = model.predict(images, tokens)
    assert (raw < 0).any()  # the ReLU is not applied on the grid
    for m, r, size in zip(maps, raw, sizes):
        assert m.shape == size
        np.testing.assert_array_equal(m, M.stage1_map(r, (64, 64), size))


def test_predict_cli_maps_are_stage1_map_of_the_raw_response(tmp_path):
    from ehin.predict import Predictor

    model, cfg = _model()
    ckpt = tmp_path / "last.pt"
    save_atomic({"kind": "stage1", "config": cfg, "model": model.state_dict()}, ckpt)
    image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    heat, mask = Predictor(ckpt)(image, "red circle")
    x = torch.from_numpy(np.array(Image.fromarray(image).resize((64, 64), Image.BILINEAR)))
    x = x.permute(2, 0, 1).float().div(255)[None]
    with torch.no_grad():
        raw = model.predict(x, model.backbone.tokenize(["red circle"]))[0]
    expected = M.stage1_map(raw, (64, 64), (50, 70))
    np.testing.assert_allclose(heat, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(mask, expected > 0)
