"""Data-parallel training helpers shared by both trainers (torchrun, or a SLURM job through submitit).

Without a launcher's environment (WORLD_SIZE unset or 1) nothing here starts a process group and the
trainers run their single-process code unchanged. Under torchrun each rank holds its slice of the
global batch; rank 0 alone evaluates and writes, the others wait at barriers.

Stage 1 needs more than DDP's gradient average (docs/method.md, D-DDP): EHIN fuses every image of the
batch with every text and its losses couple them (L_FG's N x N matrix, the softmax over all N texts),
so each rank fuses its own images with the texts of every rank (`all_gather_with_grad`), and the
gradient DDP averages is the gradient of the single-process loss on the global batch.
"""
from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Sampler

from ehin.cli import UserError

# Rank 0 evaluates while the others wait in a barrier: NCCL's default timeout (10 min) would kill a
# long evaluation of the paper profile. Gloo's default is 30 min.
TIMEOUT = datetime.timedelta(hours=2)


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's (or submitit's) environment; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(cfg: dict) -> torch.device:
    """The device of a run from train.device: auto (CUDA where there is one), cpu or cuda."""
    want = cfg["train"]["device"]
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is available; use --set train.device=auto or cpu")
    return torch.device(want)


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Initialise the process group if a launcher started us (NCCL on GPUs, gloo on CPU);
    returns (rank, world, this rank's device)."""
    rank, world, local = dist_env()
    if world > 1:
        if device.type == "cuda":
            # One GPU per rank; a SLURM task may be shown only its own GPU (then local % 1 = 0).
            device = torch.device("cuda", local % torch.cuda.device_count())
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return rank, world, device


class RankFailed(RuntimeError):
    """A process of a data-parallel job on this machine failed (`run_local_ranks`)."""


def run_local_ranks(argv: list[str], ranks: int, device_type: str, *, logs: Path | None = None,
                    what: str = "data-parallel job") -> None:
    """Run `python argv` as `ranks` processes of one data-parallel job on this machine, with the
    environment torchrun gives (RANK, LOCAL_RANK, WORLD_SIZE, a free local port for the rendezvous), and
    wait for all. Rank r writes its output to logs/rank{r}.log (else stdout is dropped). On CPU the
    ranks share the cores, each its part (oversubscribed, gloo crawls). One failed rank would leave the
    others waiting in a collective until the timeout, so they are stopped and RankFailed names it, with
    its log's last lines. The port is free when chosen, not reserved: a job started at the same moment
    could take it, and then fails as a rank that could not bind it."""
    import signal
    import socket
    import subprocess
    import threading

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": str(ranks)}
    if device_type == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // ranks))
    with socket.socket() as sock:  # a free port, chosen just before the ranks start
        sock.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(sock.getsockname()[1])
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
    outs = [open(logs / f"rank{r}.log", "w") if logs is not None else subprocess.DEVNULL for r in range(ranks)]
    children: list[subprocess.Popen] = []
    # SIGTERM to this process alone (a time limit, `kill`) would end it without the `finally` below, the ranks
    # training on: where SIGTERM would end it, it raises here instead, and the ranks are stopped
    on_term = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None))
    if on_term:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        children = [subprocess.Popen([sys.executable, *argv], stdout=out,
                                     stderr=subprocess.STDOUT if logs is not None else None,
                                     env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
                    for r, out in enumerate(outs)]
        failed = wait_all(children)
    finally:
        # every rank when this process is stopped (a SLURM requeue's SIGTERM, a Ctrl-C): no rank outlives it
        # holding a GPU; a rank's last epoch checkpoint stays for the resume
        stop_all(children)
        for out in outs:
            if out is not subprocess.DEVNULL:
                out.close()
        if on_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if failed:
        where = ""
        if logs is not None:
            tail = (logs / f"rank{failed[0]}.log").read_text(errors="replace").strip().splitlines()[-3:]
            where = f"; see {logs}/rank{failed[0]}.log" + "".join(f"\n  {line}" for line in tail)
        raise RankFailed(f"{what}: rank(s) {', '.join(map(str, failed))} of {ranks} failed "
                         f"(exit {children[failed[0]].returncode}){where}")


def wait_all(children: list) -> list[int]:
    """Wait until every child process has ended or one has failed, and return the failed ones' indices;
    the others are then stopped: they would wait for it (at a barrier, in a collective) until a timeout."""
    import time

    while any(c.poll() is None for c in children) and not any(c.poll() for c in children):
        time.sleep(0.1)
    failed = [i for i, c in enumerate(children) if c.poll()]
    stop_all(children)
    return failed


def stop_all(children: list) -> None:
    """Kill the child processes still running and reap them all."""
    for c in children:
        if c.poll() is None:
            c.kill()
        c.wait()


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def start_run(cfg: dict, out_dir, device: torch.device) -> tuple[int, int, torch.device, bool]:
    """A trainer's start: the process group if torchrun started us, rank 0's run folder with the
    resolved config beside it, the CPU thread count. Returns (rank, world, device, main_rank)."""
    from ehin.config import save_config

    rank, world, device = init_distributed(device)
    main_rank = rank == 0
    if main_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    if cfg["train"]["threads"]:
        torch.set_num_threads(int(cfg["train"]["threads"]))
    return rank, world, device, main_rank


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def data_parallel(model: nn.Module, device: torch.device, world: int, *, find_unused: bool = False) -> nn.Module:
    """`model` itself in a single process, else wrapped in DistributedDataParallel (which averages
    the gradients over the ranks in backward)."""
    if world <= 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=find_unused)


