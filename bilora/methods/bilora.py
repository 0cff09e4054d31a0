"""Bi-LoRA (Liu et al., arXiv 2508.19564 v2, ICLR 2026): an auxiliary LoRA that ascends.

Each adapted layer carries the primary (B1, A1, s1) and an auxiliary (B2, A2, s2):

    h = W0 x + s1 B1 A1 x + s2 B2 A2 x

Both adapters are active in ONE forward and receive gradients from ONE backward. The primary
descends (AdamW), the auxiliary ascends (AdamW with ``maximize=True``, weight decay 0, same
schedule). After every optimizer step all auxiliaries are projected together into a global
Frobenius ball of radius rho on the *effective* perturbation s2·B2A2 (docs/methods.md, "Bi-LoRA"):

    c = sqrt(sum_l ||s2 B2_l A2_l||_F^2);  if c > rho: A2_l, B2_l *= sqrt(rho / c)

Decisions (docs/methods.md, "Bi-LoRA"): auxiliary init is standard LoRA init (A2 Kaiming-uniform, B2 = 0),
drawn from a private generator so the global RNG stream (dropout, data) is the same as LoRA's;
gradient-norm clipping (``max_grad_norm``) covers primary parameters only; the clip runs once per
optimizer step, in fp32; Adam moments are left untouched at the clip; rho is constant.
With rho = 0 the auxiliary is exactly zero after the first step and Bi-LoRA equals LoRA bit for bit.
The ascent is the ``maximize=True`` of the auxiliary's parameter group: torch AdamW applies it itself;
with a bitsandbytes optimizer (``train.loop.optimizer``: adamw_8bit, paged_*), which has no maximize,
:func:`bilora.scale.build_optimizer` negates the auxiliary's gradient right before the step instead,
the same update (tested: one step moves the auxiliary up the gradient and the primary down, with
every optimizer).
The auxiliary is never exported: evaluation, export and merge see the primary only.

``fused=True`` computes both adapters of a layer with one matmul pair (:mod:`bilora.fused`):
A_cat = [A1; A2], B_cat = [s1 B1, s2 B2], built per forward from the same parameters, so each
part keeps its own optimizer group and export is unchanged; equal to the unfused path up to float
rounding (not bit for bit). The parameter lists of the step are built once, not every step.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from peft import PeftModel

from bilora import adapters
from bilora.fused import FusedAdapters
from bilora import layers
from bilora.methods.method import Method, StepContext, register
from bilora.perturbation import Perturbation
from bilora.config import BiLoRAConfig


@dataclass
class _StepCache:
    model_id: int
    primary: list[torch.nn.Parameter]
    aux: list[torch.nn.Parameter]
    aux_factors: list[tuple[torch.Tensor, torch.Tensor, float]]
    fused: FusedAdapters | None


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


def first_order_increase(factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> float:
    """The auxiliary's first-order loss increase sum_l <dL/dW_l, s2 B2_l A2_l>, free from the step's gradients.

    dL/dB2 = s2 (dL/dW) A2^T, so <dL/dB2, B2> = s2 tr(B2^T dL/dW A2^T) = <dL/dW, s2 B2 A2> (and the same
    for <dL/dA2, A2>): the directional derivative of the loss along the auxiliary, at the point the
    gradient was taken (primary + auxiliary on). Call after backward, before the optimizer step.
    """
    total = torch.zeros((), dtype=torch.float64)
    for _, b, _ in factors:
        if b.grad is not None:
            total = total + (b.grad.detach().double() * b.detach().double()).sum()
    return float(total)


@register("bilora", config=BiLoRAConfig)
class BiLoRA(Method):
    """Bi-LoRA: primary LoRA by descent, auxiliary LoRA by ascent in the same pass, global rho-ball."""

    perturbs = True
    notes = {"projection": "global"}
    cfg: BiLoRAConfig
    rho: float
    aux_rank: int
    aux_alpha: float
    aux_lr: float | None
    fused: bool

    def __init__(self, cfg: BiLoRAConfig | None = None, *, seed: int = 0, **overrides: Any) -> None:
        super().__init__(cfg, seed=seed, **overrides)
        self.last_norm = 0.0
        self.steps_projected = 0  # optimizer steps after which the auxiliary was scaled back onto the ball
        self.steps_seen = 0
        self._cache: _StepCache | None = None
        self._aux_b: list[torch.Tensor] = []  # the auxiliary's B2 while clean() holds it at zero

    def prepare(self, model: PeftModel) -> None:
        # Private RNG for the auxiliary's init: the global stream stays identical to LoRA's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 7919)
            adapters.add_auxiliary(model, self.cfg.aux_rank, self.cfg.aux_alpha)

    def param_groups(self, model: PeftModel, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        aux = adapters.adapter_parameters(model, adapters.AUX)
        primary = adapters.primary_parameters(model)
        return [
            {"params": primary, "lr": lr, "weight_decay": weight_decay, "name": "primary"},
            {"params": aux, "lr": self.cfg.aux_lr or lr, "weight_decay": 0.0, "maximize": True, "name": "aux"},
        ]

    def _parts(self, model: PeftModel) -> "_StepCache":
        """Parameter lists, auxiliary factors and fused forwards, built once per model (not every step).

        The lists hold the model's own Parameter objects, which training, checkpoint loading
        (``copy_``) and the projection (``mul_``) all update in place, so they never go stale.
        """
        if self._cache is None or self._cache.model_id != id(model):
            self._cache = _StepCache(
                model_id=id(model),
                primary=adapters.primary_parameters(model),
                aux=adapters.adapter_parameters(model, adapters.AUX),
                aux_factors=adapters.lora_factors(model, adapters.AUX),
                fused=FusedAdapters(model) if self.cfg.fused else None,
            )
        return self._cache

    def step(self, ctx: StepContext) -> dict[str, float]:
        parts = self._parts(ctx.model)
        if parts.fused is not None:
            with parts.fused.installed():
                loss = ctx.forward_backward()  # one forward + one backward, one matmul pair per layer
        else:
            loss = ctx.forward_backward()  # one forward + one backward: grads for A1, B1, A2, B2
        aux_grad = layers.grad_norm(parts.aux)
        increase = first_order_increase(parts.aux_factors)  # free: gradients of this step's one backward
        grad_norm = ctx.clip_and_step(parts.primary, loss)
        c, clipped = project_to_ball(parts.aux_factors, self.cfg.rho)
        self.last_norm = min(c, self.cfg.rho) if clipped else c
        self.steps_seen += 1
        self.steps_projected += int(clipped)
        return {
            "loss": loss,
            "grad_norm": grad_norm,
            "aux_grad_norm": float(aux_grad),
            "aux_norm": c,
            "aux_clipped": float(clipped),
            "aux.first_order_increase": increase,
            "aux.relative_first_order_increase": increase / loss if loss else math.nan,
            "aux.projected_fraction": self.steps_projected / self.steps_seen,
        }

    # -- diagnostics (bilora.perturbation): clean = auxiliary off, perturbation = auxiliary on ------------
    @contextmanager
    def clean(self, model: PeftModel) -> Iterator[None]:
        """B2 = 0 in every layer for the block (the auxiliary contributes nothing), restored exactly after."""
        factors = adapters.lora_factors(model, adapters.AUX)
        self._aux_b = [b.detach().clone() for _, b, _ in factors]
        with torch.no_grad():
            for _, b, _ in factors:
                b.zero_()
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, b, _), saved in zip(factors, self._aux_b):
                    b.copy_(saved)
            self._aux_b = []

    @contextmanager
    def perturbation(self, ctx: StepContext) -> Iterator[Perturbation | None]:
        """Inside :meth:`clean`: the auxiliary back on; delta_l = s2 B2_l A2_l (n_out, n_in), rank <= aux_rank."""
        named = adapters.adapter_layers(ctx.model, adapters.AUX)
        factors = adapters.lora_factors(ctx.model, adapters.AUX)
        with torch.no_grad():
            for (_, b, _), saved in zip(factors, self._aux_b):
                b.copy_(saved)
            deltas = {name: s * (b.detach().float() @ a.detach().float()) for (name, _), (a, b, s) in zip(named, factors)}
        try:
            yield Perturbation(deltas, rank=self.cfg.aux_rank)
        finally:
            with torch.no_grad():
                for _, b, _ in factors:
                    b.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"last_norm": self.last_norm, "steps_projected": self.steps_projected, "steps_seen": self.steps_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_norm = float(state.get("last_norm", 0.0))
        self.steps_projected = int(state.get("steps_projected", 0))
        self.steps_seen = int(state.get("steps_seen", 0))

    def config(self) -> dict[str, Any]:
        return super().config() | {"aux_scaling": self.cfg.aux_alpha / self.cfg.aux_rank}
