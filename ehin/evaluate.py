"""Evaluation of response maps over a REFER split, and the baselines every evaluation can print.

`python -m ehin.evaluate --checkpoint RUN/checkpoints/last.pt [--split val] [--baselines]`
`python -m ehin.evaluate --profile smoke --baselines-only`

Baselines (METHOD §5): `untrained` (the model before training: pretrained backbone, fresh heads),
`centre` (a Gaussian at the image centre) and `language_blind` (the argmax on a random annotated
object of the image: how much PointM comes from finding objects at all).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ehin import metrics as M
from ehin.cli import command, command_parser

MapFn = Callable[[dict], list[np.ndarray]]   # a collated eval batch -> maps at original size


def iter_batches(dataset, batch_size: int) -> Iterator[dict]:
    from ehin.data.datasets import eval_collate

    yield from DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=eval_collate)


def model_map_fn(model, device: torch.device | str, amp: bool = False, stage: int = 1) -> MapFn:
    """The model's maps at each image's original size, as TRIS's evaluation brings them there
    (METHOD §3.6): stage 1 `metrics.stage1_map` of the raw R_ii, stage 2 `metrics.stage2_map` of the
    finest head's logits."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")

    @torch.no_grad()
    def fn(batch: dict) -> list[np.ndarray]:
        model.eval()
        images = batch["image"]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and str(device).startswith("cuda")):
            maps = model.predict(images.to(device), batch["tokens"].to(device)).float()
        return M.maps_to_original(maps, images.shape[-2:], batch["orig_size"], stage=stage)

    return fn


def centre_prior_fn(batch: dict) -> list[np.ndarray]:
    out = []
    for h, w in batch["orig_size"]:
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        sigma = 0.25 * min(h, w)
        out.append(np.exp(-(((y - (h - 1) / 2) ** 2 + (x - (w - 1) / 2) ** 2) / (2 * sigma**2))))
    return out


def language_blind_fn(seed: int = 0) -> MapFn:
    """The map is one annotated object of the image, picked at random (reproducibly per expression)."""

    def fn(batch: dict) -> list[np.ndarray]:
        out = []
        for objs, ref_id, sent_id in zip(batch["object_masks"], batch["ref_id"], batch["sent_id"]):
            objs = np.asarray(objs)
            rng = np.random.default_rng([seed, int(ref_id), int(sent_id)])
            out.append(objs[rng.integers(len(objs))].astype(np.float32))
        return out

    return fn


def evaluate(map_fn: MapFn, dataset, *, batch_size: int = 32, stage: int = 1,
             per_expression: str | Path | None = None, desc: str = "eval", progress: bool = True) -> dict:
    """Score every (ref, sentence) of `dataset` and aggregate in percent (METHOD §5)."""
    rows = []
    for batch in tqdm(iter_batches(dataset, batch_size), desc=desc, leave=False, disable=not progress,
                      total=(len(dataset) + batch_size - 1) // batch_size):
        maps = map_fn(batch)
        for i, pred in enumerate(maps):
            r = M.score_expression(pred, np.asarray(batch["mask"][i]), np.asarray(batch["box"][i]),
                                   np.asarray(batch["objects_mask"][i]), stage=stage)
            r.update(ref_id=int(batch["ref_id"][i]), sent_id=int(batch["sent_id"][i]),
                     sentence=batch["sentence"][i])
            rows.append(r)
    if per_expression:
        write_per_expression(per_expression, rows)
    return M.aggregate(rows)


PER_EXPRESSION_FIELDS = {"ref_id": np.int64, "sent_id": np.int64, "point_mask": np.uint8, "point_box": np.uint8,
                         "box_acc": np.uint8, "point_any_object": np.uint8, "iou": np.float32,
                         "inter": np.int64, "union": np.int64}
# What an .npz leaves out or stores differently, to keep the committed stores small (they travel with every
# lent-GPU call, which carries 64 MiB in all): the ids as steps from the one before (they mostly ascend, so the
# steps compress to almost nothing), and no iou, which is inter / union (metrics.score_expression) and is
# recomputed on reading to the same float32; a file whose iou is not that keeps it.
ID_STEPS = {"ref_id": "ref_id_step", "sent_id": "sent_id_step"}


def write_per_expression(path: str | Path, rows: list[dict]) -> None:
    """Each expression's scores: JSON lines (with the sentence), or, for a path ending .npz, compact
    arrays in evaluation order (`PER_EXPRESSION_FIELDS`, the ids as steps and without iou: the comment
    above `ID_STEPS`; what training cells keep for paired claims)."""
    if str(path).endswith(".npz"):
        arrays = {k: np.asarray([r[k] for r in rows], dtype=t) for k, t in PER_EXPRESSION_FIELDS.items()}
        stored = {k: v for k, v in arrays.items() if k not in ID_STEPS and k != "iou"}
        stored.update({step: np.diff(arrays[k], prepend=0) for k, step in ID_STEPS.items()})
        if not np.array_equal(_iou(arrays["inter"], arrays["union"]), arrays["iou"]):
            stored["iou"] = arrays["iou"]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **stored)
    else:
        _write_jsonl(path, rows)


