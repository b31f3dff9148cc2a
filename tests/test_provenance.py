"""Every trained cell records what it was made from by content (ehin.provenance, TESTBED §3)."""
import hashlib

import torch

import ehin  # noqa: F401  (torchvision shim first)
from ehin.config import load_config
from ehin.provenance import file_sha256, input_digests, weights_sha256


def _cfg(tmp_path, **loss):
    from ehin.backbones import build_clip

    ckpt = tmp_path / "clip.pt"
    torch.save(build_clip("clip-tiny", None, 64).clip.state_dict(), ckpt)   # a local checkpoint file
    over = [f"backbone.pretrained={ckpt}", "backbone.arch=clip-tiny", "scorer.arch=clip-tiny",
            "scorer.image_size=64", "data.image_size=64"] + [f"loss.{k}={v}" for k, v in loss.items()]
    return load_config(None, profile="smoke", overrides=over), ckpt


def test_digests_name_the_checkpoint_and_the_dataset_by_content(tmp_path):
    cfg, ckpt = _cfg(tmp_path)
    d = input_digests(cfg)
    expected = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert d["backbone"] == {"file": "clip.pt", "sha256": expected, "weights_sha256": weights_sha256(ckpt)}
    assert d["scorer"] == d["backbone"]                  # scorer.pretrained null: the backbone's weights
    assert d["dataset"]["name"] == cfg["data"]["dataset"] and len(d["dataset"]["sha256"]) == 64
    assert input_digests(cfg)["dataset"] == d["dataset"]  # the generated dataset hashes the same twice
    # other weights, other digest
    torch.save({"other": torch.zeros(1)}, ckpt)
    assert file_sha256(ckpt) != expected and input_digests(cfg)["backbone"]["sha256"] == file_sha256(ckpt)


def test_no_scorer_digest_where_no_loss_uses_it_and_none_for_random_weights(tmp_path):
    cfg, _ = _cfg(tmp_path, cl=0, bg=0)
    assert "scorer" not in input_digests(cfg)
    # a Stage-2 chain's pseudo-labels pick each ref's map with the scorer (PRMS) whatever the losses
    assert cfg["pseudo"]["prms"] and input_digests(cfg, stage="2")["scorer"] == input_digests(cfg)["backbone"]
    assert "scorer" not in input_digests({**cfg, "pseudo": {**cfg["pseudo"], "prms": False}}, stage="2")
    cfg = {**cfg, "backbone": {**cfg["backbone"], "pretrained": None}}
    assert input_digests(cfg)["backbone"] is None


def test_equal_weights_have_equal_weights_digest_whatever_else_the_file_holds(tmp_path):
    """A small CLIP pretrained on first use keeps its training report (timings too) in the file: two
    trainings of equal weights differ in sha256, not in weights_sha256; one changed weight changes it."""
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor(0.5), "h": torch.ones(2, dtype=torch.bfloat16)}
    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    torch.save({"state_dict": state, "report": {"seconds_train": 109.6}}, a)
    torch.save({"state_dict": dict(state), "report": {"seconds_train": 110.3}}, b)
    torch.save({"state_dict": {**state, "b": torch.tensor(0.25)}, "report": {"seconds_train": 109.6}}, c)
    assert file_sha256(a) != file_sha256(b) and weights_sha256(a) == weights_sha256(b)
    assert weights_sha256(c) != weights_sha256(a)
    torch.save(state, c)                     # a bare state dict: the same tensors, the same digest
    assert weights_sha256(c) == weights_sha256(a)
    c.write_bytes(b"not a checkpoint")
    assert weights_sha256(c) is None
