"""LoRA adapters on PEFT: the primary adapter, the Bi-LoRA auxiliary, and their lifecycle.

bilora reuses PEFT's layers (including ``peft.tuners.lora.bnb.Linear4bit`` on nf4 bases),
its injection by ``target_modules`` and its save format. Only optimisation logic lives here.

Naming: the primary adapter is PEFT's ``"default"``; the Bi-LoRA auxiliary is ``"bilora_aux"``.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from bilora.config import LoraSpec

PRIMARY = "default"
AUX = "bilora_aux"


def attach_lora(model: torch.nn.Module, spec: LoraSpec, task_type: str | None) -> PeftModel:
    """Wrap ``model`` with the primary LoRA adapter (A Kaiming-uniform, B = 0)."""
    cfg = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        modules_to_save=list(spec.modules_to_save) or None,
        task_type=task_type,
    )
    return get_peft_model(model, cfg)


def add_auxiliary(model: PeftModel, r: int, alpha: float, name: str = AUX) -> None:
    """Add a second LoRA on the primary's target modules and make both active and trainable.

    Uses the generic ``PeftModel.add_adapter`` so that a task head in ``modules_to_save``
    stays owned by the primary adapter only (docs/methods.md, "Bi-LoRA"). Build the optimizer
    *after* this call: PEFT leaves a freshly added adapter frozen until it is activated.
    """
    primary = model.peft_config[PRIMARY]
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=primary.target_modules,
    )
    PeftModel.add_adapter(model, name, cfg)
    activate(model, [PRIMARY, name])


def activate(model: PeftModel, names: list[str]) -> None:
    """Activate several adapters at once (PEFT's ``set_adapter`` on the tuner also sets requires_grad)."""
    model.base_model.set_adapter(names)


def lora_layers(model: torch.nn.Module) -> list[tuple[str, LoraLayer]]:
    """All LoRA-carrying layers in a fixed (module-registration) order, on any backend."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def adapter_layers(model: torch.nn.Module, adapter: str = PRIMARY) -> list[tuple[str, LoraLayer]]:
    """(module name, LoRA layer) for every layer that carries ``adapter``, in :func:`lora_layers` order.

    This order defines the layer index of Flat-LoRA's noise seeds and of the sharpness spaces.
    """
    return [(n, m) for n, m in lora_layers(model) if adapter in m.lora_A]


def lora_factors(model: torch.nn.Module, adapter: str) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, s) per adapted layer for ``adapter``; A: (r, n_in), B: (n_out, r)."""
    return [
        (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, float(layer.scaling[adapter]))
        for _, layer in adapter_layers(model, adapter)
    ]


def adapter_parameters(model: torch.nn.Module, adapter: str) -> list[torch.nn.Parameter]:
    """LoRA A/B parameters of one adapter, in layer order (A then B per layer)."""
    params: list[torch.nn.Parameter] = []
    for a, b, _ in lora_factors(model, adapter):
        params += [a, b]
    return params


def trainable_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def primary_parameters(model: torch.nn.Module, aux: str = AUX) -> list[torch.nn.Parameter]:
    """Everything trainable that is not the auxiliary: primary A/B plus any trainable head."""
    return [p for n, p in trainable_named_parameters(model) if f".{aux}." not in n]


@contextmanager
def primary_only(model: PeftModel, aux: str = AUX) -> Iterator[PeftModel]:
    """Disable the auxiliary adapter (if any) for evaluation, generation or export."""
    active = list(model.base_model.active_adapters)
    has_aux = aux in active
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    if has_aux:
        activate(model, [a for a in active if a != aux])
    try:
        yield model
    finally:
        if has_aux:
            activate(model, active)
            for n, p in model.named_parameters():
                p.requires_grad_(grads[n])


def save_primary(model: PeftModel, out_dir: str | Path) -> None:
    """Write the primary adapter only, in plain PEFT format (loadable by ``PeftModel.from_pretrained``)."""
    model.save_pretrained(str(out_dir), selected_adapters=[PRIMARY])
