"""One resolved fine-tuning run: :class:`RunConfig`, written to ``artifacts/runs/<task>-<method>-<seed>.json``.

The ``configure`` stage (params: ``data.tasks`` and the whole ``train`` section) resolves each run of
the matrix from the validated params (:meth:`RunConfig.from_params`: its method key, the method's
settings object with a variant's overrides, the shared loop, primary adapter and distributed settings)
and writes one file per run. ``finetune@<run>`` reads that file back (:func:`read`) and trains from it
alone: it does not read ``params.yaml`` to train. Its DVC dep is its own file, not the ``train``
sections, so editing ``train.flat_lora.sigma`` re-runs ``configure`` (cheap) and then only the runs
whose file changed: the files are written deterministically (sorted keys), so an unchanged run's file
stays byte-identical and DVC leaves that run alone. Staleness is DVC's job; ``pipeline.validate``
checks the params.

The same object is the finetune run's MLflow params (:meth:`RunConfig.params`): this run's method and
its settings, nothing of the other methods.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bilora.config import DistributedConfig, LoopConfig, LoraSpec, method_module, method_settings
from bilora.settings import Settings, SettingsError, values
from pipeline.config.sections import to_settings
from pipeline.stage import layout
from pipeline.terminal.user_error import UserError

SCHEMA = 2


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines ``finetune@<task>-<method>-<seed>``."""

    task: str
    method: str  # the run's name in train.methods: a method key or a variant name
    method_key: str  # the registered method it trains with (a variant names its base method)
    method_config: Settings  # that method's settings, with the variant's overrides
    seed: int
    loop: LoopConfig
    lora: LoraSpec  # the primary adapter (its modules_to_save are the task format's, set at finetune)
    distributed: DistributedConfig
    plugin: str | None = None  # the module that registers a plugin method (train.plugins); None: built in

    @property
    def name(self) -> str:
        return layout.run_name(self.task, self.method, self.seed)

    @classmethod
    def from_params(cls, p: Any, task: str, run: str, seed: int) -> RunConfig:
        """The run ``run`` (a method key or variant name) of validated params ``p``."""
        key, cfg = p.train.resolve(run)
        module = method_module(key)
        return cls(
            task=task,
            method=run,
            method_key=key,
            method_config=method_settings()[key](**cfg),
            seed=seed,
            loop=to_settings(p.train.loop),  # type: ignore[arg-type]
            lora=to_settings(p.train.lora),  # type: ignore[arg-type]
            distributed=to_settings(p.train.distributed),  # type: ignore[arg-type]
            plugin=None if module.startswith("bilora.") else module,
        )

    def to_dict(self) -> dict[str, Any]:
        """The file's content: plain JSON values, the settings by field name."""
        out = {
            "schema": SCHEMA,
            "task": self.task,
            "method": self.method,
            "method_key": self.method_key,
            "method_config": values(self.method_config),
            "seed": self.seed,
            "loop": values(self.loop),
            "lora": values(self.lora),
            "distributed": values(self.distributed),
        }
        return out | ({"plugin": self.plugin} if self.plugin else {})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """The run of a file's content (a plugin method's module is imported first, to register it)."""
        if d.get("schema") != SCHEMA:
            raise ValueError(f"file layout {d.get('schema')!r}, this code reads {SCHEMA}")
        if d.get("plugin"):
            importlib.import_module(d["plugin"])
        return cls(
            task=d["task"],
            method=d["method"],
            method_key=d["method_key"],
            method_config=method_settings()[d["method_key"]](**d["method_config"]),
            seed=d["seed"],
            loop=LoopConfig(**d["loop"]),
            lora=LoraSpec(**d["lora"]),
            distributed=DistributedConfig(**d["distributed"]),
            plugin=d.get("plugin"),
        )

    def params(self) -> dict[str, Any]:
        """The run's MLflow params (nested; the tracker flattens them to ``bilora.rho``, ``loop.lr``, ``lora.r``):
        its name, method, task and seed, the method's own settings under its key, then loop, lora and
        distributed. A method without settings (``lora``) adds nothing."""
        own = values(self.method_config)
        return {
            "method": self.method,
            "method_key": self.method_key,
            "task": self.task,
            "seed": self.seed,
            **({self.method_key: own} if own else {}),
            "loop": values(self.loop),
            "lora": values(self.lora),
            "distributed": values(self.distributed),
            **({"plugin": self.plugin} if self.plugin else {}),
        }


def encode(run: RunConfig) -> str:
    """The file's bytes: sorted keys, fixed layout (an unchanged run keeps an identical file)."""
    return json.dumps(run.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"


def all_runs(p: Any) -> dict[str, RunConfig]:
    """Run name -> run config for every task x method x seed of the matrix."""
    runs = [RunConfig.from_params(p, t, m, s) for t in p.data.tasks for m in p.train.methods for s in p.train.seeds]
    return {r.name: r for r in runs}


def write_all(p: Any, out: Path) -> list[str]:
    """Write every run's file into ``out`` (a fresh folder); returns the run names."""
    out.mkdir(parents=True, exist_ok=True)
    runs = all_runs(p)
    for name, run in runs.items():
        (out / f"{name}.json").write_text(encode(run), encoding="utf-8")
    return list(runs)


def read(task: str, method: str, seed: int) -> RunConfig:
    """The run's file, written by ``configure``; a missing or unreadable file is a :class:`UserError` saying why."""
    path = layout.run_settings_path(layout.run_name(task, method, seed))
    if not path.is_file():
        raise UserError(_missing(task, method, seed))
    try:
        return RunConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, ImportError, SettingsError) as e:
        raise UserError(
            f"{path}: not a run file this code reads ({type(e).__name__}: {e}); run `dvc repro configure` to rewrite it"
        ) from None


def _missing(task: str, method: str, seed: int) -> str:
    """Why there is no file for this run: which of --task, --method, --seed configure wrote none for."""
    fix = "stage 'configure' writes one per data.tasks x train.methods x train.seeds of params.yaml; list it there and run `dvc repro configure`"
    written = [json.loads(f.read_text(encoding="utf-8")) for f in sorted(layout.RUNS.glob("*.json"))] if layout.RUNS.is_dir() else []
    if not written:
        return f"{layout.RUNS}: no run settings files (output of stage 'configure'); run `dvc repro configure` first"
    tasks, runs, seeds = (sorted({str(w.get(k)) for w in written}) for k in ("task", "method", "seed"))
    if task not in tasks:
        return f"--task: no run of task {task!r} in {layout.RUNS} ({fix}); tasks there: {tasks}"
    if method not in runs:
        return f"--method: no run of method {method!r} in {layout.RUNS} ({fix}); runs there: {runs}, registered methods: {list(method_settings())} (or a name of train.variants)"
    if str(seed) not in seeds:
        return f"--seed: no run with seed {seed} in {layout.RUNS} ({fix}); seeds there: {seeds}"
    return f"{layout.run_settings_path(layout.run_name(task, method, seed))}: not found ({fix})"
