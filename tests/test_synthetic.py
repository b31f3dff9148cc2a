"""The synthetic scene API and the synth-* generator, read back through the REFER loader (METHOD §1)."""
from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest

import ehin  # noqa: F401  (torchvision shim first)
from ehin.data import synthetic as syn
from ehin.data.refer import ReferDataset

SIZE, N_TRAIN, SEED = 48, 40, 3
SPLIT_BYS = {"synth-refcoco": ["unc"], "synth-refcoco+": ["unc"], "synth-refcocog": ["google", "umd"],
             "synth-referit": ["berkeley"]}
LOCATION = {"left", "right", "top", "bottom", "middle", "above", "below"}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    for variant in syn.VARIANTS:
        syn.generate(variant, root, size=SIZE, images=N_TRAIN, seed=SEED, progress=False)
    return root


def _image_ids(variant):
    """image_id -> (group, index), in the generator's numbering."""
    out, next_id = {}, 1
    for group in syn.IMAGE_GROUPS[variant]:
        count = N_TRAIN if group == "train" else syn.eval_count(N_TRAIN)
        for i in range(count):
            out[next_id] = (group, i)
            next_id += 1
    return out


# ---------------------------------------------------------------------------------------------
# An independent reading of the expressions: parse the words, evaluate them on the annotations.


def _parse_appearance(words):
    colour = [w for w in words if w in syn.COLOURS]
    size = [w for w in words if w in syn.SIZES]
    shape = [w for w in words if w in syn.SHAPES]
    return (colour[0] if colour else None, size[0] if size else None, shape[0] if shape else None)


def _matching(app, things):
    colour, size, shape = app
    return [a for a in things if (colour is None or a["attributes"]["colour"] == colour)
            and (size is None or a["attributes"]["size"] == size) and (shape is None or a["attributes"]["shape"] == shape)]


def _centre(a):
    return a["attributes"]["centre"]


def _referent(sentence, things, stuff, margin):
    """The annotations a sentence describes, by this test's own reading of the grammar."""
    if sentence in syn.STUFF:
        return [a for a in stuff if a["name"] == sentence]
    for phrase, rel in (("to the left of", "left of"), ("to the right of", "right of"), (" above ", "above"), (" below ", "below")):
        if phrase in sentence:
            left, right = sentence.split(phrase)
            landmarks = _matching(_parse_appearance(right.split()), things)
            assert len(landmarks) == 1, f"landmark of {sentence!r} is not unique"
            lx, ly = _centre(landmarks[0])
            out = []
            for a in _matching(_parse_appearance(left.split()), things):
                x, y = _centre(a)
                d = {"left of": lx - x, "right of": x - lx, "above": ly - y, "below": y - ly}[rel]
                if a is not landmarks[0] and d > margin / 2:
                    out.append(a)
            return out
    words = sentence.split()
    cands = _matching(_parse_appearance(words), things)
    loc = [w for w in words if w in LOCATION]
    if not loc:
        return cands
    if loc[0] == "middle":
        assert len(cands) == 3
        return [sorted(cands, key=lambda a: _centre(a)[0])[1]]
    key = {"left": lambda a: _centre(a)[0], "right": lambda a: -_centre(a)[0], "top": lambda a: _centre(a)[1],
           "bottom": lambda a: -_centre(a)[1]}[loc[0]]
    ranked = sorted(cands, key=key)
    assert len(ranked) >= 2 and key(ranked[1]) - key(ranked[0]) > margin / 2, f"{sentence!r}: location not clear-cut"
    return ranked[:1]


