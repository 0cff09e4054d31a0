"""What a task is: :class:`TaskSpec` (a built-in entry of :mod:`pipeline.data.builtin` or a declared
``data.datasets`` entry, built by :mod:`pipeline.data.catalog`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


SPLITS = ("train", "test")


@dataclass(frozen=True)
class TaskSpec:
    name: str  # key used in params.yaml
    kind: str  # "classification" | "regression" | "generation"
    num_labels: int  # 1 for regression, 0 for generation
    metrics: tuple[str, ...]  # names understood by bilora.metrics.compute
    main_metric: str
    train_file: str  # relative to the raw data directory
    test_file: str  # GLUE: dev.tsv (test labels are not public)
    licence_file: str  # README holding the licence note
    _reader: Callable[[Path], list[dict]] = field(repr=False, compare=False, default=None)  # type: ignore[assignment]
    format: str = "classification"  # pipeline/data/formats/<format>.py renders and scores the records
    options: dict = field(default_factory=dict, compare=False)  # the format's options (DatasetConfig fields)
    declared: bool = False  # a data.datasets entry (read by pipeline.data.catalog), not a shipped reader
    adapter_from: str | None = None  # eval-only (no train split): evaluated with this task's adapters

    def path(self, raw_dir: str | Path, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} for task {self.name!r}; expected one of {list(SPLITS)}")
        return Path(raw_dir) / (self.train_file if split == "train" else self.test_file)

    def read(self, raw_dir: str | Path, split: str) -> list[dict]:
        """Read and validate one split; raises DataError for any problem with the file."""
        if self._reader is None:
            raise TypeError(f"task {self.name!r} was built without a reader")
        return self._reader(self.path(raw_dir, split))
