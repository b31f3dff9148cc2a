"""Pseudo-labels for stage 2 from a stage-1 checkpoint (METHOD §6).

    python -m ehin.pseudo_labels --checkpoint runs/s1/checkpoints/last.pt --out runs/s1/pseudo/train.npz
    python -m ehin.pseudo_labels --checkpoint C --out F --no-random-walk          # ablation: maps + CRF
    python -m ehin.pseudo_labels --checkpoint C --out F --no-crf --no-random-walk # ablation: maps only

A killed run resumes from its work folder (default: OUT.work/) when started again with the same
arguments. Prints the pseudo-label quality after each step (IoU / mIoU, i.e. overall IoU, against the GT).
"""
from __future__ import annotations

import json

from ehin.cli import command, command_parser


@command
def main(argv: list[str] | None = None) -> None:
    from ehin.config import parse_overrides

    p = command_parser("python -m ehin.pseudo_labels", __doc__)
    p.add_argument("--checkpoint", required=True, help="stage-1 checkpoint (RUN/checkpoints/last.pt)")
    p.add_argument("--out", required=True, help="output .npz (one file for the split, keyed by ref id)")
    p.add_argument("--split", help="REFER split (default: the config's data.train_split)")
    p.add_argument("--no-crf", action="store_true", help="skip the dense CRF (IRNet learns from the seeds)")
    p.add_argument("--no-random-walk", action="store_true", help="skip IRNet + random walk")
    p.add_argument("--workers", type=int, help="CRF processes (default: pseudo.workers)")
    p.add_argument("--work-dir", help="resumable work folder (default: OUT.work)")
    p.add_argument("--device", help="cpu | cuda (default: the checkpoint config's train.device)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of the checkpoint's config, e.g. --set pseudo.irnet_epochs=5")
    args = p.parse_args(argv)

    from ehin.pseudo_labels.pipeline import generate

    result = generate(args.checkpoint, args.out, split=args.split,
                      crf=False if args.no_crf else None, random_walk=False if args.no_random_walk else None,
                      workers=args.workers, work_dir=args.work_dir, device=args.device,
                      overrides=parse_overrides(args.overrides) if args.overrides else None)
    print(f"wrote {result['out']} ({result['n_refs']} refs, {result['dataset']} {result['split']})")
    print(format_quality(result["quality"]))
    print(json.dumps({"label_stats": result["label_stats"], "timings": result["timings"]}))


def format_quality(quality: dict) -> str:
    """The quality table after each step, under the paper's column names (the metric registry)."""
    from ehin.metrics import BY_KEY

    iou, overall = BY_KEY["iou"].column, BY_KEY["overall_iou"].column
    lines = [f"pseudo-label quality vs GT  {iou:>6}  {overall:>6}"]
    for step in ("maps", "crf", "seeds", "rw"):
        q = quality.get(step)
        if q:
            name = {"maps": "maps (PRMS)", "crf": "+ CRF", "seeds": "+ seeds (no CRF)", "rw": "+ IRNet random walk"}[step]
            lines.append(f"  {name:<26}{q['iou']:6.2f}  {q['overall_iou']:6.2f}   (n={q['n']})")
    lines.append(f"  pseudo-labels = {quality.get('final')}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
