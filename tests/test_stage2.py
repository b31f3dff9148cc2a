"""Stage-2 network and losses (METHOD §7) on hand-made inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ehin  # noqa: F401  (torchvision shim before open_clip)
from ehin.stage2.losses import EMATeacher, Stage2Loss, consistency, masked_bce, masked_dice
from ehin.stage2.model import Stage2Net

torch.set_num_threads(1)
BIG = 40.0  # sigmoid(±40) is 0/1 in float32


def tiny_rn(image_size: int = 64):
    """An open_clip CLIP with a (very narrow) ModifiedResNet image tower: RN50's layout."""
    from open_clip.model import CLIP

    from ehin.backbones import ClipBackbone

    torch.manual_seed(0)
    model = CLIP(embed_dim=32, vision_cfg=dict(layers=(1, 1, 1, 1), width=8, image_size=image_size, head_width=8),
                 text_cfg=dict(context_length=20, vocab_size=49408, width=32, heads=2, layers=1))
    return ClipBackbone(model, "tiny-rn", image_size)


def tiny_vit(image_size: int = 64):
    from ehin.backbones import build_clip

    torch.manual_seed(0)
    return build_clip("clip-tiny", None, image_size)


@pytest.fixture(scope="module")
def vit_net():
    torch.manual_seed(0)
    return Stage2Net(tiny_vit(), 32)


# ---- network -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_rn, tiny_vit], ids=["rn", "vit"])
def test_shapes_strides_and_predict(make):
    net = Stage2Net(make(64), 32)
    pyr = net.pyramid(torch.rand(2, 3, 64, 64))
    assert [f.shape[-1] for f in pyr] == [16, 8, 4, 2]  # strides 4, 8, 16, 32
    tokens = net.backbone.tokenize(["the red circle", "blue"])
    out = net(torch.rand(2, 3, 64, 64), tokens)
    assert [tuple(o.shape) for o in out] == [(2, 16, 16), (2, 8, 8), (2, 4, 4), (2, 2, 2)]
    net.eval()
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(net.predict(x, tokens), net(x, tokens)[0])  # the finest head


@pytest.mark.parametrize("make", [tiny_rn, tiny_vit], ids=["rn", "vit"])
def test_every_trainable_parameter_gets_a_gradient(make):
    """DDP needs no unused parameters: what cannot reach the output was frozen at build time."""
    net = Stage2Net(make(64), 32)
    tokens = net.backbone.tokenize(["a small green square", "red"])
    loss, _ = Stage2Loss()(net(torch.rand(2, 3, 64, 64), tokens), torch.randint(0, 2, (2, 64, 64)).to(torch.uint8))
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("backbone.") for n in frozen)  # only CLIP's unused parts


def test_backbone_batchnorm_keeps_pretrained_statistics():
    net = Stage2Net(tiny_rn(64), 32).train()
    bns = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bns]
    net(torch.rand(2, 3, 64, 64), net.backbone.tokenize(["a", "b"]))
    assert bns and all(not m.training for m in bns)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))


def test_language_changes_the_prediction(vit_net):
    vit_net.eval()
    x = torch.rand(1, 3, 64, 64)
    a = vit_net.predict(x, vit_net.backbone.tokenize(["red circle"]))
    b = vit_net.predict(x, vit_net.backbone.tokenize(["big blue square on the left"]))
    assert not torch.allclose(a, b)


# ---- losses --------------------------------------------------------------------------------------------

