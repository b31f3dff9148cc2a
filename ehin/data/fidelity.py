"""How much the scenes of a REFER dataset look like RefCOCO's where weak supervision depends on it
(TESTBED.md §2.1), measured from the written dataset through `ReferDataset` only.

    python -m ehin.data.fidelity --profile synthetic --set synthetic.scenes=cluttered \
        [--variants synth-refcoco synth-refcocog:umd ...] [--split val] [--json out.json] [--md out.md]
    python -m ehin.data.fidelity --root /data/refer --variants refcoco refcocog:umd   # a written REFER root

Per dataset and split_by, over the refs of one split (default val):

- same_category_share: refs whose image holds >= 2 annotations of the referent's category;
- median_objects: median annotations per image (every annotation, stuff regions included), and
  median_things (those whose category's supercategory is not "stuff");
- clutter_share: the share of the split's pixels that are unannotated clutter. Read from the side
  file clutter.json beside instances.json ({image_id: RLE}; the synthetic generator's cluttered recipe
  writes it); none for datasets without it (a textured background and clutter cannot be told apart
  from the image alone, so this is not estimated);
- occluded_share: refs whose referent touches or overlaps another annotated thing: its mask, grown by
  one pixel (8-neighbourhood), meets another annotation whose category is not stuff. An occluded
  object's annotation is its visible pixels, so it touches its occluder; an object occluded only by
  unannotated clutter is not counted (a lower bound);
- referent / distractor areas: median area (% of the image) of the referents (one per ref) and of
  the distractors (the annotations of the split's images that no ref names; stuff regions are on both
  sides, as the language-blind guess picks among every annotation), distractor_size_ratio = their
  quotient, and the referents' 10th and 90th area percentiles;
- mean_words: mean expression length in words;
- category_named_share: expressions that contain the referent's category name as a word (the head
  noun a weakly supervised grounder can first tie to pixels; "right one" or "bottom" has none);
- random_object_rate: mean over expressions of 1 / (annotations in the image);
- language_blind_pointm: PointM (%) of the language-blind guess (ehin.evaluate.language_blind_fn: the
  map is one annotated object of the image, picked per expression with the same rng), scored by
  ehin.metrics.score_expression like any model.

With --pointable, also the resolution ceiling (ehin.diagnostics.resolution): pointable_share, the
expressions whose referent holds a pixel where the config's stage-1 map (map_size) can peak, a cap on
any model's PointM at that map size.

With --ceilings, also what reading some of the words is worth (ehin.diagnostics.word_ceilings;
synthetic datasets): PointM of guessers that pick a random object among those the expression's
category (category_aware_pointm) or every appearance word (location_blind_pointm) allows, the
latter the ceiling of a model that has not learnt location words and relations.

With --scorer, also TESTBED.md §2.2 (the frozen scorer of the config, ground-truth masks only; see
ehin.model.scorer_criteria): isolated_rec (%) beside random_object_rate, pos_wins_alone / pos_wins_bg
(%) and isolation_gain (points), with the scorer's checkpoint in `scorer`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ehin.cli import command
from ehin.data.refer import ReferDataset

# TESTBED.md §1: the real datasets' figures (from their papers and releases; None = not given there).
REAL = {
    "refcoco": {"same_category": "nearly all (by construction)", "objects": "~7 (COCO)", "words": 3.5,
                "content": "appearance and location"},
    "refcoco+": {"same_category": "nearly all (by construction)", "objects": "~7 (COCO)", "words": 3.5,
                 "content": "appearance only (location words banned)"},
    "refcocog": {"same_category": "2-4 of a category per image (by selection)", "objects": "~7 (COCO)",
                 "words": 8.4, "content": "long, relations between objects"},
    "referit": {"same_category": "not selected for", "objects": "objects and stuff regions",
                "words": "short, often one word", "content": "category or stuff name"},
}
# TESTBED.md §2.1: the figure each must reach.
TARGETS = {"same_category_share": 0.60, "median_objects": 6, "clutter_share": 0.20, "occluded_share": 0.20,
           "distractor_size_ratio": (0.5, 2.0)}
DEFAULT_SPLIT_BYS = {"synth-refcoco": "unc", "synth-refcoco+": "unc", "synth-refcocog": "umd",
                     "synth-referit": "berkeley", "refcoco": "unc", "refcoco+": "unc", "refcocog": "umd",
                     "referit": "berkeley", "refclef": "berkeley"}
ALL_SYNTH = ("synth-refcoco", "synth-refcoco+", "synth-refcocog:google", "synth-refcocog:umd", "synth-referit")


def _decode_rle(rle: dict) -> np.ndarray:
    import pycocotools.mask as mask_utils

    counts = rle["counts"]
    return mask_utils.decode({"size": rle["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}).astype(bool)


def _grow(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel in the 8-neighbourhood."""
    p = np.pad(mask, 1)
    out = np.zeros_like(p)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out |= np.roll(np.roll(p, dy, 0), dx, 1)
    return out[1:-1, 1:-1]


