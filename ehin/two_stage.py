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

Handed over: a chain may stop after its labels (`until="labels"`) and end on another machine, which
holds stage 1's result.json and the labels but not the stage-1 checkpoint (a GPU lent for less time
than a chain takes: bench.run --hand-over). Stage 1 then counts as done when its result names the
weights the labels were made from (`weights_digest`) under this stage-1 config, and the labels'
settings are this config's; otherwise the chain trains stage 1 again, as without them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ehin.cli import command, command_parser


def run_two_stage(cfg: dict, run_dir: str | Path, resume: bool = True, progress: bool = True,
                  stage1_dir: str | Path | None = None, ranks: int = 1, until: str | None = None) -> dict:
    """Returns {metrics (stage-2 val), history (stage 2), timings, stage1_metrics, stage1_weights, pseudo_quality,
    pseudo_label_stats, device, world_size}, and labels_handed_over (True) when stage 1 and the labels came
    without the stage-1 checkpoint (module docstring). `until="labels"`: stop once the labels are made, returning
    the stage-1 and label keys and their timings. `stage1_dir`: train (or, when it is done, reuse) stage 1 there
    instead of run_dir/stage1, under a lock on it, since the cell that owns it may be training it at the same time
    (a SLURM array).
    `ranks`: each stage trains as one data-parallel job of that many processes (ehin.launch.train_stage);
    the pseudo-labels are made in this process."""
    from filelock import FileLock

    from ehin.launch import train_stage
    from ehin.pseudo_labels.pipeline import generate, load_pseudo_labels

    if until not in (None, "labels"):
        raise ValueError(f"until={until!r}: None (the whole chain) or 'labels'")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    s1_dir = Path(stage1_dir) if stage1_dir is not None else run_dir / "stage1"
    s1_dir.mkdir(parents=True, exist_ok=True)
    ckpt = s1_dir / "checkpoints" / "last.pt"
    pseudo_path = run_dir / "pseudo" / f"{cfg['data']['train_split']}.npz"
    work = pseudo_path.with_name(pseudo_path.name + ".work")
    timings_path = pseudo_path.with_name(pseudo_path.stem + ".timings.json")
    with FileLock(str(s1_dir) + ".lock"):
        s1 = _handed_over(s1_dir, pseudo_path, cfg) if resume and not ckpt.exists() else None
        handed_over = s1 is not None
        if not handed_over:
            s1 = train_stage(1, cfg, s1_dir, ranks=ranks, resume=resume, progress=progress)
    t1 = time.time()

    reuse = handed_over or (resume and pseudo_path.exists() and _pseudo_matches(pseudo_path, ckpt, cfg))
    if reuse:
        pl = load_pseudo_labels(pseudo_path)
        done = json.loads(timings_path.read_text()) if timings_path.exists() else {}
        pseudo = {"quality": pl.meta["quality"], "label_stats": pl.meta.get("label_stats"), "timings": done,
                  "stage1_weights": pl.meta.get("stage1_weights")}
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
    # stage1_weights: the stage-1 model the labels were made from, which a Stage-1 record names too (bench.jobs)
    made = {"stage1_metrics": s1["metrics"], "stage1_weights": pseudo["stage1_weights"],
            "pseudo_quality": pseudo["quality"], "pseudo_label_stats": pseudo.get("label_stats"),
            **({"labels_handed_over": True} if handed_over else {})}
    if until == "labels":
        return {**made, "timings": {"stage1_s": round(t1 - t0, 2), "pseudo_s": round(t2 - t1, 2),
                                    "stage1": s1["timings"], "pseudo": pseudo.get("timings", {})}}

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
        **made,
        "device": s2["device"],
        "world_size": s2["world_size"],
    }
    with open(run_dir / "two_stage.json", "w") as f:
        json.dump(result, f, indent=1)
    return result


def _handed_over(s1_dir: Path, pseudo_path: Path, cfg: dict) -> dict | None:
    """Stage 1's result when this chain's stage 1 and labels were handed over without the checkpoint (module
    docstring): result.json of this stage-1 config whose weights the label file names, labels of this config's
    settings. None otherwise (nothing handed over, or something that does not match: the chain then trains)."""
    from ehin.cli import UserError
    from ehin.config import config_hash
    from ehin.pseudo_labels.pipeline import load_pseudo_labels

    try:
        s1 = json.loads((s1_dir / "result.json").read_text())
        meta = load_pseudo_labels(pseudo_path).meta
    except (OSError, ValueError, UserError):  # nothing handed over (or not readable: the chain trains)
        return None
    ok = (s1.get("config_hash") == config_hash(cfg, stage="1") and s1.get("weights_digest") is not None
          and meta.get("stage1_weights") == s1["weights_digest"] and _same_settings(meta, cfg))
    if not ok:
        print(f"{s1_dir}: no stage-1 checkpoint, and its result.json and {pseudo_path} are not one handed-over "
              "stage 1 of this config: training stage 1")
    return s1 if ok else None


def _pseudo_matches(path: Path, ckpt: Path, cfg: dict) -> bool:
    """Was the finished pseudo-label file made from this stage-1 checkpoint and these settings?"""
    from ehin.checkpoint import load_stage1, weights_digest
    from ehin.pseudo_labels.pipeline import load_pseudo_labels

    try:
        meta = load_pseudo_labels(path).meta
    except (OSError, ValueError):
        return False
    model, _ = load_stage1(ckpt)
    return meta.get("stage1_weights") == weights_digest(model) and _same_settings(meta, cfg)


def _same_settings(meta: dict, cfg: dict) -> bool:
    """Were the labels of this file's meta made with cfg's pseudo-label settings?"""
    from ehin.pseudo_labels.pipeline import Settings

    return meta.get("settings") == json.loads(json.dumps(Settings.from_config(cfg).identity()))


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
