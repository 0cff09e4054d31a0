"""Compare the outputs of one pipeline run in two workspaces (e.g. the same commit on two CPU classes).

    .venv/bin/python -m bench.compare_workspaces A B [--out reports/cross_cpu.json]

For every committed figure file (``metrics/*.json``, ``reports/summary.json``) it says whether the
figures are equal once both are rounded by the current rule (pipeline/report/precision.py; timings left out),
so workspaces written before a rounding change still compare; for the full-precision outputs under ``artifacts/`` (fine-tune histories, adapter
tensors, evaluate metrics and sharpness) it prints the largest relative difference per file, with
timings (``*time*`` keys) left out. The committed files are rounded (pipeline/report/precision.py), so
"identical" there means equal at the stated precision; the artifact figures show how far below
that precision the two runs actually differ.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from safetensors.torch import load_file

from pipeline.report.precision import rounded


def _leaves(obj, prefix: str = ""):
    """(dotted path, number) for every numeric leaf of a JSON value, timings excluded."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}{i}.")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and not _is_timing(prefix):
        yield prefix.rstrip("."), float(obj)


def _is_timing(path: str) -> bool:
    """Wall-clock figures (``step_time``, ``cost.random_s``, ...): machine-dependent by nature."""
    return any("time" in part or part.endswith("_s") or part == "cost" for part in path.split("."))


def rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), 1e-300) if math.isfinite(a) and math.isfinite(b) else math.inf


def json_diff(a: Path, b: Path) -> tuple[float, str]:
    la, lb = dict(_leaves(json.loads(a.read_text()))), dict(_leaves(json.loads(b.read_text())))
    if la.keys() != lb.keys():
        return math.inf, f"keys differ: {sorted(la.keys() ^ lb.keys())[:5]}"
    worst = max(la, key=lambda k: rel(la[k], lb[k]), default="")
    return (rel(la[worst], lb[worst]), worst) if worst else (0.0, "")


def tensor_diff(a: Path, b: Path) -> tuple[float, str]:
    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys():
        return math.inf, "tensor names differ"
    out = (0.0, "")
    for k in ta:
        x, y = ta[k].double(), tb[k].double()  # relative to the tensor's norm: an adapter's scale
        r = float((x - y).norm() / max(float(x.norm()), 1e-300))
        out = max(out, (r, k))
    return out


def _figures(path: Path) -> dict:
    """The file's figures as the current rule commits them, timings left out."""
    return {k: v for k, v in _leaves(rounded(json.loads(path.read_text())))}


def compare(a: Path, b: Path) -> dict:
    committed = sorted([*(p.relative_to(a) for p in (a / "metrics").glob("*.json")), Path("reports/summary.json")])
    full = sorted(
        p.relative_to(a)
        for pat in (
            "artifacts/finetune/*/history.json",
            "artifacts/eval/*/metrics.json",
            "artifacts/eval/*/sharpness.json",
            "artifacts/finetune/*/adapter/*.safetensors",
        )
        for p in a.glob(pat)
    )
    result = {"committed_identical": {}, "artifacts_max_rel_diff": {}}
    for f in committed:
        result["committed_identical"][str(f)] = _figures(a / f) == _figures(b / f) if (b / f).exists() else None
    for f in full:
        if not (b / f).exists():
            result["artifacts_max_rel_diff"][str(f)] = None
            continue
        r, where = (tensor_diff if f.suffix == ".safetensors" else json_diff)(a / f, b / f)
        result["artifacts_max_rel_diff"][str(f)] = {"max_rel": r, "at": where}
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    res = compare(args.a, args.b)
    for f, same in res["committed_identical"].items():
        print(f"{'identical' if same else 'MISSING' if same is None else 'DIFFERENT':>9}  {f}")
    for f, d in res["artifacts_max_rel_diff"].items():
        print(f"{'missing' if d is None else format(d['max_rel'], '.2e'):>9}  {f}" + (f"  ({d['at']})" if d and d["at"] else ""))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
