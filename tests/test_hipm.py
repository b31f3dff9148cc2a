"""Bilateral prompt (Eq. 4-7, D3) and HIPM (Eq. 8-13, D4) against hand computations."""
from __future__ import annotations

import math

import pytest
import torch

from ehin.model.bilateral_prompt import BilateralPrompt
from ehin.model.hipm import HIPM

ALPHA, BETA = 0.1, 0.05


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, InstanceNorm affine included (gamma 1 / beta 0 would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module


def _in(x: torch.Tensor, norm: torch.nn.InstanceNorm2d) -> torch.Tensor:
    """InstanceNorm by hand on [C, P]: per channel over pixels, biased variance."""
    mu = x.mean(1, keepdim=True)
    var = ((x - mu) ** 2).mean(1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight[:, None] + norm.bias[:, None]


def manual_bp(bp: BilateralPrompt, V: torch.Tensor, L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4-7 for ONE (image, text) pair with explicit matrix ops: V [C, P], L [C] -> (V' [C, P], L' [C])."""
    C = V.shape[0]

    def vproj(seq):  # 1x1 conv + IN + ReLU
        conv, norm = seq[0], seq[1]
        return torch.relu(_in(conv.weight[:, :, 0, 0] @ V + conv.bias[:, None], norm))

    def tproj(seq):  # Linear + ReLU
        return torch.relu(seq[0].weight @ L + seq[0].bias)

    Qv, Vv = vproj(bp.q_v), vproj(bp.v_v)
    Kt, Vt = tproj(bp.k_t), tproj(bp.v_t)
    A_l = torch.softmax(Qv.T @ Kt / math.sqrt(C), dim=0)  # Eq. 4: [P], softmax over pixels
    L_new = bp.t_out.weight @ (Vv @ A_l) + bp.t_out.bias  # Eq. 6 + Linear output
    if bp.attention == "pixels":
        Kv, Qt = vproj(bp.k_v), tproj(bp.q_t)
        A_v = torch.softmax(Kv.T @ Qt / math.sqrt(C), dim=0)  # Eq. 5, D3: softmax over pixels
    else:
        A_v = torch.ones(V.shape[1], dtype=V.dtype)  # softmax over one token
    V_new = torch.outer(Vt, A_v)  # Eq. 7: A_v^T (x) V_t, reshaped to [C, P]
    V_new = bp.v_out.weight[:, :, 0, 0] @ V_new + bp.v_out.bias[:, None]  # full (unfactorised) 1x1 conv
    return _in(V_new, bp.v_out_norm), L_new


def _inputs(Ni=2, Nj=3, C=4, H=2, W=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(Ni, C, H, W, generator=g, dtype=torch.float64)
    L = torch.randn(Nj, C, generator=g, dtype=torch.float64)
    return V, L


def test_hipm_n2_matches_eq_8_to_13_by_hand():
    C, H, W = 4, 2, 3
    hipm = _randomise(HIPM(C, n_layers=2, alpha=ALPHA, beta=BETA, residual="twice")).double()
    V, L = _inputs(Ni=1, Nj=1, C=C, H=H, W=W)
    V0, L0 = V[0].reshape(C, H * W), L[0]
    # Eq. 8-9: X_1 = BP_1(X_0) + alpha X_0
    v, l = manual_bp(hipm.layers[0], V0, L0)
    V1, L1 = v + ALPHA * V0, l + ALPHA * L0
    # Eq. 10-13: X_2 = BP_2(X_1) + alpha X_0 + beta X_1
    v, l = manual_bp(hipm.layers[1], V1, L1)
    V2, L2 = v + ALPHA * V0 + BETA * V1, l + ALPHA * L0 + BETA * L1

    out_v, out_l = hipm(V, L, pairwise=False)
    torch.testing.assert_close(out_v[0].reshape(C, H * W), V2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_l[0], L2, rtol=1e-10, atol=1e-10)
    out_v, out_l = hipm(V, L, pairwise=True)
    torch.testing.assert_close(out_v[0, 0].reshape(C, H * W), V2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_l[0, 0], L2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("residual", ["twice", "once"])
def test_hipm_residual_wiring_closed_form(residual):
    """BP layers whose outputs are the constants (c_k, b_k): X_2 is then a known affine map of X_0."""
    C = 3
    hipm = HIPM(C, n_layers=2, alpha=ALPHA, beta=BETA, residual=residual).double()
    consts = [(1.0, -2.0), (2.0, 0.5)]  # (visual c_k, text b_k) of layer k
    with torch.no_grad():
        for bp, (c, b) in zip(hipm.layers, consts):
            bp.t_out.weight.zero_()
            bp.t_out.bias.fill_(b)
            bp.v_out_norm.weight.zero_()  # IN output = its bias
            bp.v_out_norm.bias.fill_(c)
    V = torch.tensor([[[[1.0, -3.0], [0.5, 2.0]]] * C], dtype=torch.float64)  # [1, C, 2, 2]
    L = torch.tensor([[4.0, -1.0, 0.0]], dtype=torch.float64)
    v, l = hipm(V, L)
    # X_1 = c_1 + 0.1 X_0; X_2 = c_2 + 0.05 X_1 (+ 0.1 X_0 when twice)
    #   twice: V_2 = 2 + 0.05 (1 + 0.1 V) + 0.1 V = 2.05 + 0.105 V;  L_2 = 0.5 + 0.05 (-2 + 0.1 L) + 0.1 L = 0.4 + 0.105 L
    #   once:  V_2 = 2.05 + 0.005 V;                                  L_2 = 0.4 + 0.005 L
    k = 0.105 if residual == "twice" else 0.005
    torch.testing.assert_close(v, 2.05 + k * V)
    torch.testing.assert_close(l, 0.4 + k * L)


def test_once_and_twice_differ_by_alpha_x0():
    C = 4
    twice = _randomise(HIPM(C, n_layers=2, alpha=ALPHA, beta=BETA, residual="twice")).double()
    once = HIPM(C, n_layers=2, alpha=ALPHA, beta=BETA, residual="once").double()
    once.load_state_dict(twice.state_dict())
    V, L = _inputs(C=C)
    vt, lt = twice(V, L, pairwise=True)
    vo, lo = once(V, L, pairwise=True)
    torch.testing.assert_close(vt - vo, (ALPHA * V[:, None]).expand_as(vt), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lt - lo, (ALPHA * L[None]).expand_as(lt), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("attention", ["pixels", "tokens"])
def test_pairwise_fusion_equals_per_pair_loop(attention):
    C, Ni, Nj = 4, 2, 3
    hipm = _randomise(HIPM(C, n_layers=3, alpha=ALPHA, beta=BETA, attention=attention), seed=3).double()
    V, L = _inputs(Ni=Ni, Nj=Nj, C=C)
    v, l = hipm(V, L, pairwise=True)
    assert v.shape == (Ni, Nj, C, 2, 3) and l.shape == (Ni, Nj, C)
    for i in range(Ni):
        for j in range(Nj):  # each pair fused on its own, image not shared
            vi, lj = hipm(V[i:i + 1], L[j:j + 1], pairwise=False)
            torch.testing.assert_close(v[i, j], vi[0], rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(l[i, j], lj[0], rtol=1e-9, atol=1e-10)


def test_single_bp_matches_manual_pairwise():
    C = 4
    bp = _randomise(BilateralPrompt(C), seed=5).double()
    V, L = _inputs(Ni=2, Nj=2, C=C)
    v, l = bp(V, L, pairwise=True)
    for i in range(2):
        for j in range(2):
            mv, ml = manual_bp(bp, V[i].reshape(C, -1), L[j])
            torch.testing.assert_close(v[i, j].reshape(C, -1), mv, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(l[i, j], ml, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_shapes(n):
    C, Ni, Nj, H, W = 8, 3, 2, 4, 5
    hipm = HIPM(C, n_layers=n)
    assert len(hipm.layers) == n
    V, L = torch.randn(Ni, C, H, W), torch.randn(Nj, C)
    v, l = hipm(V, L, pairwise=True)
    assert v.shape == (Ni, Nj, C, H, W) and l.shape == (Ni, Nj, C)
    v, l = hipm(V, L[:1].expand(Ni, C), pairwise=False)
    assert v.shape == (Ni, C, H, W) and l.shape == (Ni, C)
    assert torch.isfinite(v).all() and torch.isfinite(l).all()


def test_tokens_attention_gives_visual_update_constant_over_pixels():
    C = 4
    V, L = _inputs(C=C)
    tokens = _randomise(BilateralPrompt(C, attention="tokens"), seed=7).double()
    v, _ = tokens(V, L, pairwise=True)
    spread = v.flatten(3).std(-1)  # per (pair, channel) over pixels
    assert spread.max() < 1e-6
    # ... and equal to the InstanceNorm bias (normalising a constant map leaves only the affine bias)
    torch.testing.assert_close(v[..., 0, 0], tokens.v_out_norm.bias.expand(2, 3, C), atol=1e-5, rtol=0)
    pixels = _randomise(BilateralPrompt(C, attention="pixels"), seed=7).double()
    with torch.no_grad():
        # keep V_t and Q_t = ReLU(.) away from 0: V_t = 0 gives no update, Q_t = 0 a uniform A_v
        pixels.v_t[0].bias.fill_(2.0)
        pixels.q_t[0].bias.fill_(2.0)
    v, _ = pixels(V, L, pairwise=True)
    # D3: A_v over pixels gives a spatially varying update for every pair (channels where the
    # ReLU'd V_t is zero stay constant, so look at the most varying channel of each pair).
    assert v.flatten(3).std(-1).amax(-1).min() > 1e-2


def test_pixel_attention_weights_sum_to_one_over_pixels():
    """D3: A_l pools the pixels into the text, so a V_v constant over pixels passes through unchanged."""
    C = 3
    bp = _randomise(BilateralPrompt(C), seed=9).double()
    with torch.no_grad():  # make W_3^v's output constant over pixels: V_v = ReLU(IN bias)
        bp.v_v[1].weight.zero_()
        bp.v_v[1].bias.copy_(torch.tensor([0.3, 1.2, 0.7]))
    V, L = _inputs(Ni=1, Nj=2, C=C)
    _, l = bp(V, L, pairwise=True)
    expected = bp.t_out(torch.tensor([0.3, 1.2, 0.7], dtype=torch.float64))
    torch.testing.assert_close(l[0, 0], expected)
    torch.testing.assert_close(l[0, 1], expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="attention"):
        BilateralPrompt(4, attention="words")
    with pytest.raises(ValueError, match="residual"):
        HIPM(4, residual="thrice")
    with pytest.raises(ValueError, match="n_layers"):
        HIPM(4, n_layers=0)


def test_hipm_takes_everything_but_dim_by_keyword():
    """HIPM(dim, n_layers, alpha, beta, ...) positionally would let a swapped alpha/beta train silently."""
    with pytest.raises(TypeError):
        HIPM(4, 2, 0.1, 0.05)
    assert HIPM(dim=4, n_layers=1, alpha=0.3, beta=0.02).alpha == 0.3
    with pytest.raises(ValueError, match="paired"):
        BilateralPrompt(4)(torch.randn(2, 4, 2, 2), torch.randn(3, 4), pairwise=False)
