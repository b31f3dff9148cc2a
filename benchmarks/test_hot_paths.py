"""Speed of the hot paths on CPU (pytest-benchmark). Not part of the default test run:

    python -m pytest benchmarks --benchmark-enable --benchmark-storage=benchmarks/baselines \\
        --benchmark-compare --benchmark-compare-fail=mean:30%

fails when a path's mean time grows by more than 30 % over the saved baseline (save a new one with
--benchmark-save=cpu on purpose). HIPM runs at the paper's fusion size (N 24, C_d 1024, 10x10 grid).
"""
import numpy as np
import pytest
import torch

import ehin  # noqa: F401  (torchvision shim)
from ehin import metrics as M
from ehin.losses import fg_loss, pooled_scores
from ehin.model.hipm import HIPM

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def paper_hipm():
    torch.manual_seed(0)
    hipm = HIPM(1024, n_layers=2, alpha=0.1, beta=0.05)
    vis = torch.randn(24, 1024, 10, 10, requires_grad=True)
    lan = torch.randn(24, 1024, requires_grad=True)
    return hipm, vis, lan


def test_hipm_forward_backward_paper_size(benchmark, paper_hipm):
    hipm, vis, lan = paper_hipm

    def step():
        v, l = hipm(vis, lan, pairwise=True)
        (v.mean() + l.mean()).backward()

    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)


def test_losses_pooling_and_fg(benchmark):
    maps = torch.randn(24, 24, 10, 10, requires_grad=True)

    def step():
        fg_loss(pooled_scores(maps)).backward()

    benchmark(step)


def test_metrics_score_expression(benchmark):
    rng = np.random.default_rng(0)
    pred = rng.random((480, 640)).astype(np.float32)
    gt = np.zeros((480, 640), bool)
    gt[100:300, 200:400] = True
    benchmark(M.score_expression, pred, gt, np.array([200, 100, 400, 300.0]), gt)


def test_dense_crf(benchmark):
    from ehin.pseudo_labels.crf import crf_label

    rng = np.random.default_rng(0)
    image = (rng.random((96, 96, 3)) * 255).astype(np.uint8)
    score = np.zeros((96, 96), np.float32)
    score[30:60, 30:60] = 1.0
    benchmark(crf_label, image, score)
