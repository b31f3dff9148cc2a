"""EHIN stage-1 model (METHOD §3): shapes, matched-pair inference, normalisation, parameters, gradients."""
from __future__ import annotations

import math

import pytest
import torch

from ehin.backbones import build_clip
from ehin.config import load_config
from ehin.model import EHIN, build_model

SENTENCES = ["red circle", "the blue square on the left", "small green triangle"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(**overrides) -> dict:
    base = {"backbone.arch": "clip-tiny", "data.image_size": 64, "model.hidden_dim": 32}
    base.update(overrides)
    return load_config(overrides=[f"{k}={v}" for k, v in base.items()])


def _batch(backbone, n=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), backbone.tokenize(SENTENCES[:n])


@pytest.mark.parametrize("arch, grid", [("RN50", 2), ("ViT-B-16", 4)])
def test_shapes_paper_backbones(arch, grid):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(), backbone=build_clip(arch, None, 64))
    images, tokens = _batch(model.backbone, n=2)
    with torch.no_grad():  # the big towers are slow on 2 shared CPU cores: shapes only here
        out = model(images, tokens)
        assert model.predict(images, tokens).shape == (2, grid, grid)
    assert out["maps"].shape == (2, 2, grid, grid)
    assert out["raw_maps"].shape == (2, 2, grid, grid)
    assert out["logit_scale"].shape == ()
    assert model.vis_proj.in_channels == model.backbone.visual_channels  # RN50: 2048 (layer4)
    assert model.lan_proj.in_features == model.backbone.text_dim  # RN50: 1024


@pytest.mark.parametrize("attention", ["pixels", "tokens"])
def test_predict_is_the_raw_forward_diagonal(attention):
    # METHOD §3.6: predict returns R_ii before any ReLU (ehin.metrics.stage1_map applies it after
    # upsampling), so negative logits must reach the caller.
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**{"model.n_layers": 3, "model.bp_attention": attention})).eval()
    images, tokens = _batch(model.backbone)
    with torch.no_grad():
        maps = model(images, tokens)["maps"]
        pred = model.predict(images, tokens)
    expected = torch.stack([maps[i, i] for i in range(3)])
    torch.testing.assert_close(pred, expected, rtol=1e-5, atol=1e-5)
    assert (pred < 0).any() and (pred > 0).any()


def test_features_are_l2_normalised_and_raw_maps_are_scaled_dot_products():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    images, tokens = _batch(model.backbone)
    with torch.no_grad():
        vis, lan = model.features(images, tokens)
        out = model(images, tokens)
    assert vis.shape == (3, 32, 8, 8) and lan.shape == (3, 32)
    torch.testing.assert_close(vis.norm(dim=1), torch.ones(3, 8, 8))  # per pixel
    torch.testing.assert_close(lan.norm(dim=1), torch.ones(3))
    # raw R_ij[p] = logit_scale <V_i[p], L_j>, so |raw| <= logit_scale (unit vectors)
    i, j, y, x = 2, 0, 5, 1
    expected = out["logit_scale"] * torch.dot(vis[i, :, y, x], lan[j])
    torch.testing.assert_close(out["raw_maps"][i, j, y, x], expected)
    assert out["raw_maps"].abs().max() <= out["logit_scale"] + 1e-4


def test_fusion_scale_zero_gives_the_raw_maps():
    """D5: X_F = X + s X_n; s = 0 leaves the projected features, so R = raw R."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**{"model.fusion_scale": 0.0}))
    images, tokens = _batch(model.backbone)
    with torch.no_grad():
        out = model(images, tokens)
    torch.testing.assert_close(out["maps"], out["raw_maps"])


def test_logit_scale_is_learnable_from_1_over_0_07():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    assert math.isclose(float(model.logit_scale.detach()), 1 / 0.07, rel_tol=1e-5)
    assert any(p is model.log_logit_scale for p in model.head_parameters())
    images, tokens = _batch(model.backbone)
    out = model(images, tokens)
    out["maps"].mean().backward()
    assert model.log_logit_scale.grad is not None and model.log_logit_scale.grad.abs() > 0


def test_gradients_reach_backbone_and_every_head_parameter():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    images, tokens = _batch(model.backbone)
    out = model(images, tokens)
    (out["maps"].square().mean() + out["raw_maps"].square().mean()).backward()
    for name, p in model.named_parameters():
        if not name.startswith("backbone."):
            assert p.grad is not None, f"head parameter {name} got no gradient"
    assert model.hipm.layers[-1].q_v[0].weight.grad.abs().sum() > 0
    clip = model.backbone.clip
    assert clip.visual.conv1.weight.grad.abs().sum() > 0  # image tower
    assert clip.token_embedding.weight.grad.abs().sum() > 0  # text tower


def test_parameter_groups_partition_the_model():
    model = build_model(tiny_cfg())
    bb = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    assert bb and head and not (bb & head)
    assert bb | head == {id(p) for p in model.parameters()}
    assert id(model.vis_proj.weight) in head and id(model.hipm.layers[0].t_out.bias) in head


def test_build_model_reads_the_config():
    cfg = tiny_cfg(**{"model.n_layers": 3, "model.alpha": 0.2, "model.beta": 0.02, "model.residual": "once",
                      "backbone.image_size": 32})
    model = build_model(cfg)
    assert isinstance(model, EHIN)
    assert model.backbone.image_size == 32  # backbone.image_size wins over data.image_size
    assert len(model.hipm.layers) == 3
    assert (model.hipm.alpha, model.hipm.beta, model.hipm.residual) == (0.2, 0.02, "once")
    assert model.vis_proj.out_channels == 32 and model.fusion_scale == 0.1
