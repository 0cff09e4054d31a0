"""Flatness in a global Frobenius ball: the worst loss increase within radius r, found by attack, and the
random-direction increase at the same radius.

These are the radii the methods defend: Bi-LoRA keeps its auxiliary s2·B2A2 in the ball
sqrt(Σ_l ‖ε_l‖²_F) ≤ ρ over all adapted layers, SAM perturbs by ρ·g/‖g‖ with the same global norm
(docs/methods.md). Here r is that absolute global norm over the space's tensors (full: the merged
weights W' of the adapted layers, one (out, in) ε_l per layer; lora: the factors A, B), not a fraction
of each row as in :func:`bilora.sharpness.measure.random_sharpness`.

For each radius r:

* ``one_step``: L(θ + r·g/‖g‖) − L(θ), g = ∇L(θ) (the SAM perturbation; the gradient is taken once);
* ``pgd``: the largest L(θ + ε) − L(θ) seen by projected gradient ascent on ε,
  ε ← Π_r(ε + η·∇L(θ+ε)/‖∇L(θ+ε)‖), η = ``step_size``·r, Π_r the projection onto the ball
  (ε·r/‖ε‖ when ‖ε‖ > r), ``steps`` gradient steps per restart. Restart 0 starts at the one-step
  point r·g/‖g‖, so pgd ≥ one_step; restart k ≥ 1 starts at r·u_k, u_k a seeded random unit
  direction. Every iterate's loss counts (the attacker keeps its best point);
* ``random``: the antithetic increase ½[L(θ + r·u_k) + L(θ − r·u_k)] − L(θ) over K seeded Gaussian
  directions u_k of global norm 1 (mean, std, ...). The pair cancels the first-order term g·u_k·r,
  which in D dimensions is ~‖g‖·r/√D per direction and would otherwise dominate (it is linear in r and
  as often negative as positive); what is left is the curvature along u_k, ½r²·u_kᵀHu_k + O(r⁴).

All of it runs inside :func:`bilora.sharpness.space.measuring` (primary adapter only, eval mode, fp32 4-bit
kernel) and leaves the model bit-identical; gradients come from ``torch.autograd.grad``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from bilora import layers as base_layers
from bilora.sharpness.objective import Objective
from bilora.sharpness.result import summary
from bilora.sharpness.space import (
    Direction,
    check_space,
    direction_seed,
    global_norm,
    lora_tensors,
    measuring,
    perturbation,
    primary_layers,
    requires_grad_only,
    shifted_forward,
)


def _zeros(model: torch.nn.Module, space: str) -> list[torch.Tensor]:
    """Zero tensors shaped like the space's tensors, in their work dtype (full: (out, in) per layer)."""
    if space == "full":
        out = []
        for layer in primary_layers(model):
            base = layer.get_base_layer()
            base_layers.check_base(base)
            w0 = base_layers.dequantized_weight(base)  # only for shape, dtype and device
            out.append(torch.zeros(w0.shape, dtype=base_layers.work_dtype(w0.dtype), device=w0.device))  # (out, in)
            del w0
        return out
    return [torch.zeros(p.shape, dtype=base_layers.work_dtype(p.dtype), device=p.device) for p in lora_tensors(model)]


def unit_random(model: torch.nn.Module, space: str, seed: int, index: int) -> list[torch.Tensor]:
    """Direction ``index``: a Gaussian of global norm 1 over the space's tensors, from private generators
    (seeded by (seed, space, index, tensor index): the same seed gives the same direction)."""
    parts = []
    for i, z in enumerate(_zeros(model, space)):
        rows, cols = z.shape[0], z[0].numel()
        g = base_layers.layer_noise(direction_seed(seed, f"ball-{space}", index, i), torch.ones(rows, device=z.device), cols)
        parts.append(g.reshape(z.shape).to(z.dtype))  # same shape as the tensor it perturbs
    norm = global_norm(parts)
    return [p.div_(norm) for p in parts]


def loss_at(model: torch.nn.Module, objective: Objective, space: str, eps: Sequence[torch.Tensor]) -> float:
    """L(θ + ε)."""
    with perturbation(model, Direction(space, list(eps)), 1.0):
        return objective.value(model)