@pytest.mark.parametrize("variant", syn.VARIANTS)
def test_variant_reads_back(generated, variant):
    ids = _image_ids(variant)
    for split_by in SPLIT_BYS[variant]:
        ds = ReferDataset(generated, variant, split_by)
        groups = syn.IMAGE_GROUPS[variant]
        expected = set(groups) - ({"test"} if split_by == "google" else set())
        assert ds.splits() == expected
        assert len(ds.images) == N_TRAIN + syn.eval_count(N_TRAIN) * (len(groups) - 1)
        all_refs = [r for s in sorted(ds.splits()) for r in ds.refs(s)]
        per_image = Counter(r["image_id"] for r in all_refs)
        assert set(per_image) == set(ds.images)  # every image has refs...
        assert min(per_image.values()) >= 2  # ...several (same-image negatives, METHOD D2)
        assert len({r["ann_id"] for r in all_refs}) == len(all_refs)
        assert len({s["sent_id"] for r in all_refs for s in r["sentences"]}) == sum(len(r["sentences"]) for r in all_refs)
        for r in all_refs:
            group = ids[r["image_id"]][0]
            assert r["split"] == ("val" if (split_by == "google" and group == "test") else group)
            assert 1 <= len(r["sentences"]) <= 3
            for s in r["sentences"]:
                assert s["tokens"] == s["sent"].split() and s["sent"] == s["sent"].lower()
        assert {r["image_id"] for r in ds.refs("train")} == {i for i, (g, _) in ids.items() if g == "train"}
    if variant in ("synth-refcoco", "synth-refcoco+"):  # testA/testB: targets of one shape family each
        for split, family in (("testA", "A"), ("testB", "B")):
            fams = {ds.categories[r["category_id"]]["supercategory"] for r in ds.refs(split)}
            assert fams == {f"family {family}"}
        assert {ds.categories[r["category_id"]]["supercategory"] for r in ds.refs("train")} == {"family A", "family B"}


@pytest.mark.parametrize("variant", syn.VARIANTS)
def test_masks_boxes_and_pixels_match_the_drawn_scene(generated, variant):
    ds = ReferDataset(generated, variant, SPLIT_BYS[variant][0])
    ids = _image_ids(variant)
    checked = 0
    for image_id, (group, index) in ids.items():
        if index >= 3:
            continue
        built = syn.build_image(variant, group, index, SEED, SIZE)
        np.testing.assert_array_equal(ds.load_image(image_id), built.image)  # PNG is lossless
        objs = built.scene.objects + built.scene.stuff
        ann_ids = ds.image_ann_ids(image_id)
        assert len(ann_ids) == sum(o.mask.any() for o in objs)
        for k, obj in enumerate(objs):
            ann_id = image_id * syn.MAX_ANNS_PER_IMAGE + k
            loaded = ds.ann_mask(ann_id)
            iou = (loaded & obj.mask).sum() / (loaded | obj.mask).sum()
            assert iou > 0.9, (variant, image_id, obj.shape, iou)
            ys, xs = np.nonzero(loaded)
            assert ds.ann_box(ann_id) == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ds.anns[ann_id]["area"] == loaded.sum()
            if not obj.stuff:  # the pixels under the mask have the named colour
                mean = built.image[loaded].astype(float).mean(0)
                assert np.abs(mean - np.array(syn.COLOURS[obj.colour])).max() < 45, (obj.colour, mean)
                assert ds.categories[ds.anns[ann_id]["category_id"]]["name"] == obj.shape
            checked += 1
    assert checked > 30
    segs = [a["segmentation"] for a in ds.anns.values()]
    assert any(isinstance(s, list) for s in segs)  # polygons
    assert not any(isinstance(s, dict) for s in segs)  # never a bare RLE: REFER's getMask cannot read it
    if variant == "synth-referit":
        assert any(isinstance(s[0], dict) for s in segs)  # list-wrapped RLE (rings, stuff)


def refer_get_mask(ann: dict, image: dict) -> np.ndarray:
    """The REFER API's documented getMask, written here: polygons when segmentation[0] is a list, else
    the segmentation goes to pycocotools' decode as it is; the per-part masks are summed."""
    from pycocotools import mask as mask_utils

    seg = ann["segmentation"]
    if type(seg[0]) == list:  # noqa: E721  (REFER's own test)
        rle = mask_utils.frPyObjects(seg, image["height"], image["width"])
    else:
        rle = seg
    m = mask_utils.decode(rle)
    return np.sum(m, axis=2).astype(np.uint8)


@pytest.mark.parametrize("variant", syn.VARIANTS)
def test_every_annotation_decodes_in_the_refer_api_as_in_our_loader(generated, variant):
    import json

    raw = json.loads((generated / "refer" / variant / "instances.json").read_text())
    images = {im["id"]: im for im in raw["images"]}
    ds = ReferDataset(generated, variant, SPLIT_BYS[variant][-1])
    for ann in raw["annotations"]:
        m = refer_get_mask(ann, images[ann["image_id"]])
        np.testing.assert_array_equal(m > 0, ds.ann_mask(ann["id"]), err_msg=f"{variant} ann {ann['id']}")
    assert len(raw["annotations"]) > 50


