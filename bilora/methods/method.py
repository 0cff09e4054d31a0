"""The one small interface every training method implements, and the registry that picks it by name.

A method plugs into :class:`bilora.train.FineTuner` at the optimizer-step boundary:

* ``prepare(model)``: modify the PEFT model before the optimizer exists (add adapters, hooks).
* ``param_groups(model, lr, weight_decay)``: the optimizer's parameter groups.
* ``step(ctx)``: one optimizer step on ``ctx.micro_batches`` (forward/backward passes, update).
* ``state_dict()`` / ``load_state_dict()``: method state a checkpoint must hold (EMA, phase, ...).
* ``export(model, out_dir)``: write the deliverable, a plain PEFT LoRA adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from peft import PeftModel

from bilora import adapters, distributed
from bilora.layers import grad_norm

_REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method selectable by its ``name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    from bilora import methods as _  # noqa: F401  (importing the package registers every method)

    return sorted(_REGISTRY)


def build(name: str, cfg: dict[str, Any] | None = None, *, seed: int = 0) -> "Method":
    """Instantiate the method registered as ``name`` with its settings ``cfg``."""
    names = available()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(names)}")
    return _REGISTRY[name](**(cfg or {}), seed=seed)


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/Inf; raised before the optimizer touches the parameters."""


@dataclass
class StepContext:
    """Everything a method needs for one optimizer step."""

    model: PeftModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    micro_batches: list[dict[str, torch.Tensor]]
    step: int  # optimizer steps already taken (0-based index of this step)
    max_steps: int
    max_grad_norm: float | None
    passes: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.passes["forward"] += 1
        return self.model(**batch).loss

    def forward_backward(self, batches: list[dict[str, torch.Tensor]] | None = None) -> float:
        """Mean loss over micro-batches; gradients accumulate into ``.grad`` (scaled by 1/n_micro).

        Under torch.distributed (world size > 1) the gradients of the trainable parameters and the
        loss are then averaged over the ranks (:mod:`bilora.distributed`), so whatever the method
        does next (clip, perturb, ascend) sees the same all-reduced gradient on every rank.
        """
        batches = self.micro_batches if batches is None else batches
        total = None
        for batch in batches:
            loss = self.loss(batch) / len(batches)
            loss.backward()
            self.passes["backward"] += 1
            total = loss.detach() if total is None else total + loss.detach()
        if distributed.active():
            total = distributed.all_reduce_mean_([p for p in self.model.parameters() if p.requires_grad], total)
        return float(total) if total is not None else 0.0  # one host sync per step, not one per micro-batch

    def clip_and_step(self, clip_params: list[torch.nn.Parameter], loss: float) -> float:
        """Clip ``clip_params``' gradient norm, refuse non-finite values, then optimizer + scheduler step.

        The global norm is computed once and reused for the clip (``clip_grads_with_norm_``), which
        is what ``clip_grad_norm_`` does internally, without a second pass over the gradients.
        """
        grads = [p.grad for p in clip_params if p.grad is not None]
        norm = grad_norm(clip_params)
        if not (math.isfinite(loss) and bool(torch.isfinite(norm))):
            raise NonFiniteError(f"non-finite value at optimizer step {self.step + 1}: loss={loss}, grad_norm={norm.item()}")
        if self.max_grad_norm and grads:
            torch.nn.utils.clip_grads_with_norm_(grads, self.max_grad_norm, norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)


class Method:
    """Base class; plain LoRA behaviour. Subclasses override what they change."""

    name: ClassVar[str]
    #: Forward+backward passes per micro-batch (documentation and tests).
    passes_per_step: ClassVar[int] = 1

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed

    def prepare(self, model: PeftModel) -> None:
        """Modify the model before the optimizer is built (default: nothing)."""

    def param_groups(self, model: PeftModel, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": adapters.primary_parameters(model), "lr": lr, "weight_decay": weight_decay, "name": "primary"}]

    def step(self, ctx: StepContext) -> dict[str, float]:
        loss = ctx.forward_backward()
        grad_norm = ctx.clip_and_step(adapters.primary_parameters(ctx.model), loss)
        return {"loss": loss, "grad_norm": grad_norm}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def config(self) -> dict[str, Any]:
        """Method settings, written to ``bilora_config.json`` beside the adapter."""
        return {}

    def export(self, model: PeftModel, out_dir: str | Path) -> None:
        adapters.save_primary(model, out_dir)

    def split_train(self, n: int) -> None:
        """Hook for methods that partition the training set (bi-level); default: use all."""


Hook = Callable[..., Any]
