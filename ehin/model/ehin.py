"""The stage-1 EHIN model (paper §3.1-3.2; METHOD §3).

    V = Conv1x1(C_v -> C_d)(encode_dense(I)),  L = Linear(C_l -> C_d)(sentence(T))    §3.1
    V, L L2-normalised per position                                                   §3.1
    X_n = HIPM(V, L)                                                                  Eq. 8-13, D4
    X_F = X + s X_n                                                                   D5
    R_ij[p] = logit_scale * <V_F(i,j)[p], L_F(i,j)>                                   Eq. 3, D6

`forward` fuses every (image i, text j) pair of the batch (D6) and returns the N x N response maps
plus the "raw" maps logit_scale * <V_i[p], L_j> before HIPM (ECLM's early maps of L_CL, Fig. 7;
ehin/model/eclm.py).
Under DDP (docs/method.md, D-DDP) a rank holds n of the N images and texts; `gather_texts` brings
in the other ranks' sentence features, so the rank computes its n rows of the N x N maps.
`predict` fuses only the matched pairs (i, i): O(B), not O(B^2), and returns the raw R_ii; the ReLU
comes after upsampling, in `ehin.metrics.stage1_map` (METHOD §3.6).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ehin.model.eclm import early_maps
from ehin.model.hipm import HIPM


class EHIN(nn.Module):
    """Composes its parts; `build_model` builds them from a config (model.* by keyword)."""

    def __init__(self, backbone: nn.Module, vis_proj: nn.Module, lan_proj: nn.Module, hipm: HIPM, *,
                 fusion_scale: float, logit_scale_init: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.vis_proj = vis_proj  # §3.1: C_v -> C_d
        self.lan_proj = lan_proj  # §3.1: C_l -> C_d
        self.hipm = hipm
        self.fusion_scale = float(fusion_scale)  # s of D5
        # D6: learnable temperature, kept in log space as CLIP/TRIS do; exp(.) = 1/0.07 at init.
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(float(logit_scale_init))))

    # ---- features ---------------------------------------------------------------------------------
    def features(self, images01: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(V [N, C_d, h, w], L [N, C_d]), both L2-normalised per position (§3.1)."""
        dense = self.backbone.encode_dense(images01)
        if not torch.is_autocast_enabled(dense.device.type):
            # A backbone cast to bf16 for inference hands the fp32 head its features in fp32 (bench.perf's
            # --bf16-backbone); under autocast the head's layers choose their own precision.
            dense = dense.to(self.vis_proj.weight.dtype)
        vis = self.vis_proj(dense)
        sentence = self.backbone.encode_text(tokens)[0]
        lan = self.lan_proj(sentence.to(vis.dtype))
        return F.normalize(vis, dim=1), F.normalize(lan, dim=-1)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp()

    def _fuse(self, vis: torch.Tensor, lan: torch.Tensor, pairwise: bool) -> torch.Tensor:
        """Response maps R (Eq. 3) after HIPM and D5 fusion: pairwise [Ni, Nj, h, w], else [M, h, w]."""
        v_n, l_n = self.hipm(vis, lan, pairwise=pairwise)
        v0, l0 = (vis[:, None], lan[None]) if pairwise else (vis, lan)
        v_f = v0 + self.fusion_scale * v_n  # D5: X_F = X + s X_n
        l_f = l0 + self.fusion_scale * l_n
        # Eq. 3: <V_F[p], L_F> per pixel, no renormalisation after fusion (TRIS's fusion does not either).
        return self.logit_scale * torch.einsum("...chw,...c->...hw", v_f, l_f)

    # ---- public API -------------------------------------------------------------------------------
    def forward(self, images01: torch.Tensor, tokens: torch.Tensor,
                gather_texts: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """images01 [N,3,S,S] in [0,1], tokens [N,20] -> dict(maps [N,N,h,w] fused R_ij (image i, text j),
        raw_maps [N,N,h,w] = logit_scale <V_i, L_j> before HIPM, logit_scale).

        gather_texts (DDP): maps this rank's sentence features L [n, C_d] to the global batch's
        [N, C_d] (`ehin.distributed.all_gather_with_grad`); the maps are then [n, N, h, w]."""
        vis, lan = self.features(images01, tokens)
        if gather_texts is not None:
            lan = gather_texts(lan)
        scale = self.logit_scale
        raw = early_maps(vis, lan, scale)  # ECLM's maps for L_CL (Fig. 7, METHOD §4)
        maps = self._fuse(vis, lan, pairwise=True)  # D6: every (image, text) pair
        return {"maps": maps, "raw_maps": raw, "logit_scale": scale}

    def predict(self, images01: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Raw fused R_ii [B, h, w] (logits, no ReLU) for the matched pairs only: O(B), equal to forward's
        diagonal. `ehin.metrics.stage1_map` takes each map to the original size (METHOD §3.6)."""
        vis, lan = self.features(images01, tokens)
        return self._fuse(vis, lan, pairwise=False)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The CLIP encoders' parameters (the trainer's low-LR group)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Everything trained from scratch: projections, HIPM, logit scale."""
        own = {id(p) for p in self.backbone.parameters()}
        return (p for p in self.parameters() if id(p) not in own)


def build_model(cfg: dict, backbone: nn.Module | None = None) -> EHIN:
    """EHIN on `backbone`, or on `build_clip(backbone.arch, backbone.pretrained, image size)`.

    `cfg` is a resolved config dict (load_config, a checkpoint's "config"); its model section is read
    through the typed `ModelConfig` (checked key by key) and passed on by keyword."""
    from ehin.config import ModelConfig, section

    m: ModelConfig = section(cfg, "model")
    if backbone is None:
        from ehin.backbones import build_clip  # late import: open_clip is slow to import
        from ehin.config import clip_spec

        backbone = build_clip(*clip_spec(cfg, "backbone"))
    from ehin.backbones import DENSE_MODES

    dense = cfg["backbone"].get("dense", "tokens")
    if dense not in DENSE_MODES:
        raise ValueError(f"backbone.dense must be one of {DENSE_MODES}, got {dense!r}")
    backbone.dense = dense
    # Built in this order because it is the order their weights draw from the RNG: the committed
    # results (reports/, bench.check) were trained with projections first, then HIPM.
    vis_proj = nn.Conv2d(backbone.visual_channels, m.hidden_dim, 1)
    lan_proj = nn.Linear(backbone.text_dim, m.hidden_dim)
    hipm = HIPM(dim=m.hidden_dim, n_layers=m.n_layers, alpha=m.alpha, beta=m.beta, residual=m.residual,
                attention=m.bp_attention, norm=m.pair_norm)
    return EHIN(backbone, vis_proj, lan_proj, hipm, fusion_scale=m.fusion_scale,
                logit_scale_init=m.logit_scale_init)
