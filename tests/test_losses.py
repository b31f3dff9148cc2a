"""Stage-1 losses (Eq. 14-19, METHOD §4, D7, D8), ECLM's L_CL (ehin/model/eclm.py) and the frozen scorer (Eq. 16)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ehin.backbones import build_clip
from ehin.config import load_config
from ehin.losses import Stage1Loss, bg_loss, diagonal, fg_loss, focal_penalty, foreground_share, pooled_scores
from ehin.model import FrozenScorer, build_model
from ehin.model.eclm import cl_loss

SENTENCES = ["red circle", "blue square", "green triangle"]
NEGATIVES = [["blue square", "big circle"], ["red circle", "tiny square"], ["red circle", "blue square"]]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(**overrides) -> dict:
    base = {"backbone.arch": "clip-tiny", "data.image_size": 64, "model.hidden_dim": 16, "data.K": 2}
    base.update(overrides)
    return load_config(overrides=[f"{k}={v}" for k, v in base.items()])


def _batch(tokenize, n=3, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, 64, 64, generator=g), "tokens": tokenize(SENTENCES[:n]),
            "sentence": SENTENCES[:n], "neg_sentences": NEGATIVES[:n],
            "neg_tokens": torch.stack([tokenize(neg) for neg in NEGATIVES[:n]])}


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---- Eq. 14: pooled score -------------------------------------------------------------------------

def test_focal_penalty_known_values():
    m = torch.tensor([0.5, 1.0, 0.0])
    expected = torch.tensor([0.125 * math.log(0.51), 0.0, math.log(0.01)])
    torch.testing.assert_close(focal_penalty(m), expected)


def test_pooled_score_by_hand():
    # One image, one text, two pixels R = [1, 1 + ln 3]. Softmax over [bg 1, R] per pixel:
    # p1 = e/(e+e) = 1/2, p2 = 3e/(e+3e) = 3/4 -> m = 5/8, psi = (3/8)^3 log(0.01 + 5/8).
    R = torch.tensor([1.0, 1.0 + math.log(3)]).view(1, 1, 1, 2)
    m = 5 / 8
    psi = (1 - m) ** 3 * math.log(0.01 + m)
    y = (1 + math.log(3)) + (1 + math.log(3) / 2) + psi
    torch.testing.assert_close(foreground_share(R), torch.tensor([[m]]))
    torch.testing.assert_close(pooled_scores(R), torch.tensor([[y]]))


def test_pooled_score_softmax_is_over_the_texts_of_one_image():
    # Image 0: both texts' maps are 1 everywhere -> softmax over [1, 1, 1] gives m = 1/3 each.
    # Image 1: text 0 is 1 + ln 2, text 1 is 1 -> softmax over [e, 2e, e]: m = (1/2, 1/4).
    h, w = 2, 3
    maps = torch.ones(2, 2, h, w)
    maps[1, 0] += math.log(2)
    m = foreground_share(maps)
    torch.testing.assert_close(m, torch.tensor([[1 / 3, 1 / 3], [0.5, 0.25]]))
    y = pooled_scores(maps)
    psi = lambda v: (1 - v) ** 3 * math.log(0.01 + v)  # noqa: E731
    torch.testing.assert_close(y[0, 0], torch.tensor(2 + psi(1 / 3)))
    torch.testing.assert_close(y[1, 0], torch.tensor(2 + 2 * math.log(2) + psi(0.5)))
    torch.testing.assert_close(y[1, 1], torch.tensor(2 + psi(0.25)))
    # changing image 1's maps never changes image 0's shares (no competition across images)
    maps2 = maps.clone()
    maps2[1] = torch.randn(2, h, w) * 5
    torch.testing.assert_close(foreground_share(maps2)[0], m[0])


# ---- Eq. 18: L_FG ---------------------------------------------------------------------------------

def test_fg_loss_multilabel_soft_margin_2x2_by_hand():
    y = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    row0 = -(_log_sigmoid(2.0) + _log_sigmoid(1.0)) / 2  # positive y00 = 2, negative y01 = -1
    row1 = -(_log_sigmoid(-0.5) + _log_sigmoid(3.0)) / 2  # negative y10 = 0.5, positive y11 = 3
    expected = (row0 + row1) / 2
    torch.testing.assert_close(fg_loss(y, ["a", "b"]), torch.tensor(expected))
    torch.testing.assert_close(fg_loss(y), F.multilabel_soft_margin_loss(y, torch.eye(2)))


def test_fg_loss_masks_off_diagonal_pairs_with_the_same_sentence():
    y = torch.tensor([[2.0, 5.0, -1.0], [4.0, 1.0, 0.0], [0.5, -2.0, 3.0]])
    # images 0 and 1 share "red circle": (0,1) and (1,0) are not negatives and drop out
    got = fg_loss(y, ["red circle", "red circle", "blue square"])
    row0 = -(_log_sigmoid(2.0) + _log_sigmoid(1.0)) / 2
    row1 = -(_log_sigmoid(1.0) + _log_sigmoid(0.0)) / 2
    row2 = -(_log_sigmoid(-0.5) + _log_sigmoid(2.0) + _log_sigmoid(3.0)) / 3
    torch.testing.assert_close(got, torch.tensor((row0 + row1 + row2) / 3))
    # a huge score on a masked pair changes nothing
    y2 = y.clone()
    y2[0, 1] = 100.0
    torch.testing.assert_close(fg_loss(y2, ["red circle", "red circle", "blue square"]), got)


# ---- Eq. 15-16, 19: L_CL and L_BG ------------------------------------------------------------------

def test_cl_and_bg_by_hand():
    s = torch.tensor([[0.5, 0.2, 0.6], [0.9, 0.1, 0.3]])
    cl = -((math.log(0.5) + (math.log(0.8) + math.log(0.4)) / 2) + (math.log(0.9) + (math.log(0.9) + math.log(0.7)) / 2)) / 2
    torch.testing.assert_close(cl_loss(s), torch.tensor(cl))
    bg = -((math.log(0.8) + math.log(0.4)) / 2 + (math.log(0.9) + math.log(0.7)) / 2) / 2
    torch.testing.assert_close(bg_loss(s[:, 1:]), torch.tensor(bg))
    # clamp into (1e-4, 1 - 1e-4): S = 0 for the positive, S = 1 (or a negative cosine) for a negative
    clamped = cl_loss(torch.tensor([[0.0, 1.0, -0.5]]))
    expected = -(math.log(1e-4) + (math.log(1e-4) + math.log(1 - 1e-4)) / 2)
    torch.testing.assert_close(clamped, torch.tensor(expected), rtol=1e-5, atol=1e-5)  # float32 1 - 1e-4


class StubScorer(nn.Module):
    """Fixed similarities S[b, m] = table[m] for every image; records the maps it was given."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table)
        self.seen_maps: list[torch.Tensor] = []
        self.seen_keys: list[list[str]] = []

    def encode_texts(self, tokens, keys):
        self.seen_keys.append(list(keys))
        return torch.randn(len(keys), 4)

    def score_masked(self, images01, maps, text_feats):
        self.seen_maps.append(maps.detach().clone())
        return self.table.expand(len(maps), -1) + 0 * maps.sum()


