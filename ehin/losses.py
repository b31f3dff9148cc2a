"""Stage-1 losses (paper Eq. 14-19; METHOD §4, D7, D8).

    L = lambda_1 L_FG + lambda_2 L_CL + lambda_3 L_BG                                    Eq. 17

* Pooled image-level score (Eq. 14, TRIS's pooling) of the map R_ij of image i and text j:
      y_ij = max_p R_ij[p] + mean_p R_ij[p] + psi_ij,   psi = (1 - m)^3 log(0.01 + m)
  m_ij is the mean over pixels of a foreground probability. The softmax behind it runs, at each pixel
  p of image i, over N + 1 logits: a constant background logit 1 and the maps of ALL N texts of the
  batch scored against image i, [1, R_i1[p], ..., R_iN[p]]. So texts compete for the pixels of one
  image (row i of the N x N maps), never across images; m_ij is text j's share of image i, and psi
  (a focal penalty: ~log 0.01 for m -> 0, 0 for m = 1) pushes y_ij down when text j claims almost
  nothing of image i. (This is TRIS's `TRIS_Loss`: softmax over dim 1 of cat([ones, score_t]).)
* L_FG (Eq. 18, D7): multilabel soft-margin of y [N, N] against the identity; an off-diagonal pair
  whose sentence is the same string as the image's own sentence is not a negative and is masked out.
* L_BG (Eq. 19, D7): -(1/K) sum_k log(1 - S(I_i, R_ii, Q_ik)) with the frozen scorer, the fused map
  R_ii and the K same-image negatives.
* L_CL (Eq. 15-16, D8): ECLM's loss, `ehin.model.eclm.cl_loss`, on the image masked by R_p = the
  early (pre-HIPM) diagonal map ("early", EHIN) or the fused one ("late"); see ehin/model/eclm.py.
Every term is averaged over the N images. lambda = 0 switches a term off and skips its computation.

Under DDP (docs/method.md, D-DDP) the maps are this rank's n rows of the global batch's N x N maps:
row a (image a of this rank) has its own text in column `text_offset` + a, and the columns' sentences
are the global batch's (`text_sentences`). Every term is then this rank's share of the row mean.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ehin.model.eclm import CL_VARIANTS, cl_loss, clamp_scores

FOCAL_POWER, FOCAL_OFFSET = 3, 0.01  # psi = (1 - m)^3 log(0.01 + m) (Eq. 14, TRIS's focal penalty)
BACKGROUND_LOGIT = 1.0  # TRIS's constant background channel


def focal_penalty(m: torch.Tensor) -> torch.Tensor:
    """psi(m) = (1 - m)^3 log(0.01 + m)."""
    return (1 - m) ** FOCAL_POWER * torch.log(FOCAL_OFFSET + m)


def foreground_share(maps: torch.Tensor) -> torch.Tensor:
    """m [Ni, Nt]: mean over pixels of softmax over [background 1, R_i1, ..., R_iNt] (per image i)."""
    R = maps.flatten(2)  # [Ni, Nt, P]
    bg = torch.full_like(R[:, :1], BACKGROUND_LOGIT)
    prob = torch.softmax(torch.cat([bg, R], dim=1), dim=1)[:, 1:]  # softmax over the text axis + bg
    return prob.mean(-1)


def pooled_scores(maps: torch.Tensor) -> torch.Tensor:
    """y [Ni, Nt] of Eq. 14 from response maps [Ni, Nt, h, w] (image i, text j)."""
    R = maps.flatten(2)
    return R.amax(-1) + R.mean(-1) + focal_penalty(foreground_share(maps))


def fg_loss(y: torch.Tensor, sentences: Sequence[str] | None = None, text_sentences: Sequence[str] | None = None,
            text_offset: int = 0) -> torch.Tensor:
    """Multilabel soft-margin of y [N, N] vs the identity (Eq. 18, D7), averaged over the unmasked
    entries of each row, then over rows. Off-diagonal (i, j) with sentences[j] == sentences[i] is
    masked out. Without a mask this equals F.multilabel_soft_margin_loss(y, eye(N)).
    DDP (D-DDP): y [n, N] holds n rows of the global matrix, row a's positive in column text_offset + a;
    text_sentences are the N columns' sentences (default: `sentences`)."""
    n, N = y.shape
    eye = torch.eye(n, N, dtype=torch.bool, device=y.device).roll(text_offset, dims=1)
    valid = torch.ones_like(eye)
    if sentences is not None:
        columns = sentences if text_sentences is None else text_sentences
        same = torch.tensor([[a == b for b in columns] for a in sentences], device=y.device)
        valid = ~same | eye
    per = -torch.where(eye, F.logsigmoid(y), F.logsigmoid(-y))
    per = per * valid
    return (per.sum(1) / valid.sum(1)).mean()


