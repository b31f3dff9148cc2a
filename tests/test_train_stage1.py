"""Stage-1 trainer: resolved config saved, resume == uninterrupted, NaN guard, per-epoch JSON lines."""
import json

import pytest
import torch

from ehin.config import load_config
from ehin.train_stage1 import FIRST_STEP, NonFiniteLossError, StoppedBySignal, run

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
    assert (tmp_path / FIRST_STEP).exists()  # bench.executors starts a compiled graph's other cells on it
    assert lines[0]["lr_head"] > lines[-1]["lr_head"] >= 0  # polynomial decay (to 0 at the end), per epoch
    # the same curves in TensorBoard: every loss term, the val metrics by their paper names, the lr
    from tests.test_training_log import read_scalars

    tb = read_scalars(tmp_path / "tb")
    assert {"loss/loss", "loss/fg", "loss/cl", "loss/bg", "val/PointM", "val/IoU", "lr/lr_head"} <= set(tb)
    assert tb["val/PointM"] == [(1, pytest.approx(lines[0]["point_mask"])), (2, pytest.approx(lines[1]["point_mask"]))]


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


# ---- issue 18: resume guard, interrupts, messages --------------------------------------------------

def _cli_tiny(out, *extra: str) -> list[str]:
    argv = ["--profile", "smoke", "--out", str(out)]
    for s in TINY + list(extra):
        argv += ["--set", s]
    return argv


def test_refused_resume_leaves_the_run_as_it_was(tmp_path, capsys):
    """A --resume with another config is refused before config.yaml is rewritten, so a plain
    --resume still continues the run afterwards."""
    from ehin.train_stage1 import main

    out = tmp_path / "run"
    main(_cli_tiny(out))
    saved = (out / "config.yaml").read_text()
    with pytest.raises(SystemExit) as exc:
        main(_cli_tiny(out, "train.epochs=10") + ["--resume"])
    assert exc.value.code == 2
    assert "written by another config" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == saved
    main(["--out", str(out), "--resume"])  # not refused
    assert json.loads((out / "result.json").read_text())["history"][-1]["epoch"] == 2


def test_stage2_settings_do_not_block_a_stage1_resume(tmp_path):
    """bench names a stage-1 cell without the stage-2 keys; the trainer's guard uses the same hash,
    so an interrupted cell still resumes after the profile's stage-2 settings change."""
    from bench.run import build_specs
    from ehin.config import parse_assignments
    from bench.sweeps import load_sweep

    def spec_and_cfg(*extra: str):
        (spec,) = build_specs(load_sweep("table5"), "smoke", 1, tmp_path, rows=["bg+fg"],
                              extra_overrides=parse_assignments(TINY + list(extra)))
        return spec, spec.config  # the config the cell's job runs

    class Stop(Exception):
        pass

    def stop(entry):
        raise Stop

    spec, cfg = spec_and_cfg()
    with pytest.raises(Stop):
        run(cfg, tmp_path / "cell", progress=False, on_epoch=stop)
    assert torch.load(tmp_path / "cell" / "checkpoints" / "last.pt", weights_only=True)["config_hash"] == spec.config_hash
    spec2, cfg2 = spec_and_cfg(f"stage2.epochs={cfg['stage2']['epochs'] + 1}")
    assert spec2.config_hash == spec.config_hash
    result = run(cfg2, tmp_path / "cell", progress=False, resume=True)
    assert [h["epoch"] for h in result["history"]] == [1, 2]


def test_resume_of_an_empty_folder_says_it_starts_from_scratch(tmp_path, capsys, monkeypatch):
    from ehin import train_stage1

    monkeypatch.setattr(train_stage1, "run", lambda cfg, out, resume: {"metrics": {}})
    train_stage1.main(_cli_tiny(tmp_path / "new") + ["--resume"])
    assert "starts from scratch" in capsys.readouterr().out


def test_ctrl_c_prints_the_resume_command(tmp_path, capsys, monkeypatch):
    from ehin import train_stage1

    def interrupted(cfg, out, resume):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_stage1, "run", interrupted)
    out = tmp_path / "my run"
    with pytest.raises(SystemExit) as exc:
        train_stage1.main(_cli_tiny(out))
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert f"python -m ehin.train_stage1 --out '{out}' --resume" in err and "Traceback" not in err


def test_nan_at_the_first_step_does_not_claim_a_checkpoint(tmp_path, monkeypatch):
    from ehin import losses

    original = losses.Stage1Loss.forward

    def poisoned(self, out, batch):
        total, terms = original(self, out, batch)
        return total * float("nan"), terms

    monkeypatch.setattr(losses.Stage1Loss, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 0 .*no checkpoint was written") as exc:
        run(tiny_cfg(), tmp_path, progress=False)
    assert "last good checkpoint" not in str(exc.value)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / FIRST_STEP).exists()  # no step was taken


