"""Merge a primary LoRA adapter into a 16/32-bit copy of the base (never requantize silently).

Modes (decisions.md):
  * ``nf4_roundtrip``: add the delta to dequant(quant(W)), the weights the adapter was trained on.
  * ``original``: add the delta to the original weights as stored (fp32 for MiniLM, bf16 for most LLMs).
  * ``none``: skip merging (serve the 4-bit base + adapter).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from bilora.adapters import AUX, PRIMARY


def dequantize(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """4-bit bitsandbytes layers -> plain ``nn.Linear`` holding dequant(quant(W)), cast to ``dtype``."""
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_loaded_in_4bit", False):
        model = model.dequantize()
    model.config.quantization_config = None
    if hasattr(model.config, "_pre_quantization_dtype"):
        del model.config._pre_quantization_dtype
    for attr in ("is_loaded_in_4bit", "is_quantized"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass
    model.hf_quantizer = None
    return model.to(dtype)


def merge(base: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """Attach the exported (primary-only) adapter and fold it into the weights."""
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    if AUX in peft_model.peft_config:
        raise ValueError(f"{adapter_dir}: holds the Bi-LoRA auxiliary adapter; only the primary may be merged")
    return peft_model.merge_and_unload(adapter_names=[PRIMARY])


@torch.no_grad()
def relative_logit_drift(reference: torch.Tensor, other: torch.Tensor) -> float:
    """||other - reference||_F / ||reference||_F over a batch of logits."""
    ref = reference.double()
    return float((other.double() - ref).norm() / ref.norm().clamp_min(1e-12))