def test_dice_and_bce_known_values():
    logits = torch.tensor([[[BIG, 0.0, 0.0, -BIG]]])  # p = 1, .5, .5, 0
    target = torch.tensor([[[1, 1, 0, 0]]], dtype=torch.uint8)
    # Dice: 1 − 2·(1 + .5) / ((1 + .5 + .5) + 2) = 1 − 3/4
    assert masked_dice(logits, target).item() == pytest.approx(0.25, abs=1e-5)
    # BCE: (0 + ln2 + ln2 + 0) / 4
    assert masked_bce(logits, target).item() == pytest.approx(math.log(2) / 2, abs=1e-5)
    perfect = torch.tensor([[[BIG, BIG, -BIG, -BIG]]])
    assert masked_dice(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_dice(-perfect, target).item() == pytest.approx(1.0, abs=1e-6)


def test_ignore_pixels_are_excluded():
    torch.manual_seed(0)
    target = torch.tensor([[[1, 0, 255, 255]], [[255, 255, 255, 255]]], dtype=torch.uint8)
    logits = torch.randn(2, 1, 4, requires_grad=True)
    loss, _ = Stage2Loss()([logits], target)
    loss.backward()
    assert logits.grad[0, 0, 2:].abs().max() == 0 and logits.grad[1].abs().max() == 0
    other = logits.detach().clone()
    other[0, 0, 2:] = 100.0  # anything on ignore pixels
    other[1] = -7.0
    assert Stage2Loss()([other], target)[0].item() == pytest.approx(loss.item(), abs=1e-6)
    # per-sample means: the all-ignore sample adds 0, the other counts as half of the batch
    lone = Stage2Loss()([logits[:1].detach()], target[:1])[0].item()
    assert loss.item() == pytest.approx(lone / 2, abs=1e-6)


def test_every_head_is_upsampled_and_averaged():
    target = torch.zeros(1, 4, 4, dtype=torch.uint8)
    target[0, :2] = 1
    fine = torch.full((1, 4, 4), -BIG)
    fine[0, :2] = BIG
    coarse = torch.zeros(1, 2, 2)  # p = .5 everywhere after upsampling
    total, terms = Stage2Loss(dice_weight=1.0)([fine, coarse], target)
    want_bce = (0.0 + math.log(2)) / 2
    want_dice = (0.0 + (1 - 2 * 4 / (8 + 8))) / 2  # coarse: inter .5·8 = 4, Σp 8, Σg 8
    assert terms["bce"].item() == pytest.approx(want_bce, abs=1e-5)
    assert terms["dice"].item() == pytest.approx(want_dice, abs=1e-5)
    assert total.item() == pytest.approx(want_bce + want_dice, abs=1e-5)


def test_consistency_values():
    s = torch.tensor([[[0.0, 2.0]]])
    t = torch.tensor([[[0.0, -1.0]]])
    assert consistency(s, s, "mse").item() == 0 and consistency(s, s, "kl").item() == pytest.approx(0, abs=1e-7)
    ps, pt = torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(-1.0))
    assert consistency(s, t, "mse").item() == pytest.approx(float((ps - pt) ** 2) / 2, abs=1e-6)
    kl = pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))
    assert consistency(s, t, "kl").item() == pytest.approx(float(kl) / 2, abs=1e-6)
    with pytest.raises(ValueError):
        consistency(s, t, "l1")


def test_ema_update_math():
    student = torch.nn.Linear(2, 1)
    with torch.no_grad():
        student.weight.fill_(1.0)
        student.bias.fill_(0.0)
    teacher = EMATeacher(student, decay=0.9)
    with torch.no_grad():
        student.weight.fill_(3.0)
        student.bias.fill_(-1.0)
    teacher.update(student)
    assert torch.allclose(teacher.model.weight, torch.full((1, 2), 0.9 * 1 + 0.1 * 3))
    assert torch.allclose(teacher.model.bias, torch.tensor([0.1 * -1.0]))
    teacher.update(student)
    assert torch.allclose(teacher.model.weight, torch.full((1, 2), 0.9 * 1.2 + 0.1 * 3))
    assert not any(p.requires_grad for p in teacher.parameters())


def test_a_few_steps_reduce_the_loss():
    """Adam on a fixed batch of hand-made scenes (label = the red square) lowers BCE + Dice."""
    torch.manual_seed(0)
    net = Stage2Net(tiny_vit(), 32)
    rng = np.random.default_rng(0)
    images = torch.full((4, 3, 64, 64), 0.45)
    labels = torch.zeros(4, 64, 64, dtype=torch.uint8)
    for i in range(4):
        y, x = rng.integers(8, 40, 2)
        images[i, :, y:y + 16, x:x + 16] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
        labels[i, y:y + 16, x:x + 16] = 1
    labels[:, :2] = 255  # some ignore
    tokens = net.backbone.tokenize(["red square"] * 4)
    loss_fn = Stage2Loss()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    losses = []
    for _ in range(20):
        loss, _ = loss_fn(net(images, tokens), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:]))  # steadily


