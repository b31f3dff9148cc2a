"""Synthetic referring-segmentation scenes (METHOD §1, "Synthetic referring datasets").

Two users:
- the scene API (`sample_caption_pairs`, `sample_scene`, `render_scene`, ...) that the small CLIP's
  contrastive pretraining draws image-caption pairs from, with its own rng (METHOD §2: never the
  benchmark's seeds or splits);
- the generator, `python -m ehin.data.synthetic --variant V --out DIR`, that writes the four
  synth-* variants in the REFER layout so that one loader (`ehin.data.refer`) serves synthetic and
  real data.

Every object is a polygon (a ring is a polygon with a hole, stored as RLE) rasterised with
pycocotools, and the image is painted from exactly that raster, so the ground-truth masks the
loader decodes are the coloured pixels. All randomness comes from the numpy Generator passed in.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from ehin.cli import command

# ----------------------------------------------------------------------------------------------
# Vocabulary

# Two shape families play the role of RefCOCO's "people" (testA) vs "objects" (testB).
SHAPE_FAMILIES: dict[str, tuple[str, ...]] = {
    "A": ("circle", "ring", "star", "hexagon"),
    "B": ("square", "triangle", "cross", "diamond"),
}
SHAPES: tuple[str, ...] = SHAPE_FAMILIES["A"] + SHAPE_FAMILIES["B"]
FAMILY_OF: dict[str, str] = {s: fam for fam, shapes in SHAPE_FAMILIES.items() for s in shapes}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 30),
    "purple": (135, 50, 185),
    "orange": (250, 135, 20),
    "pink": (245, 120, 185),
    "white": (245, 245, 245),
}
SIZES: tuple[str, ...] = ("small", "big")
# Object circumradius as a fraction of the image side, per size class: far enough apart that
# "big" and "small" are unambiguous.
RADIUS: dict[str, tuple[float, float]] = {"small": (0.075, 0.10), "big": (0.14, 0.18)}

# Stuff regions (ReferIt-style "sky", "grass"): horizontal bands of the background.
STUFF_TOP = ("sky",)
STUFF_BOTTOM = ("grass", "ground", "water")
STUFF: tuple[str, ...] = STUFF_TOP + STUFF_BOTTOM
STUFF_COLOURS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    # (colour at the band's far edge, colour at its near edge): a gradient with texture on top
    "sky": ((110, 160, 225), (185, 210, 240)),
    "grass": ((95, 150, 70), (60, 115, 45)),
    "ground": ((150, 120, 90), (110, 85, 60)),
    "water": ((60, 110, 150), (35, 75, 120)),
}

LOCATION_WORDS: tuple[str, ...] = ("left", "right", "top", "bottom", "middle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
RELATION_PHRASES: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}


# ----------------------------------------------------------------------------------------------
# Geometry


def _regular(cx: float, cy: float, r: float, k: int, phase: float) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(k) / k
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def shape_polygons(shape: str, cx: float, cy: float, r: float) -> list[np.ndarray]:
    """Polygons [k, 2] (x, y) of a shape of circumradius r. A ring returns [outer, hole].

    Coordinates are rounded to 2 decimals: the annotation files store exactly these numbers, so the
    loader's raster is the painted one."""
    return [np.round(p.astype(np.float64), 2) for p in _shape_polygons(shape, cx, cy, r)]


def _shape_polygons(shape: str, cx: float, cy: float, r: float) -> list[np.ndarray]:
    if shape == "circle":
        return [_regular(cx, cy, r, 32, 0.0)]
    if shape == "ring":
        return [_regular(cx, cy, r, 32, 0.0), _regular(cx, cy, 0.55 * r, 24, 0.0)]
    if shape == "hexagon":
        return [_regular(cx, cy, r, 6, 0.0)]
    if shape == "diamond":
        return [_regular(cx, cy, r, 4, -np.pi / 2)]
    if shape == "square":
        h = 0.8 * r  # a little smaller than the circumradius so areas match the other shapes
        return [np.array([[cx - h, cy - h], [cx + h, cy - h], [cx + h, cy + h], [cx - h, cy + h]])]
    if shape == "triangle":
        # equilateral, pointing up, centred on its box rather than its centroid
        pts = _regular(cx, cy, 1.1 * r, 3, -np.pi / 2)
        pts[:, 1] += 0.5 * (1.1 * r) * 0.5
        return [pts]
    if shape == "star":
        outer = _regular(cx, cy, 1.05 * r, 5, -np.pi / 2)
        inner = _regular(cx, cy, 0.45 * r, 5, -np.pi / 2 + np.pi / 5)
        return [np.stack([outer, inner], 1).reshape(-1, 2)]
    if shape == "cross":
        a, w = r, 0.36 * r
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w),
               (-a, w), (-a, -w), (-w, -w)]
        return [np.array(pts) + np.array([cx, cy])]
    raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")


