"""Checkpoints: written atomically (temp file + rename) so a kill never leaves a half-written one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ehin.cli import UserError

def save_atomic(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or not a torch file
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def load_stage1(path: str | Path, device: str = "cpu"):
    """(model, cfg) from a stage-1 checkpoint written by ehin.train_stage1."""
    from ehin.model import build_model

    ckpt = load(path)
    if ckpt.get("kind") != "stage1":
        raise UserError(f"{path} is a {ckpt.get('kind', 'unknown')!r} checkpoint, not a stage-1 one")
    cfg = ckpt["config"]
    # The checkpoint holds every weight: build the backbone empty instead of loading pretrained ones.
    empty = {**cfg, "backbone": {**cfg["backbone"], "pretrained": None}}
    model = build_model(empty)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg
