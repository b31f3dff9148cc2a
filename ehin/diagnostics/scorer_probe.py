"""What the frozen scorer of L_CL / L_BG rewards: S (Eq. 16) of an image under ground-truth masks,
and, with --run, under a trained model's own maps.

    python -m ehin.diagnostics.scorer_probe                      # synthetic profile, 400 val expressions
    python -m ehin.diagnostics.scorer_probe --profile smoke --set scorer.arch=clip-tiny-rn
    python -m ehin.diagnostics.scorer_probe --run results/synthetic/runs/table5/bg+fg+cl/seed0-...

L_CL (Eq. 15) pulls the mask of the referred object towards the masks the scorer likes best for the
positive sentence and worst for the same-image negatives. This probe puts the ground-truth masks
through the scorer instead of learned maps: for each val expression whose image holds other
referred objects (the negatives are the sentences of those other refs, as in training, METHOD D2),
it scores the image with

    full         everything kept              ref_only     the referred object alone
    ref+bg       the other objects hidden     bg_only      every object hidden
    hide_ref     the referred object hidden   objects      the objects, no background

and prints mean S_pos, mean S_neg, L_CL of that mask, and how often the positive sentence beats
every negative. If `ref_only` and `ref+bg` tie, the loss cannot tell a map on the referred object
from one that also covers the background. With --run DIR (a stage-1 run or its checkpoint) the
run's own config and scorer are used, and two more rows score the model's maps for the same
expressions: `early` (V.L before HIPM, what early L_CL masks with) and `fused` (R_ii), with the share
of the image they keep (mean sigmoid) and how often their peak is on the referred object. A trained
map that scores far worse than `ref_only` under the scorer it was trained against is one that L_CL's
gradient did not lead to the referent (docs/method.md §10). A second table splits each map by region
(the referred object, the other objects, the plain background; cells weighted by how much of each
they cover): the map's mean value there, and the mean pull -dL_CL/dR (positive: gradient descent
raises the map there). It shows where L_CL pushes a trained map and whether the sigmoid has
saturated (`saturated`: cells with |R| > 4.6, where sigmoid' < 0.01).
"""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from ehin.cli import command, command_parser
from ehin.model.scorer_criteria import same_image_negatives, variant_masks

VARIANTS = ("full", "ref_only", "ref+bg", "bg_only", "hide_ref", "objects")
MODEL_ROWS = ("early", "fused")
REGIONS = ("ref", "other", "bg")


