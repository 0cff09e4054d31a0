"""``python -m pipeline.run``: validate params.yaml, then ``dvc repro`` offline, then print the summary.

* Validation happens first (every problem at once, exit 2, no traceback), so a bad file touches no output;
  then every task's data sources are read and checked (files, parsing, columns, labels: one message, exit 2).
* ``HF_HUB_OFFLINE=1`` is set in the environment of the whole pipeline unless the caller set it
  (``HF_HUB_OFFLINE=0 python -m pipeline.run`` lets a user with a hub resolve Hub ids).
* The interpreter's own ``bin/`` goes first on PATH so DVC's ``python -m stages.*`` commands
  run inside this virtual environment even when it is not activated.

* It opens an MLflow parent run (:mod:`pipeline.group`) that every stage run of this repro nests
  under; the parent carries params.yaml, the summary table, the headline metrics and the list of
  stages, ``ran`` or ``cached`` (DVC skipped them; their run ids are the ones their outputs record).
  Tracking unreachable: a warning, and the pipeline runs without it.

Extra arguments go to ``dvc repro`` (e.g. ``python -m pipeline.run -- --force``).

``--preset NAME`` merges ``pipeline/presets/NAME.yaml`` (a delta: only the keys it changes, as
nanoGPT's ``config/finetune_*.py``) over params.yaml, validates the result (every problem at once,
by dotted path, naming the preset file) and only then writes the changed keys into params.yaml
(its comments and the other keys stay), e.g. ``python -m pipeline.run --preset smollm2_gsm8k_cpu``.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from pipeline.quiet import quiet

quiet()  # before the imports below: the params schema is derived from the method registry, which imports torch/peft/bitsandbytes

from pipeline import group  # noqa: E402
from pipeline.catalog import check as check_data
from pipeline.config import load_params
from pipeline.console import console, error, header
from pipeline.errors import cli
from pipeline.tracking import tracking_uri


def pipeline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", env["HF_HUB_OFFLINE"])
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


PRESETS = Path(__file__).resolve().parent / "presets"


def merge(base: Any, delta: Any) -> Any:
    """``delta`` deep-merged over ``base``: mappings merge key by key; anything else (a list, a
    scalar, an empty mapping) replaces the value. Neither argument is modified."""
    if not isinstance(delta, dict) or not isinstance(base, dict) or not delta:
        return copy.deepcopy(delta)
    out = copy.deepcopy(base)
    for k, v in delta.items():
        out[k] = merge(out[k], v) if k in out else copy.deepcopy(v)
    return out


def preset_path(name: str) -> Path:
    from pipeline.errors import UserError

    src = PRESETS / f"{name}.yaml"
    if not src.is_file():
        known = sorted(f.stem for f in PRESETS.glob("*.yaml"))
        raise UserError(f"--preset {name!r}: no {src}; available presets: {known}")
    return src


def load_preset(name: str, params_path: str = "params.yaml") -> tuple[dict, dict, Any]:
    """(delta, merged params mapping, validated params) of ``pipeline/presets/<name>.yaml`` over
    ``params_path``. Problems of the merged result raise one ConfigError naming the preset file."""
    from pipeline.config import ConfigError, read_yaml, validate_dict

    src = preset_path(name)
    delta = read_yaml(src) or {}
    if not isinstance(delta, dict):
        raise ConfigError(str(src), [("<root>", "a preset is a mapping of the params.yaml keys it changes")])
    merged = merge(read_yaml(params_path), delta)
    return delta, merged, validate_dict(merged, f"{src} (merged over {params_path})")


def apply_preset(name: str, params_path: str) -> None:
    """Merge ``pipeline/presets/<name>.yaml`` over ``params_path`` and write it back (nothing is
    written if the result is invalid). Only the preset's keys change; comments elsewhere stay."""
    from ruamel.yaml import YAML

    from bilora.io import atomic_write_text

    load_preset(name, params_path)  # validate the merged result first
    rt = YAML()  # round-trip: keeps params.yaml's comments and key order, and the preset's own style
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(Path(params_path).read_text(encoding="utf-8"))
    delta = rt.load(preset_path(name).read_text(encoding="utf-8"))

    def put(node: Any, d: Any) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and v and isinstance(node.get(k), dict):
                put(node[k], v)
                continue
            node[k] = v  # the preset's value, with the preset's end-of-line comment (or none)
            node.ca.items.pop(k, None)
            if k in d.ca.items:
                node.ca.items[k] = d.ca.items[k]
                for tok in node.ca.items[k]:  # drop the blank lines that ended the preset's section
                    if getattr(tok, "value", None):
                        tok.value = tok.value.rstrip("\n") + "\n"

    put(doc, delta)
    buf = io.StringIO()
    rt.dump(doc, buf)
    atomic_write_text(params_path, buf.getvalue())
    keys = sorted(flatten_keys(delta))
    console.print(
        f"[yellow]preset {name}[/]: merged {len(keys)} key(s) of {preset_path(name).relative_to(PRESETS.parent.parent)} over {params_path}: {', '.join(keys)}"
    )


