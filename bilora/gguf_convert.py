"""Turn a GGUF causal-LM checkpoint into a plain Hugging Face folder (safetensors + tokenizer), once."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from bilora.errors import BaseModelError
from bilora.io import atomic_dir

GGUF_INFO = "bilora_gguf.json"  # written last into a materialised folder: its presence marks it complete


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def materialise_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str = "bfloat16", sha256: str | None = None) -> Path:
    """Write a GGUF causal LM as a plain Hugging Face folder (safetensors + tokenizer) at ``out_dir``.

    Transformers dequantizes the GGUF tensors to fp32 on load, but such a model refuses
    ``save_pretrained``; so a plain model of the same class is built from its config without
    ``quantization_config``, the weights are copied in (strict), cast to ``dtype`` (``"bfloat16"``,
    ``"float32"`` or ``"float16"``) and saved. The folder appears atomically; ``bilora_gguf.json``
    records the source file, its sha256 and the GGUF metadata. The weights went through the GGUF
    quantization, so they are not bit-identical to the model's original release.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise BaseModelError(f"GGUF file {str(gguf_path)!r} does not exist")
    try:
        import gguf
    except ImportError:
        raise BaseModelError("loading a GGUF checkpoint needs the 'gguf' package (pip install gguf)") from None
    import torch  # here, not at the top: bilora.sources (base.source resolution, torch-free) imports this module
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict["architectures"] = [type(src).__name__]
    cfg = type(src.config).from_dict(cfg_dict)
    plain = type(src)(cfg)
    plain.load_state_dict(src.state_dict(), strict=True)
    plain = plain.to(getattr(torch, dtype)).eval()
    if getattr(src, "generation_config", None) is not None:
        plain.generation_config = src.generation_config
    reader = gguf.GGUFReader(str(gguf_path))
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1

    def field_value(key: str) -> Any:
        f = reader.fields.get(key)
        try:
            return f.contents() if f is not None else None
        except Exception:  # noqa: BLE001 - metadata is informative only
            return None

    info = {
        "gguf": str(gguf_path),
        "gguf_sha256": sha256 or sha256_file(gguf_path),
        "gguf_bytes": gguf_path.stat().st_size,
        "gguf_name": field_value("general.name"),
        "gguf_architecture": field_value("general.architecture"),
        "gguf_tensor_types": types,
        "architecture": type(src).__name__,
        "n_params": sum(p.numel() for p in plain.parameters()),
        "dtype": dtype,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    del src
    with atomic_dir(out_dir) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / GGUF_INFO).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    return Path(out_dir)