def rasterize(polygons: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """Union of polygons as a bool [H, W] mask, with pycocotools' rule (the loader's, METHOD §1)."""
    flat = [np.asarray(p, dtype=np.float64).reshape(-1).tolist() for p in polygons]
    rles = mask_utils.frPyObjects(flat, height, width)
    return mask_utils.decode([mask_utils.merge(rles)])[:, :, 0].astype(bool)


def polygons_mask(shape: str, polys: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """The painted mask of a shape from its polygons (a ring's second polygon is its hole)."""
    if shape == "ring":
        return rasterize(polys[:1], height, width) & ~rasterize(polys[1:], height, width)
    return rasterize(polys, height, width)


@dataclass
class SceneObject:
    """One object (a "thing") or a stuff band of a scene."""

    shape: str  # a SHAPES entry, or a STUFF name for stuff bands
    colour: str | None
    size: str | None
    cx: float
    cy: float
    r: float
    mask: np.ndarray  # bool [H, W]: exactly the pixels painted for it
    polygons: list[np.ndarray] = field(default_factory=list)  # empty when only an RLE describes it
    stuff: bool = False
    # Where location words and relations place it: None = (cx, cy), the drawn shape's centre. The
    # cluttered recipe sets the centroid of the visible pixels (an occluded object's seen centre).
    centre: tuple[float, float] | None = None

    @property
    def pos(self) -> tuple[float, float]:
        return (self.cx, self.cy) if self.centre is None else self.centre

    @property
    def box(self) -> tuple[float, float, float, float]:
        """COCO [x, y, w, h] of the mask (pixel-aligned, like the real datasets' boxes)."""
        ys, xs = np.nonzero(self.mask)
        if len(xs) == 0:
            return (0.0, 0.0, 0.0, 0.0)
        return (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))


@dataclass
class Scene:
    background: np.ndarray  # float32 [S, S, 3] in 0..255
    objects: list[SceneObject]  # things, in paint order
    stuff: list[SceneObject]  # background bands (ReferIt variant), masks minus the things


# ----------------------------------------------------------------------------------------------
# Backgrounds


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation mid-tone, so that the palette's objects stand out from any background."""
    grey = rng.uniform(70, 170)
    tint = rng.normal(0, 12, size=3)
    return np.clip(grey + tint, 40, 200)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise [S, S] in about [-1, 1]: a random grid upsampled bilinearly."""
    grid = rng.uniform(-1, 1, size=(cells + 1, cells + 1)).astype(np.float32)
    t = np.linspace(0, cells, size, dtype=np.float32)
    i0 = np.minimum(t.astype(int), cells - 1)
    f = t - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def texture(rng: np.random.Generator, size: int, kind: str | None = None) -> np.ndarray:
    """A textured background float32 [S, S, 3] in 0..255: noise, stripes, gradient or checker."""
    kind = kind or ["noise", "stripes", "gradient", "checker"][rng.integers(4)]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = _muted_colour(rng), _muted_colour(rng)
    if kind == "noise":
        n = _smooth_noise(rng, size, int(rng.integers(2, 7)))
        img = a[None, None] + 35.0 * n[..., None]
    elif kind == "stripes":
        theta = rng.choice([0.0, np.pi / 2, np.pi / 4, -np.pi / 4])
        period = rng.uniform(0.08, 0.2)
        phase = rng.uniform(0, 1)
        s = (np.sin(2 * np.pi * ((xx * np.cos(theta) + yy * np.sin(theta)) / period + phase)) > 0)
        img = np.where(s[..., None], a[None, None], b[None, None])
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(theta) + yy * np.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    elif kind == "checker":
        cells = int(rng.integers(3, 8))
        s = ((xx * cells).astype(int) + (yy * cells).astype(int)) % 2 == 0
        img = np.where(s[..., None], a[None, None], b[None, None])
    else:
        raise ValueError(f"unknown texture {kind!r}")
    img = img + rng.normal(0, 6, size=(size, size, 1)).astype(np.float32)  # fine grain
    return np.clip(img, 0, 255).astype(np.float32)


def stuff_background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[SceneObject]]:
    """ReferIt-style background: a sky band on top and a grass/ground/water band below it."""
    split = int(round(size * rng.uniform(0.3, 0.55)))
    bottom = STUFF_BOTTOM[rng.integers(len(STUFF_BOTTOM))]
    img = np.empty((size, size, 3), np.float32)
    regions = []
    for name, (y0, y1) in (("sky", (0, split)), (bottom, (split, size))):
        far, near = (np.array(c, np.float32) for c in STUFF_COLOURS[name])
        h = y1 - y0
        t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        band = far * (1 - t) + near * t
        band = band + 14.0 * _smooth_noise(rng, max(h, size), int(rng.integers(3, 8)))[:h, :, None]
        img[y0:y1] = band
        m = np.zeros((size, size), bool)
        m[y0:y1] = True
        regions.append(SceneObject(name, None, None, size / 2, (y0 + y1) / 2, 0.0, m, stuff=True))
    img = img + rng.normal(0, 5, size=(size, size, 1)).astype(np.float32)
    return np.clip(img, 0, 255), regions


# ----------------------------------------------------------------------------------------------
# Scenes


def make_object(shape: str, colour: str, size_name: str, cx: float, cy: float, r: float, size: int) -> SceneObject:
    polys = shape_polygons(shape, cx, cy, r)
    mask = polygons_mask(shape, polys, size, size)
    return SceneObject(shape, colour, size_name, cx, cy, r, mask, polygons=polys)


def place_objects(
    rng: np.random.Generator, size: int, attrs: Sequence[tuple[str, str, str]], tries: int = 60
) -> list[SceneObject]:
    """Place (shape, colour, size) objects at random without overlap (a gap of >= 2 px), so that
    every mask is the whole drawn shape. Objects that find no room are dropped."""
    placed: list[SceneObject] = []
    for shape, colour, size_name in attrs:
        lo, hi = RADIUS[size_name]
        for _ in range(tries):
            r = size * rng.uniform(lo, hi)
            m = r + 1.0
            cx, cy = rng.uniform(m, size - m), rng.uniform(m, size - m)
            if all(math.hypot(cx - o.cx, cy - o.cy) > r + o.r + 2.0 for o in placed):
                placed.append(make_object(shape, colour, size_name, cx, cy, r, size))
                break
    return placed


def random_attrs(rng: np.random.Generator, shapes: Sequence[str] = SHAPES) -> tuple[str, str, str]:
    colours = list(COLOURS)
    return (shapes[rng.integers(len(shapes))], colours[rng.integers(len(colours))], SIZES[rng.integers(2)])


def distractor_attrs(
    rng: np.random.Generator, anchor: tuple[str, str, str], shapes: Sequence[str] = SHAPES
) -> tuple[str, str, str]:
    """Attributes sharing colour or shape (or both) with `anchor`, so colour alone cannot refer."""
    shape, colour, size_name = random_attrs(rng, shapes)
    mode = rng.integers(3)
    if mode == 0:  # same colour, other shape
        colour = anchor[1]
    elif mode == 1 and anchor[0] in shapes:  # same shape, other colour
        shape = anchor[0]
    else:  # same shape and colour, other size
        shape, colour = (anchor[0], anchor[1]) if anchor[0] in shapes else (shape, anchor[1])
        size_name = "small" if anchor[2] == "big" else "big"
    return shape, colour, size_name


def sample_attrs(
    rng: np.random.Generator,
    n: int,
    *,
    shapes: Sequence[str] = SHAPES,
    share_prob: float = 0.6,
    dup_prob: float = 0.0,
) -> list[tuple[str, str, str]]:
    """n (shape, colour, size) triples. After the first, most share an attribute with an earlier
    one (METHOD §1: distractors that share attributes with the target); with dup_prob an exact twin,
    which only location or a relation can tell apart."""
    attrs = [random_attrs(rng, shapes)]
    for _ in range(n - 1):
        u = rng.random()
        anchor = attrs[rng.integers(len(attrs))]
        if u < dup_prob:
            attrs.append(anchor)
        elif u < dup_prob + share_prob:
            attrs.append(distractor_attrs(rng, anchor, shapes))
        else:
            attrs.append(random_attrs(rng, shapes))
    return attrs


def compose_scene(rng: np.random.Generator, size: int, attrs: Sequence[tuple[str, str, str]], *, stuff: bool = False) -> Scene:
    """Background (texture, or sky/ground bands with `stuff`) plus the objects placed on it."""
    if stuff:
        background, regions = stuff_background(rng, size)
    else:
        background, regions = texture(rng, size), []
    objects = place_objects(rng, size, attrs)
    things = np.zeros((size, size), bool)
    for o in objects:
        things |= o.mask
    for reg in regions:  # stuff is what shows of the band between the things
        reg.mask = reg.mask & ~things
    return Scene(background, objects, regions)


def sample_scene(
    rng: np.random.Generator,
    size: int,
    n_objects: int | None = None,
    *,
    stuff: bool = False,
    shapes: Sequence[str] = SHAPES,
) -> Scene:
    """A scene of n_objects (default 2-5) objects on a textured background (or stuff bands)."""
    n = int(n_objects if n_objects is not None else rng.integers(2, 6))
    attrs = sample_attrs(rng, n, shapes=shapes) if n > 0 else []
    return compose_scene(rng, size, attrs, stuff=stuff)


def render_scene(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    """Paint the objects on the background: uint8 [S, S, 3]. Each object gets a slightly jittered
    version of its palette colour, a soft vertical shading and fine noise (not a flat colour)."""
    img = scene.background.copy()
    size = img.shape[0]
    for o in scene.objects:
        base = np.array(COLOURS[o.colour], np.float32) + rng.normal(0, 8, size=3).astype(np.float32)
        ys, xs = np.nonzero(o.mask)
        shade = 1.0 + 0.12 * (o.cy - ys) / max(o.r, 1.0)  # lit from the top
        noise = rng.normal(0, 5, size=(len(ys), 1)).astype(np.float32)
        img[ys, xs] = base[None] * shade[:, None].astype(np.float32) + noise
    assert img.shape == (size, size, 3)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def describe(obj: SceneObject, colour: bool = True, size: bool = False, shape: bool = True) -> str:
    """Appearance phrase: "big red circle", "red one" (no shape word), "sky" for stuff."""
    if obj.stuff:
        return obj.shape
    words = ([obj.size] if size else []) + ([obj.colour] if colour else [])
    words.append(obj.shape if shape else "one")
    return " ".join(words)


# ----------------------------------------------------------------------------------------------
# Contrastive pretraining pairs (METHOD §2: single objects and masked scenes with descriptions)


def _random_caption(rng: np.random.Generator, obj: SceneObject) -> str:
    # (colour, size, shape) word subsets, weighted towards the forms referring expressions use
    forms = [(True, False, True), (True, True, True), (False, False, True), (False, True, True),
             (True, False, False), (True, True, False)]
    weights = np.array([0.35, 0.25, 0.12, 0.12, 0.10, 0.06])
    c, s, sh = forms[rng.choice(len(forms), p=weights / weights.sum())]
    return describe(obj, colour=c, size=s, shape=sh)


def _soft_keep(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A soft version of a kept region's mask (like the scorer's σ(R) masks): dilated and blurred."""
    import cv2

    m = mask.astype(np.float32)
    k = int(rng.integers(0, 3))
    if k:
        m = cv2.dilate(m, np.ones((2 * k + 1, 2 * k + 1), np.uint8))
    if rng.random() < 0.5:
        m = cv2.GaussianBlur(m, (5, 5), 1.0)
    return m


def _keep_only(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image masked to black outside `mask`, with a soft edge (`_soft_keep`)."""
    return (img.astype(np.float32) * _soft_keep(rng, mask)[..., None] + 0.5).astype(np.uint8)


def sample_caption_pairs(rng: np.random.Generator, size: int, n: int, object_on_black: float = 0.0,
                         scenes: str = "simple", scene_on_black: float = 0.6,
                         captions: str = "appearance") -> tuple[np.ndarray, list[str]]:
    """n image-caption pairs for contrastive pretraining of the small CLIP (METHOD §2).

    Mixes single objects on a textured background ("red circle", "big blue star"), scenes where one
    object is kept and the rest is masked to black or the other objects greyed out (caption: the
    kept object), and ReferIt-style stuff bands masked to one band ("sky"). `object_on_black` is the
    share of single objects whose background is masked to black as well (docs/method.md §10: with
    0, every caption of a thing is also true of it on its textured background, so the CLIP learns
    that the background does not matter). The caller passes its own rng: this never touches the
    benchmark's seeds or splits.
    `scenes` is the recipe of the masked-scene pairs: "simple" (the default; the stream is exactly
    the one before the option existed) or "cluttered": those scenes are drawn by the cluttered recipe
    (6-9 objects, occlusion, unannotated clutter; TESTBED §2.1), the kept object being what shows of
    it, so that the scorer sees at pretraining the kind of scene it scores (`_cluttered_pair`);
    `scene_on_black` is the share of those pairs masked to the kept object alone (the rest keep the
    background and its clutter, the other objects greyed).
    `captions` words the cluttered pairs: "appearance" (the kept object's colour, size and shape
    words, `_random_caption`) or "referring": a referring expression of one of the four variants'
    grammars that picks the kept object out of its scene (`_referring_caption`), so that the scorer
    has met location words and relations before it scores them (docs/method.md §10).
    Returns uint8 [n, size, size, 3] and n captions."""
    if scenes not in SCENE_RECIPES:
        raise ValueError(f"unknown scene recipe {scenes!r} (choose from {', '.join(SCENE_RECIPES)})")
    if captions not in CAPTION_KINDS:
        raise ValueError(f"unknown caption kind {captions!r} (choose from {', '.join(CAPTION_KINDS)})")
    if captions != "appearance" and scenes != "cluttered":
        raise ValueError(f"captions={captions!r} words the cluttered pairs: it needs scenes='cluttered'")
    images = np.empty((n, size, size, 3), np.uint8)
    texts: list[str] = []
    for i in range(n):
        u = rng.random()
        if u < 0.45:  # a single object
            scene = sample_scene(rng, size, 1)
            while not scene.objects:
                scene = sample_scene(rng, size, 1)
            img = render_scene(rng, scene)
            # no draw at 0: the stream (and the default CLIP's cache key) stays as it was
            if object_on_black > 0 and rng.random() < object_on_black:
                img = _keep_only(rng, img, scene.objects[0].mask)
            texts.append(_random_caption(rng, scene.objects[0]))
        elif u < 0.9 and scenes == "cluttered":
            img, caption = _cluttered_pair(rng, size, scene_on_black, captions)
            texts.append(caption)
        elif u < 0.9:  # one object of a scene kept, the rest masked out or greyed
            scene = sample_scene(rng, size, stuff=rng.random() < 0.2)
            while not scene.objects:
                scene = sample_scene(rng, size)
            img = render_scene(rng, scene)
            keep = scene.objects[rng.integers(len(scene.objects))]
            img = _keep_one(rng, img, scene, keep, on_black=0.6)
            texts.append(_random_caption(rng, keep))
        else:  # a stuff band, the rest masked out
            scene = sample_scene(rng, size, int(rng.integers(0, 3)), stuff=True)
            img = render_scene(rng, scene)
            region = scene.stuff[rng.integers(len(scene.stuff))]
            img = _keep_only(rng, img, region.mask)
            texts.append(region.shape)
        images[i] = img
    return images, texts


CAPTION_KINDS: tuple[str, ...] = ("appearance", "referring")


def _cluttered_pair(rng: np.random.Generator, size: int, on_black: float = 0.6,
                    captions: str = "appearance") -> tuple[np.ndarray, str]:
    """A masked-scene pair from a cluttered scene (`compose_cluttered_scene`, a stuff background one
    time in five): one object kept, captioned with its words (`captions`, see sample_caption_pairs),
    and, as in the simple pairs, either everything else masked to black (a share `on_black`, 60 % as
    in the simple pairs) or the other objects greyed out with the background and its clutter left as
    they are. The kept object is what shows of it after occlusion."""
    scene = compose_cluttered_scene(rng, size, _cluttered_attrs(rng, None), stuff=rng.random() < 0.2)
    while not scene.objects:
        scene = compose_cluttered_scene(rng, size, _cluttered_attrs(rng, None))
    img = render_scene(rng, scene)
    k = int(rng.integers(len(scene.objects)))
    keep = scene.objects[k]
    img = _keep_one(rng, img, scene, keep, on_black)
    # "appearance" draws nothing more: its stream is exactly the one before `captions` existed
    caption = _referring_caption(rng, scene, k, size) if captions == "referring" else None
    return img, caption or _random_caption(rng, keep)


def _referring_caption(rng: np.random.Generator, scene: Scene, target: int, size: int) -> str | None:
    """One referring expression for thing `target` of `scene`, in the grammar of a variant drawn
    uniformly (location words, relations, short ReferIt forms, appearance only), checked by `resolve`
    to pick exactly that object as the benchmark's are; None when the variant's grammar has none.
    The pretraining's own scenes and rng: never a benchmark scene (METHOD §2)."""
    variant = VARIANTS[int(rng.integers(len(VARIANTS)))]
    sentences = referring_sentences(variant, scene, target, rng, size)
    return sentences[int(rng.integers(len(sentences)))] if sentences else None


def _keep_one(rng: np.random.Generator, img: np.ndarray, scene: Scene, keep: SceneObject, on_black: float) -> np.ndarray:
    """A masked-scene pair's image: `keep` alone on black (a share `on_black` of the pairs), else the
    scene with the other objects greyed out and the background left as it is."""
    if rng.random() < on_black:
        return _keep_only(rng, img, keep.mask)
    grey = img.astype(np.float32).mean(-1, keepdims=True)
    others = np.zeros(img.shape[:2], bool)
    for o in scene.objects:
        if o is not keep:
            others |= o.mask
    return np.where(others[..., None], grey, img).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Referring expressions: a small grammar, and a resolver that checks each one picks exactly one
# object of its scene (METHOD §1: "each expression must identify its target uniquely").


@dataclass(frozen=True)
class Query:
    """A referring expression before it is written out: appearance words, an optional absolute
    location word (refcoco, referit), an optional relation to a landmark (refcocog) or a stuff name."""

    colour: str | None = None
    size: str | None = None
    shape: str | None = None
    loc: str | None = None
    rel: str | None = None
    landmark: "Query | None" = None
    stuff: str | None = None


def _appearance_ok(q: Query, o: SceneObject) -> bool:
    return ((q.colour is None or q.colour == o.colour) and (q.size is None or q.size == o.size)
            and (q.shape is None or q.shape == o.shape))


def _pick_location(word: str, objs: Sequence[SceneObject], margin: float) -> int | None:
    """Index of the object that `word` picks among objs, or None when it is not clear-cut: a
    location word needs >= 2 candidates and the picked one ahead of the next by `margin` px."""
    if len(objs) < 2:
        return None
    if word == "middle":
        if len(objs) != 3:
            return None
        order = sorted(range(3), key=lambda i: objs[i].pos[0])
        xs = [objs[i].pos[0] for i in order]
        return order[1] if xs[1] - xs[0] >= margin and xs[2] - xs[1] >= margin else None
    key = {"left": lambda o: o.pos[0], "right": lambda o: -o.pos[0], "top": lambda o: o.pos[1],
           "bottom": lambda o: -o.pos[1]}[word]
    order = sorted(range(len(objs)), key=lambda i: key(objs[i]))
    return order[0] if key(objs[order[1]]) - key(objs[order[0]]) >= margin else None


def _relation(rel: str, o: SceneObject, landmark: SceneObject, margin: float) -> bool | None:
    """Whether o is `rel` the landmark: True beyond `margin` px, False under margin/4, else unclear."""
    (x, y), (lx, ly) = o.pos, landmark.pos
    d = {"left of": lx - x, "right of": x - lx, "above": ly - y, "below": y - ly}[rel]
    if d >= margin:
        return True
    if d <= margin / 4:
        return False
    return None


def resolve(q: Query, scene: Scene, margin: float) -> list[int] | None:
    """Indices (things first, then stuff) of the objects the query describes; None if unclear."""
    if q.stuff is not None:
        n = len(scene.objects)
        return [n + i for i, s in enumerate(scene.stuff) if s.shape == q.stuff and s.mask.any()]
    cands = [i for i, o in enumerate(scene.objects) if _appearance_ok(q, o)]
    if q.loc is not None:
        k = _pick_location(q.loc, [scene.objects[i] for i in cands], margin)
        return None if k is None else [cands[k]]
    if q.rel is not None:
        assert q.landmark is not None
        lm = resolve(q.landmark, scene, margin)
        if lm is None or len(lm) != 1:
            return None
        out = []
        for i in cands:
            if i == lm[0]:
                continue
            t = _relation(q.rel, scene.objects[i], scene.objects[lm[0]], margin)
            if t is None:
                return None
            if t:
                out.append(i)
        return out
    return cands


def _appearance_words(q: Query) -> str:
    words = [w for w in (q.size, q.colour) if w is not None]
    return " ".join(words + [q.shape if q.shape is not None else "one"])


def render_query(q: Query, variant: str, rng: np.random.Generator) -> str:
    """Write a query out in the variant's style (lower case, tokens separated by single spaces)."""
    if q.stuff is not None:
        return q.stuff
    app = _appearance_words(q)
    if q.rel is not None:
        return f"the {app} {RELATION_PHRASES[q.rel]} the {_appearance_words(q.landmark)}"
    if q.loc is not None:
        if variant == "synth-referit":  # one or two words: "left", "left circle"
            return q.loc if q.shape is None else f"{q.loc} {q.shape}"
        if rng.random() < 0.5:
            return f"{q.loc} {app}"
        phrase = {"left": "on the left", "right": "on the right", "top": "at the top",
                  "bottom": "at the bottom", "middle": "in the middle"}[q.loc]
        return f"{app} {phrase}"
    if variant == "synth-refcocog":
        return f"the {app}"
    return app


_SUBSETS = [(c, z, s) for c in (True, False) for z in (True, False) for s in (True, False) if c or z or s]


def _appearance_queries(o: SceneObject, subsets=_SUBSETS) -> list[Query]:
    return [Query(colour=o.colour if c else None, size=o.size if z else None, shape=o.shape if s else None)
            for c, z, s in subsets]


def candidate_queries(variant: str, scene: Scene, target: int, rng: np.random.Generator,
                      recipe: str = "simple") -> tuple[list[Query], list[Query]]:
    """All queries of the variant's grammar for object `target` (index into things, then stuff),
    split into (preferred, other): location forms for refcoco, relations for refcocog. `recipe`
    "cluttered" names the category in every synth-referit expression (TESTBED §1: ReferIt's words
    carry a category or stuff name): no bare location ("left") or colour ("red") there."""
    n = len(scene.objects)
    if target >= n:
        return [Query(stuff=scene.stuff[target - n].shape)], []
    o = scene.objects[target]
    if variant == "synth-refcoco":
        app = _appearance_queries(o)
        loc = [Query(colour=a.colour, size=a.size, shape=a.shape, loc=w) for a in app + [Query()] for w in LOCATION_WORDS]
        return loc, app
    if variant == "synth-refcoco+":  # METHOD §1: appearance only, no location words
        return [], _appearance_queries(o)
    if variant == "synth-referit" and recipe == "cluttered":  # one or two words, the category always named
        app = _appearance_queries(o, [(False, False, True), (True, False, True), (False, True, True)])
        return [], app + [Query(shape=o.shape, loc=w) for w in LOCATION_WORDS]
    if variant == "synth-referit":  # one or two words
        app = _appearance_queries(o, [(False, False, True), (True, False, False), (True, False, True), (False, True, True)])
        loc = [Query(loc=w) for w in LOCATION_WORDS] + [Query(shape=o.shape, loc=w) for w in LOCATION_WORDS]
        return [], app + loc
    if variant == "synth-refcocog":
        with_shape = [s for s in _SUBSETS if s[2]]
        app = _appearance_queries(o, with_shape)
        rels = []
        for j, other in enumerate(scene.objects):
            if j == target:
                continue
            names = [q for q in _appearance_queries(other, with_shape) if resolve(q, scene, 0.0) == [j]]
            if not names:
                continue
            lm = names[rng.integers(len(names))]  # one way to name each landmark
            rels += [Query(colour=a.colour, size=a.size, shape=a.shape, rel=r, landmark=lm) for a in app for r in RELATIONS]
        return rels, app
    raise ValueError(f"unknown variant {variant!r}")


def referring_sentences(variant: str, scene: Scene, target: int, rng: np.random.Generator, size: int,
                        recipe: str = "simple") -> list[str]:
    """1-3 distinct sentences that each resolve to exactly `target` in the scene ([] if none), in the
    variant's grammar as the scene recipe words it (`candidate_queries`)."""
    margin = 0.08 * size
    preferred, other = candidate_queries(variant, scene, target, rng, recipe)
    preferred = [q for q in preferred if resolve(q, scene, margin) == [target]]
    other = [q for q in other if resolve(q, scene, margin) == [target]]
    k = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    chosen: list[Query] = []
    if preferred and rng.random() < (0.75 if variant == "synth-refcocog" else 0.6):
        chosen.append(preferred[rng.integers(len(preferred))])
    pool = [q for q in preferred + other if q not in chosen]
    take = min(k - len(chosen), len(pool))
    if take > 0:
        chosen += [pool[i] for i in sorted(rng.choice(len(pool), size=take, replace=False))]
    sentences: list[str] = []
    for q in chosen:
        s = render_query(q, variant, rng)
        if s not in sentences:
            sentences.append(s)
    return sentences


# ----------------------------------------------------------------------------------------------
# The generator (REFER layout, METHOD §1)

VARIANTS: tuple[str, ...] = ("synth-refcoco", "synth-refcoco+", "synth-refcocog", "synth-referit")
SPLIT_BYS: dict[str, tuple[str, ...]] = {
    "synth-refcoco": ("unc",), "synth-refcoco+": ("unc",), "synth-refcocog": ("google", "umd"),
    "synth-referit": ("berkeley",),
}
# Image groups, in image-id order. Train has --images scenes; every other group eval_count().
# testA/testB targets come from shape family A/B (RefCOCO's people vs objects).
IMAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "synth-refcoco": ("train", "val", "testA", "testB"),
    "synth-refcoco+": ("train", "val", "testA", "testB"),
    "synth-refcocog": ("train", "val", "test"),
    "synth-referit": ("train", "val", "test"),
}
# Exact twins only where location or relations can tell them apart (not in refcoco+).
DUP_PROB = {"synth-refcoco": 0.2, "synth-refcoco+": 0.0, "synth-refcocog": 0.15, "synth-referit": 0.1}
CATEGORIES: list[dict] = (
    [{"id": i + 1, "name": s, "supercategory": f"family {FAMILY_OF[s]}"} for i, s in enumerate(SHAPES)]
    + [{"id": len(SHAPES) + i + 1, "name": s, "supercategory": "stuff"} for i, s in enumerate(STUFF)]
)
CATEGORY_ID = {c["name"]: c["id"] for c in CATEGORIES}
MAX_ANNS_PER_IMAGE = 10  # ann_id = image_id * 10 + k (5 things + 2 stuff bands at most)


def eval_count(n_train: int) -> int:
    """Images in each non-train group: 15 % of train, at least 20."""
    return max(20, int(round(0.15 * n_train)))


def split_of(variant: str, split_by: str, group: str) -> str:
    """The split name a ref of an image group gets in the refs(<split_by>) file. refcocog google
    has no test split (METHOD §1): its val is umd's val and test images together."""
    if variant == "synth-refcocog" and split_by == "google" and group == "test":
        return "val"
    return group


def _image_rng(seed: int, variant: str, group: str, index: int) -> np.random.Generator:
    # One stream per image: the output does not depend on how images are spread over workers.
    return np.random.default_rng([seed, VARIANTS.index(variant), IMAGE_GROUPS[variant].index(group), index])


@dataclass
class BuiltImage:
    """One generated image with its annotations and refs, before ids of refs/sentences are given."""

    image: np.ndarray  # uint8 [S, S, 3]
    scene: Scene
    targets: list[int]  # object indices (things, then stuff) that have refs
    sentences: list[list[str]]  # per target


def build_image(variant: str, group: str, index: int, seed: int, size: int, scenes: str = "simple") -> BuiltImage:
    """The scene, image and refs of one image: a pure function of its arguments. `scenes` picks the
    recipe: "simple" (the default: 2-5 objects apart on a texture) or "cluttered" (TESTBED §2.1)."""
    if scenes == "cluttered":
        return build_cluttered_image(variant, group, index, seed, size)
    if scenes != "simple":
        raise ValueError(f"unknown scene recipe {scenes!r} (choose from {', '.join(SCENE_RECIPES)})")
    rng = _image_rng(seed, variant, group, index)
    family = {"testA": "A", "testB": "B"}.get(group)
    while True:  # resample until the scene has >= 2 refs (same-image negatives, METHOD D2)
        n = int(rng.integers(2, 6))
        shapes = SHAPE_FAMILIES[family] if family else SHAPES
        attrs = sample_attrs(rng, n, shapes=shapes, dup_prob=DUP_PROB[variant])
        if family:  # the distractors beyond the first two may come from either family
            attrs = attrs[:2] + [a if rng.random() < 0.5 else random_attrs(rng) for a in attrs[2:]]
        if variant == "synth-refcoco+" and len(set(attrs)) < len(attrs):
            continue  # appearance must suffice to refer to every object
        scene = compose_scene(rng, size, attrs, stuff=variant == "synth-referit")
        if family and sum(FAMILY_OF[o.shape] == family for o in scene.objects) < 2:
            continue
        n_things = len(scene.objects)
        candidates = [i for i, o in enumerate(scene.objects) if family is None or FAMILY_OF[o.shape] == family]
        # ReferIt: each stuff band that shows enough of itself is referred to half of the time
        candidates += [n_things + j for j, s in enumerate(scene.stuff)
                       if s.mask.mean() > 0.05 and rng.random() < 0.5]
        targets, sentences = [], []
        for t in candidates:
            sents = referring_sentences(variant, scene, t, rng, size)
            if sents:
                targets.append(t)
                sentences.append(sents)
        if len(targets) >= 2:
            break
    image = render_scene(rng, scene)
    return BuiltImage(image, scene, targets, sentences)


# ----------------------------------------------------------------------------------------------
# The cluttered recipe (TESTBED.md §2.1): scenes closer to RefCOCO's than the simple recipe's.
#
# - 6-9 annotated things drawn from 2-3 shapes and 3-5 colours of the scene, so most referents share
#   their category (and often their colour) with another object and the words must separate instances;
# - objects may overlap and touch: paint order decides, an occluded object's annotation is its visible
#   pixels (RLE) and its box and location words those pixels' box and centroid; every object keeps
#   >= MIN_VISIBLE of its area, so shape and size words stay true of what is seen;
# - unannotated clutter painted on the background (irregular blobs, textured patches, strokes, darker
#   or lighter noise regions; colours kept away from the palette's, shapes not of the vocabulary), and
#   a few thin strokes in front of the objects, until a drawn share of the image shows clutter. Which
#   pixels are clutter is written beside the annotations (clutter.json, one RLE per image), since no
#   rule on the image alone can tell a textured background from clutter exactly;
# - about 2-4 refs per image, the rest of the objects being unreferred distractors of the same sizes.

SCENE_RECIPES: tuple[str, ...] = ("simple", "cluttered")
CLUTTER_THINGS = (6, 9)  # annotated things per scene (inclusive)
MIN_VISIBLE = 0.65  # the share of an object's drawn area that must stay visible
TOUCH_PROB = 0.45  # the share of placements put against an earlier object (overlapping or touching)
CLUTTER_SHARE = (0.18, 0.42)  # per-image target of visible clutter pixels (uniform)
REFS_PER_IMAGE = (2, 4)  # refs wanted per image (inclusive); fewer when fewer objects can be named
ANN_STRIDE = {"simple": 10, "cluttered": 20}  # ann_id = image_id * stride + k
# Radii as in RADIUS, with big objects up to about a sixth of the image's area, so referents span small
# to large. The gap between the classes keeps "small" and "big" unambiguous under occlusion too: the
# least a big object shows (MIN_VISIBLE of radius 0.15) is 1.46x the area of the largest small one.
CLUTTER_RADIUS: dict[str, tuple[float, float]] = {"small": (0.065, 0.10), "big": (0.15, 0.24)}
# Fewer big objects than small ones (COCO: 41 % small, 34 % medium, 24 % large). Not near 1/2: with two
# size modes a median area would then fall between them and flip from one to the other between samples;
# with 0.3 the median of the things, and in ReferIt (where about a fifth of both referents and
# distractors are large stuff bands) that of all annotations, stays inside the small mode.
BIG_SHARE = 0.3


def _clutter_colour(rng: np.random.Generator) -> np.ndarray:
    """A less saturated colour at least 80 (RGB distance) from every palette colour, so that clutter
    never shows a named colour: a colour word keeps meaning an annotated thing."""
    palette = np.array(list(COLOURS.values()), np.float32)
    for _ in range(12):
        c = rng.uniform(15, 240, size=3).astype(np.float32)
        c = c.mean() + rng.uniform(0.35, 0.8) * (c - c.mean())
        if np.sqrt(((palette - c) ** 2).sum(1)).min() >= 80:
            return c
    return _muted_colour(rng).astype(np.float32)


def _clutter_element(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray,
                     background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One unannotated clutter element: (bool mask [S, S], float32 [S, S, 3] paint for it)."""
    import cv2

    canvas = np.zeros((size, size), np.uint8)
    kind = rng.choice(4, p=[0.4, 0.25, 0.2, 0.15])
    a = _clutter_colour(rng)
    paint = np.broadcast_to(a, (size, size, 3)).astype(np.float32)
    if kind == 0:  # an irregular blob: a star-convex polygon with a wobbly radius
        k = 18
        t = np.linspace(0, 2 * np.pi, k, endpoint=False)
        rad = size * rng.uniform(0.05, 0.17)
        wob = sum(rng.uniform(0, 0.22) * np.sin(j * t + rng.uniform(0, 2 * np.pi)) for j in (2, 3, 5))
        cx, cy = rng.uniform(0, size, 2)
        pts = np.stack([cx + rad * (1 + wob) * np.cos(t) * rng.uniform(0.6, 1.4), cy + rad * (1 + wob) * np.sin(t)], 1)
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1)
        n = _smooth_noise(rng, size, int(rng.integers(2, 6)))
        paint = paint + 25.0 * n[..., None]
    elif kind == 1:  # a textured patch: an elongated rotated rectangle with stripes or fine noise
        w, h = size * rng.uniform(0.12, 0.3), size * rng.uniform(0.05, 0.12)
        cx, cy = rng.uniform(0, size, 2)
        box = cv2.boxPoints(((float(cx), float(cy)), (float(w), float(h)), float(rng.uniform(0, 180))))
        cv2.fillPoly(canvas, [np.round(box).astype(np.int32)], 1)
        if rng.random() < 0.5:
            b = _clutter_colour(rng)
            theta, period = rng.uniform(0, np.pi), rng.uniform(2.5, 6.0)
            s = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period) > 0
            paint = np.where(s[..., None], a[None, None], b[None, None]).astype(np.float32)
        else:
            paint = paint + rng.normal(0, 18, size=(size, size, 1)).astype(np.float32)
    elif kind == 2:  # a stroke: a thick polyline (branches, wires, edges of things)
        pts = [rng.uniform(0, size, 2)]
        for _ in range(int(rng.integers(2, 6))):
            ang = rng.uniform(0, 2 * np.pi)
            pts.append(pts[-1] + size * rng.uniform(0.1, 0.3) * np.array([np.cos(ang), np.sin(ang)]))
        thick = int(rng.integers(1, max(3, size // 20)))
        cv2.polylines(canvas, [np.round(np.array(pts)).astype(np.int32)], False, 1, thickness=thick)
    else:  # a darker or lighter irregular region of the background itself (shadow, stain)
        n = _smooth_noise(rng, size, int(rng.integers(3, 7)))
        cx, cy = rng.uniform(0, size, 2)
        rad = size * rng.uniform(0.12, 0.25)
        canvas[(n > 0.2) & ((xx - cx) ** 2 + (yy - cy) ** 2 < rad ** 2)] = 1
        paint = background * rng.choice([0.55, 1.45]) + rng.normal(0, 6, size=(size, size, 1)).astype(np.float32)
    return canvas.astype(bool), paint


def _cluttered_attrs(rng: np.random.Generator, family: str | None) -> list[tuple[str, str, str]]:
    """6-9 (shape, colour, size) triples from 2-3 shapes and 2-4 colours of the scene. In testA/testB
    the scene's shapes are of the split's family, with an occasional shape of either family."""
    pool = SHAPE_FAMILIES[family] if family else SHAPES
    n = int(rng.integers(CLUTTER_THINGS[0], CLUTTER_THINGS[1] + 1))
    shapes = [pool[i] for i in rng.choice(len(pool), size=int(rng.choice([2, 3], p=[0.65, 0.35])), replace=False)]
    colours = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), size=int(rng.integers(2, 5)), replace=False)]
    out = []
    for _ in range(n):
        shape = shapes[rng.integers(len(shapes))] if rng.random() < 0.94 else SHAPES[rng.integers(len(SHAPES))]
        out.append((shape, colours[rng.integers(len(colours))], "big" if rng.random() < BIG_SHARE else "small"))
    return out


def _place_overlapping(rng: np.random.Generator, size: int, attrs: Sequence[tuple[str, str, str]],
                       tries: int = 40) -> list[SceneObject]:
    """Place objects in paint order, some against an earlier one (overlapping or touching), the rest
    apart; a placement is kept only if every object keeps >= MIN_VISIBLE of its drawn area. Objects of
    one colour never touch (their common edge would not show). Returns
    objects whose masks are their full drawn shapes (occlusion is applied by the caller)."""
    placed: list[SceneObject] = []
    full_area: list[int] = []
    cover = np.zeros((size, size), np.int32)  # index+1 of the topmost object per pixel
    for shape, colour, size_name in attrs:
        lo, hi = CLUTTER_RADIUS[size_name]
        for _ in range(tries):
            r = size * rng.uniform(lo, hi)
            m = r + 1.0
            if placed and rng.random() < TOUCH_PROB:
                o = placed[rng.integers(len(placed))]
                ang = rng.uniform(0, 2 * np.pi)
                d = (r + o.r) * rng.uniform(0.7, 1.0)
                cx, cy = o.cx + d * np.cos(ang), o.cy + d * np.sin(ang)
                if not (m <= cx <= size - m and m <= cy <= size - m):
                    continue
                if any(math.hypot(cx - p.cx, cy - p.cy) < 0.6 * (r + p.r) for p in placed):
                    continue
            else:
                cx, cy = rng.uniform(m, size - m), rng.uniform(m, size - m)
                if not all(math.hypot(cx - p.cx, cy - p.cy) > r + p.r + 2.0 for p in placed):
                    continue
            if any(p.colour == colour and math.hypot(cx - p.cx, cy - p.cy) <= r + p.r + 2.0 for p in placed):
                continue
            obj = make_object(shape, colour, size_name, cx, cy, r, size)
            if not obj.mask.any():
                continue
            new_cover = np.where(obj.mask, len(placed) + 1, cover)
            if all((new_cover == i + 1).sum() >= MIN_VISIBLE * full_area[i] for i in range(len(placed))):
                placed.append(obj)
                full_area.append(int(obj.mask.sum()))
                cover = new_cover
                break
    return placed


@dataclass
class ClutteredScene(Scene):
    clutter: np.ndarray = None  # bool [S, S]: the unannotated clutter pixels that show


def compose_cluttered_scene(rng: np.random.Generator, size: int, attrs: Sequence[tuple[str, str, str]], *,
                            stuff: bool = False) -> ClutteredScene:
    """Background (texture, or sky/ground bands with `stuff`), clutter behind, the objects with
    occlusion, a few strokes in front; masks are what shows of each."""
    if stuff:
        background, regions = stuff_background(rng, size)
    else:
        background, regions = texture(rng, size), []
    objects = _place_overlapping(rng, size, attrs)
    full_area = [int(o.mask.sum()) for o in objects]
    for i, o in enumerate(objects):  # what later objects leave visible
        for later in objects[i + 1:]:
            o.mask = o.mask & ~later.mask
    things = np.zeros((size, size), bool)
    for o in objects:
        things |= o.mask
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    clutter = np.zeros((size, size), bool)
    target = rng.uniform(*CLUTTER_SHARE)
    for _ in range(60):
        if (clutter & ~things).mean() >= target:
            break
        m, paint = _clutter_element(rng, size, yy, xx, background)
        background[m] = paint[m]
        clutter |= m
    clutter &= ~things
    for _ in range(int(rng.choice(3, p=[0.5, 0.3, 0.2]))):  # thin strokes in front of the objects
        import cv2

        canvas = np.zeros((size, size), np.uint8)
        p0 = rng.uniform(0, size, 2)
        ang = rng.uniform(0, 2 * np.pi)
        p1 = p0 + size * rng.uniform(0.3, 0.7) * np.array([np.cos(ang), np.sin(ang)])
        cv2.line(canvas, tuple(int(v) for v in np.round(p0)), tuple(int(v) for v in np.round(p1)), 1,
                 thickness=1 + int(size >= 80))
        m = canvas.astype(bool)
        colour = _clutter_colour(rng)
        if all((o.mask & ~m).sum() >= MIN_VISIBLE * a for o, a in zip(objects, full_area)):
            background[m] = colour
            clutter |= m
            for o in objects:
                o.mask = o.mask & ~m
    for o in objects:
        full = polygons_mask(o.shape, o.polygons, size, size)
        if not np.array_equal(o.mask, full):  # occluded: an RLE of the visible pixels describes it
            o.polygons = []
        ys, xs = np.nonzero(o.mask)
        o.centre = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
    things = np.zeros((size, size), bool)
    for o in objects:
        things |= o.mask
    for reg in regions:  # stuff is what shows of the band between the things and the clutter
        reg.mask = reg.mask & ~things & ~clutter
    return ClutteredScene(np.clip(background, 0, 255).astype(np.float32), objects, regions, clutter)


def build_cluttered_image(variant: str, group: str, index: int, seed: int, size: int) -> "BuiltImage":
    """The cluttered recipe's scene, image and refs of one image: a pure function of its arguments."""
    rng = np.random.default_rng([seed, VARIANTS.index(variant), IMAGE_GROUPS[variant].index(group), index,
                                 SCENE_RECIPES.index("cluttered")])
    family = {"testA": "A", "testB": "B"}.get(group)
    while True:  # resample until >= 6 things stand and >= 2 of them can be referred to
        attrs = _cluttered_attrs(rng, family)
        scene = compose_cluttered_scene(rng, size, attrs, stuff=variant == "synth-referit")
        if len(scene.objects) < CLUTTER_THINGS[0]:
            continue
        n_things = len(scene.objects)
        candidates = [i for i, o in enumerate(scene.objects) if family is None or FAMILY_OF[o.shape] == family]
        # a stuff band (always nameable, its category never repeated) is a candidate 60 % of the time,
        # so that stuff is not over-represented among the referents (TESTBED §2.1: same category, sizes)
        candidates += [n_things + j for j, s in enumerate(scene.stuff) if s.mask.mean() > 0.05 and rng.random() < 0.6]
        want = int(rng.integers(REFS_PER_IMAGE[0], REFS_PER_IMAGE[1] + 1))
        targets, sentences = [], []
        # targets: a uniform random subset of the candidates that can be named, so that referents and
        # distractors (the rest) have one size distribution
        for t in rng.permutation(candidates):
            sents = referring_sentences(variant, scene, int(t), rng, size, "cluttered")
            if sents:
                targets.append(int(t))
                sentences.append(sents)
            if len(targets) == want:
                break
        if len(targets) >= 2:
            break
    order = np.argsort(targets, kind="stable")  # refs in object order
    image = render_scene(rng, scene)
    return BuiltImage(image, scene, [targets[i] for i in order], [sentences[i] for i in order])


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _annotation(obj: SceneObject, ann_id: int, image_id: int) -> dict:
    # Polygons where the shape is one; a ring (a hole) and the stuff bands as compressed RLE, wrapped in a
    # list: the REFER API's getMask indexes segmentation[0], so a bare RLE dict fails there (METHOD §1).
    if obj.polygons and obj.shape != "ring":
        seg = [[float(v) for v in p.reshape(-1)] for p in obj.polygons]
    else:
        seg = [_rle(obj.mask)]
    ann = {"id": ann_id, "image_id": image_id, "category_id": CATEGORY_ID[obj.shape], "segmentation": seg,
           "area": float(obj.mask.sum()), "bbox": list(obj.box), "iscrowd": 0}
    if not obj.stuff:  # extra keys are legal COCO; tests use them to check the expressions
        ann["attributes"] = {"shape": obj.shape, "colour": obj.colour, "size": obj.size,
                             "centre": [round(float(obj.pos[0]), 2), round(float(obj.pos[1]), 2)]}
    return ann


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)  # no timestamps: deterministic
    return buf.getvalue()


def _work(job: tuple) -> dict:
    """Worker: build, write the PNG, return the JSON-ready records of one image."""
    variant, group, index, seed, size, image_id, image_dir, scenes = job
    built = build_image(variant, group, index, seed, size, scenes)
    file_name = f"{image_id:07d}.png"
    with open(Path(image_dir) / file_name, "wb") as f:
        f.write(_png_bytes(built.image))
    objs = built.scene.objects + built.scene.stuff
    stride = ANN_STRIDE[scenes]
    anns = [_annotation(o, image_id * stride + k, image_id) for k, o in enumerate(objs) if o.mask.any()]
    refs = [{"ann_id": image_id * stride + t, "category_id": CATEGORY_ID[objs[t].shape],
             "sentences": sents} for t, sents in zip(built.targets, built.sentences)]
    rec = {"image": {"id": image_id, "file_name": file_name, "height": size, "width": size},
           "annotations": anns, "refs": refs, "group": group}
    if isinstance(built.scene, ClutteredScene):
        rec["clutter"] = _rle(built.scene.clutter)
    return rec


def generate(
    variant: str,
    out: str | Path,
    *,
    size: int = 96,
    images: int = 2000,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    scenes: str = "simple",
) -> Path:
    """Write `variant` in the REFER layout under `out` (out/refer/<variant>/, out/images/<variant>/).

    `images` train scenes, eval_count(images) for every other group. Same arguments -> byte-identical
    files, whatever `workers` is. `scenes` is the recipe (SCENE_RECIPES); "cluttered" also writes
    out/refer/<variant>/clutter.json: {image_id: RLE of its unannotated clutter pixels}.
    Returns out/refer/<variant>."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    if size < 32:
        raise ValueError(f"size {size} is too small to draw distinguishable shapes (>= 32)")
    if scenes not in SCENE_RECIPES:
        raise ValueError(f"unknown scene recipe {scenes!r} (choose from {', '.join(SCENE_RECIPES)})")
    if scenes == "cluttered" and size < 48:
        raise ValueError(f"size {size} is too small for cluttered scenes (>= 48)")
    out = Path(out)
    ann_dir, image_dir = out / "refer" / variant, out / "images" / variant
    ann_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)

    jobs = []
    for group in IMAGE_GROUPS[variant]:
        count = images if group == "train" else eval_count(images)
        jobs += [(variant, group, i, seed, size, len(jobs) + i + 1, str(image_dir), scenes) for i in range(count)]
    if workers is None:  # processes only pay off beyond a few hundred scenes (spawn imports ~2 s)
        # up to 8: on the 16-core GPU host two variants of 7,200 scenes took 3 minutes with 2 each
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = min(8, cores) if len(jobs) >= 1000 else 1  # cores this process may use (SLURM, taskset)

    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=f"generate {variant}", unit="img", disable=not progress, file=sys.stderr)
    records = []
    if workers > 1:
        import multiprocessing as mp

        # spawn, not fork: the caller may be a training process with threads running
        with mp.get_context("spawn").Pool(workers) as pool:
            for rec in pool.imap(_work, jobs, chunksize=64):  # imap keeps job order: deterministic
                records.append(rec)
                bar.update()
    else:
        for job in jobs:
            records.append(_work(job))
            bar.update()
    bar.close()
    written = {r["image"]["file_name"] for r in records}
    for p in image_dir.glob("*.png"):  # leftovers of an earlier, larger run into the same folder
        if p.name not in written:
            p.unlink()

    coco = {"info": {"description": f"{variant}: synthetic referring scenes (ehin-bench, METHOD §1)",
                     "size": size, "images": images, "seed": seed,
                     **({} if scenes == "simple" else {"scenes": scenes})},
            "images": [r["image"] for r in records],
            "annotations": [a for r in records for a in r["annotations"]],
            "categories": CATEGORIES}
    with open(ann_dir / "instances.json", "w") as f:
        json.dump(coco, f, sort_keys=True)
    if scenes != "simple":
        with open(ann_dir / "clutter.json", "w") as f:
            json.dump({str(r["image"]["id"]): r["clutter"] for r in records}, f, sort_keys=True)

    for split_by in SPLIT_BYS[variant]:
        refs, ref_id, sent_id = [], 0, 0
        for r in records:
            for ref in r["refs"]:
                sentences = []
                for s in ref["sentences"]:
                    raw = s[0].upper() + s[1:] + "." if variant == "synth-refcocog" else s
                    sentences.append({"sent_id": sent_id, "raw": raw, "sent": s, "tokens": s.split()})
                    sent_id += 1
                refs.append({
                    "ref_id": ref_id, "ann_id": ref["ann_id"], "image_id": r["image"]["id"],
                    "category_id": ref["category_id"], "split": split_of(variant, split_by, r["group"]),
                    "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences,
                    # the real files name the image plus the annotation id
                    "file_name": f"{r['image']['id']:07d}_{ref['ann_id']}.png",
                })
                ref_id += 1
        # Pickle memoises by object identity, so which strings are shared objects changes the bytes;
        # a JSON round trip gives the same object graph whether records came from workers or not.
        refs = json.loads(json.dumps(refs))
        with open(ann_dir / f"refs({split_by}).p", "wb") as f:
            pickle.dump(refs, f, protocol=2)
    return ann_dir


def tree_digest(root: str | Path) -> str:
    """sha256 over every file under root (relative paths and bytes): equal digests = identical output."""
    h = hashlib.sha256()
    root = Path(root)
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


@command
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ehin.data.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", required=True, choices=VARIANTS, help="which synthetic mirror (required)")
    ap.add_argument("--out", required=True, help="REFER root to write (refer/<variant>/, images/<variant>/; required)")
    ap.add_argument("--size", type=int, default=96, help="scene size in px (default: 96)")
    ap.add_argument("--images", type=int, default=2000,
                    help="train scenes (val/test: 15%% each, >= 20; default: 2000)")
    ap.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: 2 for large runs)")
    ap.add_argument("--scenes", default="simple", choices=SCENE_RECIPES,
                    help="scene recipe (TESTBED §2.1; default: simple)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    ann_dir = generate(args.variant, args.out, size=args.size, images=args.images, seed=args.seed,
                       workers=args.workers, scenes=args.scenes)
    n = args.images + eval_count(args.images) * (len(IMAGE_GROUPS[args.variant]) - 1)
    dt = time.perf_counter() - t0
    print(f"wrote {n} scenes ({args.images} train) of {args.size} px to {ann_dir} in {dt:.1f} s "
          f"({1000 * dt / n:.2f} ms/scene)")


if __name__ == "__main__":
    main()