def test_collapsed_maps_are_warned_about(tmp_path, capsys, monkeypatch):
    """All-empty maps (what train.lr=0.3 gives: PointM 0) print a warning naming train.lr."""
    import numpy as np

    from ehin import evaluate

    def empty_maps(model, device, amp=False):
        return lambda batch: [np.zeros(tuple(size), np.float32) for size in batch["orig_size"]]

    monkeypatch.setattr(evaluate, "model_map_fn", empty_maps)
    result = run(tiny_cfg("train.epochs=1"), tmp_path, progress=False)
    assert result["history"][-1]["empty_maps"] == 100.0
    err = capsys.readouterr().err
    assert "100% of the val expressions get an empty map" in err and "train.lr" in err


def test_eval_every_skips_evaluations_but_trains_the_same_model(tmp_path):
    """eval.every 2 over 3 epochs evaluates after epochs 2 and 3 (the last always: the run's metrics);
    the weights and the final metrics equal those of evaluating every epoch (evaluation draws no
    randomness), and a skipped epoch still writes the checkpoint a resume needs."""
    every = run(tiny_cfg("train.epochs=3"), tmp_path / "every", progress=False)
    sparse = run(tiny_cfg("train.epochs=3", "eval.every=2"), tmp_path / "sparse", progress=False)
    assert ["point_mask" in h for h in sparse["history"]] == [False, True, True]
    lines = [json.loads(x) for x in (tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]                    # every epoch's losses are logged
    assert "loss" in lines[0] and "point_mask" not in lines[0]
    assert sparse["metrics"] == every["metrics"]
    a = torch.load(tmp_path / "every" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "sparse" / "checkpoints" / "last.pt", weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_eval_every_is_not_hashed_and_is_refused_beside_checkpoint_selection():
    from ehin.config import ConfigError, config_hash

    assert config_hash(tiny_cfg("eval.every=5")) == config_hash(tiny_cfg())  # same weights and metrics (above)
    with pytest.raises(ConfigError, match="eval.every"):
        tiny_cfg("eval.every=2", "eval.select_split=testA")



def _same_run(a_dir, a_result, b_dir, b_result):
    a = torch.load(a_dir / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(b_dir / "checkpoints" / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] and "partial" not in b
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a_result["metrics"] == b_result["metrics"]
    assert len(a_result["history"]) == len(b_result["history"])
    for x, y in zip(a_result["history"], b_result["history"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-12) and x["point_mask"] == y["point_mask"]


def _sigterm_on_call(fn, at: int):
    """`fn`, sending this process SIGTERM on its `at`-th call (1-based), just before that call runs."""
    import os
    import signal

    calls = {"n": 0}

    def wrapped(*a, **k):
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return fn(*a, **k)

    return wrapped


def test_sigterm_mid_epoch_checkpoints_the_step_and_the_resumed_run_equals_a_straight_one(tmp_path, monkeypatch):
    """SIGTERM during a step (a device call's time limit, a preemption): the step finishes, last.pt
    holds the run up to it, and resuming trains only the remaining steps, to the very weights, losses
    and metrics of a run never stopped. Stops in epoch 1, on its last step, and in epoch 2; the caller's
    SIGTERM handler is back afterwards."""
    import signal

    import ehin.train_stage1 as ts

    cfg = tiny_cfg()
    straight = run(cfg, tmp_path / "straight", progress=False)
    per_epoch = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt",
                           weights_only=False)["scheduler"]["last_epoch"] // 2
    forward, before = ts.forward_loss, signal.getsignal(signal.SIGTERM)
    for at in (3, per_epoch, per_epoch + 3):                 # the forward call that SIGTERM falls in
        out = tmp_path / f"stopped{at}"
        monkeypatch.setattr(ts, "forward_loss", _sigterm_on_call(forward, at))
        epoch, step = divmod(at - 1, per_epoch)
        with pytest.raises(ts.StoppedBySignal, match=f"epoch {epoch + 1}, step {step + 1} of {per_epoch}"):
            run(cfg, out, progress=False)
        assert signal.getsignal(signal.SIGTERM) is before
        mid = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
        assert (mid["epoch"], mid["partial"]["epoch"], mid["partial"]["step"]) == (epoch - 1, epoch, step + 1)
        assert mid["scheduler"]["last_epoch"] == at
        monkeypatch.setattr(ts, "forward_loss", forward)
        _same_run(tmp_path / "straight", straight, out, run(cfg, out, progress=False, resume=True))


def test_sigterm_during_evaluation_stops_after_the_epoch_or_reaches_the_callers_handler_at_the_end(tmp_path, monkeypatch):
    """SIGTERM while epoch 1 is evaluated: the epoch's checkpoint is written and the run stops there
    (resuming gives the straight run); while the last epoch is evaluated the run finishes and the
    signal then goes on to the handler the caller had, not lost."""
    import signal

    import ehin.evaluate as ev

    cfg = tiny_cfg()
    straight = run(cfg, tmp_path / "straight", progress=False)
    real = ev.evaluate
    for at, out in ((1, tmp_path / "first"), (2, tmp_path / "last")):
        monkeypatch.setattr(ev, "evaluate", _sigterm_on_call(real, at))
        if at == 1:
            with pytest.raises(StoppedBySignal, match="SIGTERM in epoch 1"):
                run(cfg, out, progress=False)
            assert "partial" not in torch.load(out / "checkpoints" / "last.pt", weights_only=False)
            monkeypatch.setattr(ev, "evaluate", real)
            _same_run(tmp_path / "straight", straight, out, run(cfg, out, progress=False, resume=True))
            continue
        received = []
        previous = signal.signal(signal.SIGTERM, lambda *_: received.append(1))
        try:
            finished = run(cfg, out, progress=False)
        finally:
            signal.signal(signal.SIGTERM, previous)
        assert received == [1] and finished["metrics"] == straight["metrics"]


def test_sigterm_in_a_process_that_handles_it_checkpoints_and_trains_on(tmp_path, monkeypatch):
    """A process with its own SIGTERM handler (a submitit job logs the signal and goes on; SLURM ends
    the job when it requeues it): the trainer writes the mid-epoch checkpoint, calls that handler once,
    and trains on to the straight run's result."""
    import os
    import signal

    import ehin.train_stage1 as ts

    cfg = tiny_cfg()
    straight = run(cfg, tmp_path / "straight", progress=False)
    seen = []

    def handler(signum, frame):  # what last.pt held when the caller's handler ran
        ckpt = torch.load(tmp_path / "on" / "checkpoints" / "last.pt", weights_only=False)
        seen.append((ckpt["epoch"], ckpt["partial"]["step"]))

    calls = {"n": 0}
    forward = ts.forward_loss

    def counting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(*a, **k)

    monkeypatch.setattr(ts, "forward_loss", counting)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        on = run(cfg, tmp_path / "on", progress=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [(-1, 3)]
    _same_run(tmp_path / "straight", straight, tmp_path / "on", on)


def test_train_loader_skips_batches_without_changing_the_order():
    from torch.utils.data import DataLoader

    from ehin.train_stage1 import train_loader

    items = list(range(103))
    shuffled = [b.tolist() for b in DataLoader(items, batch_size=8, shuffle=True, drop_last=True,
                                               generator=torch.Generator().manual_seed(5))]
    ours = train_loader(items, 8, torch.Generator().manual_seed(5), None, 0)
    assert [b.tolist() for b in ours] == shuffled           # the order every committed result trained on
    rest = train_loader(items, 8, torch.Generator().manual_seed(5), None, 0, skip=3)
    assert len(rest) == len(shuffled) - 3 and [b.tolist() for b in rest] == shuffled[3:]


def test_grad_clip_bounds_every_step_logs_the_norm_and_is_hashed_only_when_set(tmp_path, monkeypatch):
    """train.grad_clip: every optimiser step sees gradients of global norm <= the bound, each epoch
    logs the mean and the largest norm before clipping, and a run stopped mid-epoch resumes to the same
    log. Off (null), the config hashes as before the key existed."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    import ehin.train_stage1 as ts
    from ehin.config import config_hash

    base, clipped = tiny_cfg(), tiny_cfg("train.grad_clip=0.001")
    assert config_hash(base) == config_hash({**base, "train": {k: v for k, v in base["train"].items() if k != "grad_clip"}})
    assert config_hash(clipped) != config_hash(base)

    seen: list[float] = []

    def record_norm(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))))

    handle = register_optimizer_step_pre_hook(record_norm)
    try:
        straight = run(clipped, tmp_path / "clipped", progress=False)
    finally:
        handle.remove()
    assert seen and max(seen) <= 0.001 * (1 + 1e-4)
    for h in straight["history"]:
        assert 0.001 < h["grad_norm"] <= h["grad_norm_max"]  # the bound is far below the raw norms here
    assert "grad_norm" not in run(base, tmp_path / "base", progress=False)["history"][0]

    forward = ts.forward_loss
    monkeypatch.setattr(ts, "forward_loss", _sigterm_on_call(forward, 3))
    with pytest.raises(ts.StoppedBySignal):
        run(clipped, tmp_path / "stopped", progress=False)
    monkeypatch.setattr(ts, "forward_loss", forward)
    resumed = run(clipped, tmp_path / "stopped", progress=False, resume=True)
    _same_run(tmp_path / "clipped", straight, tmp_path / "stopped", resumed)
    assert [h["grad_norm_max"] for h in resumed["history"]] == [h["grad_norm_max"] for h in straight["history"]]
    assert [h["grad_norm"] for h in resumed["history"]] == pytest.approx([h["grad_norm"] for h in straight["history"]], rel=1e-12)
