"""MLflow tracking: one run per stage execution, tagged so runs group even without a parent run.

Tags on every run: ``dvc.stage`` ($DVC_STAGE), ``dvc.exp`` ($DVC_EXP_NAME when present),
``git.commit``, ``git.dirty``, and the run's ``task``/``method``/``seed`` where they apply.
The experiment is tagged as a model-training experiment (``mlflow.experimentKind``), so the MLflow 3
UI opens it on "Training runs"; the data splits a run read are logged as dataset inputs
(:meth:`Tracker.log_dataset`, :func:`split_digest`); ``system_metrics=True`` (finetune) adds MLflow's
CPU/memory/disk/network (and GPU, with ``nvidia-ml-py``) ``system/*`` metrics, sampled every 10 s
(MLflow's default; ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides it). Logged models (adapter,
merged) are logged by :mod:`pipeline.tracking.logged_models`; their ids go into :meth:`Tracker.info` (``models``).
Under ``python -m pipeline.run`` (``BILORA_PARENT_RUN_ID``) or ``dvc exp run`` (``DVC_EXP_NAME``) the run
is nested under the pipeline's parent run (:mod:`pipeline.tracking.parent`); plain ``dvc repro`` has none.
The default tracking URI is ``sqlite:///mlflow.db`` at the repository root; ``MLFLOW_TRACKING_URI``
overrides it. If the tracking server is unreachable the stage still completes: the tracker warns
once and turns into a no-op; metrics stay in the DVC outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from pipeline.terminal.console import warn
from pipeline.tracking import parent
from pipeline.tracking.experiment import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, git_info, repo_root, tracking_uri


# Values the UI treats as "not chosen by anyone": replaced by EXPERIMENT_KIND; an explicit choice stays.
_UNSET_KINDS = {"", "no_inferred_type", "genai_development_inferred", "custom_model_development_inferred"}


def split_digest(split_dir: str | Path) -> str:
    """Content hash of a split saved by ``datasets`` (``prepare``'s ``artifacts/data/<task>/<split>/``):
    sha256 over the bytes of its ``*.arrow`` files in name order, first 16 hex digits. Same rows,
    same digest, whichever machine or worktree produced them."""
    h = hashlib.sha256()
    for f in sorted(Path(split_dir).glob("*.arrow")):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _metadata_dataset(name: str, digest: str, source: str, rows: int):
    """An MLflow dataset that carries metadata only (no copy of the data): MLflow's ``MetaDataset``
    with a local source and a profile ``{"num_rows": rows}`` (the row count the UI shows)."""
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.meta_dataset import MetaDataset

    class _SplitDataset(MetaDataset):
        @property
        def profile(self) -> dict[str, int]:
            return {"num_rows": rows}

        def to_dict(self) -> dict[str, str]:
            return super().to_dict() | {"profile": json.dumps(self.profile)}

    # "local" = MLflow's LocalArtifactDatasetSource (a path); built by type, not guessed from the string.
    return _SplitDataset(get_dataset_source_from_json(json.dumps({"uri": source}), "local"), name=name, digest=digest)


class Tracker:
    """A thin, outage-tolerant wrapper around one MLflow run."""

    def __init__(
        self,
        stage: str,
        experiment: str,
        params: dict[str, Any],
        tags: dict[str, Any] | None = None,
        run_name: str | None = None,
        system_metrics: bool = False,
        enabled: bool = True,
    ) -> None:
        """``enabled=False``: no MLflow run at all (every call a no-op; ranks other than 0 under torchrun)."""
        self.stage = stage
        self.run_id: str | None = None
        self.enabled = enabled
        self.uri = tracking_uri()
        self._mlflow = None
        self.models: dict[str, str] = {}  # logged model ids by role (adapter, merged)
        self.registered: dict[str, Any] | None = None  # {"name", "version"} of a Model Registry version
        self.parent_id: str | None = None
        self._exp_parent = False  # this stage found or made the dvc exp run's parent, so it closes it again
        all_tags = {"dvc.stage": os.environ.get("DVC_STAGE", stage), **git_info(), **{k: str(v) for k, v in (tags or {}).items()}}
        if os.environ.get("DVC_EXP_NAME"):
            all_tags["dvc.exp"] = os.environ["DVC_EXP_NAME"]
        self.tags = all_tags
        self._guard(self._start, experiment, params, run_name or all_tags["dvc.stage"], system_metrics)

    def _start(self, experiment: str, params: dict[str, Any], run_name: str, system_metrics: bool) -> None:
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(self.uri)
        exp = mlflow.set_experiment(experiment)
        if exp.tags.get(EXPERIMENT_KIND_TAG, "") in _UNSET_KINDS:  # new experiment, or one made before this tag
            mlflow.MlflowClient(self.uri).set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        # System metrics: MLflow samples in a daemon thread that stops when the run ends, when it
        # cannot read the run back (outage) or at exit; it never keeps the process alive.
        self.parent_id = os.environ.get(parent.PARENT_ENV) or None
        if self.parent_id is None and os.environ.get("DVC_EXP_NAME"):
            self.parent_id = parent.exp_parent(self.uri, experiment, os.environ["DVC_EXP_NAME"])
            self._exp_parent = self.parent_id is not None
        run = mlflow.start_run(run_name=run_name, tags=self.tags, log_system_metrics=system_metrics, parent_run_id=self.parent_id)
        self.run_id = run.info.run_id
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            mlflow.log_params(dict(items[i : i + 100]))

    def _guard(self, fn, *args, **kwargs) -> Any:
        """``fn(*args, **kwargs)``, or None once tracking is off; the first failure turns it off."""
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never kill a stage
            self.enabled = False
            warn(
                f"MLflow tracking at {self.uri} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); continuing without tracking. Results are still in the DVC outputs."
            )
            return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, model_id: str | None = None, dataset=None) -> None:
        """``model_id``: the logged model these metrics score (shown on its page); ``dataset``: the one
        they were computed on (:meth:`log_split`'s return)."""
        self._guard(
            lambda: self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, model_id=model_id, dataset=dataset)
        )

    def log_model(self, role: str, log: Callable[[], str]) -> str | None:
        """Run ``log`` (an MLflow ``log_model`` call in this run, returning the model id) guarded;
        the id is kept under ``role`` in :meth:`info`. None when untracked or on failure."""
        model_id = self._guard(log)
        if model_id is not None:
            self.models[role] = model_id
        return model_id

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._guard(lambda: self._mlflow.log_artifacts(str(local_dir), artifact_path))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._guard(lambda: self._mlflow.log_artifact(str(local_path), artifact_path))

    def log_dict(self, obj: dict, name: str) -> None:
        self._guard(lambda: self._mlflow.log_dict(obj, name))

    def log_table(self, columns: dict[str, list], name: str) -> None:
        """An MLflow table artifact (shown in the UI's artifact view / evaluation tab): column -> values."""
        self._guard(lambda: self._mlflow.log_table(data=columns, artifact_file=name))

    def log_dataset(self, name: str, digest: str, source: str | Path, rows: int, context: str):
        """Record a dataset the run read as an MLflow run input (metadata only, the data is not copied).
        ``context``: ``training``, ``validation``, ``evaluation``, ``test``. Returns the dataset (None untracked)."""

        def log():
            ds = _metadata_dataset(name, digest, str(source), int(rows))
            self._mlflow.log_input(ds, context=context)
            return ds

        return self._guard(log)

    def log_split(self, data_dir: str | Path, task: str, split: str, rows: int, context: str, first: int | None = None):
        """:meth:`log_dataset` for ``<data_dir>/<task>/<split>`` (a split saved by ``prepare``): name
        ``<task>/<split>``, digest :func:`split_digest`, source the split's folder. ``first``: only the
        first ``first`` rows were read (name ``<task>/<split>[:first]``, digest of digest + count)."""
        if not self.enabled:
            return None
        folder = Path(data_dir) / task / split
        digest, name = split_digest(folder), f"{task}/{split}"
        if first is not None:
            digest, name = hashlib.sha256(f"{digest}[:{first}]".encode()).hexdigest()[:16], f"{name}[:{first}]"
        try:
            source = folder.resolve().relative_to(repo_root()).as_posix()
        except ValueError:
            source = folder.resolve().as_posix()
        return self.log_dataset(name, digest, source, rows, context)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._guard(lambda: self._mlflow.set_tags({k: str(v) for k, v in tags.items()}))

    def end(self, status: str = "FINISHED") -> None:
        self._guard(lambda: self._mlflow.end_run(status=status))
        if self.run_id is not None and not self.enabled:  # end_run failed before stopping the sampler
            self._stop_system_metrics()
        if self._exp_parent and self.enabled:
            self._exp_parent = False  # once
            parent.close_parent(
                self.uri, self.parent_id, "FAILED" if status == "FAILED" else "FINISHED", repo_root(), repo_root() / "params.yaml"
            )

    def _stop_system_metrics(self) -> None:
        """Signal MLflow's system-metrics thread of this run to stop, without joining it (it would
        otherwise notice the outage only at its next sample). Best effort: MLflow-internal registry."""
        try:
            from mlflow.tracking import fluent

            monitor = fluent.run_id_to_system_metrics_monitor.pop(self.run_id, None)
            if monitor is not None:
                monitor._shutdown_event.set()
        except Exception:  # noqa: BLE001
            pass

    def info(self) -> dict[str, Any]:
        out = {
            "run_id": self.run_id,
            "parent_run_id": self.parent_id,
            "tracking_uri": self.uri,
            "tracked": self.enabled and self.run_id is not None,
            "tags": self.tags,
        }
        if self.models:
            out["models"] = dict(self.models)
        if self.registered:
            out["registered_model"] = dict(self.registered)
        return out

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type else "FINISHED")