@pytest.mark.parametrize("variant", syn.VARIANTS)
def test_expressions_are_unique_in_their_scene(generated, variant):
    ds = ReferDataset(generated, variant, SPLIT_BYS[variant][-1])
    margin = 0.08 * SIZE
    by_image: dict[int, list] = {}
    for s in sorted(ds.splits()):
        for r in ds.refs(s):
            by_image.setdefault(r["image_id"], []).append(r)
    n_sentences, words = 0, Counter()
    for image_id, refs in by_image.items():
        anns = [ds.anns[a] for a in ds.image_ann_ids(image_id)]
        things = [a for a in anns if "attributes" in a]
        stuff = [dict(a, name=ds.categories[a["category_id"]]["name"]) for a in anns if "attributes" not in a]
        strings = [s["sent"] for r in refs for s in r["sentences"]]
        assert len(strings) == len(set(strings)), f"image {image_id}: a sentence repeats across refs"
        for r in refs:
            for s in r["sentences"]:
                sent = s["sent"]
                words.update(sent.split())
                got = _referent(sent, things, stuff, margin)
                assert [a["id"] for a in got] == [r["ann_id"]], (variant, image_id, sent)
                n_sentences += 1
                if variant == "synth-refcoco+":
                    assert not LOCATION & set(sent.split()), sent
                if variant == "synth-referit":
                    assert len(sent.split()) <= 2, sent
    assert n_sentences > 100
    if variant == "synth-refcoco":
        assert sum(words[w] for w in ("left", "right", "top", "bottom", "middle")) > 0.2 * n_sentences
    if variant == "synth-refcocog":
        assert sum(words[w] for w in ("above", "below", "of")) > 0.4 * n_sentences
        lengths = [len(s["sent"].split()) for r in ds.refs("train") for s in r["sentences"]]
        assert np.mean(lengths) > 5
    if variant == "synth-referit":
        assert sum(words[w] for w in syn.STUFF) > 0


def test_distractors_share_attributes(generated):
    """Colour alone must not find the target: many scenes hold two objects of the target's colour."""
    ds = ReferDataset(generated, "synth-refcoco+", "unc")
    shared = total = 0
    for r in ds.refs("train"):
        target = ds.anns[r["ann_id"]]["attributes"]
        others = [ds.anns[a]["attributes"] for a in ds.image_ann_ids(r["image_id"]) if a != r["ann_id"]]
        total += 1
        shared += any(o["colour"] == target["colour"] for o in others)
    assert shared / total > 0.3


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    kw = dict(size=40, images=8, progress=False)
    syn.generate("synth-refcocog", tmp_path / "a", seed=1, **kw)
    syn.generate("synth-refcocog", tmp_path / "b", seed=1, workers=2, **kw)  # processes do not change bytes
    syn.generate("synth-refcocog", tmp_path / "c", seed=2, **kw)
    a, b, c = (syn.tree_digest(tmp_path / x) for x in "abc")
    assert a == b
    assert a != c
    files = sorted(p.name for p in (tmp_path / "a" / "refer" / "synth-refcocog").iterdir())
    assert files == ["instances.json", "refs(google).p", "refs(umd).p"]
    assert len(list((tmp_path / "a" / "images" / "synth-refcocog").glob("*.png"))) == 8 + 2 * 20


def test_cli(tmp_path, capsys):
    syn.main(["--variant", "synth-referit", "--out", str(tmp_path), "--size", "40", "--images", "5", "--seed", "4"])
    assert "wrote 45 scenes (5 train)" in capsys.readouterr().out
    ds = ReferDataset(tmp_path, "synth-referit", "berkeley")
    assert ds.splits() == {"train", "val", "test"}
    with pytest.raises(SystemExit):
        syn.main(["--variant", "synth-nope", "--out", str(tmp_path)])


# ---------------------------------------------------------------------------------------------
# Scene API (pretraining pairs)


