"""Fused dual adapter: the primary and the Bi-LoRA auxiliary in ONE pair of matmuls per layer.

PEFT computes the two active adapters of a layer one after the other::

    h = base(x) + s1 * B1 (A1 x) + s2 * B2 (A2 x)          (4 thin matmuls, 2 adds, PEFT's Python loop)

The fused forward stacks them::

    A_cat = [A1; A2]            (r1 + r2, n)
    B_cat = [s1 B1, s2 B2]      (m, r1 + r2)
    h = base(x) + B_cat (A_cat x)                            (2 matmuls, 1 add)

which is the same function (s1 B1 A1 + s2 B2 A2 = B_cat A_cat). A_cat and B_cat are rebuilt from
PEFT's own parameters on every forward (``torch.cat`` is differentiable), so autograd routes the
gradient of each block back to A1, B1, A2, B2: each part keeps its own optimizer group (primary
descends, auxiliary ascends), the projection code, checkpoints and export are unchanged, and the
auxiliary is still dropped at export. Only the *order of floating-point operations* differs
(the scale multiplies B instead of the output, and the two rank-r sums are one rank-(r1+r2) sum),
so the fused path matches PEFT's to float rounding, not bit for bit (docs/methods.md, "Bi-LoRA": within 1e-6
relative in float32).

The fused forward is installed as an instance ``forward`` on each LoRA layer only for the duration
of a training step (:func:`fused_adapters`); evaluation, generation and export see PEFT's forward.
A layer is fused only when its computation is exactly "vanilla LoRA ×2": both adapters present and
active, no DoRA/variant, no LoRA bias, not merged, and no dropout on the primary (the auxiliary
always has dropout 0; a dropped-out primary input differs from the auxiliary's, so it cannot share
A_cat's matmul). Any other layer silently keeps PEFT's forward, which is always correct.
The base layer is called as PEFT calls it, so Flat-LoRA-style base overrides and 4-bit bases work.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from bilora import adapters, layers


def _fusable(layer: Any, names: tuple[str, str]) -> bool:
    if any(n not in layer.lora_A for n in names):
        return False
    if getattr(layer, "lora_variant", None) and any(n in layer.lora_variant for n in names):
        return False
    for n in names:
        if layer.lora_A[n].bias is not None or layer.lora_B[n].bias is not None:
            return False
        if not isinstance(layer.lora_dropout[n], torch.nn.Identity):
            return False
    return True


def fused_forward(layer: Any, names: tuple[str, str], original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A replacement ``forward`` for one PEFT LoRA layer computing both adapters with one matmul pair."""
    a1, a2 = layer.lora_A[names[0]].weight, layer.lora_A[names[1]].weight  # (r1, n), (r2, n)
    b1, b2 = layer.lora_B[names[0]].weight, layer.lora_B[names[1]].weight  # (m, r1), (m, r2)
    s1, s2 = float(layer.scaling[names[0]]), float(layer.scaling[names[1]])
    base = layer.base_layer
    wanted = set(names)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Anything but the plain two-adapter training forward goes through PEFT unchanged.
        if kwargs or args or layer.disable_adapters or layer.merged or set(layer.active_adapters) != wanted:
            return original(x, *args, **kwargs)
        result = base(x)
        a_cat = torch.cat([a1, a2], 0)  # (r1 + r2, n)
        b_cat = torch.cat([b1 * s1, b2 * s2], 1)  # (m, r1 + r2)
        delta = F.linear(F.linear(x.to(a_cat.dtype), a_cat), b_cat)  # (..., n) -> (..., r1 + r2) -> (..., m)
        return result + delta.to(result.dtype)

    return forward


class FusedAdapters:
    """Per-model cache of the fused forwards (built once; installing them is a setattr per layer)."""

    def __init__(self, model: torch.nn.Module, names: tuple[str, str] = (adapters.PRIMARY, adapters.AUX)) -> None:
        self.model_id = id(model)
        self.names = names
        self.layers: list[tuple[torch.nn.Module, str, Callable[..., torch.Tensor]]] = []
        self.skipped: list[str] = []
        for name, layer in adapters.lora_layers(model):
            if not _fusable(layer, names):
                self.skipped.append(name)
                continue
            attr = "_old_forward" if "_old_forward" in vars(layer) else "forward"  # under an accelerate hook
            original = vars(layer).get(attr) or layer.forward
            self.layers.append((layer, attr, fused_forward(layer, names, original)))

    @contextmanager
    def installed(self) -> Iterator[int]:
        """Install the fused forwards for the duration of the block; yields how many layers are fused."""
        with layers.forwards_replaced((layer, fwd) for layer, _, fwd in self.layers):
            yield len(self.layers)


@contextmanager
def fused_adapters(model: torch.nn.Module, names: tuple[str, str] = (adapters.PRIMARY, adapters.AUX)) -> Iterator[int]:
    """One-off form of :class:`FusedAdapters` (tests, scripts)."""
    with FusedAdapters(model, names).installed() as n:
        yield n