class MapScorer(nn.Module):
    """S[b, m] = sigmoid(mean of map b) * len(sentence m) / 40: depends on which map and which text."""

    def encode_texts(self, tokens, keys):
        return torch.tensor([[len(k) / 40] for k in keys])

    def score_masked(self, images01, maps, text_feats):
        return torch.sigmoid(maps.mean((1, 2)))[:, None] * text_feats[..., 0]


@pytest.mark.parametrize("variant", ["early", "late"])
def test_rank_rows_of_the_loss_average_to_the_global_loss(variant):
    """DDP (docs/method.md D-DDP): rank r holds rows 2r, 2r+1 of the 4 x 4 maps, its own texts from
    column text_offset = 2r and the global batch's sentences as the columns; the mean of the two
    ranks' losses is the single-process loss, term by term (the same-sentence mask of L_FG across
    ranks included: rows 0 and 3 share their sentence)."""
    N = 4
    sentences = ["red circle", "blue square", "green triangle", "red circle"]
    negatives = [["blue square", "big circle"], ["red circle", "tiny square"], ["red circle", "blue square"],
                 ["green triangle", "tiny square"]]
    g = torch.Generator().manual_seed(0)
    out = {"maps": torch.randn(N, N, 2, 2, generator=g), "raw_maps": torch.randn(N, N, 2, 2, generator=g)}
    batch = {"image": torch.rand(N, 3, 8, 8, generator=g), "sentence": sentences, "neg_sentences": negatives}
    loss = Stage1Loss.from_config(tiny_cfg(**{"loss.cl_variant": variant}), MapScorer())
    total, terms = loss(out, batch)
    parts = []
    for r in range(2):
        rows = slice(2 * r, 2 * r + 2)
        part = {"image": batch["image"][rows], "sentence": sentences[rows], "neg_sentences": negatives[rows],
                "text_offset": 2 * r, "text_sentences": sentences}
        parts.append(loss({k: v[rows] for k, v in out.items()}, part))
    torch.testing.assert_close((parts[0][0] + parts[1][0]) / 2, total)
    for k in ("fg", "cl", "bg"):
        torch.testing.assert_close((parts[0][1][k] + parts[1][1][k]) / 2, terms[k])
    # the ranks' own 2 x 2 blocks (no gathered texts) give another loss
    own = [loss({k: v[rows][:, rows] for k, v in out.items()},
                {"image": batch["image"][rows], "sentence": sentences[rows], "neg_sentences": negatives[rows]})
           for rows in (slice(0, 2), slice(2, 4))]
    assert not torch.allclose((own[0][0] + own[1][0]) / 2, total, rtol=1e-3)


