"""What methods and measurements need from the frozen base layers, on every backend.

One module owns the backend questions (PEFT keeps them in ``tuners/lora/bnb.py``): is a layer
4-bit, what is its dense weight, which dtype does its matmul run in, and which bitsandbytes CPU
kernel runs it; and the small helpers every method and the sharpness code share on top of
those layers: temporary forwards (:func:`forwards_replaced`), seeded noise (:func:`stream_seed`,
:func:`layer_noise`), work dtypes and gradient norms. The list of one adapter's LoRA layers is
:func:`bilora.adapters.adapter_layers`. Methods and the sharpness code import from here, never from
each other.

**The 4-bit CPU kernel is chosen by the project, not by bitsandbytes.** bitsandbytes (0.50)
``Linear4bit`` sets ``support_avx512bf16_for_cpu`` from the CPU at construction; on a CPU with
AVX512-BF16 its first eval-mode, no-grad forward then converts the weight *in place* to a packed
layout for a bf16 inference kernel: outputs change by 1e-3 to 8e-3 relative, the quantization
constants are rounded to bf16 (a later unpack does not restore them bit for bit), and layers
narrower than one 32-row block crash. :func:`set_cpu_kernel` decides it per model:

* ``"fp32"`` (the default everywhere): the dequantize + matmul path in the layer's compute dtype
  on every CPU, so numbers do not depend on the CPU class;
* ``"packed_bf16"``: opt in to bitsandbytes' packed kernel for eval-mode inference, on CPUs with
  AVX512-BF16 only (training always uses the dequantize path; bitsandbytes unpacks in train mode).

Call it right after loading a 4-bit model, before any forward pass.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

CPU_KERNELS = ("fp32", "packed_bf16")
PACK_BLOCK_ROWS = 32  # bitsandbytes packs output rows in blocks of 32 (``block_n``)


class KernelError(ValueError):
    """The requested 4-bit CPU kernel cannot run here; the message says why and what to use."""


@functools.cache
def linear4bit_class() -> type | None:
    """``bitsandbytes.nn.Linear4bit``, or None where bitsandbytes is not installed (the GPU image)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit


def is_4bit(module: torch.nn.Module) -> bool:
    cls = linear4bit_class()
    return cls is not None and isinstance(module, cls)


def check_base(base: torch.nn.Module) -> None:
    """Methods that touch the base weight support plain ``nn.Linear`` and bitsandbytes ``Linear4bit``."""
    if is_4bit(base):
        return
    if type(base).__module__.startswith("bitsandbytes"):
        raise NotImplementedError(f"unsupported quantized base layer {type(base).__name__} (nf4/fp4 Linear4bit and nn.Linear only)")
    if not isinstance(base, torch.nn.Linear):
        raise NotImplementedError(f"unsupported base layer {type(base).__name__} (nn.Linear and bitsandbytes Linear4bit only)")


def compute_dtype(base: torch.nn.Module, x_dtype: torch.dtype) -> torch.dtype:
    """The dtype the base matmul runs in: the weight's dtype, or the 4-bit layer's compute dtype."""
    if is_4bit(base):
        return base.compute_dtype if base.compute_dtype is not None else x_dtype
    return base.weight.dtype


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or ``dtype`` if wider (float64 stays float64): the dtype small updates are computed in."""
    return torch.promote_types(dtype, torch.float32)


def base_linear(base: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) as the base layer would run it: ONE matmul in its compute dtype,
    the output in x's dtype. The temporary forwards (Flat-LoRA's noise, sharpness perturbations)
    compute with a temporary ``weight`` (out, in) = dequant(W0) + delta through this."""
    cd = compute_dtype(base, x.dtype)
    out = F.linear(x.to(cd), weight.to(cd), None if bias is None else bias.to(cd))  # (..., in) -> (..., out)
    return out.to(x.dtype)


def is_packed(base: torch.nn.Module) -> bool:
    """True when bitsandbytes has converted this 4-bit layer's weight to its packed CPU layout."""
    qs = getattr(getattr(base, "weight", None), "quant_state", None)
    return bool(getattr(qs, "packing_format_for_cpu", False))


@torch.no_grad()
def dequantize_param(weight: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """dequant(W) (out, in) of a bitsandbytes 4-bit weight, a fresh tensor; nothing is mutated.

    A weight in the packed CPU layout (``packed_bf16`` kernel) is unpacked on copies of the
    tensor and its quantization state first (bitsandbytes' own inverse conversion).
    """
    import bitsandbytes.functional as bnbf

    data = weight.data if hasattr(weight, "data") else weight
    if getattr(quant_state, "packing_format_for_cpu", False):
        data, quant_state = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(quant_state))
    return bnbf.dequantize_4bit(data, quant_state)


