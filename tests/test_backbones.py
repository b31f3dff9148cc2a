"""ehin.backbones: shapes of the CLIP encoders, tokenizer (METHOD D1), weight loading and its errors."""
from __future__ import annotations

import time

import pytest
import torch

import ehin.backbones as bb
from ehin.backbones import ClipWeightsError, build_clip

torch.set_num_threads(1)

SOT, EOT = 49406, 49407
SENTENCES = ["red circle", "the big blue square left of the small green triangle"]

# arch -> (visual_channels C_v, grid h = w at 64 px, text_dim C_l, token_dim, embed_dim)
EXPECTED = {
    "RN50": (2048, 2, 1024, 512, 1024),      # layer4 before attnpool, stride 32 -> 2x2
    "ViT-B-16": (768, 4, 512, 512, 512),     # patch 16 -> 4x4 grid
    "clip-tiny": (64, 8, 64, 64, 64),        # patch 8 -> 8x8 grid
    "clip-small": (96, 8, 96, 64, 96),
    "clip-tiny-rn": (512, 8, 64, 64, 64),    # ModifiedResNet re-strided to 8 -> 8x8 grid
}
_MODELS: dict[str, bb.ClipBackbone] = {}


def model(arch: str) -> bb.ClipBackbone:
    if arch not in _MODELS:  # RN50 / ViT-B-16 take seconds to initialise: build once per session
        torch.manual_seed(0)
        _MODELS[arch] = build_clip(arch, None, 64).eval()
    return _MODELS[arch]


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_shapes(arch: str) -> None:
    m = model(arch)
    c_v, g, c_l, c_t, c_e = EXPECTED[arch]
    assert (m.visual_channels, m.text_dim, m.token_dim, m.embed_dim) == (c_v, c_l, c_t, c_e)
    assert m.image_size == 64 and m.grid_size == (g, g)
    assert m.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert m.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    img = torch.rand(2, 3, 64, 64)
    tokens = m.tokenize(SENTENCES)
    with torch.no_grad():
        dense = m.encode_dense(img)
        pooled = m.encode_image(img)
        both = m.encode(img)
        sent, tok_feats, pad = m.encode_text(tokens)
    assert dense.shape == (2, c_v, g, g)
    assert pooled.shape == (2, c_e)
    assert torch.allclose(both[0], dense) and torch.allclose(both[1], pooled)
    assert sent.shape == (2, c_l) and tok_feats.shape == (2, 20, c_t)
    assert pad.dtype == torch.bool and pad.shape == (2, 20)
    assert pad.sum(1).tolist() == [(tokens[i] != 0).sum().item() for i in range(2)]
    assert torch.isfinite(dense).all() and torch.isfinite(sent).all()


@pytest.mark.parametrize("arch", ["RN50", "clip-tiny", "clip-tiny-rn"])
def test_matches_open_clip(arch: str) -> None:
    """encode_text on 20 tokens = open_clip's encode_text on the full context (causal transformer);
    encode_image = open_clip's encode_image on CLIP-normalised pixels."""
    import open_clip

    m = model(arch)
    full = open_clip.tokenize(SENTENCES, context_length=m.context_length)
    img = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref_text = m.clip.encode_text(full)
        ref_img = m.clip.encode_image((img - torch.tensor(m.mean).view(1, 3, 1, 1)) / torch.tensor(m.std).view(1, 3, 1, 1))
        ours_text = m.encode_text(m.tokenize(SENTENCES))[0]
        ours_img = m.encode_image(img)
    assert torch.allclose(ours_text, ref_text, atol=1e-5)
    assert torch.allclose(ours_img, ref_img, atol=1e-5)