def region_weights(ref: torch.Tensor, objects: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """How much of each map cell ([h, w] = grid) the referred object, the other objects and the plain
    background cover, from [S, S] masks at image size (area pooling; the three sum to 1 per cell)."""
    m = variant_masks(ref, objects)
    stack = torch.stack([m["ref_only"], m["objects"] - m["ref_only"], m["bg_only"]])[None]
    pooled = F.adaptive_avg_pool2d(stack, tuple(grid))[0]
    return dict(zip(REGIONS, pooled))


def region_means(values: torch.Tensor, weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Area-weighted mean of a [h, w] map over each region (NaN for a region that is absent)."""
    return {k: float((values * w).sum() / w.sum()) if w.sum() > 0 else float("nan") for k, w in weights.items()}


def cl_pull(scorer, image: torch.Tensor, m: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For one map [h, w] under the frozen scorer (Eq. 15-16, as in training): S for each text [M]
    and the pull -dL_CL/dR [h, w], from one pass."""
    from ehin.model.eclm import cl_loss

    with torch.enable_grad():
        m = m.detach().clone().requires_grad_(True)
        s = scorer.score_masked(image[None], m[None], texts[None])
        cl_loss(s).backward()
    return s[0].detach(), -m.grad


def split_negatives(refer, split: str, items: list[tuple[dict, dict]]) -> list[list[str]]:
    """The same-image negatives of `items` ((ref, sentence) pairs of `split`) drawn from the whole split,
    as TESTBED §2.2(b) and scorer_criteria count them: an expression of a --max-items subset keeps every
    negative of its image, not only those the subset happened to draw."""
    def key(ref: dict, sent: dict) -> tuple[int, int, str]:
        return ref["image_id"], ref["ref_id"], refer.sentence(sent)

    whole = [key(ref, sent) for ref in refer.refs(split) for sent in ref["sentences"]]
    return same_image_negatives(whole + [key(ref, sent) for ref, sent in items])[len(whole):]


@torch.no_grad()
def probe(cfg: dict, max_items: int = 400, progress: bool = True, model=None) -> dict[str, dict[str, float]]:
    """Per mask variant: s_pos, s_neg, l_cl (Eq. 15 with S clamped as in training), pos_wins (%), n.
    With a stage-1 `model` (EHIN), also rows `early` and `fused` for its maps, with `kept` (mean
    sigmoid of the map, %), `peak_on_ref` (its argmax on the referred object, %), `saturated` (cells
    with |R| > 4.6, %) and per region of `REGIONS` the mean map value `R_<region>` and the mean pull
    `pull_<region>` = -dL_CL/dR (see `region_weights`)."""
    from tqdm import tqdm

    from ehin.backbones import tokenize
    from ehin.data.datasets import EvalDataset, resize_mask
    from ehin.model.eclm import cl_loss
    from ehin.model.scorer import build_frozen_scorer
    from ehin.train_stage1 import prepare

    refer = prepare(cfg)
    scorer = build_frozen_scorer(cfg)
    size = cfg["data"]["image_size"]
    ds = EvalDataset(refer, cfg["eval"]["split"], model.backbone.tokenize if model is not None else tokenize,
                     size, max_items=max_items)
    negatives = split_negatives(refer, cfg["eval"]["split"], ds.items)
    rows: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    regions: dict[str, list[list[float]]] = defaultdict(list)
    device = next(model.parameters()).device if model is not None else None
    for i in tqdm(range(len(ds)), desc="scorer probe", disable=not progress, leave=False):
        item, negs = ds[i], negatives[i]
        if not negs:
            continue
        texts = scorer.encode_texts(None, [item["sentence"]] + negs)
        ref = torch.from_numpy(resize_mask(item["mask"].numpy(), size))
        masks = variant_masks(ref, torch.from_numpy(resize_mask(item["objects_mask"].numpy(), size)))
        emb = scorer.embed_images(torch.stack([item["image"] * m for m in masks.values()]))
        s = emb @ texts.T  # [variants, 1 + negatives]
        for name, row in zip(masks, s):
            rows[name].append((row[0].item(), row[1:].mean().item(), cl_loss(row[None]).item(),
                               float(row[0] > row[1:].max())))
        if model is not None:
            out = model(item["image"][None].to(device), item["tokens"][None].to(device))
            w = region_weights(ref, masks["objects"], out["maps"].shape[-2:])  # one grid for both maps
            for name, m in (("early", out["raw_maps"][0, 0]), ("fused", out["maps"][0, 0])):
                m = m.float().cpu()
                row, pull = cl_pull(scorer, item["image"], m, texts)
                up = F.interpolate(m[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
                rows[name].append((row[0].item(), row[1:].mean().item(), cl_loss(row[None]).item(),
                                   float(row[0] > row[1:].max()), 100 * torch.sigmoid(up).mean().item(),
                                   100 * float(ref.flatten()[up.argmax()] > 0)))
                regions[name].append([100 * (m.abs() > 4.6).float().mean().item()]
                                     + list(region_means(m, w).values()) + list(region_means(pull, w).values()))
    out_rows = {}
    for name in VARIANTS + (MODEL_ROWS if model is not None else ()):
        width = 6 if name in MODEL_ROWS else 4
        a = np.array(rows[name]).mean(0) if rows[name] else np.full(width, np.nan)
        out_rows[name] = {"s_pos": float(a[0]), "s_neg": float(a[1]), "l_cl": float(a[2]),
                          "pos_wins": float(100 * a[3]), "n": len(rows[name])}
        if name in MODEL_ROWS:
            r = np.nanmean(np.array(regions[name]), 0) if regions[name] else np.full(1 + 2 * len(REGIONS), np.nan)
            out_rows[name] |= {"kept": float(a[4]), "peak_on_ref": float(a[5]), "saturated": float(r[0])}
            out_rows[name] |= {f"R_{k}": float(v) for k, v in zip(REGIONS, r[1:1 + len(REGIONS)])}
            out_rows[name] |= {f"pull_{k}": float(v) for k, v in zip(REGIONS, r[1 + len(REGIONS):])}
    return out_rows


@command
def main(argv: list[str] | None = None) -> None:
    from ehin.config import add_config_args, config_from_args

    p = command_parser("python -m ehin.diagnostics.scorer_probe", __doc__)
    add_config_args(p, "scorer.arch=clip-tiny-rn")  # with --run, --set applies to the run's own config
    p.add_argument("--run", help="a stage-1 run folder or checkpoint: also score its maps, with its own config "
                   "and --set on top (--profile/--config are not read; default: none)")
    p.add_argument("--max-items", type=int, default=400, help="val expressions to probe (default: 400)")
    p.add_argument("--json", help="also write the figures here (default: not written)")
    args = p.parse_args(argv)
    model = None
    if args.run:
        from pathlib import Path

        from ehin.checkpoint import load_stage1
        from ehin.config import merge, parse_overrides, validate

        path = Path(args.run)
        model, cfg = load_stage1(path / "checkpoints" / "last.pt" if path.is_dir() else path)
        cfg = merge(cfg, parse_overrides(args.overrides))
        validate(cfg)
    else:
        cfg = config_from_args(args)
    res = probe(cfg, args.max_items, model=model)
    print(f"scorer {cfg['scorer']['arch']} ({cfg['scorer']['pretrained'] or cfg['backbone']['pretrained']}), "
          f"{cfg['data']['dataset']} {cfg['eval']['split']}, {res['full']['n']} expressions with same-image negatives")
    print(f"{'mask':<10} {'S_pos':>6} {'S_neg':>6} {'L_CL':>6} {'pos wins':>9} {'kept':>6} {'peak on ref':>12}")
    for name, r in res.items():
        extra = f" {r['kept']:5.1f}% {r['peak_on_ref']:11.1f}%" if "kept" in r else ""
        print(f"{name:<10} {r['s_pos']:6.3f} {r['s_neg']:6.3f} {r['l_cl']:6.3f} {r['pos_wins']:8.0f}%{extra}")
    if model is not None:
        print(f"\n{'map':<10} {'saturated':>9} " + " ".join(f"{'R ' + k:>8}" for k in REGIONS)
              + " " + " ".join(f"{'pull ' + k:>11}" for k in REGIONS))
        for name in MODEL_ROWS:
            r = res[name]
            print(f"{name:<10} {r['saturated']:8.1f}% " + " ".join(f"{r['R_' + k]:8.2f}" for k in REGIONS)
                  + " " + " ".join(f"{r['pull_' + k]:11.2e}" for k in REGIONS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