def measure(ds: ReferDataset, split: str = "val", seed: int = 0) -> dict:
    """The figures of one dataset/split_by over one split (see the module doc)."""
    from ehin import metrics as M
    from ehin.data.datasets import xywh_to_xyxy

    refs = ds.refs(split)
    image_ids = sorted({r["image_id"] for r in refs})
    stuff_cats = {cid for cid, c in ds.categories.items() if c.get("supercategory") == "stuff"}
    clutter_file = ds.ann_dir / "clutter.json"
    clutter = json.loads(clutter_file.read_text()) if clutter_file.is_file() else None

    referred = {r["ann_id"] for s in ds.splits() for r in ds.refs(s)}
    masks: dict[int, np.ndarray] = {}
    n_objects, n_things, clutter_px, total_px = [], [], 0, 0
    distractor_area = []
    for image_id in image_ids:
        info = ds.image_info(image_id)
        px = int(info["height"]) * int(info["width"])
        ann_ids = ds.image_ann_ids(image_id)
        for a in ann_ids:
            masks[a] = ds.ann_mask(a)
        things = [a for a in ann_ids if ds.anns[a]["category_id"] not in stuff_cats]
        n_objects.append(len(ann_ids))
        n_things.append(len(things))
        distractor_area += [masks[a].sum() / px for a in ann_ids if a not in referred]
        total_px += px
        if clutter is not None:
            clutter_px += int(_decode_rle(clutter[str(image_id)]).sum())

    same_cat, touching, referent_area = [], [], []
    lengths, random_rate, blind_hits, named = [], [], [], []
    for r in refs:
        image_id, target = r["image_id"], r["ann_id"]
        info = ds.image_info(image_id)
        px = int(info["height"]) * int(info["width"])
        ann_ids = ds.image_ann_ids(image_id)
        cat = ds.anns[target]["category_id"]
        same_cat.append(sum(ds.anns[a]["category_id"] == cat for a in ann_ids) >= 2)
        grown = _grow(masks[target])
        touching.append(any((grown & masks[a]).any() for a in ann_ids
                            if a != target and ds.anns[a]["category_id"] not in stuff_cats))
        referent_area.append(masks[target].sum() / px)
        stack = np.stack([masks[a] for a in ann_ids])
        gt, objects = masks[target], stack.any(0)
        box = xywh_to_xyxy(ds.ann_box(target))
        cat_words = str(ds.categories[cat]["name"]).lower().split()
        for k, sent in enumerate(r["sentences"]):
            words = ReferDataset.sentence(sent).lower().split()
            lengths.append(len(words))
            named.append(all(w in words for w in cat_words))
            random_rate.append(1.0 / len(ann_ids))
            # ehin.evaluate.language_blind_fn's pick, scored as evaluation scores it
            rng = np.random.default_rng([seed, int(r["ref_id"]), int(sent.get("sent_id", k))])
            guess = stack[rng.integers(len(stack))].astype(np.float32)
            blind_hits.append(M.score_expression(guess, gt, box, objects)["point_mask"])

    med_ref = float(np.median(referent_area)) if referent_area else float("nan")
    med_dis = float(np.median(distractor_area)) if distractor_area else float("nan")
    return {
        "dataset": ds.dataset, "split_by": ds.split_by, "split": split,
        "images": len(image_ids), "refs": len(refs), "expressions": len(lengths),
        "same_category_share": float(np.mean(same_cat)),
        "median_objects": float(np.median(n_objects)),
        "median_things": float(np.median(n_things)),
        "clutter_share": None if clutter is None else clutter_px / total_px,
        "occluded_share": float(np.mean(touching)),
        "referent_area_median": med_ref,
        "referent_area_p10": float(np.percentile(referent_area, 10)),
        "referent_area_p90": float(np.percentile(referent_area, 90)),
        "distractor_area_median": med_dis,
        "distractors": len(distractor_area),
        "distractor_size_ratio": med_dis / med_ref,
        "mean_words": float(np.mean(lengths)),
        "category_named_share": float(np.mean(named)),
        "random_object_rate": float(np.mean(random_rate)),
        "language_blind_pointm": 100.0 * float(np.mean(blind_hits)),
    }


