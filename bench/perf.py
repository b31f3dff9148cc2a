"""Speed of EHIN and the TRIS-like config: training throughput, inference latency, peak memory.

    python -m bench.perf --device cuda --size paper --out reports/perf/h100.json
    python -m bench.perf --device cpu --size small             # CI's smoke check of this script
    python -m bench.perf --size gpu --configs tris --skip infer,stage2 --procs 16   # cells packed on one GPU
    python -m bench.perf --configs ehin --skip train,stage2 --cuda-graph --fold-bn --bf16-backbone   # inference

`paper` size: RN50 architecture (random weights: timing does not need trained ones), 320 px,
N 24, K 6, frozen ViT-B-32 scorer at 224. `small`: the synthetic profile's models at 64 px; `gpu`:
the gpu profile's (the small CLIP at 128 px).
Every figure is a median over repeated runs after warm-up, CUDA synchronised; the JSON names the
device and library versions. Levers are flags so each can be measured on its own.

`--procs N` runs N copies of the measurement at once, each its own process on the one device, as
`bench.run --jobs N` packs cells: they start timing together (a barrier after the warm-up) and the JSON
gives each process's figures and, under `results`, the throughputs summed and the latencies' median.

`--ddp N` times the training steps data-parallel, as the trainers run under torchrun: N ranks on this
machine (one GPU each over NCCL; gloo on CPU), each on its share of the same global batch (stage 1:
D-DDP, texts gathered over the ranks). One process first times the same global batch alone; `results`
are rank 0's figures (global images per second) and `scaling` their ratio to that process's, per part.
"""
from __future__ import annotations

import argparse
import gzip
import json
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import ehin  # noqa: F401  (the torchvision shim must run before open_clip is imported)
from bench.mps import active as mps_active, add_mps_arg, mps_daemon
from ehin.cli import UserError, command, command_parser

CONFIGS = {
    "ehin": {},
    # METHOD §8: the TRIS-like baseline.
    "tris": {"model.n_layers": 1, "model.bp_attention": "tokens", "loss.cl_variant": "late", "loss.bg": 0,
             "data.K": 3},
}
SIZES = {
    "paper": {"profile": "paper", "overrides": {"backbone.pretrained": None, "scorer.pretrained": None,
                                                 "data.dataset": "refcoco+"}},
    "small": {"profile": "synthetic", "overrides": {"backbone.pretrained": None, "scorer.pretrained": None}},
    "gpu": {"profile": "gpu", "overrides": {"backbone.pretrained": None, "scorer.pretrained": None}},
}
# Set by --barrier (the children of --procs): called between a measurement's warm-up and its timing.
_barrier: Callable[[], None] | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    if _barrier is not None:
        _barrier()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def cuda_graphed(fn: Callable[..., torch.Tensor], *example: torch.Tensor) -> Callable[..., torch.Tensor]:
    """`fn` captured once as a CUDA graph on static copies of `example`; a call copies its inputs in and
    replays. Batch-1 inference is bound by launching a few hundred small kernels, which a replay skips."""
    static = [a.clone() for a in example]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs requires
        for _ in range(3):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)

    def replay(*args: torch.Tensor) -> torch.Tensor:
        for dst, src in zip(static, args):
            dst.copy_(src)
        graph.replay()
        return out

    return replay


