"""The two weight spaces (``full``, ``lora``), random filter-normalised directions, applying a perturbation
and the measurement context: what :mod:`bilora.sharpness.measure` and :mod:`bilora.sharpness.ball` share."""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, Union

import torch

from bilora import adapters
from bilora import layers as base_layers
from bilora.sharpness.config import SPACES


def primary_layers(model: torch.nn.Module, adapter: str = adapters.PRIMARY) -> list[torch.nn.Module]:
    """The PEFT LoRA layers of ``adapter`` (the primary one by default), checked to be measurable (unmerged, no DoRA)."""
    layers = [layer for _, layer in adapters.adapter_layers(model, adapter)]
    if not layers:
        raise ValueError("sharpness: the model has no LoRA layers for the primary adapter")
    for layer in layers:
        if getattr(layer, "merged", False):
            raise ValueError("sharpness: an adapter is merged into the base weights; unmerge it first")
        if getattr(layer, "use_dora", {}).get(adapter, False):
            raise NotImplementedError("sharpness: DoRA layers are not supported")
    return layers


def lora_tensors(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The LoRA space: [A_0 (r, in), B_0 (out, r), A_1, B_1, ...] of the primary adapter."""
    primary_layers(model)
    return adapters.adapter_parameters(model, adapters.PRIMARY)


def space_dim(model: torch.nn.Module, space: str) -> int:
    """Number of coordinates of the space: Σ out·in over adapted layers (full) or Σ |A| + |B| (lora)."""
    check_space(space)
    if space == "full":
        return sum(layer.get_base_layer().out_features * layer.get_base_layer().in_features for layer in primary_layers(model))
    return sum(p.numel() for p in lora_tensors(model))


def check_space(space: str) -> None:
    """ValueError unless ``space`` is one of :data:`bilora.sharpness.config.SPACES`."""
    if space not in SPACES:
        raise ValueError(f"sharpness: unknown space {space!r}; known: {SPACES}")


# -- directions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeededRows:
    """A full-space direction component stored as a seed: d[i, :] = row_scale[i] · g[i, :], g ~ N(0, 1)^(out, in).

    g is :func:`bilora.layers.layer_noise` of ``seed`` (a private generator on
    ``row_scale``'s device), regenerated whenever it is needed.
    """

    seed: int
    row_scale: torch.Tensor  # (out,) float32
    n_in: int

    def materialize(self, scale: float = 1.0) -> torch.Tensor:
        """scale · d as a dense (out, in) float32 tensor (computed as g · (scale · row_scale))."""
        return base_layers.layer_noise(self.seed, self.row_scale * scale, self.n_in)


Part = Union[torch.Tensor, SeededRows]


@dataclass
class Direction:
    """A direction in one space: ``parts`` aligned with the space's tensors (full: (out, in) per layer; lora: A, B per layer)."""

    space: str
    parts: list[Part]

    def dense(self) -> list[torch.Tensor]:
        """Every part as a dense tensor (seeded parts are generated: full-size memory)."""
        return [p.materialize() if isinstance(p, SeededRows) else p for p in self.parts]

    def norm(self) -> float:
        """Global L2 norm over all parts."""
        return global_norm(self.dense())


def global_norm(parts: Sequence[torch.Tensor]) -> float:
    """sqrt(Σ ‖p‖²) over all tensors (accumulated in float64): the norm of a point of a space."""
    return math.sqrt(math.fsum(float(p.double().pow(2).sum()) for p in parts))


def direction_seed(seed: int, space: str, index: int, part: int) -> int:
    """A 63-bit generator seed for (seed, space, direction index, tensor index); a pure function of its inputs."""
    return base_layers.stream_seed("sharpness", seed, space, index, part)


def random_direction(model: torch.nn.Module, space: str, seed: int = 0, index: int = 0) -> Direction:
    """Random filter-normalised direction number ``index``: each row d_i has the norm of the row W_i it perturbs.

    full: W = merged dequant(W0) + s·B@A per adapted layer, parts are :class:`SeededRows`;
    lora: W = A or B, parts are dense tensors in the factor's dtype (at least float32).
    A zero row of W gets a zero direction row.
    """
    check_space(space)
    parts: list[Part] = []
    with torch.no_grad():
        if space == "full":
            for i, layer in enumerate(primary_layers(model)):
                base = layer.get_base_layer()
                base_layers.check_base(base)
                w_norm = base_layers.merged_row_norms(layer, adapters.PRIMARY)  # (out,) float32
                s = direction_seed(seed, space, index, i)
                g_norm = base_layers.layer_noise(s, torch.ones_like(w_norm), base.in_features).norm(dim=1)  # (out,)
                parts.append(SeededRows(s, w_norm / g_norm, base.in_features))
        else:
            for i, p in enumerate(lora_tensors(model)):
                w = p.detach().to(base_layers.work_dtype(p.dtype))
                g = base_layers.layer_noise(direction_seed(seed, space, index, i), torch.ones(w.shape[0], device=w.device), w.shape[1]).to(
                    w.dtype
                )
                parts.append(g.mul_((w.norm(dim=1) / g.norm(dim=1))[:, None]))  # (rows, cols)
    return Direction(space, parts)


# -- applying a perturbation --------------------------------------------------------------------
def shifted_forward(base: torch.nn.Module, delta_fn: Callable[[torch.Tensor], torch.Tensor], fresh: bool):
    """A replacement ``forward`` for ``base``: F.linear(x, dequant(W0) + delta, bias), one matmul.

    ``delta_fn(w0)`` returns delta (out, in) in w0's work dtype; ``fresh`` says it is a new tensor
    that may be overwritten (then W0 is added in place: one full-size temporary).
    """

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        w0 = base_layers.dequantized_weight(base)  # (out, in); a fresh copy for 4-bit bases, never written
        delta = delta_fn(w0)
        w_eff = delta.add_(w0) if fresh else delta + w0  # (out, in) = dequant(W0) + t·d
        return base_layers.base_linear(base, x, w_eff, base.bias)  # (..., in) -> (..., out)

    return forward


def _delta_fn(part: Part, scale: float) -> tuple[Callable[[torch.Tensor], torch.Tensor], bool]:
    if isinstance(part, SeededRows):
        return (lambda w0: part.materialize(scale).to(device=w0.device, dtype=base_layers.work_dtype(w0.dtype))), True
    return (lambda w0: part.to(device=w0.device, dtype=base_layers.work_dtype(w0.dtype)) * scale), True


@contextmanager
def perturbation(model: torch.nn.Module, direction: Direction, scale: float) -> Iterator[None]:
    """Evaluate the model at θ + scale·direction inside the block; the model is bit-identical afterwards.

    full: each adapted base layer runs F.linear(x, dequant(W0) + scale·d_l, bias) (the LoRA branch
    is added by PEFT), so the merged weight is W' + scale·d_l; nothing is written.
    lora: A, B += scale·d in place, restored by copying the saved tensors back.
    scale == 0 installs nothing.
    """
    check_space(direction.space)
    if scale == 0.0:
        yield
        return
    if direction.space == "full":
        layers = primary_layers(model)
        if len(layers) != len(direction.parts):
            raise ValueError(f"sharpness: direction has {len(direction.parts)} parts for {len(layers)} layers")
        bases = [layer.get_base_layer() for layer in layers]
        forwards = []
        for base, part in zip(bases, direction.parts):
            base_layers.check_base(base)
            fn, fresh = _delta_fn(part, scale)
            forwards.append(shifted_forward(base, fn, fresh))
        with base_layers.forwards_replaced(zip(bases, forwards)):
            yield
        return
    params = lora_tensors(model)
    if len(params) != len(direction.parts):
        raise ValueError(f"sharpness: direction has {len(direction.parts)} parts for {len(params)} LoRA tensors")
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, d in zip(params, direction.parts):
                p.add_(d.to(device=p.device, dtype=p.dtype), alpha=scale)
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


# -- measurement context ------------------------------------------------------------------------
@contextmanager
def requires_grad_only(model: torch.nn.Module, keep: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside the block only the parameters in ``keep`` require grad; every flag is restored on exit."""
    ids = {id(t) for t in keep}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in ids)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def measuring(model: torch.nn.Module) -> Iterator[None]:
    """Primary adapter only, eval mode, 4-bit layers on the dequantize (fp32 path) kernel; all undone on exit."""
    modes = [(m, m.training) for m in model.modules()]
    primary = adapters.primary_only(model) if hasattr(getattr(model, "base_model", None), "active_adapters") else nullcontext()
    try:
        with base_layers.fp32_kernel(model), primary:
            model.eval()
            yield
    finally:
        for m, mode in modes:
            m.training = mode
