"""Contrastive pretraining of the project's small CLIP on synthetic image-caption pairs (METHOD §2).

Real CLIP weights cannot be downloaded here, and METHOD §9 found a from-scratch backbone useless for
the weak stage, so the synthetic profiles start from a small open_clip CLIP (`clip-tiny`,
`clip-small`, see ehin/clip_model.py) trained CLIP-style on pairs from
`ehin.data.synthetic.sample_caption_pairs`: single objects, masked scenes and stuff bands with
their descriptions ("big red circle", "sky").

    python -m ehin.pretrain_clip --profile smoke|synthetic [--force] [--threads 2] [--set backbone.pretrained=synthetic:scenes=cluttered]
    python -m ehin.pretrain_clip --profile gpu --workers 6 --freeze frozen   # the testbed's frozen CLIP, on a GPU

`synthetic:scenes=cluttered` draws the masked-scene pairs from the cluttered scene recipe (TESTBED
§2.2: a scorer for the scenes it will score), `scene_on_black` the share of them masked to the kept
object alone, `captions=referring` words them as the benchmark's referring expressions (location
words, relations) instead of appearance words alone; see reports/testbed/README.md for what each does
to the §2.2 figures.

Recipe: symmetric InfoNCE with a learnable logit scale (CLIP), AdamW, one-cycle schedule (linear
warm-up, cosine decay), horizontal flips (a flipped image's caption swaps left and right). Pairs come from a seed
stream of their own (`CLIP_STREAM`), never the benchmark's dataset seeds or splits.

Captions repeat within a batch ("red circle" twice) and are partial: an image captioned "big red
circle" is also truly "red circle", "circle" and "red one". Texts are deduplicated per batch, and a
text that does not contradict an image's caption is not used as a negative for it (it may well be
true); only contradicting texts are negatives. Without this a batch of 128 holds several true
captions per image that the loss pushes away: measured at smoke size, 97 % of top-1 held-out
captions were consistent with the image with it vs 74 % without (retrieval of complete
descriptions 39 vs 42 %, within run-to-run noise).

The checkpoint is cached under `cache_dir()/clip/<arch>-<hash>.pt`, the hash covering the recipe,
the model config and a fingerprint of the pair generator, written atomically under a file lock:
`ensure_pretrained(arch, image_size)` returns at once when it exists, and parallel processes never
train twice or read a half-written file.

On a GPU the run is deterministic (fp32, deterministic kernels), so the same recipe on the same GPU model
and software gives the same weights; `--freeze DIR` writes them (and the recipe) to a file named by its
sha256, which is what the testbed loads (TESTBED §3): a lost file is remade, not carried.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from tqdm import tqdm

import ehin  # noqa: F401
from ehin import numerics
from ehin.clip_model import CUSTOM_ARCHS, ClipBackbone, untrained_clip
from ehin.cli import UserError, command
from ehin.config import CACHE_NOTE, DEFAULT_PROFILE, SCENE_RECIPES, cache_dir, clip_spec, load_config
from ehin.training_log import TrainingLog

__all__ = ["CLIP_STREAM", "RECIPES", "PretrainRecipe", "caption_relation", "checkpoint_path",
           "contrastive_loss", "ensure_pretrained", "freeze", "pretrain", "read_report", "recipe_for",
           "retrieval_metrics", "main"]

# First entropy word of every numpy stream used here. The benchmark's datasets seed
# default_rng([seed, variant, group, index]) with small seeds, so the two never meet (METHOD §2).
CLIP_STREAM = 0x5EED_C11F
RECIPE_VERSION = 1  # bump when the training code changes what a recipe produces

TRAIN_CALLS = 0  # how many times `pretrain` actually ran in this process (tests read it)


@dataclass(frozen=True)
class PretrainRecipe:
    arch: str
    image_size: int
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.1
    warmup: float = 0.05      # fraction of steps of linear warm-up (one-cycle)
    n_train: int = 8000       # pairs in the training pool (re-used over epochs, flipped)
    n_heldout: int = 2000     # pairs for the retrieval report
    seed: int = 0             # second word of the seed stream
    ignore_compatible: bool = True  # texts that may be true of an image are not its negatives
    object_on_black: float = 0.0  # share of single-object pairs masked to the object (sample_caption_pairs)
    # scene recipe of the masked-scene pairs (sample_caption_pairs): "simple", or "cluttered" for a
    # scorer of the cluttered benchmark scenes (TESTBED §2.2); drawn from CLIP_STREAM like every pair
    scenes: str = "simple"
    scene_on_black: float = 0.6  # scenes=cluttered: share of its masked-scene pairs masked to the object alone
    captions: str = "appearance"  # scenes=cluttered: "referring" words those pairs as the benchmark's expressions
    version: int = RECIPE_VERSION


# Sized for 2 CPU cores. Measured with 2 threads pinned to 2 cores of a Xeon: clip-tiny 90 s
# (11 s making pairs, 130 ms/step), clip-small 279 s (182 ms/step). Held-out retrieval of complete
# descriptions: 43 % / 53 % among 129 (chance 0.8 %); colour ~99 %, size 80-90 %, shape 20-34 %
# right. Retrieval still rises at the end: shape is learned last (METHOD §9), steps buy it.
RECIPES: dict[str, PretrainRecipe] = {
    "clip-tiny": PretrainRecipe("clip-tiny", 64, steps=600, batch_size=128, lr=2e-3, n_train=8000),
    "clip-small": PretrainRecipe("clip-small", 64, steps=1400, batch_size=128, lr=2e-3, n_train=16000),
    "clip-tiny-rn": PretrainRecipe("clip-tiny-rn", 64, steps=600, batch_size=128, lr=2e-3, n_train=8000),
}


def synthetic_overrides(pretrained: Any) -> dict[str, Any] | None:
    """Recipe overrides named by a `pretrained` value: "synthetic" -> {}, "synthetic:steps=3000" ->
    {"steps": 3000}; None when the value names no synthetic CLIP. Lets a profile ask for a longer
    pretraining than the CI-sized default without a new architecture name."""
    text = str(pretrained) if pretrained is not None else ""
    if text != "synthetic" and not text.startswith("synthetic:"):
        return None
    out: dict[str, Any] = {}
    fields = {f.name: f.type for f in PretrainRecipe.__dataclass_fields__.values()}
    for item in filter(None, text.partition(":")[2].split(",")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in fields or key in ("arch", "image_size", "version"):
            raise UserError(f"bad synthetic CLIP spec {text!r}: expected synthetic:key=value,... with keys "
                            f"from {', '.join(k for k in fields if k not in ('arch', 'image_size', 'version'))}")
        kind = {"int": int, "float": float, "bool": lambda v: v.strip().lower() in ("1", "true", "yes")}
        out[key] = kind.get(str(fields[key]), str)(value.strip())
    return out


def recipe_for(arch: str, image_size: int, **overrides: Any) -> PretrainRecipe:
    if arch not in RECIPES:
        raise UserError(
            f"no synthetic pretraining recipe for '{arch}' (have: {', '.join(RECIPES)}); for open_clip "
            f"models use an open_clip tag or a local checkpoint as backbone.pretrained"
        )
    recipe = replace(RECIPES[arch], image_size=int(image_size), **overrides)
    if recipe.scenes not in SCENE_RECIPES:
        raise UserError(f"unknown scene recipe {recipe.scenes!r} for the small CLIP's pairs "
                        f"(choose from {', '.join(SCENE_RECIPES)})")
    from ehin.data.synthetic import CAPTION_KINDS

    if recipe.captions not in CAPTION_KINDS:
        raise UserError(f"unknown caption kind {recipe.captions!r} for the small CLIP's pairs "
                        f"(choose from {', '.join(CAPTION_KINDS)})")
    if recipe.captions != "appearance" and recipe.scenes != "cluttered":
        raise UserError("synthetic:captions=referring words the cluttered pairs: give scenes=cluttered with it")
    return recipe


def _generator_fingerprint(size: int, scenes: str = "simple") -> str:
    """Hash of a few pairs from a fixed stream: changes when the pair distribution changes. Other scene
    recipes than the default draw enough pairs to meet some of their masked scenes."""
    from ehin.data.synthetic import sample_caption_pairs

    if scenes == "simple":  # the call as it was before `scenes` existed: the default hash stays
        images, captions = sample_caption_pairs(np.random.default_rng([CLIP_STREAM, 999]), size, 8)
    else:
        images, captions = sample_caption_pairs(np.random.default_rng([CLIP_STREAM, 999]), size, 16, scenes=scenes)
        # (scene_on_black is in the recipe fields the hash covers)
    h = hashlib.sha1(images.tobytes())
    h.update("\n".join(captions).encode())
    return h.hexdigest()[:12]


# Fields added after RECIPE_VERSION 1 leave the hash alone at their default (which reproduces the
# older recipe exactly), so that existing caches stay valid.
_HASH_DEFAULTS = {"object_on_black": 0.0, "scenes": "simple", "scene_on_black": 0.6, "captions": "appearance"}


def _recipe_hash(recipe: PretrainRecipe) -> str:
    fields = {k: v for k, v in asdict(recipe).items() if not (k in _HASH_DEFAULTS and v == _HASH_DEFAULTS[k])}
    blob = json.dumps(
        dict(recipe=fields, model=CUSTOM_ARCHS.get(recipe.arch), data=_generator_fingerprint(recipe.image_size, recipe.scenes)),
        sort_keys=True,
    ).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


def checkpoint_path(recipe: PretrainRecipe) -> Path:
    # Portable numerics give other floats than native ones: their checkpoints never mix (ehin/numerics.py).
    suffix = "-portable" if numerics.mode() == "portable" else ""
    return cache_dir() / "clip" / f"{recipe.arch}-{_recipe_hash(recipe)}{suffix}.pt"


# ---- captions -------------------------------------------------------------------------------------

_SLOTS = ("kind", "colour", "size", "shape")


@lru_cache(maxsize=1)
def _vocabulary() -> dict[str, tuple[int, int]]:
    """word -> (slot index, value index), from the synthetic generator's vocabulary. Every caption
    also gets a kind (thing or stuff): a stuff word never describes the region a thing word does."""
    from ehin.data import synthetic as syn

    vocab: dict[str, tuple[int, int]] = {}
    for slot, words in (("colour", syn.COLOURS), ("size", syn.SIZES), ("shape", tuple(syn.SHAPES) + tuple(syn.STUFF))):
        for v, w in enumerate(words):
            vocab[w] = (_SLOTS.index(slot), v)
    return vocab


@lru_cache(maxsize=4096)
def _codes(caption: str) -> tuple[int, ...] | None:
    """'big red circle' -> (thing, red, big, circle) as value indices, -1 where the caption says
    nothing ('red one' has no shape). None for words outside the vocabulary."""
    from ehin.data.synthetic import STUFF

    vocab = _vocabulary()
    code = [-1] * len(_SLOTS)
    for w in caption.split():
        if w == "one":
            continue
        if w not in vocab or code[vocab[w][0]] != -1:
            return None
        slot, value = vocab[w]
        code[slot] = value
    code[0] = 1 if any(w in STUFF for w in caption.split()) else 0
    return tuple(code)


_MIRROR = {"left": "right", "right": "left"}


def mirrored(caption: str) -> str:
    """The caption of the horizontally flipped image: 'left' and 'right' swapped, word for word."""
    return " ".join(_MIRROR.get(w, w) for w in caption.split())


def caption_relation(captions: Sequence[str], texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """For images captioned `captions` [B] and candidate `texts` [T]:
    (positive [B, T]: the same caption, negative [B, T]: the text contradicts the caption).
    Pairs that are neither (a text that may be true of the image: "circle" for an image captioned
    "red circle") are left out of the loss. A caption with unknown words falls back to CLIP's
    rule: every different caption is a negative."""
    pos = torch.tensor([[c == t for t in texts] for c in captions], dtype=torch.bool)
    cc, ct = [_codes(c) for c in captions], [_codes(t) for t in texts]
    a = torch.tensor([c if c is not None else (-1,) * len(_SLOTS) for c in cc])  # [B, S]
    b = torch.tensor([c if c is not None else (-1,) * len(_SLOTS) for c in ct])  # [T, S]
    known = (a[:, None] >= 0) & (b[None] >= 0)
    contra = (known & (a[:, None] != b[None])).any(-1)
    unknown = torch.tensor([c is None for c in cc])[:, None] | torch.tensor([c is None for c in ct])[None]
    neg = (contra | unknown) & ~pos
    return pos, neg


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                     pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over images [B, D] and deduplicated texts [T, D] (CLIP's loss with
    multi-positive targets: each text's positives are all images with that caption)."""
    logits = logit_scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()  # [B, T]
    masked = logits.masked_fill(~(pos | neg), float("-inf"))  # left-out pairs take no part
    # Rows without a positive are dropped (never the case in training) so that no softmax runs over
    # an all -inf row; masked_fill rather than `* pos`, since -inf * 0 is nan.
    # image -> text: one positive per image (texts are deduplicated)
    ri = pos.any(1)
    i2t = -masked[ri].log_softmax(1).masked_fill(~pos[ri], 0.0).sum(1).mean()
    # text -> image: every image with that caption is a positive, the target uniform over them
    rt = pos.any(0)
    lt = masked.t()[rt].log_softmax(1).masked_fill(~pos.t()[rt], 0.0)
    t2i = -(lt.sum(1) / pos.t()[rt].sum(1)).mean()
    return 0.5 * (i2t + t2i)