def sync_batchnorm(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """Under DDP, BatchNorm layers in training mode (the RN trunks) normalise with the statistics of the
    global batch, as the single process does: SyncBatchNorm. torch runs it on GPUs only, so a CPU run
    keeps per-rank statistics (it then differs from the single-process run) and says so."""
    if world <= 1 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameters, optimiser unaffected
    if dist_env()[0] == 0:
        print("warning: BatchNorm on CPU under DDP uses each rank's own batch statistics (torch's "
              "SyncBatchNorm needs GPUs)", file=sys.stderr)
    return model


def mean_over_ranks(values: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """The mean over the ranks of each value (the global batch's losses, not rank 0's share)."""
    if world <= 1:
        return values
    keys = sorted(values)  # the same order on every rank
    vec = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(vec)
    mean = {k: float(v) / world for k, v in zip(keys, vec)}
    return {k: mean[k] for k in values}


def all_ranks(flag: bool, world: int, device: torch.device) -> bool:
    """True when `flag` holds on every rank (so that all ranks stop together, none waits forever)."""
    if world <= 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's x [n, ...] into [world * n, ...] (rank order), keeping the gradient.

    Rank r's loss L_r depends on every rank's rows, so the gradient reaching this rank's x is the
    sum over ranks of dL_r/dx: backward all-reduces (sums) the gradient of the whole concatenation
    and keeps this rank's rows. DDP then averages the parameter gradients over the ranks, which
    gives the gradient of mean_r L_r, the global batch's loss (docs/method.md, D-DDP)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place; autograd's tensor is not ours
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x, concatenated in rank order, differentiable (see `_GatherWithGrad`)."""
    return _GatherWithGrad.apply(x)


def all_gather_list(items: Sequence) -> list:
    """Every rank's list of picklable items, concatenated in rank order."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


class RankBatches(Sampler[list[int]]):
    """Rank `rank`'s slice of each batch that `batches` yields: the ranks together see exactly those
    batches (e.g. the single-process BatchSampler's), each rank len(batch) / world items of each."""

    def __init__(self, batches: Iterable[list[int]], rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            n = len(batch) // self.world
            yield batch[self.rank * n:(self.rank + 1) * n]

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]