def test_sample_caption_pairs():
    images, captions = syn.sample_caption_pairs(np.random.default_rng(11), 40, 60)
    assert images.shape == (60, 40, 40, 3) and images.dtype == np.uint8 and len(captions) == 60
    again, captions2 = syn.sample_caption_pairs(np.random.default_rng(11), 40, 60)
    np.testing.assert_array_equal(images, again)
    assert captions == captions2
    vocab = set(syn.COLOURS) | set(syn.SIZES) | set(syn.SHAPES) | set(syn.STUFF) | {"one"}
    assert all(c and set(c.split()) <= vocab for c in captions)
    assert any(len(c.split()) == 3 for c in captions) and any(c.split()[-1] in syn.SHAPES for c in captions)
    # masked scenes: a good share of the pixels blacked out in some images
    assert any((img.max(-1) == 0).mean() > 0.3 for img in images)
    other, _ = syn.sample_caption_pairs(np.random.default_rng(12), 40, 60)
    assert not np.array_equal(images, other)


def test_object_on_black_masks_the_single_objects_background():
    black_share = lambda imgs: float(np.mean([(img.max(-1) == 0).mean() for img in imgs]))
    plain, caps = syn.sample_caption_pairs(np.random.default_rng(11), 40, 200)
    again, caps0 = syn.sample_caption_pairs(np.random.default_rng(11), 40, 200, object_on_black=0.0)
    np.testing.assert_array_equal(plain, again)  # 0 draws nothing: the default stream is unchanged
    assert caps == caps0
    masked, _ = syn.sample_caption_pairs(np.random.default_rng(11), 40, 200, object_on_black=1.0)
    # about 45 % of the pairs are single objects: with them masked too, far more pixels are black
    assert black_share(masked) > black_share(plain) + 0.2


def test_single_object_caption_names_the_painted_object():
    rng = np.random.default_rng(5)
    for _ in range(20):
        scene = syn.sample_scene(rng, 64, 1)
        img = syn.render_scene(rng, scene)
        (obj,) = scene.objects
        mean = img[obj.mask].astype(float).mean(0)
        assert np.abs(mean - np.array(syn.COLOURS[obj.colour])).max() < 45
        assert syn.describe(obj, size=True) == f"{obj.size} {obj.colour} {obj.shape}"
        lo, hi = syn.RADIUS[obj.size]
        assert lo * 64 <= obj.r <= hi * 64


def test_shapes_differ_and_rings_have_holes():
    masks = {s: syn.make_object(s, "red", "big", 32, 32, 12, 64).mask for s in syn.SHAPES}
    for a in syn.SHAPES:
        for b in syn.SHAPES:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.9, (a, b, iou)
    assert not masks["ring"][32, 32] and masks["circle"][32, 32]


def test_textures_are_deterministic_and_varied():
    a = [syn.texture(np.random.default_rng(i), 32, k) for i, k in enumerate(["noise", "stripes", "gradient", "checker"])]
    b = [syn.texture(np.random.default_rng(i), 32, k) for i, k in enumerate(["noise", "stripes", "gradient", "checker"])]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
        assert x.shape == (32, 32, 3) and x.std() > 1.0


# ---------------------------------------------------------------------------------------------
# prepare_dataset: generated once into the cache, safe under concurrency


def _cfg(**synthetic):
    from ehin.config import load_config

    return load_config(profile="smoke", overrides={"data": {"dataset": "synth-refcocog"},
                                                   "synthetic": {"size": 40, "images": 6, **synthetic}})


