"""Tiny REFER-format datasets shaped like the real ones, for tests of the real-data path.

`write_refer_fixture(root, dataset="refcoco", split_by="unc", n_images=4)` writes, like the files
REFER's download scripts produce:

- `root/refer/<dataset>/instances.json`: COCO images/annotations/categories. Per image three
  annotations: a two-part polygon (the mask is the union of both parts), a compressed RLE (counts a
  string) and an uncompressed RLE (counts a list, as some refclef annotations are);
- `root/refer/<dataset>/refs(<split_by>).p`: the refs list pickled at protocol 2 (one file per
  split_by given), images spread over the dataset's splits (METHOD §1);
- JPEG images in REFER's image layout: `images/mscoco/images/train2014/COCO_train2014_<id>.jpg` for
  refcoco/+/g, and for referit the refclef layout: dataset folder `refclef`, images
  `images/saiapr_tc-12/<NN>/images/<id>.jpg` with `file_name` just `<id>.jpg`.
  With `image_layout="flat"` images go to `images/<dataset>/` instead.

Returns a Fixture that knows the expected mask and box of every annotation (drawn independently of
pycocotools: axis-aligned rectangles) and the refs written.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

SPLITS = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "google"): ("train", "val"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("referit", "berkeley"): ("train", "val", "test"),
}
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220)}
HEIGHT, WIDTH = 40, 56  # not square, to catch H/W mix-ups


@dataclass
class Fixture:
    root: Path
    dataset: str
    ann_dir: Path
    image_root: Path
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # ann_id -> bool [H, W]
    boxes: dict[int, list[float]] = field(default_factory=dict)  # ann_id -> [x, y, w, h]
    refs: dict[str, list[dict]] = field(default_factory=dict)  # split_by -> refs written
    image_files: dict[int, Path] = field(default_factory=dict)


def _rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((HEIGHT, WIDTH), bool)
    m[y0:y1, x0:x1] = True
    return m


def write_refer_fixture(
    root: str | Path,
    dataset: str = "refcoco",
    split_by: str | tuple[str, ...] = "unc",
    n_images: int = 4,
    *,
    image_layout: str = "refer",
    sentences_per_ref: tuple[int, ...] = (1, 2, 3),
) -> Fixture:
    root = Path(root)
    split_bys = (split_by,) if isinstance(split_by, str) else tuple(split_by)
    folder = "refclef" if dataset == "referit" else dataset
    ann_dir = root / "refer" / folder
    ann_dir.mkdir(parents=True, exist_ok=True)
    if image_layout == "flat":
        image_root = root / "images" / folder
    elif dataset == "referit":
        image_root = root / "images" / "saiapr_tc-12"
    else:
        image_root = root / "images" / "mscoco" / "images" / "train2014"
    fx = Fixture(root, dataset, ann_dir, image_root)

    images, annotations = [], []
    for i in range(n_images):
        image_id = 25470 + i if dataset == "referit" else 581857 + i
        if dataset == "referit":
            file_name = f"{image_id}.jpg"
            path = image_root / file_name if image_layout == "flat" else image_root / f"{image_id // 1000:02d}" / "images" / file_name
        else:
            file_name = f"COCO_train2014_{image_id:012d}.jpg"
            path = image_root / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        img = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
        o = i % 3  # move the shapes a little per image
        # ann 0: two rectangles in one polygon annotation (union); 1: compressed RLE; 2: uncompressed RLE
        parts = [(2 + o, 3, 12 + o, 11), (2 + o, 20, 8 + o, 26)]
        m0 = _rect(*parts[0]) | _rect(*parts[1])
        seg0 = [[float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)] for x0, y0, x1, y1 in parts]
        m1 = _rect(20 + o, 5, 33 + o, 30)
        rle1 = mask_utils.encode(np.asfortranarray(m1.astype(np.uint8)))
        seg1 = {"size": [HEIGHT, WIDTH], "counts": rle1["counts"].decode("ascii")}
        m2 = _rect(40, 10 + o, 52, 35)
        flat = m2.astype(np.uint8).flatten(order="F")  # uncompressed RLE: run lengths, column-major
        runs, cur, n = [], 0, 0
        for v in flat:
            if v != cur:
                runs.append(n)
                cur, n = v, 0
            n += 1
        runs.append(n)
        seg2 = {"size": [HEIGHT, WIDTH], "counts": runs}
        for k, (m, seg, colour) in enumerate(zip((m0, m1, m2), (seg0, seg1, seg2), COLOURS.values())):
            img[m] = colour
            ann_id = image_id * 10 + k
            ys, xs = np.nonzero(m)
            box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": k + 1, "segmentation": seg,
                                "area": float(m.sum()), "bbox": box, "iscrowd": 0})
            fx.masks[ann_id], fx.boxes[ann_id] = m, box
        Image.fromarray(img).save(path, format="JPEG", quality=95)
        fx.image_files[image_id] = path
        images.append({"id": image_id, "file_name": file_name, "height": HEIGHT, "width": WIDTH})

    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": name, "supercategory": "thing"} for k, name in enumerate(COLOURS)]}
    with open(ann_dir / "instances.json", "w") as f:
        json.dump(coco, f)

    for sb in split_bys:
        splits = SPLITS[(dataset, sb)]
        refs, sent_id = [], 0
        for i, img in enumerate(images):
            split = splits[i % len(splits)]
            for k, colour in enumerate(COLOURS):
                ann_id = img["id"] * 10 + k
                n = sentences_per_ref[k % len(sentences_per_ref)]
                texts = [f"{colour} box", f"the {colour} one in picture {i}", f"{colour} thing number {k}"][:n]
                sentences = [{"tokens": t.split(), "raw": t.capitalize(), "sent_id": sent_id + j, "sent": t}
                             for j, t in enumerate(texts)]
                refs.append({"image_id": img["id"], "split": split, "sentences": sentences,
                             "file_name": img["file_name"].replace(".jpg", f"_{ann_id}.jpg"),
                             "category_id": k + 1, "ann_id": ann_id, "sent_ids": [s["sent_id"] for s in sentences],
                             "ref_id": len(refs)})
                sent_id += n
        with open(ann_dir / f"refs({sb}).p", "wb") as f:
            pickle.dump(refs, f, protocol=2)
        fx.refs[sb] = refs
    return fx
