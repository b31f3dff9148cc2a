"""The restricted unpickler and the REFER reader on real-layout fixtures (METHOD §1)."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest

import ehin  # noqa: F401  (torchvision shim first)
from ehin.data import safe_pickle
from ehin.data.refer import ReferDataset, ReferFormatError
from tests.fixtures import HEIGHT, WIDTH, write_refer_fixture

# ---------------------------------------------------------------------------------------------
# safe_pickle

REFS_LIKE = [
    {"ref_id": 1, "ann_id": 10, "split": "train", "sent_ids": [0, 1], "ratio": 0.5, "flag": True, "none": None,
     "sentences": [{"sent_id": 0, "raw": "Left guy", "sent": "left guy", "tokens": ["left", "guy"]}],
     "box": (1.0, 2.0, 3.0, 4.0), "tags": {"a", "b"}, "frozen": frozenset({1, 2}), "blob": b"\x00\xffab",
     "big": 2**70, "neg": -3, "c": 1 + 2j, "ba": bytearray(b"xy")},
]


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_safe_pickle_roundtrips_builtin_containers(protocol):
    data = pickle.dumps(REFS_LIKE, protocol=protocol)
    assert safe_pickle.loads(data) == REFS_LIKE


def test_safe_pickle_python2_pickles():
    # Python 2 cPickle, protocol 2: set([u'a', 'b']) via __builtin__.set; 'U' = py2 str
    p2_set = b"\x80\x02c__builtin__\nset\nq\x00]q\x01(X\x01\x00\x00\x00aq\x02U\x01bq\x03e\x85q\x04Rq\x05."
    assert safe_pickle.loads(p2_set) == {"a", "b"}
    # protocol 0 dict with py2 str keys, an int, a long and a unicode value
    p0 = b"(dp0\nS'ref_id'\np1\nI5\nsS'big'\np2\nL12345678901234567890L\nsS'sent'\np3\nVcaf\\u00e9\np4\ns."
    assert safe_pickle.loads(p0) == {"ref_id": 5, "big": 12345678901234567890, "sent": "café"}
    # protocol 0 instance pickle of a plain list via copy_reg._reconstructor(list, list, [1])
    p0_recon = b"ccopy_reg\n_reconstructor\np0\n(c__builtin__\nlist\np1\ng1\n(lp2\nI1\natp3\nRp4\n."
    assert safe_pickle.loads(p0_recon) == [1]
    # py2 str holding UTF-8 bytes decodes as UTF-8
    assert safe_pickle.loads(b"\x80\x02U\x03\xc3\xa9tq\x00.") == "ét"
    # unicode/long are py2 names of str/int
    assert safe_pickle.loads(b"c__builtin__\nunicode\n(S'x'\ntR.") == "x"


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_safe_pickle_rejects_hostile_without_running_it(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "x": _Evil(f"touch {marker}")}], protocol=protocol))
    with pytest.raises(safe_pickle.UnsafePickleError) as e:
        safe_pickle.load(path)
    msg = str(e.value)
    assert str(path) in msg and ".system" in msg  # names the file and the global (posix.system)
    assert not marker.exists()
    assert isinstance(e.value, pickle.UnpicklingError)


@pytest.mark.parametrize("payload, name", [
    (b"cbuiltins\neval\n(S'1+1'\ntR.", "builtins.eval"),
    (b"c__builtin__\ngetattr\n(c__builtin__\ndict\nS'x'\ntR.", "__builtin__.getattr"),
    (b"csubprocess\nPopen\n(S'true'\ntR.", "subprocess.Popen"),
    (b"c__builtin__\nobject\n.", "__builtin__.object"),
])
def test_safe_pickle_rejects_other_globals(payload, name):
    with pytest.raises(safe_pickle.UnsafePickleError, match=name.replace(".", r"\.")):
        safe_pickle.loads(payload, source="f.p")


def test_safe_pickle_rejects_misused_admitted_globals():
    with pytest.raises(safe_pickle.UnsafePickleError, match="latin1"):
        safe_pickle.loads(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")
    # _reconstructor with different cls/base (what a py2 user-class instance looks like)
    with pytest.raises(safe_pickle.UnsafePickleError, match="_reconstructor"):
        safe_pickle.loads(b"ccopy_reg\n_reconstructor\n(c__builtin__\nlist\nc__builtin__\ndict\n(dtR.")
    with pytest.raises(safe_pickle.UnsafePickleError, match="persistent"):
        safe_pickle.loads(b"P1\n.")


# ---------------------------------------------------------------------------------------------
# ReferDataset on real-layout fixtures


@pytest.mark.parametrize("dataset, split_by", [("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "google"),
                                               ("refcocog", "umd"), ("referit", "berkeley")])
def test_reader_on_fixture(tmp_path, dataset, split_by):
    fx = write_refer_fixture(tmp_path, dataset, split_by, n_images=5)
    ds = ReferDataset(tmp_path, dataset, split_by)
    expected_splits = {"refcoco": {"train", "val", "testA", "testB"}, "refcoco+": {"train", "val", "testA", "testB"},
                       "referit": {"train", "val", "test"}}.get(dataset, {"google": {"train", "val"}, "umd": {"train", "val", "test"}}.get(split_by))
    assert ds.splits() == expected_splits
    written = fx.refs[split_by]
    for split in expected_splits:
        assert [r["ref_id"] for r in ds.refs(split)] == [r["ref_id"] for r in written if r["split"] == split]
    assert sum(len(ds.refs(s)) for s in ds.splits()) == len(written) == 15
    for ref in written:
        ann_id, image_id = ref["ann_id"], ref["image_id"]
        mask = ds.ann_mask(ann_id)
        assert mask.dtype == bool and mask.shape == (HEIGHT, WIDTH)
        np.testing.assert_array_equal(mask, fx.masks[ann_id])  # polygon union, compressed and list RLE
        assert ds.ann_box(ann_id) == fx.boxes[ann_id]
        assert ann_id in ds.image_ann_ids(image_id) and len(ds.image_ann_ids(image_id)) == 3
    image_id = written[0]["image_id"]
    img = ds.load_image(image_id)
    assert img.dtype == np.uint8 and img.shape == (HEIGHT, WIDTH, 3)
    # the painted rectangle shows in the image (red at the centre of the first annotation)
    ys, xs = np.nonzero(fx.masks[written[0]["ann_id"]])
    assert img[ys[0] + 2, xs[0] + 2, 0] > 180 and img[ys[0] + 2, xs[0] + 2, 1] < 80
    assert ds.sentence(written[1]["sentences"][0]) == written[1]["sentences"][0]["sent"]


def test_refclef_layout_and_image_root_override(tmp_path):
    fx = write_refer_fixture(tmp_path / "a", "referit", "berkeley", n_images=3)
    ds = ReferDataset(tmp_path / "a", "referit", "berkeley")
    assert ds.ann_dir.name == "refclef"
    image_id = fx.refs["berkeley"][0]["image_id"]
    assert ds.image_path(image_id) == fx.image_files[image_id]  # saiapr_tc-12/25/images/25470.jpg
    assert "/25/images/" in str(ds.image_path(image_id))
    ds.load_image(image_id)
    # images moved elsewhere, found through image_root
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(fx.image_root), elsewhere)
    ds2 = ReferDataset(tmp_path / "a", "referit", "berkeley", image_root=elsewhere)
    assert ds2.load_image(image_id).shape == (HEIGHT, WIDTH, 3)
    # a flat layout under <root>/images/<dataset> is the default too
    write_refer_fixture(tmp_path / "b", "refcoco", "unc", n_images=2, image_layout="flat")
    ds3 = ReferDataset(tmp_path / "b", "refcoco", "unc")
    assert ds3.image_root == tmp_path / "b" / "images" / "refcoco"
    ds3.load_image(ds3.refs("train")[0]["image_id"])


def test_unknown_split_lists_valid_ones(tmp_path):
    write_refer_fixture(tmp_path, "refcocog", "google", n_images=2)
    ds = ReferDataset(tmp_path, "refcocog", "google")
    with pytest.raises(ReferFormatError, match=r"unknown split 'test'.*valid: train, val"):
        ds.refs("test")
    assert ds.refs("val")  # known split


def _corrupt(tmp_path, edit):
    fx = write_refer_fixture(tmp_path, "refcoco", "unc", n_images=3)
    return fx, edit(fx)


def _rewrite_refs(fx, fn):
    path = fx.ann_dir / "refs(unc).p"
    refs = pickle.loads(path.read_bytes())
    fn(refs)
    path.write_bytes(pickle.dumps(refs, protocol=2))
    return path


def _rewrite_instances(fx, fn):
    path = fx.ann_dir / "instances.json"
    coco = json.loads(path.read_text())
    fn(coco)
    path.write_text(json.dumps(coco))
    return path


@pytest.mark.parametrize("case, pattern", [
    ("no_instances", "missing instances.json"),
    ("no_refs", r"missing refs file.*found: \['refs\(google\).p'\]"),
    ("bad_json", "not valid JSON"),
    ("json_not_coco", "expected a COCO dict"),
    ("ref_missing_key", r"lacks keys \['split'\]"),
    ("ref_missing_ann", "points at annotation 999"),
    ("ref_missing_image", "points at image 123"),
    ("ref_no_sentences", "has no sentences"),
    ("refs_not_list", "expected a list of refs"),
    ("refs_hostile", "refusing to unpickle global 'posix.system'"),
    ("refs_truncated", "cannot unpickle refs"),
    ("ann_missing_image", "annotation .* points at missing image"),
])
def test_format_errors_name_the_file(tmp_path, case, pattern):
    fx = write_refer_fixture(tmp_path, "refcoco", "unc", n_images=3)
    instances, refs_path = fx.ann_dir / "instances.json", fx.ann_dir / "refs(unc).p"
    culprit = {"no_instances": instances, "bad_json": instances, "json_not_coco": instances,
               "ann_missing_image": instances}.get(case, refs_path)
    if case == "no_instances":
        instances.unlink()
    elif case == "no_refs":
        refs_path.rename(fx.ann_dir / "refs(google).p")
        culprit = refs_path
    elif case == "bad_json":
        instances.write_text(instances.read_text()[:-20])
    elif case == "json_not_coco":
        instances.write_text("[1, 2]")
    elif case == "ref_missing_key":
        _rewrite_refs(fx, lambda r: r[1].pop("split"))
    elif case == "ref_missing_ann":
        _rewrite_refs(fx, lambda r: r[0].update(ann_id=999))
    elif case == "ref_missing_image":
        _rewrite_refs(fx, lambda r: r[0].update(image_id=123))
    elif case == "ref_no_sentences":
        _rewrite_refs(fx, lambda r: r[0].update(sentences=[]))
    elif case == "refs_not_list":
        refs_path.write_bytes(pickle.dumps({"refs": []}, protocol=2))
    elif case == "refs_hostile":
        refs_path.write_bytes(pickle.dumps([_Evil("true")], protocol=2))
    elif case == "refs_truncated":
        refs_path.write_bytes(refs_path.read_bytes()[:50])
    elif case == "ann_missing_image":
        _rewrite_instances(fx, lambda c: c["annotations"][0].update(image_id=777))
    with pytest.raises(ReferFormatError, match=pattern) as e:
        ReferDataset(tmp_path, "refcoco", "unc")
    assert str(culprit) in str(e.value)


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(ReferFormatError, match="no such dataset folder"):
        ReferDataset(tmp_path, "refcoco", "unc")


def test_image_errors_when_loaded(tmp_path):
    fx = write_refer_fixture(tmp_path, "refcoco", "unc", n_images=3)
    ids = sorted(fx.image_files)
    fx.image_files[ids[0]].unlink()
    fx.image_files[ids[1]].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image = pytest.importorskip("PIL.Image")
    Image.new("RGB", (WIDTH + 1, HEIGHT)).save(fx.image_files[ids[2]])
    ds = ReferDataset(tmp_path, "refcoco", "unc")  # opening does not read images
    with pytest.raises(ReferFormatError, match="missing image file") as e:
        ds.load_image(ids[0])
    assert str(fx.image_files[ids[0]]) in str(e.value)
    with pytest.raises(ReferFormatError, match="cannot read image") as e:
        ds.load_image(ids[1])
    assert str(fx.image_files[ids[1]]) in str(e.value)
    with pytest.raises(ReferFormatError, match="57x40 but"):
        ds.load_image(ids[2])


def test_a_list_of_rles_decodes_as_their_union(tmp_path):
    # REFER's getMask passes a list of RLE dicts to pycocotools' decode (RefCLEF stores them so).
    from pycocotools import mask as mask_utils

    fx = write_refer_fixture(tmp_path)
    ann_id = next(a for a in fx.masks if fx.masks[a].sum() > 4)
    full = fx.masks[ann_id]
    top, bottom = full.copy(), full.copy()
    top[full.shape[0] // 2:] = False
    bottom[:full.shape[0] // 2] = False
    parts = [mask_utils.encode(np.asfortranarray(p.astype(np.uint8))) for p in (top, bottom)]
    seg = [{"size": p["size"], "counts": p["counts"].decode("ascii")} for p in parts]

    def rewrite(c):
        next(a for a in c["annotations"] if a["id"] == ann_id)["segmentation"] = seg

    _rewrite_instances(fx, rewrite)
    ds = ReferDataset(tmp_path, "refcoco", "unc")
    np.testing.assert_array_equal(ds.ann_mask(ann_id), full)


def test_malformed_segmentation(tmp_path):
    fx = write_refer_fixture(tmp_path, "refcoco", "unc", n_images=1)
    _rewrite_instances(fx, lambda c: c["annotations"][0].update(segmentation="oops"))
    ds = ReferDataset(tmp_path, "refcoco", "unc")
    with pytest.raises(ReferFormatError, match="malformed segmentation") as e:
        ds.ann_mask(ds.refs("train")[0]["ann_id"])
    assert "instances.json" in str(e.value)
