"""Flat-LoRA (Li et al., arXiv 2409.14396, ICML 2025): Gaussian noise on the merged weight.

Flat-LoRA seeks flatness of the *merged* weight W' = W0 + s·BA by training on the expected loss
under random weight noise (randomised smoothing) instead of SAM's inner max. Every optimizer step
t (0-based) of T, every adapted linear layer l (fixed order of :func:`bilora.adapters.lora_layers`)
is perturbed with

    eps_l[i, j] ~ N(0, std_l[i]^2),   std_l[i] = f_t * sigma / sqrt(n_in) * ||W'_l[i, :]||_2
    f_t = 0.5 * (1 - cos(pi * t / T))                          (cosine ramp 0 -> 1, docs/methods.md)

and the gradient taken at W0 + eps + s·BA updates A and B only. One forward and one backward per
micro-batch (``passes_per_step = 1``); every micro-batch of a step sees the same eps.

How the noise is applied (docs/methods.md, "Flat-LoRA"):

* the row norms are computed once per step under ``no_grad`` on dequant(W0) + s·BA (m floats per layer);
* eps is drawn from a private ``torch.Generator`` seeded by a hash of (run seed, step, layer index):
  never wall-clock, never the global RNG, identical on every DDP rank;
* the base layer's forward is ONE matmul with a temporary ``W_eff = dequant(W0) + eps``
  (:class:`NoisyLinear`); eps is regenerated from the seed in backward instead of being stored,
  so no full-size tensor lives across forward and backward;
* the frozen base weight is never written: noise is not added in place (the reference code's
  in-place add/subtract drifts on bf16 and is impossible on 4-bit weights), so this works on
  plain ``nn.Linear`` bases and on bitsandbytes nf4 ``Linear4bit`` bases alike;
* the noisy forward is installed on each base layer only for the duration of the step's
  forward/backward passes and removed afterwards, so evaluation and export see the clean model.

The LoRA branch is computed by PEFT as usual on top of the noisy base output. At f_t = 0 (the
first step) or sigma = 0 nothing is installed and the step equals a plain LoRA step bit for bit.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from peft import PeftModel

from bilora import adapters
from bilora.layers import (
    base_linear,
    check_base,
    compute_dtype,
    dequantized_weight,
    forwards_replaced,
    layer_noise,
    merged_row_norms,
    stream_seed,
)
from bilora.methods.method import Method, StepContext, register
from bilora.perturbation import Perturbation
from bilora.config import FlatLoraConfig


def schedule_factor(step: int, max_steps: int) -> float:
    """Cosine ramp f = 0.5 * (1 - cos(pi * step / max_steps)): 0 at step 0, 0.5 halfway, 1 at the end."""
    if max_steps <= 0:
        return 1.0
    return 0.5 * (1.0 - math.cos(math.pi * step / max_steps))


def noise_seed(run_seed: int, step: int, layer: int) -> int:
    """A 63-bit generator seed from (run seed, optimizer step, layer index); a pure function of its inputs."""
    return stream_seed("flat_lora", run_seed, step, layer)


def effective_weight(base: torch.nn.Module, std_rows: torch.Tensor, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Temporary W_eff = dequant(W0) + eps in ``dtype`` (noise added in float32, rounded once)."""
    w = dequantized_weight(base)
    eps = layer_noise(seed, std_rows, w.shape[1])
    w_eff = eps.add_(w)  # reuse eps's buffer: one full-size float32 temporary
    return w_eff if w_eff.dtype == dtype else w_eff.to(dtype)


