"""LoRA-SAM: SAM (Foret et al.) applied to the LoRA factors only (docs/methods.md, "LoRA-SAM").

Objective: min_{B,A} max_{||(e_B, e_A)|| <= rho} L(W0 + s (B + e_B)(A + e_A)).

One optimizer step, with gradient accumulation over the micro-batches of the step
(docs/methods.md, "LoRA-SAM": our choice over a per-micro-batch m-SAM):

1. Pass 1: forward/backward over ALL micro-batches at the current point; the gradients
   accumulate (each micro-batch loss is divided by the number of micro-batches), giving the
   mini-batch gradient g of the whole optimizer step.
2. e = rho * g / (||g|| + 1e-12) on the LoRA A/B tensors of the primary adapter, where ||g|| is
   the GLOBAL Frobenius norm over every A/B gradient, accumulated in fp32 and outside any grad
   scaler. e is added in place under ``no_grad``; the exact original tensors are saved first.
3. Zero every gradient, then pass 2: forward/backward over the SAME micro-batches at the
   perturbed point.
4. Restore the LoRA tensors by copying the saved originals back (bit-for-bit, not "-= e",
   which would round), then ``clip_and_step`` on the primary parameters with the pass-2
   (adversarial) gradient. The clip covers primary parameters only (docs/methods.md).

So the perturbation is computed once per optimizer step from the accumulated gradient, not once
per micro-batch. Without DDP the accumulated gradient is this process's gradient; under torchrun
(``train.distributed``) it is the all-reduced one (``StepContext.forward_backward`` averages it over
the ranks before the perturbation, see :mod:`bilora.distributed`).

A trainable task head (e.g. ``classifier`` in ``modules_to_save``) is NOT perturbed (docs/methods.md);
it is updated like everything else with the pass-2 gradient. The base weights are never touched,
so this works unchanged on 4-bit (bitsandbytes nf4) bases, whose PEFT A/B are plain fp32 tensors.

Cost: two forward+backward passes per micro-batch (``passes_per_step = 2``) plus one copy of the
A/B tensors. Logged: ``loss`` (unperturbed, pass 1), ``perturbed_loss`` (pass 2),
``sam.loss_increase`` (pass 2 minus pass 1, the perturbation's effect on this step's loss, free),
``sam_grad_norm`` (||g||, pass 1), ``perturbation_norm`` (||e||) and ``grad_norm`` (pass 2,
before clipping). The deliverable is the plain primary adapter (the base class's export).
Defaults: rho = 0.01 (Bi-LoRA's GLUE/Llama setting, docs/methods.md).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from bilora import adapters
from bilora.layers import grad_norm_sumsq
from bilora.methods.method import Method, StepContext, register
from bilora.perturbation import Perturbation
from bilora.config import LoraSamConfig

EPS = 1e-12


@register("lora_sam", config=LoraSamConfig)
class LoRASAM(Method):
    """SAM on the LoRA A/B tensors: ascend by rho along the accumulated gradient, descend from there."""

    passes_per_step = 2
    perturbs = True
    notes = {"perturbed": "primary LoRA A/B", "norm": "global", "accumulation": "per optimizer step"}

    cfg: LoraSamConfig
    rho: float

    @staticmethod
    def perturbed_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The tensors SAM perturbs: the primary adapter's A and B of every adapted layer (no head)."""
        return adapters.adapter_parameters(model, adapters.PRIMARY)

    def ascend(self, lora: list[torch.nn.Parameter]) -> tuple[list[tuple[torch.nn.Parameter, torch.Tensor]], torch.Tensor, torch.Tensor]:
        """Add e = rho * g / ||g|| (g: the gradients on ``lora``) in place; returns (saved originals, ||g||, ||e||)."""
        g_norm = grad_norm_sumsq(lora)
        scale = self.cfg.rho / (g_norm + EPS)
        saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        e_sq = torch.zeros((), dtype=torch.float32)
        with torch.no_grad():
            for p in lora:
                if p.grad is None:
                    continue
                e = p.grad.detach().float() * scale  # fp32, no grad scaler involved
                e_sq = e_sq + e.pow(2).sum()
                saved.append((p, p.detach().clone()))
                p.add_(e.to(p.dtype))
        return saved, g_norm, e_sq.sqrt()

    @staticmethod
    @torch.no_grad()
    def restore(saved: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
        """Copy the saved originals back (bit-for-bit, not "-= e")."""
        for p, original in saved:
            p.copy_(original)

    def step(self, ctx: StepContext) -> dict[str, float]:
        lora = self.perturbed_parameters(ctx.model)
        # Pass 1: accumulated gradient over every micro-batch of this optimizer step.
        loss = ctx.forward_backward()
        saved, g_norm, e_norm = self.ascend(lora)
        # Pass 2: the adversarial gradient at the perturbed point, on the same micro-batches.
        for _, p in adapters.trainable_named_parameters(ctx.model):
            p.grad = None  # the head too: it is updated with the pass-2 gradient only
        perturbed_loss = ctx.forward_backward()
        # Restore exactly, then descend with the pass-2 gradient.
        self.restore(saved)
        del saved
        grad_norm = ctx.clip_and_step(adapters.primary_parameters(ctx.model), loss)
        return {
            "loss": loss,
            "perturbed_loss": perturbed_loss,
            "sam.loss_increase": perturbed_loss - loss,
            "grad_norm": grad_norm,
            "sam_grad_norm": float(g_norm),
            "perturbation_norm": float(e_norm),
        }

    @contextmanager
    def perturbation(self, ctx: StepContext) -> Iterator[Perturbation | None]:
        """SAM's step from the clean gradients on A/B: delta_l = s[(B + e_B)(A + e_A) - BA], rank <= 2r."""
        if self.cfg.rho == 0:
            yield None
            return
        layers = [
            (name, layer.lora_A[adapters.PRIMARY].weight, layer.lora_B[adapters.PRIMARY].weight, float(layer.scaling[adapters.PRIMARY]))
            for name, layer in adapters.adapter_layers(ctx.model)
        ]
        before = {name: (a.detach().float().clone(), b.detach().float().clone()) for name, a, b, _ in layers}
        saved, _, _ = self.ascend(self.perturbed_parameters(ctx.model))
        deltas = {name: s * (b.detach().float() @ a.detach().float() - before[name][1] @ before[name][0]) for name, a, b, s in layers}
        try:
            yield Perturbation(deltas, rank=2 * min(a.shape[0] for _, a, _, _ in layers))
        finally:
            self.restore(saved)
