"""``python -m stages.launch <stage> [args...]``: run a training stage on one or more processes.

Reads ``train.distributed`` from params.yaml (``--params`` among the stage args, default
``params.yaml``). With ``nproc_per_node == 1`` it runs ``python -m stages.<stage> args`` in this
process, exactly as before. With ``nproc_per_node > 1`` it re-execs through
``python -m torch.distributed.run --standalone --nproc-per-node N -m stages.<stage> args``
(torchrun: one process per GPU, rendezvous on localhost); the stage initialises the process group
from torchrun's environment with ``train.distributed.backend``.

Multi-node: run the stage on every node yourself with torchrun's rendezvous arguments, e.g.
``torchrun --nnodes 2 --node-rank K --rdzv-backend c10d --rdzv-endpoint HOST:29500
--nproc-per-node 8 -m stages.finetune --task ...`` (the launcher covers a single machine).
"""

from __future__ import annotations

import os
import sys

from pipeline.config.load import load_params
from pipeline.terminal.user_error import UserError, cli

STAGES = ("finetune",)


def launch_command(stage: str, args: list[str], nproc: int) -> list[str]:
    """The argv that runs ``stage`` on ``nproc`` local processes (pure; tested without launching)."""
    if nproc <= 1:
        return [sys.executable, "-m", f"stages.{stage}", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", f"stages.{stage}", *args]


def _params_path(args: list[str]) -> str:
    for i, a in enumerate(args):
        if a == "--params" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--params="):
            return a.split("=", 1)[1]
    return "params.yaml"


@cli
def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STAGES:
        raise UserError(f"usage: python -m stages.launch {{{','.join(STAGES)}}} [stage args...]")
    stage, args = argv[0], argv[1:]
    nproc = load_params(_params_path(args)).train.distributed.nproc_per_node
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
