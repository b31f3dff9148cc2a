"""DDP for stage 2 (METHOD §7): on CPU with gloo and 2 processes, the gradients DDP averages over
the ranks equal the single-process gradients of the same loss on the same global batch.

Why they must be equal: every loss term is a per-sample mean averaged over the batch
(ehin/stage2/losses.py) and the network has no batch statistics (GroupNorm decoder, frozen
BatchNorm), so the global-batch loss is the mean of the two half-batch losses, and DDP's gradient
all-reduce is exactly that mean. Tolerance: float32 summation order differs between one batch of 4
and two of 2, so rtol 1e-4 / atol 1e-6.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ehin  # noqa: F401  (torchvision shim before open_clip)

WORLD = 2
IMAGE = 64


def _net():
    from ehin.backbones import build_clip
    from ehin.stage2.model import Stage2Net

    torch.manual_seed(0)
    return Stage2Net(build_clip("clip-tiny", None, IMAGE), 16)


def _global_batch(tokenize):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2 * WORLD, 3, IMAGE, IMAGE, generator=g)
    labels = torch.randint(0, 2, (2 * WORLD, IMAGE, IMAGE), generator=g).to(torch.uint8)
    labels[0, :4] = 255  # ignore pixels on one rank only
    tokens = tokenize(["red circle", "the big blue square", "green", "small yellow triangle on top"])
    return images, tokens, labels


def _worker(rank: int, port: int, out: str) -> None:
    from ehin.stage2.losses import Stage2Loss
    from ehin.train_stage2 import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    r, world, device = init_distributed({"train": {"device": "cpu"}})  # the trainer's own set-up (gloo)
    assert (r, world, device.type) == (rank, WORLD, "cpu") and dist.get_backend() == "gloo"
    net = _net().train()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    images, tokens, labels = _global_batch(net.backbone.tokenize)
    part = slice(rank * 2, rank * 2 + 2)
    loss, _ = Stage2Loss()(ddp(images[part], tokens[part]), labels[part])
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}, out)
    dist.barrier()
    # Leave without tearing down: freeing the DDP reducer can destroy the gloo process group while
    # holding the GIL that its run-loop thread waits for (a deadlock seen in torch 2.13 under load).
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_ddp_gradients_equal_single_process(tmp_path):
    from ehin.stage2.losses import Stage2Loss

    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    ddp_grads = torch.load(out)

    torch.set_num_threads(1)
    net = _net().train()
    images, tokens, labels = _global_batch(net.backbone.tokenize)
    loss, _ = Stage2Loss()(net(images, tokens), labels)
    loss.backward()
    single = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}

    assert set(single) == set(ddp_grads) and len(single) > 50
    for name, g in single.items():
        assert torch.allclose(ddp_grads[name], g, rtol=1e-4, atol=1e-6), name
    # and the halves really differ (the all-reduce did something)
    half, _ = Stage2Loss()(net(images[:2], tokens[:2]), labels[:2])
    net.zero_grad()
    half.backward()
    assert any(not torch.allclose(p.grad, single[n], rtol=1e-3, atol=1e-5)
               for n, p in net.named_parameters() if p.grad is not None)
