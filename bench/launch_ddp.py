"""Train stage 1 or 2 as ONE SLURM job of several nodes / tasks (DDP), through submitit.

    python -m bench.launch_ddp --nodes 2 --tasks-per-node 4 --slurm-gpus 4 --slurm-partition gpu -- \\
        --profile paper --out runs/ehin-2x4
    python -m bench.launch_ddp --stage 2 --tasks-per-node 8 --slurm-gpus 8 -- \\
        --pseudo runs/s1/pseudo/train.npz --profile paper --out runs/s2

Everything after `--` is the trainer's own command line (python -m ehin.train_stage1 --help,
ehin.train_stage2); the config is resolved here, then every task of the job is one DDP rank
(train.batch_size / stage2.batch_size is the global batch). Give each task a GPU: --slurm-gpus (per
node) = --tasks-per-node. A preempted or timed-out job is requeued and resumes from
OUT/checkpoints/last.pt. submitit's logs: OUT/submitit/<job id>/. --wait waits for the job and
prints its metrics.
"""
from __future__ import annotations

import json
from typing import Sequence

from ehin.cli import command, command_parser, UserError


@command
def main(argv: Sequence[str] | None = None) -> None:
    from bench.executors import add_slurm_args, slurm_options, submit_distributed

    argv = list(argv or [])
    p = command_parser("python -m bench.launch_ddp", __doc__)
    p.add_argument("--stage", choices=("1", "2"), default="1", help="which trainer (default: 1)")
    p.add_argument("--nodes", type=int, default=1, help="SLURM nodes (default: 1)")
    p.add_argument("--tasks-per-node", type=int, default=1, help="DDP ranks per node, one per GPU (default: 1)")
    p.add_argument("--wait", action="store_true", help="wait for the job and print rank 0's metrics")
    add_slurm_args(p)
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])  # --help stops here
    if split == len(argv):
        raise UserError("put the trainer's arguments after `--`, e.g. -- --profile smoke --out runs/x")
    if args.nodes < 1 or args.tasks_per_node < 1:
        p.error("--nodes and --tasks-per-node must be positive")

    if args.stage == "1":
        from ehin.train_stage1 import parser
    else:
        from ehin.train_stage2 import parser
    from ehin.config import config_for_run

    tp = parser()
    targs = tp.parse_args(argv[split + 1:])
    cfg = config_for_run(tp, targs)  # refuses to overwrite a run unless --resume, as the trainer does
    opts = slurm_options(args, nodes=args.nodes, tasks_per_node=args.tasks_per_node)
    job = submit_distributed(args.stage, cfg, targs.out, opts, pseudo=getattr(targs, "pseudo", None))
    print(f"submitted job {job.job_id}: stage {args.stage}, {args.nodes} node(s) x {args.tasks_per_node} "
          f"task(s); logs {job.paths.stdout.parent}/; result {targs.out}/result.json")
    if args.wait:
        print(json.dumps(job.results()[0]["metrics"], indent=1))  # one result per task, rank 0's first


if __name__ == "__main__":
    main()
