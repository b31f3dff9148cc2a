"""bench.perf at --size small on CPU: the smoke check of the GPU speed script (issue: speed on the GPU)."""
import json

import pytest
import torch

from bench.perf import cuda_graphed, main


def test_perf_small_cpu_writes_json_and_profile(tmp_path):
    out = tmp_path / "perf.json"
    main(["--device", "cpu", "--size", "small", "--configs", "ehin", "--warmup", "0", "--repeats", "1",
          "--out", str(out), "--trace", str(tmp_path / "trace")])
    report = json.loads(out.read_text())
    r = report["results"]["ehin"]
    assert r["stage1_train"]["images_per_s"] > 0
    assert r["stage1_infer"]["forward_ms_bs1"] > 0 and r["stage1_infer"]["images_per_s_bs8"] > 0
    assert r["stage2"]["train_images_per_s"] > 0
    assert report["environment"]["torch"] == torch.__version__
    table = (tmp_path / "trace" / "ehin_train.txt").read_text()
    assert "self_cpu_time_total" in table and "aten::" in table
    assert (tmp_path / "trace" / "ehin_train.trace.json.gz").stat().st_size > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_matches_eager():
    lin = torch.nn.Linear(8, 4).cuda()
    x = torch.randn(2, 8, device="cuda")
    with torch.no_grad():
        g = cuda_graphed(lin, x)
        y = torch.randn(2, 8, device="cuda")
        assert torch.allclose(g(y), lin(y))
