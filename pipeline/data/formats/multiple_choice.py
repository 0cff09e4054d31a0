"""``multiple_choice``: roles ``prompt`` and ``answer``; a fixed list ``choices`` of answer strings.

The answer column holds one of the choices (or its 0-based index; LLM-Adapters sets: ``answer1`` ...).
Training target: ``choice_prefix`` (default ' ') + the answer, then EOS. Evaluation: the choice whose
tokens have the highest summed log-probability after the prompt; metric ``accuracy``.
BoolQ ships as one of these.
"""

from __future__ import annotations

from bilora import metrics as M
from pipeline.data.formats._generation import Generation
from pipeline.data.formats._text import col, fill, text
from pipeline.data.records import column
from pipeline.data.readers import DataError


class MultipleChoice(Generation):
    name = "multiple_choice"
    help = "prompt + fixed answer strings, scored by log-likelihood"

    def default_metrics(self, opts):
        return ("accuracy",)

    def normalise(self, record, opts, where):
        prompt = text(record, opts, "prompt", where)
        v = column(record, col(opts, "answer"), where, "answer", opts.get("name", "?"))
        choices = list(opts["choices"])
        key = str(v).strip()
        if key in choices:
            idx = choices.index(key)
        elif isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(choices):
            idx = v
        else:
            raise DataError(f"{where}: column {col(opts, 'answer')!r} (answer) is {v!r}, not one of the choices {choices}")
        return {"prompt": prompt, "answer": idx}

    def pair(self, row, opts):
        prefix = opts.get("choice_prefix", " ")
        return fill(opts.get("prompt_template") or "{prompt}", {"prompt": row["prompt"]}), prefix + opts["choices"][row["answer"]]

    def render(self, rows, tokenizer, opts, max_length):
        cols, stats = super().render(rows, tokenizer, opts, max_length)
        cols["answer"] = [r["answer"] for r in rows]
        return cols, stats

    def score(self, model, tokenizer, ds, opts, metrics, batch_size, max_new_tokens):
        from bilora import adapters
        from bilora.causal import loglik_choice

        prefix = opts.get("choice_prefix", " ")
        with adapters.primary_only(model):
            idx = loglik_choice(model, tokenizer, list(ds["prompt"]), [prefix + c for c in opts["choices"]], batch_size)
        preds = [opts["choices"][i] for i in idx]
        gold = [opts["choices"][i] for i in ds["answer"]]
        return {"accuracy": M.accuracy(preds, gold), "n": len(ds)}, preds


FORMAT = MultipleChoice()