def test_prepare_dataset_generates_once(tmp_path, monkeypatch):
    from ehin.data import prepare_dataset, synthetic_root

    monkeypatch.setenv("EHIN_CACHE", str(tmp_path))
    calls = []
    real = syn.generate

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(syn, "generate", counting)
    cfg = _cfg()
    results = []
    threads = [threading.Thread(target=lambda: results.append(prepare_dataset(cfg, progress=False))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3
    root = synthetic_root(cfg)
    assert root.parent == tmp_path / "datasets" and root.name.startswith("synth-refcocog-s40-n6-seed0")
    assert results[0].root == root and results[0].split_by == "umd"  # unc -> umd for RefCOCOg
    assert not [p for p in root.parent.iterdir() if ".tmp-" in p.name]  # the temp dir was renamed
    ds = prepare_dataset(cfg, progress=False)
    assert len(calls) == 1 and ds.splits() == {"train", "val", "test"}
    prepare_dataset(_cfg(seed=1), progress=False)
    assert len(calls) == 2


def test_prepare_dataset_real_needs_root(tmp_path):
    from ehin.config import load_config
    from ehin.data import prepare_dataset
    from tests.fixtures import write_refer_fixture

    cfg = load_config(overrides={"data": {"dataset": "refcoco", "root": None}})
    with pytest.raises(ValueError, match="data.root is null"):
        prepare_dataset(cfg)
    cfg["data"]["root"] = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="does not exist"):
        prepare_dataset(cfg)
    write_refer_fixture(tmp_path, "referit", "berkeley", n_images=3)
    cfg["data"].update(root=str(tmp_path), dataset="referit", split_by="unc")
    ds = prepare_dataset(cfg)
    assert ds.split_by == "berkeley" and ds.splits() == {"train", "val", "test"}


def test_caption_pairs_of_cluttered_scenes():
    rng = lambda: np.random.default_rng(5)  # noqa: E731
    plain, caps = syn.sample_caption_pairs(rng(), 64, 120)
    again, caps0 = syn.sample_caption_pairs(rng(), 64, 120, scenes="simple")
    assert caps == caps0 and np.array_equal(plain, again)  # the default stream is the one it was
    clut, capc = syn.sample_caption_pairs(rng(), 64, 120, scenes="cluttered")
    clut2, capc2 = syn.sample_caption_pairs(rng(), 64, 120, scenes="cluttered")
    assert capc == capc2 and np.array_equal(clut, clut2)
    assert clut.shape == plain.shape and len(capc) == 120
    # stream 5's first draw (0.81) makes a masked-scene pair: 6-9 objects and clutter in one, 2-5 in the other
    assert rng().random() == pytest.approx(0.805, abs=1e-3) and not np.array_equal(plain[0], clut[0])
    # every caption is a thing or stuff description the pretraining vocabulary knows
    import ehin.pretrain_clip as pc

    assert all(pc._codes(c) is not None for c in capc)
    with pytest.raises(ValueError, match="unknown scene recipe"):
        syn.sample_caption_pairs(rng(), 64, 4, scenes="crowded")
    # scene_on_black: the masked-scene pairs keep only their object (black elsewhere) at 1, never at 0
    for share in (0.0, 1.0):
        img, _ = syn._cluttered_pair(np.random.default_rng(9), 64, share)
        assert ((img == 0).all(-1).mean() > 0.5) == (share == 1.0)  # a kept object covers < 17 % at most
    assert np.array_equal(syn.sample_caption_pairs(rng(), 64, 40, scenes="cluttered", scene_on_black=0.6)[0], clut[:40])


def test_referring_captions_of_cluttered_pairs():
    """captions="referring" words the cluttered pairs as the benchmark's expressions (location words,
    relations), each picking its kept object out of its scene; "appearance" is the stream it was."""
    rng = lambda: np.random.default_rng(5)  # noqa: E731
    clut, capc = syn.sample_caption_pairs(rng(), 64, 120, scenes="cluttered")
    same, caps = syn.sample_caption_pairs(rng(), 64, 120, scenes="cluttered", captions="appearance")
    assert caps == capc and np.array_equal(same, clut)
    ref, capr = syn.sample_caption_pairs(rng(), 64, 120, scenes="cluttered", captions="referring")
    again, capr2 = syn.sample_caption_pairs(rng(), 64, 120, scenes="cluttered", captions="referring")
    assert capr == capr2 and np.array_equal(ref, again)
    words = {w for c in capr for w in c.split()}
    assert {"left", "right"} & words and {"above", "below", "of"} & words  # location words and relations
    with pytest.raises(ValueError, match="needs scenes='cluttered'"):
        syn.sample_caption_pairs(rng(), 64, 4, captions="referring")
    # each referring caption resolves to exactly the kept object in its own scene
    for seed in range(20):
        r = np.random.default_rng(seed)
        scene = syn.compose_cluttered_scene(r, 64, syn._cluttered_attrs(r, None))
        for target in range(len(scene.objects)):
            caption = syn._referring_caption(np.random.default_rng([seed, target]), scene, target, 64)
            if caption is None:
                continue
            assert caption.split()[-1] != "" and any(w in caption.split() for w in (scene.objects[target].shape, "one", "left",
                                                                                  "right", "top", "bottom", "middle"))