def test_load_stage2_round_trip(tmp_path):
    from ehin.checkpoint import save_atomic
    from ehin.config import load_config
    from ehin.stage2.model import build_stage2, load_stage2

    cfg = load_config(profile="smoke", overrides=["backbone.pretrained=null", "stage2.hidden_dim=32"])
    torch.manual_seed(0)
    net = build_stage2(cfg).eval()
    save_atomic({"kind": "stage2", "config": cfg, "model": net.state_dict()}, tmp_path / "last.pt")
    loaded, cfg2 = load_stage2(tmp_path / "last.pt")
    assert cfg2 == cfg and not loaded.training
    x = torch.rand(1, 3, 64, 64)
    tok = loaded.backbone.tokenize(["red circle"])
    assert torch.equal(loaded.predict(x, tok), net.predict(x, tok))
    save_atomic({"kind": "stage1", "config": cfg, "model": {}}, tmp_path / "s1.pt")
    with pytest.raises(ValueError, match="not a stage-2"):
        load_stage2(tmp_path / "s1.pt")


def test_optimizer_fuses_adam_on_cuda_only_and_splits_the_learning_rates():
    """train.fused_adamw reaches stage 2's Adam on a CUDA device (a speed lever, as stage 1's AdamW);
    the trunk gets lr x backbone_lr_mult either way."""
    from ehin.config import load_config
    from ehin.stage2.model import build_stage2
    from ehin.train_stage2 import build_optimizer

    cfg = load_config(profile="smoke", overrides=["backbone.pretrained=null", "stage2.hidden_dim=32",
                                                  "stage2.lr=1.0e-3", "stage2.backbone_lr_mult=0.1",
                                                  "train.fused_adamw=true"])
    net = build_stage2(cfg)
    fused = build_optimizer(net, cfg, torch.device("cuda"))  # CPU parameters: built, never stepped here
    eager = build_optimizer(net, cfg, torch.device("cpu"))
    assert [g["fused"] for g in fused.param_groups] == [True, True]
    assert not any(g["fused"] for g in eager.param_groups)
    assert [g["lr"] for g in eager.param_groups] == pytest.approx([1e-4, 1e-3])
    off = load_config(profile="smoke", overrides=["backbone.pretrained=null", "stage2.hidden_dim=32"])
    assert not any(g["fused"] for g in build_optimizer(build_stage2(off), off, torch.device("cuda")).param_groups)


def test_stage2_eval_every_skips_evaluations_but_trains_the_same_model(tmp_path):
    """Stage 2 honours eval.every as stage 1 does: over 3 epochs with eval.every 2 it evaluates after epochs 2
    and 3 (the last always: the run's metrics), and its weights and final metrics equal evaluating every epoch."""
    from ehin.config import load_config
    from ehin.data import prepare_dataset
    from ehin.pseudo_labels.pipeline import split_digest, write_pseudo_labels
    from ehin.train_stage2 import run

    base = ["backbone.pretrained=null", "synthetic.images=40", "stage2.hidden_dim=32", "stage2.epochs=3",
            "stage2.lr=1.0e-3", "eval.max_items=30", "train.threads=1"]
    cfg = load_config(profile="smoke", overrides=base)
    refer = prepare_dataset(cfg, progress=False)
    size, split = cfg["data"]["image_size"], cfg["data"]["train_split"]
    refs = refer.refs(split)
    labels = [(refer.ann_mask(r["ann_id"]) > 0).astype(np.uint8) for r in refs]  # stand-ins: the referents' masks
    labels = [np.asarray(torch.nn.functional.interpolate(torch.from_numpy(m)[None, None].float(), (size, size))[0, 0],
                         np.uint8) for m in labels]
    pseudo = tmp_path / "train.npz"
    write_pseudo_labels(pseudo, [r["ref_id"] for r in refs], [r["sent_ids"][0] for r in refs], labels,
                        {"image_size": size, "dataset": cfg["data"]["dataset"], "split": split,
                         "split_digest": split_digest(refer, split)})
    every = run(cfg, tmp_path / "every", pseudo, progress=False)
    sparse = run(load_config(profile="smoke", overrides=[*base, "eval.every=2"]), tmp_path / "sparse", pseudo,
                 progress=False)
    assert ["point_mask" in h for h in every["history"]] == [True, True, True]
    assert ["point_mask" in h for h in sparse["history"]] == [False, True, True]
    assert sparse["metrics"] == every["metrics"] and sparse["metrics"]["n"] == 30
    a = torch.load(tmp_path / "every" / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "sparse" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
