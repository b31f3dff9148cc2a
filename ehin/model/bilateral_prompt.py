"""Bilateral prompt (BP), the building block of HIPM (paper Eq. 4-7; METHOD §3.2, D3).

One BP layer takes visual features V [C, H*W] and one sentence feature L [C] and returns (V', L'):

    Q_v, K_v, V_v = W_1^v V, W_2^v V, W_3^v V        1x1 conv + InstanceNorm + ReLU   (per image)
    Q_t, K_t, V_t = W_1^l L, W_2^l L, W_3^l L        Linear + ReLU                     (per sentence)
    A_l = softmax_p(Q_v^T K_t / sqrt(C))             Eq. 4, [H*W]: pools the pixels into the text
    A_v = softmax_p(K_v^T Q_t / sqrt(C))             Eq. 5, [H*W]: spreads the text over the pixels
    L'  = W_out^l (A_l^T V_v)                        Eq. 6, Linear output
    V'  = IN(W_out^v (A_v^T (x) V_t))                Eq. 7, 1x1 conv + InstanceNorm output

METHOD D3: both softmaxes run over the H*W pixel positions, as Eq. 4-5 write them. `attention="tokens"`
is TRIS's code instead: the visual update softmaxes over the text tokens, and with one sentence per
(image, text) pair (D6) that softmax is 1, so V' = IN(W_out^v V_t) broadcast over the pixels: constant
over pixels, i.e. InstanceNorm maps it to the norm's affine bias. Kept as the TRIS baseline.

Pairwise fusion (METHOD D6). A batch holds N_img images and N_txt sentences and every (i, j) pair is
fused. Nothing here loops over pairs or repeats images:
  * `pairwise=True`: vis [N_img, C, H, W], lan [N_txt, C] -> V' [N_img, N_txt, C, H, W], L' [N_img, N_txt, C].
    The text-independent visual projections W_{1,2,3}^v run once per image; the attention logits are
    one einsum "icp,jc->ijp" (a single [N_img*P, C] x [C, N_txt] matmul).
  * `pairwise=False`: vis [M, C, H, W], lan [M, C] -> V' [M, C, H, W], L' [M, C]: row m of vis is fused
    with row m of lan. HIPM layers >= 2 use it on the flattened pairs ([N_img*N_txt, ...]: after the
    first layer V depends on the pair), and inference uses it for the matched pairs only (O(B)).

The visual output is computed without ever applying the 1x1 conv to an [N_img, N_txt, C, P] tensor:
W_out^v (a_v[p] V_t) + b = a_v[p] (W_out^v V_t) + b, since the conv is linear per pixel, so the conv
weight is applied to V_t once per sentence and then broadcast against A_v (same numbers, C times fewer
FLOPs). InstanceNorm then normalises each (pair, channel) over the pixels, as per-pair fusion would.

`norm="fast"` (`model.pair_norm`, a speed lever; default "module"): the same normalisations computed
another way, equal up to float rounding. The output norm has a closed form: per (pair, channel) the
pre-norm map is a_v[p] u[c] + b[c], so its mean over pixels is u[c] mean(a_v) + b[c] and its variance
u[c]^2 var(a_v), and IN(.)[c, p] = gamma[c] u[c] (a_v[p] - mean(a_v)) / sqrt(u[c]^2 var(a_v) + eps) + beta[c]:
one statistic per pair instead of a reduction over every (pair, channel) (the bias b cancels). The
projections' InstanceNorms run as one fp32 var_mean and an affine map (`instance_norm`) instead of
the per-channel kernel that a profile found slow on 576 pairs x C channels of few pixels.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTIONS = ("pixels", "tokens")
PAIR_NORMS = ("module", "fast")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def instance_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """InstanceNorm2d(affine=True) of x [N, C, H, W] as plain ops, statistics in at least fp32 (as
    autocast runs the module); returns that precision under autocast, else x's dtype."""
    xf = _at_least_fp32(x)
    var, mean = torch.var_mean(xf, dim=(-2, -1), keepdim=True, correction=0)
    y = torch.addcmul(bias.to(xf.dtype).view(-1, 1, 1), (xf - mean) * torch.rsqrt(var + eps),
                      weight.to(xf.dtype).view(-1, 1, 1))
    return y if torch.is_autocast_enabled() else y.to(x.dtype)


class InstanceNorm(nn.InstanceNorm2d):
    """nn.InstanceNorm2d(affine=True) whose `fast` flag switches to `instance_norm` (same parameters and
    state-dict names, so checkpoints load either way)."""

    def __init__(self, dim: int, fast: bool = False) -> None:
        super().__init__(dim, affine=True)
        self.fast = fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return instance_norm(x, self.weight, self.bias, self.eps) if self.fast else super().forward(x)


def closed_form_output_norm(a_v: torch.Tensor, u: torch.Tensor, norm: nn.InstanceNorm2d) -> torch.Tensor:
    """IN over pixels of (a_v[..., p] u[..., c] + b[c]) without forming it (module docstring):
    a_v [..., P] and u [..., C] broadcast over their leading dims -> [..., C, P] (at least fp32)."""
    a, uf = _at_least_fp32(a_v), _at_least_fp32(u)
    var, mean = torch.var_mean(a, dim=-1, keepdim=True, correction=0)               # [..., 1]
    scale = uf * norm.weight.to(uf.dtype) * torch.rsqrt(uf * uf * var + norm.eps)  # [..., C]
    return torch.addcmul(norm.bias.to(uf.dtype)[:, None], scale[..., None], (a - mean)[..., None, :])


