"""model.pair_norm = "fast" (a speed lever): HIPM's InstanceNorms computed another way give the module
path's values and gradients, up to float rounding, with the same parameters."""
import pytest
import torch

import ehin  # noqa: F401  (torchvision shim first)
from ehin.model.bilateral_prompt import BilateralPrompt, instance_norm
from ehin.model.hipm import HIPM


def _twins(cls, *args, **kw):
    torch.manual_seed(0)
    slow = cls(*args, **kw, norm="module")
    fast = cls(*args, **kw, norm="fast")
    fast.load_state_dict(slow.state_dict())          # same parameter names: checkpoints load either way
    with torch.no_grad():                             # non-trivial affine parameters
        for m in (slow, fast):
            for name, p in m.named_parameters():
                if "norm" in name or name.endswith(("1.weight", "1.bias")):
                    p.copy_(torch.linspace(-1.5, 2.0, p.numel()).view_as(p))
    return slow, fast


@pytest.mark.parametrize("attention", ["pixels", "tokens"])
@pytest.mark.parametrize("pairwise", [True, False])
def test_bilateral_prompt_fast_norm_matches_the_module(attention, pairwise):
    slow, fast = _twins(BilateralPrompt, 16, attention)
    g = torch.Generator().manual_seed(1)
    vis = torch.randn(3, 16, 5, 4, generator=g, dtype=torch.float64)
    lan = torch.randn(4 if pairwise else 3, 16, generator=g, dtype=torch.float64)
    slow, fast = slow.double(), fast.double()
    outs, grads = [], []
    for m in (slow, fast):
        v, l = vis.clone().requires_grad_(), lan.clone().requires_grad_()
        ov, ol = m(v, l, pairwise=pairwise)
        (ov.sin().sum() + ol.cos().sum()).backward()
        outs.append((ov.detach(), ol.detach()))
        grads.append([v.grad, l.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in m.parameters()])
    assert outs[0][0].shape == outs[1][0].shape == ((3, 4, 16, 5, 4) if pairwise else (3, 16, 5, 4))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-9, atol=1e-9)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9)


def test_hipm_fast_norm_matches_in_float32():
    slow, fast = _twins(HIPM, 32, n_layers=2)
    g = torch.Generator().manual_seed(2)
    vis, lan = torch.randn(4, 32, 8, 8, generator=g), torch.randn(6, 32, generator=g)
    for pairwise in (True, False):
        l_in = lan if pairwise else lan[:4]
        (sv, sl), (fv, fl) = slow(vis, l_in, pairwise=pairwise), fast(vis, l_in, pairwise=pairwise)
        torch.testing.assert_close(fv, sv, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fl, sl, rtol=1e-4, atol=1e-4)


def test_instance_norm_function_is_the_module():
    m = torch.nn.InstanceNorm2d(6, affine=True)
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 2, 6)); m.bias.copy_(torch.linspace(-1, 1, 6))
    x = torch.randn(5, 6, 7, 3) * 3 + 2
    torch.testing.assert_close(instance_norm(x, m.weight, m.bias, m.eps), m(x), rtol=1e-5, atol=1e-5)


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="norm must be one of"):
        BilateralPrompt(8, norm="cudnn")


def test_the_lever_reaches_hipm_and_leaves_hashes_alone():
    from ehin.config import config_hash, load_config
    from ehin.model import build_model

    base = load_config(None, profile="smoke")
    fast = load_config(None, profile="smoke", overrides=["model.pair_norm=fast"])
    assert config_hash(base) == config_hash({**base, "model": {k: v for k, v in base["model"].items() if k != "pair_norm"}})
    assert config_hash(fast) != config_hash(base)
    empty = {**fast, "backbone": {**fast["backbone"], "pretrained": None}}
    model = build_model(empty)
    assert all(bp.fast_norm for bp in model.hipm.layers)
