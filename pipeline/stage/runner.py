"""The stage runner: what every ``stages/*.py`` shares, so a stage reads setup -> call the library -> write.

:class:`Stage` parses the common arguments (``--params``, plus ``--task/--method/--seed`` for the
per-run stages), loads params.yaml (not for finetune, which trains from its run file and reads only
``tracking`` from params.yaml: where to log), prints the header, opens the stage's MLflow run
(:class:`pipeline.tracking.tracker.Tracker`, disabled on ranks other than 0) and writes an output folder
atomically with its ``run_info.json``.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from bilora.io import atomic_dir, atomic_write_json
from pipeline.stage import layout
from pipeline.tracking.experiment import flatten
from pipeline.config.load import load_params, load_tracking
from pipeline.terminal.console import header
from pipeline.tracking.tracker import Tracker


class Stage:
    """One execution of a DVC stage. ``per_run``: the stage takes ``--task --method --seed`` (one run of the matrix);
    ``params=False``: params.yaml is not loaded (``self.params`` is None), only its ``tracking`` section is read."""

    def __init__(
        self, name: str, description: str | None, argv: list[str] | None = None, per_run: bool = False, params: bool = True
    ) -> None:
        ap = argparse.ArgumentParser(description=description)
        if per_run:
            ap.add_argument("--task", required=True)
            ap.add_argument("--method", required=True)
            ap.add_argument("--seed", type=int, required=True)
        ap.add_argument("--params", default="params.yaml")
        self.name = name
        self.args = ap.parse_args(argv)
        self.params: Any = load_params(self.args.params) if params else None
        self.tracking = self.params.tracking if params else load_tracking(self.args.params)
        self.tracker: Tracker | None = None

    @property
    def run(self) -> str:
        """``<task>-<method>-<seed>`` of a per-run stage (DVC's matrix instance name)."""
        return layout.run_name(self.args.task, self.args.method, self.args.seed)

    @property
    def run_tags(self) -> dict[str, Any]:
        return {"task": self.args.task, "method": self.args.method, "seed": self.args.seed}

    def header(self, detail: str = "") -> None:
        header(self.name, detail)

    def track(
        self,
        params: dict[str, Any],
        tags: dict[str, Any] | None = None,
        run_name: str | None = None,
        system_metrics: bool = False,
        enabled: bool = True,
    ) -> Tracker:
        """The stage's MLflow run (``params`` nested, flattened here); ``enabled=False`` on ranks other than 0."""
        self.tracker = Tracker(
            self.name,
            self.tracking.experiment,
            flatten(params),
            tags=tags,
            run_name=run_name,
            system_metrics=system_metrics,
            enabled=enabled,
        )
        return self.tracker

    @contextmanager
    def output(self, folder: Path, **run_info: Any) -> Iterator[Path]:
        """Write ``folder`` atomically (a temporary folder renamed into place on success), closing it
        with ``run_info.json``: the tracker's run info plus ``run_info``."""
        with atomic_dir(folder) as tmp:
            yield tmp
            if self.tracker is not None:
                atomic_write_json(tmp / "run_info.json", self.tracker.info() | run_info)
