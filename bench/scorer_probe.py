"""What the frozen scorer of L_CL / L_BG rewards: S (Eq. 16) of an image under ground-truth masks.

    python -m bench.scorer_probe                      # synthetic profile, 400 val expressions
    python -m bench.scorer_probe --profile smoke --set scorer.arch=clip-tiny-rn

L_CL (Eq. 15) pulls the mask of the referred object towards the masks the scorer likes best for the
positive sentence and worst for the same-image negatives. This probe puts the ground-truth masks
through the scorer instead of learned maps: for each val expression whose image holds other
referred objects (the negatives are their sentences, as in training), it scores the image with

    full         everything kept              ref_only     the referred object alone
    ref+bg       the other objects hidden     bg_only      every object hidden
    hide_ref     the referred object hidden   objects      the objects, no background

and prints mean S_pos, mean S_neg, L_CL of that mask, and how often the positive sentence beats
every negative. If `ref_only` and `ref+bg` tie, the loss cannot tell a map on the referred object
from one that also covers the background, so nothing in L_CL/L_BG moves a map's peak off the
background: only L_FG does (README, issue 3 findings).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
import torch

VARIANTS = ("full", "ref_only", "ref+bg", "bg_only", "hide_ref", "objects")


def variant_masks(ref: torch.Tensor, objects: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float masks [S, S] from the referred object's mask and the union of all objects' masks."""
    ref, objects = ref.float(), torch.maximum(objects.float(), ref.float())
    others = objects - ref
    return {"full": torch.ones_like(ref), "ref_only": ref, "ref+bg": 1 - others, "bg_only": 1 - objects,
            "hide_ref": 1 - ref, "objects": objects}


@torch.no_grad()
def probe(cfg: dict, max_items: int = 400, progress: bool = True) -> dict[str, dict[str, float]]:
    """Per mask variant: s_pos, s_neg, l_cl (Eq. 15 with S clamped as in training), pos_wins (%), n."""
    from tqdm import tqdm

    from ehin.backbones import tokenize
    from ehin.data.datasets import EvalDataset, resize_mask
    from ehin.losses import cl_loss
    from ehin.model.scorer import build_frozen_scorer
    from ehin.train_stage1 import prepare

    refer = prepare(cfg)
    scorer = build_frozen_scorer(cfg)
    size = cfg["data"]["image_size"]
    ds = EvalDataset(refer, cfg["eval"]["split"], tokenize, size, max_items=max_items)
    sentences = defaultdict(set)  # image -> the sentences referring to something in it
    for ref, sent in ds.items:
        sentences[ref["image_id"]].add(refer.sentence(sent))
    rows: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    for i in tqdm(range(len(ds)), desc="scorer probe", disable=not progress, leave=False):
        item = ds[i]
        negs = sorted(sentences[item["image_id"]] - {item["sentence"]})
        if not negs:
            continue
        texts = scorer.encode_texts(None, [item["sentence"]] + negs)
        masks = variant_masks(torch.from_numpy(resize_mask(item["mask"].numpy(), size)),
                              torch.from_numpy(resize_mask(item["objects_mask"].numpy(), size)))
        emb = scorer.embed_images(torch.stack([item["image"] * m for m in masks.values()]))
        s = emb @ texts.T  # [variants, 1 + negatives]
        for name, row in zip(masks, s):
            rows[name].append((row[0].item(), row[1:].mean().item(), cl_loss(row[None]).item(),
                               float(row[0] > row[1:].max())))
    out = {}
    for name in VARIANTS:
        a = np.array(rows[name]).mean(0) if rows[name] else np.full(4, np.nan)
        out[name] = {"s_pos": float(a[0]), "s_neg": float(a[1]), "l_cl": float(a[2]),
                     "pos_wins": float(100 * a[3]), "n": len(rows[name])}
    return out


def main(argv: list[str] | None = None) -> None:
    from ehin.config import load_config

    p = argparse.ArgumentParser(prog="python -m bench.scorer_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="synthetic")
    p.add_argument("--config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-items", type=int, default=400, help="val expressions to probe")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    cfg = load_config(args.config, profile=args.profile, overrides=args.overrides)
    res = probe(cfg, args.max_items)
    print(f"scorer {cfg['scorer']['arch']} ({cfg['scorer']['pretrained'] or cfg['backbone']['pretrained']}), "
          f"{cfg['data']['dataset']} {cfg['eval']['split']}, {res['full']['n']} expressions with same-image negatives")
    print(f"{'mask':<10} {'S_pos':>6} {'S_neg':>6} {'L_CL':>6} {'pos wins':>9}")
    for name, r in res.items():
        print(f"{name:<10} {r['s_pos']:6.3f} {r['s_neg']:6.3f} {r['l_cl']:6.3f} {r['pos_wins']:8.0f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
