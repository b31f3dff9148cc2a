"""PRMS: one response map per ref (METHOD §6.1; TRIS's positive response map selection).

A ref has several sentences and stage 1 gives one map per sentence. Each map masks the image; the
frozen CLIP scorer compares every masked image with every sentence of the ref; the map whose masked
image agrees best with all the sentences on average wins: the region that every annotator's wording
describes.

The mask is the max-normalised map (the map that the CRF and random walk refine). The scorer's
`score_masked` takes logits and applies a sigmoid, so the normalised map m is passed as logit(m).
"""
from __future__ import annotations

from typing import Callable

import torch

ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """[n,h,w] >= 0 -> divided by each map's max (an all-zero map stays zero)."""
    peak = maps.flatten(1).amax(1).clamp_min(1e-12)
    return maps.clamp_min(0) / peak[:, None, None]


def score_matrix(image01: torch.Tensor, maps: torch.Tensor, text_feats: torch.Tensor, score_masked: ScoreFn) -> torch.Tensor:
    """S[i, j] = similarity of the image masked by map i with sentence j -> [n, n].

    image01 [3,S,S] (one image), maps [n,h,w] (normalised to [0,1]), text_feats [n,E] (normalised);
    score_masked(images01 [n,3,S,S], logits [n,h,w], text_feats [n,M,E]) -> [n,M] (FrozenScorer's).
    """
    n = maps.shape[0]
    logits = torch.logit(maps.float().clamp(1e-4, 1 - 1e-4))  # sigmoid(logit(m)) = m
    images = image01.unsqueeze(0).expand(n, -1, -1, -1)
    return score_masked(images, logits, text_feats.unsqueeze(0).expand(n, -1, -1))


def select(image01: torch.Tensor, maps: torch.Tensor, text_feats: torch.Tensor, score_masked: ScoreFn) -> int:
    """Index of the map whose masked image is most similar to all of the ref's sentences (mean over j)."""
    if maps.shape[0] == 1:
        return 0
    s = score_matrix(image01, maps, text_feats, score_masked)
    return int(s.mean(1).argmax())


def select_many(images01: torch.Tensor, maps: list[torch.Tensor], text_feats: list[torch.Tensor],
                score_masked: ScoreFn, batch_size: int = 64) -> list[int]:
    """`select` for several refs at once: images01 [R,3,S,S], maps[r] [n_r,h,w] normalised,
    text_feats[r] [n_r,E]. Refs are scored in batches of masked images (texts zero-padded to the
    largest n_r; padded columns are left out of the mean)."""
    jobs = [(r, i) for r, m in enumerate(maps) for i in range(m.shape[0]) if m.shape[0] > 1]
    width = max((m.shape[0] for m in maps), default=1)
    dim = text_feats[0].shape[-1] if text_feats else 1
    means: dict[tuple[int, int], float] = {}
    for start in range(0, len(jobs), batch_size):
        part = jobs[start:start + batch_size]
        imgs = torch.stack([images01[r] for r, _ in part])
        logits = torch.logit(torch.stack([maps[r][i] for r, i in part]).float().clamp(1e-4, 1 - 1e-4))
        texts = torch.zeros(len(part), width, dim, dtype=text_feats[0].dtype, device=text_feats[0].device)
        for b, (r, _) in enumerate(part):
            texts[b, :maps[r].shape[0]] = text_feats[r]
        s = score_masked(imgs, logits, texts)
        for b, (r, i) in enumerate(part):
            means[(r, i)] = float(s[b, :maps[r].shape[0]].mean())
    out = []
    for r, m in enumerate(maps):
        if m.shape[0] == 1:
            out.append(0)
        else:
            scores = torch.tensor([means[(r, i)] for i in range(m.shape[0])])
            out.append(int(scores.argmax()))
    return out
