"""LoRA (Hu et al., 2021): the reference baseline. One forward+backward per micro-batch, AdamW descent.

``train.lora`` in ``params.yaml`` (:class:`LoraConfig`) serves two roles at once: it is the
*primary adapter* that every method trains (rank, alpha, dropout, target modules; Bi-LoRA's
auxiliary, bi-level's Λ and the perturbations of the SAM-style methods all come on top of it), and
it is the whole configuration of the ``lora`` *method*, which adds nothing to the primary adapter.
So the ``lora`` method registers without settings of its own (:class:`NoSettings`): its method
config is empty, and there is no second ``train.lora`` section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from bilora.methods.method import Method, register
from bilora.settings import Settings, setting


@dataclass(frozen=True)
class LoraConfig(Settings):
    """Primary adapter, used by every method (``train.lora``)."""

    section: ClassVar[str] = "train.lora"
    r: int = setting(8, "Rank of the primary adapter (every method).", ge=1)
    alpha: float = setting(16.0, "LoRA alpha; scaling s = alpha / r.", gt=0)
    dropout: float = setting(0.0, "Dropout on the adapter input.", ge=0, lt=1)
    target_modules: tuple[str, ...] = setting(
        ("query", "key", "value", "dense"), "Module name suffixes that get adapters (MiniLM: query, key, value, dense).", min_len=1
    )


@register("lora")
class LoRA(Method):
    """Plain LoRA. The primary adapter is the only trainable part besides the task head."""
