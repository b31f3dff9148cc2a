"""ehin.model.scorer_criteria (TESTBED §2.2) on a hand-made scene and a fake CLIP whose answers are known.

The fake CLIP reads an object code from each pixel's red channel (code k painted as k * 25 / 255; 0 is
black) and embeds an image as its histogram of codes 1..9; a sentence "o1 bg" embeds as the sum of
one-hot codes (bg = code 9). Its cosine scores follow from pixel counts, so every outcome below is
worked out by hand. It goes through the real FrozenScorer, so the masking is the losses' own."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ehin.model.scorer import FrozenScorer
from ehin.model.scorer_criteria import measure, passes, score_image, summarize

S, BG = 8, 9
WORDS = {f"o{k}": k for k in range(1, 9)} | {"bg": BG}


class FakeClip(nn.Module):
    image_size = S

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))  # FrozenScorer reads the device from a parameter
        self.images_seen: list[torch.Tensor] = []

    def encode_image(self, img: torch.Tensor) -> torch.Tensor:
        self.images_seen.append(img.clone())
        codes = torch.round(img[:, 0] * 255 / 25).long().flatten(1)  # [B, S*S]
        return F.one_hot(codes, 10).sum(1)[:, 1:].float()  # code 0 (black) is nothing

    def tokenize(self, texts):
        return torch.stack([F.one_hot(torch.tensor([WORDS[w] for w in t.split()]), 10).sum(0)[1:] for t in texts])

    def encode_text(self, tokens: torch.Tensor):
        return tokens.float(), None


def scene() -> tuple[torch.Tensor, torch.Tensor]:
    """Background (code 9) with objects A (code 1, 2x2 px), B (code 2, 3x3 px), C (code 3, 2x2 px)."""
    codes = np.full((S, S), BG)
    masks = np.zeros((3, S, S), bool)
    for k, (y, x, n) in enumerate([(0, 0, 2), (4, 4, 3), (0, 5, 2)]):
        masks[k, y:y + n, x:x + n] = True
        codes[masks[k]] = k + 1
    img = np.stack([codes * 25, np.full((S, S), 200), np.zeros((S, S))], -1).astype(np.uint8)
    return img, masks


# A: "o1" (right) and "o3" (describes C); B: "o2 bg". Negatives are the other ref's sentences.
QUERIES = [(0, "o1", ["o2 bg"]), (0, "o3", ["o2 bg"]), (1, "o2 bg", ["o1", "o3"])]


def test_score_image_by_hand():
    img, masks = scene()
    clip = FakeClip()
    scorer = FrozenScorer(clip, S, copy_backbone=False)
    image01 = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    recs = score_image(scorer, image01, torch.from_numpy(masks), QUERIES)
    # isolated: "o1" picks A; "o3" picks C (wrong); "o2 bg" scores 1/sqrt2 on B alone, 0 on A and C
    assert [r["pick"] for r in recs] == [0, 2, 1]
    assert [r["correct"] for r in recs] == [True, False, True]
    assert all(r["n_objects"] == 3 for r in recs)
    # A alone: "o1" 1 > "o2 bg" 0. A + background (B, C black): h = 4 e1 + 47 e_bg; "o1" 4/|h| < "o2 bg"
    # 47/(sqrt2 |h|): the background costs A its win
    assert (recs[0]["win_alone"], recs[0]["win_bg"]) == (True, False)
    assert (recs[1]["win_alone"], recs[1]["win_bg"]) == (False, False)  # 0 vs 0 is no win (strict)
    assert (recs[2]["win_alone"], recs[2]["win_bg"]) == (True, True)  # "o1", "o3" score 0 on both
    # the masks the scorer saw: each object alone (everything else black), then each referent + background
    seen = torch.cat(clip.images_seen)
    code = torch.round(seen[:, 0] * 255 / 25).long()
    for k in range(3):
        assert torch.equal(code[k] > 0, torch.from_numpy(masks[k]))  # object k alone
        assert torch.equal(seen[k][1] > 0, torch.from_numpy(masks[k]))  # every channel is masked
    others_a = torch.from_numpy(masks[1] | masks[2])
    assert torch.equal(code[3] == 0, others_a)  # A + background: B and C black, the rest kept
    assert torch.equal(code[4] == 0, torch.from_numpy(masks[0] | masks[2]))


def test_summarize_by_hand():
    recs = [dict(correct=True, n_objects=3, win_alone=True, win_bg=False),
            dict(correct=False, n_objects=3, win_alone=False, win_bg=False),
            dict(correct=True, n_objects=3, win_alone=True, win_bg=True),
            dict(correct=True, n_objects=6, win_alone=None, win_bg=None)]  # no negatives: (a) only
    f = summarize(recs)
    assert f["isolated_rec"] == pytest.approx(75.0)
    assert f["random_object_rate"] == pytest.approx((3 / 3 + 1 / 6) / 4)
    assert f["isolated_rec_ratio"] == pytest.approx(75.0 / (100 * (3 / 3 + 1 / 6) / 4))
    assert (f["n_isolated"], f["n_with_negatives"]) == (4, 3)
    assert f["pos_wins_alone"] == pytest.approx(200 / 3) and f["pos_wins_bg"] == pytest.approx(100 / 3)
    assert f["isolation_gain"] == pytest.approx(100 / 3)
    # paired differences (1, 0, 0): sd sqrt(1/3), over sqrt(3): 1/3; binomial sqrt(75 x 25 / 4)
    assert f["isolation_gain_se"] == pytest.approx(100 / 3)
    assert f["isolated_rec_se"] == pytest.approx(np.sqrt(75 * 25 / 4))
    assert passes(f) == {"isolated_rec": True, "isolation_gain": True}  # 75 >= 2 x 29.2; 33 >= 10
    assert passes(dict(f, isolated_rec=58.0, isolation_gain=9.9)) == {"isolated_rec": False, "isolation_gain": False}


class FakeRefer:
    """The parts of ReferDataset that `measure` reads: one image with the scene, two refs (A, B), and
    a second image whose only ref has no same-image negative."""

    def __init__(self):
        self.img, self.masks = scene()
        self._refs = [
            {"ref_id": 1, "image_id": 7, "ann_id": 70, "sentences": [{"sent": "o1"}, {"sent": "o3"}]},
            {"ref_id": 2, "image_id": 7, "ann_id": 71, "sentences": [{"sent": "o2 bg"}]},
            {"ref_id": 3, "image_id": 8, "ann_id": 81, "sentences": [{"sent": "o1"}]},
        ]

    def refs(self, split):
        assert split == "val"
        return self._refs

    def image_ann_ids(self, image_id):
        return [image_id * 10 + k for k in range(3)]

    def load_image(self, image_id):
        return self.img

    def ann_mask(self, ann_id):
        return self.masks[ann_id % 10]


def test_measure_on_a_fake_dataset():
    scorer = FrozenScorer(FakeClip(), S, copy_backbone=False)
    f = measure(scorer, FakeRefer(), "val", image_size=S)
    # image 7 as in test_score_image_by_hand; image 8: "o1" names ann 80 (A) but ref 3 is ann 81 (B)
    assert f["n_isolated"] == 4 and f["n_with_negatives"] == 3
    assert f["isolated_rec"] == pytest.approx(50.0)
    assert f["random_object_rate"] == pytest.approx(1 / 3)
    assert f["pos_wins_alone"] == pytest.approx(200 / 3) and f["pos_wins_bg"] == pytest.approx(100 / 3)
    assert f["isolation_gain"] == pytest.approx(100 / 3)
    assert passes(f) == {"isolated_rec": False, "isolation_gain": True}  # 50 < 2 x 33.3


def test_embed_masked_is_what_score_masked_does():
    torch.manual_seed(0)
    clip = nn.Module()
    conv = nn.Conv2d(3, 4, 3, padding=1)
    clip.conv, clip.image_size = conv, 16
    clip.encode_image = lambda x: conv(x).mean((2, 3))
    scorer = FrozenScorer(clip, 16, copy_backbone=False)
    images, maps = torch.rand(2, 3, 24, 24), torch.randn(2, 5, 5)
    texts = F.normalize(torch.randn(2, 3, 4), dim=-1)
    with torch.no_grad():
        want = torch.einsum("be,bme->bm", scorer.embed_masked(images, torch.sigmoid(maps)), texts)
        assert torch.equal(scorer.score_masked(images, maps, texts), want)


def test_fidelity_cli_adds_the_scorer_figures(tmp_path, monkeypatch):
    """`python -m ehin.data.fidelity --scorer` writes the §2.2 keys into each variant's row (a random
    small CLIP here: the plumbing, not the figures)."""
    import json

    from ehin.data import fidelity
    from ehin.data import synthetic as syn

    monkeypatch.setenv("EHIN_CACHE", str(tmp_path / "cache"))
    syn.generate("synth-refcoco+", tmp_path, size=64, images=20, seed=3, progress=False, scenes="cluttered")
    fidelity.main(["--root", str(tmp_path), "--variants", "synth-refcoco+", "--scorer", "--profile", "smoke",
                   "--set", "backbone.pretrained=null", "--json", str(tmp_path / "f.json"), "--md", str(tmp_path / "f.md")])
    row, = json.loads((tmp_path / "f.json").read_text())
    assert row["scorer"] == "clip-tiny:random weights"
    assert row["n_isolated"] == row["expressions"] and 0 < row["n_with_negatives"] <= row["expressions"]
    assert 0 <= row["isolated_rec"] <= 100 and row["isolation_gain"] == pytest.approx(
        row["pos_wins_alone"] - row["pos_wins_bg"])
    assert set(fidelity.passes(row)) >= {"isolated_rec", "isolation_gain"}
    assert "Frozen scorer (TESTBED.md §2.2)" in (tmp_path / "f.md").read_text()
