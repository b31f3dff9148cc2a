"""bench.perf at --size small on CPU: the smoke check of the GPU speed script (issue: speed on the GPU)."""
import json

import pytest
import torch

from bench.perf import _without, cuda_graphed, inference_model, main, stage1_inference, time_fn


def test_perf_small_cpu_writes_json_and_profile(tmp_path):
    out = tmp_path / "perf.json"
    main(["--device", "cpu", "--size", "small", "--configs", "ehin", "--warmup", "0", "--repeats", "1",
          "--out", str(out), "--trace", str(tmp_path / "trace")])
    report = json.loads(out.read_text())
    r = report["results"]["ehin"]
    n = 24  # the synthetic profile's batch: images per step
    train = r["stage1_train"]
    assert train["images_per_s"] == pytest.approx(n / train["step_s"])  # throughput from the measured step
    assert 0 < train["step_s"] < 600
    infer = r["stage1_infer"]
    # batch 8 is not slower per image than 8 calls at batch 1 by more than the noise of one repeat
    assert 0 < infer["forward_ms_bs1"] and 0 < infer["images_per_s_bs8"]
    assert infer["end_to_end_ms_bs1"] > 0  # (no ratio to the forward: one repeat of each is timing noise)
    assert r["stage2"]["train_images_per_s"] > 0
    assert report["environment"]["torch"] == torch.__version__
    table = (tmp_path / "trace" / "ehin_train.txt").read_text()
    assert "self_cpu_time_total" in table and "aten::" in table
    assert (tmp_path / "trace" / "ehin_train.trace.json.gz").stat().st_size > 0
    # inference is profiled at batch 1 and at the throughput batch
    for name in ("ehin_infer_bs1", "ehin_infer_bs8"):
        assert "aten::" in (tmp_path / "trace" / f"{name}.txt").read_text(), name


