"""DDP on CPU with gloo and 2 processes (docs/method.md §7 and D-DDP).

Stage 2: the gradients DDP averages over the ranks equal the single-process gradients of the same loss
on the same global batch. Every stage-2 loss term is a per-sample mean over the batch
(ehin/stage2/losses.py) and the network has no batch statistics (GroupNorm decoder, frozen
BatchNorm), so the global-batch loss is the mean of the two half-batch losses, and DDP's gradient
all-reduce is exactly that mean.

Stage 1: EHIN's loss is not a per-sample mean: every image is fused with every text of the batch, L_FG
is a soft-margin over the N x N matrix and the foreground share behind psi is a softmax over all N
texts. The mean of two half-batch losses (each its own 2 x 2 matrix) is another loss (fewer
negatives), and the test shows its gradient differs. train_stage1 (D-DDP) gathers the texts of every
rank with their gradient, so each rank computes its rows of the global 4 x 4 maps; the loss is a mean
over rows (images), so the global loss is the mean of the ranks' losses and DDP's average is the
single-process gradient. The test compares against the single-process gradient computed in this
process. The tiny CLIP is a ViT (LayerNorm; EHIN's InstanceNorm normalises each pair over its
pixels): nothing holds batch statistics. RN trunks' BatchNorm becomes SyncBatchNorm under DDP on GPUs
(ehin.distributed.sync_batchnorm); torch's SyncBatchNorm runs on GPUs only, so that case is not
covered here.

Tolerance: float32 summation order differs between one batch of 4 and two of 2, so stage 2 uses
rtol 1e-4 / atol 1e-6. Stage 1 runs EHIN in float64 (the loss and the frozen scorer cast to float32
as in training): in float32 the InstanceNorms of HIPM amplify rounding (a pair whose features are
nearly constant over the pixels is divided by a tiny deviation), and the conv biases right before
them have an exact gradient of 0, so float32 results differ by rounding noise up to 1e-4 of the
largest gradient. In float64 the two computations agree to ~1e-13, so rtol 1e-7 / atol 1e-10.
The workers leave through os._exit after a barrier (see `_leave`).
"""
from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ehin  # noqa: F401  (torchvision shim before open_clip)

WORLD = 2
IMAGE = 64
# Rows 0 and 3 (on different ranks) share a sentence: L_FG must mask that pair across the ranks.
SENTENCES = ["red circle", "the big blue square", "green", "red circle"]
NEGATIVES = [["green", "tiny square"], ["red circle", "green"], ["blue", "small triangle"], ["green", "blue"]]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch built without gloo")


def _join(rank: int, port: int) -> torch.device:
    """Set torchrun's environment and initialise the trainers' process group (gloo on CPU)."""
    from ehin.distributed import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    r, world, device = init_distributed(torch.device("cpu"))
    assert (r, world, device.type) == (rank, WORLD, "cpu") and dist.get_backend() == "gloo"
    return device


def _leave() -> None:
    # Leave without tearing down: freeing the DDP reducer can destroy the gloo process group while
    # holding the GIL that its run-loop thread waits for (a deadlock seen in torch 2.13 under load).
    dist.barrier()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args, timeout: float = 300) -> None:
    """Run fn(rank, port, *args) in WORLD processes; fail (not hang) if they are not done in time. The free
    port is free when picked, not when rank 0 binds it seconds later (the other pytest worker's processes
    may take it first): a bind that fails so is tried once more on another port."""
    for attempt in range(2):
        ctx = mp.spawn(fn, args=(_free_port(), *args), nprocs=WORLD, join=False)
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    pytest.fail(f"the {WORLD} DDP processes did not finish within {timeout:.0f} s")
            return
        except mp.ProcessRaisedException as e:
            for p in ctx.processes:
                p.kill()
            if attempt or "address already in use" not in str(e).lower():
                raise


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---- stage 2 ------------------------------------------------------------------------------------------

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


def _grad_worker(rank: int, port: int, out: str, step) -> None:
    """One rank: join the group, `step(rank, device)` -> (loss of this rank's rows, the model, its DDP
    wrapper), backward through that wrapper, and rank 0 saves the model's gradients to `out`. The wrapper
    is held until backward is done: its reducer's hooks are what average the gradients."""
    device = _join(rank, port)
    loss, model, wrapper = step(rank, device)
    loss.backward()
    if rank == 0:
        torch.save(_grads(model), out)
    _leave()


def _ddp_grads(tmp_path, step) -> dict[str, torch.Tensor]:
    """Rank 0's gradients after `step` on WORLD ranks; this process then computes with one thread."""
    out = str(tmp_path / "grads.pt")
    _spawn(_grad_worker, out, step)
    torch.set_num_threads(1)
    return torch.load(out)


