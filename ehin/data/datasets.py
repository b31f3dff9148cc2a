"""Torch datasets over a ReferDataset (docs/architecture.md, "Data").

- TrainDataset: one item per ref per epoch with one random sentence and K negative expressions
  (METHOD D2); the randomness of item (epoch, index) comes from (seed, epoch, index) alone, so it
  does not depend on DataLoader workers or on the order items are asked for.
- EvalDataset: one item per (ref, sentence) (METHOD §1); ground truth at original size.

Images are returned in [0, 1], not normalised: the model and the frozen scorer normalise with their
own statistics (METHOD §4, last point).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ehin.cli import UserError
from ehin.data.refer import ReferDataset

Tokenize = Callable[[list[str]], torch.Tensor]  # list[str] -> int64 [B, 20] (the backbone's, D1)

# Resized images/masks are kept in memory when the whole split fits in this budget: synthetic data
# does (the gpu profile's 128-px train split of synth-refcoco+ takes 343 MB; decoding its PNGs again on
# every access was most of a GPU step's time); RefCOCO at 320 px (5 GB) does not and is decoded on
# every access.
CACHE_BYTES = 2**30


def resize_image_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [S, S, 3] (PIL bilinear, METHOD §1)."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def to_tensor01(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1]."""
    return torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()


def resize_image(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, S, S] in [0, 1] (PIL bilinear, METHOD §1)."""
    return to_tensor01(resize_image_uint8(image, size))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """bool [H, W] -> bool [S, S] (nearest)."""
    im = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
    return np.asarray(im) > 127


def xywh_to_xyxy(box: Sequence[float], sx: float = 1.0, sy: float = 1.0) -> np.ndarray:
    x, y, w, h = (float(v) for v in box)
    return np.array([x * sx, y * sy, (x + w) * sx, (y + h) * sy], dtype=np.float32)


def _sentences(ref: dict) -> list[str]:
    return [ReferDataset.sentence(s) for s in ref["sentences"]]


class TokenCache:
    """`tokenize`, one sentence at a time and remembered: a sentence's row does not depend on the
    others it is tokenized with, and a split repeats its expressions every epoch (CLIP's BPE with
    ftfy cost a GPU step more than the model did). It holds one row per distinct sentence of the
    split: at RefCOCO+'s 120,000 expressions and 77 int64 tokens, about 74 MB."""

    def __init__(self, tokenize: Tokenize) -> None:
        self.tokenize = tokenize
        self._rows: dict[str, torch.Tensor] = {}

    def __call__(self, sentences: list[str]) -> torch.Tensor:
        missing = [s for s in dict.fromkeys(sentences) if s not in self._rows]
        if missing:
            self._rows.update(zip(missing, self.tokenize(missing).long()))
        return torch.stack([self._rows[s] for s in sentences])


