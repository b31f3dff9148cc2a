"""Reader for the REFER layout shared by RefCOCO, RefCOCO+, RefCOCOg, ReferIt (refclef) and the
synth-* variants (METHOD §1):

    <root>/refer/<dataset>/instances.json     COCO dict: images, annotations, categories
    <root>/refer/<dataset>/refs(<split_by>).p  pickled list of refs (read with safe_pickle)
    <image_root>/<file_name>                   images (default <root>/images/<dataset>)

Everything is validated when the dataset is opened (files, keys, ids), except the image files,
which are checked when loaded. Every problem raises ReferFormatError naming the file.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from ehin.data import safe_pickle
from ehin.cli import UserError

# METHOD §1: the splits each dataset/splitBy ships with.
KNOWN_SPLITS: dict[tuple[str, str], tuple[str, ...]] = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "google"): ("train", "val"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("referit", "berkeley"): ("train", "val", "test"),
    ("refclef", "berkeley"): ("train", "val", "test"),
    ("synth-refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("synth-refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("synth-refcocog", "google"): ("train", "val"),
    ("synth-refcocog", "umd"): ("train", "val", "test"),
    ("synth-referit", "berkeley"): ("train", "val", "test"),
}
# REFER's own folder names: ReferIt ships as "refclef".
DATASET_DIRS: dict[str, tuple[str, ...]] = {"referit": ("referit", "refclef"), "refclef": ("refclef", "referit")}
# Where REFER's download scripts put the images, tried after <root>/images/<dataset>.
REFER_IMAGE_DIRS: dict[str, str] = {
    "refcoco": "images/mscoco/images/train2014",
    "refcoco+": "images/mscoco/images/train2014",
    "refcocog": "images/mscoco/images/train2014",
    "referit": "images/saiapr_tc-12",
    "refclef": "images/saiapr_tc-12",
}
REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


class ReferFormatError(UserError):
    """A REFER-layout file is missing or malformed; the message names the file."""


def _decode_rles(rles: list[dict], h: int, w: int) -> np.ndarray:
    """[H, W, n] from RLE dicts: compressed (counts str/bytes) or uncompressed (counts a list)."""
    out = []
    for r in rles:
        counts = r["counts"]
        if isinstance(counts, list):
            out.append(mask_utils.frPyObjects(r, h, w))
        else:
            out.append({"size": r["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts})
    return mask_utils.decode(out)  # a list: [H, W, n] (a bare dict goes a deprecated path)


def _polygons_ok(seg: Any) -> bool:
    return isinstance(seg, list) and all(isinstance(p, list) and all(isinstance(v, (int, float)) for v in p) for p in seg)


class ReferDataset:
    """One REFER dataset under one splitBy: refs per split, images, annotation masks and boxes."""

    def __init__(self, root: str | Path, dataset: str, split_by: str, image_root: str | Path | None = None) -> None:
        self.root = Path(root)
        self.dataset = dataset
        self.split_by = split_by
        self.ann_dir = self._find_ann_dir()
        self.instances_file = self.ann_dir / "instances.json"
        self.refs_file = self.ann_dir / f"refs({split_by}).p"
        self.image_root = Path(image_root) if image_root is not None else self._default_image_root()
        self._load_instances()
        self._load_refs()

    # -- loading --------------------------------------------------------------------------------

    def _find_ann_dir(self) -> Path:
        names = DATASET_DIRS.get(self.dataset, (self.dataset,))
        for name in names:
            d = self.root / "refer" / name
            if d.is_dir():
                return d
        tried = ", ".join(str(self.root / "refer" / n) for n in names)
        raise ReferFormatError(f"{tried}: no such dataset folder (expected <root>/refer/<dataset>/instances.json)")

    def _default_image_root(self) -> Path:
        candidates = [self.root / "images" / self.ann_dir.name, self.root / "images" / self.dataset]
        if self.dataset in REFER_IMAGE_DIRS:
            candidates.append(self.root / REFER_IMAGE_DIRS[self.dataset])
        for c in candidates:
            if c.is_dir():
                return c
        return candidates[0]  # a missing image then fails when loaded, naming this path

    def _load_instances(self) -> None:
        path = self.instances_file
        if not path.is_file():
            raise ReferFormatError(f"{path}: missing instances.json")
        try:
            with open(path) as f:
                coco = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReferFormatError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "annotations")):
            raise ReferFormatError(f"{path}: expected a COCO dict with lists 'images' and 'annotations'")
        self.images: dict[int, dict] = {}
        for i, img in enumerate(coco["images"]):
            if not isinstance(img, dict) or any(k not in img for k in ("id", "file_name", "height", "width")):
                raise ReferFormatError(f"{path}: images[{i}] lacks one of id, file_name, height, width")
            self.images[img["id"]] = img
        self.anns: dict[int, dict] = {}
        self._image_anns: dict[int, list[int]] = defaultdict(list)
        for i, ann in enumerate(coco["annotations"]):
            if not isinstance(ann, dict) or any(k not in ann for k in ("id", "image_id", "segmentation", "bbox")):
                raise ReferFormatError(f"{path}: annotations[{i}] lacks one of id, image_id, segmentation, bbox")
            if ann["image_id"] not in self.images:
                raise ReferFormatError(f"{path}: annotation {ann['id']} points at missing image {ann['image_id']}")
            self.anns[ann["id"]] = ann
            self._image_anns[ann["image_id"]].append(ann["id"])
        self.categories: dict[int, dict] = {c["id"]: c for c in coco.get("categories", []) if isinstance(c, dict) and "id" in c}

    def _load_refs(self) -> None:
        path = self.refs_file
        if not path.is_file():
            found = sorted(p.name for p in self.ann_dir.glob("refs(*).p"))
            raise ReferFormatError(f"{path}: missing refs file for split_by '{self.split_by}' (found: {found or 'none'})")
        try:
            refs = safe_pickle.load(path)
        except safe_pickle.UnsafePickleError as e:
            raise ReferFormatError(str(e)) from None
        except Exception as e:  # truncated or not a pickle at all
            raise ReferFormatError(f"{path}: cannot unpickle refs ({type(e).__name__}: {e})") from None
        if not isinstance(refs, list):
            raise ReferFormatError(f"{path}: expected a list of refs, got {type(refs).__name__}")
        self._refs: dict[str, list[dict]] = defaultdict(list)
        for i, ref in enumerate(refs):
            where = f"{path}: ref #{i}"
            if not isinstance(ref, dict):
                raise ReferFormatError(f"{where} is a {type(ref).__name__}, not a dict")
            missing = [k for k in REF_KEYS if k not in ref]
            if missing:
                raise ReferFormatError(f"{where} (ref_id {ref.get('ref_id')}) lacks keys {missing}")
            where = f"{path}: ref_id {ref['ref_id']}"
            if ref["ann_id"] not in self.anns:
                raise ReferFormatError(f"{where} points at annotation {ref['ann_id']}, absent from {self.instances_file}")
            if ref["image_id"] not in self.images:
                raise ReferFormatError(f"{where} points at image {ref['image_id']}, absent from {self.instances_file}")
            if self.anns[ref["ann_id"]]["image_id"] != ref["image_id"]:
                raise ReferFormatError(f"{where}: annotation {ref['ann_id']} belongs to another image")
            sents = ref["sentences"]
            if not isinstance(sents, list) or not sents:
                raise ReferFormatError(f"{where} has no sentences")
            for s in sents:
                if not isinstance(s, dict) or not isinstance(s.get("sent", s.get("raw")), str):
                    raise ReferFormatError(f"{where}: a sentence lacks 'sent' (and 'raw')")
            self._refs[ref["split"]].append(ref)

    # -- queries --------------------------------------------------------------------------------

    def splits(self) -> set[str]:
        """The splits of this dataset/splitBy (METHOD §1), plus any other the refs file holds."""
        return set(KNOWN_SPLITS.get((self.dataset, self.split_by), ())) | set(self._refs)

    def refs(self, split: str) -> list[dict]:
        """The refs of a split, in file order. An unknown split raises, listing the valid ones."""
        valid = self.splits()
        if split not in valid:
            raise ReferFormatError(
                f"{self.refs_file}: unknown split '{split}' for {self.dataset} ({self.split_by}); "
                f"valid: {', '.join(sorted(valid))}"
            )
        return list(self._refs.get(split, []))

    @staticmethod
    def sentence(sent: dict) -> str:
        """The text of one sentence dict ('sent', the normalised one REFER provides; else 'raw')."""
        return sent["sent"] if isinstance(sent.get("sent"), str) else sent["raw"]

    def image_info(self, image_id: int) -> dict:
        return self.images[image_id]

    def image_path(self, image_id: int) -> Path:
        """Path of an image: image_root/file_name; for ReferIt also saiapr_tc-12's NN/images/ID.jpg."""
        name = self.images[image_id]["file_name"]
        path = self.image_root / name
        if not path.exists() and self.ann_dir.name in ("refclef", "referit"):
            stem = Path(name).stem
            if stem.isdigit():  # saiapr_tc-12 keeps 1000 images per folder: 25470.jpg -> 25/images/
                alt = self.image_root / f"{int(stem) // 1000:02d}" / "images" / Path(name).name
                if alt.exists():
                    return alt
        return path

    def load_image(self, image_id: int) -> np.ndarray:
        """uint8 [H, W, 3] RGB. A missing, unreadable or wrongly sized file raises ReferFormatError."""
        path = self.image_path(image_id)
        info = self.images[image_id]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except FileNotFoundError:
            raise ReferFormatError(f"{path}: missing image file for image {image_id} (image_root={self.image_root})") from None
        except Exception as e:  # PIL raises several types for truncated / non-image files
            raise ReferFormatError(f"{path}: cannot read image {image_id} ({type(e).__name__}: {e})") from None
        if arr.shape[:2] != (info["height"], info["width"]):
            raise ReferFormatError(
                f"{path}: image is {arr.shape[1]}x{arr.shape[0]} but {self.instances_file} says "
                f"{info['width']}x{info['height']}"
            )
        return arr

    def ann_mask(self, ann_id: int) -> np.ndarray:
        """bool [H, W]: the union of the annotation's polygons or RLEs (METHOD §1, pycocotools). Reads every
        form the REFER API decodes (a list of polygons, a list of RLE dicts) and a bare RLE dict."""
        ann = self.anns[ann_id]
        info = self.images[ann["image_id"]]
        h, w = int(info["height"]), int(info["width"])
        seg = ann["segmentation"]
        try:
            if isinstance(seg, dict):  # a bare RLE (REFER's getMask cannot read it; we can)
                m = _decode_rles([seg], h, w)
            elif isinstance(seg, list) and seg and all(isinstance(r, dict) for r in seg):
                m = _decode_rles(seg, h, w)  # a list of RLEs: what REFER's getMask decodes as RLE
            elif _polygons_ok(seg):
                # Polygons of < 3 points carry no area, and pycocotools would read a 4-number one as a box.
                polys = [p for p in seg if len(p) >= 6]
                if not polys:
                    return np.zeros((h, w), bool)
                m = mask_utils.decode([mask_utils.merge(mask_utils.frPyObjects(polys, h, w))])
            else:
                raise TypeError(f"segmentation of type {type(seg).__name__}")
        except Exception as e:
            raise ReferFormatError(f"{self.instances_file}: annotation {ann_id} has a malformed segmentation ({e})") from None
        if m.shape[:2] != (h, w):
            raise ReferFormatError(f"{self.instances_file}: annotation {ann_id} is {m.shape[1]}x{m.shape[0]}, its image {w}x{h}")
        return m.any(-1)

    def ann_box(self, ann_id: int) -> list[float]:
        """COCO [x, y, w, h]."""
        return [float(v) for v in self.anns[ann_id]["bbox"]]

    def image_ann_ids(self, image_id: int) -> list[int]:
        """Every annotation of an image (all its objects, referred or not), in file order."""
        return list(self._image_anns.get(image_id, []))

    def __repr__(self) -> str:
        counts = {s: len(self._refs.get(s, [])) for s in sorted(self.splits())}
        return f"ReferDataset({self.dataset!r}, {self.split_by!r}, refs={counts}, root={str(self.root)!r})"