@pytest.mark.parametrize("grid,width,heads,out", [(8, 512, 16, 64), (2, 64, 4, 32), (7, 256, 8, 128)])
def test_factorised_attention_pool_equals_open_clips(grid: int, width: int, heads: int, out: int) -> None:
    """bb.attention_pool (one query, nothing projected per token) = open_clip's AttentionPool2d, in
    value and in the gradient w.r.t. its input, in float64 where rounding cannot hide a wrong term."""
    from open_clip.modified_resnet import AttentionPool2d

    torch.manual_seed(0)
    pool = AttentionPool2d(grid, width, heads, out).double()
    for lin in (pool.q_proj, pool.k_proj, pool.v_proj):  # non-zero biases: the k bias must cancel
        torch.nn.init.normal_(lin.bias)
    x = torch.randn(3, width, grid, grid, dtype=torch.double, requires_grad=True)
    ref = pool(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    ours = bb.attention_pool(pool, x)
    (g_ours,) = torch.autograd.grad(ours.square().sum(), x)
    assert ours.shape == (3, out)
    assert torch.allclose(ours, ref, atol=1e-12) and torch.allclose(g_ours, g_ref, atol=1e-12)


def test_pyramid_shapes() -> None:
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        rn = model("RN50").encode_pyramid(x)
        vit = model("clip-tiny").encode_pyramid(x)
        vit_b = model("ViT-B-16").encode_pyramid(x)
        # the last level is the dense map
        assert torch.allclose(rn[-1], model("RN50").encode_dense(x), atol=1e-5)
        assert torch.allclose(vit[-1], model("clip-tiny").encode_dense(x), atol=1e-5)
    assert [tuple(f.shape[1:]) for f in rn] == [(512, 8, 8), (1024, 4, 4), (2048, 2, 2)]  # strides 8/16/32
    assert [tuple(f.shape[1:]) for f in vit] == [(64, 8, 8)] * 3  # 2 blocks: a level repeats
    assert [tuple(f.shape[1:]) for f in vit_b] == [(768, 4, 4)] * 3


def test_restrided_rn_is_local_and_vit_tokens_are_not() -> None:
    """Why the synthetic profile uses clip-tiny-rn (docs/method.md §10): changing one 8x8 patch moves
    the conv tower's dense features only near it, but every patch token of the ViT."""
    img = torch.rand(2, 3, 64, 64)
    changed = img.clone()
    changed[:, :, :8, :8] = 0.0
    moved = {}
    for arch in ("clip-tiny-rn", "clip-tiny"):
        with torch.no_grad():
            d = (model(arch).encode_dense(changed) - model(arch).encode_dense(img)).abs().amax(1)
        moved[arch] = (d > 1e-5)
    rn, vit = moved["clip-tiny-rn"], moved["clip-tiny"]
    assert vit.all()  # 2 blocks of global attention: all 64 cells move
    assert rn[:, :3, :3].any() and not rn[:, 3:, :].any() and not rn[:, :, 3:].any()
    assert model("clip-tiny-rn").stride == 8


def test_rn_pyramid_of_restrided_tower_stays_at_stride_8() -> None:
    with torch.no_grad():
        levels = model("clip-tiny-rn").encode_pyramid(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in levels] == [(128, 8, 8), (256, 8, 8), (512, 8, 8)]


def test_dense_values_is_the_self_only_last_block() -> None:
    """dense='values' (MaskCLIP readout): the last block's attention is out_proj(W_v ln_1(x)) of each
    token itself; the blocks before it, the residuals, the MLP and ln_post are CLIP's own."""
    torch.manual_seed(0)
    m = build_clip("clip-tiny", None, 64).eval()
    img = torch.rand(2, 3, 64, 64)
    v = m.clip.visual
    with torch.no_grad():
        x = v._embeds(m.normalize(img))
        for blk in v.transformer.resblocks[:-1]:
            x = blk(x)
        last = v.transformer.resblocks[-1]
        C = x.shape[-1]
        w_v, b_v = last.attn.in_proj_weight[2 * C:], last.attn.in_proj_bias[2 * C:]
        x = x + last.ls_1(last.attn.out_proj(last.ln_1(x) @ w_v.T + b_v))
        x = x + last.ls_2(last.mlp(last.ln_2(x)))
        want = v.ln_post(x)[:, 1:].transpose(1, 2).reshape(2, C, 8, 8)
        tokens = m.encode_dense(img)
        m.dense = "values"
        got = m.encode_dense(img)
        pooled = m.encode_image(img)
        m.dense = "tokens"
        assert torch.allclose(pooled, m.encode_image(img))  # the pooled embedding stays CLIP's
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, tokens, atol=1e-3)


def test_wrong_input_size_is_an_error() -> None:
    with pytest.raises(ValueError, match="64x64"):
        model("clip-tiny").encode_dense(torch.rand(1, 3, 32, 32))


