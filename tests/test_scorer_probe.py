"""ehin.diagnostics.scorer_probe: the ground-truth mask variants and the probe's figures on a tiny dataset."""
import math

import torch

from ehin.config import load_config
from ehin.diagnostics.scorer_probe import MODEL_ROWS, REGIONS, VARIANTS, probe, region_means, region_weights
from ehin.model import build_model
from ehin.model.scorer_criteria import same_image_negatives, variant_masks


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


def test_same_image_negatives_by_hand():
    items = [(1, 10, "red circle"), (1, 10, "circle"), (1, 11, "blue one"), (1, 12, "square"),
             (2, 20, "star"), (1, 12, "red circle")]  # a sentence of ref 12 equal to one of ref 10
    negs = same_image_negatives(items)
    assert negs[0] == ["blue one", "square"]  # never "circle": ref 10's other sentence describes it too
    assert negs[1] == ["blue one", "red circle", "square"]  # "red circle" is also ref 12's sentence
    assert negs[2] == ["circle", "red circle", "square"]
    assert negs[3] == ["blue one", "circle", "red circle"]
    assert negs[4] == []  # alone in its image
    assert negs[5] == ["blue one", "circle"]  # its own string never counts against it


def test_a_subset_keeps_every_negative_of_its_images():
    """--max-items probes a subset of the split's expressions; each keeps the negatives of the whole split,
    not only those of refs the subset drew (TESTBED §2.2(b))."""
    from ehin.data.refer import ReferDataset
    from ehin.diagnostics.scorer_probe import split_negatives

    refs = [{"image_id": 1, "ref_id": r, "sentences": [{"sent": t}]} for r, t in ((10, "red circle"), (11, "blue one"),
                                                                              (12, "square"))]
    refer = type("Refer", (), {"refs": lambda self, split: refs, "sentence": staticmethod(ReferDataset.sentence)})()
    subset = [(refs[0], refs[0]["sentences"][0])]
    assert split_negatives(refer, "val", subset) == [["blue one", "square"]]
    assert same_image_negatives([(1, 10, "red circle")]) == [[]]  # what the subset alone would have given


def test_probe_scores_a_models_maps(tmp_path, monkeypatch):
    monkeypatch.setenv("EHIN_CACHE", str(tmp_path))
    cfg = load_config(profile="smoke", overrides=["backbone.pretrained=null", "synthetic.images=40"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    res = probe(cfg, max_items=20, progress=False, model=model)
    assert list(res) == list(VARIANTS) + list(MODEL_ROWS)
    for name in MODEL_ROWS:
        r = res[name]
        assert r["n"] == res["full"]["n"] > 0
        assert 0 < r["kept"] < 100 and 0 <= r["peak_on_ref"] <= 100
        assert math.isfinite(r["l_cl"]) and r["l_cl"] > 0
        assert 0 <= r["saturated"] <= 100
        assert all(math.isfinite(r[f"{q}_{k}"]) for q in ("R", "pull") for k in ("ref", "bg"))
        assert any(r[f"pull_{k}"] != 0 for k in REGIONS)  # the scorer's gradient reaches the map
    assert "kept" not in res["ref_only"]


def test_region_weights_and_means_by_hand():
    ref = torch.zeros(4, 4)
    ref[0, 0:2] = 1  # the top-left cell of a 2x2 grid: half referent
    objects = torch.zeros(4, 4)
    objects[1, 0] = 1  # ... and a quarter another object
    objects[2:, 2:] = 1  # the bottom-right cell: all another object
    w = region_weights(ref, objects, (2, 2))
    assert list(w) == list(REGIONS)
    assert w["ref"].tolist() == [[0.5, 0.0], [0.0, 0.0]]
    assert w["other"].tolist() == [[0.25, 0.0], [0.0, 1.0]]
    assert w["bg"].tolist() == [[0.25, 1.0], [1.0, 0.0]]
    values = torch.tensor([[4.0, 1.0], [3.0, -2.0]])
    m = region_means(values, w)
    assert m["ref"] == 4.0
    assert math.isclose(m["other"], (0.25 * 4 - 2.0) / 1.25, rel_tol=1e-6)
    assert math.isclose(m["bg"], (0.25 * 4 + 1 + 3) / 2.25, rel_tol=1e-6)
    assert math.isnan(region_means(values, region_weights(torch.zeros(4, 4), objects, (2, 2)))["ref"])
