"""One module per record format, each behind the small :class:`~pipeline.data.formats.base.Format` interface.

A format turns validated records into model inputs and scores a model on them:

* ``normalise(record, opts, where)``: the user's record (any column names, via ``opts["columns"]``)
  -> the format's canonical record, or :class:`pipeline.data.readers.DataError` naming ``where`` and the column;
* ``render(rows, tokenizer, opts, max_length)``: canonical records -> prepared columns
  (``input_ids``, ``attention_mask``, ``labels`` + what evaluation needs) and stats (truncation);
* ``score(model, tokenizer, ds, opts, metrics, batch_size, max_new_tokens)``: (metrics, predictions);
* ``collator(tokenizer)``: training and loss batches (right-padded causal batches by default; classification and
  regression pad dynamically with their own :class:`~pipeline.data.formats.classification.Collator`);
* ``kind``: the model head (``classification`` | ``regression`` | ``generation``).

Adding a format = one new module here, registered in :data:`FORMATS` below (the one list of formats: the params schema takes its names, head kinds and help from it). ``opts`` is a plain dict (the fields of ``pipeline.config.schema.DatasetConfig``; the built-in tasks ship theirs in pipeline/data/builtin.py).
"""

from __future__ import annotations

from pipeline.data.formats import alpaca, chat, classification, multiple_choice, prompt_completion, regression
from pipeline.data.formats.base import Format

FORMATS: dict[str, Format] = {
    m.FORMAT.name: m.FORMAT for m in (classification, regression, alpaca, prompt_completion, chat, multiple_choice)
}
NAMES = tuple(FORMATS)


def get(name: str) -> Format:
    if name not in FORMATS:
        raise KeyError(f"unknown format {name!r}; known: {list(NAMES)}")
    return FORMATS[name]
