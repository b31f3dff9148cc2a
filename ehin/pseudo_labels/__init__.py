"""Pseudo-labels from stage-1 response maps (paper §3.3, METHOD §6; TRIS's pipeline).

maps (PRMS picks one sentence per ref) -> dense-CRF fg/bg/ignore labels -> IRNet boundary head
trained on those labels -> random walk on the boundary affinities -> the pseudo-label.

    python -m ehin.pseudo_labels --checkpoint RUN/checkpoints/last.pt --out pseudo/train.npz

This package's `__init__` stays light (no torch import): the CRF worker processes import
`ehin.pseudo_labels.crf`, which needs only numpy and pydensecrf.
"""
from __future__ import annotations

__all__ = ["PseudoLabels", "load_pseudo_labels", "generate"]


def __getattr__(name: str):  # lazy: `from ehin.pseudo_labels import generate` without importing torch early
    if name in __all__:
        from ehin.pseudo_labels import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
