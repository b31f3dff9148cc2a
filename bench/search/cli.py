"""Optuna hyper-parameter search over EHIN stage 1, on the same executors as the sweeps.

    python -m bench.search default --profile smoke --trials 8 --workers 2 --executor local
    python -m bench.search default --profile smoke --trials 12 --set train.epochs=3   # continues the study
    python -m bench.search default --executor slurm --workers 8 --trials 64 --slurm-partition gpu --slurm-gpus 1
    python -m bench.search my_space.yaml --storage sqlite:///search.db --study my-study --no-final

SPACE is a file in sweeps/search/ (by name) or a path to one (sweeps/search/README.md describes it).
Every trial is one independent stage-1 run in RESULTS/<study>/trial-<n>/ (config.yaml, metrics.jsonl,
checkpoints), configured exactly like a sweep cell: load_config(profile, fixed overrides + sampled
params). Trials are selected on eval.split (val); a test split is refused for selection.

Workers: each is one job (inline: in this process, one after another; local: submitit processes;
slurm: a submitit job array) that loads the study and runs trials until the study holds --trials
counted trials (complete, pruned, running, or failed without a retry), so W workers run T trials in
all and a rerun with the same --study continues up to T instead of starting over.
Storage: an Optuna JournalStorage file (RESULTS/<study>/journal.log; no database server, works on
a shared filesystem) or any RDB URL via --storage. MedianPruner stops trials on per-epoch val
metrics. A worker killed mid-trial stops beating its heartbeat; after --grace seconds another worker
marks the trial FAIL and enqueues its parameters again (RetryHeartbeatStaleTrialCallback).

Reports go to REPORTS/search/<study>/: best.json/.md, trials.csv/.md, history/intermediate/
importances/slices PNGs, and final.md: the best configuration and the profile's default config
(the paper's α 0.1, β 0.05, n 2, N 24; K as the profile sets it) trained with --final-seeds seeds
and evaluated on the test split.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from bench.executors import EXECUTORS, add_slurm_args, hms, slurm_options
from bench.search.final import choose_final_split, final_evaluation
from bench.search.launch import ProgressLine, launch_workers
from bench.search.report import write_reports, write_summary
from bench.search.space import SearchError, list_spaces, load_space, validate_space
from bench.search.study import budget_used, create_or_continue, enqueue_defaults, open_storage
from bench.search.worker import WorkerSpec
from ehin.cli import command, command_parser
from ehin.config import PROFILES, ConfigError, config_hash, parse_assignments
from ehin.metrics import METRIC_KEYS


@command
def main(argv: list[str] | None = None) -> int:
    p = command_parser("python -m bench.search", __doc__)
    p.add_argument("space", help=f"a space in sweeps/search/ ({', '.join(list_spaces()) or 'none'}) or a YAML path")
    p.add_argument("--profile", choices=PROFILES,
                   help="smoke | synthetic | paper (default: the space's, else synthetic)")
    p.add_argument("--trials", type=int, help="the study's total trial budget, over all workers and reruns "
                                              "(default: the space's)")
    p.add_argument("--workers", type=int, default=1, help="parallel workers (jobs), each running trials until "
                                                          "the budget is used (default 1)")
    p.add_argument("--executor", default="inline", choices=EXECUTORS,
                   help="inline: this process; local: submitit processes; slurm: a SLURM job array "
                        "(default: inline)")
    p.add_argument("--storage", help="RDB URL (sqlite:///x.db, postgresql://...) or journal file path "
                                     "(default: RESULTS/<study>/journal.log)")
    p.add_argument("--study", help="study name (default: <space>-<profile>); an existing study is continued")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed (default 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed config override for every trial (and the final runs), e.g. train.epochs=3")
    p.add_argument("--metric", choices=METRIC_KEYS, help="val metric to optimise (default: the space's, else iou)")
    p.add_argument("--results", default="results/search", help="study folders go here (default results/search)")
    p.add_argument("--reports", default="reports", help="reports go to REPORTS/search/<study>/ (default reports)")
    g = p.add_argument_group("fault tolerance")
    g.add_argument("--heartbeat", type=int, default=30,
                   help="seconds between a running trial's heartbeats (default 30)")
    g.add_argument("--grace", type=int, default=120, help="seconds without a heartbeat before a trial is "
                                                          "failed and retried (default 120)")
    g.add_argument("--max-retry", type=int, default=3, help="retries of one killed trial (default 3)")
    g = p.add_argument_group("final re-evaluation on the test split")
    g.add_argument("--final-seeds", type=int, default=3, help="seeds for best vs default (default 3)")
    g.add_argument("--final-split", help="test split (default: the space's final_split, else test/testA)")
    g.add_argument("--no-final", action="store_true", help="skip the final re-evaluation")
    add_slurm_args(p, time_min=24 * 60, job="worker job")
    args = p.parse_args(argv)

    try:
        space = load_space(args.space)
        profile = args.profile or space.profile or "synthetic"
        space = space.for_profile(profile)
        metric = args.metric or space.metric
        budget = args.trials or space.trials
        if budget < 1 or args.workers < 1:
            p.error("--trials and --workers must be positive")
        fixed = {**space.fixed, **parse_assignments(args.overrides)}
        if "data.dataset" in fixed:
            from bench.sweeps import dataset_for_profile

            fixed["data.dataset"] = dataset_for_profile(str(fixed["data.dataset"]), profile)
        both = sorted(set(fixed) & set(space.params))
        if both:
            p.error(f"--set {both[0]} fixes a searched param; remove it from the space or the command line")
        if args.executor == "local":
            # Share the cores between the workers (thread counts are not part of the config hash).
            fixed.setdefault("train.threads", max(1, (os.cpu_count() or 1) // args.workers))
        base_cfg = validate_space(space, profile, fixed)
    except (SearchError, ConfigError) as e:
        p.error(str(e))

    from ehin.train_stage1 import prepare

    study_name = args.study or f"{space.name}-{profile}"
    study_dir = Path(args.results) / study_name
    study_dir.mkdir(parents=True, exist_ok=True)
    storage_url = args.storage or str(study_dir / "journal.log")
    out = Path(args.reports) / "search" / study_name
    slurm = slurm_options(args, array_parallelism=args.workers)

    refer = prepare(base_cfg)  # the dataset and the small CLIP once, before any worker starts
    final_split = None
    if not args.no_final:
        try:
            final_split = choose_final_split(args.final_split or space.final_split, refer)
        except SearchError as e:
            p.error(str(e))
    storage = open_storage(storage_url, heartbeat_s=args.heartbeat, grace_s=args.grace, max_retry=args.max_retry)
    meta = {"space": space.as_json(), "space_name": space.name, "metric": metric, "direction": space.direction,
            "profile": profile, "base_config_hash": config_hash(base_cfg),
            "fixed": {k: v for k, v in fixed.items() if k != "train.threads"}}
    try:
        study = create_or_continue(study_name, storage, meta)
    except SearchError as e:
        p.error(str(e))
    before = budget_used(study.get_trials(deepcopy=False))
    if space.enqueue_defaults and not study.get_trials(deepcopy=False):
        enqueue_defaults(study, space, base_cfg)
    print(f"search {study_name}: {space.title}\n  profile {profile}, {metric} on {base_cfg['eval']['split']} "
          f"({space.direction}), {len(space.params)} params, budget {budget} trials ({before} already counted), "
          f"{args.workers} worker(s) via {args.executor}\n  storage {storage_url}\n  trial runs in {study_dir}/")

    specs = [WorkerSpec(study=study_name, storage=storage_url, study_dir=str(study_dir), profile=profile,
                        fixed=fixed, params=space.as_json(), metric=metric, n_trials=budget, seed=args.seed,
                        index=i, sampler=space.sampler, pruner=space.pruner, heartbeat_s=args.heartbeat,
                        grace_s=args.grace, max_retry=args.max_retry)
             for i in range(args.workers)]
    t0 = time.time()
    errors = launch_workers(specs, args.executor, folder=study_dir / "submitit", slurm=slurm,
                            view=ProgressLine(study_name, storage, budget, metric))
    elapsed = time.time() - t0

    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    written = write_reports(study, out, base_cfg)
    final_md, final_ok = None, True
    has_complete = any(t.state == TrialState.COMPLETE for t in trials)
    if final_split and has_complete and args.final_seeds > 0:
        final_md, final_ok = final_evaluation(study, profile=profile, fixed=fixed, split=final_split,
                                              seeds=args.final_seeds, executor=args.executor, jobs=args.workers,
                                              root=study_dir / "final", slurm=slurm, out=out)
    summary = write_summary(out, study, written, final_md)

    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    print(f"\n{study_name}: {budget_used(trials)}/{budget} trials counted ({counts['complete']} complete, "
          f"{counts['pruned']} pruned, {counts['fail']} failed) in {hms(elapsed)}")
    print((out / "best.md").read_text())
    if final_md is not None:
        print(final_md.read_text())
    print(f"reports in {out}/ (summary: {summary})")
    for line in errors:
        print(f"[search] FAILED {line}", file=sys.stderr)
    if not has_complete:
        errs = sorted({t.user_attrs["error"] for t in trials if t.user_attrs.get("error")})
        print("[search] no trial completed" + (f"; errors: {'; '.join(errs)}" if errs else ""), file=sys.stderr)
    return 0 if (not errors and has_complete and final_ok) else 1
