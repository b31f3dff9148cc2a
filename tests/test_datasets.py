"""TrainDataset / EvalDataset / collates (docs/architecture.md; METHOD §1, D2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ehin  # noqa: F401  (torchvision shim before open_clip)
import open_clip
from ehin.data import synthetic as syn
from ehin.data import datasets
from ehin.data.datasets import EvalDataset, TokenCache, TrainDataset, eval_collate, resize_mask, train_collate
from ehin.cli import UserError
from ehin.data.refer import ReferDataset
from tests.fixtures import HEIGHT, WIDTH, write_refer_fixture

S = 32


@pytest.fixture(scope="module")
def tokenize():
    return open_clip.get_tokenizer("RN50", context_length=20)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    syn.generate("synth-refcoco", root, size=48, images=30, seed=7, progress=False)
    return ReferDataset(root, "synth-refcoco", "unc")


@pytest.fixture()
def fixture_ds(tmp_path):
    write_refer_fixture(tmp_path, "refcoco", "unc", n_images=8)
    return ReferDataset(tmp_path, "refcoco", "unc")


def test_train_item_contract(synth, tokenize):
    ds = TrainDataset(synth, "train", tokenize, S, K=3, seed=0)
    assert len(ds) == len(synth.refs("train"))
    item = ds[5]
    ref = synth.refs("train")[5]
    assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0 and item["image"].max() > 0.5
    assert item["tokens"].shape == (20,) and item["tokens"].dtype == torch.int64
    assert item["neg_tokens"].shape == (3, 20) and item["neg_tokens"].dtype == torch.int64
    assert torch.equal(item["tokens"], tokenize([item["sentence"]])[0])
    assert torch.equal(item["neg_tokens"], tokenize(item["neg_sentences"]))
    assert item["sentence"] in [s["sent"] for s in ref["sentences"]]
    assert item["mask"].shape == (S, S) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(item["mask"].numpy() > 0, resize_mask(synth.ann_mask(ref["ann_id"]), S))
    # box: xyxy in S-pixel coords (scenes are 48 px)
    x, y, w, h = synth.ann_box(ref["ann_id"])
    np.testing.assert_allclose(item["box"].numpy(), np.array([x, y, x + w, y + h]) * S / 48, rtol=1e-6)
    assert item["box"].dtype == torch.float32
    assert item["ref_id"] == ref["ref_id"] and item["image_id"] == ref["image_id"]
    # the image is the resized PNG, not normalised
    full = torch.from_numpy(synth.load_image(ref["image_id"]).astype(np.float32) / 255).permute(2, 0, 1)
    assert abs(float(item["image"].mean() - full.mean())) < 0.02


def _sentences_of(refer, ref):
    return [s["sent"] for s in ref["sentences"]]


@pytest.mark.parametrize("K", [1, 3, 6, 9])
def test_negatives_same_image_first_never_positive(synth, tokenize, K):
    ds = TrainDataset(synth, "train", tokenize, S, K=K, seed=1)
    refs = synth.refs("train")
    for epoch in range(2):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            negs, pos = item["neg_sentences"], item["sentence"]
            assert len(negs) == K and pos not in negs
            assert not set(negs) & set(_sentences_of(synth, refs[i]))  # nor another sentence of the target
            same = [r for j, r in enumerate(refs) if r["image_id"] == refs[i]["image_id"] and j != i]
            n_same = min(K, len(same))
            # the first n_same come from distinct other refs of the same image, one sentence each
            owners = []
            for s in negs[:n_same]:
                owner = [j for j, r in enumerate(same) if s in _sentences_of(synth, r)]
                assert owner, f"negative {s!r} is not from the same image"
                owners.append(owner[0])
            assert len(set(owners)) == n_same
            # the rest come from other images of the split (the same string may also occur here)
            for s in negs[n_same:]:
                assert any(s in _sentences_of(synth, r) for r in refs if r["image_id"] != refs[i]["image_id"])
            assert len(set(negs)) == K


def test_negatives_never_the_positive_string(fixture_ds, tokenize):
    # "red box" is a sentence of a ref in every image: it must never be a negative of itself
    ds = TrainDataset(fixture_ds, "train", tokenize, S, K=6, seed=0)
    seen_red = 0
    for epoch in range(5):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            assert item["sentence"] not in item["neg_sentences"]
            seen_red += item["sentence"] == "red box"
    assert seen_red > 0


def test_items_reproducible_from_seed_epoch_index(synth, tokenize):
    a = TrainDataset(synth, "train", tokenize, S, K=3, seed=4)
    b = TrainDataset(synth, "train", tokenize, S, K=3, seed=4)
    a.set_epoch(2)
    b.set_epoch(2)
    order = list(range(len(a)))
    first = {i: a[i] for i in order}
    for i in reversed(order):  # another order, another instance (as in another worker)
        item = b[i]
        assert item["sentence"] == first[i]["sentence"] and item["neg_sentences"] == first[i]["neg_sentences"]
        assert torch.equal(item["image"], first[i]["image"]) and torch.equal(item["mask"], first[i]["mask"])
    b.set_epoch(3)
    assert any(b[i]["neg_sentences"] != first[i]["neg_sentences"] for i in order)
    c = TrainDataset(synth, "train", tokenize, S, K=3, seed=5)
    c.set_epoch(2)
    assert any(c[i]["neg_sentences"] != first[i]["neg_sentences"] for i in order)


def test_small_split_fills_with_repeats_but_never_positive(tmp_path, tokenize):
    # 4 images -> train holds one image (3 refs, "red box" / "the green one in picture 0" / ...)
    write_refer_fixture(tmp_path, "refcoco", "unc", n_images=4)
    refer = ReferDataset(tmp_path, "refcoco", "unc")
    ds = TrainDataset(refer, "train", tokenize, S, K=5, seed=0)
    for i in range(len(ds)):
        item = ds[i]
        assert len(item["neg_sentences"]) == 5 and item["sentence"] not in item["neg_sentences"]


def test_train_collate(synth, tokenize):
    ds = TrainDataset(synth, "train", tokenize, S, K=2, seed=0)
    batch = train_collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, S, S) and batch["tokens"].shape == (4, 20)
    assert batch["neg_tokens"].shape == (4, 2, 20) and batch["mask"].shape == (4, S, S) and batch["box"].shape == (4, 4)
    assert batch["ref_id"].dtype == torch.int64 and batch["ref_id"].tolist() == [ds[i]["ref_id"] for i in range(4)]
    assert batch["sentence"] == [ds[i]["sentence"] for i in range(4)]
    assert batch["neg_sentences"] == [ds[i]["neg_sentences"] for i in range(4)]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=train_collate)
    assert next(iter(loader))["neg_tokens"].shape == (3, 2, 20)


def test_eval_dataset_one_item_per_sentence(fixture_ds, tokenize):
    for split in ("val", "testA"):
        ds = EvalDataset(fixture_ds, split, tokenize, S)
        n_sent = sum(len(r["sentences"]) for r in fixture_ds.refs(split))
        assert len(ds) == n_sent and n_sent > 0
    ds = EvalDataset(fixture_ds, "val", tokenize, S)
    items = [ds[i] for i in range(len(ds))]
    assert {(it["ref_id"], it["sent_id"]) for it in items} == {
        (r["ref_id"], s["sent_id"]) for r in fixture_ds.refs("val") for s in r["sentences"]}
    it = items[1]
    ref = next(r for r in fixture_ds.refs("val") if r["ref_id"] == it["ref_id"])
    assert it["image"].shape == (3, S, S) and it["tokens"].shape == (20,)
    assert it["orig_size"] == (HEIGHT, WIDTH)
    assert it["mask"].dtype == torch.bool and it["mask"].shape == (HEIGHT, WIDTH)
    np.testing.assert_array_equal(it["mask"].numpy(), fixture_ds.ann_mask(ref["ann_id"]))
    x, y, w, h = fixture_ds.ann_box(ref["ann_id"])
    assert it["box"].tolist() == [x, y, x + w, y + h]
    assert it["object_masks"].shape == (3, HEIGHT, WIDTH)
    np.testing.assert_array_equal(it["objects_mask"].numpy(), it["object_masks"].numpy().any(0))
    assert it["objects_mask"].sum() > it["mask"].sum()
    assert torch.equal(it["tokens"], tokenize([it["sentence"]])[0])
    batch = eval_collate(items[:3])
    assert batch["image"].shape == (3, 3, S, S) and batch["tokens"].shape == (3, 20)
    assert isinstance(batch["mask"], list) and len(batch["mask"]) == 3
    assert batch["orig_size"] == [(HEIGHT, WIDTH)] * 3 and batch["sentence"] == [i["sentence"] for i in items[:3]]


def test_a_split_the_refs_file_lacks_is_an_error_not_nan_metrics(fixture_ds, tokenize, monkeypatch):
    """REFER's split names are known per dataset (refs of a known split may be missing from a mislabelled
    file): evaluating on such a split stops with one line instead of averaging metrics over no expression."""
    monkeypatch.setattr(fixture_ds, "refs", lambda split: [])
    with pytest.raises(UserError, match="split 'val' has no expressions"):
        EvalDataset(fixture_ds, "val", tokenize, S)


def test_token_cache_rows_equal_batch_tokenization(tokenize):
    cache = TokenCache(tokenize)
    sentences = ["red box", "the small blue circle on the left", "red box", "a " * 40]
    assert torch.equal(cache(sentences), tokenize(sentences).long())
    assert torch.equal(cache(["a " * 40, "green"]), tokenize(["a " * 40, "green"]).long())  # some rows remembered


def test_in_memory_pixels_give_the_items_of_decoding_every_access(synth, tokenize, monkeypatch):
    """The caches of decoded images, masks and tokens are a speed-up only: the items are the same."""
    cached_train, cached_eval = TrainDataset(synth, "train", tokenize, S, K=3, seed=1), EvalDataset(synth, "val", tokenize, S)
    monkeypatch.setattr(datasets, "CACHE_BYTES", 0)
    plain_train, plain_eval = TrainDataset(synth, "train", tokenize, S, K=3, seed=1), EvalDataset(synth, "val", tokenize, S)
    assert cached_train._cache and not plain_train._cache and cached_eval._cache and not plain_eval._cache
    for cached, plain in ((cached_train, plain_train), (cached_eval, plain_eval)):
        for _ in range(2):  # the second pass reads the cache
            for i in range(len(plain)):
                a, b = cached[i], plain[i]
                assert a.keys() == b.keys()
                for k in a:
                    if torch.is_tensor(a[k]):
                        assert torch.equal(a[k], b[k]), k
                    else:
                        assert a[k] == b[k], k


def test_eval_max_items(synth, tokenize):
    full = EvalDataset(synth, "val", tokenize, S)
    capped = EvalDataset(synth, "val", tokenize, S, max_items=10)
    again = EvalDataset(synth, "val", tokenize, S, max_items=10)
    assert len(capped) == 10 < len(full)
    keys = [(r["ref_id"], s["sent_id"]) for r, s in capped.items]
    assert keys == [(r["ref_id"], s["sent_id"]) for r, s in again.items]
    assert keys != [(r["ref_id"], s["sent_id"]) for r, s in full.items[:10]]  # a spread, not the first ones
    assert len(EvalDataset(synth, "val", tokenize, S, max_items=10**6)) == len(full)


def test_data_root_is_read_for_a_synthetic_dataset(synth, tmp_path, monkeypatch):
    """A user's own copy of a synth-* dataset (data.root) is read, not the cache's (issue 18)."""
    from ehin.cli import UserError
    from ehin.config import load_config
    from ehin.data import prepare_dataset

    monkeypatch.setenv("EHIN_CACHE", str(tmp_path / "cache"))
    cfg = load_config(profile="smoke", overrides={"data": {"dataset": "synth-refcoco", "root": str(synth.root)}})
    ds = prepare_dataset(cfg, progress=False)
    assert ds.root == synth.root and ds.ann_dir == synth.ann_dir
    assert len(ds.refs("train")) == len(synth.refs("train"))
    assert not (tmp_path / "cache").exists()  # nothing generated
    cfg["data"]["root"] = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="data.root = .*nowhere.* does not exist"):
        prepare_dataset(cfg, progress=False)
