"""Checkpoints: written atomically (temp file + rename) so a kill never leaves a half-written one.

They hold tensors and plain containers, numbers and strings only, and are read with
`torch.load(weights_only=True)`: a checkpoint path comes from the user, and a full unpickler would
run whatever code a crafted file names. `save_atomic` converts what the code hands it (numpy
scalars and arrays, paths) and refuses anything else, so every checkpoint it writes loads that way.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from ehin.cli import UserError

# What torch's weights-only unpickler accepts as is (containers are walked).
_ATOMS = (str, bytes, int, float, complex, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def to_plain(obj: Any, where: str = "checkpoint") -> Any:
    """`obj` with numpy scalars -> Python numbers, numpy arrays -> tensors, paths -> str; the very same
    object where nothing inside needed converting (a state dict keeps its `_metadata`).
    Raises TypeError naming where an object of another type sits."""
    if isinstance(obj, _ATOMS):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, dict) and type(obj) in (dict, OrderedDict):
        pairs = [(to_plain(k, where), to_plain(v, f"{where}[{k!r}]")) for k, v in obj.items()]
        if all(k2 is k and v2 is v for (k, v), (k2, v2) in zip(obj.items(), pairs)):
            return obj
        return type(obj)(pairs)
    if type(obj) in (list, tuple):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return obj if all(a is b for a, b in zip(obj, items)) else type(obj)(items)
    raise TypeError(f"{where}: a {type(obj).__name__} cannot go into a checkpoint (tensors, numbers, strings "
                    "and plain containers only, so that it loads with weights_only=True)")


def save_atomic(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(to_plain(obj), tmp)
    os.replace(tmp, path)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # names a global the weights-only unpickler does not allow
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else "a Python object"
        raise UserError(f"refusing to load {path}: it calls for {what}, which is not a tensor or plain data, so "
                        "unpickling it could run code (checkpoints written by ehin-bench never do)") from None
    except Exception as e:  # truncated or not a torch file
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def weights_digest(model: torch.nn.Module) -> str:
    """sha1 of every tensor of its state dict, in the standard memory layout (a channels-last model trained on a
    GPU and the same weights loaded from its checkpoint agree): the identity of a trained model's weights, which
    a stage-1 run's result and the pseudo-labels made from it both name (ehin.two_stage)."""
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def empty_backbone(ckpt: dict):
    """The CLIP backbone a stage-1 or stage-2 checkpoint's weights go into: its config's arch and size, random
    weights (the checkpoint holds every one), and the activation the trained backbone ran with, which the
    state dict does not show: QuickGELU for OpenAI's weights (`backbone_quick_gelu`, written since session
    40; for an older checkpoint, what its config's `backbone.pretrained` names, ehin.backbones.wants_quick_gelu)."""
    from ehin.backbones import untrained_clip, wants_quick_gelu
    from ehin.config import clip_spec

    arch, pretrained, size = clip_spec(ckpt["config"], "backbone")
    quick_gelu = ckpt.get("backbone_quick_gelu")
    return untrained_clip(arch, size, wants_quick_gelu(arch, pretrained) if quick_gelu is None else bool(quick_gelu))


def load_stage1(path: str | Path, device: str = "cpu"):
    """(model, cfg) from a stage-1 checkpoint written by ehin.train_stage1."""
    from ehin.model import build_model

    ckpt = load(path)
    if ckpt.get("kind") != "stage1":
        raise UserError(f"{path} is a {ckpt.get('kind', 'unknown')!r} checkpoint, not a stage-1 one")
    cfg = ckpt["config"]
    model = build_model(cfg, empty_backbone(ckpt))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg
