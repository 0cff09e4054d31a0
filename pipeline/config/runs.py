"""Resolved settings of each fine-tuning run: ``artifacts/runs/<task>-<method>-<seed>.json``.

The ``configure`` stage (params: ``data.tasks`` and the whole ``train`` section) writes one file
per run of the matrix, holding exactly what determines that run: the run name, its method key
(a variant names its base method), the method's settings with the variant's overrides, and the
shared ``train.loop``, ``train.lora`` and ``train.distributed``. Each ``finetune@<run>`` stage
depends on its own file instead of on ``params.yaml`` sections, so editing
``train.flat_lora.sigma`` re-runs ``configure`` (cheap) and then only the runs whose file changed:
the files are written deterministically (sorted keys), so an unchanged run's file stays
byte-identical and DVC leaves that run alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.stage import layout
from pipeline.terminal.user_error import UserError

SCHEMA = 1


def run_settings(p: Any, task: str, run: str, seed: int) -> dict[str, Any]:
    """Everything that determines ``finetune@<task>-<run>-<seed>``, resolved from validated params."""
    key, cfg = p.train.resolve(run)
    return {
        "schema": SCHEMA,
        "task": task,
        "method": run,
        "method_key": key,
        "method_config": cfg,
        "seed": seed,
        "loop": p.train.loop.model_dump(mode="json"),
        "lora": p.train.lora.model_dump(mode="json"),
        "distributed": p.train.distributed.model_dump(mode="json"),
    }


def encode(settings: dict[str, Any]) -> str:
    """The file's bytes: sorted keys, fixed layout (an unchanged run keeps an identical file)."""
    return json.dumps(settings, indent=2, sort_keys=True, allow_nan=False) + "\n"


def all_runs(p: Any) -> dict[str, dict[str, Any]]:
    """Run name -> settings for every task x method x seed of the matrix."""
    return {layout.run_name(t, m, s): run_settings(p, t, m, s) for t in p.data.tasks for m in p.train.methods for s in p.train.seeds}


def write_all(p: Any, out: Path) -> list[str]:
    """Write every run's file into ``out`` (a fresh folder); returns the run names."""
    out.mkdir(parents=True, exist_ok=True)
    runs = all_runs(p)
    for name, settings in runs.items():
        (out / f"{name}.json").write_text(encode(settings), encoding="utf-8")
    return list(runs)


def load(p: Any, task: str, run: str, seed: int) -> dict[str, Any]:
    """The run's settings file, checked against params.yaml (a stale or missing file is an error)."""
    path = layout.run_settings_path(layout.run_name(task, run, seed))
    if not path.is_file():
        raise UserError(
            f"{path}: not found (output of stage 'configure'); run `dvc repro configure` first (the run must be in the data.tasks x train.methods x train.seeds matrix)"
        )
    stored = json.loads(path.read_text(encoding="utf-8"))
    expected = json.loads(encode(run_settings(p, task, run, seed)))
    if stored != expected:
        diff = sorted(k for k in expected.keys() | stored.keys() if stored.get(k) != expected.get(k))
        raise UserError(f"{path}: does not match params.yaml (differs in {diff}); run `dvc repro configure` (or `dvc repro`) to rewrite it")
    return stored
