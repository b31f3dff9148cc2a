"""ehin.predict's requests: blank sentences and output names that leave --out-dir are refused."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ehin.checkpoint import save_atomic
from ehin.config import load_config
from ehin.predict import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An untrained stage-1 checkpoint (tiny random CLIP) and one image."""
    from ehin.model import build_model

    root = tmp_path_factory.mktemp("predict")
    cfg = load_config(profile="smoke", overrides=["backbone.pretrained=null", "model.hidden_dim=32"])
    torch.manual_seed(0)
    save_atomic({"kind": "stage1", "config": cfg, "model": build_model(cfg).state_dict()}, root / "c.pt")
    Image.fromarray(np.full((40, 56, 3), 128, np.uint8)).save(root / "img.png")
    return root


def _batch(root, entries) -> str:
    path = root / "requests.json"
    path.write_text(json.dumps(entries))
    return str(path)


def _refused(argv, capsys, *expected) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "ABSOLUTE"])
def test_batch_names_cannot_leave_the_out_dir(setup, tmp_path, capsys, name):
    out = tmp_path / "preds"
    if name == "ABSOLUTE":
        name = str(tmp_path / "escape")
    batch = _batch(tmp_path, [{"image": str(setup / "img.png"), "text": "red circle", "name": "ok"},
                              {"image": str(setup / "img.png"), "text": "red circle", "name": name}])
    _refused(["--checkpoint", str(setup / "c.pt"), "--batch", batch, "--out-dir", str(out)], capsys,
             "batch entry 1", repr(name), "inside --out-dir")
    assert not list(tmp_path.rglob("*escape*")) and not out.exists()


def test_a_name_inside_the_out_dir_is_written_there(setup, tmp_path):
    out = tmp_path / "preds"
    batch = _batch(tmp_path, [{"image": str(setup / "img.png"), "text": "red circle", "name": "sub/one"}])
    main(["--checkpoint", str(setup / "c.pt"), "--batch", batch, "--out-dir", str(out)])
    assert (out / "sub" / "one.png").exists() and (out / "sub" / "one_mask.png").exists()


@pytest.mark.parametrize("text", ["", "   "])
def test_blank_text_is_refused(setup, tmp_path, capsys, text):
    ckpt = str(setup / "c.pt")
    _refused(["--checkpoint", ckpt, "--image", str(setup / "img.png"), "--text", text, "--out",
              str(tmp_path / "o.png")], capsys, "--text must be a sentence")
    _refused(["--checkpoint", ckpt, "--images-dir", str(setup), "--text", text, "--out-dir", str(tmp_path)],
             capsys, "--text must be a sentence")
    batch = _batch(tmp_path, [{"image": str(setup / "img.png"), "text": "red circle"},
                              {"image": str(setup / "img.png"), "text": text}])
    _refused(["--checkpoint", ckpt, "--batch", batch, "--out-dir", str(tmp_path / "preds")], capsys,
             "entry 1", '"text" must be a sentence')
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "preds").exists()
