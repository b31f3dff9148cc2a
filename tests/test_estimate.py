"""bench.estimate: the paper's tables' time from measured throughput, on hand-worked figures."""
import json
import shutil
from pathlib import Path

import pytest

from bench import estimate as E

ROOT = Path(__file__).resolve().parent.parent


def perf(train=1000.0, infer=500.0, stage2=None) -> dict:
    ehin = {"stage1_train": {"images_per_s": train}, "stage1_infer": {"images_per_s_bs64": infer}}
    if stage2:
        ehin["stage2"] = {"train_images_per_s": stage2}
    return {"size": "paper", "device": "cuda", "levers": {"amp": True}, "environment": {"gpu": "test GPU"},
            "results": {"ehin": ehin}}


def cfg(epochs=2, split="val", select=None, stage2_epochs=3) -> dict:
    return {"train": {"epochs": epochs}, "eval": {"split": split, "select_split": select},
            "stage2": {"epochs": stage2_epochs}}


def test_training_seconds_by_hand():
    s, ok = E.training_seconds(cfg(), "1", perf())
    assert ok and s == pytest.approx(2 * (42_278 / 1000 + 10_758 / 500))
    s, ok = E.training_seconds(cfg(split="testA", select="val"), "1", perf())
    assert s == pytest.approx(2 * (42_278 / 1000 + 2 * 5_726 / 500))  # the selection split evaluated too
    # a two-stage chain: + pseudo-labels (one pass over the train refs) + stage-2 epochs
    s1, _ = E.training_seconds(cfg(), "1", perf())
    s, ok = E.training_seconds(cfg(), "2", perf(stage2=2000.0))
    assert ok and s == pytest.approx(s1 + 42_278 / 500 + 3 * (42_278 / 2000 + 10_758 / 500))
    s, ok = E.training_seconds(cfg(), "2", perf())  # no stage-2 rate: a lower bound, flagged
    assert not ok and s == pytest.approx(s1 + 42_278 / 500)
    thin = cfg(epochs=5)
    thin["eval"]["every"] = 2  # evaluated after epochs 2, 4 and 5
    s, _ = E.training_seconds(thin, "1", perf())
    assert s == pytest.approx(5 * 42_278 / 1000 + 3 * 10_758 / 500)


def test_makespan_longest_first():
    assert E.makespan([3, 3, 2, 2, 2], 2) == 7  # longest first: 3+2+2 | 3+2 (the optimum, 6, is not sought)
    assert E.makespan([5, 1, 1], 2) == 5 and E.makespan([1, 2, 3], 1) == 6


def test_table2_counts_its_shared_trainings():
    (row,) = E.estimate(["table2"], perf())
    assert (row["cells"], row["trainings"], row["complete"]) == (40, 20, False)
    (full,) = E.estimate(["table2"], perf(stage2=1000.0))
    assert full["complete"] and full["one_gpu_s"] > row["one_gpu_s"]
    rows = E.estimate(["table5", "table6"], perf())
    # the queue of both runs Table 6's EHIN (Table 5's full loss) once
    assert rows[-1]["table"] == "all" and rows[-1]["trainings"] < rows[0]["trainings"] + rows[1]["trainings"]


def test_the_readme_block_is_current(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    p = json.loads((ROOT / E.DEFAULT_PERF).read_text())
    from bench.run import DEFAULT_SEEDS
    from bench.sweeps import list_sweeps

    block = E.markdown(E.estimate(list_sweeps(), p), p, E.DEFAULT_PERF, "paper", DEFAULT_SEEDS["paper"])
    assert not E.update_readme(readme, block), "README's estimate block is stale: python -m bench.estimate --readme README.md"
