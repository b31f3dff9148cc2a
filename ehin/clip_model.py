"""The CLIP encoders EHIN uses, as open_clip models with random weights (METHOD §2).

This module knows architectures, not weights: `ehin.backbones.build_clip` adds the weights (an
open_clip tag, a local checkpoint, or the project's pretrained small CLIP), and the small CLIP's
pretraining (`ehin.pretrain_clip`) builds its untrained model here. Keeping the two apart is what lets
`ehin.backbones` import `ehin.pretrain_clip` without either importing the other back.

`ClipBackbone` exposes what the model, the frozen scorer and stage 2 need from CLIP:
- `encode_dense(img01)`: the visual feature map. RN50: the ModifiedResNet trunk up to layer4, before
  attention pooling (C_v = 2048, stride 32). ViT: the patch tokens of the last block after `ln_post`,
  reshaped to the patch grid (C_v = width, stride = patch size). `ln_post` is applied because it is
  the normalisation CLIP itself puts between the residual stream and the projection: in pretrained
  CLIP ViTs the raw stream carries a few very large channels that would dominate a 1x1 projection, while after `ln_post` every
  token lives on the scale the class token is projected from (MaskCLIP-style dense features do
  the same). The projection `proj` is not applied, so C_v is the ViT width, as RN50's is its trunk
  width.
- `encode_text(tokens)`: the sentence embedding (open_clip's `encode_text`: the EOT token after
  `ln_final`, projected; C_l = embed_dim, 1024 for RN50), the per-token features after `ln_final`
  ([B, T, width]) and the pad mask (True = a real token, SOT..EOT).
- `encode_image(img01)`: the pooled, projected image embedding (not normalised).
- `tokenize(texts)`: open_clip's BPE tokenizer at context length 20 (METHOD D1).

Images come in as float [B, 3, S, S] in [0, 1]; normalisation with CLIP's statistics happens inside.

`arch` is an open_clip model name (RN50, ViT-B-16, ...; any input size via `force_image_size`) or one
of the project's small profiles `clip-tiny` / `clip-small` / `clip-tiny-rn` (open_clip's own `CLIP`
class with small widths, for the synthetic datasets).
"""
from __future__ import annotations

import copy
import math
from functools import lru_cache
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

import ehin  # noqa: F401  (torchvision shim + HF offline before open_clip is imported)
import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer, text_global_pool

__all__ = [
    "CONTEXT_LENGTH",
    "CUSTOM_ARCHS",
    "DENSE_MODES",
    "ClipBackbone",
    "attention_pool",
    "model_config",
    "new_model",
    "tokenize",
    "untrained_clip",
]

DENSE_MODES = ("tokens", "values")  # ViT dense readouts (`ClipBackbone._vit_tokens`)
CONTEXT_LENGTH = 20  # METHOD D1 (TRIS's context length)

# The project's small CLIPs for the synthetic profiles. Both are open_clip `CLIP`s with a ViT image
# tower: at 64 px an RN-style /32 trunk gives a 2x2 map, too coarse to localise anything, so the
# image is cut into 8x8-px patches (an 8x8 grid at 64 px). Patch 4 (16x16 grid) was measured on 2
# cores: 4x slower (fwd+bwd of 24 images 90 vs 21 ms) and worse held-out retrieval after the same
# pretraining time (33 vs 41 %), so patch 8. Narrow and shallow beat wide and deep at a fixed CPU
# budget too (retrieval rises with steps, not width). The text tower is CLIP's causal transformer on
# CLIP's BPE vocabulary, so tokenisation is the same for every arch. `image_size` is set by build_clip.
CUSTOM_ARCHS: dict[str, dict[str, Any]] = {
    # smoke profile
    "clip-tiny": dict(
        embed_dim=64,
        vision_cfg=dict(patch_size=8, width=64, layers=2, head_width=32, mlp_ratio=2.0),
        text_cfg=dict(context_length=CONTEXT_LENGTH, vocab_size=49408, width=64, heads=2, layers=2,
                      mlp_ratio=2.0),
    ),
    # A convolutional image tower, as the paper's RN50: open_clip's ModifiedResNet with its last two
    # downsamplings removed (overall stride 8, an 8x8 map at 64 px; C_v = 32 x width = 512) and its
    # attention pooling over that map. Conv features are local by construction; the ViT's patch
    # tokens mix the whole image in every block (see docs/method.md §10).
    "clip-tiny-rn": dict(
        embed_dim=64,
        vision_cfg=dict(layers=(1, 1, 1, 1), width=16, head_width=32, stride=8),
        text_cfg=dict(context_length=CONTEXT_LENGTH, vocab_size=49408, width=64, heads=2, layers=2,
                      mlp_ratio=2.0),
    ),
    # synthetic profile: a wider image tower (C_v = 96), same text tower
    "clip-small": dict(
        embed_dim=96,
        vision_cfg=dict(patch_size=8, width=96, layers=2, head_width=32, mlp_ratio=2.0),
        text_cfg=dict(context_length=CONTEXT_LENGTH, vocab_size=49408, width=64, heads=2, layers=2,
                      mlp_ratio=2.0),
    ),
}


