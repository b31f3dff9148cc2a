"""Segment what a sentence refers to, with a stage-1 or stage-2 checkpoint.

    python -m ehin.predict --checkpoint RUN/checkpoints/last.pt --image img.png --text "red circle" --out overlay.png
    python -m ehin.predict --checkpoint C --batch requests.json --out-dir preds/
    python -m ehin.predict --checkpoint C --images-dir photos/ --text "the dog" --out-dir preds/

Writes, per request, the heat-map overlay (`<name>.png`) and the binary mask (`<name>_mask.png`, at
the image's own size). The overlay is enlarged to at least 256 px on its short side (a 64-px synthetic
scene is unreadable otherwise) and carries a caption band: the sentence, the foreground share
("fg 23.4 %") and a legend (heat-map colours, the mask's outline).
A JSON batch file is a list of {"image": path, "text": sentence[, "name": output stem]}.
Maps reach the image's size as in evaluation (`ehin.metrics.stage1_map` / `stage2_map`, METHOD §3.6);
stage 1: foreground = map > 0 after ReLU; stage 2: logit > 0 (METHOD §5).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from ehin import metrics as M
from ehin.cli import command, command_parser, UserError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class Predictor:
    """Loads a checkpoint once; `__call__(image uint8 HxWx3, text) -> (map HxW float, mask HxW bool)`."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu"):
        from ehin.checkpoint import load

        kind = load(checkpoint).get("kind")
        self.device = device
        if kind == "stage1":
            from ehin.checkpoint import load_stage1

            self.model, self.cfg = load_stage1(checkpoint, device)
            self.stage = 1
        elif kind == "stage2":
            from ehin.stage2.model import load_stage2

            self.model, self.cfg = load_stage2(checkpoint, device)
            self.stage = 2
        else:
            raise UserError(f"{checkpoint}: unknown checkpoint kind {kind!r}")
        self.size = self.cfg["data"]["image_size"]
        self.tokenize = self.model.backbone.tokenize

    @torch.no_grad()
    def __call__(self, image: np.ndarray, text: str) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        x = torch.from_numpy(np.array(Image.fromarray(image).resize((self.size, self.size), Image.BILINEAR)))
        x = x.permute(2, 0, 1).float().div(255).unsqueeze(0).to(self.device)
        tokens = self.tokenize([text]).to(self.device)
        out = self.model.predict(x, tokens)[0].float()
        to_original = M.stage1_map if self.stage == 1 else M.stage2_map
        heat = to_original(out, (self.size, self.size), (h, w))
        mask = heat > 0  # stage 1: ReLU map > 0; stage 2: logit > 0
        return heat, mask


