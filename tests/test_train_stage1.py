"""Stage-1 trainer: resolved config saved, resume == uninterrupted, NaN guard, per-epoch JSON lines."""
import json

import pytest
import torch

from ehin.config import load_config
from ehin.train_stage1 import NonFiniteLossError, run

# A few-second run: random-weight tiny CLIP (no pretraining), 60 scenes, 2 epochs.
TINY = ["backbone.pretrained=null", "synthetic.images=60", "train.epochs=2", "eval.max_items=40",
        "train.threads=1", "model.hidden_dim=32"]


def tiny_cfg(*extra: str) -> dict:
    return load_config(profile="smoke", overrides=TINY + list(extra))


def test_run_writes_config_metrics_and_checkpoint(tmp_path):
    cfg = tiny_cfg()
    result = run(cfg, tmp_path, progress=False)
    assert (tmp_path / "config.yaml").exists()
    assert load_config(tmp_path / "config.yaml") == cfg
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    for key in ("loss", "fg", "cl", "bg", "iou", "point_mask", "point_any_object"):
        assert key in lines[-1]
    assert set(result["metrics"]) >= {"iou", "overall_iou", "point_mask", "point_box", "box_acc"}
    assert (tmp_path / "checkpoints" / "last.pt").exists()


def test_resume_gives_the_same_weights(tmp_path):
    cfg = tiny_cfg()
    run(cfg, tmp_path / "straight", progress=False)

    class Stop(Exception):
        pass

    def stop_after_first(entry):
        if entry["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        run(cfg, tmp_path / "resumed", progress=False, on_epoch=stop_after_first)
    run(cfg, tmp_path / "resumed", progress=False, resume=True)
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["point_mask"] for h in a["history"]] == [h["point_mask"] for h in b["history"]]


def test_nan_loss_stops_with_step_and_term_and_keeps_checkpoint(tmp_path, monkeypatch):
    from ehin import losses

    cfg = tiny_cfg()
    calls = {"n": 0}
    original = losses.Stage1Loss.forward

    def poisoned(self, out, batch):
        total, terms = original(self, out, batch)
        calls["n"] += 1
        if calls["n"] > steps_per_epoch + 1:       # in epoch 2, after one good step
            terms = {**terms, "bg": torch.tensor(float("nan"))}
            total = total + terms["bg"]
        return total, terms

    from ehin.data import prepare_dataset

    steps_per_epoch = len(prepare_dataset(cfg).refs("train")) // cfg["train"]["batch_size"]
    monkeypatch.setattr(losses.Stage1Loss, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=rf"step {steps_per_epoch + 1} \(epoch 2\).*bg"):
        run(cfg, tmp_path, progress=False)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 0  # epoch 1's checkpoint, untouched


def test_bad_config_values_fail_fast():
    from ehin.config import ConfigError

    with pytest.raises(ConfigError, match="model.residual"):
        tiny_cfg("model.residual=thrice")
    with pytest.raises(ConfigError, match="unknown config key 'model.alpah'"):
        tiny_cfg("model.alpah=0.2")
    with pytest.raises(ConfigError, match="select_split"):
        tiny_cfg("eval.select_split=val")
