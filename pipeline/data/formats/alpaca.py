"""``alpaca``: roles ``instruction``, optional ``input``, ``output`` (Stanford Alpaca records).

Default prompt: the Stanford Alpaca template (with or without the input block); a declared
``prompt_template`` may use ``{instruction}`` and ``{input}``. Target: ``output`` then EOS.
"""

from __future__ import annotations

from pipeline.data.formats._generation import Generation
from pipeline.data.formats._text import fill, text

WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class Alpaca(Generation):
    name = "alpaca"
    help = "instruction, optional input, output"

    def normalise(self, record, opts, where):
        return {
            "instruction": text(record, opts, "instruction", where),
            "input": text(record, opts, "input", where, required=False, allow_empty=True) or "",
            "output": text(record, opts, "output", where),
        }

    def pair(self, row, opts):
        tpl = opts.get("prompt_template") or (WITH_INPUT if row["input"].strip() else NO_INPUT)
        return fill(tpl, {"instruction": row["instruction"], "input": row["input"]}), fill(
            opts.get("completion_template") or "{completion}", {"completion": row["output"]}
        )


FORMAT = Alpaca()