def passes(row: dict) -> dict[str, bool | None]:
    """Which TESTBED §2.1 thresholds a row meets (None: not measured), and the §2.2 criteria where the
    row holds the scorer's figures (--scorer)."""
    lo, hi = TARGETS["distractor_size_ratio"]
    out = {k: row[k] >= t if row[k] is not None else None for k, t in TARGETS.items() if k != "distractor_size_ratio"}
    out["distractor_size_ratio"] = lo <= row["distractor_size_ratio"] <= hi
    if "isolated_rec" in row:
        from ehin.model.scorer_criteria import passes as scorer_passes

        out |= scorer_passes(row)
    return out


def _real_key(dataset: str) -> str:
    name = dataset.removeprefix("synth-")
    return "referit" if name == "refclef" else name


def markdown(rows: Sequence[dict], header: str = "") -> str:
    """A table per measured dataset beside the real dataset's figures (TESTBED.md §1)."""
    pct = lambda v: "n/a" if v is None else f"{100 * v:.0f} %"  # noqa: E731
    lines = [header] if header else []
    lines += ["| dataset (split_by, split) | images | refs | expr | same category | median objects (things) | "
              "clutter | occluded/touching | referent area median [p10-p90] | distractor area median | ratio | "
              "words | category named | random-object rate | language-blind PointM | all thresholds |",
              "|---|" + "---|" * 15]
    for r in rows:
        ok = passes(r)
        flag = "yes" if all(v for v in ok.values() if v is not None) else \
            "no: " + ", ".join(k for k, v in ok.items() if v is False)
        lines.append(
            f"| {r['dataset']} ({r['split_by']}, {r['split']}) | {r['images']} | {r['refs']} | {r['expressions']} | "
            f"{pct(r['same_category_share'])} | {r['median_objects']:g} ({r['median_things']:g}) | "
            f"{pct(r['clutter_share'])} | {pct(r['occluded_share'])} | "
            f"{100 * r['referent_area_median']:.1f} % [{100 * r['referent_area_p10']:.1f}-{100 * r['referent_area_p90']:.1f}] | "
            f"{100 * r['distractor_area_median']:.1f} % | {r['distractor_size_ratio']:.2f} | {r['mean_words']:.2f} | "
            f"{pct(r.get('category_named_share'))} | {100 * r['random_object_rate']:.1f} % | {r['language_blind_pointm']:.1f} | {flag} |")
    scored = [r for r in rows if "isolated_rec" in r]
    if scored:
        lines += ["", f"Frozen scorer (TESTBED.md §2.2), `{scored[0]['scorer']}`, ground-truth masks:", "",
                  "(± one standard error over expressions; the gain's is paired.)", "",
                  "| dataset (split_by, split) | expr | isolated REC | random-object rate | ratio | "
                  "expr with negatives | pos wins: referent alone | referent + background | gain (points) | "
                  "REC >= 2x random | gain >= 10 |",
                  "|---|" + "---|" * 10]
        for r in scored:
            ok = passes(r)
            lines.append(
                f"| {r['dataset']} ({r['split_by']}, {r['split']}) | {r['n_isolated']} | "
                f"{r['isolated_rec']:.1f} ± {r['isolated_rec_se']:.1f} % | "
                f"{100 * r['random_object_rate']:.1f} % | {r['isolated_rec_ratio']:.2f} | {r['n_with_negatives']} | "
                f"{r['pos_wins_alone']:.1f} % | {r['pos_wins_bg']:.1f} % | "
                f"{r['isolation_gain']:+.1f} ± {r['isolation_gain_se']:.1f} | "
                f"{'yes' if ok['isolated_rec'] else 'no'} | {'yes' if ok['isolation_gain'] else 'no'} |")
    ceiling = [r for r in rows if "pointable_share" in r]
    if ceiling:
        h, w = ceiling[0]["map_size"]
        lines += ["", f"Resolution ceiling (ehin.diagnostics.resolution): the config's stage-1 map is {h} x {w} at "
                  f"{ceiling[0]['input_size']} px; the share of expressions whose referent holds a pixel where "
                  "such a map can peak caps every model's PointM:", "",
                  "| dataset (split_by, split) | expr | pointable | language-blind PointM |", "|---|---|---|---|"]
        for r in ceiling:
            lines.append(f"| {r['dataset']} ({r['split_by']}, {r['split']}) | {r['expressions']} | "
                         f"{100 * r['pointable_share']:.1f} % | {r['language_blind_pointm']:.1f} |")
    read = [r for r in rows if "location_blind_pointm" in r]
    if read:
        lines += ["", "What reading some of the words is worth (ehin.diagnostics.word_ceilings): PointM of a random "
                  "object among those the words read allow; the location-blind guess reads every appearance word "
                  "of the referent but no location word or relation (TESTBED §2.3 asks the control for "
                  "language-blind + 15):", "",
                  "| dataset (split_by, split) | expr | language-blind | category-aware | location-blind "
                  "| location-blind - language-blind |", "|---|---|---|---|---|---|"]
        for r in read:
            lines.append(f"| {r['dataset']} ({r['split_by']}, {r['split']}) | {r['expressions']} | "
                         f"{r['language_blind_expected']:.1f} | {r['category_aware_pointm']:.1f} | "
                         f"{r['location_blind_pointm']:.1f} | "
                         f"{r['location_blind_pointm'] - r['language_blind_expected']:+.1f} |")
    lines += ["", "Real datasets (TESTBED.md §1):", "",
              "| dataset | refs with >= 2 of the referent's category | annotated objects per image | mean words | what the words carry |",
              "|---|---|---|---|---|"]
    for name in dict.fromkeys(_real_key(r["dataset"]) for r in rows):
        if name in REAL:
            f = REAL[name]
            lines.append(f"| {name} | {f['same_category']} | {f['objects']} | {f['words']} | {f['content']} |")
    lines += ["", "Thresholds (TESTBED.md §2.1): same category >= 60 %, median objects >= 6, clutter >= 20 %, "
              "occluded/touching >= 20 %, distractor/referent median area within 2x (ratio 0.5-2)."]
    return "\n".join(lines) + "\n"


