"""TESTBED.md §2.2: does the frozen scorer behave as CLIP does on masked photographs? Measured with
ground-truth masks and the frozen scorer only (no grounding model, no EHIN result), on one split.

    python -m ehin.data.fidelity --profile synthetic --set synthetic.scenes=cluttered --scorer \
        [--variants synth-refcoco+ ...] [--json out.json]

Every masked image is made as the losses make theirs: the image at the scorer's size times the mask
in [0, 1] space (`FrozenScorer.embed_masked`, what `score_masked` does with sigmoid(R)); a hidden
pixel is black.

a. isolated-region comprehension (`isolated_rec`, %): for each expression, each annotated object of
   its image (every annotation, stuff regions included) is kept alone, everything else black; the
   expression picks the object whose masked image it scores highest (first on a tie). Accuracy beside
   `random_object_rate` (mean over the same expressions of 1 / annotations in the image, a fraction as
   in ehin.data.fidelity). Criterion: isolated_rec >= 2 x 100 x random_object_rate.
b. background cost (`isolation_gain`, points): over the expressions whose image holds other refs,
   with the other annotated objects hidden in both images, how often the positive expression scores
   strictly above every same-image negative (the sentences of the image's other refs, as training's
   negatives, METHOD D2) for the referent alone (`pos_wins_alone`, %) and for the referent with the
   background kept (`pos_wins_bg`, %); isolation_gain = pos_wins_alone - pos_wins_bg >= 10.

Beside them their standard errors over expressions (`isolated_rec_se`, binomial; `isolation_gain_se`,
paired: the standard deviation of win_alone - win_bg over sqrt(n)); the criteria read the figures.

`ehin.diagnostics.scorer_probe` reads the same masks and negatives from here (`variant_masks`,
`same_image_negatives`) for its wider table.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch

# TESTBED.md §2.2
ISOLATED_REC_FACTOR = 2.0  # isolated_rec >= this x the random-object rate
ISOLATION_GAIN_POINTS = 10.0  # pos_wins_alone - pos_wins_bg >= this


def same_image_negatives(items: list[tuple[int, int, str]]) -> list[list[str]]:
    """For (image_id, ref_id, sentence) items: the sentences of the *other* refs of the same image,
    sorted, never the item's own sentence. Another sentence of the same ref describes the referent
    too, so it is no negative (METHOD D2)."""
    by_image: dict[int, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for image_id, ref_id, sentence in items:
        by_image[image_id][ref_id].add(sentence)
    return [sorted({t for r, sents in by_image[image_id].items() if r != ref_id for t in sents} - {sentence})
            for image_id, ref_id, sentence in items]


def variant_masks(ref: torch.Tensor, objects: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float masks [S, S] from the referred object's mask and the union of all objects' masks."""
    ref, objects = ref.float(), torch.maximum(objects.float(), ref.float())
    others = objects - ref
    return {"full": torch.ones_like(ref), "ref_only": ref, "ref+bg": 1 - others, "bg_only": 1 - objects,
            "hide_ref": 1 - ref, "objects": objects}


