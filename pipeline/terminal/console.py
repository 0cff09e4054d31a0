"""The rich console shared by stages: headers, progress bars with ETA, tables, clean errors.

``info``/``warn``/``error`` messages are never hard-wrapped (``soft_wrap``): in a log file each stays one line.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.rule import Rule

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def header(stage: str, detail: str = "") -> None:
    console.print(Rule(f"[bold cyan]{stage}[/] {detail}".rstrip(), align="left"))


def info(msg: str) -> None:
    console.print(f"[dim]•[/] {msg}", soft_wrap=True)


def warn(msg: str) -> None:
    err_console.print(f"[yellow]warning:[/] {msg}", soft_wrap=True)


def error(msg: str) -> None:
    err_console.print(f"[bold red]error:[/] {msg}", soft_wrap=True)


@contextmanager
def progress(description: str, total: int) -> Iterator["callable"]:
    """Yield ``advance(completed, total)``; shows a bar with ETA."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[extra]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total, extra="")

        def advance(completed: int, total_: int | None = None, extra: str = "") -> None:
            bar.update(task, completed=completed, total=total_ or total, extra=extra)

        yield advance