def flatten_keys(d: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves of a preset (a list or empty mapping is one leaf)."""
    out = []
    for k, v in d.items():
        out += flatten_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


def summary_table(summary: dict[str, dict]) -> Table:
    """The closing table of ``reports/summary.json`` (``task.method`` -> mean/std/seeds/step time).
    Fits 80 columns for every task x method name; a longer cell folds onto a second line, never cut."""
    table = Table(title="bilora summary (test split; mean ± std over seeds)")
    table.add_column("run", overflow="fold")
    table.add_column("metric", overflow="fold")
    for col in ("mean", "std", "seeds", "s/step"):
        table.add_column(col, justify="right", no_wrap=True)
    for key, row in summary.items():
        run = key + (f" (adapter of {row['adapter_from']})" if row.get("adapter_from") else "")
        table.add_row(
            run, row["main_metric"], f"{row['mean']:.4f}", f"{row['std']:.4f}", str(row["n_seeds"]), f"{row['median_step_time']:.3f}"
        )
    return table


def open_parent(params) -> str | None:
    """The parent run of this ``dvc repro`` (None when tracking is unreachable)."""
    from datetime import datetime

    name = "pipeline.run " + datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return group.open_parent(tracking_uri(), params.tracking.experiment, name, {group.ROLE_TAG: "run"}, "params.yaml")


def dvc(*args: str, env: dict[str, str]) -> int:
    return subprocess.call([str(Path(sys.executable).parent / "dvc"), *args], env=env)


@cli
def main(argv: list[str] | None = None) -> None:
    quiet()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file to validate (dvc reads params.yaml)")
    ap.add_argument(
        "--preset",
        default=None,
        help="merge pipeline/presets/PRESET.yaml (the keys it changes) over params.yaml, validate, write params.yaml, then run (e.g. smollm2_gsm8k_cpu)",
    )
    ap.add_argument("dvc_args", nargs="*", help="extra arguments for dvc repro")
    args = ap.parse_args(argv)
    if args.preset:
        apply_preset(args.preset, args.params)
    params = load_params(args.params)
    check_data(params.data, tracked="data")  # before dvc: files exist, parse, columns and labels valid (DataError -> exit 2)
    evals = f" (+ {len(params.data.eval_tasks)} eval-only)" if params.data.eval_tasks else ""
    console.print(
        f"[green]params ok[/]: {len(params.data.tasks)} task(s){evals} x {len(params.train.methods)} method(s) x {len(params.train.seeds)} seed(s)"
    )
    env = pipeline_env()
    if not Path(".dvc").is_dir():
        error("no .dvc folder here: run from the repository root")
        sys.exit(2)
    header("dvc repro", " ".join(args.dvc_args))
    env.pop(group.PARENT_ENV, None)  # the parent is this process's own, never inherited
    parent = open_parent(params)
    if parent is not None:
        env[group.PARENT_ENV] = parent
    rc = dvc("repro", *args.dvc_args, env=env)
    if parent is not None:
        group.close_parent(tracking_uri(), parent, "FINISHED" if rc == 0 else "FAILED", ".", "params.yaml")
        console.print(f"MLflow parent run {parent}: every stage run of this repro is nested under it")
    if rc != 0:
        error(
            f"dvc repro failed (exit {rc}); fix the stage's error above and run again (finished stages are not re-run; training resumes from its checkpoint)"
        )
        sys.exit(rc)
    summary = Path("reports/summary.json")
    if summary.exists():
        console.print(summary_table(json.loads(summary.read_text())))
        console.print("Details: reports/report.md · MLflow UI: docs/tracking.md")


if __name__ == "__main__":
    main()
