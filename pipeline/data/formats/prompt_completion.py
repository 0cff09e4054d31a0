"""``prompt_completion``: roles ``prompt`` and ``completion``.

Prompt = ``prompt_template`` (default ``{prompt}``) filled with the prompt; target =
``completion_template`` (default ``{completion}``) filled with the completion, then EOS.
The loss is on the target only unless ``train_on_prompt``. GSM8K ships as one of these.
"""

from __future__ import annotations

from pipeline.data.formats._generation import Generation
from pipeline.data.formats._text import fill, text


class PromptCompletion(Generation):
    name = "prompt_completion"
    help = "prompt + completion"

    def normalise(self, record, opts, where):
        return {"prompt": text(record, opts, "prompt", where), "completion": text(record, opts, "completion", where)}

    def pair(self, row, opts):
        comp = row["completion"].strip() if opts.get("strip_completion") else row["completion"]
        return fill(opts.get("prompt_template") or "{prompt}", {"prompt": row["prompt"]}), fill(
            opts.get("completion_template") or "{completion}", {"completion": comp}
        )


FORMAT = PromptCompletion()
