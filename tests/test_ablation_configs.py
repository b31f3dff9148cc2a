"""Every stage-1 ablation config of Tables 3-9 and Fig. 7 builds and trains one epoch at smoke size
(scaled to a test-sized dataset: 40 scenes, C_d 32), through the same cell configs bench.run uses."""
import math

import pytest

from bench.sweeps import load_sweep
from ehin.config import config_hash, dotted_to_nested, load_config
from ehin.train_stage1 import run

TABLES = ["table3", "table4", "table5", "table6", "table7", "table8", "table9", "fig7"]
TINY = {"backbone.pretrained": None, "synthetic.images": 40, "train.epochs": 1, "eval.max_items": 20,
        "train.threads": 1, "model.hidden_dim": 32}


def _cells():
    seen, out = set(), []
    for name in TABLES:
        for cell in load_sweep(name).cells("smoke", [0]):
            cfg = load_config(profile="smoke", overrides=dotted_to_nested({**cell.overrides, **TINY}))
            h = config_hash(cfg)
            if h not in seen:  # rows shared between tables (Table 6's EHIN is Table 5's full loss) run once
                seen.add(h)
                out.append(pytest.param(cfg, id=f"{name}-{cell.row}"))
    return out


@pytest.mark.parametrize("cfg", _cells())
def test_ablation_config_trains_one_epoch(cfg, tmp_path):
    result = run(cfg, tmp_path, progress=False)
    (epoch,) = result["history"]
    assert math.isfinite(epoch["loss"])
    for key in ("iou", "overall_iou", "point_box", "point_mask", "box_acc"):
        assert 0.0 <= result["metrics"][key] <= 100.0
