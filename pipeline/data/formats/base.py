"""The :class:`Format` interface every record format implements (see :mod:`pipeline.data.formats`)."""

from __future__ import annotations

from typing import Any


class Format:
    name: str = ""
    help: str = ""  # the records it reads, in a few words (the params schema's help of data.datasets.<name>.format)
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
