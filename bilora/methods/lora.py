"""LoRA (Hu et al., 2021): the reference baseline. One forward+backward per micro-batch, AdamW descent.

``train.lora`` in ``params.yaml`` (:class:`bilora.adapters.LoraSpec`) serves two roles at once: it is
the *primary adapter* that every method trains (rank, alpha, dropout, target modules; Bi-LoRA's
auxiliary, bi-level's Λ and the perturbations of the SAM-style methods all come on top of it), and
it is the whole configuration of the ``lora`` *method*, which adds nothing to the primary adapter.
So the ``lora`` method registers without settings of its own (``NoSettings``): its method config is
empty, and there is no second ``train.lora`` section.
"""

from __future__ import annotations

from bilora.methods.method import Method, register


@register("lora")
class LoRA(Method):
    """Plain LoRA. The primary adapter is the only trainable part besides the task head."""
