"""Segment what a sentence refers to, with a stage-1 or stage-2 checkpoint.

    python -m ehin.predict --checkpoint RUN/checkpoints/last.pt --image img.png --text "red circle" --out overlay.png
    python -m ehin.predict --checkpoint C --batch requests.json --out-dir preds/
    python -m ehin.predict --checkpoint C --images-dir photos/ --text "the dog" --out-dir preds/

Writes, per request, the heat-map overlay (`<name>.png`) and the binary mask (`<name>_mask.png`).
A JSON batch file is a list of {"image": path, "text": sentence[, "name": output stem]}.
Maps reach the image's size as in evaluation (`ehin.metrics.stage1_map` / `stage2_map`, METHOD §3.6);
stage 1: foreground = map > 0 after ReLU; stage 2: logit > 0 (METHOD §5).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ehin import metrics as M
from ehin.cli import UserError, command

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


def overlay(image: np.ndarray, heat: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Jet heat-map blended over the image, with the mask's outline in white."""
    import cv2

    h = heat.astype(np.float32)
    h = h - h.min()
    h = h / h.max() if h.max() > 0 else h
    colour = cv2.applyColorMap((h * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    out = (0.55 * image.astype(np.float32) + 0.45 * colour.astype(np.float32)).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.ascontiguousarray(out)
    cv2.drawContours(out, contours, -1, (255, 255, 255), max(1, min(image.shape[:2]) // 150))
    return out


def write_prediction(image: np.ndarray, heat: np.ndarray, mask: np.ndarray, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(image, heat, mask)).save(out)
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
    p = argparse.ArgumentParser(prog="python -m ehin.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="stage-1 or stage-2 checkpoint")
    p.add_argument("--image", help="one image")
    p.add_argument("--text", help="the referring expression")
    p.add_argument("--out", help="overlay path for --image (default overlay.png)")
    p.add_argument("--batch", help="JSON list of {image, text[, name]}")
    p.add_argument("--images-dir", help="every image of a folder with one --text")
    p.add_argument("--out-dir", help="output folder for batch modes (default predictions/)")
    p.add_argument("--device", default="cpu")
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
        write_prediction(image, heat, mask, Path(req["out"]))
        print(f"{req['image']} | {req['text']!r} -> {req['out']} (foreground {100 * mask.mean():.1f}%)")
    if failures:
        raise SystemExit(f"{failures} request(s) failed")


if __name__ == "__main__":
    main()
