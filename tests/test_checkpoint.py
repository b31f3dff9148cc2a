"""Checkpoints hold plain data only and load with weights_only=True: a crafted file cannot run code."""
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from ehin.checkpoint import load, save_atomic, to_plain
from ehin.cli import UserError


class _RunsCode:
    """Unpickling this calls exec (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_hostile_checkpoint_is_refused_and_its_code_not_run(tmp_path, capsys):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.pt"
    torch.save({"kind": "stage1", "config": {}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(UserError, match="refusing to load .*evil.pt: it calls for exec"):
        load(path)
    assert not marker.exists()

    from ehin.evaluate import main

    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(path)])
    assert exc.value.code == 2 and "refusing to load" in capsys.readouterr().err
    assert not marker.exists()


def test_saved_checkpoints_load_weights_only(tmp_path):
    state = torch.nn.Linear(2, 3).state_dict()
    obj = {"model": state, "epoch": np.int64(3), "history": [{"iou": np.float32(0.5), "n": 4}],
           "where": tmp_path / "run", "grid": np.arange(4), "pair": (1, "a")}
    save_atomic(obj, tmp_path / "c.pt")
    back = torch.load(tmp_path / "c.pt", weights_only=True)
    assert back["epoch"] == 3 and type(back["epoch"]) is int
    assert back["history"] == [{"iou": 0.5, "n": 4}] and back["where"] == str(tmp_path / "run")
    assert torch.equal(back["grid"], torch.arange(4)) and back["pair"] == (1, "a")
    assert to_plain(state) is state  # untouched state dicts keep their _metadata
    assert isinstance(load(tmp_path / "c.pt")["model"], OrderedDict)


def test_an_unsaveable_object_fails_at_save_naming_where(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['history'\]\[0\]: a object"):
        save_atomic({"history": [object()]}, tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated, OpenAI files are TorchScript
def test_a_reloaded_model_keeps_the_activation_it_trained_with(tmp_path):
    """OpenAI's CLIP runs with QuickGELU, which no weight shows: a stage-1 or stage-2 checkpoint of a model on
    such weights must come back with it (pseudo-labels and every other split are scored on the reloaded
    model), from the checkpoint's own record or, for a checkpoint written before it, from its config."""
    from ehin.backbones import build_clip
    from ehin.checkpoint import load_stage1
    from ehin.config import load_config
    from ehin.model import build_model
    from ehin.stage2.model import build_stage2, load_stage2

    weights = tmp_path / "openai-style.pt"
    torch.jit.save(torch.jit.script(build_clip("clip-tiny", None, 64).clip), str(weights))
    cfg = load_config(profile="smoke", overrides=[f"backbone.pretrained={weights}"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model.backbone.quick_gelu
    image, tokens = torch.rand(1, 3, 64, 64), model.backbone.tokenize(["red circle"])
    for record in ({}, {"backbone_quick_gelu": True}):  # before session 40, and since
        save_atomic({"kind": "stage1", "config": cfg, "model": model.state_dict(), **record}, tmp_path / "s1.pt")
        loaded, _ = load_stage1(tmp_path / "s1.pt")
        assert loaded.backbone.quick_gelu
        assert torch.equal(loaded.predict(image, tokens), model.predict(image, tokens))
    stage2 = build_stage2(cfg).eval()
    save_atomic({"kind": "stage2", "config": cfg, "model": stage2.state_dict(), "backbone_quick_gelu": True},
                tmp_path / "s2.pt")
    loaded2, _ = load_stage2(tmp_path / "s2.pt")
    assert loaded2.backbone.quick_gelu
    assert torch.equal(loaded2(image, tokens)[0], stage2(image, tokens)[0])


def test_weights_digest_names_the_values_not_their_memory_layout():
    """A stage-1 model trains channels-last on a GPU and is loaded from its checkpoint in the standard layout:
    both must give the digest its pseudo-labels name (ehin.two_stage); one changed value changes it."""
    from ehin.checkpoint import weights_digest

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 4, 1))
    plain = weights_digest(net)
    assert weights_digest(net.to(memory_format=torch.channels_last)) == plain
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        net[2].bias[0] += 1e-6
    assert weights_digest(net) != plain
