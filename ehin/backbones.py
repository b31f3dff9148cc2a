"""CLIP backbones with their weights: `build_clip(arch, pretrained, image_size) -> ClipBackbone`.

The encoders themselves (`ClipBackbone`: dense visual features, per-token text features, CLIP's
normalisation; the small archs; the tokenizer, METHOD D1) are `ehin.clip_model`, re-exported here.
This module finds and loads the weights (METHOD §2). `pretrained` is None (random weights), an
open_clip tag (only from a local cache: nothing is downloaded), a local checkpoint path (open_clip,
OpenAI TorchScript or ehin format; other input sizes and context lengths are adapted), or "synthetic"
(the project's own contrastively pretrained small CLIP, `ehin.pretrain_clip.ensure_pretrained`).
"""
from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import ehin  # noqa: F401  (torchvision shim + HF offline before open_clip is imported)
import open_clip
from open_clip.convert import convert_state_dict
from open_clip.model import CLIP, resize_pos_embed

from ehin.checksums import file_sha256
from ehin.cli import UserError
# Re-exported: `ehin.backbones` is where callers get a CLIP from (build_clip returns a ClipBackbone).
from ehin.clip_model import (CONTEXT_LENGTH, CUSTOM_ARCHS, DENSE_MODES, ClipBackbone, attention_pool,  # noqa: F401
                             model_config, tokenize, untrained_clip)
from ehin.pretrain_clip import ensure_pretrained, synthetic_overrides

__all__ = [
    "CONTEXT_LENGTH",
    "CUSTOM_ARCHS",
    "DENSE_MODES",
    "ClipBackbone",
    "ClipWeightsError",
    "attention_pool",
    "build_clip",
    "tokenize",
]


