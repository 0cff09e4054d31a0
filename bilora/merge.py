"""Merge a primary LoRA adapter into a 16/32-bit copy of the base (never requantize silently).

Modes (docs/methods.md, "Merge"):
  * ``nf4_roundtrip``: add the delta to dequant(quant(W)), the weights the adapter was trained on.
  * ``original``: add the delta to the original weights as stored (fp32 for MiniLM, bf16 for most LLMs).
  * ``none``: skip merging (serve the 4-bit base + adapter).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from bilora.adapters import AUX, PRIMARY
from bilora.layers import dequantize_param, fp32_kernel


@torch.no_grad()
def dequantize(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A plain (unquantized) copy of ``model`` whose 4-bit layers hold dequant(quant(W)), cast to ``dtype``.

    Built as a fresh model of the same class from the config without ``quantization_config``,
    filled by a strict ``load_state_dict``: every bitsandbytes ``Params4bit`` is replaced by
    ``dequantize_4bit(weight, quant_state)`` (unpacked first if bitsandbytes packed it for its CPU kernel); everything else is copied as is. (transformers'
    ``model.dequantize()`` keeps quantizer hooks that ``save_pretrained`` then refuses.)
    """
    import copy

    state: dict[str, torch.Tensor] = {}
    # remove_duplicate=False: tied weights (SmolLM2's lm_head IS embed_tokens) appear under both names,
    # as in the fresh model's state_dict.
    for name, param in model.named_parameters(remove_duplicate=False):
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None:
            state[name] = dequantize_param(param, quant_state).to(torch.float32)  # (out, in)
        else:
            state[name] = param.detach().to(torch.float32)
    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    fresh = type(model)(config)
    expected = fresh.state_dict().keys()
    for name, buf in model.named_buffers():
        if name in expected:  # persistent buffers only
            state[name] = buf
    fresh.load_state_dict(state, strict=True)
    return fresh.to(dtype).eval()


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


class MergeCheckError(RuntimeError):
    """The merged model does not compute what the adapter on the 4-bit base computes."""


@torch.no_grad()
def agreement_drift(adapted: torch.nn.Module, merged: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Relative logit drift of ``merged`` against ``adapted`` (the adapter on the 4-bit base) on ``batch``.

    The adapted model runs on the dequantize (fp32 path) kernel for the comparison, since the
    merged model computes in fp32: like is compared with like.
    """
    with fp32_kernel(adapted):
        ref = adapted(**batch).logits  # (B, ..., n_out)
        got = merged(**batch).logits
    return relative_logit_drift(ref, got)


def check_agreement(mode: str, drift: float, tolerance: float) -> str | None:
    """Enforce the agreement check: raises :class:`MergeCheckError` when an ``nf4_roundtrip`` merge
    drifts past ``tolerance``; returns a warning for an ``original`` merge past it (expected: the
    adapter was trained on dequant(quant(W))); else None."""
    if drift <= tolerance:
        return None
    if mode == "nf4_roundtrip":
        raise MergeCheckError(
            f"merged model disagrees with the adapter on the 4-bit base: relative logit drift {drift:.3e} > merge.tolerance {tolerance:g}"
        )
    if mode == "original":
        return f"mode=original: drift {drift:.3e} exceeds {tolerance:g}; expected, the adapter was trained on dequant(quant(W)) (use nf4_roundtrip to match training)"
    return None


@torch.no_grad()
def reload_max_abs_diff(
    model_class: type, folder: str | Path, merged: torch.nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype
) -> float:
    """Reload the saved merged model with plain transformers (``model_class.from_pretrained``) and
    return max |logits(reloaded) - logits(merged in dtype)| on ``batch``: proof that it loads as saved."""
    reloaded = model_class.from_pretrained(folder, dtype=dtype).eval()
    return float((reloaded(**batch).logits.float() - merged.to(dtype)(**batch).logits.float()).abs().max())