def _stage2_step(rank: int, device: torch.device):
    from ehin.distributed import data_parallel
    from ehin.stage2.losses import Stage2Loss

    net = _net().train()
    ddp = data_parallel(net, device, WORLD)  # the trainer's own wrapping
    images, tokens, labels = _global_batch(net.backbone.tokenize)
    part = slice(rank * 2, rank * 2 + 2)
    loss, _ = Stage2Loss()(ddp(images[part], tokens[part]), labels[part])
    return loss, net, ddp


def test_ddp_gradients_equal_single_process(tmp_path):
    from ehin.stage2.losses import Stage2Loss

    ddp_grads = _ddp_grads(tmp_path, _stage2_step)
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


# ---- stage 1 ------------------------------------------------------------------------------------------

def _stage1_parts():
    """EHIN on the random tiny CLIP (64 px, C_d 16) and Stage1Loss with every term on (L_FG, early L_CL,
    L_BG through a random tiny frozen scorer), built from the same seed in every process."""
    from ehin.config import load_config
    from ehin.losses import Stage1Loss
    from ehin.model import build_model
    from ehin.model.scorer import build_frozen_scorer

    cfg = load_config(overrides=["backbone.arch=clip-tiny", "scorer.arch=clip-tiny", f"scorer.image_size={IMAGE}",
                                 f"data.image_size={IMAGE}", "model.hidden_dim=16", "data.K=2",
                                 f"train.batch_size={2 * WORLD}"])
    torch.manual_seed(0)
    model = build_model(cfg).double().train()  # float64: see the module docstring
    return model, Stage1Loss.from_config(cfg, build_frozen_scorer(cfg))


def _stage1_batch(tokenize, rows: slice = slice(None)) -> dict:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(len(SENTENCES), 3, IMAGE, IMAGE, generator=g, dtype=torch.float64)
    return {"image": images[rows], "tokens": tokenize(SENTENCES)[rows], "sentence": SENTENCES[rows],
            "neg_sentences": NEGATIVES[rows]}


def _stage1_step(rank: int, device: torch.device):
    from ehin.distributed import data_parallel
    from ehin.train_stage1 import forward_loss

    model, loss_fn = _stage1_parts()
    net = data_parallel(model, device, WORLD, find_unused=True)  # as train_stage1 wraps it
    batch = _stage1_batch(model.backbone.tokenize, slice(rank * 2, rank * 2 + 2))
    total, _ = forward_loss(net, loss_fn, batch, WORLD)
    return total, model, net


def test_stage1_ddp_gradients_equal_single_process_global_batch(tmp_path):
    from ehin.train_stage1 import forward_loss

    ddp_grads = _ddp_grads(tmp_path, _stage1_step)
    model, loss_fn = _stage1_parts()
    tokenize = model.backbone.tokenize
    total, terms = forward_loss(model, loss_fn, _stage1_batch(tokenize))
    assert all(float(terms[k]) > 0 for k in ("fg", "cl", "bg"))  # every term contributes
    total.backward()
    single = _grads(model)

    # the CLIP parameters EHIN does not use keep no gradient under DDP too (AdamW leaves them alone)
    assert set(single) == set(ddp_grads) and len(single) > 50
    assert "backbone.clip.visual.proj" not in single
    for name, g in single.items():
        assert torch.allclose(ddp_grads[name], g, rtol=1e-7, atol=1e-10), name

    # Without the gathered texts each rank would train on its own 2 x 2 pairs: the mean of those
    # two losses' gradients is another gradient (which is why D-DDP gathers).
    model.zero_grad()
    for rows in (slice(0, 2), slice(2, 4)):
        half, _ = forward_loss(model, loss_fn, _stage1_batch(tokenize, rows))
        (half / WORLD).backward()
    assert any(not torch.allclose(p.grad, single[n], rtol=1e-3, atol=1e-5)
               for n, p in model.named_parameters() if p.grad is not None)