@command
def main(argv: Sequence[str] | None = None) -> None:
    from ehin.config import add_config_args, load_config, profile_for
    from ehin.data import prepare_dataset

    ap = argparse.ArgumentParser(prog="python -m ehin.data.fidelity", description=__doc__.split("\n\n")[0])
    add_config_args(ap, "synthetic.images=200", scope=" (synth-* datasets are generated into the cache)")
    ap.add_argument("--variants", nargs="+", default=list(ALL_SYNTH),
                    help="datasets as NAME or NAME:SPLIT_BY (default: every synth-* variant and split_by)")
    ap.add_argument("--root", help="a REFER root for real datasets (refer/<dataset>/...); default: none")
    ap.add_argument("--split", default="val", help="REFER split to measure (default: val)")
    ap.add_argument("--json", help="write the rows here (default: not written)")
    ap.add_argument("--md", help="write the markdown table here (default: not written)")
    ap.add_argument("--pointable", action="store_true",
                    help="also the resolution ceiling: the share of expressions the config's map size can point at")
    ap.add_argument("--ceilings", action="store_true",
                    help="also PointM of guessers that read only the category or only the appearance words (synthetic)")
    ap.add_argument("--scorer", action="store_true",
                    help="also measure the config's frozen scorer (TESTBED §2.2; pretrains the small CLIP on first use)")
    args = ap.parse_args(argv)
    if args.ceilings and (real := [v for v in args.variants if not v.startswith("synth-")]):
        # the guessers read the generator's grammar (colour and size words); a real dataset's have none
        ap.error(f"--ceilings reads the synthetic generator's words: {', '.join(real)} is not a synth-* dataset")
    rows = []
    scorer = None
    for spec in args.variants:
        name, _, split_by = spec.partition(":")
        split_by = split_by or DEFAULT_SPLIT_BYS.get(name, "unc")
        cfg = None
        if args.root:  # an already written REFER root (real, or synth-* generated elsewhere)
            ds = ReferDataset(args.root, name, split_by)
        elif name.startswith("synth-"):
            cfg = load_config(args.config, profile=profile_for(args), overrides=args.overrides
                              + [f"data.dataset={name}", f"data.split_by={split_by}"])
            ds = prepare_dataset(cfg, progress=False)
        else:
            ap.error(f"{name} is a real dataset: pass --root")
        row = measure(ds, args.split)
        if args.pointable:
            from ehin.diagnostics import resolution

            pcfg = cfg if cfg is not None else load_config(args.config, profile=profile_for(args),
                                                           overrides=args.overrides)
            side = int(pcfg["data"]["image_size"])
            hw = resolution.map_size(pcfg)
            row.update(map_size=list(hw), input_size=side,
                       pointable_share=resolution.pointable_share(ds, args.split, hw, side))
        if args.ceilings:
            from ehin.diagnostics import word_ceilings

            c = word_ceilings.ceilings(ds, args.split)
            row.update(language_blind_expected=c["language_blind"], category_aware_pointm=c["category_aware"],
                       location_blind_pointm=c["location_blind"])
        if args.scorer:
            from ehin import provenance
            from ehin.model import scorer_criteria
            from ehin.model.scorer import build_frozen_scorer

            scfg = cfg if cfg is not None else load_config(args.config, profile=profile_for(args),
                                                           overrides=args.overrides)
            if scorer is None:  # the scorer sections do not depend on the variant
                scorer = build_frozen_scorer(scfg)
            figures = scorer_criteria.measure(scorer, ds, args.split, scfg["data"]["image_size"])
            assert abs(figures["random_object_rate"] - row["random_object_rate"]) < 1e-9  # one definition
            row.update(figures, scorer=scorer_criteria.scorer_source(scfg),
                       scorer_sha256=(provenance.clip_digest(scfg, "scorer") or {}).get("sha256"))
        if cfg is not None:
            syn = cfg["synthetic"]
            from ehin.provenance import dataset_digest

            row.update(scenes=syn.get("scenes", "simple"), size=syn["size"], train_images=syn["images"], seed=syn["seed"],
                       dataset_sha256=dataset_digest(cfg)["sha256"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    header = ""
    if rows and "scenes" in rows[0]:
        r = rows[0]
        header = (f"Synthetic scenes: recipe `{r['scenes']}`, {r['size']} px, {r['train_images']} train images, "
                  f"seed {r['seed']}; split {args.split}.\n")
    md = markdown(rows, header)
    sys.stdout.write("\n" + md)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(md)


if __name__ == "__main__":
    main()
