"""``python -m stages.launch <stage> [args...]``: run a training stage on one or more processes.

Reads ``distributed`` from the run's settings file (``artifacts/runs/<task>-<method>-<seed>.json``,
written by ``configure`` from ``train.distributed``; the stage's DVC dep). With ``nproc_per_node == 1``
(or no such file: the stage then says why) it runs ``python -m stages.<stage> args`` in this process.
With ``nproc_per_node > 1`` it re-execs through ``python -m torch.distributed.run --standalone
--nproc-per-node N -m stages.<stage> args`` (torchrun: one process per GPU, rendezvous on localhost); the
stage initialises the process group from torchrun's environment with ``train.distributed.backend``.

Multi-node: run the stage on every node yourself with torchrun's rendezvous arguments, e.g.
``torchrun --nnodes 2 --node-rank K --rdzv-backend c10d --rdzv-endpoint HOST:29500
--nproc-per-node 8 -m stages.finetune --task ...`` (the launcher covers a single machine).
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.config import runs
from pipeline.stage import layout
from pipeline.terminal.user_error import UserError, cli

STAGES = ("finetune",)


def launch_command(stage: str, args: list[str], nproc: int) -> list[str]:
    """The argv that runs ``stage`` on ``nproc`` local processes (pure; tested without launching)."""
    if nproc <= 1:
        return [sys.executable, "-m", f"stages.{stage}", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", f"stages.{stage}", *args]


def nproc_of(args: list[str]) -> int:
    """``train.distributed.nproc_per_node`` of the run named by ``--task --method --seed`` (1 when there is no run file)."""
    ap = argparse.ArgumentParser(add_help=False)
    for a in ("--task", "--method", "--seed"):
        ap.add_argument(a)
    known, _ = ap.parse_known_args(args)
    if None in (known.task, known.method, known.seed) or not known.seed.lstrip("-").isdigit():
        return 1
    if not layout.run_settings_path(layout.run_name(known.task, known.method, int(known.seed))).is_file():
        return 1
    return runs.read(known.task, known.method, int(known.seed)).distributed.nproc_per_node


@cli
def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STAGES:
        raise UserError(f"usage: python -m stages.launch {{{','.join(STAGES)}}} [stage args...]")
    stage, args = argv[0], argv[1:]
    nproc = nproc_of(args)
    if nproc <= 1:
        from stages import finetune  # the one stage in STAGES

        finetune.main(args)
        return
    cmd = launch_command(stage, args, nproc)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