class ClipWeightsError(RuntimeError, UserError):
    """CLIP weights that cannot be found, read or loaded; the message says what to do."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _tag_checkpoint(arch: str, tag: str) -> tuple[str, bool]:
    """Local file for an open_clip pretrained tag, and whether the tag wants QuickGELU.

    Offline (the default: `import ehin` sets HF_HUB_OFFLINE=1) only local caches are looked at, so a
    missing checkpoint fails at once instead of waiting on a network that is not there.
    """
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    quick_gelu = bool(cfg.get("quick_gelu", False))
    if "file" in cfg:
        return cfg["file"], quick_gelu
    if not _offline():  # the user turned downloads on (HF_HUB_OFFLINE=0): let open_clip fetch it
        return open_clip.download_pretrained(cfg), quick_gelu
    tried = []
    hf = cfg.get("hf_hub", "")
    if hf:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:  # pragma: no cover - open_clip depends on it
            hf_hub_download = None
        model_id, filename = os.path.split(hf)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            tried.append(f"HF cache {model_id}/{name}")
            if hf_hub_download is None:
                continue
            try:
                return hf_hub_download(model_id, name, local_files_only=True), quick_gelu
            except Exception:  # not cached (LocalEntryNotFoundError and friends)
                pass
    url = cfg.get("url", "")
    if url:
        local = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        tried.append(str(local))
        if local.is_file():
            return str(local), quick_gelu
    source = url or f"https://huggingface.co/{hf}"
    raise ClipWeightsError(
        f"open_clip weights {arch}/{tag} are not in any local cache (looked at: {'; '.join(tried)}) and "
        f"nothing is downloaded here (HF_HUB_OFFLINE=1). Supply a local checkpoint: download {source} on "
        f"a machine with internet and set backbone.pretrained=/path/to/checkpoint (open_clip or OpenAI "
        f"format; a 'state_dict' key and 'module.' prefixes are fine), or fill the Hugging Face cache "
        f"(HF_HOME), or set HF_HUB_OFFLINE=0 to let open_clip download it."
    )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("/constants.pkl") for name in z.namelist())


def _read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict in open_clip CLIP naming, metadata) from an open_clip, OpenAI-JIT or ehin file."""
    path = Path(path)
    if not path.is_file():
        raise ClipWeightsError(f"CLIP checkpoint not found: {path}")
    meta: dict[str, Any] = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj: Any = load_file(str(path), device="cpu")
        elif _is_torchscript(path):
            # OpenAI's released .pt files are TorchScript archives; their GELUs are QuickGELU.
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
            obj = {k: v for k, v in obj.items() if k not in ("input_resolution", "context_length", "vocab_size")}
            meta["quick_gelu"] = True
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise ClipWeightsError(f"cannot read CLIP checkpoint {path} (corrupt or not a torch file?): {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj:
        meta.update({k: v for k, v in obj.items() if k != "state_dict"})
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ClipWeightsError(f"CLIP checkpoint {path} does not hold a state dict of tensors")
    state = {}
    for k, v in obj.items():
        for prefix in ("module.", "clip."):  # DDP wrappers; ClipBackbone.state_dict()
            if k.startswith(prefix):
                k = k[len(prefix):]
        state[k] = v
    return state, meta


def _resize_grid(pe: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1 + g*g, C] class + grid positional embedding -> [1 + h*w, C] (bicubic, like open_clip)."""
    cls, img = pe[:1], pe[1:]
    g = int(math.isqrt(img.shape[0]))
    img = img.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=grid, mode="bicubic", antialias=True, align_corners=False)
    img = img.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pe.dtype)
    return torch.cat([cls, img], dim=0)


def _adapt_state_dict(state: dict[str, torch.Tensor], model: CLIP) -> dict[str, torch.Tensor]:
    """Fit a checkpoint trained at another input size / context length to `model`."""
    state = convert_state_dict(model, dict(state))
    # Non-persistent buffers (the text attn_mask) can appear in TorchScript exports: not weights.
    transient = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    state = {k: v for k, v in state.items() if k not in transient}
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    resize_pos_embed(state, model)  # ViT patch grid (open_clip's)
    key = "visual.attnpool.positional_embedding"  # RN attention pool: open_clip does not resize it
    if key in state and state[key].shape != model.visual.attnpool.positional_embedding.shape:
        n = int(math.isqrt(model.visual.attnpool.positional_embedding.shape[0] - 1))
        state[key] = _resize_grid(state[key], (n, n))
    pe = state.get("positional_embedding")
    if pe is not None and pe.shape[0] > model.context_length:
        # Causal text transformer: the first positions mean the same with a shorter context (D1).
        state["positional_embedding"] = pe[: model.context_length]
    return state


def _load_into(model: CLIP, state: dict[str, torch.Tensor], source: str, arch: str) -> None:
    state = _adapt_state_dict(state, model)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        parts = [f"missing keys: {few(missing)}" if missing else "",
                 f"unexpected keys: {few(unexpected)}" if unexpected else "",
                 f"shape mismatch: {few([f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}' for k in wrong])}"
                 if wrong else ""]
        raise ClipWeightsError(
            f"checkpoint {source} does not fit arch '{arch}' ({'; '.join(p for p in parts if p)}); "
            f"is backbone.arch the arch it was trained with?"
        )
    model.load_state_dict(state, strict=True)


def _is_synthetic(pretrained: str | os.PathLike) -> bool:
    """`pretrained` names the project's small CLIP by recipe ("synthetic" or "synthetic:<overrides>")."""
    return str(pretrained) == "synthetic" or str(pretrained).startswith("synthetic:")


def _frozen_name(arch: str, name: str) -> re.Match | None:
    """A frozen small CLIP's file name (ehin.pretrain_clip --freeze): <arch>-<recipe hash>-<sha256[:8]>.pt."""
    return re.fullmatch(rf"{re.escape(arch)}-[0-9a-f]{{12}}-([0-9a-f]{{8}})\.pt", name)


def weights_file(arch: str, pretrained: str | os.PathLike | None, image_size: int) -> tuple[str | None, bool]:
    """The local checkpoint file that `pretrained` names for (arch, image_size), and whether its tag
    wants QuickGELU: None for random weights; a "synthetic" small CLIP is pretrained on first use."""
    if pretrained is None:
        return None, False
    if _is_synthetic(pretrained):
        return str(ensure_pretrained(arch, int(image_size), **synthetic_overrides(pretrained))), False
    if arch not in CUSTOM_ARCHS and open_clip.get_pretrained_cfg(arch, str(pretrained)):
        return _tag_checkpoint(arch, str(pretrained))
    if Path(pretrained).expanduser().is_file():
        path = Path(pretrained).expanduser()
        frozen = _frozen_name(arch, path.name)
        if frozen:  # a frozen small CLIP is named by its sha256 (TESTBED §3: one checkpoint on every machine)
            sha = file_sha256(path)
            if not sha.startswith(frozen.group(1)):
                raise ClipWeightsError(f"backbone.pretrained {path}: a frozen small CLIP whose sha256 begins "
                                       f"{sha[:8]}, not {frozen.group(1)} as its name says: another file under its "
                                       "name (a changed or half-copied one); copy the frozen file again")
        return str(path), False
    p = str(pretrained)
    tags = [] if arch in CUSTOM_ARCHS else open_clip.list_pretrained_tags_by_model(arch)
    looks_like_path = os.sep in p or Path(p).suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
    what = "no CLIP checkpoint file at" if looks_like_path else "neither a local file nor an open_clip tag:"
    if _frozen_name(arch, Path(p).name):
        # a frozen small CLIP (ehin.pretrain_clip --freeze): its recipe remakes it, named by its sha256
        raise ClipWeightsError(
            f"backbone.pretrained for '{arch}': {what} '{p}', a frozen small CLIP; remake it with "
            f"`python -m ehin.pretrain_clip --set backbone.pretrained=synthetic:<its recipe> --freeze {Path(p).parent}` "
            "on the GPU model it was made on and check that the name comes out the same (the testbed's "
            "command is in reports/testbed/README.md)")
    raise ClipWeightsError(
        f"backbone.pretrained for '{arch}': {what} '{p}'. Use a checkpoint path, "
        + (f"an open_clip tag ({', '.join(tags)}), " if tags else "")
        + "'synthetic' (the project's pretrained small CLIP) or null (random weights)."
    )


def wants_quick_gelu(arch: str, pretrained: str | os.PathLike | None) -> bool:
    """Whether the weights `pretrained` names run with QuickGELU, found without reading them: as an open_clip
    tag's config says (OpenAI's), or an OpenAI TorchScript file; the small CLIP and random weights do not.
    For a checkpoint that predates `backbone_quick_gelu` (ehin.checkpoint.empty_backbone)."""
    if pretrained is None or _is_synthetic(pretrained):
        return False
    tag = None if arch in CUSTOM_ARCHS else open_clip.get_pretrained_cfg(arch, str(pretrained))
    if tag:
        return bool(tag.get("quick_gelu", False))
    path = Path(pretrained).expanduser()
    return path.is_file() and _is_torchscript(path)


def build_clip(arch: str, pretrained: str | os.PathLike | None, image_size: int) -> ClipBackbone:
    """A CLIP backbone at `image_size` px.

    pretrained: None (random init), an open_clip tag such as "openai" (from a local cache only),
    a local checkpoint path, or "synthetic" (the project's small CLIP, pretrained and cached on first
    use by `ehin.pretrain_clip.ensure_pretrained`; "synthetic:steps=3000" changes its recipe).
    """
    image_size = int(image_size)
    model_config(arch, image_size)  # fail on a bad arch/size before touching any file
    source, quick_gelu = weights_file(arch, pretrained, image_size)
    state: dict[str, torch.Tensor] | None = None
    meta: dict[str, Any] = {}
    if source is not None:
        state, meta = _read_checkpoint(source)
    quick_gelu = quick_gelu or bool(meta.get("quick_gelu", False))
    backbone = untrained_clip(arch, image_size, quick_gelu)
    if state is not None:
        _load_into(backbone.clip, state, source, arch)
    return backbone
