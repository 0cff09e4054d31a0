"""Bi-LoRA (Liu et al., arXiv 2508.19564 v2, ICLR 2026): an auxiliary LoRA that ascends.

Each adapted layer carries the primary (B1, A1, s1) and an auxiliary (B2, A2, s2):

    h = W0 x + s1 B1 A1 x + s2 B2 A2 x

Both adapters are active in ONE forward and receive gradients from ONE backward. The primary
descends (AdamW), the auxiliary ascends (AdamW with ``maximize=True``, weight decay 0, same
schedule). After every optimizer step all auxiliaries are projected together into a global
Frobenius ball of radius rho on the *effective* perturbation s2·B2A2 (methods.md §8.2):

    c = sqrt(sum_l ||s2 B2_l A2_l||_F^2);  if c > rho: A2_l, B2_l *= sqrt(rho / c)

Decisions (methods.md §8): auxiliary init is standard LoRA init (A2 Kaiming-uniform, B2 = 0),
drawn from a private generator so the global RNG stream (dropout, data) is the same as LoRA's;
gradient-norm clipping (``max_grad_norm``) covers primary parameters only; the clip runs once per
optimizer step, in fp32; Adam moments are left untouched at the clip; rho is constant.
With rho = 0 the auxiliary is exactly zero after the first step and Bi-LoRA equals LoRA bit for bit.
The auxiliary is never exported: evaluation, export and merge see the primary only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft import PeftModel

from bilora import adapters
from bilora.methods.base import Method, StepContext, _grad_norm, register


def aux_norm(factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """Global c = sqrt(sum_l ||s B A||_F^2) using only r x r products (never the m x n matrix).

    ||s B A||_F^2 = s^2 * sum((B^T B) ⊙ (A A^T)), with A: (r, n), B: (m, r).
    """
    total = torch.zeros((), dtype=torch.float32)
    for a, b, s in factors:
        a32, b32 = a.detach().float(), b.detach().float()
        btb = b32.T @ b32  # (r, r)
        aat = a32 @ a32.T  # (r, r)
        total = total + (s * s) * (btb * aat).sum()
    return total.clamp_min(0).sqrt()


@torch.no_grad()
def project_to_ball(factors: list[tuple[torch.Tensor, torch.Tensor, float]], rho: float) -> tuple[float, bool]:
    """Scale every (A, B) by sqrt(rho / c) when c > rho, so the global norm becomes rho. Returns (c, clipped)."""
    c = float(aux_norm(factors))
    if c <= rho:
        return c, False
    k = math.sqrt(rho / c)
    for a, b, _ in factors:
        a.mul_(k)
        b.mul_(k)
    return c, True


@register
class BiLoRA(Method):
    """Bi-LoRA: primary LoRA by descent, auxiliary LoRA by ascent in the same pass, global rho-ball."""

    name = "bilora"

    def __init__(self, *, rho: float = 0.05, aux_rank: int = 8, aux_alpha: float = 16.0, aux_lr: float | None = None, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.rho = rho
        self.aux_rank = aux_rank
        self.aux_alpha = aux_alpha
        self.aux_lr = aux_lr
        self.last_norm = 0.0

    def prepare(self, model: PeftModel) -> None:
        # Private RNG for the auxiliary's init: the global stream stays identical to LoRA's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 7919)
            adapters.add_auxiliary(model, self.aux_rank, self.aux_alpha)

    def param_groups(self, model: PeftModel, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        aux = adapters.adapter_parameters(model, adapters.AUX)
        primary = adapters.primary_parameters(model)
        return [
            {"params": primary, "lr": lr, "weight_decay": weight_decay, "name": "primary"},
            {"params": aux, "lr": self.aux_lr or lr, "weight_decay": 0.0, "maximize": True, "name": "aux"},
        ]

    def step(self, ctx: StepContext) -> dict[str, float]:
        loss = ctx.forward_backward()  # one forward + one backward: grads for A1, B1, A2, B2
        aux_params = adapters.adapter_parameters(ctx.model, adapters.AUX)
        aux_grad = float(_grad_norm(aux_params))
        grad_norm = ctx.clip_and_step(adapters.primary_parameters(ctx.model), loss)
        c, clipped = project_to_ball(adapters.lora_factors(ctx.model, adapters.AUX), self.rho)
        self.last_norm = min(c, self.rho) if clipped else c
        return {"loss": loss, "grad_norm": grad_norm, "aux_grad_norm": aux_grad, "aux_norm": c, "aux_clipped": float(clipped)}

    def state_dict(self) -> dict[str, Any]:
        return {"last_norm": self.last_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_norm = float(state.get("last_norm", 0.0))

    def config(self) -> dict[str, Any]:
        return {"rho": self.rho, "aux_rank": self.aux_rank, "aux_alpha": self.aux_alpha, "aux_scaling": self.aux_alpha / self.aux_rank, "aux_lr": self.aux_lr, "projection": "global"}
