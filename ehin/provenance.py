"""What a result was made from, by content: the CLIP checkpoints and the dataset (TESTBED §3).

A config names its inputs by recipe ("synthetic:captions=referring", a generator version, a REFER
root), and the same recipe gives other weights on a GPU than on a CPU. So every cell's record also
carries the sha256 of the checkpoint files its backbone and frozen scorer loaded and of its dataset:
two results with equal digests were made from identical inputs, whatever machine made them.

- backbone / scorer: {"file": the checkpoint's file name, "sha256": of its bytes, "weights_sha256": of its
  tensors alone}; None for random weights; the scorer only where it runs (L_CL or L_BG on, or the PRMS of
  a Stage-2 chain's pseudo-labels). A small
  CLIP pretrained on first use keeps its training report in the file, timings included, so two trainings
  of equal weights differ in their bytes (a frozen copy leaves the report out: ehin.pretrain_clip.freeze);
  equal `weights_sha256` says the weights are equal all the same.
- dataset: {"name", "split_by", "sha256"}: a generated synthetic dataset hashes every file it wrote
  (annotations and images, `ehin.data.synthetic.tree_digest`); a REFER root hashes its annotation
  folder (instances.json and the refs files), not the image collection.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from ehin.checksums import file_sha256  # noqa: F401  (re-exported: the records' checksums)


@lru_cache(maxsize=16)
def _weights_sha256(path: str, size: int, mtime_ns: int) -> str | None:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (a TorchScript archive, a format torch.load does not read)
        return None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        return None
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_sha256(path: str | Path) -> str | None:
    """sha256 of a checkpoint's tensors (by name: dtype, shape and bytes; its "state_dict" where it has one),
    whatever else the file holds; None where the file holds no such dict of tensors."""
    st = Path(path).stat()
    return _weights_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def clip_digest(cfg: dict, role: str) -> dict | None:
    """{file, sha256, weights_sha256} of the CLIP checkpoint the backbone or the frozen scorer (`role`)
    loads; None for random weights."""
    from ehin.backbones import weights_file
    from ehin.config import clip_spec

    path, _ = weights_file(*clip_spec(cfg, role))
    if path is None:
        return None
    return {"file": Path(path).name, "sha256": file_sha256(path), "weights_sha256": weights_sha256(path)}


def dataset_digest(cfg: dict) -> dict:
    from ehin.data import prepare_dataset
    from ehin.data.synthetic import tree_digest

    d = cfg["data"]
    ds = prepare_dataset(cfg, progress=False)
    generated = d["dataset"].startswith("synth-") and not d.get("root")
    digest = tree_digest(ds.root) if generated else tree_digest(ds.ann_dir)
    return {"name": d["dataset"], "split_by": ds.split_by, "sha256": digest}


def input_digests(cfg: dict, stage: str = "1") -> dict:
    """The digests of a resolved config's inputs (module docstring), for a cell of `stage` ("2": a Stage-2
    chain, whose pseudo-labels score with the scorer under PRMS whatever the losses)."""
    from ehin.model.scorer import uses_scorer

    out = {"backbone": clip_digest(cfg, "backbone")}
    # the scorer is built only then (ehin.train_stage1.build_scorer; ehin.pseudo_labels.pipeline.generate)
    if uses_scorer(cfg) or (stage == "2" and cfg.get("pseudo", {}).get("prms")):
        out["scorer"] = clip_digest(cfg, "scorer")
    out["dataset"] = dataset_digest(cfg)
    return out