def _visual_proj(dim: int, fast: bool = False) -> nn.Sequential:
    # METHOD D3 ("Prompt1 module", TRIS's block): 1x1 conv + InstanceNorm + ReLU
    return nn.Sequential(nn.Conv2d(dim, dim, 1), InstanceNorm(dim, fast), nn.ReLU())


def _text_proj(dim: int) -> nn.Sequential:
    # METHOD D3: Linear + ReLU
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU())


class BilateralPrompt(nn.Module):
    """One BP layer (Eq. 4-7) on C = `dim` channels; see the module docstring for shapes."""

    def __init__(self, dim: int, attention: str = "pixels", norm: str = "module") -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if norm not in PAIR_NORMS:
            raise ValueError(f"norm must be one of {PAIR_NORMS}, got {norm!r}")
        self.dim = dim
        self.attention = attention
        self.fast_norm = norm == "fast"
        # Paper naming: A_l uses (W_1^v, W_2^l), A_v uses (W_1^l, W_2^v); W_3 are the values.
        self.q_v = _visual_proj(dim, self.fast_norm)  # W_1^v
        self.v_v = _visual_proj(dim, self.fast_norm)  # W_3^v
        self.k_t = _text_proj(dim)  # W_2^l
        self.v_t = _text_proj(dim)  # W_3^l
        if attention == "pixels":
            # With "tokens" A_v is identically 1 (softmax over one token): these would get no gradient.
            self.k_v = _visual_proj(dim, self.fast_norm)  # W_2^v
            self.q_t = _text_proj(dim)  # W_1^l
        self.v_out = nn.Conv2d(dim, dim, 1)  # output W^v: 1x1 conv ...
        self.v_out_norm = nn.InstanceNorm2d(dim, affine=True)  # ... + InstanceNorm
        self.t_out = nn.Linear(dim, dim)  # output W^l: Linear

    def forward(self, vis: torch.Tensor, lan: torch.Tensor,
                pairwise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """pairwise: vis [Ni,C,H,W], lan [Nj,C] -> ([Ni,Nj,C,H,W], [Ni,Nj,C]);
        else: vis [M,C,H,W], lan [M,C] -> ([M,C,H,W], [M,C])."""
        n_v, C, H, W = vis.shape
        if lan.ndim != 2 or lan.shape[1] != C:
            raise ValueError(f"lan must be [N, {C}], got {tuple(lan.shape)}")
        if not pairwise and lan.shape[0] != n_v:
            raise ValueError(f"paired fusion needs as many texts as images, got {lan.shape[0]} vs {n_v}")
        # Pair-index letters for einsum: "ij" = every (image, text) pair, "i" = row-matched pairs.
        pair, txt = ("ij", "j") if pairwise else ("i", "i")
        scale = 1.0 / math.sqrt(C)

        # Text-independent visual projections: once per image (D6), [n_v, C, P].
        q_v = self.q_v(vis).flatten(2)
        v_v = self.v_v(vis).flatten(2)
        k_t, v_t = self.k_t(lan), self.v_t(lan)  # [n_t, C]

        # Eq. 4 + 6: A_l = softmax_p(Q_v^T K_t / sqrt(C)); L' = A_l^T V_v, then the Linear output.
        a_l = torch.softmax(torch.einsum(f"icp,{txt}c->{pair}p", q_v, k_t) * scale, dim=-1)
        lan_new = self.t_out(torch.einsum(f"{pair}p,icp->{pair}c", a_l, v_v))

        # Eq. 5: A_v over pixels (D3), or TRIS's softmax over the single token (= 1 everywhere).
        if self.attention == "pixels":
            k_v = self.k_v(vis).flatten(2)
            q_t = self.q_t(lan)
            a_v = torch.softmax(torch.einsum(f"icp,{txt}c->{pair}p", k_v, q_t) * scale, dim=-1)
        else:
            shape = (n_v, lan.shape[0], H * W) if pairwise else (n_v, H * W)
            a_v = vis.new_ones(shape)
        # Eq. 7 + output conv, factorised: conv(a_v (x) V_t) = a_v (x) (W V_t) + b (linear per pixel).
        u = F.linear(v_t, self.v_out.weight.view(C, C))  # [n_t, C] (conv weight applied once per text)
        if self.fast_norm:  # + InstanceNorm, in closed form (module docstring)
            v_new = closed_form_output_norm(a_v, u[None] if pairwise else u, self.v_out_norm)
            if not torch.is_autocast_enabled():
                v_new = v_new.to(vis.dtype)
            return v_new.reshape(*v_new.shape[:-1], H, W), lan_new
        if pairwise:
            v_new = a_v[:, :, None, :] * u[None, :, :, None]  # [Ni, Nj, C, P]
        else:
            v_new = a_v[:, None, :] * u[:, :, None]  # [M, C, P]
        v_new = v_new + self.v_out.bias.view(C, 1)
        lead = v_new.shape[:-2]
        # InstanceNorm per (pair, channel) over the pixels.
        v_new = self.v_out_norm(v_new.reshape(-1, C, H, W)).reshape(*lead, C, H, W)
        return v_new, lan_new
