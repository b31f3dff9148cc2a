"""Stage-2 losses (METHOD §7; paper §3.5): BCE + Dice on every decoder head against the pseudo-label,
ignore pixels (255) excluded; optional EMA-teacher consistency (MSE or KL).

Every term is a per-sample mean, then a mean over the batch. With equal per-rank batches, DDP's
gradient average over ranks then equals the gradient of the same loss on the global batch
(tests/test_ddp.py), which a loss normalised by the batch's pixel count would not give.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = 255


def _valid_and_target(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    valid = target != IGNORE
    return valid.float(), (target == 1).float()


def masked_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits [B,H,W], target [B,H,W] in {0, 1, 255} -> mean over samples of the mean BCE over each
    sample's non-ignore pixels (a sample with none contributes 0)."""
    valid, tgt = _valid_and_target(target)
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), tgt, reduction="none") * valid
    return (per_pixel.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)).mean()


def masked_dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Soft Dice loss 1 − (2 Σ p·g + ε) / (Σ p + Σ g + ε) per sample over non-ignore pixels
    (p = σ(logits)), averaged over the batch."""
    valid, tgt = _valid_and_target(target)
    p = torch.sigmoid(logits.float()) * valid
    g = tgt * valid
    inter = (p * g).flatten(1).sum(1)
    denom = p.flatten(1).sum(1) + g.flatten(1).sum(1)
    return (1 - (2 * inter + eps) / (denom + eps)).mean()


class Stage2Loss:
    """`(logits list of [B,h_k,w_k], target [B,S,S]) -> (total, terms)`: each head's logits are
    upsampled (bilinear) to the label size; loss = mean over heads of BCE + dice_weight · Dice."""

    def __init__(self, dice_weight: float = 1.0):
        self.dice_weight = float(dice_weight)

    def __call__(self, logits: list[torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        size = target.shape[-2:]
        bce = dice = 0.0
        for lg in logits:
            up = lg if lg.shape[-2:] == size else F.interpolate(lg[:, None].float(), size=size, mode="bilinear",
                                                                 align_corners=False)[:, 0]
            bce = bce + masked_bce(up, target)
            dice = dice + masked_dice(up, target)
        n = len(logits)
        bce, dice = bce / n, dice / n
        return bce + self.dice_weight * dice, {"bce": bce.detach(), "dice": dice.detach()}


def consistency(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-pixel consistency of the student's logits with the (detached) teacher's, mean per sample
    then over the batch. mse: (σ(s) − σ(t))²; kl: KL(Bernoulli(σ(t)) ‖ Bernoulli(σ(s)))."""
    s, t = student.float(), teacher.detach().float()
    if kind == "mse":
        per = (torch.sigmoid(s) - torch.sigmoid(t)) ** 2
    elif kind == "kl":
        pt = torch.sigmoid(t)
        # KL = pt (log pt − log ps) + (1 − pt)(log(1 − pt) − log(1 − ps)), in log-sigmoid form (stable)
        per = pt * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - pt) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    else:
        raise ValueError(f"unknown consistency '{kind}' (mse | kl)")
    return per.flatten(1).mean(1).mean()


class EMATeacher(nn.Module):
    """θ_teacher ← d·θ_teacher + (1 − d)·θ_student after each optimiser step; buffers are copied."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = float(decay)
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> "EMATeacher":
        super().train(mode)
        self.model.eval()  # the teacher only predicts
        return self

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        d = self.decay
        for t, s in zip(self.model.parameters(), student.parameters()):
            t.mul_(d).add_(s.detach(), alpha=1 - d)
        for t, s in zip(self.model.buffers(), student.buffers()):
            t.copy_(s)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.model(*args, **kwargs)