@lru_cache(maxsize=1)
def _tokenizer() -> open_clip.tokenizer.SimpleTokenizer:
    return open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT_LENGTH)


def tokenize(texts: list[str] | str, context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """CLIP BPE tokens, int64 [B, context_length], zero-padded.

    METHOD D1: a sentence longer than the context is truncated with its last slot replaced by the
    end-of-text token, so the EOT-pooled sentence embedding always exists (open_clip's
    SimpleTokenizer does this; tests/test_backbones.py checks it).
    """
    if isinstance(texts, str):
        texts = [texts]
    return _tokenizer()(list(texts), context_length=context_length)


def attention_pool(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's `AttentionPool2d` output for its one query that is read (the mean token), factorised.

    open_clip attends from all HW + 1 tokens and keeps token 0, and projects every token to keys and
    values (2 (HW + 1) C^2 multiply-adds). Per head h with q_h = W_q,h t_0 + b_q,h / sqrt(d):
        logits_t = q_h . (W_k,h t_t + b_k,h) = (W_k,h^T q_h) . t_t + const   (const cancels in softmax)
        out_h    = sum_t a_t (W_v,h t_t + b_v,h) = W_v,h (sum_t a_t t_t) + b_v,h  (sum_t a_t = 1)
    so nothing is projected per token: 2 H (HW + 1) C + 3 C^2 multiply-adds. For the re-strided
    clip-tiny-rn (C 512, 16 heads, 65 tokens) this is ~15x less, about half the frozen scorer's cost
    on CPU. Equal to `pool(x)` up to float rounding (tests/test_backbones.py).
    """
    B, C = x.shape[:2]
    H = pool.num_heads
    t = x.flatten(2).transpose(1, 2)  # [B, HW, C]
    t = torch.cat([t.mean(1, keepdim=True), t], dim=1) + pool.positional_embedding.to(t.dtype)  # [B, T, C]
    q = F.linear(t[:, 0], pool.q_proj.weight, pool.q_proj.bias) * (C // H) ** -0.5  # [B, C]
    u = torch.einsum("bhd,hdc->bhc", q.view(B, H, -1), pool.k_proj.weight.view(H, -1, C))  # W_k,h^T q_h
    attn = torch.einsum("bhc,btc->bht", u, t).softmax(-1)
    mixed = torch.einsum("bht,btc->bhc", attn, t)  # sum_t a_t t_t, per head
    v = torch.einsum("bhc,hdc->bhd", mixed, pool.v_proj.weight.view(H, -1, C)).reshape(B, C) + pool.v_proj.bias
    return F.linear(v, pool.c_proj.weight, pool.c_proj.bias)


class ClipBackbone(nn.Module):
    """An open_clip CLIP with dense visual features, per-token text features and CLIP normalisation."""

    def __init__(self, model: CLIP, arch: str, image_size: int, quick_gelu: bool = False):
        super().__init__()
        if not isinstance(model, CLIP):
            raise TypeError(f"{arch}: only open_clip CLIP models are supported, got {type(model).__name__}")
        self.clip = model
        self.arch = arch
        self.image_size = int(image_size)
        self.quick_gelu = quick_gelu
        self.mean: tuple[float, float, float] = tuple(OPENAI_DATASET_MEAN)
        self.std: tuple[float, float, float] = tuple(OPENAI_DATASET_STD)
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        visual = model.visual
        if isinstance(visual, ModifiedResNet):
            self.is_vit = False
            self.visual_channels = visual.layer4[-1].conv3.out_channels  # 2048 for RN50
            grid = math.isqrt(visual.attnpool.positional_embedding.shape[0] - 1)
            self.stride = self.image_size // grid  # 32; 8 for a re-strided tower (clip-tiny-rn)
        elif isinstance(visual, VisionTransformer):
            self.is_vit = True
            self.visual_channels = visual.conv1.out_channels
            self.stride = visual.patch_size[0]
        else:
            raise TypeError(f"{arch}: unsupported image tower {type(visual).__name__} (RN or ViT only)")
        self.embed_dim: int = visual.output_dim if self.is_vit else visual.attnpool.c_proj.out_features
        proj = model.text_projection
        self.text_dim: int = proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]  # C_l
        self.token_dim: int = model.token_embedding.embedding_dim
        self.context_length: int = model.context_length
        self._frozen = False
        self.dense = "tokens"  # ViT dense features: "tokens" | "values" (see `_vit_tokens`)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of `encode_dense` at `image_size`."""
        n = self.image_size // self.stride
        return (n, n)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def tokenize(self, texts: list[str] | str) -> torch.Tensor:
        return tokenize(texts, CONTEXT_LENGTH)

    # ---- images -------------------------------------------------------------------------------
    def normalize(self, img01: torch.Tensor) -> torch.Tensor:
        return (img01 - self._mean.to(img01.dtype)) / self._std.to(img01.dtype)

    def _check_size(self, img01: torch.Tensor) -> None:
        if img01.ndim != 4 or img01.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, S, S], got {tuple(img01.shape)}")
        if tuple(img01.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"{self.arch} was built for {self.image_size}x{self.image_size} inputs, got "
                f"{tuple(img01.shape[-2:])}; pass image_size to build_clip"
            )

    def _rn_trunk(self, x: torch.Tensor) -> torch.Tensor:
        v = self.clip.visual
        x = v.stem(x)
        x = v.layer1(x)
        x = v.layer2(x)
        x = v.layer3(x)
        return v.layer4(x)

    def _vit_tokens(self, x: torch.Tensor, dense: str = "tokens") -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled before proj [B, width], patch tokens after ln_post [B, L, width]).

        `dense == "values"` (MaskCLIP's readout) runs the last block with each token attending
        only to itself, so its patch outputs are out_proj(value) of their own position instead of a
        softmax mix of the whole image; the earlier blocks are unchanged. The pooled token is then
        not CLIP's own, so callers take it from a "tokens" pass.
        """
        v = self.clip.visual
        x = v._embeds(x)
        if dense == "values":
            blocks = v.transformer.resblocks
            L = x.shape[1]
            self_only = torch.full((L, L), float("-inf"), device=x.device, dtype=x.dtype)
            self_only.fill_diagonal_(0.0)
            if not v.transformer.batch_first:
                x = x.transpose(0, 1)
            for blk in blocks[:-1]:
                x = blk(x)
            x = blocks[-1](x, attn_mask=self_only)
            if not v.transformer.batch_first:
                x = x.transpose(0, 1)
        else:
            x = v.transformer(x)
        pooled, tokens = v._pool(x)
        if v.final_ln_after_pool:  # only the pooled token went through ln_post; treat tokens alike
            tokens = v.ln_post(tokens)
        return pooled, tokens

    def encode(self, img01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs from one trunk pass: (dense [B, C_v, h, w], pooled [B, embed_dim])."""
        self._check_size(img01)
        x = self.normalize(img01)
        if self.is_vit:
            pooled, tokens = self._vit_tokens(x)
            if self.dense != "tokens":
                tokens = self._vit_tokens(x, self.dense)[1]
            h, w = self.clip.visual.grid_size
            dense = tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)
            proj = self.clip.visual.proj
            return dense, (pooled @ proj if proj is not None else pooled)
        dense = self._rn_trunk(x)
        return dense, attention_pool(self.clip.visual.attnpool, dense)

    def encode_dense(self, img01: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] -> [B, C_v, S/stride, S/stride]."""
        self._check_size(img01)
        x = self.normalize(img01)
        if self.is_vit:
            _, tokens = self._vit_tokens(x, self.dense)
            h, w = self.clip.visual.grid_size
            return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return self._rn_trunk(x)  # METHOD §2: layer4, before attnpool

    def encode_image(self, img01: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] -> [B, embed_dim], pooled and projected as CLIP does (not normalised)."""
        return self.encode(img01)[1]

    def encode_pyramid(self, img01: torch.Tensor) -> list[torch.Tensor]:
        """Multi-level features for stage 2 (METHOD §7): RN -> layer2, layer3, layer4 (strides 8, 16,
        32); ViT -> the patch tokens after three evenly spaced blocks, through ln_post (all at the
        patch stride)."""
        self._check_size(img01)
        x = self.normalize(img01)
        v = self.clip.visual
        if not self.is_vit:
            x = v.layer1(v.stem(x))
            c3 = v.layer2(x)
            c4 = v.layer3(c3)
            return [c3, c4, v.layer4(c4)]
        n = len(v.transformer.resblocks)
        take = [max(0, round(k * n / 3) - 1) for k in (1, 2, 3)]  # e.g. 12 blocks -> 3, 7, 11
        unique = sorted(set(take))  # a ViT of < 3 blocks repeats a level: always three levels
        out = v.forward_intermediates(x, indices=unique, intermediates_only=True, normalize_intermediates=True)
        feats = dict(zip(unique, out["image_intermediates"]))
        return [feats[i] for i in take]

    # ---- text ---------------------------------------------------------------------------------
    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens int64 [B, T] -> (sentence [B, C_l], token features [B, T, token_dim], pad_mask [B, T]).

        Same computation as open_clip's `CLIP.encode_text`, but for any T <= context_length: the text
        transformer is causal, so the first T positions of a 77-token pass do not depend on the rest
        and slicing the positional embedding and mask to T gives identical features (tested).
        """
        m = self.clip
        T = tokens.shape[1]
        if T > m.context_length:
            raise ValueError(f"{self.arch}: {T} tokens exceed the context length {m.context_length}")
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:T].to(cast)
        mask = m.attn_mask[:T, :T] if m.attn_mask is not None else None
        x = m.transformer(x, attn_mask=mask)
        x = m.ln_final(x)
        pooled = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        proj = m.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return pooled, x, tokens != 0

    # ---- training helpers ---------------------------------------------------------------------
    def freeze(self) -> "ClipBackbone":
        """No gradients and eval mode (BatchNorm statistics of RN included), kept through `.train()`."""
        for p in self.parameters():
            p.requires_grad_(False)
        self._frozen = True
        return self.train(False)

    def train(self, mode: bool = True) -> "ClipBackbone":
        return super().train(mode and not self._frozen)

    # ---- inference helpers --------------------------------------------------------------------
    def fold_batchnorms(self) -> int:
        """Fold every BatchNorm of the RN trunk into the convolution it follows (its eval-mode affine
        map becomes the conv's weights and bias), for inference only: the same outputs from one kernel
        where there were two. Returns how many were folded (0 for a ViT); refused in training mode,
        where BatchNorm normalises with the batch's own statistics."""
        if self.training:
            raise ValueError("fold_batchnorms is for inference: call .eval() first")
        visual = self.clip.visual
        if not isinstance(visual, ModifiedResNet):
            return 0
        folded = 0
        for parent in visual.modules():
            # open_clip's ModifiedResNet applies bnK right after convK (stem, Bottleneck) and, in a
            # downsample Sequential, the BatchNorm right after the Conv2d.
            kids = dict(parent.named_children())
            if isinstance(parent, nn.Sequential):
                names = list(kids)
                pairs = list(zip(names, names[1:]))
            else:
                pairs = [(name, "bn" + name[4:]) for name in kids if name.startswith("conv")]
            for conv, bn in pairs:
                if isinstance(kids.get(conv), nn.Conv2d) and isinstance(kids.get(bn), nn.BatchNorm2d):
                    setattr(parent, conv, fuse_conv_bn_eval(kids[conv], kids[bn]))
                    setattr(parent, bn, nn.Identity())
                    folded += 1
        return folded

    def extra_repr(self) -> str:
        return (f"arch={self.arch}, image_size={self.image_size}, visual_channels={self.visual_channels}, "
                f"text_dim={self.text_dim}, token_dim={self.token_dim}, grid={self.grid_size}")


# ---- construction ---------------------------------------------------------------------------------

def model_config(arch: str, image_size: int) -> dict[str, Any]:
    """open_clip's model config of `arch` at `image_size` px; ValueError naming the problem for an
    unknown arch, an unsupported tower or a size the patch/stride does not divide."""
    if arch in CUSTOM_ARCHS:
        cfg = copy.deepcopy(CUSTOM_ARCHS[arch])
    else:
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise ValueError(
                f"unknown CLIP arch '{arch}': use one of {sorted(CUSTOM_ARCHS)} or an open_clip model name "
                f"(e.g. RN50, ViT-B-16; see open_clip.list_models())"
            )
        cfg = copy.deepcopy(cfg)
    vision = cfg["vision_cfg"]
    if vision.get("timm_model_name") or cfg["text_cfg"].get("hf_model_name") or cfg.get("custom_text"):
        raise ValueError(f"{arch}: timm/HF towers are not supported; use an RN or ViT CLIP")
    patch = vision.get("patch_size") or vision.get("stride") or 32  # RN: overall stride 32
    if image_size % patch:
        raise ValueError(f"{arch}: image_size {image_size} must be a multiple of {patch}")
    vision["image_size"] = image_size  # open_clip's force_image_size
    return cfg


def _restride(visual: ModifiedResNet, stride: int) -> None:
    """Drop ModifiedResNet's last downsamplings (stem /4, layer2-4 /2 each) so its trunk has `stride`.
    A Bottleneck downsamples only through its avgpools (convs have stride 1), so removing them keeps
    every weight's shape."""
    drop = {32: (), 16: ("layer4",), 8: ("layer3", "layer4")}[stride]
    for name in drop:
        block = getattr(visual, name)[0]
        block.avgpool = nn.Identity()
        block.stride = 1
        block.downsample._modules["-1"] = nn.Identity()


def new_model(arch: str, image_size: int, quick_gelu: bool) -> CLIP:
    """An open_clip `CLIP` of `arch` at `image_size` px with random weights (small archs re-strided)."""
    if arch in CUSTOM_ARCHS:
        cfg = model_config(arch, image_size)
        stride = cfg["vision_cfg"].pop("stride", None)
        if stride is None:
            return CLIP(**cfg, quick_gelu=quick_gelu)
        # attention pooling is sized for a /32 tower: build for the input that gives our grid at /32
        cfg["vision_cfg"]["image_size"] = image_size * 32 // stride
        model = CLIP(**cfg, quick_gelu=quick_gelu)
        _restride(model.visual, stride)
        model.visual.image_size = image_size
        return model
    model_config(arch, image_size)  # validates with a clear message
    # open_clip's own factory, random weights, input size forced (checked: open_clip 3.3.0 signature)
    return open_clip.create_model(arch, pretrained=None, force_image_size=image_size,
                                  force_quick_gelu=quick_gelu)


def untrained_clip(arch: str, image_size: int, quick_gelu: bool = False) -> ClipBackbone:
    """A `ClipBackbone` of `arch` at `image_size` px with open_clip's random initialisation."""
    image_size = int(image_size)
    return ClipBackbone(new_model(arch, image_size, quick_gelu), arch, image_size, quick_gelu=quick_gelu)
