"""ehin.predict: blank sentences and output names that leave --out-dir are refused; the overlay is enlarged
to >= 256 px and captioned (sentence, foreground share, legend)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ehin.checkpoint import save_atomic
from ehin.config import load_config
from ehin.predict import BAND_BG, caption_band, main, overlay


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


# ---- the overlay: enlarged to >= 256 px, with a caption band ------------------------------------------

def test_overlay_is_enlarged_and_captioned_and_the_mask_keeps_the_image_size(setup, tmp_path):
    out = tmp_path / "o.png"
    main(["--checkpoint", str(setup / "c.pt"), "--image", str(setup / "img.png"), "--text", "red circle",
          "--out", str(out)])
    ov = np.asarray(Image.open(out))
    assert np.asarray(Image.open(tmp_path / "o_mask.png")).shape == (40, 56)  # data: the image's own size
    k = 7  # ceil(256 / 40): an integer factor, so the nearest-neighbour mask keeps square pixels
    assert ov.shape[1] == 56 * k and ov.shape[0] > 40 * k >= 256  # the image part, then the caption band
    band = ov[40 * k:]
    assert (band == BAND_BG).all(-1).mean() > 0.5 and not (band == BAND_BG).all()  # text on a dark band


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = np.zeros((32, 48, 3), np.uint8)
    image[8:20, 10:30] = (220, 30, 30)
    yy, xx = np.mgrid[:32, :48]
    heat = np.exp(-((yy - 14) ** 2 + (xx - 20) ** 2) / 40.0)
    return image, heat, heat > 0.5


def test_overlay_image_part_scales_image_bilinear_and_mask_nearest():
    image, heat, mask = _scene()
    plain = overlay(image, heat, mask)
    assert plain.shape == (32 * 8, 48 * 8, 3)  # ceil(256 / 32) = 8
    captioned = overlay(image, heat, mask, "red one")
    np.testing.assert_array_equal(captioned[:256], plain)  # the caption only adds the band below
    # the white outline is the border of the mask enlarged by nearest (8x8 blocks): its pixels that
    # touch the outside (4-neighbours)
    big = np.pad(np.kron(mask, np.ones((8, 8), bool)), 1)
    inner = big[1:-1, 1:-1] & big[:-2, 1:-1] & big[2:, 1:-1] & big[1:-1, :-2] & big[1:-1, 2:]
    np.testing.assert_array_equal((plain == 255).all(-1), big[1:-1, 1:-1] & ~inner)
    # the image is enlarged bilinearly: a sharp red edge gets intermediate values (nearest: two only)
    flat = overlay(image, np.zeros_like(heat), np.zeros_like(mask))
    assert len(np.unique(flat[..., 0])) > 2


def test_a_large_image_is_not_enlarged():
    big = overlay(np.full((300, 400, 3), 7, np.uint8), np.zeros((300, 400)), np.zeros((300, 400), bool), "x")
    assert big.shape[0] > 300 and big.shape[1] == 400


def test_caption_band_shows_the_sentence_and_the_foreground_share():
    width = 384
    a = caption_band(width, "red circle", 12.5)
    assert a.shape[1] == width and a.shape[0] > 0
    half = a.shape[0] // 2
    # another sentence changes the first line only; another share the second line only
    b = caption_band(width, "", 12.5)
    rows = np.nonzero((a != b).any((1, 2)))[0]
    assert rows.size and rows.max() < half
    c = caption_band(width, "red circle", 87.5)
    rows = np.nonzero((a != c).any((1, 2)))[0]
    assert rows.size and rows.min() >= half
    # the share is all the band reads from the mask: two masks of one share give one band
    image, heat, _ = _scene()
    m1, m2 = np.zeros((32, 48), bool), np.zeros((32, 48), bool)
    m1[:8] = True
    m2[:, :12] = True  # 8 * 48 = 32 * 12 pixels
    np.testing.assert_array_equal(overlay(image, heat, m1, "x")[256:], overlay(image, heat, m2, "x")[256:])
    assert (overlay(image, heat, m1, "x")[256:] != overlay(image, heat, np.zeros_like(m1), "x")[256:]).any()


def test_a_long_sentence_is_cut_to_the_width():
    wide = caption_band(256, "the " + "very " * 80 + "long sentence", 1.0)
    assert wide.shape[1] == 256