def read_per_expression(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a per-expression file written by `write_per_expression` (either format, and the
    .npz files written before `ID_STEPS`, which hold every field as it is)."""
    if str(path).endswith(".npz"):
        with np.load(path) as z:
            out = {k: z[k] for k in z.files}
        for k, step in ID_STEPS.items():
            if step in out:
                out[k] = np.cumsum(out.pop(step)).astype(PER_EXPRESSION_FIELDS[k])
        if "iou" not in out:
            out["iou"] = _iou(out["inter"], out["union"])
        return {k: out[k] for k in PER_EXPRESSION_FIELDS}
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {k: np.asarray([r[k] for r in rows], dtype=t) for k, t in PER_EXPRESSION_FIELDS.items()}


def _iou(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Each expression's IoU as metrics.score_expression computes it (0 where the union is empty; deviation
    4), as float32: int64 pixel counts divide exactly as Python's ints do."""
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0).astype(np.float32)


def baselines(cfg: dict, dataset, untrained_model=None, device: str = "cpu") -> dict[str, dict]:
    out = {
        "centre": evaluate(centre_prior_fn, dataset, batch_size=cfg["eval"]["batch_size"], desc="centre prior"),
        "language_blind": evaluate(language_blind_fn(cfg["train"]["seed"]), dataset,
                                   batch_size=cfg["eval"]["batch_size"], desc="language-blind"),
    }
    if untrained_model is not None:
        out["untrained"] = evaluate(model_map_fn(untrained_model, device), dataset,
                                    batch_size=cfg["eval"]["batch_size"], desc="untrained")
    return out


def _write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, default=lambda x: x.item() if hasattr(x, "item") else str(x)) + "\n")


def format_metrics(name: str, m: dict) -> str:
    return f"{name:<16}" + M.format_metrics(m) + f"  (n={m.get('n', '?')})"


@command
def main(argv: list[str] | None = None) -> None:
    from ehin.config import add_config_args, config_from_args
    from ehin.data import prepare_dataset
    from ehin.data.datasets import EvalDataset

    p = command_parser("python -m ehin.evaluate", __doc__)
    p.add_argument("--checkpoint", help="a stage-1 checkpoint (RUN/checkpoints/last.pt); default: none, "
                   "then --baselines-only")
    add_config_args(p, "eval.max_items=200", scope=" (with --baselines-only; a checkpoint brings its own config)")
    p.add_argument("--split", help="REFER split to evaluate (default: the config's eval.split)")
    p.add_argument("--baselines", action="store_true", help="also print centre, language-blind, untrained")
    p.add_argument("--baselines-only", action="store_true", help="no checkpoint: baselines of a config")
    p.add_argument("--per-expression", help="write per-expression results to this JSON-lines file (default: none)")
    p.add_argument("--max-items", type=int, help="evaluate at most this many expressions (default: the config's "
                   "eval.max_items)")
    args = p.parse_args(argv)

    from ehin.checkpoint import load_stage1

    if args.checkpoint:
        model, cfg = load_stage1(args.checkpoint)
    elif args.baselines_only:
        cfg = config_from_args(args)
        model = None
    else:
        p.error("give --checkpoint, or --baselines-only (with --profile/--config; default profile synthetic)")
    split = args.split or cfg["eval"]["split"]
    refer = prepare_dataset(cfg)
    tokenize = _tokenizer(cfg, model)
    ds = EvalDataset(refer, split, tokenize, cfg["data"]["image_size"],
                     max_items=args.max_items or cfg["eval"]["max_items"])
    results = {}
    if model is not None:
        from ehin.distributed import resolve_device

        # the training's device rule (train.device; auto: CUDA where there is one): on a GPU machine
        # evaluating on the CPU took minutes for what the GPU does in seconds
        device = resolve_device(cfg)
        results["model"] = evaluate(model_map_fn(model.to(device), device), ds, batch_size=cfg["eval"]["batch_size"],
                                    per_expression=args.per_expression)
    if args.baselines or args.baselines_only:
        from ehin.model import build_model

        torch.manual_seed(cfg["train"]["seed"])
        results.update(baselines(cfg, ds, untrained_model=build_model(cfg)))
    print(f"{cfg['data']['dataset']} {split}: {len(ds)} expressions")
    for name, m in results.items():
        print(format_metrics(name, m))


def _tokenizer(cfg: dict, model=None):
    if model is not None:
        return model.backbone.tokenize
    from ehin.backbones import tokenize

    return tokenize  # the CLIP BPE tokenizer, context 20 (D1), the same for every arch


if __name__ == "__main__":
    main()