def test_rank_batches_split_the_single_process_batches():
    """Under DDP the ranks together train on exactly the batches one process would (same shuffle)."""
    from ehin.train_stage1 import train_loader

    ds = list(range(23))

    def batches(rank: int, world: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(7)
        return [b.tolist() for b in train_loader(ds, 6, gen, None, 0, rank, world)]

    single = batches(0, 1)
    assert len(single) == 3 and [x for b in single for x in b] != list(range(18))  # shuffled, rest dropped
    parts = [batches(r, 3) for r in range(3)]
    assert [sum((p[i] for p in parts), []) for i in range(len(single))] == single
    assert all(len(b) == 2 for p in parts for b in p)


# Stage-1 training in 2 processes, then the same in one: a few seconds of training each.
TINY = ["backbone.pretrained=null", "synthetic.images=60", "train.epochs=1", "eval.max_items=16",
        "train.threads=1", "model.hidden_dim=16"]


def _train_worker(rank: int, port: int, out: str) -> None:
    from ehin.config import load_config
    from ehin.train_stage1 import run

    _join(rank, port)
    result = run(load_config(profile="smoke", overrides=TINY), out, progress=False)
    assert result["world_size"] == WORLD and (rank == 0) == bool(result["metrics"])
    _leave()


@pytest.mark.slow
def test_stage1_trains_under_ddp_like_one_process(tmp_path):
    from ehin.config import load_config
    from ehin.train_stage1 import run

    _spawn(_train_worker, str(tmp_path / "ddp"))
    result = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert result["world_size"] == WORLD and result["metrics"]["n"] == 16
    assert {p.name for p in (tmp_path / "ddp").iterdir()} >= {"config.yaml", "metrics.jsonl", "tb", "checkpoints"}

    torch.set_num_threads(1)
    single = run(load_config(profile="smoke", overrides=TINY), tmp_path / "single", progress=False)
    assert single["world_size"] == 1
    # the same batches and the same gradients: the epoch's mean losses agree up to float rounding.
    # (Weights are not compared: parameters whose exact gradient is 0 (attention key biases, conv biases
    # before an InstanceNorm) get rounding-noise gradients, which Adam scales up to full-size steps.)
    ddp, one = result["history"][0], single["history"][0]
    for key in ("loss", "fg", "cl", "bg"):
        assert ddp[key] == pytest.approx(one[key], rel=1e-4), key


def test_launch_ddp_checks_before_queueing(tmp_path, capsys):
    """bench.launch_ddp refuses, before anything reaches SLURM, a global batch the ranks cannot split
    and a command line without the trainer's arguments."""
    from bench.launch_ddp import main

    with pytest.raises(SystemExit) as e:
        main(["--nodes", "1", "--tasks-per-node", "5", "--", "--profile", "smoke", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "train.batch_size 24 is not divisible by the 5 ranks" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--stage", "2", "--tasks-per-node", "2", "--", "--pseudo", "p.npz", "--profile", "smoke",
              "--set", "stage2.batch_size=9", "--out", str(tmp_path / "y")])
    assert e.value.code == 2 and "stage2.batch_size 9 is not divisible by the 2 ranks" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--nodes", "2"])
    assert e.value.code == 2 and "after `--`" in capsys.readouterr().err


def test_a_failed_rank_stops_the_job_and_names_its_log(tmp_path):
    """ehin.distributed.run_local_ranks: rank 1 exits 3 (once rank 0 has written its line) while rank 0
    would wait a minute (as in a collective): the job ends at once, rank 0 stopped, and the error names
    rank 1, its log and the log's last lines."""
    from ehin.distributed import RankFailed, run_local_ranks

    code = ("import os, sys, time; r = os.environ['RANK']; print('rank', r, 'of', os.environ['WORLD_SIZE']); "
            "sys.stdout.flush(); log0 = sys.argv[1]\n"
            "if r == '1':\n    while not os.path.getsize(log0): time.sleep(0.05)\n    print('gave up'); sys.exit(3)\n"
            "time.sleep(60)")
    t0 = time.time()
    with pytest.raises(RankFailed) as e:
        run_local_ranks(["-c", code, str(tmp_path / "rank0.log")], 2, "cpu", logs=tmp_path, what="the job")
    assert time.time() - t0 < 30
    assert str(e.value) == f"the job: rank(s) 1 of 2 failed (exit 3); see {tmp_path}/rank1.log\n  rank 1 of 2\n  gave up"
    assert (tmp_path / "rank0.log").read_text() == "rank 0 of 2\n"


def test_sigterm_to_the_launcher_stops_its_ranks(tmp_path):
    """A SIGTERM to the process that started the ranks (a time limit, `kill`) ends it and its ranks: none
    trains on, holding a GPU and writing the run's checkpoint, after the launcher is gone."""
    import signal
    import subprocess
    import sys

    rank = ("import os, time; open(os.path.join(os.environ['PIDS'], os.environ['RANK']), 'w').write(str(os.getpid())); "
            "time.sleep(120)")
    launcher = subprocess.Popen([sys.executable, "-c", "import sys; from ehin.distributed import run_local_ranks; "
                                 f"run_local_ranks(['-c', {rank!r}], 2, 'cpu', logs=None)"],
                                env={**os.environ, "PIDS": str(tmp_path)})
    deadline = time.time() + 60
    while len(list(tmp_path.iterdir())) < 2 or any(not p.read_text() for p in tmp_path.iterdir()):
        assert time.time() < deadline and launcher.poll() is None
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in tmp_path.iterdir()]
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 128 + signal.SIGTERM
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