def test_procs_packs_processes_and_sums_their_throughput(tmp_path):
    """--procs 2: two processes time the same training step at once (after a common barrier); the
    report keeps each one's figures and sums the throughputs."""
    out = tmp_path / "packed.json"
    main(["--device", "cpu", "--size", "small", "--configs", "tris", "--skip", "infer,stage2", "--warmup", "0",
          "--repeats", "1", "--procs", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["procs"] == 2 and len(report["per_process"]) == 2
    each = [r["tris"]["stage1_train"] for r in report["per_process"]]
    assert all(e["images_per_s"] > 0 for e in each)
    assert report["results"]["tris"]["stage1_train"]["images_per_s"] == pytest.approx(sum(e["images_per_s"] for e in each))
    assert report["results"]["tris"]["stage1_train"]["step_s"] == pytest.approx(sorted(e["step_s"] for e in each)[0] / 2
                                                                             + sorted(e["step_s"] for e in each)[1] / 2)


def test_without_drops_options_and_their_values():
    assert _without(["--size", "gpu", "--procs", "4", "--out=x.json", "--amp"], ("--procs", "--out")) == ["--size", "gpu", "--amp"]


def test_time_fn_measures_what_it_times():
    """A known answer for the timer every figure of bench.perf comes from: a 20 ms sleep."""
    import time

    times = time_fn(lambda: time.sleep(0.02), torch.device("cpu"), warmup=1, repeats=3)
    assert len(times) == 3 and all(0.02 <= t < 0.5 for t in times)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_of_ehin_predict_matches_eager():
    """What bench.perf times at batch 1 (--cuda-graph): EHIN's own forward captured and replayed on
    new inputs gives the eager maps."""
    from ehin.model import build_model
    from tests.test_model import tiny_cfg

    torch.manual_seed(0)
    model = build_model(tiny_cfg()).cuda().eval()
    x = torch.rand(1, 3, 64, 64, device="cuda")
    tokens = model.backbone.tokenize(["red circle"]).cuda()
    with torch.no_grad():
        g = cuda_graphed(model.predict, x, tokens)
        y = torch.rand(1, 3, 64, 64, device="cuda")
        t2 = model.backbone.tokenize(["the blue square on the left"]).cuda()
        torch.testing.assert_close(g(y, t2), model.predict(y, t2), rtol=1e-4, atol=1e-4)


def test_procs_stops_the_others_when_one_process_fails(monkeypatch):
    """A process that fails would leave the rest waiting at the barrier for its 600 s: they are killed
    and the failure is reported at once."""
    import subprocess
    import sys
    import time

    from bench.perf import packed

    real = subprocess.Popen
    started = []

    def fake(cmd, **kw):
        rank = int(cmd[cmd.index("--barrier") + 1].rsplit(":", 2)[1])
        code = "import sys; sys.exit(3)" if rank == 1 else "import time; time.sleep(120)"
        started.append(real([sys.executable, "-c", code], **kw))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", fake)
    t0 = time.monotonic()
    with pytest.raises(SystemExit, match=r"process\(es\) \[1\] failed"):
        packed(["--size", "smoke"], 3)
    assert time.monotonic() - t0 < 60 and all(p.poll() is not None for p in started)


def test_bf16_backbone_gives_the_fp32_maps_within_bf16_rounding():
    """--bf16-backbone (inference): the backbone's weights cast to bf16 once, BatchNorms folded first, the
    head in fp32; the maps track fp32's within autocast's error (or 2 % of their range, if that is larger), and
    the timing path runs with bf16 images and no autocast."""
    from tests.test_model import tiny_cfg

    cfg = tiny_cfg(**{"backbone.arch": "clip-tiny-rn"})
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    fp32 = inference_model(cfg, cpu)
    torch.manual_seed(0)
    bf16 = inference_model(cfg, cpu, fold_bn=True, bf16_backbone=True)
    assert {p.dtype for p in bf16.backbone.parameters()} == {torch.bfloat16}
    assert bf16.vis_proj.weight.dtype == torch.float32
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tokens = fp32.backbone.tokenize(["red circle", "the blue square on the left", "big green triangle"])
    with torch.no_grad():
        want, got = fp32.predict(x, tokens), bf16.predict(x.bfloat16(), tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = fp32.predict(x, tokens).float()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max() <= max((amp - want).abs().max(), 0.02 * want.abs().max())
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.9999
    r = stage1_inference(cfg, cpu, amp=True, channels_last=False, compile_=None, warmup=0, repeats=1,
                         throughput_batch=2, fold_bn=True, bf16_backbone=True)
    assert r["forward_ms_bs1"] > 0 and r["images_per_s_bs2"] > 0 and r["end_to_end_ms_bs1"] > 0


def test_ddp_times_one_job_of_two_ranks_against_one_process(tmp_path, capsys):
    """--ddp 2 on CPU (gloo): one process, then a DDP job of two ranks on the same global batch; the
    report is rank 0's (global images per second), the single process's beside it, and `scaling` is
    their ratio for each training part (stage 1 and stage 2). Inference is left out."""
    out = tmp_path / "ddp.json"
    main(["--device", "cpu", "--size", "small", "--configs", "ehin", "--warmup", "0", "--repeats", "1",
          "--ddp", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["ddp"] == 2 and report["world_size"] == 2  # rank 0 ran in a process group of two
    job, alone = report["results"]["ehin"], report["single"]["ehin"]
    assert set(job) == set(alone) == {"stage1_train", "stage2"}
    n = 24  # the synthetic profile's global batch, stage 1 and stage 2
    assert job["stage1_train"]["images_per_s"] == pytest.approx(n / job["stage1_train"]["step_s"])
    assert report["scaling"]["ehin"] == pytest.approx({
        "stage1_train": job["stage1_train"]["images_per_s"] / alone["stage1_train"]["images_per_s"],
        "stage2": job["stage2"]["train_images_per_s"] / alone["stage2"]["train_images_per_s"]})
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--ddp", "2", "--procs", "2"])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # 24 over 5 ranks: rows would be dropped
        main(["--device", "cpu", "--size", "small", "--configs", "ehin", "--ddp", "5"])
    assert "train.batch_size 24 is not divisible by the ranks" in capsys.readouterr().err


def test_packed_processes_add_up_their_throughputs_only():
    from bench.perf import is_throughput

    assert is_throughput("images_per_s") and is_throughput("images_per_s_bs64") and is_throughput("train_images_per_s")
    assert not any(map(is_throughput, ("step_s", "peak_mem_gb", "forward_ms_bs1", "seconds_per_sample")))
