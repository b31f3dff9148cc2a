"""The frozen CLIP scorer of L_CL and L_BG (paper Eq. 16; METHOD §2, §4).

    S(I, R, Q) = cos(E_v(I (.) up(sigmoid(R))), E_l(Q))                                     Eq. 16

* Frozen: a deep copy of the given CLIP in eval mode with requires_grad False, kept in eval mode by
  `.train()`. Gradients reach the response map R through the mask, never the scorer's weights.
* Masking happens on [0, 1] pixels at the scorer's own input size; the CLIP backbone then normalises
  with its own mean/std inside `encode_image` (METHOD §4: TRIS masks ImageNet-normalised pixels, a bug
  not copied: there a masked-out pixel becomes the dataset mean instead of black).
* Text features are L2-normalised, computed for all missing sentences of a call in one batched
  `encode_text`, and cached by sentence string across steps (the scorer never changes).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class FrozenScorer(nn.Module):
    def __init__(self, clip_backbone: nn.Module, image_size: int | None = None, *,
                 copy_backbone: bool = True, max_cache: int | None = None) -> None:
        """clip_backbone: a `ClipBackbone` (encode_image, encode_text, tokenize); image_size: the
        scorer's input size (default: the backbone's); max_cache: LRU bound on cached sentences
        (None = unbounded: the training sentences of a split are a fixed, reused set)."""
        super().__init__()
        clip = copy.deepcopy(clip_backbone) if copy_backbone else clip_backbone
        for p in clip.parameters():
            p.requires_grad_(False)
        self.clip = clip.eval()
        self.image_size = int(image_size or clip_backbone.image_size)
        self.max_cache = max_cache
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encode_text_calls = 0  # batched text-encoder calls so far (cache misses); for tests/logs

    def train(self, mode: bool = True) -> "FrozenScorer":
        super().train(mode)
        self.clip.eval()  # frozen: BatchNorm/dropout stay in inference mode
        return self

    # ---- text -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_texts(self, tokens: torch.Tensor | None, keys: Sequence[str]) -> torch.Tensor:
        """Normalised text features [B, E] for the sentences `keys`, from the cache where possible.

        tokens [B, T] are the tokens of `keys` (row b of keys[b]); None tokenises the missing sentences
        with the scorer's own tokenizer (the scorer may be another CLIP than the model's backbone).
        All missing sentences go through the text encoder in one call.
        """
        keys = list(keys)
        if tokens is not None and len(tokens) != len(keys):
            raise ValueError(f"{len(tokens)} token rows for {len(keys)} sentences")
        device = next(self.clip.parameters()).device
        missing: dict[str, int] = {}  # sentence -> first row holding it
        for b, k in enumerate(keys):
            if k not in self._cache and k not in missing:
                missing[k] = b
        if missing:
            if tokens is None:
                tok = self.clip.tokenize(list(missing))
            else:
                tok = tokens[list(missing.values())]
            with torch.autocast(device.type, enabled=False):
                feats = self.clip.encode_text(tok.to(device))[0].float()
            feats = F.normalize(feats, dim=-1)
            self.encode_text_calls += 1
            for k, f in zip(missing, feats):
                self._cache[k] = f
        out = []
        for k in keys:
            f = self._cache[k]
            if self.max_cache is not None:
                self._cache.move_to_end(k)
            out.append(f.to(device))
        if self.max_cache is not None:
            while len(self._cache) > self.max_cache:
                self._cache.popitem(last=False)
        return torch.stack(out)

    def clear_cache(self) -> None:
        self._cache.clear()

    # The cache is training state: a sentence's features depend (in the last bits) on which batch
    # first encoded it, so a resumed run must reuse the same ones to give the same weights.
    # Saved as one matrix: a copy per sentence (tens of thousands by the end of a run) waited on the
    # device once each, at every epoch's checkpoint.
    def cache_state(self) -> dict:
        feats = torch.stack(list(self._cache.values())).cpu() if self._cache else torch.empty(0)
        return {"sentences": list(self._cache), "features": feats}

    def load_cache_state(self, state: dict) -> None:
        device = next(self.parameters()).device
        if isinstance(state.get("sentences"), list) and torch.is_tensor(state.get("features")):
            pairs = zip(state["sentences"], state["features"].to(device))
        else:  # checkpoints written before session 20: {sentence: features}
            pairs = ((k, v.to(device)) for k, v in state.items())
        self._cache = OrderedDict(pairs)

    # ---- images -----------------------------------------------------------------------------------
    def _at_size(self, images01: torch.Tensor) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        img = images01.float()
        if tuple(img.shape[-2:]) != size:
            # No gradient needs to reach the pixels, so antialias freely when shrinking.
            img = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=True)
        return img

    def embed_images(self, images01: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings [B, E] of [B,3,S,S] images in [0,1], resized to the scorer's size."""
        img = self._at_size(images01)
        return F.normalize(self.clip.encode_image(img).float(), dim=-1)  # CLIP normalises inside (METHOD §4)

    def score_masked(self, images01: torch.Tensor, maps: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """S(I, R, Q) of Eq. 16 for B masked images against M texts each.

        images01 [B,3,S,S] in [0,1]; maps [B,h,w] response-map logits R; text_feats [B,M,E] normalised.
        Returns cosine similarities [B, M]; differentiable w.r.t. `maps`.
        """
        emb = self.embed_masked(images01, torch.sigmoid(maps.float()))
        return torch.einsum("be,bme->bm", emb, text_feats.to(emb.dtype))

    def embed_masked(self, images01: torch.Tensor, masks01: torch.Tensor) -> torch.Tensor:
        """Normalised embeddings [B, E] of images01 [B,3,S,S] in [0,1] times masks01 [B,h,w] in [0,1]:
        the image at the scorer's size, the mask bilinearly resized to it, multiplied in [0,1] space
        (what `score_masked` does with sigmoid(R); ground-truth masks go through it unchanged)."""
        img = self._at_size(images01)
        mask = F.interpolate(masks01.float()[:, None], size=img.shape[-2:], mode="bilinear", align_corners=False)
        return self.embed_images(img * mask)  # [0,1]-space masking (METHOD §4); already at the scorer's size


def uses_scorer(cfg: dict) -> bool:
    """Whether a config's stage-1 loss needs the frozen scorer (L_CL or L_BG on)."""
    return bool(cfg["loss"]["cl"] or cfg["loss"]["bg"])


def build_frozen_scorer(cfg: dict) -> FrozenScorer:
    """The frozen CLIP of a config's `scorer` section (METHOD §2); its weights default to the backbone's."""
    from ehin.backbones import build_clip
    from ehin.config import clip_spec

    arch, pretrained, size = clip_spec(cfg, "scorer")
    return FrozenScorer(build_clip(arch, pretrained, size), size, copy_backbone=False)  # built for it alone: no copy