@pytest.mark.parametrize("variant", ["early", "late"])
def test_stage1_loss_total_and_mask_choice(variant):
    N, K = 3, 2
    g = torch.Generator().manual_seed(0)
    out = {"maps": torch.randn(N, N, 2, 2, generator=g), "raw_maps": torch.randn(N, N, 2, 2, generator=g)}
    batch = {"image": torch.rand(N, 3, 8, 8), "sentence": SENTENCES, "neg_sentences": NEGATIVES}
    scorer = StubScorer([0.6, 0.3, 0.2])
    loss = Stage1Loss.from_config(tiny_cfg(**{"loss.cl_variant": variant}), scorer)
    total, terms = loss(out, batch)
    fg = fg_loss(pooled_scores(out["maps"]), SENTENCES)
    cl = -(math.log(0.6) + (math.log(0.7) + math.log(0.8)) / 2)
    bg = -(math.log(0.7) + math.log(0.8)) / 2
    torch.testing.assert_close(terms["fg"], fg)
    torch.testing.assert_close(terms["cl"], torch.tensor(cl))
    torch.testing.assert_close(terms["bg"], torch.tensor(bg))
    torch.testing.assert_close(total, 5 * fg + 2 * cl + 1 * bg)
    assert len(scorer.seen_maps) == 1  # one scorer call for every masked image of the step
    seen = scorer.seen_maps[0]
    if variant == "early":  # L_CL masks with the raw (pre-HIPM) map, L_BG with the fused one
        torch.testing.assert_close(seen, torch.cat([diagonal(out["raw_maps"]), diagonal(out["maps"])]))
    else:  # late: L_CL and L_BG share the fused map
        torch.testing.assert_close(seen, diagonal(out["maps"]))
    assert scorer.seen_keys == [SENTENCES + [s for neg in NEGATIVES for s in neg]]


# ---- integration with the model and the real frozen scorer ------------------------------------------

@pytest.fixture(scope="module")
def clip_tiny():
    torch.manual_seed(0)
    return build_clip("clip-tiny", None, 64)


def _count_text_calls(scorer: FrozenScorer) -> list[int]:
    sizes: list[int] = []
    inner = scorer.clip.encode_text

    def counting(tokens):
        sizes.append(len(tokens))
        return inner(tokens)

    scorer.clip.encode_text = counting
    return sizes