class NoisyLinear(torch.autograd.Function):
    """y = F.linear(x, dequant(W0) + eps, bias) as ONE matmul; eps regenerated from ``seed`` in backward.

    Saves only ``std_rows`` (m floats) for backward, never eps, W_eff or x. The frozen base weight
    gets no gradient; a trainable base bias (unusual with LoRA) does.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, std_rows: torch.Tensor, seed: int, base: torch.nn.Module
    ) -> torch.Tensor:
        cd = compute_dtype(base, x.dtype)
        w_eff = effective_weight(base, std_rows, seed, cd)  # (m, n_in), temporary
        out = base_linear(base, x, w_eff, bias)  # (..., n_in) -> (..., m), one matmul, in x's dtype
        del w_eff
        ctx.save_for_backward(std_rows)
        ctx.seed, ctx.base, ctx.cd, ctx.x_dtype = seed, base, cd, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            (std_rows,) = ctx.saved_tensors
            w_eff = effective_weight(ctx.base, std_rows, ctx.seed, ctx.cd)  # same seed -> the same eps
            grad_x = (grad_out.to(ctx.cd) @ w_eff).to(ctx.x_dtype)  # (..., m) @ (m, n_in) -> (..., n_in)
            del w_eff
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None, None


def noisy_forward(base: torch.nn.Module, std_rows: torch.Tensor, seed: int):
    """A replacement ``forward`` for ``base`` that runs :class:`NoisyLinear`."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return NoisyLinear.apply(x, base.bias, std_rows, seed, base)

    return forward


def noisy_layers(model: torch.nn.Module, adapter: str = adapters.PRIMARY) -> list[torch.nn.Module]:
    """The adapted layers that receive noise, in the fixed order that defines the layer index."""
    return [layer for _, layer in adapters.adapter_layers(model, adapter)]


@contextmanager
def flat_noise(
    model: torch.nn.Module, sigma_t: float, run_seed: int, step: int, adapter: str = adapters.PRIMARY
) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """Install the step's noise on every adapted layer's base for the duration of the block.

    ``sigma_t`` is the scheduled sigma (f_t * sigma). Yields [(seed, std_rows)] per layer (for tests
    and diagnostics). Nothing is installed when ``sigma_t == 0``. The base layers' own forwards are
    restored on exit, also on error.
    """
    layers = noisy_layers(model, adapter)
    pairs: list[tuple[torch.nn.Module, Any]] = []
    info: list[tuple[int, torch.Tensor]] = []
    if sigma_t != 0.0:
        for index, layer in enumerate(layers):
            base = layer.get_base_layer()
            check_base(base)
            n_in = base.in_features
            std_rows = merged_row_norms(layer, adapter).mul_(sigma_t / math.sqrt(n_in))  # (m,)
            seed = noise_seed(run_seed, step, index)
            pairs.append((base, noisy_forward(base, std_rows, seed)))
            info.append((seed, std_rows))
    with forwards_replaced(pairs):
        yield info


@register("flat_lora", config=FlatLoraConfig)
class FlatLoRA(Method):
    """Flat-LoRA: train A, B at W0 + eps + s·BA with per-row Gaussian eps ramped by a cosine schedule."""

    passes_per_step = 1
    perturbs = True
    notes = {"schedule": "cosine_ramp_per_optimizer_step", "noise": "per_row_merged_weight"}
    cfg: FlatLoraConfig
    sigma: float

    def prepare(self, model: PeftModel) -> None:
        layers = noisy_layers(model)
        if not layers:
            raise ValueError("flat_lora: the model has no LoRA layers")
        for layer in layers:
            check_base(layer.get_base_layer())

    def step(self, ctx: StepContext) -> dict[str, float]:
        factor = schedule_factor(ctx.step, ctx.max_steps)
        sigma_t = factor * self.cfg.sigma
        with flat_noise(ctx.model, sigma_t, self.seed, ctx.step):
            loss = ctx.forward_backward()  # every micro-batch of the step sees the same eps
        grad_norm = ctx.clip_and_step(adapters.primary_parameters(ctx.model), loss)
        return {"loss": loss, "grad_norm": grad_norm, "noise_factor": factor, "noise_sigma": sigma_t}

    @contextmanager
    def perturbation(self, ctx: StepContext) -> Iterator[Perturbation | None]:
        """This step's noise, installed as the step installs it; delta_l = eps_l (n_out, n_in), full rank."""
        sigma_t = schedule_factor(ctx.step, ctx.max_steps) * self.cfg.sigma
        if sigma_t == 0.0:
            yield None
            return
        named = adapters.adapter_layers(ctx.model)
        with flat_noise(ctx.model, sigma_t, self.seed, ctx.step) as info:
            deltas = {
                name: layer_noise(seed, std_rows, layer.get_base_layer().in_features)
                for (name, layer), (seed, std_rows) in zip(named, info)
            }
            yield Perturbation(deltas, rank=None)

    def config(self) -> dict[str, Any]:
        return super().config() | {"seed": self.seed}
