"""QLoRA at LLM scale: the switches that make a 7B-14B 4-bit run fit on one GPU, for every method.

* :func:`prepare_kbit`: what ``peft.prepare_model_for_kbit_training`` does, minus its upcast of
  the embeddings and ``lm_head`` (axolotl patches PEFT the same way to save memory): every
  normalisation layer's parameters in float32, input gradients enabled where reentrant
  checkpointing needs them, gradient checkpointing switched on (``use_reentrant`` explicit).
* :func:`autocast_dtype` / :func:`autocast`: bf16 autocast for the forward passes, on CUDA by
  default (``base.quant.compute_dtype: auto``) and on a CPU only when that param says
  ``bfloat16``. Only the forward is autocast (``StepContext.loss``): master weights stay fp32 and
  everything a method computes between passes (Bi-LoRA's ball projection, LoRA-SAM's
  perturbation, EFlat's estimate, gradient norms) runs outside it, in fp32.
* :func:`build_optimizer`: ``adamw`` (torch; ``fused=True`` when every parameter is on CUDA,
  the default foreach path on CPU so CPU numbers are unchanged) or bitsandbytes ``adamw_8bit``,
  ``paged_adamw_8bit``, ``paged_adamw_32bit``. bitsandbytes optimizers have no ``maximize``: a
  group with ``maximize=True`` (Bi-LoRA's ascending auxiliary) gets its gradients *negated* right
  before the bitsandbytes step, which is exactly what torch's ``maximize`` does inside Adam
  (g <- -g; with weight decay 0, as the auxiliary has, the updates are identical). On a CPU,
  bitsandbytes' paged optimizers fall back to unpaged ones (bitsandbytes warns "Paged
  optimizers are not supported on CPU"); their state then lives in ordinary CPU memory.
* :func:`length_grouped_order`: opt-in length-grouped batches (HF ``LengthGroupedSampler``'s
  scheme), a pure function of (permutation, lengths), so it stays seeded and resumable;
  :func:`padding_fraction` measures what it saves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
_BNB_CLASS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit", "paged_adamw_32bit": "PagedAdamW32bit"}
NEGATE = "negate_grad"  # group key: negate gradients before a bitsandbytes step (maximize emulation)


# -- k-bit preparation and gradient checkpointing ------------------------------------------------
def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


@torch.no_grad()
def prepare_kbit(model: torch.nn.Module, *, gradient_checkpointing: bool = False, use_reentrant: bool = False) -> dict[str, Any]:
    """Prepare a (4-bit) model for LoRA training in place; returns what was done.

    Half-precision norm parameters become float32 (a no-op on fp32-loaded models, the CPU default); embeddings
    and ``lm_head`` keep their dtype; no trainable flag changes (PEFT froze the base). With
    ``gradient_checkpointing`` each decoder layer is checkpointed (transformers' own mechanism,
    active in train mode only), and with ``use_reentrant`` the embedding output is made to
    require grad, which reentrant ``torch.utils.checkpoint`` needs to backpropagate into a block
    whose inputs would otherwise all be frozen.
    """
    inner = _inner(model)
    cast = 0
    for module in inner.modules():
        if _is_norm(module):
            for p in module.parameters(recurse=False):
                if p.dtype in (torch.float16, torch.bfloat16):  # half precision only (as PEFT): float64 stays
                    p.data = p.data.float()
                    cast += 1
    done = {
        "norms_cast_fp32": cast,
        "gradient_checkpointing": bool(gradient_checkpointing),
        "use_reentrant": bool(use_reentrant),
        "input_require_grads": False,
    }
    if gradient_checkpointing:
        if not getattr(inner, "supports_gradient_checkpointing", False):
            raise ValueError(f"train.loop.gradient_checkpointing: {type(inner).__name__} does not support gradient checkpointing")
        kw = {"use_reentrant": bool(use_reentrant)}
        if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.2x name; the old one warns
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        if use_reentrant:
            inner.enable_input_require_grads()
            done["input_require_grads"] = True
        if getattr(inner.config, "use_cache", False):
            inner.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing
    return done


def checkpointing_on(model: torch.nn.Module) -> bool:
    inner = _inner(model)
    name = "is_activation_checkpointing" if hasattr(type(inner), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(inner, name, False))


def disable_checkpointing(model: torch.nn.Module) -> None:
    inner = _inner(model)
    (getattr(inner, "activation_checkpointing_disable", None) or inner.gradient_checkpointing_disable)()


# -- compute dtype ------------------------------------------------------------------------------
def autocast_dtype(device_type: str, compute_dtype: str) -> torch.dtype | None:
    """The autocast dtype of the training forward, from ``base.quant.compute_dtype`` (no second switch).

    CUDA: bf16 for ``auto`` and ``bfloat16``; CPU: bf16 only for an explicit ``bfloat16``;
    ``float32`` (or ``float16``/anything else) means no autocast.
    """
    if compute_dtype == "bfloat16" or (compute_dtype == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return None


@contextlib.contextmanager
def autocast(device_type: str, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device_type, dtype=dtype):
        yield


def model_device_type(model: torch.nn.Module) -> str:
    try:
        return next(model.parameters()).device.type
    except StopIteration:
        return "cpu"


# -- optimizers ---------------------------------------------------------------------------------
def build_optimizer(
    groups: list[dict[str, Any]], name: str = "adamw", *, lr: float, min_8bit_size: int | None = None
) -> torch.optim.Optimizer:
    """The primary optimizer over the method's parameter groups (see the module docstring).

    ``min_8bit_size``: bitsandbytes keeps 32-bit state for tensors with fewer elements (its
    default 4096); tests lower it so that small LoRA factors really get uint8 state.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"train.loop.optimizer: unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    if name == "adamw":
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.is_cuda for p in params)
        return torch.optim.AdamW(groups, lr=lr, **({"fused": True} if fused else {}))
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
        raise ValueError(f"train.loop.optimizer = {name} needs bitsandbytes") from e
    converted = []
    for g in groups:
        g = dict(g)
        g[NEGATE] = bool(g.pop("maximize", False))
        converted.append(g)
    kwargs = {} if min_8bit_size is None else {"min_8bit_size": min_8bit_size}
    cls = _maximizing(getattr(bnb.optim, _BNB_CLASS[name]))
    return cls(converted, lr=lr, **kwargs)


