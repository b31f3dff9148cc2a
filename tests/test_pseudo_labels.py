"""Pseudo-label pipeline (METHOD §6) on hand-made images, maps, scorers and boundaries."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ehin.config import load_config
from ehin.pseudo_labels import prms
from ehin.pseudo_labels.crf import BG, FG, IGNORE, crf_inference_labels, crf_label
from ehin.pseudo_labels.pipeline import (Interrupted, ModelMaps, PseudoLabels, RefItem, Settings, run_pipeline,
                                         write_pseudo_labels)
from ehin.pseudo_labels.random_walk import (dense_transition, pair_labels, path_affinity, path_points,
                                            random_walk, search_offsets)

torch.set_num_threads(1)

RED, BLUE = (220, 40, 40), (40, 40, 220)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def scene(size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy grey background, a red disc (the target) and a blue square: (image, disc, square)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(120, 8, (size, size, 3)).clip(0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 4, size - size // 4, 2)
    r = rng.integers(size // 7, size // 5)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    sq = np.zeros_like(disc)
    q = size // 6
    oy, ox = (0, 0) if cy + cx > size else (size - q - 1, size - q - 1)
    sq[oy:oy + q, ox:ox + q] = True
    sq &= ~disc
    img[disc] = RED
    img[sq] = BLUE
    return img, disc, sq


# ---- PRMS ----------------------------------------------------------------------------------------------

class ColourClip(nn.Module):
    """A hand-made 'CLIP': the image embedding is the mean colour of the (masked) image; the text
    embedding of a sentence is the colour it names."""

    COLOURS = {"red": (1.0, 0.0, 0.0), "blue": (0.0, 0.0, 1.0), "crimson": (0.9, 0.1, 0.0)}

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = image_size
        self.dummy = nn.Parameter(torch.zeros(1))

    def tokenize(self, texts):
        names = list(self.COLOURS)
        return torch.tensor([[names.index(t.split()[-1]) + 1] for t in texts])

    def encode_text(self, tokens):
        names = list(self.COLOURS)
        feats = torch.tensor([self.COLOURS[names[int(t[0]) - 1]] for t in tokens])
        return feats, None, None

    def encode_image(self, img01):
        # colour direction of the masked pixels: mean colour minus grey, so black (masked) pixels count 0
        return (img01 - 0.47 * (img01.sum(1, keepdim=True) > 0)).clamp_min(0).mean((2, 3))


def test_prms_picks_the_map_all_sentences_agree_on():
    from ehin.model.scorer import FrozenScorer

    img, disc, sq = scene(32, 0)
    image01 = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    # three sentences of one ref; sentence 0's map fell on the blue square, 1's on the disc,
    # 2's on both the disc and the square
    maps = torch.stack([torch.from_numpy(sq).float(), torch.from_numpy(disc).float(),
                        torch.from_numpy(disc | sq).float()])
    sentences = ["the red", "a crimson", "that red"]
    scorer = FrozenScorer(ColourClip(32), 32)
    feats = scorer.encode_texts(None, sentences)
    s = prms.score_matrix(image01, maps, feats, scorer.score_masked)
    assert s.shape == (3, 3) and s[1].mean() > s[2].mean() > s[0].mean()
    assert prms.select(image01, maps, feats, scorer.score_masked) == 1
    # the batched version over several refs (different sentence counts) agrees
    provider = ModelMaps(nn.Identity(), scorer, torch.device("cpu"), batch_size=2)
    picks = provider.select(torch.stack([image01, image01, image01]), [maps, maps[:2], maps.flip(0)],
                            [sentences, sentences[:2], sentences[::-1]])
    assert picks == [1, 1, 1]
    assert provider.select(image01[None], [maps[:1]], [["blue"]]) == [0]  # a single sentence: its map


# ---- CRF -----------------------------------------------------------------------------------------------

def test_crf_expands_and_cleans_a_seed():
    img, disc, sq = scene(64, 1)
    yy, xx = np.mgrid[:64, :64]
    cy, cx = np.argwhere(disc).mean(0)
    # a blurred, shifted response on the disc plus a weak spurious blob on the background
    m = np.exp(-((yy - cy - 3) ** 2 + (xx - cx - 3) ** 2) / (2 * 6.0**2))
    m += 0.35 * np.exp(-((yy - 60) ** 2 + (xx - 3) ** 2) / (2 * 2.0**2))
    m /= m.max()
    lab = crf_label(img, m)
    seed_iou = iou(m > 0.3, disc)
    crf_iou = iou(lab == FG, disc)
    assert crf_iou > seed_iou + 0.2 and crf_iou > 0.9
    assert not (lab[55:, :8] == FG).any()  # the spurious blob is gone
    assert set(np.unique(lab)) <= {BG, FG, IGNORE}


def test_crf_ignore_band_between_the_thresholds():
    img, disc, sq = scene(64, 2)
    # confident on the disc, a middling response (between bg 0.1 and fg 0.3) on the square
    m = disc * 1.0 + sq * 0.2
    lab = crf_label(img, m.astype(np.float64))
    assert (lab[disc] == FG).mean() > 0.95
    assert (lab[sq] == IGNORE).mean() > 0.9  # neither confident fg nor confident bg
    far = ~(np.asarray(F.max_pool2d(torch.from_numpy((disc | sq).astype(np.float32))[None], 9, 1, 4)[0]) > 0)
    assert (lab[far] == BG).mean() > 0.99


def test_crf_maps_sharing_one_image_give_what_a_crf_each_gives():
    # crf_label runs both seed maps on one DenseCRF2D (its pairwise lattices built once): every result must be
    # bitwise what a CRF of its own gives, for seeds that cover little, much, nothing and everything
    rng = np.random.default_rng(5)
    for k in range(4):
        img, disc, sq = scene(64, k)
        noisy = np.clip(img.astype(np.int64) + rng.integers(-40, 41, img.shape), 0, 255).astype(np.uint8)
        seeds = [disc.astype(np.int64), (disc | sq).astype(np.int64), np.zeros((64, 64), np.int64),
                 np.ones((64, 64), np.int64), (rng.random((64, 64)) > 0.7).astype(np.int64)]
        shared = crf_inference_labels(noisy, seeds)
        own = [crf_inference_labels(noisy, [s])[0] for s in seeds]
        assert all(np.array_equal(a, b) for a, b in zip(shared, own))
        assert not np.array_equal(shared[0], shared[1])  # the unary is set anew: different seeds, different maps


# ---- affinities and the random walk --------------------------------------------------------------------

def test_paths_and_offsets_follow_irnet():
    assert len(search_offsets(10)) == 152 and len(search_offsets(5)) == 34  # IRNet's direction counts
    assert path_points(0, 3) == ((0, 0), (0, 1), (0, 2), (0, 3))
    p = path_points(3, 1)
    assert p[0] == (0, 0) and (3, 1) in p and all(abs(3 * x - 1 * y) ** 2 / 10 < 1 for y, x in p)


def test_path_affinity_is_one_minus_max_boundary_on_the_path():
    torch.manual_seed(0)
    b = torch.rand(1, 1, 6, 7)
    aff = path_affinity(b, 3)
    for k, (dy, dx) in enumerate(search_offsets(3)):
        for y in range(6):
            for x in range(7):
                if 0 <= y + dy < 6 and 0 <= x + dx < 7:
                    want = 1 - max(float(b[0, 0, y + py, x + px]) for py, px in path_points(dy, dx))
                else:
                    want = 0.0  # partner outside the image
                assert aff[0, k, y, x].item() == pytest.approx(want, abs=1e-6)


def test_pair_labels():
    lab = torch.tensor([[[0, 0, 1, 255]]], dtype=torch.uint8)  # one row: bg bg fg ignore
    bg, fg, neg = pair_labels(lab, 2)
    k = search_offsets(2).index((0, 1))  # right neighbour
    assert bg[0, k, 0].tolist() == [1, 0, 0, 0]
    assert neg[0, k, 0].tolist() == [0, 1, 0, 0]
    assert fg[0, k].sum() == 0  # fg's right neighbour is ignore


def test_random_walk_keeps_mass_behind_a_boundary():
    b = torch.zeros(1, 1, 16, 16)
    b[..., :, 8] = 1.0  # a wall between the left and the right half
    x = torch.zeros(1, 16, 16)
    x[0, 5, 3] = 1.0
    rw = random_walk(x, b, radius=5, beta=10, exp_times=8)
    assert rw[0, :, 9:].abs().max() == 0  # nothing crosses the wall
    left = rw[0, :, :8]
    assert left.min() > 0 and left.max() / left.min() < 1.5  # spread evenly over its own region


def test_random_walk_equals_irnet_dense_matrix_power():
    torch.manual_seed(1)
    b = torch.rand(1, 1, 7, 6) * 0.5
    x = torch.rand(1, 7, 6)
    rw = random_walk(x, b, radius=3, beta=2.0, exp_times=3)
    trans = dense_transition(b, radius=3, beta=2.0, exp_times=3)
    assert torch.allclose(trans.sum(0), torch.ones(42), atol=1e-5)  # column-normalised
    dense = ((x[0] * (1 - b[0, 0])).reshape(1, -1) @ trans).reshape(7, 6)
    assert torch.allclose(rw[0], dense, atol=1e-5)


# ---- the compact file ----------------------------------------------------------------------------------

def test_pseudo_label_file_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    labels = []
    for _ in range(5):
        lab = np.zeros((40, 40), np.uint8)
        y, x = rng.integers(0, 30, 2)
        lab[y:y + 10, x:x + 8] = FG
        lab[rng.integers(0, 40), :] = IGNORE
        labels.append(lab)
    write_pseudo_labels(tmp_path / "p.npz", [7, 3, 11, 5, 2], [70, 30, 110, 50, 20], labels,
                        {"image_size": 40, "dataset": "x"})
    pl = PseudoLabels(tmp_path / "p.npz")
    assert len(pl) == 5 and 11 in pl and 4 not in pl
    for rid, lab in zip([7, 3, 11, 5, 2], labels):
        assert np.array_equal(pl.label(rid), lab)
    assert (tmp_path / "p.npz").stat().st_size < sum(lab.nbytes for lab in labels) / 4  # compact


# ---- the pipeline: switches and resumability -----------------------------------------------------------

class FakeSource:
    image_size = 32

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def image(self, i):
        return scene(32, 100 + i)[0]

    def gt(self, i):
        return scene(32, 100 + i)[1]

    def item(self, i):
        img, disc, _ = scene(32, 100 + i)
        return RefItem(ref_id=1000 - 7 * i, image_id=i, image=img, sentences=["red disc", "red one"],
                       sent_ids=[2 * i, 2 * i + 1], gt=disc)


class FakeMaps:
    """Stage-1-like maps on an 8x8 grid: the red pixels, average-pooled (coarse and blurry)."""

    def maps(self, images01, sentences):
        red = ((images01[:, 0] > 0.7) & (images01[:, 1] < 0.3)).float()
        return F.avg_pool2d(red[:, None], 4)[:, 0]

    def select(self, images01, norm_maps, sentences):
        return [len(m) - 1 for m in norm_maps]


class FakeTrunk(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 8, stride=8)

    def encode_dense(self, x):
        return self.conv(x)


def _run(out, st, **kw):
    return run_pipeline(FakeSource(5), FakeMaps(), FakeTrunk(), st, out=out, progress=False, **kw)


def _digest(path) -> str:
    return hashlib.sha1(open(path, "rb").read()).hexdigest()


SETTINGS = dict(chunk_size=2, workers=1, irnet_epochs=2, irnet_batch_size=4, irnet_lr=0.05)


def _settings(**changes) -> Settings:
    """base.yaml's pseudo-label settings with the small run's changes (Settings has no defaults of its own)."""
    return Settings.from_config(load_config(), **{**SETTINGS, **changes})


def test_pipeline_steps_and_quality_report(tmp_path):
    res = _run(tmp_path / "all.npz", _settings())
    q = res["quality"]
    assert set(q) >= {"maps", "crf", "rw"} and q["final"] == "rw" and q["maps"]["n"] == 5
    assert q["crf"]["iou"] > q["maps"]["iou"]  # the CRF snaps the blurry map to the disc
    assert len(res["irnet_history"]) == 2
    pl = PseudoLabels(tmp_path / "all.npz")
    assert pl.ref_ids.tolist() == [1000 - 7 * i for i in range(5)]  # the source's order
    assert pl.sent_ids.tolist() == [2 * i + 1 for i in range(5)]  # PRMS's pick

    res = _run(tmp_path / "crf.npz", _settings(random_walk=False))
    assert "rw" not in res["quality"] and res["quality"]["final"] == "crf"
    crf = PseudoLabels(tmp_path / "crf.npz")
    for rid in crf.ref_ids:  # maps + CRF only: the CRF labels themselves
        i = (1000 - int(rid)) // 7
        assert iou(crf.label(rid) == FG, FakeSource(5).gt(i)) > 0.8

    res = _run(tmp_path / "maps.npz", _settings(crf=False, random_walk=False))
    maps = PseudoLabels(tmp_path / "maps.npz")
    assert res["quality"]["final"] == "maps" and "seeds" in res["quality"]
    assert all(set(np.unique(maps.label(r))) <= {BG, FG} for r in maps.ref_ids)  # no ignore: map > 0


@pytest.mark.parametrize("stop_after", [1, 3, 4, 5])  # in phase A, after chunks, in IRNet, in the walk
def test_pipeline_resumes_to_the_same_bytes(tmp_path, stop_after):
    st = _settings()
    _run(tmp_path / "ref" / "out.npz", st)
    with pytest.raises(Interrupted):
        _run(tmp_path / "cut" / "out.npz", st, stop_after=stop_after)
    assert not (tmp_path / "cut" / "out.npz").exists()
    _run(tmp_path / "cut" / "out.npz", st)
    assert _digest(tmp_path / "cut" / "out.npz") == _digest(tmp_path / "ref" / "out.npz")


def test_pipeline_refuses_a_work_dir_of_other_settings(tmp_path):
    with pytest.raises(Interrupted):
        _run(tmp_path / "out.npz", _settings(), stop_after=1)
    with pytest.raises(ValueError, match="other inputs or settings"):
        _run(tmp_path / "out.npz", _settings(fg_threshold=0.5))


def test_crf_pool_gives_the_same_labels(tmp_path):
    _run(tmp_path / "a.npz", _settings(random_walk=False))
    _run(tmp_path / "b.npz", _settings(workers=2, random_walk=False))
    assert _digest(tmp_path / "a.npz") == _digest(tmp_path / "b.npz")
    # the pool labels a chunk while the model maps the next: cut after the first chunk's file (the second's
    # CRF in flight), the rerun writes the same bytes, also with another number of processes
    with pytest.raises(Interrupted):
        _run(tmp_path / "cut" / "c.npz", _settings(workers=2, random_walk=False), stop_after=1)
    assert len(list((tmp_path / "cut").rglob("crf/*.npz"))) == 1
    _run(tmp_path / "cut" / "c.npz", _settings(workers=3, random_walk=False))
    assert _digest(tmp_path / "cut" / "c.npz") == _digest(tmp_path / "a.npz")


def test_boundary_head_learns_affinities_from_labels():
    """Trained on label maps, pairs inside one region get high path affinity, pairs across lower."""
    from ehin.pseudo_labels.irnet import BoundaryHead, reduce_label, train_boundary_head

    torch.manual_seed(0)
    scenes = [scene(64, 100 + i) for i in range(8)]
    images = torch.stack([torch.from_numpy(s[0]).permute(2, 0, 1).float() / 255 for s in scenes])
    labels = torch.stack([torch.from_numpy(reduce_label(s[1].astype(np.uint8))) for s in scenes])
    head = BoundaryHead(FakeTrunk(), 64)
    frozen = [p.clone() for p in head.backbone.parameters()]

    def mean_affinity() -> tuple[float, float, float]:
        aff = path_affinity(head.boundary(images), 5)
        bg, fg, neg = pair_labels(labels, 5)
        return tuple(float((aff * m).sum() / m.sum()) for m in (bg, fg, neg))

    bg0, fg0, neg0 = mean_affinity()
    def batches(order, batch_size):
        for s in range(0, len(order), batch_size):
            yield images[order[s:s + batch_size]], labels[order[s:s + batch_size]]

    hist = train_boundary_head(head, 8, batches, epochs=30, batch_size=8, lr=0.3,
                               weight_decay=0.0, radius=5, seed=0, device=torch.device("cpu"), progress=False)
    bg, fg, neg = mean_affinity()
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"]
    assert max(bg0, fg0) - neg0 < 0.15  # untrained: no separation to speak of
    assert fg - neg > 0.4 and bg - neg > 0.2
    assert all(torch.equal(a, b) for a, b in zip(frozen, head.backbone.parameters()))  # trunk frozen
    assert head.boundary(images).shape == (8, 1, 16, 16)


def test_refer_source_pipeline_and_stage2_dataset(tmp_path):
    """The real-data path on a tiny REFER fixture (non-square 40x56 images): refs sorted by id,
    images at S, quality against the GT at original size, stage 2's dataset and its dataset check."""
    from ehin.data.refer import ReferDataset
    from ehin.pseudo_labels.pipeline import ReferSource, split_digest
    from ehin.train_stage2 import PseudoLabelDataset, check_pseudo_labels
    from tests.fixtures import HEIGHT, WIDTH, write_refer_fixture

    write_refer_fixture(tmp_path / "data", "refcoco", "unc", n_images=8)
    refer = ReferDataset(tmp_path / "data", "refcoco", "unc")
    src = ReferSource(refer, "train", 32)
    ids = [int(r["ref_id"]) for r in src.refs]
    assert ids == sorted(ids) and len(src) == len(refer.refs("train"))
    item = src.item(0)
    assert item.image.shape == (32, 32, 3) and item.gt.shape == (HEIGHT, WIDTH)
    assert len(item.sentences) == len(item.sent_ids) >= 1

    res = run_pipeline(src, FakeMaps(), None, _settings(random_walk=False), out=tmp_path / "p.npz",
                       meta={"dataset": "refcoco", "split": "train", "split_digest": split_digest(refer, "train")},
                       progress=False)
    assert res["quality"]["maps"]["n"] == res["quality"]["crf"]["n"] == len(src)
    labels = PseudoLabels(tmp_path / "p.npz")
    cfg = {"data": {"dataset": "refcoco", "train_split": "train", "image_size": 32}}
    check_pseudo_labels(labels, refer, cfg)
    ds = PseudoLabelDataset(refer, "train", lambda s: torch.zeros(len(s), 20, dtype=torch.long), 32, labels, seed=0)
    it = ds[0]
    assert it["image"].shape == (3, 32, 32) and it["label"].shape == (32, 32) and it["label"].dtype == torch.uint8
    assert it["ref_id"] == ids[0] and ds.missing == 0
    with pytest.raises(ValueError, match="another version"):
        write_refer_fixture(tmp_path / "other", "refcoco", "unc", n_images=12)  # one more train image
        check_pseudo_labels(labels, ReferDataset(tmp_path / "other", "refcoco", "unc"), cfg)
    with pytest.raises(ValueError, match="px"):
        check_pseudo_labels(labels, refer, {"data": {**cfg["data"], "image_size": 64}})
    with pytest.raises(ValueError, match="trains on"):
        check_pseudo_labels(labels, refer, {"data": {**cfg["data"], "dataset": "refcoco+"}})


def test_boundary_head_probes_the_trunk_on_its_own_device():
    """The head sizes its branches with a probe through the trunk; the probe must live where the trunk
    does (a CPU probe broke CUDA runs). The meta device stands in for CUDA here: no data, same checks."""
    from ehin.backbones import build_clip
    from ehin.pseudo_labels.irnet import BoundaryHead

    trunk = build_clip("clip-tiny-rn", None, 64).to("meta")
    head = BoundaryHead(trunk, 64)
    assert len(head.branches) == 4  # stem..layer4 taps of the ModifiedResNet