def test_gradients_reach_the_model_never_the_frozen_scorer(clip_tiny):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg, backbone=build_clip("clip-tiny", None, 64))
    scorer = FrozenScorer(clip_tiny, 64)
    assert all(not p.requires_grad for p in scorer.parameters())
    scorer.train()
    assert not scorer.clip.training  # stays in eval mode
    before = {k: v.clone() for k, v in scorer.state_dict().items()}
    opt = torch.optim.AdamW(list(model.parameters()) + list(scorer.parameters()), lr=1e-2, weight_decay=0.1)
    batch = _batch(model.backbone.tokenize)
    total, terms = Stage1Loss.from_config(cfg, scorer)(model(batch["image"], batch["tokens"]), batch)
    total.backward()
    assert all(p.grad is None for p in scorer.parameters())
    assert model.vis_proj.weight.grad.abs().sum() > 0
    assert model.backbone.clip.visual.conv1.weight.grad.abs().sum() > 0
    opt.step()
    for k, v in scorer.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # the scorer's weights are its own copy: the model's step did not touch the CLIP it was copied from
    assert scorer.clip is not clip_tiny


def test_cl_gradient_flows_through_the_mask(clip_tiny):
    scorer = FrozenScorer(clip_tiny, 64)
    maps = torch.zeros(2, 8, 8, requires_grad=True)
    texts = scorer.encode_texts(None, ["red circle", "blue square"])[None].expand(2, 2, -1)
    s = scorer.score_masked(torch.rand(2, 3, 64, 64), maps, texts)
    assert s.shape == (2, 2) and s.abs().max() <= 1 + 1e-5
    # (not through cl_loss: a random CLIP's cosines may sit under the 1e-4 clamp, which has no gradient)
    s.sum().backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0


def test_scorer_masks_zero_one_pixels_at_its_own_size(clip_tiny):
    """Eq. 16 in [0,1] space: sigma(R) -> 0 gives a black image, sigma(R) -> 1 the image itself,
    both resized to the scorer's input size and normalised by the scorer's CLIP inside."""
    scorer = FrozenScorer(clip_tiny, 64)
    img = torch.rand(1, 3, 128, 128)  # larger than the scorer's 64 px
    text = scorer.encode_texts(None, ["red circle"])[None]
    with torch.no_grad():
        s_off = scorer.score_masked(img, torch.full((1, 4, 4), -60.0), text)
        s_on = scorer.score_masked(img, torch.full((1, 4, 4), 60.0), text)
        black = F.normalize(scorer.clip.encode_image(torch.zeros(1, 3, 64, 64)), dim=-1)
        small = F.interpolate(img, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
        full = F.normalize(scorer.clip.encode_image(small), dim=-1)
    torch.testing.assert_close(s_off, black @ text[0].T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s_on, full @ text[0].T, rtol=1e-4, atol=1e-5)


TABLE5 = {"bg+fg+cl": (5, 2, 1), "bg+fg": (5, 0, 1), "bg+cl": (0, 2, 1), "fg+cl": (5, 2, 0), "cl": (0, 2, 0),
          "fg": (5, 0, 0)}


@pytest.mark.parametrize("row", list(TABLE5))
def test_table5_subsets_build_and_step(row, clip_tiny):
    fg, cl, bg = TABLE5[row]
    cfg = tiny_cfg(**{"loss.fg": fg, "loss.cl": cl, "loss.bg": bg})
    torch.manual_seed(0)
    model = build_model(cfg, backbone=build_clip("clip-tiny", None, 64))
    scorer = FrozenScorer(clip_tiny, 64) if (cl or bg) else None
    loss_fn = Stage1Loss.from_config(cfg, scorer)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = _batch(model.backbone.tokenize)
    w0 = model.vis_proj.weight.detach().clone()
    total, terms = loss_fn(model(batch["image"], batch["tokens"]), batch)
    assert set(terms) == {"fg", "cl", "bg"}
    for name, lam in zip(("fg", "cl", "bg"), (fg, cl, bg)):
        if lam:
            assert torch.is_tensor(terms[name]) and torch.isfinite(terms[name]) and float(terms[name]) != 0
        else:
            assert terms[name] == 0.0  # switched off and not computed
    torch.testing.assert_close(total.detach(), sum(lam * torch.as_tensor(terms[k]) for k, lam in
                                                   zip(("fg", "cl", "bg"), (fg, cl, bg))).float())
    opt.zero_grad()
    total.backward()
    opt.step()
    assert not torch.equal(model.vis_proj.weight, w0)


def test_switched_off_terms_skip_the_scorer():
    cfg = tiny_cfg(**{"loss.cl": 0, "loss.bg": 0})

    class Exploding(nn.Module):
        def encode_texts(self, *a):
            raise AssertionError("scorer used although L_CL and L_BG are off")

        score_masked = encode_texts

    out = {"maps": torch.randn(3, 3, 2, 2), "raw_maps": torch.randn(3, 3, 2, 2)}
    total, terms = Stage1Loss.from_config(cfg, Exploding())(out, {"image": torch.rand(3, 3, 8, 8), "sentence": SENTENCES,
                                                     "neg_sentences": NEGATIVES})
    assert terms["cl"] == 0.0 and terms["bg"] == 0.0 and torch.isfinite(total)
    with pytest.raises(ValueError, match="scorer"):
        Stage1Loss.from_config(tiny_cfg(), None)


def test_text_features_are_cached_across_steps(clip_tiny):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg, backbone=build_clip("clip-tiny", None, 64))
    scorer = FrozenScorer(clip_tiny, 64)
    sizes = _count_text_calls(scorer)
    loss_fn = Stage1Loss.from_config(cfg, scorer)
    batch = _batch(model.backbone.tokenize)
    loss_fn(model(batch["image"], batch["tokens"]), batch)
    # step 1: ONE encoder call for the 5 distinct strings among 3 positives + 6 negatives
    assert sizes == [len(set(SENTENCES) | {s for n in NEGATIVES for s in n})] == [5]
    loss_fn(model(batch["image"], batch["tokens"]), batch)
    assert sizes == [5]  # step 2: every sentence was cached
    batch2 = dict(batch, neg_sentences=[["purple star", "red circle"]] + NEGATIVES[1:])
    loss_fn(model(batch2["image"], batch2["tokens"]), batch2)
    assert sizes == [5, 1]  # step 3: only the new sentence
    assert scorer.encode_text_calls == 2
    # cached features are the encoder's, normalised
    feats = scorer.encode_texts(None, ["blue square"])
    with torch.no_grad():
        direct = F.normalize(clip_tiny.encode_text(clip_tiny.tokenize(["blue square"]))[0], dim=-1)
    torch.testing.assert_close(feats, direct, rtol=1e-5, atol=1e-6)