_WRAPPED: dict[type, type] = {}


def _maximizing(cls: type) -> type:
    """``cls`` whose ``step`` first negates the gradients of groups marked ``negate_grad``."""
    if cls not in _WRAPPED:

        class Maximizing(cls):  # type: ignore[misc, valid-type]
            @torch.no_grad()
            def step(self, closure: Any = None) -> Any:
                for group in self.param_groups:
                    if group.get(NEGATE):
                        for p in group["params"]:
                            if p.grad is not None:
                                p.grad.neg_()  # ascend: Adam on -g (torch's maximize); the loop zeroes grads next
                return super().step(closure)

        Maximizing.__name__ = Maximizing.__qualname__ = cls.__name__
        _WRAPPED[cls] = Maximizing
    return _WRAPPED[cls]


def optimizer_info(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Which optimizer runs and whether it is really paged (bitsandbytes pages on CUDA only)."""
    paged = bool(getattr(opt, "is_paged", False))
    params = [p for g in opt.param_groups for p in g["params"]]
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    return {
        "class": f"{type(opt).__module__.split('.')[0]}.{type(opt).__name__}",
        "fused": bool(opt.defaults.get("fused", False)),
        "paged": paged and on_cuda,
        "paged_fallback": paged and not on_cuda,  # bitsandbytes: "Paged optimizers are not supported on CPU"
    }


# -- length-grouped batches ---------------------------------------------------------------------
def length_grouped_order(order: Sequence[int], lengths: Sequence[int], batch_size: int, mega: int = 50) -> list[int]:
    """Reorder a seeded permutation so each batch holds similar lengths (HF ``LengthGroupedSampler``).

    ``order`` is split into mega-batches of ``mega * batch_size`` positions; each is sorted by
    length, longest first (stable, so ties keep the permutation's order); the batch holding the
    longest example overall is moved to the front, so an out-of-memory shows up at step 1. A
    pure function of its inputs: with ``order = epoch_order(n, seed, epoch)`` the data order stays
    a function of (seed, epoch) and resuming replays it exactly.
    """
    order = list(order)
    size = max(1, mega * batch_size)
    out: list[int] = []
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        out += sorted(chunk, key=lambda i: -lengths[i])
    if out:
        batches = [out[k : k + batch_size] for k in range(0, len(out), batch_size)]
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        batches[0], batches[longest] = batches[longest], batches[0]
        out = [i for b in batches for i in b]
    return out


def padding_fraction(order: Sequence[int], lengths: Sequence[int], batch_size: int) -> float:
    """Fraction of padded positions when ``order`` is cut into batches padded to their longest."""
    padded = real = 0
    order = list(order)
    for k in range(0, len(order), batch_size):
        ls = [lengths[i] for i in order[k : k + batch_size]]
        padded += max(ls) * len(ls)
        real += sum(ls)
    return 0.0 if padded == 0 else 1.0 - real / padded