def bg_loss(s_neg: torch.Tensor) -> torch.Tensor:
    """s_neg [N, K]: S of the image masked by R_ii against its K same-image negatives (Eq. 19, D7)."""
    if s_neg.shape[1] == 0:
        return s_neg.new_zeros(())
    return -torch.log(1 - clamp_scores(s_neg)).mean(1).mean()  # clamped as in L_CL (METHOD §10)


def diagonal(maps: torch.Tensor, text_offset: int = 0) -> torch.Tensor:
    """[N, N, h, w] -> [N, h, w]: the matched pairs R_ii (DDP: [n, N, h, w] -> R_{a, text_offset + a})."""
    return maps.diagonal(offset=text_offset, dim1=0, dim2=1).permute(2, 0, 1)


class Stage1Loss(nn.Module):
    """`Stage1Loss(scorer, fg=, cl=, bg=, cl_variant=)(out, batch) -> (total, dict(fg=..., cl=..., bg=...))`;
    `Stage1Loss.from_config(cfg, scorer)` reads the loss section (Eq. 21's weights λ).

    out: EHIN.forward's dict. batch: image [N,3,S,S] in [0,1], sentence list[str] (N),
    neg_sentences (N lists of K strings). Terms that are switched off are reported as 0.0.
    Under DDP the trainer adds text_offset and text_sentences (see the module docstring).
    """

    def __init__(self, scorer: nn.Module | None = None, *, fg: float, cl: float, bg: float, cl_variant: str) -> None:
        super().__init__()
        self.w_fg, self.w_cl, self.w_bg = float(fg), float(cl), float(bg)
        self.cl_variant = cl_variant
        if self.cl_variant not in CL_VARIANTS:
            raise ValueError(f"loss.cl_variant must be early or late, got {self.cl_variant!r}")
        if (self.w_cl > 0 or self.w_bg > 0) and scorer is None:
            raise ValueError("L_CL and L_BG need the frozen scorer (loss.cl > 0 or loss.bg > 0)")
        self.scorer = scorer

    @classmethod
    def from_config(cls, cfg: dict, scorer: nn.Module | None = None) -> "Stage1Loss":
        """The loss a resolved config asks for (its loss section, checked key by key)."""
        from ehin.config import LossConfig, section

        loss: LossConfig = section(cfg, "loss")
        return cls(scorer, fg=loss.fg, cl=loss.cl, bg=loss.bg, cl_variant=loss.cl_variant)

    def _texts(self, batch: dict, N: int) -> torch.Tensor:
        """Scorer text features [N, 1 + K, E]: the positive sentence then the K negatives.
        One batched encoder call for the sentences not cached yet (FrozenScorer caches by string)."""
        pos = list(batch["sentence"])
        negs = [list(n) for n in batch["neg_sentences"]]
        if len(pos) != N or len(negs) != N:
            raise ValueError(f"batch has {len(pos)} sentences and {len(negs)} negative lists for {N} images")
        K = len(negs[0]) if negs else 0
        if any(len(n) != K for n in negs):
            raise ValueError("every image needs the same number K of negative sentences")
        keys = pos + [s for n in negs for s in n]
        feats = self.scorer.encode_texts(None, keys)  # the scorer tokenises with its own tokenizer
        return torch.cat([feats[:N, None], feats[N:].reshape(N, K, feats.shape[-1])], dim=1)

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        maps = out["maps"].float()
        N = maps.shape[0]
        offset = int(batch.get("text_offset", 0))  # DDP: the column of this rank's first text
        total = maps.new_zeros(())
        terms: dict[str, torch.Tensor | float] = {"fg": 0.0, "cl": 0.0, "bg": 0.0}

        if self.w_fg > 0:
            fg = fg_loss(pooled_scores(maps), batch["sentence"], batch.get("text_sentences"), offset)
            total = total + self.w_fg * fg
            terms["fg"] = fg.detach()

        if self.w_cl > 0 or self.w_bg > 0:
            texts = self._texts(batch, N)  # [N, 1 + K, E]
            images = batch["image"]
            fused = diagonal(maps, offset)
            # All masked images of the step go through the scorer in one call: the raw-map ones for
            # early L_CL and the fused-map ones for L_BG (and late L_CL, which shares them).
            masks, who = [], []
            if self.w_cl > 0 and self.cl_variant == "early":
                masks.append(diagonal(out["raw_maps"].float(), offset))
                who.append("cl")
            if self.w_bg > 0 or self.cl_variant == "late":
                masks.append(fused)
                who.append("fused")
            s = self.scorer.score_masked(images.repeat(len(masks), 1, 1, 1), torch.cat(masks),
                                         texts.repeat(len(masks), 1, 1))
            s = dict(zip(who, s.split(N)))
            if self.w_cl > 0:
                cl = cl_loss(s["cl"] if self.cl_variant == "early" else s["fused"])
                total = total + self.w_cl * cl
                terms["cl"] = cl.detach()
            if self.w_bg > 0:
                bg = bg_loss(s["fused"][:, 1:])
                total = total + self.w_bg * bg
                terms["bg"] = bg.detach()
        return total, terms