# ---- evaluation -----------------------------------------------------------------------------------

@torch.no_grad()
def _embed(model: ClipBackbone, images: torch.Tensor, captions: Sequence[str], batch: int = 500
           ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    dev = model.logit_scale.device
    img = torch.cat([model.encode_image(_to01(images[i:i + batch].to(dev))) for i in range(0, len(images), batch)])
    texts = sorted(set(captions))
    txt = torch.cat([model.encode_text(model.tokenize(texts[i:i + batch]).to(dev))[0] for i in range(0, len(texts), batch)])
    return F.normalize(img, dim=-1).cpu(), F.normalize(txt, dim=-1).cpu(), texts


def retrieval_metrics(model: ClipBackbone, images: torch.Tensor, captions: Sequence[str]) -> dict[str, float]:
    """Zero-shot image->text retrieval on held-out pairs, in percent, with chance levels.

    - `exact`: among all distinct held-out captions, the top one is the image's own caption. Captions
      are partial ("circle" for a big red circle), so several are true and 100 is not reachable.
    - `full`: images captioned with a complete description (colour, size and shape, or a stuff
      word), among the distinct complete descriptions: exactly one candidate is true.
    - `consistent`: the top caption does not contradict the image's own caption.
    - `full_colour` / `full_size` / `full_shape`: how often the top complete description of a thing
      gets that attribute right.
    """
    was_training = model.training
    model.eval()
    img, txt, texts = _embed(model, images, captions)
    model.train(was_training)
    sim = img @ txt.t()
    gold = torch.tensor([texts.index(c) for c in captions])
    top = sim.argmax(1)
    pos, neg = caption_relation(captions, texts)
    out = dict(exact=100.0 * (top == gold).float().mean().item(), exact_chance=100.0 / len(texts),
               n_captions=len(texts), n_images=len(captions),
               consistent=100.0 * (~neg[torch.arange(len(top)), top]).float().mean().item(),
               consistent_chance=100.0 * (~neg).float().mean().item())
    # complete: a thing with colour, size and shape known, or a stuff word
    full = [i for i, t in enumerate(texts) if (c := _codes(t)) is not None and (c[0] == 1 or min(c) >= 0)]
    rows = [i for i, c in enumerate(captions) if texts.index(c) in full]
    if rows and full:
        sub = sim[rows][:, full]
        gold_full = torch.tensor([full.index(texts.index(captions[i])) for i in rows])
        top_full = sub.argmax(1)
        out |= dict(full=100.0 * (top_full == gold_full).float().mean().item(),
                    full_chance=100.0 / len(full), n_full_captions=len(full), n_full_images=len(rows))
        # which attribute the top complete description gets right (things only)
        codes = torch.tensor([_codes(texts[i]) for i in full])
        got, want = codes[top_full], codes[gold_full]
        thing = want[:, 0] == 0
        for k, slot in enumerate(_SLOTS[1:], start=1):
            out[f"full_{slot}"] = 100.0 * (got[thing, k] == want[thing, k]).float().mean().item()
    return out


# ---- training -------------------------------------------------------------------------------------

def _to01(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> float [B, 3, S, S] in [0, 1] (the backbone normalises)."""
    return images_u8.permute(0, 3, 1, 2).float().div_(255.0)


def _pair_chunk(args: tuple[int, int, int, int, int, float, str, float, str]) -> tuple[np.ndarray, list[str]]:
    from ehin.data.synthetic import sample_caption_pairs

    seed, part, index, size, n, object_on_black, scenes, scene_on_black, captions = args
    return sample_caption_pairs(np.random.default_rng([CLIP_STREAM, seed, part, index]), size, n, object_on_black,
                                scenes=scenes, scene_on_black=scene_on_black, captions=captions)


def _pairs(recipe: PretrainRecipe, part: int, n: int, desc: str, progress: bool,
           workers: int = 1) -> tuple[torch.Tensor, list[str]]:
    """n pairs as uint8 [n, S, S, 3] and captions; chunk k comes from stream [CLIP_STREAM, seed, part, k],
    so the pairs are the same bytes however many processes draw them.
    Serial by default: worker processes need fork, unsafe under torch's and OpenCV's thread pools, or
    spawn, which re-imports the caller's __main__; only this module's command (guarded) asks for
    `workers` > 1 (a 16-core GPU host draws the 18,000 pairs of the gpu profile's recipe in seconds)."""
    chunk = 500
    jobs = [(recipe.seed, part, k, recipe.image_size, min(chunk, n - k * chunk), recipe.object_on_black, recipe.scenes,
             recipe.scene_on_black, recipe.captions)
            for k in range(math.ceil(n / chunk))]
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            results = list(tqdm(pool.imap(_pair_chunk, jobs), total=len(jobs), desc=desc, disable=not progress, leave=False))
    else:
        results = [_pair_chunk(j) for j in tqdm(jobs, desc=desc, disable=not progress, leave=False)]
    return torch.from_numpy(np.concatenate([r[0] for r in results])), [c for r in results for c in r[1]]


def _batches(recipe: PretrainRecipe, n: int):
    """Endless index batches: epochs over the pool, each in a fresh random order."""
    rng = np.random.default_rng([CLIP_STREAM, recipe.seed, 3])
    order, cursor = rng.permutation(n), 0
    while True:
        if cursor + recipe.batch_size > n:
            order, cursor = rng.permutation(n), 0
        yield order[cursor:cursor + recipe.batch_size]
        cursor += recipe.batch_size


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # CLIP's recipe: no decay on gains, biases, embeddings and the logit scale.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("class_embedding"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def _one_cycle(step: int, total: int, warmup: float) -> float:
    w = max(1, int(round(warmup * total)))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, total - w)))


