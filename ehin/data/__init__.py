"""Data: REFER-format datasets (real or generated synth-*) and the torch datasets over them.

`prepare_dataset(cfg)` is the one entry point the training and evaluation code use.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ehin.data.refer import ReferDataset, ReferFormatError
from ehin.cli import UserError

__all__ = ["ReferDataset", "ReferFormatError", "prepare_dataset", "resolve_split_by", "synthetic_root",
           "GENERATOR_VERSION"]

# Bump when a generator change alters its output: cached datasets of older versions are not reused.
GENERATOR_VERSION = 2  # 2: RLE segmentations wrapped in a list, as the REFER API reads them

# The config's default split_by is "unc" (RefCOCO/+), and a default cannot be told from a value the user
# gave, so on these datasets "unc" means their usual split: umd for RefCOCOg (no unc split; it has
# train/val/test, google no test), berkeley for ReferIt (REFER's refclef also ships a unc split, but TRIS
# and the paper use berkeley; the README says so). Any other value is taken as given.
DEFAULT_SPLIT_BY = {"refcocog": "umd", "synth-refcocog": "umd", "referit": "berkeley", "refclef": "berkeley",
                    "synth-referit": "berkeley"}


def resolve_split_by(dataset: str, split_by: str) -> str:
    if split_by == "unc" and dataset in DEFAULT_SPLIT_BY:
        return DEFAULT_SPLIT_BY[dataset]
    return split_by


def synthetic_root(cfg: dict) -> Path:
    """Cache folder of the generated dataset a config asks for."""
    from ehin.config import cache_dir

    syn, name = cfg["synthetic"], cfg["data"]["dataset"]
    tag = f"{name}-s{syn['size']}-n{syn['images']}-seed{syn['seed']}-v{GENERATOR_VERSION}"
    scenes = syn.get("scenes", "simple")
    if scenes != "simple":  # the default recipe keeps its folder name (existing caches stay valid)
        from ehin.config import recipe_tag

        tag += f"-{recipe_tag(scenes)}"
    return cache_dir() / "datasets" / tag


def _ensure_generated(cfg: dict, progress: bool = True) -> Path:
    """Generate the synth-* dataset once. A file lock serialises concurrent callers; the data is
    written to a temporary folder and renamed into place, so a reader never sees half of it."""
    from filelock import FileLock

    from ehin.data.synthetic import generate

    root = synthetic_root(cfg)
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if root.is_dir():  # another process finished it while we waited
            return root
        syn = cfg["synthetic"]
        tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
        try:
            generate(cfg["data"]["dataset"], tmp, size=syn["size"], images=syn["images"], seed=syn["seed"],
                     progress=progress, scenes=syn.get("scenes", "simple"))
            os.rename(tmp, root)  # atomic on one filesystem
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root


def prepare_dataset(cfg: dict, progress: bool = True) -> ReferDataset:
    """The ReferDataset a config names, read from data.root (and data.image_root) when it is set;
    a synth-* dataset without data.root is generated into the cache on first use."""
    d = cfg["data"]
    name = d["dataset"]
    split_by = resolve_split_by(name, d["split_by"])
    if name.startswith("synth-"):
        from ehin.data.synthetic import VARIANTS

        if name not in VARIANTS:
            raise UserError(f"data.dataset = {name!r}: unknown synthetic variant (choose from {', '.join(VARIANTS)})")
        if not d.get("root"):
            return ReferDataset(_ensure_generated(cfg, progress), name, split_by)
        # else: the user's own copy (python -m ehin.data.synthetic --out ROOT), read as any REFER root
    elif not d.get("root"):
        raise UserError(f"data.root is null: {name!r} is a real dataset; point data.root at a REFER root "
                        "holding refer/<dataset>/ (--set data.root=DIR), or use the synthetic data "
                        "(--profile synthetic, the default without --config)")
    root = Path(d["root"]).expanduser()
    if not root.is_dir():
        hint = " (or null for the generated copy)" if name.startswith("synth-") else ""
        raise UserError(f"data.root = {str(root)!r} does not exist; point it at a REFER root holding "
                        f"refer/{name}/{hint}")
    return ReferDataset(root, name, split_by, image_root=d.get("image_root"))
