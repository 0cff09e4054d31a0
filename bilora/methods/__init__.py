"""Training methods, one file each, selected by name from a registry (``bilora.methods.build``).

The built-in methods are imported here (registration side effect). A new method needs no edit
here: it registers itself (``@register("key", config=...)``) when its module is imported, and
``train.plugins`` in ``params.yaml`` names the modules to import (docs/extending.md).
"""

from bilora.methods import bilevel_lora, bilora, eflat_lora, flat_lora, lora, lora_sam  # noqa: F401  (registration side effect)
from bilora.methods.method import Method, NonFiniteError, StepContext, available, build, config_class, register, registry

__all__ = ["Method", "NonFiniteError", "StepContext", "available", "build", "config_class", "register", "registry"]
