"""``python -m pipeline.validate [params.yaml]``: validate every parameter at once (exit 2 on errors)."""

from __future__ import annotations

import argparse

from pipeline.terminal.quiet import quiet

quiet()  # first: a train.plugins module, imported to validate, may import torch/peft/bitsandbytes

from pipeline.data.catalog import check as check_data  # noqa: E402
from pipeline.config.load import load_params
from pipeline.terminal.console import console
from pipeline.terminal.user_error import cli


@cli
def main(argv: list[str] | None = None) -> None:
    quiet()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("params", nargs="?", default="params.yaml")
    args = ap.parse_args(argv)
    p = load_params(args.params)
    check_data(p.data)  # the data sources of every task in data.tasks and data.eval_tasks (DataError -> exit 2)
    n = len(p.data.tasks) * len(p.train.methods) * len(p.train.seeds)
    evals = f" + {len(p.data.eval_tasks) * len(p.train.methods) * len(p.train.seeds)} eval-only evaluation(s)" if p.data.eval_tasks else ""
    console.print(
        f"[green]ok[/] {args.params}: {len(p.data.tasks)} task(s) x {len(p.train.methods)} method(s) x {len(p.train.seeds)} seed(s) = {n} fine-tune run(s){evals}"
    )


if __name__ == "__main__":
    main()
