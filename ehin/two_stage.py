"""The two-stage chain of Table 2's stage-2 cells: stage 1 -> pseudo-labels -> stage 2.

    run_dir/stage1/            ehin.train_stage1.run (checkpoints/last.pt, metrics.jsonl, result.json),
                               or `stage1_dir`: a stage-1 run of the same stage-1 config made elsewhere
                               (Table 2's Stage-1 cell, whose model the Stage-2 cell then builds on)
    run_dir/pseudo/train.npz   ehin.pseudo_labels (work folder run_dir/pseudo/train.npz.work/)
    run_dir/stage2/            ehin.train_stage2.run
    run_dir/two_stage.json     the returned summary

Every step resumes: a finished stage 1 is not retrained, a finished pseudo-label file is reused when
it was made from the same stage-1 weights and settings, and an interrupted one continues from its
work folder; stage 2 continues from its last checkpoint unless the labels were made again, when it restarts.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ehin.cli import command, command_parser


def run_two_stage(cfg: dict, run_dir: str | Path, resume: bool = True, progress: bool = True,
                  stage1_dir: str | Path | None = None, ranks: int = 1) -> dict:
    """Returns {metrics (stage-2 val), history (stage 2), timings, stage1_metrics, pseudo_quality, device,
    world_size}. `stage1_dir`: train (or, when it is done, reuse) stage 1 there instead of run_dir/stage1,
    under a lock on it, since the cell that owns it may be training it at the same time (a SLURM array).
    `ranks`: each stage trains as one data-parallel job of that many processes (ehin.launch.train_stage);
    the pseudo-labels are made in this process."""
    from filelock import FileLock

    from ehin.launch import train_stage
    from ehin.pseudo_labels.pipeline import generate, load_pseudo_labels

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    s1_dir = Path(stage1_dir) if stage1_dir is not None else run_dir / "stage1"
    s1_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(s1_dir) + ".lock"):
        s1 = train_stage(1, cfg, s1_dir, ranks=ranks, resume=resume, progress=progress)
    t1 = time.time()

    ckpt = s1_dir / "checkpoints" / "last.pt"
    pseudo_path = run_dir / "pseudo" / f"{cfg['data']['train_split']}.npz"
    work = pseudo_path.with_name(pseudo_path.name + ".work")
    timings_path = pseudo_path.with_name(pseudo_path.stem + ".timings.json")
    reuse = resume and pseudo_path.exists() and _pseudo_matches(pseudo_path, ckpt, cfg)
    if reuse:
        pl = load_pseudo_labels(pseudo_path)
        done = json.loads(timings_path.read_text()) if timings_path.exists() else {}
        pseudo = {"quality": pl.meta["quality"], "label_stats": pl.meta.get("label_stats"), "timings": done}
    else:
        import shutil

        if not resume and work.exists():
            shutil.rmtree(work)
        if (run_dir / "stage2").exists():  # trained on labels that are made again (another stage-1 model): restart it
            shutil.rmtree(run_dir / "stage2")
        # the stage-1 checkpoint's config is cfg itself; pass the pseudo section explicitly so a
        # sweep's pseudo.* overrides reach the pipeline
        pseudo = generate(ckpt, pseudo_path, work_dir=work, overrides={"pseudo": cfg["pseudo"]}, progress=progress)
        pseudo["timings"]["total_s"] = round(time.time() - t1, 2)
        timings_path.write_text(json.dumps(pseudo["timings"]))  # a resumed chain still reports them
    t2 = time.time()

    s2 = train_stage(2, cfg, run_dir / "stage2", pseudo=pseudo_path, ranks=ranks, resume=resume, progress=progress)
    t3 = time.time()

    result = {
        "metrics": s2["metrics"],
        "history": s2["history"],
        # *_s: this call's wall time per step (small when a step was resumed as done); stage1/pseudo/
        # stage2: each step's own record of the work it did, kept across resumed calls
        "timings": {"stage1_s": round(t1 - t0, 2), "pseudo_s": round(t2 - t1, 2), "stage2_s": round(t3 - t2, 2),
                    "total_s": round(t3 - t0, 2), "stage1": s1["timings"], "pseudo": pseudo.get("timings", {}),
                    "stage2": s2["timings"]},
        "stage1_metrics": s1["metrics"],
        "pseudo_quality": pseudo["quality"],
        "pseudo_label_stats": pseudo.get("label_stats"),
        "device": s2["device"],
        "world_size": s2["world_size"],
    }
    with open(run_dir / "two_stage.json", "w") as f:
        json.dump(result, f, indent=1)
    return result


def _pseudo_matches(path: Path, ckpt: Path, cfg: dict) -> bool:
    """Was the finished pseudo-label file made from this stage-1 checkpoint and these settings?"""
    from ehin.checkpoint import load_stage1
    from ehin.pseudo_labels.pipeline import Settings, load_pseudo_labels, weights_digest

    try:
        meta = load_pseudo_labels(path).meta
    except (OSError, ValueError):
        return False
    model, _ = load_stage1(ckpt)
    return (meta.get("stage1_weights") == weights_digest(model)
            and meta.get("settings") == json.loads(json.dumps(Settings.from_config(cfg).identity())))


@command
def main(argv: list[str] | None = None) -> None:
    """python -m ehin.two_stage [--profile smoke] [--set KEY=VALUE ...] --out runs/two-stage"""
    import argparse

    from ehin.config import add_config_args, config_from_args

    p = command_parser("python -m ehin.two_stage", __doc__)
    add_config_args(p, "stage2.epochs=5")
    p.add_argument("--out", required=True, help="run folder (stage1/, pseudo/, stage2/ inside; required)")
    p.add_argument("--fresh", action="store_true", help="do not resume what OUT already holds")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    res = run_two_stage(cfg, args.out, resume=not args.fresh)
    from ehin.pseudo_labels.__main__ import format_quality

    print(format_quality(res["pseudo_quality"]))
    from ehin.metrics import QUALITY_KEYS, format_result

    for name, m in (("stage 1", res["stage1_metrics"]), ("stage 2", res["metrics"])):
        print(format_result(f"{name} {cfg['eval']['split']}", m, QUALITY_KEYS))
    print(json.dumps(res["timings"]))


if __name__ == "__main__":
    main()
