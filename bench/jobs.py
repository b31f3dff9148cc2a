"""One cell of a sweep, or one multi-node training, as a submitit job (dinov2/MAE launcher style).

`CellRunner` is the callable every executor runs: inline, local processes or SLURM array tasks.
Heavy imports stay inside `__call__` so the driver and submitit's pickling stay light. The job
writes its own record into the store when it finishes, so a result survives the driver dying, and
writes it once: a cell its store already holds is not run again.
When SLURM preempts or times a job out, submitit calls `checkpoint`, which requeues the same
cell; the trainer then resumes from the run folder's last epoch checkpoint.

`DistributedTraining` is one stage-1 or stage-2 training as one SLURM job of several tasks (one DDP
rank each, on one or several nodes; `bench.executors.submit_distributed`, `python -m bench.launch_ddp`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import submitit


@dataclass(frozen=True)
class CellSpec:
    """Everything a job needs, picklable and small."""

    table: str
    row: str
    seed: int
    profile: str
    stage: str                      # "1", "2" or "inference"
    overrides: dict[str, Any]       # flat dotted keys on top of the profile (kept in the records)
    config: dict[str, Any]          # the resolved config (load_config(profile, overrides)): run as is
    config_hash: str
    run_dir: str
    store_root: str
    cell_id: str
    extra: dict[str, Any] = field(default_factory=dict)


def training_dir(spec: CellSpec) -> str:
    """Where a cell's model is trained: its shared training's folder (bench.run.share_trainings), else its own."""
    return spec.extra.get("trained", {}).get("dir", spec.run_dir)


def training_config(spec: CellSpec) -> dict:
    """The config a cell's model is trained with: a shared training evaluates its group's first split per epoch."""
    trained = spec.extra.get("trained")
    return {**spec.config, "eval": {**spec.config["eval"], "split": trained["split"]}} if trained else spec.config


def compile_group(spec: CellSpec) -> tuple[str, Path] | None:
    """For `dispatch`'s `compile_group`: a stage-1 cell trained with train.compile belongs to the group of
    cells that compile the same graph (what reaches the compiled model and the frozen scorer's image tower:
    the model, backbone and scorer, input size, K, batch and numerics levers; not the dataset, seed or
    schedule), with the marker its trainer writes after its first step (`ehin.train_stage1.FIRST_STEP`)."""
    from ehin.train_stage1 import FIRST_STEP

    cfg = spec.config
    if spec.stage != "1" or not cfg["train"].get("compile"):
        return None
    t, d = cfg["train"], cfg["data"]
    graph = {"model": cfg["model"], "loss": cfg["loss"], "backbone": cfg["backbone"]["arch"],
             "scorer": [cfg["scorer"].get("arch"), cfg["scorer"].get("image_size")],
             "data": [d["image_size"], d["K"]],
             "train": [t[k] for k in ("batch_size", "amp", "channels_last", "compile")]}
    key = hashlib.sha256(repr(sorted(graph.items())).encode()).hexdigest()[:16]
    return key, Path(training_dir(spec)) / FIRST_STEP


def run_cell(spec: CellSpec) -> dict:
    """Train/evaluate one cell in this process and return its metrics dict (no store write)."""
    from ehin.config import save_config

    cfg = spec.config  # resolved once, when the cell was declared (bench.sweeps.Sweep.cells)
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")  # the resolved config beside its results
    from ehin.train_stage1 import PER_EXPRESSION

    if "trained" in spec.extra:
        return _run_shared(spec)
    if spec.stage == "1":
        from filelock import FileLock

        from ehin.launch import train_stage

        with FileLock(str(run_dir) + ".lock"):  # a Stage-2 cell may build on this run (bench.run.share_trainings)
            refuse_retraining_handed_over(run_dir)
            return {**train_stage(1, cfg, run_dir, ranks=spec.extra.get("ranks", 1)),
                    "per_expression_file": str(run_dir / PER_EXPRESSION)}
    if spec.stage == "2":
        from filelock import FileLock

        from ehin.two_stage import run_two_stage

        # One attempt of the chain at a time (a rerun while a SLURM array still runs it): its pseudo-labels and
        # stage 2 live in run_dir, which a second attempt would regenerate and delete under the first. Stage 1
        # takes its own lock, on another path (ehin.two_stage).
        with FileLock(str(run_dir) + ".lock"):
            return {**run_two_stage(cfg, run_dir, resume=True, stage1_dir=spec.extra.get("stage1_dir"),
                                    ranks=spec.extra.get("ranks", 1)),
                    "per_expression_file": str(run_dir / "stage2" / PER_EXPRESSION)}
    if spec.stage == "inference":
        from bench.perf import inference_time_cell

        return inference_time_cell(cfg, run_dir, **spec.extra)
    raise ValueError(f"unknown stage {spec.stage!r} for cell {spec.cell_id}")


def _run_shared(spec: CellSpec) -> dict:
    """A cell whose model is trained once for several splits (bench.run.share_trainings): train in the
    shared folder unless done (under a lock: the group's cells may start together), with the config
    evaluating the group's first split per epoch, then evaluate the final model on this cell's split."""
    from filelock import FileLock

    from ehin.config import save_config
    from ehin.launch import train_stage

    trained = spec.extra["trained"]
    train_dir, split = Path(trained["dir"]), spec.config["eval"]["split"]
    train_cfg = training_config(spec)
    train_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(train_dir) + ".lock"):
        save_config(train_cfg, train_dir / "config.yaml")
        if spec.stage == "1":
            refuse_retraining_handed_over(train_dir)
            result = train_stage(1, train_cfg, train_dir, ranks=spec.extra.get("ranks", 1))
        else:
            from ehin.two_stage import run_two_stage

            result = run_two_stage(train_cfg, train_dir, resume=True, stage1_dir=spec.extra.get("stage1_dir"),
                                   ranks=spec.extra.get("ranks", 1))
    from ehin.train_stage1 import PER_EXPRESSION

    final = train_dir if spec.stage == "1" else train_dir / "stage2"  # the folder of the model evaluated
    result = {**result, "trained_in": str(train_dir), "history_split": trained["split"]}
    if split == trained["split"]:
        return {**result, "per_expression_file": str(final / PER_EXPRESSION)}
    own = Path(spec.run_dir) / PER_EXPRESSION
    result.update(metrics=evaluate_checkpoint(spec.config, final / "checkpoints" / "last.pt", stage=int(spec.stage),
                                              per_expression=own), per_expression_file=str(own))
    if spec.stage == "2":
        stage1 = Path(spec.extra.get("stage1_dir") or train_dir / "stage1")
        result["stage1_metrics"] = (stored_stage1_metrics(spec, result["stage1_weights"])
                                    if result.get("labels_handed_over")
                                    else evaluate_checkpoint(spec.config, stage1 / "checkpoints" / "last.pt", stage=1))
    return result


def refuse_retraining_handed_over(train_dir: Path) -> None:
    """A stage-1 folder handed over without its checkpoint (bench.run --hand-over) holds the result of a model
    that Stage-2 chains build on; training there again would replace it with another model."""
    if (train_dir / "result.json").is_file() and not (train_dir / "checkpoints" / "last.pt").exists():
        from ehin.cli import UserError

        raise UserError(f"{train_dir} holds a stage-1 result without its checkpoint (handed over, bench.run "
                        "--hand-over): its Stage-1 cells are stored where it was trained; to train it again here, "
                        "delete its result.json")


def stored_stage1_metrics(spec: CellSpec, weights: str) -> dict:
    """A Stage-2 cell's stage-1 figures on its split when the stage-1 checkpoint was not handed over: those of
    the stored Stage-1 cell (same table and seed) that evaluated the very weights its labels were made from."""
    from bench.store import ResultStore
    from ehin.cli import UserError

    split = spec.config["eval"]["split"]
    for rec in ResultStore(spec.store_root).read():
        if (rec.get("stage") == "1" and rec.get("table") == spec.table and rec.get("seed") == spec.seed
                and rec.get("stage1_weights") == weights and rec.get("overrides", {}).get("eval.split") == split):
            return rec["metrics"]
    raise UserError(f"{spec.row} seed {spec.seed}: its stage 1 was handed over without the checkpoint, and "
                    f"{spec.store_root} stores no Stage-1 cell of weights {weights} on {split}: run that cell "
                    "where the stage-1 model was trained, then hand over again")


def hand_over_labels(specs: list[CellSpec], dest: Path, start_within_s: float | None = None) -> tuple[int, int]:
    """bench.run --hand-over: make the pseudo-labels of the Stage-2 chains among `specs` whose stage 1 is trained,
    training no stage 2 and storing nothing, and copy into `dest`, under their paths below the results folder,
    what another machine needs to train their stage 2 without the stage-1 checkpoint: stage 1's result.json,
    the label file and its timings (ehin.two_stage, "Handed over"). A chain whose Stage-2 cell is running here
    (its lock held) is handed over as far as that cell got: its labels once they are made, else nothing; so a
    sitting that ends during stage 2 keeps stage 1 and the labels (reports/h200_session.sh salvage). Returns
    (chains handed over, chains)."""
    from filelock import FileLock, Timeout

    from ehin.two_stage import run_two_stage

    t0 = time.time()
    chains: dict[str, CellSpec] = {}
    for spec in specs:
        if spec.stage == "2":
            chains.setdefault(training_dir(spec), spec)
    n = 0
    for train_dir, spec in chains.items():
        train_dir, root = Path(train_dir), Path(spec.store_root)
        s1 = Path(spec.extra.get("stage1_dir") or train_dir / "stage1")
        what = f"{spec.row.split(' | ')[0]}, {spec.config['data']['dataset']}, seed {spec.seed}"
        if not ((s1 / "result.json").is_file() and (s1 / "checkpoints" / "last.pt").is_file()):
            print(f"  {what}: stage 1 is not trained in {s1}: not handed over")
            continue
        if start_within_s is not None and time.time() - t0 > start_within_s:
            print(f"  {what}: not started within {start_within_s:.0f} s (--start-within)")
            continue
        cfg = training_config(spec)
        labels = train_dir / "pseudo" / f"{cfg['data']['train_split']}.npz"
        timings = labels.with_name(labels.stem + ".timings.json")
        try:
            with FileLock(str(train_dir) + ".lock", timeout=0):  # as a Stage-2 cell's attempt (run_cell)
                made = run_two_stage(cfg, train_dir, stage1_dir=s1, until="labels", progress=False)
            how = f"labels from stage-1 weights {made['stage1_weights']} in {made['timings']['pseudo_s']:.0f} s"
        except Timeout:
            # its Stage-2 cell holds the chain: the labels are whole once their timings are written
            # (ehin.two_stage writes them after the label file), and stage 2 only reads them. Labels of an
            # earlier stage 1 that the cell is making again are refused where they land: their weights are
            # not the result.json's (ehin.two_stage._handed_over)
            try:
                how = f"labels its running Stage-2 cell made in {json.loads(timings.read_text())['total_s']:.0f} s"
            except (OSError, ValueError, KeyError):
                print(f"  {what}: its Stage-2 cell is running and has not made the labels: not handed over")
                continue
        # the label file last, each file whole or absent (copied, then renamed): what DEST holds can be packed
        # and sent while the next chain's labels are made, and a chain whose label file is there is complete
        for f in (s1 / "result.json", timings, labels):
            to = dest / f.relative_to(root)
            to.parent.mkdir(parents=True, exist_ok=True)
            tmp = to.with_name(to.name + ".tmp")
            shutil.copyfile(f, tmp)
            os.replace(tmp, to)
        print(f"  {what}: {how}, handed over into {dest}")
        n += 1
    return n, len(chains)


def keep_per_expression(spec: CellSpec, result: dict) -> str | None:
    """Copy the cell's per-expression scores (if its trainer wrote them) beside the store, where
    claims read them paired over expressions (bench.check); returns the path relative to the store."""
    src = Path(result.get("per_expression_file") or "")
    if not src.is_file():
        return None
    rel = Path("per_expression") / f"{hashlib.sha1(spec.cell_id.encode()).hexdigest()[:16]}.npz"
    dst = Path(spec.store_root) / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return str(rel)


def evaluate_checkpoint(cfg: dict, path: Path, stage: int, per_expression: str | Path | None = None) -> dict:
    """The metrics (the registry's keys and n) of a trained stage-1 or stage-2 checkpoint on cfg's
    eval.split, evaluated as the trainers evaluate their last epoch (scores per expression written to
    `per_expression` when given)."""
    from ehin.checkpoint import load_stage1
    from ehin.data import prepare_dataset
    from ehin.data.datasets import EvalDataset
    from ehin.distributed import resolve_device
    from ehin.evaluate import evaluate, model_map_fn
    from ehin.metrics import METRIC_KEYS

    device = resolve_device(cfg)
    if stage == 1:
        model, _ = load_stage1(path, device=str(device))
    else:
        from ehin.stage2.model import load_stage2

        model, _ = load_stage2(path, device=device)
    amp = bool(cfg["train"]["amp"]) and device.type == "cuda"
    ds = EvalDataset(prepare_dataset(cfg, progress=False), cfg["eval"]["split"], model.backbone.tokenize,
                     cfg["data"]["image_size"], max_items=cfg["eval"]["max_items"])
    m = evaluate(model_map_fn(model, device, amp, stage=stage), ds, batch_size=cfg["eval"]["batch_size"],
                 stage=stage, progress=False, per_expression=per_expression)
    return {k: m[k] for k in (*METRIC_KEYS, "n") if k in m}


def _inputs(cfg: dict, stage: str) -> dict:
    """The sha256 of the checkpoints and the dataset a trained cell read (ehin.provenance, TESTBED §3);
    a digest that cannot be taken is recorded as the error, not raised (training and its record go on)."""
    from ehin.provenance import input_digests

    try:
        return input_digests(cfg, stage)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def let_requeue_outlive_sigterm() -> None:
    """Ignore SIGTERM from here on, in a job that submitit is about to requeue. Right after `checkpoint`
    returns, submitit runs `scontrol requeue` in a child process; the requeue, or a preemption's SIGTERM
    that arrives late, signals every process of the job, that child too, and a killed `scontrol` makes the
    handler raise: the attempt then ends as failed though the job was requeued (CI, session 31). A child
    keeps an ignored signal across exec, so `scontrol` finishes; this process exits right after the requeue."""
    if threading.current_thread() is threading.main_thread():  # submitit calls it from its signal handler
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


class CellRunner(submitit.helpers.Checkpointable):
    """`runner(spec)` runs a cell and appends its record; used with `map_array` on SLURM."""

    def __call__(self, spec: CellSpec) -> dict:
        from bench.store import ResultStore, code_version, host_info
        from ehin.metrics import PROTOCOL
        from ehin.train_stage1 import StoppedBySignal

        store = ResultStore(spec.store_root)
        # SLURM kills a requeued job KillWait seconds after its SIGTERM, which submitit's job lets pass, so an
        # attempt can append its record and be requeued before it exits (CI, session 36): that attempt finished
        # the cell, and this one returns its record rather than evaluate again and append a second.
        finished = [r for r in store.read() if r.get("cell_id") == spec.cell_id]
        if finished:
            print(f"{spec.cell_id}: an earlier attempt of this job already stored its record in {store.path}")
            return finished[-1]
        start = time.time()
        # error.txt marks the last attempt as failed (bench.run renders the cell "failed"): a new attempt clears it.
        (Path(spec.run_dir) / "error.txt").unlink(missing_ok=True)
        # the checksums of what training reads, taken before it reads them (not when the record is written)
        inputs = _inputs(spec.config, spec.stage) if spec.stage in ("1", "2") else None
        try:
            result = run_cell(spec)
        except (Exception, StoppedBySignal):  # stopped: the next attempt resumes from its checkpoint
            Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(spec.run_dir) / "error.txt").write_text(traceback.format_exc())
            raise
        record = {
            # The config itself stays out: RUN_DIR/config.yaml holds it and the hash names it.
            **{k: v for k, v in asdict(spec).items() if k not in ("store_root", "extra", "config")},
            "metrics": result.get("metrics", {}),
            "history": result.get("history", []),
            "timings": {**result.get("timings", {}), "cell_s": round(time.time() - start, 2)},
            "code_version": code_version(),
            "metrics_protocol": PROTOCOL,  # how the metrics were computed (ehin.metrics)
            # a model trained once for several splits (bench.run.share_trainings): where, and which
            # split its history evaluates
            **{k: result[k] for k in ("trained_in", "history_split") if k in result},
            # a Stage-2 cell: its stage-1 model on this cell's split (the Stage-1 cell's figures when the
            # chain built on that cell's run, bench.run.share_trainings; others when a sitting without that
            # run trained stage 1 again)
            **({"stage1_metrics": result["stage1_metrics"]} if spec.stage == "2" and "stage1_metrics" in result else {}),
            # the stage-1 weights the cell evaluated (stage 1) or its pseudo-labels were made from (stage 2): a
            # Stage-2 record built on a Stage-1 cell's model names that record's weights
            **({"stage1_weights": w} if (w := result.get("weights_digest" if spec.stage == "1" else "stage1_weights"))
               else {}),
            # stage 1 and the labels were made in another run, which handed them over without the checkpoint
            **({"labels_handed_over": True} if spec.stage == "2" and result.get("labels_handed_over") else {}),
            # the final evaluation's scores per expression, relative to the store (paired claims)
            **({"per_expression": rel} if (rel := keep_per_expression(spec, result)) else {}),
            **host_info(),
            "device": result.get("device", "cpu"),
            # processes of the data-parallel training (bench.run --ranks); 1: one process
            **({"world_size": result["world_size"]} if result.get("world_size", 1) > 1 else {}),
            **({"inputs": inputs} if inputs is not None else {}),
        }
        store.append(record)
        return record

    def checkpoint(self, spec: CellSpec) -> submitit.helpers.DelayedSubmission:
        # Requeue the same cell; the trainer resumes from <run_dir>/checkpoints/last.pt.
        let_requeue_outlive_sigterm()
        return submitit.helpers.DelayedSubmission(CellRunner(), spec)

    def label(self, spec: CellSpec) -> str:
        return spec.cell_id

    def error_log(self, spec: CellSpec) -> str:
        return str(Path(spec.run_dir) / "error.txt")  # written by __call__ before it re-raises


class DistributedTraining(submitit.helpers.Checkpointable):
    """`DistributedTraining()(stage, cfg, out_dir, pseudo)` in every task of a SLURM job: one DDP rank each.

    Each task exports the variables torchrun would give it (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT, derived from SLURM's) and calls the trainer's `run`, which then initialises
    the process group and trains with DDP. Every task returns the trainer's result (`job.results()`;
    rank 0's, the first, holds the metrics). Preempted or timed out, submitit calls `checkpoint` on
    rank 0, which requeues the same call; the trainer resumes from out_dir/checkpoints/last.pt.
    """

    def __call__(self, stage: str, cfg: dict, out_dir: str, pseudo: str | None = None) -> dict:
        import torch.distributed as dist

        # overwrite: the job's own SLURM layout wins over anything inherited from the submitting shell.
        # CUDA_VISIBLE_DEVICES stays as SLURM set it (submitit would rewrite it to the local rank's index,
        # which names another job's GPU when the node is shared); ehin.distributed picks cuda:LOCAL_RANK.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        try:
            if stage == "1":
                from ehin.train_stage1 import run

                return run(cfg, out_dir, resume=True)
            if stage == "2":
                from ehin.train_stage2 import run as run_stage2

                return run_stage2(cfg, out_dir, pseudo, resume=True)
            raise ValueError(f"unknown stage {stage!r} (1 or 2)")
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # Requeue the same training; it resumes from <out_dir>/checkpoints/last.pt.
        let_requeue_outlive_sigterm()
        return submitit.helpers.DelayedSubmission(DistributedTraining(), *args, **kwargs)