def test_text_cache_lru_bound(clip_tiny):
    scorer = FrozenScorer(clip_tiny, 64, max_cache=2)
    scorer.encode_texts(None, ["a", "b"])
    scorer.encode_texts(None, ["a", "c"])  # "b" is the least recently used
    assert list(scorer._cache) == ["a", "c"]
    scorer.encode_texts(clip_tiny.tokenize(["b"]), ["b"])  # tokens given: used as they are
    assert list(scorer._cache) == ["c", "b"] and scorer.encode_text_calls == 3


def test_text_cache_state_round_trips_in_order_and_reads_the_old_layout(clip_tiny):
    """A resumed run must reuse the very features (and the LRU order) it had; checkpoints written
    before the cache was saved as one matrix hold {sentence: features} and still load."""
    scorer = FrozenScorer(clip_tiny, 64)
    scorer.encode_texts(None, ["red circle", "blue square", "green one"])
    state = scorer.cache_state()
    assert state["sentences"] == ["red circle", "blue square", "green one"] and state["features"].shape[0] == 3
    again, old = FrozenScorer(clip_tiny, 64), FrozenScorer(clip_tiny, 64)
    again.load_cache_state(state)
    old.load_cache_state({k: v.clone() for k, v in scorer._cache.items()})
    for other in (again, old):
        assert list(other._cache) == list(scorer._cache)
        torch.testing.assert_close(torch.stack(list(other._cache.values())), torch.stack(list(scorer._cache.values())),
                                   rtol=0, atol=0)
        assert other.encode_texts(None, ["blue square"]) is not None and other.encode_text_calls == 0
    empty = FrozenScorer(clip_tiny, 64)
    empty.load_cache_state(empty.cache_state())
    assert not empty._cache