def grad_at(model: torch.nn.Module, objective: Objective, space: str, eps: Sequence[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """(L(θ + ε), ∇_ε L(θ + ε)): the gradient with respect to the perturbation, one tensor per part."""
    if space == "full":
        bases = [layer.get_base_layer() for layer in primary_layers(model)]
        leaves = [e.detach().clone().requires_grad_(True) for e in eps]  # (out, in) each
        forwards = [shifted_forward(b, (lambda w0, leaf=leaf: leaf.to(w0.device)), False) for b, leaf in zip(bases, leaves)]
        with base_layers.forwards_replaced(zip(bases, forwards)), requires_grad_only(model, []):
            return objective.grad(model, leaves)
    params = lora_tensors(model)
    with perturbation(model, Direction(space, list(eps)), 1.0), requires_grad_only(model, params):
        return objective.grad(model, params)  # dL/dA at A + ε_A is dL/dε_A


def project(eps: list[torch.Tensor], radius: float) -> list[torch.Tensor]:
    """Π_r: scale ε onto the ball of global norm ``radius`` if it lies outside (in place)."""
    norm = global_norm(eps)
    if norm > radius:
        for e in eps:
            e.mul_(radius / norm)
    return eps


def pgd(
    model: torch.nn.Module,
    objective: Objective,
    space: str,
    radius: float,
    start: list[torch.Tensor],
    steps: int,
    step_size: float,
    base_loss: float,
) -> float:
    """The largest L(θ + ε) − L(θ) over the iterates of projected normalised-gradient ascent from ``start``."""
    eps = project([s.clone() for s in start], radius)
    best = -math.inf
    for _ in range(steps):
        loss, g = grad_at(model, objective, space, eps)
        best = max(best, loss - base_loss)
        gnorm = global_norm(g)
        if gnorm == 0.0:
            return best
        eps = project([e.add_(gi.to(e.dtype), alpha=step_size * radius / gnorm) for e, gi in zip(eps, g)], radius)
    return max(best, loss_at(model, objective, space, eps) - base_loss)


def ball_sharpness(
    model: torch.nn.Module,
    objective: Objective,
    space: str,
    radii: Sequence[float],
    steps: int = 10,
    restarts: int = 1,
    step_size: float = 0.25,
    n_directions: int = 0,
    seed: int = 0,
    base_loss: float | None = None,
) -> dict[str, Any]:
    """One-step attack, multi-step projected attack and random directions at each global radius.

    Returns {"base_loss", "grad_norm", "steps", "restarts", "step_size", "radii": [{"radius",
    "one_step", "pgd", "pgd_restarts": [per restart], "random": {"mean", "std", "min", "max",
    "values"} or None}]}; every figure is a loss increase over L(θ) (random: antithetic, see the module).
    """
    check_space(space)
    with measuring(model):
        l0 = objective.value(model) if base_loss is None else base_loss
        _, g0 = grad_at(model, objective, space, _zeros(model, space))
        gnorm = global_norm(g0)
        ghat = [g / gnorm for g in g0] if gnorm > 0 else g0
        randoms = [unit_random(model, space, seed, k) for k in range(max(n_directions, restarts - 1))]
        out = []
        for r in radii:
            one = [g * r for g in ghat]
            one_step = loss_at(model, objective, space, one) - l0 if r > 0 else 0.0
            starts = [one] + [[u * r for u in randoms[k]] for k in range(restarts - 1)]
            runs = [pgd(model, objective, space, r, s, steps, step_size, l0) if r > 0 else 0.0 for s in starts]
            rnd = [
                0.5
                * (
                    loss_at(model, objective, space, [u * r for u in randoms[k]])
                    + loss_at(model, objective, space, [u * -r for u in randoms[k]])
                )
                - l0
                for k in range(n_directions)
            ]
            out.append(
                {
                    "radius": r,
                    "one_step": one_step,
                    "pgd": max([one_step, *runs]),
                    "pgd_restarts": runs,
                    "random": summary(rnd) if rnd else None,
                }
            )
    return {"base_loss": l0, "grad_norm": gnorm, "steps": steps, "restarts": restarts, "step_size": step_size, "radii": out}
