"""Does the perturbation bite? Training-time diagnostics for every weight-perturbing method.

Every ``k`` optimizer steps (``train.loop.perturbation_every``) :func:`measure` asks the method for the
perturbation delta it applies at this step and measures, on the step's own micro-batches, in eval mode
(no dropout, so both losses see the same network) and under a forked RNG (training is unchanged):

    clean_loss      L(W)                       at the method's unperturbed point (Method.clean)
    loss_increase   L(W + delta) - L(W)        the perturbation's real effect on the loss
    first_order     <G, delta>                 G = dL/dW of the adapted layers' merged weights at W
    alignment       <G, delta> / (|G| |delta|) cosine of delta with SAM's direction G
    vs_sam          loss_increase / (|G| |delta|)   measured increase over SAM's first-order increase
                                               rho |G| at the same norm rho = |delta|
    rank_ceiling    |G_r| / |G|                the best a rank-r perturbation can align with G: G_r is the
                                               per-layer best rank-r approximation of G (r: the
                                               perturbation's rank; absent for full-rank noise)

Norms are Frobenius, global over the adapted layers (docs/methods.md, "Sharpness": the full weight
space is the merged weights W0 + s·BA of the adapted linears). G is never a parameter gradient: it is
sum over tokens of dL/dy^T x at each adapted layer (y = x W^T), captured by hooks, so it works on
4-bit bases whose W0 has no gradient.

Cost: one forward+backward at the clean point, one forward at the perturbed point, and one small
eigendecomposition per adapted layer: about 1.7 optimizer steps' worth, measured (reports/science/pilot/), so
about 1.7 % of training at the default ``k`` = 100.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from bilora import adapters, scale


@dataclass
class Perturbation:
    """What a method applies at one step: dense delta per adapted layer (by module name) and its rank.

    ``deltas[name]``: (n_out, n_in), the change of that layer's merged weight; ``rank``: the largest
    rank a layer's delta can have by construction (None: unconstrained, e.g. Gaussian noise).
    """

    deltas: dict[str, torch.Tensor]
    rank: int | None


@contextmanager
def full_weight_grads(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Accumulate G_l = dL/dW_l (n_out, n_in) of every LoRA layer's merged weight over the backward
    passes run inside the block. Hooks see the layer input x (..., n_in) and the output gradient
    dL/dy (..., n_out); G_l += dL/dy^T x summed over tokens, in float32 (float64 models: float64)."""
    grads: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name: str):
        def forward_hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            x = args[0].detach()
            x2 = x.reshape(-1, x.shape[-1])  # (tokens, n_in)

            def on_grad(g: torch.Tensor) -> None:
                g2 = g.detach().reshape(-1, g.shape[-1])  # (tokens, n_out)
                dt = torch.promote_types(torch.float32, g2.dtype)
                contrib = g2.to(dt).T @ x2.to(dt)  # (n_out, n_in)
                grads[name] = contrib if name not in grads else grads[name] + contrib

            output.register_hook(on_grad)

        return forward_hook

    for name, layer in adapters.lora_layers(model):
        handles.append(layer.register_forward_hook(hook_for(name)))
    try:
        yield grads
    finally:
        for h in handles:
            h.remove()


def rank_r_norm_sq(g: torch.Tensor, r: int) -> torch.Tensor:
    """Squared Frobenius norm of the best rank-r approximation of g (m, n): the sum of its r largest sigma^2.

    sigma^2 are the eigenvalues of the Gram matrix on the smaller side (min(m, n) square, float64), which is
    several times cheaper than an SVD of g; the top eigenvalues, the only ones used, are accurate.
    """
    g64 = g.double()
    gram = g64 @ g64.T if g64.shape[0] <= g64.shape[1] else g64.T @ g64  # (k, k), k = min(m, n)
    eig = torch.linalg.eigvalsh(gram)  # ascending
    return eig.flip(0)[:r].clamp_min(0).sum()


def summarize(clean_loss: float, perturbed_loss: float, grads: dict[str, torch.Tensor], pert: Perturbation) -> dict[str, float]:
    """The diagnostics of one step from its two losses, G and delta (module docstring)."""
    names = [n for n in pert.deltas if n in grads]
    dt = torch.float64
    g_sq = sum((grads[n].to(dt).pow(2).sum() for n in names), torch.zeros((), dtype=dt))
    d_sq = sum((pert.deltas[n].to(dt).pow(2).sum() for n in names), torch.zeros((), dtype=dt))
    inner = sum(((grads[n].to(dt) * pert.deltas[n].to(dt)).sum() for n in names), torch.zeros((), dtype=dt))
    g_norm, d_norm = float(g_sq.sqrt()), float(d_sq.sqrt())
    increase = perturbed_loss - clean_loss
    out = {
        "perturbation.clean_loss": clean_loss,
        "perturbation.loss_increase": increase,
        "perturbation.relative_increase": increase / clean_loss if clean_loss else math.nan,
        "perturbation.norm": d_norm,
        "perturbation.full_grad_norm": g_norm,
        "perturbation.first_order_increase": float(inner),
    }
    denom = g_norm * d_norm
    if denom > 0:
        out["perturbation.alignment"] = float(inner) / denom
        out["perturbation.vs_sam"] = increase / denom
    if pert.rank is not None and g_norm > 0:
        ceiling_sq = sum((rank_r_norm_sq(grads[n].float(), pert.rank) for n in names), torch.zeros(()))
        out["perturbation.rank_ceiling"] = math.sqrt(float(ceiling_sq)) / g_norm
    return out


def _mean_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device_type: str, dtype: torch.dtype | None) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        with scale.autocast(device_type, dtype):
            loss = model(**batch).loss / len(batches)
        if loss.requires_grad:
            loss.backward()
        total = total + loss.detach().double().cpu()
    return total


def measure(method, ctx) -> dict[str, float]:
    """Run the diagnostics for ``method`` (a :class:`bilora.methods.Method`) on ``ctx`` (its
    :class:`~bilora.methods.method.StepContext`) before the step; returns {} if it perturbs nothing now.

    Leaves the model, its gradients, train/eval mode and every RNG exactly as it found them.
    """
    model = ctx.model
    params = [p for p in model.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in params]
    was_training = model.training
    for p in params:
        p.grad = None
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), method.clean(model):
            with full_weight_grads(model) as grads:
                clean = float(_mean_loss(model, ctx.micro_batches, ctx.device_type, ctx.autocast_dtype))
            with method.perturbation(ctx) as pert:
                if pert is None:
                    return {}
                with torch.no_grad():
                    perturbed = float(_mean_loss(model, ctx.micro_batches, ctx.device_type, ctx.autocast_dtype))
                return summarize(clean, perturbed, grads, pert)
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        model.train(was_training)
