"""LoRA (Hu et al., 2021): the reference baseline. One forward+backward per micro-batch, AdamW descent."""

from bilora.methods.method import Method, register


@register
class LoRA(Method):
    """Plain LoRA. The primary adapter is the only trainable part besides the task head."""

    name = "lora"
