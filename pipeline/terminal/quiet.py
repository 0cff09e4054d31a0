"""Silence known third-party noise at the pipeline's entry points (the library ``bilora`` configures no logging).

:func:`quiet` runs from ``stages/__init__.py`` (so before any stage imports torch, peft or
bitsandbytes) and from ``pipeline.run`` / ``pipeline.validate``. It imports none of those
libraries. Each filter removes one known message or one narrow class of messages; everything
else those libraries log or warn stays visible:

* bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning, printed
  on import on CPUs with AVX512-BF16 when the optional ``kernels`` package is absent
  (bitsandbytes then uses its built-in CPU kernel);
* transformers' LOAD REPORT table when the only missing weights belong to a freshly initialised
  task head (``classifier``, ``pre_classifier``, ``score``); the finetune stage says so in one
  line. A report naming any other missing, unexpected or mismatched weight is still shown;
* Hugging Face progress bars (loading weights, writing shards, saving datasets: well under a
  second at our sizes); ``HF_HUB_DISABLE_PROGRESS_BARS=0`` and ``HF_DATASETS_DISABLE_PROGRESS_BARS=0``
  bring them back;
* MLflow's INFO lines from its sqlite store ("Creating initial MLflow database tables..."), its
  "Downloading artifacts" bar (a logged model copying its local files, well under a second;
  ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true`` brings it back) and, when it logs a transformers
  model, its warnings that a local model has no Hub model card or licence;
* FutureWarning / DeprecationWarning raised inside transformers, peft, accelerate or bitsandbytes
  (notes about their own internals, e.g. transformers' ``is_gradient_checkpointing`` rename
  hit by peft). Not applied when the user passes ``-W`` or ``PYTHONWARNINGS``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

#: Top-level modules of the task heads ``AutoModelFor*`` initialises when a base has none.
HEAD_MODULES = frozenset({"classifier", "pre_classifier", "score"})

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STATUSES = ("MISSING", "UNEXPECTED", "MISMATCH", "CONVERSION", "OWNED", "SKIPPED")
_NOISY_PACKAGES = r"(transformers|peft|accelerate|bitsandbytes)(\.|$)"


class _DropMessage(logging.Filter):
    """Drop records whose message starts with ``prefix``."""

    def __init__(self, prefix: str | tuple[str, ...]) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


class _DropBelow(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def report_rows(message: str) -> list[tuple[str, str]]:
    """(key, status) rows of a transformers LOAD REPORT table (``[]`` if none can be read)."""
    rows = []
    for line in _ANSI.sub("", message).splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) >= 2 and cells[1] in _STATUSES:
            rows.append((cells[0], cells[1]))
    return rows


def only_head_missing(message: str) -> bool:
    """True when a LOAD REPORT lists nothing but missing task-head weights."""
    rows = report_rows(message)
    return bool(rows) and all(status == "MISSING" and key.split(".", 1)[0] in HEAD_MODULES for key, status in rows)


class _HeadOnlyLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not ("LOAD REPORT" in msg and only_head_missing(msg))


def _add_once(logger: logging.Logger, flt: logging.Filter) -> None:
    if not any(type(f) is type(flt) for f in logger.filters):
        logger.addFilter(flt)


def quiet() -> None:
    """Install the filters above (idempotent; logger filters work whether or not the library is imported yet)."""
    _add_once(
        logging.getLogger("bitsandbytes.backends.cpu.ops"), _DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community")
    )
    _add_once(logging.getLogger("transformers.modeling_utils"), _HeadOnlyLoadReport())
    _add_once(logging.getLogger("mlflow.store.db.utils"), _DropBelow(logging.WARNING))
    _add_once(
        logging.getLogger("mlflow.system_metrics.system_metrics_monitor"), _DropBelow(logging.WARNING)
    )  # "Started/Stopping monitoring", "Skip logging GPU metrics"
    _add_once(
        logging.getLogger("mlflow.transformers"),
        _DropMessage(("The model card could not be retrieved", "Unable to find license information")),
    )
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by transformers and huggingface_hub at import
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if not sys.warnoptions:  # the user asked for specific warnings (-W / PYTHONWARNINGS): leave them alone
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=_NOISY_PACKAGES)
