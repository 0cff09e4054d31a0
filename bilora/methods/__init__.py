"""Training methods, one file each, selected by name from a registry (``bilora.methods.build``)."""

from bilora.methods import bilevel_lora, bilora, eflat_lora, flat_lora, lora, lora_sam  # noqa: F401  (registration side effect)
from bilora.methods.method import Method, NonFiniteError, StepContext, available, build, register

__all__ = ["Method", "NonFiniteError", "StepContext", "available", "build", "register"]
