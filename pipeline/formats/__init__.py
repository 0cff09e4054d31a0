"""One module per record format, each behind the small :class:`Format` interface.

A format turns validated records into model inputs and scores a model on them:

* ``normalise(record, opts, where)``: the user's record (any column names, via ``opts["columns"]``)
  -> the format's canonical record, or :class:`pipeline.tasks.DataError` naming ``where`` and the column;
* ``render(rows, tokenizer, opts, max_length)``: canonical records -> prepared columns
  (``input_ids``, ``attention_mask``, ``labels`` + what evaluation needs) and stats (truncation);
* ``score(model, tokenizer, ds, opts, metrics, batch_size, max_new_tokens)``: (metrics, predictions);
* ``kind``: the model head (``classification`` | ``regression`` | ``generation``).

Adding a format = one new module here, registered in :data:`FORMATS`. ``opts`` is a plain dict
(the fields of ``pipeline.config.DatasetConfig``; the built-in tasks ship theirs in pipeline/tasks.py).
"""

from __future__ import annotations

import importlib
from typing import Any

NAMES = ("classification", "regression", "alpaca", "prompt_completion", "chat", "multiple_choice")


class Format:
    name: str = ""
    kind: str = "generation"  # model head: classification | regression | generation (bilora.base.load_for_task)
    peft_task_type: str = "CAUSAL_LM"  # PEFT task type of the adapter
    modules_to_save: tuple[str, ...] = ()  # trained in full next to the adapter (a fresh task head)
    eval_splits: tuple[str, ...] = ("test", "train")  # generation is costly: validation is not scored
    attack_metric: bool = False  # sharpness attack also scored by the task metric (else by the loss alone)

    def default_metrics(self, opts: dict[str, Any]) -> tuple[str, ...]:
        raise NotImplementedError

    def normalise(self, record: dict, opts: dict[str, Any], where: str) -> dict:
        raise NotImplementedError

    def render(self, rows: list[dict], tokenizer, opts: dict[str, Any], max_length: int) -> tuple[dict[str, list], dict[str, Any]]:
        raise NotImplementedError

    def score(
        self, model, tokenizer, ds, opts: dict[str, Any], metrics: tuple[str, ...], batch_size: int, max_new_tokens: int
    ) -> tuple[dict, list]:
        raise NotImplementedError

    def collator(self, tokenizer):
        from bilora.causal import CausalCollator, pad_id

        return CausalCollator(pad_id(tokenizer))


def get(name: str) -> Format:
    if name not in NAMES:
        raise KeyError(f"unknown format {name!r}; known: {list(NAMES)}")
    return importlib.import_module(f"pipeline.formats.{name}").FORMAT