def profile_step(fn: Callable[[], object], device: torch.device, out: Path, name: str, *, steps: int = 3,
                 rows: int = 30) -> str:
    """torch.profiler over `steps` calls of `fn`: the top kernels by device time as text (and a Chrome
    trace beside it, gzipped), so a slow step can be read without rerunning it."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    _sync(device)
    with profile(activities=acts, record_shapes=False) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.txt").write_text(f"# {name}: {steps} steps, sorted by {key}\n{table}\n")
    trace = out / f"{name}.trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(str(trace) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    return table


def _cfg(size: str, name: str, extra: dict) -> dict:
    from ehin.config import load_config

    spec = SIZES[size]
    return load_config(profile=spec["profile"], overrides={**spec["overrides"], **CONFIGS[name], **extra})


def _fake_batch(cfg: dict, device: torch.device, tokenize) -> dict:
    n, k, s = cfg["train"]["batch_size"], cfg["data"]["K"], cfg["data"]["image_size"]
    g = torch.Generator().manual_seed(0)
    words = ["red", "blue", "green", "circle", "square", "left", "big", "small", "man", "dog", "the", "on"]
    sent = [" ".join(words[j] for j in torch.randint(len(words), (4,), generator=g).tolist()) + f" {i}" for i in range(n)]
    negs = [[f"{s_} other {j}" for j in range(k)] for s_ in sent]
    return {
        "image": torch.rand(n, 3, s, s, generator=g).to(device),
        "tokens": tokenize(sent).to(device),
        "neg_tokens": tokenize([x for row in negs for x in row]).view(n, k, -1).to(device),
        "sentence": sent, "neg_sentences": negs,
    }


def _rank_share(batch: dict, rank: int, world: int) -> dict:
    """This rank's rows of a global batch (every field is per sample; the ranks divide it, main() checks),
    as the trainers' samplers give; copies, so the global batch's memory is not held (peak_mem_gb)."""
    if world == 1:
        return batch
    n = len(next(iter(batch.values()))) // world
    return {k: v[rank * n:(rank + 1) * n].clone() if torch.is_tensor(v) else v[rank * n:(rank + 1) * n]
            for k, v in batch.items()}


def stage1_training(cfg: dict, device: torch.device, *, amp: bool, channels_last: bool, fused: bool,
                    warmup: int, repeats: int, compile_mode: str | None = None, trace: Path | None = None,
                    trace_name: str = "train", rank: int = 0, world: int = 1) -> dict:
    """One training step's time on a fake batch of train.batch_size; with world > 1 this rank's share of
    it under DDP (the process group started), as ehin.train_stage1 steps."""
    from ehin.distributed import data_parallel, sync_batchnorm
    from ehin.losses import Stage1Loss
    from ehin.model import build_model
    from ehin.train_stage1 import build_scorer, compile_for_training, forward_loss

    model = sync_batchnorm(build_model(cfg), device, world).to(device)
    scorer = build_scorer(cfg)
    scorer = scorer.to(device) if scorer is not None else None
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = Stage1Loss.from_config(cfg, scorer)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused and device.type == "cuda")
    net = data_parallel(model, device, world, find_unused=True)
    forward = compile_for_training(net, scorer, compile_mode) if compile_mode is not None else net
    batch = _rank_share(_fake_batch(cfg, device, model.backbone.tokenize), rank, world)
    if channels_last:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            total, _ = forward_loss(forward, loss_fn, batch, world)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_fn(step, device, warmup=warmup, repeats=repeats)
    n = cfg["train"]["batch_size"]
    res = {"step_s": statistics.median(times), "images_per_s": n / statistics.median(times)}
    if device.type == "cuda":
        res["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    if trace is not None:
        profile_step(step, device, trace, trace_name)
    return res


def inference_model(cfg: dict, device: torch.device, *, fold_bn: bool = False, bf16_backbone: bool = False,
                    channels_last: bool = False) -> torch.nn.Module:
    """EHIN as bench.perf times its inference: in eval mode, the RN trunk's BatchNorms folded into their
    convolutions (`fold_bn`, in fp32 before any cast), the CLIP backbone's weights cast to bf16 once
    (`bf16_backbone`: autocast casts each weight again on every call, which at batch 1 costs launches;
    the head stays fp32, as HIPM's InstanceNorms over near-constant maps lose too much in bf16), channels-last."""
    from ehin.model import build_model

    model = build_model(cfg).to(device).eval()
    if fold_bn:
        model.backbone.fold_batchnorms()
    if bf16_backbone:
        model.backbone.to(torch.bfloat16)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def stage1_inference(cfg: dict, device: torch.device, *, amp: bool, channels_last: bool, compile_: str | None,
                     warmup: int, repeats: int, throughput_batch: int, cuda_graph: bool = False,
                     fold_bn: bool = False, bf16_backbone: bool = False, trace: Path | None = None,
                     trace_name: str = "infer") -> dict:
    """Batch-1 forward and end-to-end latency and batch-`throughput_batch` images/s of stage 1's maps.
    `bf16_backbone` runs the backbone in bf16 and the head in fp32, without autocast (`amp` does not apply)."""
    from ehin import metrics as M
    from ehin.predict import read_image

    model = inference_model(cfg, device, fold_bn=fold_bn, bf16_backbone=bf16_backbone, channels_last=channels_last)
    # compiled, inductor fuses the elementwise chain between two convolutions (the folded convolutions' bias
    # adds, ReLUs, residual adds) into one kernel; eager runs each alone, which took most of batch-64
    # inference's device time on an H200 (reports/perf/profile_amp_cl_foldbn_infer/)
    predict = torch.compile(model.predict, mode=compile_) if compile_ else model.predict
    dtype = torch.bfloat16 if bf16_backbone else torch.float32  # the images enter the backbone
    s = cfg["data"]["image_size"]
    tokens1 = model.backbone.tokenize(["the red circle on the left"]).to(device)
    x1 = torch.rand(1, 3, s, s, device=device, dtype=dtype)

    @torch.no_grad()
    def fwd(x, t):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and not bf16_backbone):
            return predict(x, t)

    xb = torch.rand(throughput_batch, 3, s, s, device=device, dtype=dtype)
    tb = tokens1.expand(throughput_batch, -1).contiguous()
    fwd1 = fwdb = fwd
    if cuda_graph and device.type == "cuda":
        fwd1, fwdb = cuda_graphed(fwd, x1, tokens1), cuda_graphed(fwd, xb, tb)
    lat = time_fn(lambda: fwd1(x1, tokens1), device, warmup=warmup, repeats=repeats)
    thr = time_fn(lambda: fwdb(xb, tb), device, warmup=max(2, warmup // 4), repeats=max(3, repeats // 4))
    if trace is not None:
        profile_step(lambda: fwd1(x1, tokens1), device, trace, trace_name + "_bs1", steps=10)
        profile_step(lambda: fwdb(xb, tb), device, trace, f"{trace_name}_bs{throughput_batch}", steps=3)

    # End to end: image file -> resized tensor -> map -> mask at the original size.
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "img.jpg"
        Image.fromarray((np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)).save(path)

        @torch.no_grad()
        def e2e():
            img = read_image(path)
            x = torch.from_numpy(np.array(Image.fromarray(img).resize((s, s), Image.BILINEAR)))
            x = x.permute(2, 0, 1).float().div(255).unsqueeze(0).to(device, dtype)
            t = model.backbone.tokenize(["the red circle on the left"]).to(device)
            m = fwd1(x, t)[0].float()
            return M.stage1_map(m, (s, s), img.shape[:2]) > 0

        e2e_t = time_fn(e2e, device, warmup=warmup, repeats=repeats)
    return {"forward_ms_bs1": 1000 * statistics.median(lat), "end_to_end_ms_bs1": 1000 * statistics.median(e2e_t),
            f"images_per_s_bs{throughput_batch}": throughput_batch / statistics.median(thr)}


def stage2_speed(cfg: dict, device: torch.device, *, amp: bool, warmup: int, repeats: int, rank: int = 0,
                 world: int = 1, channels_last: bool = False, fused: bool = False,
                 compile_mode: str | None = None) -> dict:
    """Stage 2's training step (global batch stage2.batch_size; with world > 1 this rank's share under
    DDP, as ehin.train_stage2, with its levers: channels-last, Adam's fused kernel, the compiled forward)
    and its batch-1 forward (eager)."""
    from ehin.distributed import data_parallel
    from ehin.stage2.losses import Stage2Loss
    from ehin.stage2.model import build_stage2
    from ehin.train_stage1 import compile_for_training

    model = build_stage2(cfg).to(device)
    n, s = cfg["stage2"]["batch_size"], cfg["data"]["image_size"]
    x = torch.rand(n, 3, s, s, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    tokens = model.backbone.tokenize([f"object number {i}" for i in range(n)]).to(device)
    target = (torch.rand(n, s, s, device=device) > 0.5).float()
    x, tokens, target = _rank_share({"x": x, "tokens": tokens, "target": target}, rank, world).values()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, fused=fused and device.type == "cuda")
    loss_fn = Stage2Loss(cfg["stage2"]["dice_weight"])
    net = data_parallel(model, device, world)
    forward = compile_for_training(net, None, compile_mode) if compile_mode is not None else net

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = loss_fn(forward(x, tokens), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    tr = time_fn(step, device, warmup=warmup, repeats=repeats)
    model.eval()

    @torch.no_grad()
    def fwd():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return model.predict(x[:1], tokens[:1])

    lat = time_fn(fwd, device, warmup=warmup, repeats=repeats)
    return {"train_images_per_s": n / statistics.median(tr), "forward_ms_bs1": 1000 * statistics.median(lat)}


def file_barrier(folder: Path, rank: int, procs: int, timeout_s: float = 600.0) -> Callable[[], None]:
    """A barrier of `procs` processes through files in `folder`: the k-th call of every process returns
    once all of them have made their k-th call."""
    count = [0]

    def wait() -> None:
        count[0] += 1
        (folder / f"{count[0]}.{rank}").touch()
        t0 = time.monotonic()
        while len(list(folder.glob(f"{count[0]}.*"))) < procs:
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"bench.perf --procs: process {rank} waited {timeout_s:.0f} s at barrier {count[0]}")
            time.sleep(0.01)

    return wait


def is_throughput(key: str) -> bool:
    """A figure per second (images_per_s, images_per_s_bs64), which processes running at once add up."""
    return re.search(r"_per_s(_|$)", key) is not None


def packed(argv: list[str], procs: int) -> dict:
    """Run this command (`argv`, without --procs/--out) as `procs` processes at once; their reports,
    combined: throughputs (`_per_s` keys, `images_per_s_bs64` too) summed, everything else the median over
    processes."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"proc{i}.json" for i in range(procs)]
        children = [subprocess.Popen([sys.executable, "-m", "bench.perf", *argv, "--out", str(out),
                                      "--barrier", f"{tmp}:{i}:{procs}"], stdout=subprocess.DEVNULL)
                    for i, out in enumerate(outs)]
        _wait_all(children, "--procs")
        reports = [json.loads(out.read_text()) for out in outs]
    combined = {**reports[0], "procs": procs, "per_process": [r["results"] for r in reports], "results": {}}
    for name, parts in reports[0]["results"].items():
        combined["results"][name] = {
            part: {k: (sum if is_throughput(k) else statistics.median)([r["results"][name][part][k] for r in reports])
                   for k in figures}
            for part, figures in parts.items()}
    return combined


def _wait_all(children: list, option: str) -> None:
    """Wait for every child process (ehin.distributed.wait_all: one that fails stops the rest), and exit
    naming the failed ones."""
    from ehin.distributed import wait_all

    failed = wait_all(children)
    if failed:
        raise SystemExit(f"bench.perf {option}: process(es) {failed} failed")


def data_parallel_scaling(argv: list[str], ranks: int, device: str) -> dict:
    """Time this command (`argv`, without --ddp/--out) in one process, then as `ranks` DDP ranks of one
    job on this machine (ehin.distributed.run_local_ranks); rank 0's report with the single
    process's results beside it and `scaling`: each throughput of the job over the single process's."""
    import subprocess

    from ehin.distributed import RankFailed, run_local_ranks

    with tempfile.TemporaryDirectory() as tmp:
        single = Path(tmp) / "single.json"
        _wait_all([subprocess.Popen([sys.executable, "-m", "bench.perf", *argv, "--out", str(single)],
                                    stdout=subprocess.DEVNULL)], "--ddp (the single process)")
        job = Path(tmp) / "job.json"  # rank 0 writes the job's report
        try:
            run_local_ranks(["-m", "bench.perf", *argv, "--out", str(job)], ranks, device, what="bench.perf --ddp")
        except RankFailed as e:
            raise SystemExit(str(e)) from None
        report, alone = json.loads(job.read_text()), json.loads(single.read_text())
    # each part's one throughput (stage 1: images_per_s; stage 2: train_images_per_s), job over single process
    report.update(ddp=ranks, single=alone["results"], scaling={
        name: {part: next(v / alone["results"][name][part][k] for k, v in figures.items() if k.endswith("_per_s"))
               for part, figures in parts.items()}
        for name, parts in report["results"].items()})
    return report


def environment(device: torch.device) -> dict:
    import open_clip

    env = {"python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), mps=mps_active())
    return env


def inference_time_cell(cfg: dict, run_dir: Path, **_: object) -> dict:
    """Table 10's cell: seconds per sample at batch 1 (forward and end to end), on this machine."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    r = stage1_inference(cfg, device, amp=False, channels_last=False, compile_=None, warmup=5, repeats=30,
                         throughput_batch=8)
    return {"metrics": {"seconds_per_sample": r["end_to_end_ms_bs1"] / 1000,
                        "forward_seconds_per_sample": r["forward_ms_bs1"] / 1000},
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


@command
def main(argv: list[str] | None = None) -> None:
    p = command_parser("python -m bench.perf", __doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="default: cuda when there is a GPU, else cpu")
    p.add_argument("--size", default="paper", choices=sorted(SIZES), help="model and input sizes (default: paper)")
    p.add_argument("--configs", default="ehin,tris", help="comma-separated: ehin, tris (default: both)")
    p.add_argument("--out", help="write the JSON here")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format for the model and images")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the inference forward; MODE is torch.compile's (default: default; reports "
                        "written before session 20 that say \"compile\": true used max-autotune)")
    p.add_argument("--compile-train", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the training forward (EHIN and the frozen scorer's image tower; stage 2's "
                        "network); MODE is "
                        "torch.compile's (default, reduce-overhead: CUDA graphs, max-autotune)")
    p.add_argument("--fused-adamw", action="store_true",
                   help="the optimizer's fused kernel: stage 1's AdamW, stage 2's Adam (CUDA only)")
    p.add_argument("--cuda-graph", action="store_true", help="replay the inference forward as a CUDA graph")
    p.add_argument("--fold-bn", action="store_true",
                   help="fold the RN trunk's BatchNorms into their convolutions for inference (ClipBackbone.fold_batchnorms)")
    p.add_argument("--bf16-backbone", action="store_true",
                   help="inference with the CLIP backbone's weights cast to bf16 once and the head in fp32, without "
                        "autocast (training keeps --amp's choice)")
    p.add_argument("--fast-norm", action="store_true",
                   help="HIPM's InstanceNorms in closed form and as plain ops (model.pair_norm=fast)")
    p.add_argument("--trace", help="folder for torch.profiler tables and Chrome traces of a step")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 small, 5 paper)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default: 5 small, 20 paper)")
    p.add_argument("--batch", type=int, default=None, help="override N (train.batch_size)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: train, infer, stage2 (default: none)")
    p.add_argument("--procs", type=int, default=1,
                   help="run N copies at once, each its own process on the device (default: 1)")
    p.add_argument("--ddp", type=int, default=1, metavar="N",
                   help="time the training steps as one DDP job of N ranks on this machine against one process "
                        "(writes `scaling`; inference is left out; default: 1, no DDP)")
    add_mps_arg(p)
    p.add_argument("--barrier", help=argparse.SUPPRESS)  # FOLDER:RANK:PROCS, set by --procs for its children
    args = p.parse_args(argv)
    global _barrier
    if args.mps and args.procs < 2:
        raise UserError("bench.perf: --mps shares the GPU between the processes of --procs N (N >= 2)")
    if args.ddp > 1:
        if args.procs > 1 or args.trace or args.mps:
            raise UserError("bench.perf --ddp: one data-parallel job; leave out --procs, --mps and --trace")
        if args.device == "cuda" and args.ddp > torch.cuda.device_count():
            raise UserError(f"bench.perf --ddp {args.ddp}: one GPU per rank, and this machine has "
                            f"{torch.cuda.device_count()}")
        for name in args.configs.split(","):  # the trainers refuse a global batch the ranks do not divide
            cfg = _cfg(args.size, name, {"train.batch_size": args.batch} if args.batch else {})
            for key in ("train", "stage2"):
                if cfg[key]["batch_size"] % args.ddp:
                    raise UserError(f"bench.perf --ddp {args.ddp}: {key}.batch_size {cfg[key]['batch_size']} "
                                    "is not divisible by the ranks")
        own = _without(list(argv if argv is not None else sys.argv[1:]), ("--ddp", "--out", "--skip"))
        skip = ",".join(sorted(set(filter(None, args.skip.split(","))) | {"infer"}))
        report = data_parallel_scaling([*own, "--skip", skip, "--device", args.device], args.ddp, args.device)
        print(json.dumps({"results": report["results"], "scaling": report["scaling"]}, indent=1))
        _write(report, args.out)
        return
    if args.procs > 1:
        if args.trace:
            raise SystemExit("bench.perf: --trace profiles one process; leave out --procs")
        own = list(argv if argv is not None else sys.argv[1:])
        with mps_daemon() if args.mps else nullcontext():
            report = packed(_without([a for a in own if a != "--mps"], ("--procs", "--out")), args.procs)
        print(json.dumps(report["results"], indent=1))
        _write(report, args.out)
        return
    if args.barrier:
        folder, rank, procs = args.barrier.rsplit(":", 2)
        _barrier = file_barrier(Path(folder), int(rank), int(procs))

    from ehin.distributed import init_distributed

    # a rank of --ddp's job (torchrun's environment): the process group, and this rank's GPU
    rank, world, device = init_distributed(torch.device(args.device))
    small = args.size == "small"
    warmup = args.warmup if args.warmup is not None else (2 if small else 5)
    repeats = args.repeats if args.repeats is not None else (5 if small else 20)
    skip = set(filter(None, args.skip.split(",")))
    extra = {"train.batch_size": args.batch} if args.batch else {}
    if args.fast_norm:
        extra["model.pair_norm"] = "fast"
    trace = Path(args.trace) if args.trace else None
    report = {"size": args.size, "device": str(device), "levers": {"amp": args.amp, "channels_last": args.channels_last,
              "compile": args.compile, "compile_train": args.compile_train, "fused_adamw": args.fused_adamw,
              "cuda_graph": args.cuda_graph, "fast_norm": args.fast_norm, "fold_bn": args.fold_bn,
              "bf16_backbone": args.bf16_backbone},
              "environment": environment(device), "world_size": world,
              "results": {}}
    for name in args.configs.split(","):
        cfg = _cfg(args.size, name, extra)
        torch.manual_seed(0)
        r: dict = {}
        if "train" not in skip:
            r["stage1_train"] = stage1_training(cfg, device, amp=args.amp, channels_last=args.channels_last,
                                                fused=args.fused_adamw, warmup=warmup, repeats=repeats,
                                                compile_mode=args.compile_train, trace=trace, trace_name=f"{name}_train",
                                                rank=rank, world=world)
        if "infer" not in skip:
            r["stage1_infer"] = stage1_inference(cfg, device, amp=args.amp, channels_last=args.channels_last,
                                                 compile_=args.compile, warmup=warmup, repeats=repeats,
                                                 throughput_batch=8 if small else 64, cuda_graph=args.cuda_graph,
                                                 fold_bn=args.fold_bn, bf16_backbone=args.bf16_backbone, trace=trace,
                                                 trace_name=f"{name}_infer")
        if "stage2" not in skip and name == "ehin":
            r["stage2"] = stage2_speed(cfg, device, amp=args.amp, warmup=warmup, repeats=repeats, rank=rank,
                                       world=world, channels_last=args.channels_last, fused=args.fused_adamw,
                                       compile_mode=args.compile_train)
        report["results"][name] = r
        print(name, json.dumps(r, indent=1))
    if rank == 0:  # under --ddp, the job's report
        _write(report, args.out)
    if world > 1:
        torch.distributed.destroy_process_group()


def _without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """`argv` less each of `options` and its value (`--opt V` or `--opt=V`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif not a.startswith(tuple(o + "=" for o in options)):
            out.append(a)
    return out


def _write(report: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
