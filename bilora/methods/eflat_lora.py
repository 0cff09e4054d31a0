"""EFlat-LoRA / EFMLoRA (Deng, Zhu, Pang et al., arXiv 2508.00522 v3): full-space SAM moved onto B.

Not Li et al.'s Flat-LoRA (``flat_lora``). Objective: min_{A,B} max_{||E||_F <= rho} L(W0 + s B A + E),
with W = W0 + s B A, A: (r, n), B: (m, r), s = alpha / r.

The efficient single-pass variant (docs/methods.md, "EFlat-LoRA"). Between steps the model sits at the perturbed
point (B + E_ema, A). One optimizer step t = step + 1:

1. one forward/backward over all micro-batches at (B + E_ema, A) -> (gB, gA) (accumulated, 1 pass);
2. per adapted layer, the full-weight gradient estimate from the LoRA gradients by pseudo-inverses:
       G_hat = 0.5 * [(1/s) gB pinv(A^T) + (1/s) pinv(B'^T) gA],   B' = B + E_ema
   (B' is the B the gradient was taken at, so both terms are exact where the pinv is a true inverse);
   while the unperturbed B is (near) zero (||B||_F < 1e-12, e.g. at t = 1 with B = 0) the second term
   carries no information and only the first is used, without the 0.5;
3. E_W = rho_t * G_hat / ||G_hat||, ||.|| global over layers (``normalize="global"``, default) or per
   layer (``"per_layer"``); rho_t = rho / sqrt(t) (``rho_schedule="inv_sqrt"``, Theorem 2) or rho;
4. E_B = (1/s) E_W pinv(A)  (the perturbation is moved onto B; E_A = 0, A is never perturbed);
5. restore B (exact copy of the saved unperturbed B, not "-= E_ema", which would round), then
   ``clip_and_step`` with (gB, gA): the update is applied from the unperturbed point;
6. E_ema = (1 - beta) E_ema + beta E_B; at t = 1 E_ema = E_B, from that step's ordinary gradient
   (the model is unperturbed at t = 1), as the paper says;
7. B += E_ema (the next step's perturbed point), except after the final step (step + 1 == max_steps):
   training ends at the unperturbed B, so evaluation, export and merge see the real adapter.

Implementation: G_hat is never formed. The norms ||G_hat_l||_F and the products G_hat_l pinv(A) are
computed from QR factors and r x r products only (O((m + n) r^2) per layer, no m x n tensor), in
fp32 (float64 inputs stay float64). Pseudo-inverses use ``torch.linalg.pinv`` (SVD) instead of the
paper's Householder QR: the same matrices, and r is small.
``full_grad_estimate`` forms the dense G_hat for tests and diagnostics.

Decisions (docs/methods.md, "EFlat-LoRA"; all ours):
- The printed rho * sign(g) * g / ||g|| is read as a typo: E_W = rho_t * G_hat / ||G_hat||.
- beta = 0.9 is a PLACEHOLDER: the paper does not publish beta; 0.9 is the default of the one public
  re-implementation [S].
- Normalisation is global over layers by default (as SAM); ``per_layer`` mirrors that re-implementation.
- s is the real alpha / r of each layer (the re-implementation hard-codes 0.5).
- Gradient clipping (``max_grad_norm``) covers the primary parameters only and happens after the
  perturbation was computed from the unclipped gradient.

Method state (checkpointed): E_ema per layer and, while the model is perturbed, the exact unperturbed
B per layer, so a resumed run is bit-identical. Extra memory: 2 m x r tensors per layer.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ContextManager, Iterator

import torch
from peft import PeftModel

from bilora import adapters
from bilora.layers import work_dtype
from bilora.methods.method import Method, StepContext, register
from bilora.perturbation import Perturbation
from bilora.config import EFlatLoraConfig

ZERO_B = 1e-12  # ||B||_F below this: B is treated as zero and only the first term of G_hat is used
EPS = 1e-12


def full_grad_estimate(
    A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, s: float, *, second_term: bool = True
) -> torch.Tensor:
    """Dense G_hat (m, n) = 0.5 [(1/s) gB pinv(A^T) + (1/s) pinv(B^T) gA] (first term alone if not ``second_term``).

    A: (r, n), B: (m, r), gA = dL/dA, gB = dL/dB taken at (B, A). Computed in at least fp32.
    """
    dt = work_dtype(A.dtype)
    A, B, gA, gB = (t.detach().to(dt) for t in (A, B, gA, gB))
    first = gB @ torch.linalg.pinv(A.T) / s
    if not second_term:
        return first
    return 0.5 * (first + torch.linalg.pinv(B.T) @ gA / s)


def factored_estimate(
    A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, s: float, *, second_term: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(||G_hat||_F^2, G_hat pinv(A)) without forming the (m, n) G_hat: O((m + n) r^2) work, no m x n tensor.

    With Ai = pinv(A) (n, r) and Bi = pinv(B) (r, m), G_hat = U V with U = [gB, Bi^T] (m, 2r) and
    V = [c1 Ai^T; c2 gA] (2r, n) (first blocks only without the second term). The norm is
    ||R_U R_V^T||_F with R_U, R_V the R factors of U and V^T (QR is backward stable, so an
    ill-conditioned B, common right after the first Adam step, is not squared as in a Gram-matrix
    formula). G_hat pinv(A) = c1 gB (Ai^T Ai) + c2 Bi^T (gA Ai).
    """
    dt = work_dtype(A.dtype)
    A, B, gA, gB = (t.detach().to(dt) for t in (A, B, gA, gB))
    Ai = torch.linalg.pinv(A)  # (n, r)
    c1 = (0.5 if second_term else 1.0) / s
    g_pinv_a = c1 * (gB @ (Ai.T @ Ai))  # (m, r)
    if second_term:
        c2 = 0.5 / s
        Bi = torch.linalg.pinv(B)  # (r, m)
        g_pinv_a = g_pinv_a + c2 * (Bi.T @ (gA @ Ai))
        U, V = torch.cat([gB, Bi.T], dim=1), torch.cat([c1 * Ai.T, c2 * gA], dim=0)
    else:
        U, V = gB, c1 * Ai.T
    r_u = torch.linalg.qr(U, mode="r").R
    r_v = torch.linalg.qr(V.T, mode="r").R
    return (r_u @ r_v.T).pow(2).sum(), g_pinv_a


