"""``dvc repro`` as ``python -m pipeline.run`` runs it: its output relayed as it comes, a progress line per stage,
and where the time went.

DVC prints one line when it reaches a stage of the pipeline: ``Running stage '<name>':`` before it runs it,
``Stage '<name>' didn't change, skipping`` when nothing it depends on changed, ``Stage '<name>' is cached -
skipping run, checking out outputs`` when its run cache has the outputs. :class:`Timeline` reads those lines:
before each stage that runs it adds ``stage k of N: <name>`` (k counts every stage DVC reached, N the stages
of the pipeline, :func:`pipeline_stages`), and each stage's clock runs from its line to the next stage's line
(or DVC's exit), so a stage's seconds include DVC's work around it (hashing and caching its outputs, writing
``dvc.lock``). What comes before the first stage's line is DVC's start (reading the pipeline, checking the
first stage). :func:`run` starts DVC with its standard output on a pseudo-terminal when ours is a terminal
(DVC and the stages keep their colours and progress bars), else on a pipe; its standard error is left alone.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

RAN, CACHED = "ran", "cached"  # cached: DVC skipped it (unchanged, or restored from its run cache)
_RUNNING = re.compile(r"Running stage '([^']+)':")
_SKIPPED = re.compile(r"Stage '([^']+)' (?:didn't change, skipping|is cached - skipping run)")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


@dataclass(frozen=True)
class StageTime:
    """One row of the table: a stage of the pipeline (or a part of the run that is none: ``dvc start``)."""

    stage: str
    status: str  # ran | cached | "" (not a stage)
    seconds: float


class Timeline:
    """Follows DVC's output line by line (:meth:`feed`) and times each stage it reaches (:meth:`times`)."""

    def __init__(self, total: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.clock = total, clock
        self.start = clock()
        self.stages: list[tuple[str, str, float]] = []  # (name, status, time DVC reached it)

    def feed(self, line: str) -> str | None:
        """Read one line of DVC's output; for a stage about to run, the progress line to print after it."""
        text = _ANSI.sub("", line)
        for pattern, status in ((_RUNNING, RAN), (_SKIPPED, CACHED)):
            m = pattern.search(text)
            if m:
                self.stages.append((m[1], status, self.clock()))
                if status == RAN:
                    of = f" of {self.total}" if self.total and len(self.stages) <= self.total else ""
                    return f"stage {len(self.stages)}{of}: {m[1]}"
                return None
        return None

    def times(self, end: float | None = None) -> list[StageTime]:
        """``dvc start``, then every stage in the order DVC reached it, with its seconds (up to ``end``, default now)."""
        end = self.clock() if end is None else end
        marks = [t for _, _, t in self.stages] + [end]
        out = [StageTime("dvc start", "", marks[0] - self.start)]
        return out + [StageTime(name, status, marks[i + 1] - t) for i, (name, status, t) in enumerate(self.stages)]


def pipeline_stages(root: str | Path = ".") -> int | None:
    """How many stages the pipeline of ``root`` has, matrix instances expanded (what a plain ``dvc repro`` goes
    through); None if DVC cannot read it (it then says why itself)."""
    try:
        from dvc.repo import Repo
        from dvc.stage import PipelineStage

        with Repo(str(root)) as repo:
            return sum(isinstance(s, PipelineStage) for s in repo.index.stages)
    except Exception:  # noqa: BLE001 - the count only decorates the progress line
        return None


def _lines(chunks: Iterator[bytes], write: Callable[[bytes], None], timeline: Timeline, note: Callable[[str], None]) -> None:
    """Relay ``chunks`` as they come (a partial line too: progress bars), feeding each complete line to ``timeline``
    and printing its progress line right after that line."""
    pending = b""
    for chunk in chunks:
        for piece in re.split(rb"(?<=\n)", chunk):
            if not piece:
                continue
            write(piece)
            if not piece.endswith(b"\n"):
                pending += piece
                continue
            line, pending = (pending + piece).decode(errors="replace"), b""
            progress = timeline.feed(line)
            if progress is not None:
                note(progress)
    if pending:
        timeline.feed(pending.decode(errors="replace"))


def _read(fd: int, proc: subprocess.Popen) -> Iterator[bytes]:
    """What comes on ``fd`` until it closes, or until ``proc`` has exited and nothing more came for 0.2 s (a
    process it started may hold the other end open)."""
    while True:
        if not select.select([fd], [], [], 0.2)[0]:
            if proc.poll() is not None:
                return
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every writer of the pseudo-terminal has exited
            return
        if not chunk:
            return
        yield chunk


def _terminal() -> bool:
    try:
        import pty  # noqa: F401  (POSIX only)
    except ImportError:
        return False
    return sys.stdout.isatty()


def run(cmd: list[str], env: dict[str, str], timeline: Timeline, note: Callable[[str], None]) -> int:
    """Run ``cmd`` (``dvc repro ...``), relaying its standard output to ours through ``timeline``; its exit code."""
    out = sys.stdout.buffer

    def write(b: bytes) -> None:
        out.write(b)
        out.flush()

    if _terminal():
        import fcntl
        import pty
        import termios

        master, slave = pty.openpty()
        try:  # the stages lay out their tables and bars for the real terminal's width
            fcntl.ioctl(slave, termios.TIOCSWINSZ, fcntl.ioctl(sys.stdout.fileno(), termios.TIOCGWINSZ, b"\0" * 8))
        except OSError:
            pass
        proc = subprocess.Popen(cmd, env=env, stdout=slave)
        os.close(slave)
        try:
            _lines(_read(master, proc), write, timeline, note)
        finally:
            os.close(master)
        return proc.wait()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        _lines(_read(proc.stdout.fileno(), proc), write, timeline, note)
    finally:
        proc.stdout.close()
    return proc.wait()


def as_rows(times: list[StageTime]) -> list[dict[str, object]]:
    """The table as JSON rows (``python -m pipeline.run --times FILE``, the parent run's artifact)."""
    return [asdict(t) | {"seconds": round(t.seconds, 2)} for t in times]