@torch.no_grad()
def score_image(scorer, image01: torch.Tensor, object_masks: torch.Tensor,
                queries: Sequence[tuple[int, str, Sequence[str]]]) -> list[dict[str, Any]]:
    """The §2.2 outcomes of one image's expressions.

    image01 [3, S, S] in [0, 1]; object_masks bool [M, S, S], every annotation of the image;
    queries: (index of the referent in object_masks, sentence, same-image negatives) per expression.
    Per query: `pick` (the object whose isolated image the sentence scores highest), `correct`,
    `n_objects`, and with negatives `win_alone` / `win_bg` (the sentence beats every negative under
    the referent alone / the referent with the background, the other objects hidden), else None."""
    m = object_masks.shape[0]
    masks = object_masks.float()
    alone = scorer.embed_masked(image01[None].expand(m, -1, -1, -1), masks)  # [M, E]
    union = object_masks.any(0)
    targets = sorted({t for t, _, negs in queries if negs})
    with_bg = {}
    if targets:
        bg_masks = torch.stack([variant_masks(object_masks[t], union)["ref+bg"] for t in targets])
        with_bg = dict(zip(targets, scorer.embed_masked(image01[None].expand(len(targets), -1, -1, -1), bg_masks)))
    out = []
    for target, sentence, negs in queries:
        texts = scorer.encode_texts(None, [sentence, *negs])  # [1 + K, E], normalised
        pick = int((alone @ texts[0]).argmax())
        rec = dict(pick=pick, correct=pick == target, n_objects=m, win_alone=None, win_bg=None)
        if negs:
            for key, emb in (("win_alone", alone[target]), ("win_bg", with_bg[target])):
                s = texts @ emb
                rec[key] = bool(s[0] > s[1:].max())
        out.append(rec)
    return out


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The §2.2 figures from `score_image` records (see the module doc)."""
    n = len(records)
    with_negs = [r for r in records if r["win_alone"] is not None]
    rate = float(np.mean([1.0 / r["n_objects"] for r in records])) if n else float("nan")
    rec = 100.0 * float(np.mean([r["correct"] for r in records])) if n else float("nan")
    alone = 100.0 * float(np.mean([r["win_alone"] for r in with_negs])) if with_negs else float("nan")
    bg = 100.0 * float(np.mean([r["win_bg"] for r in with_negs])) if with_negs else float("nan")
    # standard errors over expressions (the gain's is paired: the same expressions in both images)
    d = np.array([float(r["win_alone"]) - float(r["win_bg"]) for r in with_negs])
    gain_se = 100.0 * float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    rec_se = float(np.sqrt(rec * (100.0 - rec) / n)) if n else float("nan")
    return {"isolated_rec": rec, "isolated_rec_se": rec_se, "random_object_rate": rate,
            "isolated_rec_ratio": rec / (100.0 * rate), "n_isolated": n, "pos_wins_alone": alone,
            "pos_wins_bg": bg, "isolation_gain": alone - bg, "isolation_gain_se": gain_se,
            "n_with_negatives": len(with_negs)}


def passes(row: dict) -> dict[str, bool]:
    """Which §2.2 criteria a row with these figures meets."""
    return {"isolated_rec": row["isolated_rec"] >= ISOLATED_REC_FACTOR * 100.0 * row["random_object_rate"],
            "isolation_gain": row["isolation_gain"] >= ISOLATION_GAIN_POINTS}


@torch.no_grad()
def measure(scorer, refer, split: str = "val", image_size: int | None = None, progress: bool = False
            ) -> dict[str, Any]:
    """The §2.2 figures of a frozen scorer on one split of a REFER dataset (every ref and sentence)."""
    from tqdm import tqdm

    from ehin.data.datasets import resize_image, resize_mask
    from ehin.data.refer import ReferDataset

    size = int(image_size or scorer.image_size)
    refs = refer.refs(split)
    items = [(r["image_id"], r["ref_id"], ReferDataset.sentence(s)) for r in refs for s in r["sentences"]]
    negatives = same_image_negatives(items)
    by_image: dict[int, list[tuple[int, str, list[str]]]] = defaultdict(list)
    k = 0
    for r in refs:
        for _ in r["sentences"]:
            by_image[r["image_id"]].append((r["ann_id"], items[k][2], negatives[k]))
            k += 1
    records: list[dict[str, Any]] = []
    for image_id in tqdm(sorted(by_image), desc="scorer §2.2", disable=not progress, leave=False):
        ann_ids = list(refer.image_ann_ids(image_id))
        image = resize_image(refer.load_image(image_id), size)
        masks = torch.from_numpy(np.stack([resize_mask(refer.ann_mask(a), size) for a in ann_ids]))
        queries = [(ann_ids.index(ann), sentence, negs) for ann, sentence, negs in by_image[image_id]]
        records += score_image(scorer, image, masks, queries)
    return summarize(records)


def scorer_source(cfg: dict) -> str:
    """What the config's frozen scorer is: the cached checkpoint's file name for the project's small
    CLIP ("clip-tiny-rn-<hash>.pt", the hash naming its recipe), else the pretrained value."""
    from ehin.config import clip_spec
    from ehin.pretrain_clip import RECIPES, checkpoint_path, recipe_for, synthetic_overrides

    arch, pretrained, size = clip_spec(cfg, "scorer")
    overrides = synthetic_overrides(pretrained)
    if overrides is not None and arch in RECIPES:
        return checkpoint_path(recipe_for(arch, size, **overrides)).name
    return f"{arch}:{pretrained or 'random weights'}"
