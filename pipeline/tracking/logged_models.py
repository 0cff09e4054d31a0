"""MLflow 3 logged models: the primary adapter (finetune) and the merged model (merge).

* **adapter** -- a pyfunc "models from code" model (:mod:`pipeline.tracking.adapter_model`) that carries the
  PEFT adapter (about a MB) and references the saved 4-bit base by path rather than copying it into
  every run. MLflow's transformers flavor also logs PEFT adapters, but its loader would not set the
  project's 4-bit CPU kernel (``bilora.layers``), so its logits could differ from the stage's.
* **merged** -- MLflow's transformers flavor, from the merged model and tokenizer in memory (MLflow
  3.17 cannot log a transformers 5 checkpoint folder); the weights are copied: a registry version
  must load on its own. With ``tracking.register_model: <name>`` it becomes a new
  version of that registered model.

Each model records params (the base's identity from ``bilora_base.json``, the run's resolved
config, :meth:`pipeline.config.runs.RunConfig.params`) and tags (task, method, seed, run). Its id lands in the
stage's ``run_info.json`` (``models``), where evaluate finds the adapter it scores and links its
metrics to it (:func:`adapter_id`). Every call goes through the tracker's guard: with tracking down
nothing is logged and the stage carries on.
"""

from __future__ import annotations

import json
import re
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pipeline.tracking.experiment import flatten
from pipeline.tracking.tracker import Tracker

ADAPTER_CODE = Path(__file__).with_name("adapter_model.py")
# Pinned from this environment, so MLflow does not infer them (a subprocess that reloads the model).
# `bilora` itself is this repository, not a PyPI package: install it to load an adapter.
REQUIREMENTS = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "numpy")
PIPELINE_TASK = {"classification": "text-classification", "regression": "text-classification", "generation": "text-generation"}


def requirements() -> list[str]:
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return out


def model_name(role: str, run: str) -> str:
    """``<role>-<run>`` as an MLflow model name, which may not hold ``/ : . % " '``: a variant such as
    ``bilora_rho0.5`` becomes ``adapter-sst2-bilora_rho0_5-0`` (the model's ``run`` tag keeps the run's name)."""
    return re.sub(r"[/:.%\"']", "_", f"{role}-{run}")


def base_params(base_dir: str | Path) -> dict[str, str]:
    """The base's identity (``bilora_base.json``: provenance, stored dtype, quantization) as ``base.*``
    params; the machine-specific path is left to the model's config and tags."""
    info = json.loads((Path(base_dir) / "bilora_base.json").read_text())
    provenance = {k: v for k, v in info.get("provenance", {}).items() if k != "path"}
    flat = flatten({"provenance": provenance, "stored_dtype": info.get("stored_dtype"), "quant": info.get("quant", {})})
    return {f"base.{k}": str(v) for k, v in flat.items()}


def run_params(run: dict[str, Any]) -> dict[str, str]:
    """A run's resolved config (``RunConfig.params()``: method, its settings, loop, lora, distributed) as params."""
    return {k: str(v) for k, v in flatten(run).items()}


def _signature(input_names: list[str], kind: str, num_labels: int):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    out = (-1, -1, -1) if kind == "generation" else (-1, num_labels)  # (B, L, V) or (B, num_labels)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("int64"), (-1, -1), n) for n in input_names]),
        outputs=Schema([TensorSpec(np.dtype("float32"), out)]),
    )


def log_adapter(
    tracker: Tracker,
    run: str,
    adapter_dir: Path,
    base_dir: Path,
    run_config: dict[str, Any],
    kind: str,
    num_labels: int,
    input_names: list[str],
    tags: dict[str, Any],
) -> str | None:
    """Log ``adapter_dir`` (on the base in ``base_dir``) as the run's ``adapter-<run>`` model; its id, or None untracked."""

    def log() -> str:
        import mlflow

        base = str(Path(base_dir).resolve())
        with warnings.catch_warnings():  # the signature is given explicitly; an input example would make MLflow load the model
            warnings.filterwarnings("ignore", message=r".*An input example was not provided", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name=model_name("adapter", run),
                python_model=str(ADAPTER_CODE),
                artifacts={"adapter": str(adapter_dir)},
                model_config={"base_dir": base, "kind": kind, "num_labels": num_labels},
                signature=_signature(input_names, kind, num_labels),
                pip_requirements=requirements(),
                params=base_params(base_dir) | run_params(run_config),
                tags={k: str(v) for k, v in tags.items()} | {"run": run, "base.path": base},
                model_type="adapter",
            )
        return info.model_id

    return tracker.log_model("adapter", log)


def log_merged(
    tracker: Tracker,
    run: str,
    model,
    tokenizer,
    base_dir: Path,
    run_config: dict[str, Any],
    kind: str,
    merge: dict[str, Any],
    tags: dict[str, Any],
    register: str | None,
) -> str | None:
    """Log the merged ``model`` (a transformers model, in its saved dtype) as ``merged-<run>``; with
    ``register`` a new version of that registered model (``tracker.registered``). Its id, or None."""

    def log() -> str:
        import mlflow

        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            task=PIPELINE_TASK[kind],
            name=model_name("merged", run),
            pip_requirements=requirements(),
            params=base_params(base_dir) | run_params(run_config) | {f"merge.{k}": str(v) for k, v in merge.items()},
            tags={k: str(v) for k, v in tags.items()} | {"run": run},
            model_type="merged",
            registered_model_name=register,
        )
        if register:
            tracker.registered = {"name": register, "version": int(info.registered_model_version)}
        return info.model_id

    return tracker.log_model("merged", log)


def adapter_id(finetune_dir: Path, tracker: Tracker) -> str | None:
    """The adapter model id finetune wrote into ``<finetune_dir>/run_info.json``, if it lives in this
    tracker's store (a model id from another store would fail every metric logged against it)."""
    f = Path(finetune_dir) / "run_info.json"
    info = json.loads(f.read_text()) if f.is_file() else {}
    return info.get("models", {}).get("adapter") if info.get("tracking_uri") == tracker.uri else None
