"""bench.scorer_probe: the ground-truth mask variants and the probe's figures on a tiny dataset."""
import math

import torch

from bench.scorer_probe import VARIANTS, probe, variant_masks
from ehin.config import load_config


def test_variant_masks_by_hand():
    ref = torch.tensor([[1, 0, 0], [0, 0, 0]])
    objects = torch.tensor([[0, 1, 0], [0, 0, 0]])  # the union leaves the referred object out: added back
    m = variant_masks(ref, objects)
    assert set(m) == set(VARIANTS)
    assert m["ref_only"].tolist() == [[1, 0, 0], [0, 0, 0]]
    assert m["ref+bg"].tolist() == [[1, 0, 1], [1, 1, 1]]
    assert m["bg_only"].tolist() == [[0, 0, 1], [1, 1, 1]]
    assert m["hide_ref"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert m["objects"].tolist() == [[1, 1, 0], [0, 0, 0]]
    assert torch.equal(m["ref_only"] + m["bg_only"] + (m["objects"] - m["ref_only"]), m["full"])


def test_probe_on_a_tiny_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("EHIN_CACHE", str(tmp_path))
    cfg = load_config(profile="smoke", overrides=["backbone.pretrained=null", "synthetic.images=40"])
    res = probe(cfg, max_items=30, progress=False)
    assert list(res) == list(VARIANTS)
    n = res["full"]["n"]
    assert 0 < n <= 30 and all(r["n"] == n for r in res.values())
    for r in res.values():
        assert all(math.isfinite(r[k]) for k in ("s_pos", "s_neg", "l_cl", "pos_wins"))
        assert -1 <= r["s_pos"] <= 1 and 0 <= r["pos_wins"] <= 100
        assert r["l_cl"] > 0  # -log S - mean log(1 - S) with S clamped into (0, 1)