@register("eflat_lora", config=EFlatLoraConfig)
class EFlatLoRA(Method):
    """EFMLoRA: one gradient per step at (B + E_ema, A); E_ema tracks the full-space SAM perturbation moved onto B."""

    perturbs = True
    notes = {
        "beta_note": "placeholder: unpublished in the paper; default of the public re-implementation",
        "perturbed": "B only (E_A = 0)",
        "scaling": "real s = alpha / r",
    }

    cfg: EFlatLoraConfig
    rho: float
    beta: float
    normalize: str
    rho_schedule: str

    def __init__(self, cfg: EFlatLoraConfig | None = None, *, seed: int = 0, **overrides: Any) -> None:
        super().__init__(cfg, seed=seed, **overrides)
        self.e_ema: dict[str, torch.Tensor] = {}  # layer name -> (m, r) fp32
        self.b_clean: dict[str, torch.Tensor] = {}  # layer name -> exact unperturbed B while applied
        self.applied = False  # is the model's B currently B + E_ema?

    # -- helpers ------------------------------------------------------------------------------
    def rho_at(self, t: int) -> float:
        """rho_t for the 1-based step t."""
        return self.cfg.rho / math.sqrt(t) if self.cfg.rho_schedule == "inv_sqrt" else self.cfg.rho

    @staticmethod
    def _layers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
        k = adapters.PRIMARY
        return [
            (name, layer.lora_A[k].weight, layer.lora_B[k].weight, float(layer.scaling[k]))
            for name, layer in adapters.adapter_layers(model, k)
        ]

    @torch.no_grad()
    def _restore(self, model: torch.nn.Module) -> None:
        for name, _, b, _ in self._layers(model):
            b.copy_(self.b_clean[name])
        self.b_clean = {}
        self.applied = False

    @torch.no_grad()
    def _apply(self, model: torch.nn.Module) -> None:
        self.b_clean = {}
        for name, _, b, _ in self._layers(model):
            self.b_clean[name] = b.detach().clone()
            b.add_(self.e_ema[name].to(b.dtype))
        self.applied = True

    @contextmanager
    def unperturbed(self, model: PeftModel) -> Iterator[PeftModel]:
        """Temporarily put the exact unperturbed B back (for evaluation or export mid-training)."""
        if not self.applied:
            yield model
            return
        layers = self._layers(model)
        perturbed = {name: b.detach().clone() for name, _, b, _ in layers}
        with torch.no_grad():
            for name, _, b, _ in layers:
                b.copy_(self.b_clean[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, _, b, _ in layers:
                    b.copy_(perturbed[name])

    # -- diagnostics (bilora.perturbation): clean = unperturbed B, perturbation = B + E_ema ----------------
    def clean(self, model: PeftModel) -> ContextManager[PeftModel]:
        return self.unperturbed(model)

    @contextmanager
    def perturbation(self, ctx: StepContext) -> Iterator[Perturbation | None]:
        """Inside :meth:`clean`: B + E_ema as the step trains at; delta_l = s (B_pert - B) A (n_out, n_in), rank <= r."""
        if not self.applied:
            yield None  # the first step (no E_ema yet) trains at the unperturbed point
            return
        layers = self._layers(ctx.model)
        deltas = {}
        with torch.no_grad():
            for name, a, b, s in layers:
                b.copy_(self.b_clean[name]).add_(self.e_ema[name].to(b.dtype))  # exactly what _apply does
                deltas[name] = s * ((b.detach().float() - self.b_clean[name].float()) @ a.detach().float())
        try:
            yield Perturbation(deltas, rank=min(a.shape[0] for _, a, _, _ in layers))
        finally:
            with torch.no_grad():
                for name, _, b, _ in layers:
                    b.copy_(self.b_clean[name])

    # -- the step -----------------------------------------------------------------------------
    def step(self, ctx: StepContext) -> dict[str, float]:
        layers = self._layers(ctx.model)
        loss = ctx.forward_backward()  # the only pass, at (B + E_ema, A)
        t = ctx.step + 1
        rho_t = self.rho_at(t)
        sq_norms: list[torch.Tensor] = []
        g_pinv_a: list[torch.Tensor] = []
        second = 0
        with torch.no_grad():
            for name, a, b, s in layers:
                ga = a.grad if a.grad is not None else torch.zeros_like(a)
                gb = b.grad if b.grad is not None else torch.zeros_like(b)
                b_unperturbed = self.b_clean[name] if self.applied else b
                use_second = bool(b_unperturbed.detach().float().norm() >= ZERO_B)
                second += int(use_second)
                sq, gpa = factored_estimate(a, b, ga, gb, s, second_term=use_second)  # b: the B' of the gradient
                sq_norms.append(sq)
                g_pinv_a.append(gpa)
            g_norm = torch.stack(sq_norms).sum().sqrt() if sq_norms else torch.zeros(())
            e_b: dict[str, torch.Tensor] = {}
            for (name, _, _, s), sq, gpa in zip(layers, sq_norms, g_pinv_a):
                denom = (sq.sqrt() if self.cfg.normalize == "per_layer" else g_norm) + EPS
                e_b[name] = (rho_t / denom) * gpa / s  # (1/s) E_W pinv(A), E_W = rho_t G_hat / ||G_hat||
        if self.applied:
            self._restore(ctx.model)  # update from the unperturbed point
        grad_norm = ctx.clip_and_step(adapters.primary_parameters(ctx.model), loss)
        with torch.no_grad():
            if not self.e_ema:
                self.e_ema = {name: e.float().clone() for name, e in e_b.items()}
            else:
                self.e_ema = {name: (1.0 - self.cfg.beta) * self.e_ema[name] + self.cfg.beta * e.float() for name, e in e_b.items()}
        if ctx.step + 1 < ctx.max_steps:
            self._apply(ctx.model)
        e_b_norm = torch.stack([e.float().pow(2).sum() for e in e_b.values()]).sum().sqrt() if e_b else torch.zeros(())
        e_ema_norm = torch.stack([e.pow(2).sum() for e in self.e_ema.values()]).sum().sqrt() if self.e_ema else torch.zeros(())
        return {
            "loss": loss,
            "grad_norm": grad_norm,
            "rho_t": rho_t,
            "g_hat_norm": float(g_norm),
            "e_b_norm": float(e_b_norm),
            "e_ema_norm": float(e_ema_norm),
            "two_term_layers": float(second),
        }

    # -- state and export -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "e_ema": {k: v.clone() for k, v in self.e_ema.items()},
            "b_clean": {k: v.clone() for k, v in self.b_clean.items()},
            "applied": self.applied,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.e_ema = {k: v.clone() for k, v in state.get("e_ema", {}).items()}
        self.b_clean = {k: v.clone() for k, v in state.get("b_clean", {}).items()}
        self.applied = bool(state.get("applied", False))
        if self.applied and not self.b_clean:
            raise ValueError("eflat_lora state says the model is perturbed but holds no unperturbed B")

    def export(self, model: PeftModel, out_dir: str | Path) -> None:
        """Write the primary adapter with the UNPERTURBED B (even if called mid-training)."""
        with self.unperturbed(model):
            adapters.save_primary(model, out_dir)
