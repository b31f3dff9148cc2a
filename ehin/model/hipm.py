"""Hierarchical Interaction Prompt Module (paper Eq. 8-13, generalised to n layers; METHOD §3.3, D4).

With X = (V, L) and X_0 = X:
    X_1 = BP_1(X_0) + alpha X_0                                            Eq. 8-9
    X_k = BP_k(X_{k-1}) + beta X_{k-1} + alpha X_0     k = 2..n ("twice")  Eq. 10-13 for n = 2
    X_k = BP_k(X_{k-1}) + beta X_{k-1}                 k = 2..n ("once", Table 4)
HIPM returns X_n; EHIN adds it to X with the fusion scale (D5). n = 1 is "HIPM off" (Table 6).

Shapes follow `BilateralPrompt`: `pairwise=True` fuses every (image, text) pair (D6) from per-image
V [Ni, C, H, W] and per-text L [Nj, C] into [Ni, Nj, C, H, W] / [Ni, Nj, C]; `pairwise=False` fuses
row-matched pairs (V [M, C, H, W], L [M, C]). Only the first layer can share visual work across
texts: after it V depends on the pair, so layers >= 2 run on the flattened pairs.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ehin.model.bilateral_prompt import BilateralPrompt

RESIDUALS = ("twice", "once")


class HIPM(nn.Module):
    # Keyword-only after dim: alpha and beta are both floats, so a swapped positional pair would
    # train silently with the wrong residual weights.
    def __init__(self, dim: int, *, n_layers: int = 2, alpha: float = 0.1, beta: float = 0.05,
                 residual: str = "twice", attention: str = "pixels", norm: str = "module") -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
        self.alpha, self.beta, self.residual = float(alpha), float(beta), residual
        self.layers = nn.ModuleList(BilateralPrompt(dim, attention, norm) for _ in range(n_layers))

    def forward(self, vis: torch.Tensor, lan: torch.Tensor,
                pairwise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """X_n = (V_n, L_n). pairwise: [Ni,C,H,W], [Nj,C] -> [Ni,Nj,C,H,W], [Ni,Nj,C]; else row-matched."""
        # X_0 in the output's layout (broadcast views, no copies).
        v0, l0 = (vis[:, None], lan[None]) if pairwise else (vis, lan)

        v, l = self.layers[0](vis, lan, pairwise=pairwise)
        v, l = v + self.alpha * v0, l + self.alpha * l0  # Eq. 8-9
        for bp in self.layers[1:]:
            lead = v.shape[:-3]  # (Ni, Nj) or (M,)
            C, H, W = v.shape[-3:]
            dv, dl = bp(v.reshape(-1, C, H, W), l.reshape(-1, C), pairwise=False)
            dv, dl = dv.reshape(*lead, C, H, W), dl.reshape(*lead, C)
            v_next, l_next = dv + self.beta * v, dl + self.beta * l  # Eq. 12-13: + beta X_{k-1}
            if self.residual == "twice":  # METHOD D4: X_0 enters again at every later layer
                v_next, l_next = v_next + self.alpha * v0, l_next + self.alpha * l0
            v, l = v_next, l_next
        return v, l