def read_image(path: str | Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


OVERLAY_MIN_SIDE = 256  # px: the overlay's short side at least (the image part, without the caption band)
BAND_BG, BAND_FG = (24, 24, 24), (240, 240, 240)  # caption band: light text on a dark band


def _jet(values01: np.ndarray) -> np.ndarray:
    """uint8 RGB colours of values in [0, 1] (OpenCV's jet, the heat map's colours)."""
    import cv2

    return cv2.applyColorMap((values01 * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]


def overlay_scale(h: int, w: int, min_side: int = OVERLAY_MIN_SIDE) -> int:
    """Integer factor that brings the short side to >= min_side (1 for images that are large enough);
    integer, so that a nearest-neighbour mask keeps square pixels."""
    return max(1, math.ceil(min_side / max(1, min(h, w))))


def overlay(image: np.ndarray, heat: np.ndarray, mask: np.ndarray, text: str | None = None,
            min_side: int = OVERLAY_MIN_SIDE) -> np.ndarray:
    """Jet heat-map blended over the image, the mask's outline in white, enlarged to >= `min_side` px
    (image and heat map bilinear, mask nearest); with `text`, a caption band below it holding the
    sentence, the foreground share of `mask` and a legend. uint8 [H', W', 3]."""
    import cv2

    k = overlay_scale(*image.shape[:2], min_side)
    H, W = image.shape[0] * k, image.shape[1] * k
    if k > 1:
        image = np.asarray(Image.fromarray(image).resize((W, H), Image.BILINEAR))
    big_heat = cv2.resize(heat.astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR) if k > 1 else heat
    big_mask = cv2.resize(mask.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST) if k > 1 else mask
    h = big_heat.astype(np.float32)
    h = h - h.min()
    h = h / h.max() if h.max() > 0 else h
    out = (0.55 * image.astype(np.float32) + 0.45 * _jet(h).astype(np.float32)).astype(np.uint8)
    contours, _ = cv2.findContours(big_mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.ascontiguousarray(out)
    cv2.drawContours(out, contours, -1, (255, 255, 255), max(1, min(H, W) // 150))
    if text is None:
        return out
    return np.concatenate([out, caption_band(W, text, 100.0 * float(np.mean(mask)))], axis=0)


def _font(width: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font, sized to the overlay (its 10-px default is hard to read on a wide image)."""
    try:
        return ImageFont.load_default(size=max(11, width // 24))
    except (ImportError, OSError, TypeError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
         width: int) -> str:
    """`text` cut with an ellipsis so that it fits `width` px."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def caption_band(width: int, text: str, fg_percent: float) -> np.ndarray:
    """uint8 [h, width, 3]: the sentence on the first line; "fg 23.4 %" (the foreground share) and the
    legend (a low-to-high heat-map bar, the mask's white outline) on the second."""
    font = _font(width)
    if not isinstance(font, ImageFont.FreeTypeFont):  # the bitmap font encodes latin-1 only
        text = text.encode("latin-1", "replace").decode("latin-1")
    left, top, right, bottom = font.getbbox("Ag")
    line = bottom - top + 6
    pad = max(4, line // 3)
    band = Image.new("RGB", (width, 2 * line + 2 * pad), BAND_BG)
    draw = ImageDraw.Draw(band)
    draw.text((pad, pad - top), _fit(draw, f'"{text}"', font, width - 2 * pad), fill=BAND_FG, font=font)
    y = pad + line - top
    x = pad
    share = f"fg {fg_percent:.1f} %"
    draw.text((x, y), share, fill=BAND_FG, font=font)
    x += int(draw.textlength(share, font=font)) + 2 * pad
    # legend: "low [jet bar] high", then the mask's outline
    draw.text((x, y), "low", fill=BAND_FG, font=font)
    x += int(draw.textlength("low", font=font)) + pad // 2
    bar_w, bar_h = max(24, width // 8), max(4, (bottom - top) // 2)
    bar_y = y + top + (bottom - top - bar_h) // 2
    for i, c in enumerate(_jet(np.linspace(0.0, 1.0, bar_w)[None])[0]):
        draw.line([(x + i, bar_y), (x + i, bar_y + bar_h)], fill=tuple(int(v) for v in c))
    x += bar_w + pad // 2
    draw.text((x, y), "high", fill=BAND_FG, font=font)
    x += int(draw.textlength("high", font=font)) + pad
    box = bottom - top
    draw.rectangle([x, y + top, x + box, y + top + box], outline=(255, 255, 255), width=max(1, box // 6))
    draw.text((x + box + pad // 2, y), "mask", fill=BAND_FG, font=font)
    return np.asarray(band)


def write_prediction(image: np.ndarray, heat: np.ndarray, mask: np.ndarray, out: Path,
                     text: str | None = None) -> None:
    """The overlay (enlarged, with `text`'s caption band) at `out` and the mask at the image's own
    size beside it (`<stem>_mask.png`): the mask is data, the overlay is for a person."""
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(image, heat, mask, text)).save(out)
    Image.fromarray((mask * 255).astype(np.uint8)).save(out.with_name(out.stem + "_mask.png"))


def _requests(args) -> list[dict]:
    """The (image, text, out) requests the arguments ask for; a user mistake raises UserError."""
    if args.image:
        if args.text is None:
            raise UserError("--image needs --text")
        _check_text(args.text, "--text")
        return [{"image": args.image, "text": args.text, "out": args.out or "overlay.png"}]
    if args.batch:
        try:
            items = json.loads(Path(args.batch).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read batch file {args.batch}: {e}") from None
        if not isinstance(items, list) or not all(isinstance(i, dict) and "image" in i and "text" in i for i in items):
            raise UserError(f"{args.batch}: expected a JSON list of {{\"image\": ..., \"text\": ...}}")
        for i, it in enumerate(items):
            _check_text(it["text"], f"{args.batch}: entry {i} (image {it['image']!r}): \"text\"")
    elif args.images_dir:
        if args.text is None:
            raise UserError("--images-dir needs --text")
        _check_text(args.text, "--text")
        items = [{"image": str(p), "text": args.text} for p in sorted(Path(args.images_dir).iterdir())
                 if p.suffix.lower() in IMAGE_EXTS]
    else:
        raise UserError("give --image, --batch or --images-dir")
    out_dir = Path(args.out_dir or "predictions")
    return [{**it, "out": str(_out_path(out_dir, it.get("name") or Path(it["image"]).stem + f"_{i}", i))}
            for i, it in enumerate(items)]


def _check_text(text, what: str) -> None:
    # A blank sentence still gives a map (of nothing in particular): refuse it rather than print a mask.
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{what} must be a sentence naming what to segment, got {text!r}")


def _out_path(out_dir: Path, name, index: int) -> Path:
    """out_dir/<name>.png, refusing a name that would write anywhere but under out_dir."""
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise UserError(f"batch entry {index}: \"name\" {name!r} must be a relative file stem inside --out-dir "
                        f"(no absolute path, no '..')")
    return out_dir / f"{name}.png"


@command
def main(argv: list[str] | None = None) -> None:
    p = command_parser("python -m ehin.predict", __doc__)
    p.add_argument("--checkpoint", required=True, help="stage-1 or stage-2 checkpoint (required)")
    p.add_argument("--image", help="one image (or --batch / --images-dir)")
    p.add_argument("--text", help="the referring expression (with --image or --images-dir)")
    p.add_argument("--out", help="overlay path for --image (default overlay.png)")
    p.add_argument("--batch", help="JSON list of {image, text[, name]} (or --image / --images-dir)")
    p.add_argument("--images-dir", help="every image of a folder with one --text")
    p.add_argument("--out-dir", help="output folder for batch modes (default predictions/)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    args = p.parse_args(argv)
    requests = _requests(args)  # argument mistakes before the (slow) model load
    predictor = Predictor(args.checkpoint, args.device)
    failures = 0
    for req in requests:
        try:
            image = read_image(req["image"])
        except (FileNotFoundError, ValueError) as e:
            print(f"skipped: {e}")
            failures += 1
            continue
        heat, mask = predictor(image, req["text"])
        write_prediction(image, heat, mask, Path(req["out"]), req["text"])
        print(f"{req['image']} | {req['text']!r} -> {req['out']} (foreground {100 * mask.mean():.1f}%)")
    if failures:
        raise SystemExit(f"{failures} request(s) failed")


if __name__ == "__main__":
    main()