class TrainDataset(Dataset):
    """Item: image [3,S,S] float in [0,1], tokens [20], neg_tokens [K,20], sentence, neg_sentences,
    mask [S,S] float, box [4] xyxy in S-pixel coords, ref_id, image_id."""

    def __init__(self, refer: ReferDataset, split: str, tokenize: Tokenize, image_size: int, K: int, seed: int) -> None:
        self.refer, self.split, self.tokenize = refer, split, TokenCache(tokenize)
        self.image_size, self.K, self.seed = int(image_size), int(K), int(seed)
        self.items = refer.refs(split)
        if not self.items:
            raise UserError(f"{refer.refs_file}: split '{split}' has no refs")
        self.epoch = 0
        self._by_image: dict[int, list[int]] = defaultdict(list)
        for i, ref in enumerate(self.items):
            self._by_image[ref["image_id"]].append(i)
        n_bytes = (3 * len(self._by_image) + len(self.items)) * self.image_size**2
        self._cache = n_bytes <= CACHE_BYTES
        self._images: dict[int, np.ndarray] = {}
        self._masks: dict[int, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def _image(self, image_id: int) -> torch.Tensor:
        img = self._images.get(image_id)
        if img is None:
            img = resize_image_uint8(self.refer.load_image(image_id), self.image_size)
            if self._cache:
                self._images[image_id] = img
        return to_tensor01(img)

    def _mask(self, ann_id: int) -> np.ndarray:
        if ann_id in self._masks:
            return self._masks[ann_id]
        m = resize_mask(self.refer.ann_mask(ann_id), self.image_size)
        if self._cache:
            self._masks[ann_id] = m
        return m

    def negatives(self, index: int, positive: str, rng: np.random.Generator) -> list[str]:
        """K negative expressions for item `index` (METHOD D2): first the other refs of the same image,
        one random sentence each, drawn without replacement; then expressions of other images of the
        split. Never the positive string, nor any other sentence of the positive's own ref (they
        describe the target too); no repeats unless the split runs out of distinct ones."""
        ref = self.items[index]
        forbidden = set(_sentences(ref)) | {positive}
        negs: list[str] = []
        same = [j for j in self._by_image[ref["image_id"]] if j != index]
        for j in rng.permutation(len(same)):
            if len(negs) == self.K:
                break
            options = [s for s in _sentences(self.items[same[j]]) if s not in forbidden and s not in negs]
            if options:
                negs.append(options[rng.integers(len(options))])
        # fill up from other images of the split (rejection sampling, then allow repeats)
        attempts = 0
        while len(negs) < self.K:
            attempts += 1
            other = self.items[rng.integers(len(self.items))]
            if other["image_id"] == ref["image_id"] and attempts < 50 * self.K:
                continue
            sents = _sentences(other)
            s = sents[rng.integers(len(sents))]
            if s in forbidden or (s in negs and attempts < 50 * self.K):
                if attempts > 1000 * self.K:
                    raise ValueError(f"split '{self.split}' has no expression other than {positive!r} to use as a negative")
                continue
            negs.append(s)
        return negs

    def __getitem__(self, index: int) -> dict:
        ref = self.items[index]
        # METHOD D2 + reproducibility: the item depends on (seed, epoch, index) only
        rng = np.random.default_rng([self.seed, self.epoch, index])
        sents = _sentences(ref)
        sentence = sents[rng.integers(len(sents))]
        negs = self.negatives(index, sentence, rng)
        tokens = self.tokenize([sentence] + negs)
        info = self.refer.image_info(ref["image_id"])
        s = self.image_size
        box = xywh_to_xyxy(self.refer.ann_box(ref["ann_id"]), s / info["width"], s / info["height"])
        return {
            "image": self._image(ref["image_id"]),
            "tokens": tokens[0],
            "neg_tokens": tokens[1:],  # [K, 20]
            "sentence": sentence,
            "neg_sentences": negs,
            "mask": torch.from_numpy(self._mask(ref["ann_id"]).astype(np.float32)),
            "box": torch.from_numpy(box),
            "ref_id": ref["ref_id"],
            "image_id": ref["image_id"],
        }


class EvalDataset(Dataset):
    """One item per (ref, sentence): image [3,S,S] in [0,1], tokens [20], sentence, mask bool
    [H0,W0], box [4] xyxy original coords, objects_mask bool [H0,W0], object_masks bool [M,H0,W0],
    ref_id, sent_id, image_id, orig_size (H0, W0)."""

    def __init__(self, refer: ReferDataset, split: str, tokenize: Tokenize, image_size: int,
                 max_items: int | None = None) -> None:
        self.refer, self.split, self.tokenize, self.image_size = refer, split, TokenCache(tokenize), int(image_size)
        items = [(ref, sent) for ref in refer.refs(split) for sent in ref["sentences"]]
        if not items:  # a refs file without the split: its metrics would be NaN over no expression
            raise UserError(f"{refer.refs_file}: split '{split}' has no expressions")
        if max_items is not None and max_items < len(items):
            # a fixed random subset (not the first images only), kept in file order
            keep = np.sort(np.random.default_rng(0).choice(len(items), size=int(max_items), replace=False))
            items = [items[i] for i in keep]
        self.items = items
        # Each image's decoded pixels and object masks are kept when the split's images fit the budget
        # (training evaluates every epoch; the images are read once per expression, not once per image).
        images = {ref["image_id"]: refer.image_info(ref["image_id"]) for ref, _ in items}
        n_bytes = sum(12 * self.image_size**2 + len(refer.image_ann_ids(k)) * i["height"] * i["width"]
                      for k, i in images.items())
        self._cache = n_bytes <= CACHE_BYTES
        self._pixels: dict[int, tuple] = {}

    def _image_and_masks(self, image_id: int) -> tuple[tuple[int, int], torch.Tensor, np.ndarray]:
        """(original (H0, W0), resized float image [3, S, S], bool object masks [M, H0, W0])."""
        hit = self._pixels.get(image_id)
        if hit is not None:
            return hit
        image = self.refer.load_image(image_id)
        out = (image.shape[:2], resize_image(image, self.image_size),
               np.stack([self.refer.ann_mask(a) for a in self.refer.image_ann_ids(image_id)]))
        if self._cache:
            self._pixels[image_id] = out
        return out

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        ref, sent = self.items[index]
        (h0, w0), resized, object_masks = self._image_and_masks(ref["image_id"])
        ann_ids = self.refer.image_ann_ids(ref["image_id"])
        sentence = ReferDataset.sentence(sent)
        return {
            "image": resized,
            "tokens": self.tokenize([sentence])[0],
            "sentence": sentence,
            "mask": torch.from_numpy(object_masks[ann_ids.index(ref["ann_id"])]),
            "box": torch.from_numpy(xywh_to_xyxy(self.refer.ann_box(ref["ann_id"]))),
            "objects_mask": torch.from_numpy(object_masks.any(0)),
            "object_masks": torch.from_numpy(object_masks),
            "ref_id": ref["ref_id"],
            "sent_id": sent.get("sent_id", index),
            "image_id": ref["image_id"],
            "orig_size": (h0, w0),
        }


def train_collate(batch: list[dict]) -> dict:
    """Stack the tensors (image, tokens, neg_tokens [N,K,20], mask, box); ref_id/image_id as int64
    tensors; sentence a list[str] and neg_sentences a list (per item) of lists of K strings."""
    out = {k: torch.stack([b[k] for b in batch]) for k in ("image", "tokens", "neg_tokens", "mask", "box")}
    out["ref_id"] = torch.tensor([b["ref_id"] for b in batch], dtype=torch.long)
    out["image_id"] = torch.tensor([b["image_id"] for b in batch], dtype=torch.long)
    out["sentence"] = [b["sentence"] for b in batch]
    out["neg_sentences"] = [list(b["neg_sentences"]) for b in batch]
    return out


def eval_collate(batch: list[dict]) -> dict:
    """Stack image and tokens; every other key stays a list (original sizes differ per image)."""
    out = {k: torch.stack([b[k] for b in batch]) for k in ("image", "tokens")}
    for k in batch[0]:
        if k not in out:
            out[k] = [b[k] for b in batch]
    return out
