"""IRNet's semantic part: a boundary head on a frozen trunk, trained from CRF labels (METHOD §6.3, D10).

IRNet (Ahn et al. 2019) puts an edge branch on every stage of a frozen ResNet-50: per stage a 1×1
conv to 32 channels + GroupNorm + ReLU, upsampled to stride 4, concatenated, and a 1×1 conv to one
boundary logit. METHOD D10 swaps the ImageNet ResNet for the CLIP visual trunk (frozen):

- RN trunks: layer1..layer4 (strides 4, 8, 16, 32) — IRNet's stages.
- ViT trunks (the synthetic profiles' small CLIPs): the three intermediate blocks of
  `ClipBackbone.encode_pyramid`, all at the patch stride (8).
- Any other trunk: its `encode_dense` map.

A ViT has no stride-4 stage, so its boundaries could only be as sharp as its 8-px patches. The head
therefore adds one small trainable branch on the RGB image (two stride-2 3×3 convs, 32 channels)
that stands in for IRNet's stride-4 stage-1 features; it is used with every trunk, so RN and ViT
heads have the same form. The trunk stays frozen (no gradients, eval mode); only the head learns.

Training (IRNet's `train_irn`, semantic half): boundary B = σ(head) at stride 4; for every pixel pair
within radius 10 (`random_walk.search_offsets`) the path affinity a = 1 − max B along the line
between them; same-label pairs (fg–fg, bg–bg of the CRF label, reduced to stride 4 by nearest
sampling) are pushed to a → 1 and different-label pairs to a → 0; ignore pixels take no part.
IRNet's displacement field (the instance half) is not needed for referring segmentation. One
training item per ref: its CRF label (the referred object vs everything else, other objects
included), as TRIS trains IRNet on the referring pseudo-labels.

Scale: the radii (10 for training pairs, 5 for the walk) count stride-4 cells, as in IRNet on
~500-px images. On the 64-px synthetic profiles the grid is 16×16, so radius 10 spans the whole
image and most background pairs cross an object; the head then learns weak boundaries and the walk
spreads (measured on smoke: see ehin/pseudo_labels/pipeline.py). The radii are config keys.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ehin.pseudo_labels.random_walk import affinity_loss, pair_labels, path_affinity

STRIDE = 4  # IRNet predicts boundaries at stride 4


def trunk_taps(backbone: nn.Module, img01: torch.Tensor) -> list[torch.Tensor]:
    """Frozen multi-stage features of the CLIP visual trunk (module docstring)."""
    visual = getattr(getattr(backbone, "clip", None), "visual", None)
    if visual is not None and hasattr(visual, "layer4") and hasattr(backbone, "normalize"):
        x = visual.stem(backbone.normalize(img01))
        c1 = visual.layer1(x)
        c2 = visual.layer2(c1)
        c3 = visual.layer3(c2)
        return [c1, c2, c3, visual.layer4(c3)]
    if hasattr(backbone, "encode_pyramid"):
        return list(backbone.encode_pyramid(img01))
    return [backbone.encode_dense(img01)]


class BoundaryHead(nn.Module):
    """Frozen trunk + IRNet edge branches + an RGB stride-4 branch -> boundary logits [B,1,S/4,S/4]."""

    def __init__(self, backbone: nn.Module, image_size: int, width: int = 32):
        super().__init__()
        if image_size % STRIDE:
            raise ValueError(f"image_size {image_size} must be a multiple of {STRIDE}")
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        self.image_size = image_size
        device = next(backbone.parameters()).device  # a probe on the trunk's device (CUDA runs)
        with torch.no_grad():
            taps = trunk_taps(backbone, torch.zeros(1, 3, image_size, image_size, device=device))
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(t.shape[1], width, 1, bias=False), nn.GroupNorm(4, width), nn.ReLU(inplace=True))
            for t in taps
        )
        self.rgb = nn.Sequential(  # stand-in for IRNet's stride-4 stage (module docstring)
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.GroupNorm(4, width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False), nn.GroupNorm(4, width), nn.ReLU(inplace=True),
        )
        self.out = nn.Conv2d(width * (len(taps) + 1), 1, 1, bias=True)

    def train(self, mode: bool = True) -> "BoundaryHead":
        super().train(mode)
        self.backbone.eval()  # frozen trunk: BatchNorm statistics stay as pretrained
        return self

    def head_parameters(self) -> Iterator[nn.Parameter]:
        for m in (self.branches, self.rgb, self.out):
            yield from m.parameters()

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights only (the frozen trunk is rebuilt from the stage-1 checkpoint)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_head_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith("backbone.")] + list(unexpected)
        if bad:
            raise ValueError(f"boundary-head state does not fit: {bad[:4]}")

    def forward(self, img01: torch.Tensor) -> torch.Tensor:
        grid = (img01.shape[-2] // STRIDE, img01.shape[-1] // STRIDE)
        with torch.no_grad():
            taps = trunk_taps(self.backbone, img01)
        feats = [F.interpolate(b(t.float()), size=grid, mode="bilinear", align_corners=False)
                 for b, t in zip(self.branches, taps)]
        feats.append(self.rgb(img01 - 0.5))
        return self.out(torch.cat(feats, 1))

    @torch.no_grad()
    def boundary(self, img01: torch.Tensor) -> torch.Tensor:
        """σ(logits) [B,1,S/4,S/4] in eval mode."""
        was = self.training
        self.eval()
        out = torch.sigmoid(self(img01))
        self.train(was)
        return out


def reduce_label(label: np.ndarray) -> np.ndarray:
    """uint8 [S,S] -> [S/4,S/4] by nearest sampling at the cell centres (IRNet rescales with order 0)."""
    o = STRIDE // 2
    return np.ascontiguousarray(label[o::STRIDE, o::STRIDE])


def train_boundary_head(
    head: BoundaryHead,
    n_items: int,
    batches: Callable[[list[int], int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    radius: int,
    seed: int,
    device: torch.device,
    start_epoch: int = 0,
    optimizer_state: dict | None = None,
    on_epoch: Callable[[dict, dict, dict], None] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train the head for `epochs` (from `start_epoch`, for resuming); returns per-epoch mean losses.

    batches(order, batch_size) yields (images01 [B,3,S,S], labels uint8 [B,S/4,S/4]) for the items of
    `order` in that order, `batch_size` at a time (a DataLoader over them, say). IRNet's optimiser:
    SGD with momentum 0.9, polynomial decay (power 0.9) per iteration. Each epoch's order is drawn
    from (seed, epoch) alone, so a resumed run trains on exactly the batches an uninterrupted one
    would. on_epoch(entry, head_state, optimizer_state) runs after each epoch (the caller checkpoints).
    """
    from tqdm import tqdm

    params = [p for p in head.head_parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    batch_size = min(batch_size, n_items)
    steps_per_epoch = n_items // batch_size  # the last partial batch is dropped
    total = steps_per_epoch * epochs
    history = []
    head.train()
    for epoch in range(start_epoch, epochs):
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        order = order[:steps_per_epoch * batch_size]
        sums = {"loss": 0.0, "bg_pos": 0.0, "fg_pos": 0.0, "neg": 0.0}
        bar = tqdm(batches(order, batch_size), total=steps_per_epoch, desc=f"irnet epoch {epoch + 1}/{epochs}",
                   leave=False, disable=not progress)
        for step, (images, labels) in enumerate(bar):
            it = epoch * steps_per_epoch + step
            for g in opt.param_groups:  # poly decay per iteration (IRNet's PolyOptimizer)
                g["lr"] = lr * (1 - it / total) ** 0.9
            images, labels = images.to(device), labels.to(device)
            boundary = torch.sigmoid(head(images))
            aff = path_affinity(boundary, radius)
            bg_pos, fg_pos, neg = pair_labels(labels, radius)
            loss, terms = affinity_loss(aff, bg_pos, fg_pos, neg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums["loss"] += float(loss.detach())
            for k, v in terms.items():
                sums[k] += v
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        entry = {"epoch": epoch + 1, **{k: v / max(1, steps_per_epoch) for k, v in sums.items()}}
        history.append(entry)
        if on_epoch is not None:
            on_epoch(entry, head.head_state_dict(), opt.state_dict())
    return history
