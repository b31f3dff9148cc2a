"""ehin.pretrain_clip: the contrastive loss with repeated/partial captions, the checkpoint cache (hash,
lock, atomic write, no retraining), and that a short run learns far above chance."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import ehin.pretrain_clip as pc
from ehin.backbones import build_clip

# 80 steps of 64 on 1,200 pairs: ~10 s on one busy core, and far above chance (see test below).
SHORT = dict(steps=80, batch_size=64, lr=3e-3, warmup=0.1, n_train=1200, n_heldout=400)
TINY = dict(steps=2, batch_size=16, n_train=64, n_heldout=32)  # for cache mechanics only


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> tuple[Path, Path]:
    """(cache dir, checkpoint) of one short pretraining run shared by the tests below."""
    cache = tmp_path_factory.mktemp("ehin-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("EHIN_CACHE", str(cache))
    torch.set_num_threads(1)
    calls = pc.TRAIN_CALLS
    path = pc.ensure_pretrained("clip-tiny", 64, progress=False, **SHORT)
    assert pc.TRAIN_CALLS == calls + 1
    yield cache, path
    mp.undo()


def test_checkpoint_is_cached_by_hash(short_run, monkeypatch) -> None:
    cache, path = short_run
    monkeypatch.setenv("EHIN_CACHE", str(cache))
    assert path.parent == cache / "clip" and path.name.startswith("clip-tiny-") and path.suffix == ".pt"
    assert path.with_suffix(".json").is_file()
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write left nothing behind
    mtime, calls = path.stat().st_mtime_ns, pc.TRAIN_CALLS
    # second call: same file, no training (counter and mtime unchanged)
    assert pc.ensure_pretrained("clip-tiny", 64, progress=False, **SHORT) == path
    assert pc.TRAIN_CALLS == calls and path.stat().st_mtime_ns == mtime
    # any change of the recipe or input size is another checkpoint
    assert pc.checkpoint_path(pc.recipe_for("clip-tiny", 64, **(SHORT | {"steps": 81}))) != path
    assert pc.checkpoint_path(pc.recipe_for("clip-tiny", 96, **SHORT)) != path


def test_build_clip_synthetic_loads_the_cached_checkpoint(short_run, monkeypatch) -> None:
    cache, path = short_run
    monkeypatch.setenv("EHIN_CACHE", str(cache))
    monkeypatch.setitem(pc.RECIPES, "clip-tiny", replace(pc.RECIPES["clip-tiny"], **SHORT))
    calls = pc.TRAIN_CALLS
    model = build_clip("clip-tiny", "synthetic", 64)
    assert pc.TRAIN_CALLS == calls  # loaded, not retrained
    saved = torch.load(path, weights_only=True)
    assert saved["arch"] == "clip-tiny" and saved["recipe"]["steps"] == SHORT["steps"]
    for k, v in saved["state_dict"].items():
        assert torch.equal(model.clip.state_dict()[k], v), k
    # the same checkpoint named by its recipe fields instead of a patched default recipe
    monkeypatch.setitem(pc.RECIPES, "clip-tiny", pc.RECIPES["clip-tiny"].__class__(**{
        **{f: getattr(pc.RECIPES["clip-tiny"], f) for f in pc.PretrainRecipe.__dataclass_fields__}, "steps": 1}))
    spec = "synthetic:" + ",".join(f"{k}={v}" for k, v in SHORT.items())
    named = build_clip("clip-tiny", spec, 64)
    assert pc.TRAIN_CALLS == calls
    assert all(torch.equal(named.clip.state_dict()[k], v) for k, v in saved["state_dict"].items())


def test_short_run_retrieves_far_above_chance(short_run) -> None:
    _, path = short_run
    m = pc.read_report(path)["metrics"]
    # Measured: exact 10.2 % (chance 0.6 %), complete descriptions 25 % (chance 1.3 %), consistent
    # 43 % (chance 9.5 %). Asserted with margin for other thread counts / torch builds.
    assert m["n_captions"] > 100 and m["exact_chance"] < 1.0
    assert m["exact"] >= 5 * m["exact_chance"]
    assert m["full"] >= 5 * m["full_chance"]
    assert m["consistent"] >= m["consistent_chance"] + 15


def test_pretraining_writes_tensorboard_curves(short_run) -> None:
    from tests.test_training_log import read_scalars

    _, path = short_run
    tb = read_scalars(path.with_suffix(".tb"))
    loss = [v for _, v in tb["loss/contrastive"]]
    assert len(loss) >= 2 and loss[-1] < loss[0]  # the curve of a run that learns
    assert pc.read_report(path)["metrics"]["exact"] == pytest.approx(tb["heldout/exact"][-1][1])


def test_report_metrics_match_the_saved_weights(short_run) -> None:
    """The numbers in the report are those of the weights in the file (recomputed here)."""
    _, path = short_run
    model = build_clip("clip-tiny", str(path), 64).eval()
    recipe = pc.recipe_for("clip-tiny", 64, **SHORT)
    images, captions = pc._pairs(recipe, 1, recipe.n_heldout, "", False)
    again = pc.retrieval_metrics(model, images, captions)
    saved = pc.read_report(path)["metrics"]
    for key in ("exact", "full", "consistent"):
        assert again[key] == pytest.approx(saved[key], abs=0.5), key


def test_pretraining_leaves_the_callers_rng_alone(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EHIN_CACHE", str(tmp_path))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    pc.ensure_pretrained("clip-tiny", 64, progress=False, **TINY)  # cold cache: trains
    assert torch.equal(torch.rand(3), expected)


def test_parallel_processes_train_once(tmp_path) -> None:
    """Two processes ask for the same missing checkpoint at the same moment: one trains, the other
    waits on the lock and loads the finished file."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        import torch
        torch.set_num_threads(1)
        import ehin.pretrain_clip as pc
        me, other = Path(sys.argv[1]), Path(sys.argv[2])
        me.touch()
        while not other.exists():  # start together
            time.sleep(0.01)
        path = pc.ensure_pretrained("clip-tiny", 64, progress=False, **{TINY!r})
        print(pc.TRAIN_CALLS, path)
        """
    )
    env = dict(os.environ, EHIN_CACHE=str(tmp_path / "cache"))
    a, b = tmp_path / "a", tmp_path / "b"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(x), str(y)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for x, y in ((a, b), (b, a))]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [o[0].split() for o in outs]
    assert sorted(int(r[0]) for r in results) == [0, 1]  # exactly one of them trained
    assert results[0][1] == results[1][1]
    files = sorted(p.name for p in (tmp_path / "cache" / "clip").iterdir() if not p.name.endswith(".lock"))
    # no tmp files: the report, the checkpoint and its TensorBoard curves
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "pt", "tb"]


def test_unknown_arch_has_no_recipe() -> None:
    with pytest.raises(ValueError, match="no synthetic pretraining recipe for 'RN50'"):
        pc.ensure_pretrained("RN50", 64)


def test_a_profile_that_loads_a_checkpoint_file_has_nothing_to_pretrain(capsys) -> None:
    """The testbed's control loads a checkpoint file (TESTBED §3): the command says so instead of
    pretraining the default recipe under its name."""
    with pytest.raises(SystemExit) as exc:
        pc.main(["--profile", "gpu"])  # frozen since session 20: it names its file
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "frozen/clip-tiny-rn-2195732df831-939486c5.pt', not a synthetic recipe: nothing to pretrain" in err
    assert "--set backbone.pretrained=synthetic:" in err


# ---- captions and loss --------------------------------------------------------------------------

def test_caption_relation_by_hand() -> None:
    caps = ["big red circle", "red circle", "sky", "small blue square"]
    texts = ["big red circle", "circle", "red one", "small red circle", "sky", "grass", "blue square", "qwerty"]
    pos, neg = pc.caption_relation(caps, texts)
    # '+' positive, '-' negative, '.' left out (may be true of the image)
    want = [
        "+..----",  # big red circle: "circle"/"red one" are true too; "small red circle" contradicts
        "....---",  # red circle: its size is unknown, so "big/small red circle" may both be true
        "----+--",  # sky: only "sky"; another stuff word or any thing description contradicts
        "------.",  # small blue square: "blue square" is compatible
    ]
    for i, row in enumerate(want):
        got = "".join("+" if pos[i, j] else "-" if neg[i, j] else "." for j in range(len(texts) - 1))
        assert got == row, (caps[i], got)
    assert neg[:, -1].all()  # unknown words: CLIP's rule, every different caption is a negative


def test_loss_handles_repeated_and_compatible_captions() -> None:
    # Two images share the caption "red circle" (one text after deduplication), one is "blue square".
    caps = ["red circle", "blue square", "red circle"]
    texts = sorted(set(caps))  # ["blue square", "red circle"]
    pos, neg = pc.caption_relation(caps, texts)
    assert pos.sum().item() == 3 and neg.sum().item() == 3
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    good = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # each image on its caption
    scale = torch.tensor(100.0)
    low = pc.contrastive_loss(good, txt, scale, pos, neg)
    high = pc.contrastive_loss(good.flip(1), txt, scale, pos, neg)
    # "red circle" has two equally good positive images: text->image targets are uniform over both,
    # so its term bottoms out at log 2 (averaged over 2 texts and 2 directions: log(2) / 4) and the
    # repeated caption is never pushed away from either image; image->text is ~0.
    assert low.item() == pytest.approx(0.5 * 0.5 * torch.log(torch.tensor(2.0)).item(), abs=1e-3)
    assert high.item() > 40
    # a pair left out of the loss has no say in it: its logit gets no gradient
    caps2, texts2 = ["big red circle", "small blue star"], ["big red circle", "circle", "small blue star"]
    pos2, neg2 = pc.caption_relation(caps2, texts2)
    assert not pos2[0, 1] and not neg2[0, 1]
    img = torch.randn(2, 8, requires_grad=True)
    t = torch.randn(3, 8, requires_grad=True)
    pc.contrastive_loss(img, t, scale, pos2, neg2).backward()
    t2 = t.detach().clone()
    t2[1] = torch.randn(8)  # move "circle" anywhere: image 0's terms do not change
    loss_a = pc.contrastive_loss(img[:1].detach(), t.detach(), scale, pos2[:1], neg2[:1])
    loss_b = pc.contrastive_loss(img[:1].detach(), t2, scale, pos2[:1], neg2[:1])
    assert torch.isfinite(img.grad).all() and torch.isfinite(t.grad).all()
    assert loss_a.item() == pytest.approx(loss_b.item(), abs=1e-6)


def test_synthetic_spec_names_recipe_overrides():
    from ehin.pretrain_clip import synthetic_overrides

    assert synthetic_overrides("synthetic") == {}
    assert synthetic_overrides("synthetic:steps=3000") == {"steps": 3000}
    assert synthetic_overrides("synthetic:steps=10,lr=0.01") == {"steps": 10, "lr": 0.01}
    assert synthetic_overrides("openai") is None and synthetic_overrides(None) is None
    with pytest.raises(ValueError, match="bad synthetic CLIP spec"):
        synthetic_overrides("synthetic:arch=RN50")
    with pytest.raises(ValueError, match="bad synthetic CLIP spec"):
        synthetic_overrides("synthetic:stepz=3")


def test_object_on_black_enters_the_hash_only_when_set() -> None:
    base = pc.recipe_for("clip-tiny-rn", 32)
    assert pc.checkpoint_path(replace(base, object_on_black=0.0)) == pc.checkpoint_path(base)
    assert pc.checkpoint_path(replace(base, object_on_black=1.0)) != pc.checkpoint_path(base)
    assert pc.synthetic_overrides("synthetic:object_on_black=0.5") == {"object_on_black": 0.5}


# The cache keys of the default recipes as they were before `scenes` existed (and when these
# checkpoints were first cached): a field added later must leave them alone at its default.
DEFAULT_HASHES = {("clip-tiny", 64): "36de399e2cfb", ("clip-small", 64): "15d70e7d42f7",
                  ("clip-tiny-rn", 64): "a687f02ebe33", ("clip-tiny-rn", 96): "b32079f6d13c"}


@pytest.mark.parametrize("arch,size", sorted(DEFAULT_HASHES))
def test_default_cache_keys_are_unchanged(arch, size) -> None:
    assert pc._recipe_hash(pc.recipe_for(arch, size)) == DEFAULT_HASHES[arch, size]
    assert pc._recipe_hash(pc.recipe_for(arch, size, scenes="simple")) == DEFAULT_HASHES[arch, size]


def test_scenes_enter_the_hash_only_when_not_simple() -> None:
    base = pc.recipe_for("clip-tiny-rn", 64)
    assert base.scenes == "simple"
    cluttered = pc.recipe_for("clip-tiny-rn", 64, **pc.synthetic_overrides("synthetic:scenes=cluttered"))
    assert cluttered == replace(base, scenes="cluttered")
    assert pc._recipe_hash(cluttered) != pc._recipe_hash(base)
    # the cluttered pairs' own generator is fingerprinted (not only the default pairs')
    assert pc._generator_fingerprint(64, "cluttered") != pc._generator_fingerprint(64)
    with pytest.raises(ValueError, match="unknown scene recipe"):
        pc.recipe_for("clip-tiny-rn", 64, scenes="crowded")
    # scene_on_black enters only away from its default (0.6, the simple pairs' share)
    assert pc._recipe_hash(replace(cluttered, scene_on_black=0.6)) == pc._recipe_hash(cluttered)
    assert pc._recipe_hash(replace(cluttered, scene_on_black=1.0)) != pc._recipe_hash(cluttered)
    assert pc.synthetic_overrides("synthetic:scenes=cluttered,scene_on_black=1") == {
        "scenes": "cluttered", "scene_on_black": 1.0}


def test_cluttered_pairs_come_from_the_pretraining_stream() -> None:
    """`_pairs` draws chunk k from [CLIP_STREAM, seed, part, k] whatever the scene recipe: never a
    benchmark image (those come from [seed, variant, group, index(, recipe)] with small seeds)."""
    recipe = replace(pc.recipe_for("clip-tiny-rn", 64, scenes="cluttered"), n_train=40)
    images, captions = pc._pairs(recipe, 0, 40, "", False)
    from ehin.data.synthetic import sample_caption_pairs

    want, caps = sample_caption_pairs(np.random.default_rng([pc.CLIP_STREAM, 0, 0, 0]), 64, 40, scenes="cluttered")
    assert captions == caps and np.array_equal(images.numpy(), want)


def test_referring_captions_enter_the_hash_and_need_cluttered_scenes() -> None:
    cluttered = pc.recipe_for("clip-tiny-rn", 64, scenes="cluttered")
    referring = pc.recipe_for("clip-tiny-rn", 64, **pc.synthetic_overrides("synthetic:scenes=cluttered,captions=referring"))
    assert referring == replace(cluttered, captions="referring")
    assert pc._recipe_hash(replace(cluttered, captions="appearance")) == pc._recipe_hash(cluttered)
    assert pc._recipe_hash(referring) != pc._recipe_hash(cluttered)
    with pytest.raises(ValueError, match="needs|give scenes=cluttered"):
        pc.recipe_for("clip-tiny-rn", 64, captions="referring")
    with pytest.raises(ValueError, match="unknown caption kind"):
        pc.recipe_for("clip-tiny-rn", 64, scenes="cluttered", captions="poetic")


def test_a_flipped_image_gets_the_mirrored_caption() -> None:
    assert pc.mirrored("the red circle to the left of the big star") == "the red circle to the right of the big star"
    assert pc.mirrored("right") == "left" and pc.mirrored("top small one") == "top small one"
    assert pc.mirrored("big red circle") == "big red circle"  # appearance captions are unchanged


def test_pairs_are_the_same_bytes_from_worker_processes() -> None:
    """`workers` only spreads the chunks: each chunk has its own seed stream."""
    recipe = pc.recipe_for("clip-tiny", 64, n_train=1100)  # three chunks, the last one short
    serial = pc._pairs(recipe, 0, recipe.n_train, "", False)
    spread = pc._pairs(recipe, 0, recipe.n_train, "", False, workers=2)
    assert torch.equal(serial[0], spread[0]) and serial[1] == spread[1]


def test_a_frozen_checkpoint_is_named_and_hashed_by_its_weights(tmp_path, monkeypatch) -> None:
    """Training the same recipe again (other timings in the cache file) freezes to the same bytes, named
    with their sha256; other weights give another file; the frozen file loads as the cached one does."""
    from ehin.provenance import file_sha256

    monkeypatch.setenv("EHIN_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    path = pc.ensure_pretrained("clip-tiny", 64, progress=False, **TINY)
    first = pc.freeze(path, tmp_path / "a")
    pc.ensure_pretrained("clip-tiny", 64, progress=False, force=True, **TINY)  # same recipe, trained again
    second = pc.freeze(path, tmp_path / "b")
    assert first.name == second.name == f"{path.stem}-{file_sha256(first)[:8]}.pt"
    assert first.read_bytes() == second.read_bytes()
    assert first.with_suffix(".json").is_file()
    other = pc.freeze(pc.ensure_pretrained("clip-tiny", 64, progress=False, **(TINY | {"seed": 1})), tmp_path / "a")
    assert other.name != first.name
    cached, frozen = build_clip("clip-tiny", str(path), 64), build_clip("clip-tiny", str(first), 64)
    for (k, v), (k2, v2) in zip(cached.state_dict().items(), frozen.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