def test_tokenizer_keeps_eot_when_truncating() -> None:
    long = " ".join(["red"] * 40)  # 40 word tokens, far beyond the 20-token context
    tok = bb.tokenize([long, "red circle"])
    assert tok.shape == (2, 20) and tok.dtype == torch.int64
    assert tok[0, 0] == SOT and tok[0, -1] == EOT  # METHOD D1: truncated, EOT kept in the last slot
    assert (tok[0] != 0).all()
    assert tok[1, 0] == SOT and tok[1, 3] == EOT and (tok[1, 4:] == 0).all()  # SOT red circle EOT pad
    # The sentence embedding is read at the EOT position, which exists for the truncated one too.
    assert tok.argmax(1).tolist() == [19, 3]
    assert torch.equal(model("clip-tiny").tokenize([long]), tok[:1])


def test_freeze_sticks_through_train() -> None:
    m = build_clip("clip-tiny", None, 64).freeze()
    assert not any(p.requires_grad for p in m.parameters())
    m.train()
    assert not m.training and not m.clip.visual.training


def test_unknown_arch_and_bad_size() -> None:
    with pytest.raises(ValueError, match="unknown CLIP arch"):
        build_clip("clip-huge", None, 64)
    with pytest.raises(ValueError, match="multiple of 8"):
        build_clip("clip-tiny", None, 60)


# ---- weights ------------------------------------------------------------------------------------

def _outputs(m: bb.ClipBackbone) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, m.image_size, m.image_size, generator=g)
    with torch.no_grad():
        return (m.encode_dense(img), m.encode_image(img), *m.encode_text(m.tokenize(SENTENCES))[:2])


def test_local_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(1)
    src = build_clip("clip-tiny", None, 64).eval()
    # open_clip training checkpoints: {'state_dict': {'module.<key>': ...}, 'epoch': ...}
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.clip.state_dict().items()}}, path)
    loaded = build_clip("clip-tiny", str(path), 64).eval()
    for a, b in zip(_outputs(src), _outputs(loaded)):
        assert torch.equal(a, b)
    # a ClipBackbone's own state dict ('clip.' prefix) loads too
    path2 = tmp_path / "backbone.pt"
    torch.save(src.state_dict(), path2)
    for a, b in zip(_outputs(src), _outputs(build_clip("clip-tiny", path2, 64).eval())):
        assert torch.equal(a, b)
    # and at another input size: the ViT position grid is resized (8x8 -> 12x12)
    big = build_clip("clip-tiny", path, 96)
    assert big.encode_dense(torch.rand(1, 3, 96, 96)).shape == (1, 64, 12, 12)
    assert torch.equal(big.clip.visual.conv1.weight, src.clip.visual.conv1.weight)


def test_rn_attnpool_position_grid_is_resized() -> None:
    """A 224-px RN checkpoint at 320 px needs attnpool's position grid resized (open_clip only
    resizes the ViT one). Checked on a tiny RN CLIP: 64 px (2x2) -> 96 px (3x3)."""
    cfg = dict(embed_dim=32, vision_cfg=dict(layers=[1, 1, 1, 1], width=8, head_width=8),
               text_cfg=dict(context_length=77, width=32, heads=2, layers=1))
    small = bb.CLIP(**cfg | {"vision_cfg": cfg["vision_cfg"] | {"image_size": 64}})
    large = bb.CLIP(**cfg | {"vision_cfg": cfg["vision_cfg"] | {"image_size": 96}})
    bb._load_into(large, small.state_dict(), "test", "tiny-RN")
    pe = large.visual.attnpool.positional_embedding
    assert pe.shape == (10, 256)
    assert torch.equal(pe[0], small.visual.attnpool.positional_embedding[0])  # the pooled token's
    # the 77-token text context is cut to a shorter one (causal: first positions are unchanged)
    short = bb.CLIP(**cfg | {"vision_cfg": cfg["vision_cfg"] | {"image_size": 64},
                             "text_cfg": cfg["text_cfg"] | {"context_length": 20}})
    bb._load_into(short, small.state_dict(), "test", "tiny-RN")
    assert torch.equal(short.positional_embedding, small.positional_embedding[:20])


def test_missing_tag_fails_fast_with_help(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants as hf_constants

    # An empty HF cache and home: the weights cannot be anywhere, and nothing may be downloaded.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ClipWeightsError) as err:
        build_clip("RN50", "openai", 64)
    assert time.perf_counter() - t0 < 5.0  # at once, not after a network timeout
    msg = str(err.value)
    assert "RN50/openai" in msg and "backbone.pretrained=/path/to/checkpoint" in msg
    assert "HF_HUB_OFFLINE" in msg


def test_unknown_tag_lists_the_known_ones() -> None:
    with pytest.raises(ClipWeightsError, match="openai"):
        build_clip("RN50", "no-such-tag", 64)


def test_missing_and_corrupt_checkpoint_files(tmp_path) -> None:
    with pytest.raises(ClipWeightsError, match="no CLIP checkpoint file at"):
        build_clip("clip-tiny", str(tmp_path / "missing.pt"), 64)
    # a frozen small CLIP's name (ehin.pretrain_clip --freeze) says how to remake it
    with pytest.raises(ClipWeightsError, match=r"frozen small CLIP; remake it with `python -m ehin.pretrain_clip "
                                               rf"--set backbone.pretrained=synthetic:<its recipe> --freeze {tmp_path}`"):
        build_clip("clip-tiny", str(tmp_path / "clip-tiny-2195732df831-939486c5.pt"), 64)
    # a file under a frozen name is loaded only when its sha256 begins as the name says
    import hashlib

    frozen = tmp_path / "weights.pt"
    torch.save(build_clip("clip-tiny", None, 64).clip.state_dict(), frozen)
    sha = hashlib.sha256(frozen.read_bytes()).hexdigest()
    right = frozen.rename(tmp_path / f"clip-tiny-2195732df831-{sha[:8]}.pt")
    assert build_clip("clip-tiny", str(right), 64).arch == "clip-tiny"
    wrong = tmp_path / f"clip-tiny-2195732df831-{'0' * 8 if sha[:8] != '0' * 8 else '1' * 8}.pt"
    wrong.write_bytes(right.read_bytes())
    with pytest.raises(ClipWeightsError, match=f"frozen small CLIP whose sha256 begins {sha[:8]}, not"):
        build_clip("clip-tiny", str(wrong), 64)
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(ClipWeightsError, match="cannot read CLIP checkpoint"):
        build_clip("clip-tiny", str(bad), 64)
    # truncated zip archive (an interrupted copy)
    good = tmp_path / "good.pt"
    torch.save(build_clip("clip-tiny", None, 64).clip.state_dict(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ClipWeightsError, match="cannot read CLIP checkpoint"):
        build_clip("clip-tiny", str(cut), 64)
    # a readable checkpoint of another arch
    with pytest.raises(ClipWeightsError, match="does not fit arch 'clip-small'"):
        build_clip("clip-small", str(good), 64)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated, OpenAI files are TorchScript
def test_openai_style_torchscript_archive(tmp_path) -> None:
    """OpenAI's released .pt files are TorchScript archives: read with torch.jit.load (never
    torch.load with weights_only=False), non-weight buffers dropped, QuickGELU switched on."""
    src = build_clip("clip-tiny", None, 64)
    path = tmp_path / "openai-style.pt"
    torch.jit.save(torch.jit.script(src.clip), str(path))
    loaded = build_clip("clip-tiny", str(path), 64)
    assert loaded.quick_gelu and not src.quick_gelu
    for k, v in src.clip.state_dict().items():
        assert torch.equal(loaded.clip.state_dict()[k], v), k


def test_folding_the_batchnorms_keeps_the_outputs() -> None:
    """fold_batchnorms (inference): every BatchNorm of the RN trunk goes into its convolution and the
    dense features and the pooled embedding stay what they were, with BatchNorms far from identity."""
    torch.manual_seed(1)
    m = build_clip("clip-tiny-rn", None, 64)
    bns = [b for b in m.clip.visual.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    for b in bns:
        c = b.num_features
        b.running_mean.copy_(torch.randn(c) * 0.5)
        b.running_var.copy_(torch.rand(c) * 2 + 0.2)
        b.weight.data.copy_(torch.randn(c))
        b.bias.data.copy_(torch.randn(c))
    with pytest.raises(ValueError, match="eval"):
        m.fold_batchnorms()
    m.eval()
    img = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        dense, pooled = m.encode(img)
        assert m.fold_batchnorms() == len(bns) > 0
        dense2, pooled2 = m.encode(img)
    assert not any(isinstance(b, torch.nn.BatchNorm2d) for b in m.clip.visual.modules())
    assert torch.allclose(dense2, dense, rtol=1e-4, atol=1e-4 * dense.abs().max().item())
    assert torch.allclose(pooled2, pooled, rtol=1e-4, atol=1e-4 * pooled.abs().max().item())
    assert build_clip("clip-tiny", None, 64).eval().fold_batchnorms() == 0  # a ViT has none
