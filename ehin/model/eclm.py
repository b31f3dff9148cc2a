"""ECLM, the Early-aware Contrastive Learning Module (paper §3.3, Eq. 15-16; its loss L_CL is the
λ2 term of §3.4, Eq. 17; early vs late: §4.4 and Fig. 7; on/off: §4.4, Table 6; METHOD §4, D2, D6, D8).

ECLM is three pieces; this module holds the two that are ECLM's alone:

* The early maps (`early_maps`): ECLM "performs feature fusion directly on the original image and
  text representations" (§3.3), i.e. before HIPM. Here: R^early_ij[p] = logit_scale <V_i[p], L_j>
  with V, L the projected, L2-normalised CLIP features of §3.1, for every (image i, text j) pair of
  the batch as the fused maps are (D6). `EHIN.forward` returns them as `raw_maps`.
* The loss (`cl_loss`, Eq. 15): L_CL = -[log S(I, R_p, Q_p) + (1/K) Σ_k log(1 - S(I, R_p, Q_k))]
  over the positive sentence and the K same-image negatives (D2). The paper prints "K Σ"; we average
  (D8). S is clamped into (S_EPS, 1 - S_EPS) before the logs (METHOD §4).

The third, S(I, R, Q) of Eq. 16 (a frozen CLIP on the image masked by up(σ(R))), is
`ehin.model.scorer.FrozenScorer`: L_BG (Eq. 19) scores with the same one. `ehin.losses.Stage1Loss`
puts the pieces together: R_p is the matched early map R^early_ii (`loss.cl_variant: early`, EHIN)
or the fused R_ii after HIPM (`late`, Fig. 7's late-aware variant, where L_CL's negative half
coincides with L_BG); `loss.cl` is λ2 (2; 0 is Table 6's "EHIN without ECLM").
"""
from __future__ import annotations

import torch

S_EPS = 1e-4  # METHOD §4: clamp S into (1e-4, 1 - 1e-4) before the logs
CL_VARIANTS = ("early", "late")  # which map R_p masks the image (Fig. 7); ehin.config validates the same


def early_maps(vis: torch.Tensor, lan: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """ECLM's maps before HIPM: vis [Ni, C, h, w], lan [Nt, C] (both L2-normalised, §3.1) ->
    logit_scale <V_i[p], L_j> [Ni, Nt, h, w] for every (image i, text j) pair (D6; Fig. 7's early)."""
    return logit_scale * torch.einsum("ichw,jc->ijhw", vis, lan)


def clamp_scores(s: torch.Tensor) -> torch.Tensor:
    """S clamped into (S_EPS, 1 - S_EPS): the logs of Eq. 15 and 19 stay finite (METHOD §4)."""
    return s.clamp(S_EPS, 1 - S_EPS)


def cl_loss(s: torch.Tensor) -> torch.Tensor:
    """L_CL (Eq. 15). s [N, 1 + K]: column 0 = S with the positive sentence, columns 1.. = the K
    negatives (D8: mean over them); averaged over the N images."""
    s = clamp_scores(s)
    loss = -torch.log(s[:, 0])
    if s.shape[1] > 1:
        loss = loss - torch.log(1 - s[:, 1:]).mean(1)
    return loss.mean()
