"""The stage-2 segmentation network (METHOD §7; paper §3.5, TRIS's stage 2).

    pyramid   f4, f8, f16, f32 = CLIP visual trunk features at strides 4, 8, 16, 32
    fusion    at strides 8, 16, 32: pixel-word attention with per-token text features,
              v <- v + ReLU(GN(Conv1x1(v ⊙ Attn(v, words))))           (residual add)
    decoder   top-down (FPN-like): d32 = v32; d_s = Conv3x3(v_s + up(d_2s)) for s = 16, 8;
              d4 = Conv3x3(f4 + up(d8))
    heads     a 1×1 conv to one logit at every decoder level (deep supervision)
    predict   the finest head's logits [B, S/4, S/4]

Pyramid per trunk:
- RN (the paper's RN50): layer1..layer4 of the ModifiedResNet = strides 4, 8, 16, 32.
- ViT (the synthetic profiles' small CLIPs, patch 8): every block works at the patch stride, so the
  three intermediate blocks of `ClipBackbone.encode_pyramid` (early, middle, last) are resampled
  into a small pyramid, ViTDet's "simple feature pyramid" without its learned deconvolutions:
  early block -> strides 4 and 8, middle -> 16, last -> 32 (bilinear; antialiased when shrinking).

The whole CLIP (image and text towers) is fine-tuned. Its BatchNorm layers (RN) keep their
pretrained statistics (eval mode): a 24-image batch split over GPUs gives noisy batch statistics,
and with no batch statistics in the model DDP needs no SyncBatchNorm and every sample's loss is
independent of the others in its batch. The decoder uses GroupNorm for the same reason. CLIP
parameters that never reach the output (RN attention pool, projections, logit scale) are frozen at
build time, found by one dry backward pass, so DDP sees no unused parameters.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ehin.cli import UserError
STRIDES = (4, 8, 16, 32)


def _groups(dim: int) -> int:
    """GroupNorm groups: 32 as usual, fewer for narrow layers so that each keeps >= 4 channels."""
    for g in (32, 16, 8, 4, 2):
        if dim % g == 0 and dim // g >= 4:
            return g
    return 1


def conv_gn_relu(cin: int, cout: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.GroupNorm(_groups(cout), cout),
                         nn.ReLU(inplace=True))


class PixelWordAttention(nn.Module):
    """Each pixel attends over the sentence's words; the attended language feature gates the pixel
    feature (element-wise product, LAVT's PWAM idea) and the result is added back (residual)."""

    def __init__(self, dim: int, word_dim: int):
        super().__init__()
        self.dim = dim
        self.words = nn.Linear(word_dim, dim)  # per-scale projection of the token features
        self.q = nn.Conv2d(dim, dim, 1)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = conv_gn_relu(dim, dim, 1)

    def forward(self, vis: torch.Tensor, tokens: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """vis [B,D,H,W], tokens [B,T,C_t], pad_mask [B,T] (True = real token) -> [B,D,H,W]."""
        b, d, h, w = vis.shape
        words = self.words(tokens.to(vis.dtype))
        q = self.q(vis).flatten(2).transpose(1, 2)  # [B,HW,D]
        att = q @ self.k(words).transpose(1, 2) / math.sqrt(d)  # [B,HW,T]
        att = att.masked_fill(~pad_mask[:, None, :], float("-inf")).softmax(-1)
        lang = (att @ self.v(words)).transpose(1, 2).reshape(b, d, h, w)
        return vis + self.out(vis * lang)


def _resample(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])


class Stage2Net(nn.Module):
    def __init__(self, backbone: nn.Module, hidden_dim: int = 256):
        super().__init__()
        self.backbone = backbone
        self.image_size = int(backbone.image_size)
        if self.image_size % 32:
            raise ValueError(f"stage 2 needs an image size divisible by 32 (strides up to 32), got {self.image_size}")
        d = int(hidden_dim)
        with torch.no_grad():
            was = backbone.training
            backbone.eval()
            chans = [f.shape[1] for f in self.pyramid(torch.zeros(1, 3, self.image_size, self.image_size))]
            backbone.train(was)
        self.lateral = nn.ModuleList(conv_gn_relu(c, d, 1) for c in chans)  # strides 4, 8, 16, 32
        self.fusion = nn.ModuleList(PixelWordAttention(d, backbone.token_dim) for _ in STRIDES[1:])  # 8, 16, 32
        self.smooth = nn.ModuleList(conv_gn_relu(d, d, 3) for _ in STRIDES[:-1])  # decoder at 4, 8, 16
        self.heads = nn.ModuleList(nn.Conv2d(d, 1, 1) for _ in STRIDES)
        self._freeze_unused()

    # ---- features ---------------------------------------------------------------------------------
    def pyramid(self, img01: torch.Tensor) -> list[torch.Tensor]:
        """[f4, f8, f16, f32] (module docstring)."""
        bb = self.backbone
        visual = bb.clip.visual
        s = img01.shape[-1]
        if not bb.is_vit:
            x = visual.stem(bb.normalize(img01))
            c2 = visual.layer1(x)
            c3 = visual.layer2(c2)
            c4 = visual.layer3(c3)
            return [c2, c3, c4, visual.layer4(c4)]
        early, middle, last = bb.encode_pyramid(img01)
        return [_resample(early, s // 4), _resample(early, s // 8), _resample(middle, s // 16), _resample(last, s // 32)]

    def forward(self, img01: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        """images01 [B,3,S,S] in [0,1], tokens [B,T] -> logits per head, finest first:
        [B,S/4,S/4], [B,S/8,S/8], [B,S/16,S/16], [B,S/32,S/32]."""
        feats = [lat(f) for lat, f in zip(self.lateral, self.pyramid(img01))]
        _, words, pad_mask = self.backbone.encode_text(tokens)
        fused = [feats[0]] + [fuse(f, words, pad_mask) for fuse, f in zip(self.fusion, feats[1:])]
        dec = [None] * 4
        dec[3] = fused[3]
        for k in (2, 1, 0):  # top-down: 16, 8, 4
            up = F.interpolate(dec[k + 1], size=fused[k].shape[-2:], mode="bilinear", align_corners=False)
            dec[k] = self.smooth[k](fused[k] + up)
        return [head(x)[:, 0] for head, x in zip(self.heads, dec)]

    def predict(self, images01: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of the finest head [B, S/4, S/4] (METHOD §7: evaluation uses the finest head)."""
        return self(images01, tokens)[0]

    # ---- training helpers -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "Stage2Net":
        super().train(mode)
        for m in self.backbone.modules():  # pretrained BatchNorm statistics (module docstring)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.backbone.parameters() if p.requires_grad)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        own = {id(p) for p in self.backbone.parameters()}
        return (p for p in self.parameters() if id(p) not in own and p.requires_grad)

    def _freeze_unused(self) -> None:
        """requires_grad False on every parameter the output does not depend on (one dry pass)."""
        was = self.training
        self.eval()
        size = self.image_size
        tokens = self.backbone.tokenize(["a"])
        out = self(torch.zeros(1, 3, size, size), tokens)
        sum(o.sum() for o in out).backward()
        for p in self.parameters():
            if p.requires_grad and p.grad is None:
                p.requires_grad_(False)
            p.grad = None
        self.train(was)


def build_stage2(cfg: dict, backbone: nn.Module | None = None) -> Stage2Net:
    """Stage2Net on `backbone`, or on build_clip(backbone.arch, backbone.pretrained, data.image_size)."""
    if backbone is None:
        from ehin.backbones import build_clip
        from ehin.config import clip_spec

        backbone = build_clip(*clip_spec(cfg, "backbone"))
    return Stage2Net(backbone, cfg["stage2"]["hidden_dim"])


def load_stage2(path, device: str | torch.device = "cpu") -> tuple[Stage2Net, dict]:
    """(model in eval mode, cfg) from a stage-2 checkpoint written by ehin.train_stage2."""
    from ehin.checkpoint import empty_backbone, load

    ckpt = load(path)
    if ckpt.get("kind") != "stage2":
        raise UserError(f"{path} is a {ckpt.get('kind', 'unknown')!r} checkpoint, not a stage-2 one")
    cfg = ckpt["config"]
    model = build_stage2(cfg, empty_backbone(ckpt))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg
