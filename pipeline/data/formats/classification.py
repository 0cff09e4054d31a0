"""``classification``: one text or a text pair, and a label from a declared (or inferred) set.

Record roles: ``text``, optional ``text_pair``, ``label``. Canonical record:
``{"text_a": str, "text_b": str | None, "label": int}`` (the class index). Rendered exactly like the
built-in GLUE tasks: ``tokenizer(text_a, text_b, truncation=True, max_length)`` + ``labels``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.data.formats.base import Format
from pipeline.data.formats._text import col, text
from pipeline.data.records import column
from pipeline.data.readers import DataError

if TYPE_CHECKING:
    import torch


def label_index(labels: list[str] | dict[str, int]) -> dict[str, int]:
    key = tuple(labels.items()) if isinstance(labels, dict) else tuple(labels)
    found = _INDEX.get(key)
    if found is None:  # built once per label set, not once per record
        found = _INDEX[key] = (
            {str(k): int(v) for k, v in labels.items()} if isinstance(labels, dict) else {str(v): i for i, v in enumerate(labels)}
        )
    return found


_INDEX: dict[tuple, dict[str, int]] = {}


def raw_label(value: Any) -> str:
    """Label values compare as strings (CSV cells are strings): 1, 1.0 -> '1'; True -> 'true'."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


class Classification(Format):
    name = "classification"
    help = "text [+ text pair] + label"
    kind = "classification"
    peft_task_type = "SEQ_CLS"
    modules_to_save = ("classifier",)
    eval_splits = ("test", "validation", "train")
    attack_metric = True

    def default_metrics(self, opts):
        # binary F1 is of class index 1; beyond two classes the unweighted mean of per-class F1s (macro), as sklearn's average="macro"
        return ("accuracy", "f1") if len(set(label_index(opts["labels"]).values())) == 2 else ("accuracy", "f1_macro", "mcc")

    def normalise(self, record, opts, where):
        a = text(record, opts, "text", where)
        b = text(record, opts, "text_pair", where) if "text_pair" in (opts.get("columns") or {}) else None
        v = column(record, col(opts, "label"), where, "label", opts.get("name", "?"))
        idx = label_index(opts["labels"])
        key = raw_label(v)
        if v is None or key not in idx:
            raise DataError(
                f"{where}: column {col(opts, 'label')!r} (label) is {v!r}, not in the label set {list(idx)} (fix the record or data.datasets.{opts.get('name', '?')}.labels)"
            )
        return {"text_a": a, "text_b": b, "label": idx[key]}

    def render(self, rows, tokenizer, opts, max_length):
        a = [e["text_a"] for e in rows]
        b = [e["text_b"] for e in rows] if rows and rows[0].get("text_b") is not None else None
        if rows:
            enc = tokenizer(a, b, truncation=True, max_length=max_length)
            cols = {k: enc[k] for k in enc.keys()}
        else:  # an empty split (val_fraction 0): the same columns, no rows
            cols = {k: [] for k in tokenizer("x", "x" if opts.get("columns", {}).get("text_pair") else None).keys()}
        cols["labels"] = [self.cast(e["label"]) for e in rows]
        return cols, {"truncated": sum(len(x) >= max_length for x in cols["input_ids"])}

    def cast(self, label):
        return int(label)

    def score(self, model, tokenizer, ds, opts, metrics, batch_size, max_new_tokens):
        from bilora.evaluate import predict
        from bilora.metrics import compute
        from pipeline.terminal.console import progress

        with progress("eval", len(ds)) as advance:
            preds, labels, _ = predict(model, ds, self.collator(tokenizer), batch_size, on_batch=lambda d, t: advance(d, t))
        return compute(metrics, preds, labels) | {"n": len(ds)}, preds.tolist()

    def collator(self, tokenizer):
        return Collator(tokenizer)


class Collator:
    """Dynamic padding to the longest sequence of the batch: list[dict] -> dict of (B, L) tensors."""

    def __init__(self, tokenizer) -> None:
        from transformers import DataCollatorWithPadding

        self.inner = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return dict(self.inner(examples))


FORMAT = Classification()