def pretrain(recipe: PretrainRecipe, *, progress: bool = True, eval_every: int = 0,
             log_dir: str | Path | None = None, workers: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train the small CLIP of `recipe` from scratch; (open_clip state dict, report).
    With eval_every > 0 the report holds a retrieval curve on 500 held-out pairs (not timed).
    `log_dir`: TensorBoard curves there (loss, temperature, lr every 10 steps; retrieval at the end).
    `workers`: processes drawing the pairs (see `_pairs`)."""
    global TRAIN_CALLS
    TRAIN_CALLS += 1
    # The caller's global torch RNG is left as it was: a run must not depend on a cold or warm cache.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.default_rng([CLIP_STREAM, recipe.seed, 2]).integers(2**31)))
        with _deterministic_cuda():
            return _pretrain(recipe, progress, eval_every, log_dir, workers)


@contextmanager
def _deterministic_cuda():
    """On a GPU: deterministic kernels in fp32 (no TF32), so that the same recipe on the same GPU model
    and software gives the same bytes every time (TESTBED §3: the frozen small CLIP must be remade
    exactly when its file is lost; a native-CPU run is not, ehin/numerics.py). Settings restored after."""
    if not torch.cuda.is_available():
        yield
        return
    # cuBLAS reads this when its handle is made: before this process's first matmul on the GPU
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    # warn_only: an op without a deterministic kernel warns (in the log) rather than stopping a run; two
    # runs' sha256 say whether the bytes repeat (reports/h200_session.sh remade it in two sittings)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
         torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = saved[2:]


def _pretrain(recipe: PretrainRecipe, progress: bool, eval_every: int,
              log_dir: str | Path | None = None, workers: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    t0 = time.perf_counter()
    train_imgs, train_caps = _pairs(recipe, 0, recipe.n_train, "pairs (train)", progress, workers)
    held_imgs, held_caps = _pairs(recipe, 1, recipe.n_heldout, "pairs (held-out)", progress, workers)
    t_data = time.perf_counter() - t0

    # A GPU when there is one (the pairs stay on the host, a batch moves per step); the cache key does
    # not name the device, as it does not name the thread count: both change only the rounding.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = untrained_clip(recipe.arch, recipe.image_size).to(device).train()
    opt = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _one_cycle(s, recipe.steps, recipe.warmup))
    batches = _batches(recipe, len(train_caps))
    order_rng = np.random.default_rng([CLIP_STREAM, recipe.seed, 4])
    tokens_of: dict[str, torch.Tensor] = {}
    bar = tqdm(range(recipe.steps), desc=f"pretrain {recipe.arch}", disable=not progress)
    log = TrainingLog(log_dir, fresh=True, jsonl=False, tb="") if log_dir is not None else None
    loss_ema = None
    curve: list[dict] = []
    t_curve = 0.0
    for step in bar:
        idx = torch.from_numpy(next(batches))
        images = _to01(train_imgs[idx].to(device))
        flip = torch.from_numpy(order_rng.random(len(idx)) < 0.5).to(device)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        # a flipped image's caption says left for right (referring captions; appearance ones never do)
        caps = [mirrored(train_caps[i]) if f else train_caps[i] for i, f in zip(idx.tolist(), flip.tolist())]
        texts = sorted(set(caps))  # dedupe: identical captions are one text with several images
        for t in texts:
            if t not in tokens_of:
                tokens_of[t] = model.tokenize([t])[0]
        pos, neg = (m.to(device) for m in caption_relation(caps, texts))
        if not recipe.ignore_compatible:  # plain CLIP (deduplicated): every other caption is negative
            neg = ~pos
        img_emb = model.encode_image(images)
        txt_emb = model.encode_text(torch.stack([tokens_of[t] for t in texts]).to(device))[0]
        loss = contrastive_loss(img_emb, txt_emb, model.logit_scale.exp(), pos, neg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if step % 10 == 0 or step == recipe.steps - 1:
            bar.set_postfix(loss=f"{loss_ema:.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
            if log is not None:
                log.scalars({"loss/contrastive": loss_ema, "train/logit_scale": model.logit_scale.exp().item(),
                             "lr/lr": sched.get_last_lr()[0]}, step + 1)
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == recipe.steps):
            t_eval = time.perf_counter()
            m = retrieval_metrics(model, held_imgs[:500], held_caps[:500])
            curve.append(dict(step=step + 1, loss=round(loss_ema, 4), full=round(m.get("full", float("nan")), 1),
                              shape=round(m.get("full_shape", float("nan")), 1),
                              exact=round(m["exact"], 1), consistent=round(m["consistent"], 1)))
            t_curve += time.perf_counter() - t_eval  # keep evaluation out of the training time
    t_train = time.perf_counter() - t0 - t_data - t_curve
    metrics = retrieval_metrics(model.eval(), held_imgs, held_caps)
    if log is not None:
        log.scalars({f"heldout/{k}": v for k, v in metrics.items()}, recipe.steps)
        log.close()
    report = dict(metrics=metrics, final_loss=loss_ema, seconds_data=round(t_data, 1),
                  seconds_train=round(t_train, 1), seconds_total=round(time.perf_counter() - t0, 1),
                  threads=torch.get_num_threads(), device=device.type, sec_per_step=round(t_train / recipe.steps, 4),
                  torch=torch.__version__, numerics=numerics.mode() if device.type == "cpu" else "deterministic",
                  gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    if curve:
        report["curve"] = curve
    return {k: v.cpu() for k, v in model.clip.state_dict().items()}, report


def ensure_pretrained(arch: str, image_size: int, *, force: bool = False, progress: bool = True,
                      workers: int = 1, **overrides: Any) -> Path:
    """Path of the pretrained small CLIP for (arch, image_size), training it on first use.

    `overrides` change recipe fields (steps, batch_size, ...; tests use tiny runs); they enter the
    hash, so they never mix with the default checkpoint. `workers`: see `_pairs`."""
    recipe = recipe_for(arch, image_size, **overrides)
    path = checkpoint_path(recipe)
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists() and not force:  # another process finished it while we waited
            return path
        state, report = pretrain(recipe, progress=progress, log_dir=path.with_suffix(".tb"), workers=workers)
        payload = dict(state_dict=state, arch=arch, image_size=recipe.image_size, quick_gelu=False,
                       recipe=asdict(recipe), report=json.loads(json.dumps(report)))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save(payload, tmp)
            path.with_suffix(".json").write_text(json.dumps(dict(recipe=asdict(recipe), **report), indent=2))
            os.replace(tmp, path)  # atomic: readers see no file or the whole file
        finally:
            tmp.unlink(missing_ok=True)
    return path


def read_report(path: str | Path) -> dict[str, Any]:
    """The training report stored next to a checkpoint made by `ensure_pretrained`."""
    return json.loads(Path(path).with_suffix(".json").read_text())


def freeze(path: str | Path, dest: str | Path) -> Path:
    """Copy a cached checkpoint to `dest`/<its name>-<sha256[:8]>.pt, with its report beside it, as a file
    whose bytes are those of its weights and recipe alone (the cache file also holds the run's timings,
    and torch.save names a file's archive after the file): equal weights give equal sha256 (TESTBED §3).
    Returns the new path; an existing file of that name is left as it is (it holds the same bytes)."""
    import io

    payload = torch.load(path, map_location="cpu", weights_only=True)
    buffer = io.BytesIO()  # a buffer, not a path: the archive's name is then fixed
    torch.save({k: payload[k] for k in ("state_dict", "arch", "image_size", "quick_gelu", "recipe")}, buffer)
    blob = buffer.getvalue()
    out = Path(dest) / f"{Path(path).stem}-{hashlib.sha256(blob).hexdigest()[:8]}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.with_suffix(".json").write_text(Path(path).with_suffix(".json").read_text())
        out.write_bytes(blob)
    return out


@command
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ehin.pretrain_clip", description=__doc__.split("\n\n")[0],
                                 epilog=CACHE_NOTE)
    ap.add_argument("--profile", default=DEFAULT_PROFILE,
                    help=f"the config profile whose backbone (arch, image size, recipe) is pretrained (default: {DEFAULT_PROFILE})")
    ap.add_argument("--force", action="store_true", help="retrain even if the cached checkpoint exists")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the profile's train.threads)")
    ap.add_argument("--steps", type=int, default=None,
                    help="override the recipe's steps (changes the hash; default: the recipe's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. backbone.pretrained=synthetic:scenes=cluttered")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes drawing the training pairs (the same pairs for any number; default 1)")
    ap.add_argument("--freeze", metavar="DIR", default=None,
                    help="also write the checkpoint to DIR/<name>-<sha256[:8]>.pt, bytes of its weights and "
                         "recipe alone (the testbed loads such a file: TESTBED §3, reports/testbed/README.md)")
    args = ap.parse_args(argv)
    cfg = load_config(profile=args.profile, overrides=args.overrides)
    arch, pretrained, size = clip_spec(cfg, "backbone")
    threads = args.threads or cfg["train"]["threads"]
    if threads:
        torch.set_num_threads(threads)
    overrides = synthetic_overrides(pretrained)  # the profile's recipe changes
    if overrides is None:  # a checkpoint file (the testbed's frozen/ one, TESTBED §3): nothing to pretrain
        raise UserError(f"backbone.pretrained is {pretrained!r}, not a synthetic recipe: nothing to pretrain "
                        "(to pretrain a recipe, --set backbone.pretrained=synthetic:key=value,...)")
    if args.steps is not None:
        overrides["steps"] = args.steps
    t0 = time.perf_counter()
    path = ensure_pretrained(arch, size, force=args.force, workers=args.workers, **overrides)
    report = read_report(path)
    m = report["metrics"]
    print(f"{arch} @ {size}px: {path} (this call {time.perf_counter() - t0:.1f}s; "
          f"training took {report['seconds_total']}s on {report['threads']} threads, "
          f"{report['sec_per_step'] * 1000:.0f} ms/step)")
    print(f"held-out image->text retrieval: exact {m['exact']:.1f}% among {m['n_captions']} captions "
          f"(chance {m['exact_chance']:.1f}%), consistent {m['consistent']:.1f}% (chance {m['consistent_chance']:.1f}%), "
          f"full descriptions {m.get('full', float('nan')):.1f}% among {m.get('n_full_captions', 0)} "
          f"(chance {m.get('full_chance', float('nan')):.1f}%); of those, colour {m.get('full_colour', float('nan')):.0f}%, "
          f"size {m.get('full_size', float('nan')):.0f}%, shape {m.get('full_shape', float('nan')):.0f}% right")
    if args.freeze:
        frozen = freeze(path, args.freeze)
        print(f"frozen: {frozen} sha256 {hashlib.sha256(frozen.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
