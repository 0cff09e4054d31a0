"""What each DVC stage process pays before it does any work: the import time of its module.

    python -m bench.stage_imports                                        # this checkout -> reports/stage_imports.md
    python -m bench.stage_imports --tree before=/tmp/old --tree after=.  # compare checkouts (same interpreter)

For each stage module (``stages/<name>.py``) and each tree, ``python -X importtime -c "import stages.<name>"``
runs ``--runs`` times in a fresh interpreter whose working directory is the tree (its code comes first on
``sys.path``, ahead of the editable install), the trees interleaved so that the machine's load falls on them
alike. The table gives, per tree, the median wall time of that process (interpreter start included) and the
median sum of the cumulative times of its top-level imports (``-X importtime``), and the heavy packages the
import loaded in each tree. Run it under ``nice`` on an otherwise quiet machine: the report records the
load averages before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import machine

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "mlflow", "datasets", "matplotlib")
_LINE = re.compile(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)")


def top_level_seconds(importtime: str) -> float:
    """Sum of the cumulative microseconds of the top-level lines of ``-X importtime`` output, in seconds."""
    return sum(int(m[1]) for m in map(_LINE.match, importtime.splitlines()) if m and not m[2]) / 1e6


def measure(module: str, tree: Path) -> tuple[float, float, list[str]]:
    """(wall s, top-level import s, heavy packages loaded) of one fresh ``import module`` in ``tree``."""
    code = f"import {module}, json, sys; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=tree, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{tree}: import {module} failed:\n{r.stderr[-2000:]}")
    return wall, top_level_seconds(r.stderr), json.loads(r.stdout.strip().splitlines()[-1])


def stage_modules(tree: Path) -> list[str]:
    return [f"stages.{f.stem}" for f in sorted((tree / "stages").glob("*.py")) if f.stem != "__init__"]


def table(trees: dict[str, Path], runs: int) -> list[str]:
    """The Markdown table: per stage module, each tree's median wall and import seconds, then the heavy packages
    each tree's import loaded."""
    modules = stage_modules(next(reversed(trees.values())))
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
    heavy: dict[tuple[str, str], list[str]] = {}
    for _ in range(runs):
        for module in modules:
            for name, tree in trees.items():
                wall, imports, heavy[(module, name)] = measure(module, tree)
                samples.setdefault((module, name), []).append((wall, imports))
    head = "| stage | " + " | ".join(f"{n}: wall s | {n}: imports s" for n in trees) + " | " + " | ".join(f"{n}: loads" for n in trees)
    rows = [head + " |", "|---|" + "---:|---:|" * len(trees) + "---|" * len(trees)]
    for m in modules:
        cells = " | ".join(
            f"{statistics.median(w for w, _ in samples[(m, n)]):.2f} | {statistics.median(i for _, i in samples[(m, n)]):.2f}"
            for n in trees
        )
        loads = " | ".join(", ".join(heavy[(m, n)]) or "–" for n in trees)
        rows.append(f"| `{m.removeprefix('stages.')}` | {cells} | {loads} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", default=[], help="NAME=DIR, a checkout to measure (repeatable; default: this=.)")
    ap.add_argument("--runs", type=int, default=3, help="fresh interpreters per stage and tree (the median is reported)")
    ap.add_argument("--out", type=Path, default=Path("reports/stage_imports.md"), help="the Markdown report ('-': print only)")
    args = ap.parse_args(argv)
    trees = {n: Path(d).resolve() for n, d in (t.split("=", 1) for t in args.tree)} or {"this": Path.cwd()}
    load_before = machine.load()
    rows = table(trees, args.runs)
    load_after = machine.load()
    text = "\n".join(
        [
            "# Stage start-up: import time of each stage module",
            "",
            f"Command: `{' '.join(['python -m bench.stage_imports', *(argv if argv is not None else sys.argv[1:])])}` (niceness {os.nice(0)}).",
            f"Machine: {machine.describe()}; load averages (1/5/15 min) {load_before} before, {load_after} after.",
            f"Median of {args.runs} fresh interpreters per stage and tree; wall = the whole `python -X importtime -c 'import stages.<name>'`",
            "process (interpreter start included), imports = the summed cumulative time of its top-level imports.",
            "Trees: " + ", ".join(f"{n} = `{d}`" for n, d in trees.items()) + ".",
            "",
            *rows,
            "",
        ]
    )
    print(text)
    if str(args.out) != "-":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
