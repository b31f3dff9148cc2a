"""Optuna hyper-parameter search over EHIN stage 1, on the same executors as the sweeps.

`python -m bench.search SPACE ...` (bench.search.cli says how). One module per concern, each
importing only those above it in this list:

    space    the search-space YAML of sweeps/search/: Param, SearchSpace, load_space, validate_space
    study    Optuna storage, the trial budget, heartbeats, creating or continuing a study
    worker   the worker job (SearchWorker) and its trials (Objective): one stage-1 run each
    launch   the workers through bench.executors.dispatch, with the study's progress line
    report   trials.csv/.md, best.json/.md, plots, summary.md
    final    the best configuration vs the profile's defaults on the test split
    cli      main: the command line, which ties them together
"""
from bench.search.space import (PARAM_TYPES, SPACES_DIR, Param, SearchError, SearchSpace, check_selection_split,
                                is_test_split, list_spaces, load_space, validate_space)
from bench.search.study import (FileHeartbeat, Heartbeat, budget_used, create_or_continue, enqueue_defaults,
                                is_rdb_url, open_storage, retried_numbers)
from bench.search.worker import (Objective, SearchWorker, WorkerSpec, make_pruner, run_worker, trial_config,
                                 worker_seed)
from bench.search.launch import ProgressLine, launch_workers
from bench.search.report import LABELS, trials_frame, write_plots, write_reports, write_summary
from bench.search.final import PAPER_METRICS, choose_final_split, final_evaluation
from bench.search.cli import main

__all__ = [
    "PARAM_TYPES", "SPACES_DIR", "Param", "SearchError", "SearchSpace", "check_selection_split", "is_test_split",
    "list_spaces", "load_space", "validate_space",
    "FileHeartbeat", "Heartbeat", "budget_used", "create_or_continue", "enqueue_defaults", "is_rdb_url",
    "open_storage", "retried_numbers",
    "Objective", "SearchWorker", "WorkerSpec", "make_pruner", "run_worker", "trial_config", "worker_seed",
    "ProgressLine", "launch_workers",
    "LABELS", "trials_frame", "write_plots", "write_reports", "write_summary",
    "PAPER_METRICS", "choose_final_split", "final_evaluation",
    "main",
]