@torch.no_grad()
def dequantized_weight(base: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W0 (out, in) as a dense tensor; for 4-bit bases a fresh dequantized copy (the stored weight is untouched)."""
    if is_4bit(base):
        weight = base.weight
        quant_state = getattr(weight, "quant_state", None) or getattr(base, "quant_state", None)
        if quant_state is None:
            raise RuntimeError("4-bit base layer has no quant_state (not quantized yet?)")
        return dequantize_param(weight, quant_state).to(dtype or base.compute_dtype or torch.float32)
    w = base.weight.detach()
    return w if dtype is None else w.to(dtype)


def cpu_has_avx512_bf16() -> bool:
    """What bitsandbytes' native library reports for this CPU (False without bitsandbytes)."""
    if linear4bit_class() is None:
        return False
    import bitsandbytes.functional as bnbf

    return bool(bnbf.has_avx512bf16())


def _packable(m: torch.nn.Module) -> bool:
    qs = getattr(m.weight, "quant_state", None)
    shape = getattr(qs, "shape", None) or (m.out_features, m.in_features)
    blocksize = getattr(qs, "blocksize", 64)
    return shape[0] % PACK_BLOCK_ROWS == 0 and shape[1] % blocksize == 0


def set_cpu_kernel(model: torch.nn.Module, kernel: str = "fp32") -> dict[str, Any]:
    """Pick the bitsandbytes CPU kernel of every ``Linear4bit`` in ``model``; return what is in use.

    ``fp32``: packing is switched off on every layer and any packed weight is converted back.
    ``packed_bf16``: packing is allowed on layers whose shape bitsandbytes can pack (rows a
    multiple of 32, columns of the block size); others keep the fp32 path. Raises
    :class:`KernelError` where the CPU lacks AVX512-BF16. Returns ``{"cpu_kernel", "packed_layers",
    "layers_4bit", "cpu_avx512_bf16"}``. (On CUDA the flag is ignored by bitsandbytes.)
    """
    if kernel not in CPU_KERNELS:
        raise KernelError(f"unknown 4-bit CPU kernel {kernel!r}; choose one of {CPU_KERNELS}")
    has_bf16 = cpu_has_avx512_bf16()
    if kernel == "packed_bf16" and not has_bf16:
        raise KernelError(
            "base.quant.cpu_kernel = packed_bf16 needs a CPU with AVX512-BF16 (`lscpu | grep -o avx512_bf16` prints nothing here); use fp32"
        )
    layers = [m for m in model.modules() if is_4bit(m)]
    packed = 0
    for m in layers:
        allow = kernel == "packed_bf16" and _packable(m)
        m.support_avx512bf16_for_cpu = allow
        packed += allow
        if not allow and is_packed(m):
            import bitsandbytes.functional as bnbf

            m.weight.data, m.weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(m.weight.data, m.weight.quant_state)
    return {"cpu_kernel": kernel, "packed_layers": packed, "layers_4bit": len(layers), "cpu_avx512_bf16": has_bf16}


@contextmanager
def fp32_kernel(model: torch.nn.Module) -> Iterator[None]:
    """Run the block on the dequantize (fp32 path) kernel, whatever :func:`set_cpu_kernel` chose.

    Packing is disallowed for the block; weights already packed are swapped for unpacked copies.
    On exit the layers' own flags, packed weights and quantization states are put back as they
    were (the same tensor objects), so the model is left bit-identical. Measurements that compare
    a perturbed forward (always on the dequantize path) with an unperturbed one use this.
    """
    saved = []
    for m in model.modules():
        if is_4bit(m):
            saved.append((m, m.support_avx512bf16_for_cpu, m.weight.data, m.weight.quant_state))
            m.support_avx512bf16_for_cpu = False
            if is_packed(m):
                import bitsandbytes.functional as bnbf

                m.weight.data, m.weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(
                    m.weight.data.clone(), copy.deepcopy(m.weight.quant_state)
                )
    try:
        yield
    finally:
        for m, flag, data, state in saved:
            m.support_avx512bf16_for_cpu = flag
            m.weight.data, m.weight.quant_state = data, state


def kernel_info(model: torch.nn.Module) -> dict[str, Any]:
    """What runs the 4-bit matmuls of ``model`` now: device, compute dtype(s), CPU kernel, packing."""
    layers = [m for m in model.modules() if is_4bit(m)]
    dtypes = sorted({str(m.compute_dtype).replace("torch.", "") for m in layers if m.compute_dtype is not None})
    allowed = sum(bool(getattr(m, "support_avx512bf16_for_cpu", False)) for m in layers)
    try:
        device = str(next(model.parameters()).device.type)
    except StopIteration:
        device = "cpu"
    return {
        "device": device,
        "layers_4bit": len(layers),
        "compute_dtype": ",".join(dtypes) or "none",
        "cpu_kernel": ("packed_bf16" if allowed else "fp32") if layers else "none",
        "packed_layers": allowed,
        "cpu_avx512_bf16": cpu_has_avx512_bf16(),
    }


@torch.no_grad()
def dense_copy(model: torch.nn.Module, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A deep copy of ``model`` with every ``Linear4bit`` replaced by an ``nn.Linear`` holding dequant(W)
    exactly, and every floating parameter and buffer cast to ``dtype``; ``model`` is not touched.

    dequant(W) is exact in float32 (nf4/fp4 code x absmax), so a float64 copy computes the same
    function as the 4-bit model with float64 rounding: loss differences of 1e-6 (sharpness at small
    radii) are then resolved instead of being float32 summation noise that depends on the CPU's
    vector width. The copy costs 8 bytes per parameter in float64.
    """
    memo: dict[int, Any] = {}
    for m in model.modules():
        if is_4bit(m):
            dense = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device, dtype=torch.float32)
            dense.weight.copy_(dequantized_weight(m, torch.float32))  # (out, in), exact
            if m.bias is not None:
                dense.bias.copy_(m.bias.detach())
            dense.requires_grad_(False)
            dense.train(m.training)
            memo[id(m)] = dense  # deepcopy substitutes it wherever the 4-bit layer is referenced
    return copy.deepcopy(model, memo).to(dtype)


def layer_noise(seed: int, std_rows: torch.Tensor, n_in: int) -> torch.Tensor:
    """eps (m, n_in) float32 with eps[i, :] ~ N(0, std_rows[i]^2), drawn from a private generator."""
    device = std_rows.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    eps = torch.randn((std_rows.shape[0], n_in), generator=gen, device=device, dtype=torch.float32)
    return eps.mul_(std_rows.to(torch.float32)[:, None])


@torch.no_grad()
def merged_row_norms(layer: torch.nn.Module, adapter: str) -> torch.Tensor:
    """||W'_row||_2 for W' = dequant(W0) + s·B@A of one PEFT LoRA layer, float32, shape (out,)."""
    base = layer.get_base_layer()
    w = dequantized_weight(base, torch.float32)
    a = layer.lora_A[adapter].weight.detach().to(torch.float32)  # (r, n)
    b = layer.lora_B[adapter].weight.detach().to(torch.float32)  # (m, r)
    merged = torch.addmm(w.to(a.device), b, a, alpha=float(layer.scaling[adapter]))  # (m, n) = W0 + s·(m, r)@(r, n); new tensor
    return merged.norm(dim=1)


def stream_seed(*key: object) -> int:
    """A 63-bit generator seed that is a pure function of ``key`` (e.g. ("flat_lora", run seed, step, layer)).

    blake2b of the parts joined by ``:``; the first part names the random stream, so streams of
    different users never share a seed.
    """
    digest = hashlib.blake2b(":".join(str(k) for k in key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextmanager
def forwards_replaced(pairs: Iterable[tuple[torch.nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Give each module a temporary instance ``forward`` and restore the previous state on exit (also on error).

    An instance attribute shadows the class forward. Under an accelerate hook (device_map offload)
    ``forward`` is already the hook's wrapper, which calls ``_old_forward``: that is replaced instead.
    """
    installed: list[tuple[torch.nn.Module, str, Any]] = []  # (module, attribute, previous instance value)
    try:
        for module, fwd in pairs:
            attr = "_old_forward" if "_old_forward" in vars(module) else "forward"
            installed.append((module, attr, vars(module).get(attr)))
            setattr(module, attr, fwd)
        yield
    finally:
        for module, attr, previous in reversed(installed):
            if previous is None:
                delattr(module, attr)
            else:
                setattr(module, attr, previous)


def _grads(params: Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad.detach() if p.grad.dtype == torch.float32 else p.grad.detach().float() for p in params if p.grad is not None]


def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params`` in float32: the norm of the per-tensor norms
    (torch's fused ``get_total_norm``, what ``clip_grad_norm_`` computes); 0 without gradients."""
    grads = _grads(params)
    if not grads:
        return torch.tensor(0.0)
    return torch.nn.utils.get_total_norm(grads, 2.0)


def grad_norm_sumsq(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """sqrt(Σ_p ||grad_p||_F²) in float32, summed tensor by tensor.

    The same quantity as :func:`grad_norm`, rounded differently (it differs in the last bits on
    about half of random inputs). LoRA-SAM's ascent uses it, so its trained adapters stay
    bit-identical to the committed runs.
    """
    total = torch.zeros((), dtype=torch.float32)
    for g in _grads(params):
        total = total + g.pow(2).sum()
    return total.sqrt()
