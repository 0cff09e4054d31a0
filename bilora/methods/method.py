"""The one small interface every training method implements, and the registry that picks it by name.

A method plugs into :class:`bilora.train.FineTuner` at the optimizer-step boundary:

* ``prepare(model)``: modify the PEFT model before the optimizer exists (add adapters, hooks).
* ``param_groups(model, lr, weight_decay)``: the optimizer's parameter groups.
* ``step(ctx)``: one optimizer step on ``ctx.micro_batches`` (forward/backward passes, update).
* ``state_dict()`` / ``load_state_dict()``: method state a checkpoint must hold (EMA, phase, ...).
* ``export(model, out_dir)``: write the deliverable, a plain PEFT LoRA adapter.
* ``split_train(n)`` / ``train_indices()``: which of the n training examples the loop draws from
  (default: all); ``bind_data(fetch, loop)``: a way to collate batches of the method's own choosing
  (bi-level: its D2 split). Both default to no-ops.

Each method registers under its key together with its settings class, a frozen
:class:`bilora.settings.Settings` dataclass (a plugin's in its own file; the built-in methods' in
:mod:`bilora.config`, which imports no torch, so the params schema loads without the training stack)::

    @dataclass(frozen=True)
    class ToyConfig(Settings):
        section: ClassVar[str] = "train.toy"
        scale: float = setting(1.0, "What it scales.", ge=0)

    @register("toy", config=ToyConfig)
    class Toy(Method): ...

The method reads its settings from ``self.cfg`` (``self.cfg.scale``): one declaration, no copies.
``pipeline/config/sections.py`` derives the ``train.<key>`` section of ``params.yaml`` from the config class,
which :func:`register` records where :func:`bilora.config.method_settings` reads it without importing torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Iterator, Sequence

import torch
from peft import PeftModel

from bilora import adapters, distributed, scale
from bilora.layers import grad_norm
from bilora.perturbation import Perturbation
from bilora.config import BUILTIN_METHODS, REGISTERED, NoSettings
from bilora.settings import Settings

_REGISTRY: dict[str, type["Method"]] = REGISTERED  # kept by bilora.config, so the params schema reads the settings torch-free


def register(name: str, *, config: type[Settings] = NoSettings) -> Callable[[type["Method"]], type["Method"]]:
    """Class decorator: make a method selectable as ``name``, with its settings class ``config``."""
    if not (dataclasses.is_dataclass(config) and issubclass(config, Settings)):
        raise TypeError(f"method {name!r}: config must be a Settings dataclass, got {config!r}")
    if BUILTIN_METHODS.get(name, config) is not config:
        raise ValueError(f"method {name!r} is built in, with {BUILTIN_METHODS[name].__name__} (bilora/config.py), not {config.__name__}")

    def deco(cls: type["Method"]) -> type["Method"]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} registered twice ({_REGISTRY[name].__module__} and {cls.__module__})")
        cls.name, cls.config_class = name, config
        _REGISTRY[name] = cls
        return cls

    return deco


def registry() -> dict[str, type["Method"]]:
    """Every registered method by key. The built-in ones are registered by ``bilora/methods/__init__.py``,
    which Python runs before this module (importing a submodule imports its package first)."""
    return dict(sorted(_REGISTRY.items()))


def available() -> list[str]:
    return list(registry())


def config_class(name: str) -> type[Settings]:
    """The settings class of the method registered as ``name``."""
    return _get(name).config_class


def _get(name: str) -> type["Method"]:
    reg = registry()
    if name not in reg:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(reg)}")
    return reg[name]


def build(name: str, cfg: Settings | dict[str, Any] | None = None, *, seed: int = 0) -> "Method":
    """Instantiate the method registered as ``name`` with its settings ``cfg``: its settings object, or a
    dict of field values over the defaults."""
    cls = _get(name)
    return cls(cfg if isinstance(cfg, Settings) else cls.config_class(**(cfg or {})), seed=seed)


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
    device_type: str = "cpu"
    autocast_dtype: torch.dtype | None = None  # bf16 autocast of the forward only (bilora.scale)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The forward pass, the only place autocast applies: whatever a method computes between
        passes (projections, perturbations, norms) runs outside it, in fp32."""
        self.passes["forward"] += 1
        with scale.autocast(self.device_type, self.autocast_dtype):
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
    config_class: ClassVar[type[Settings]] = NoSettings
    #: Forward+backward passes per micro-batch (documentation and tests).
    passes_per_step: ClassVar[int] = 1
    #: Does the method perturb the weights it takes its gradient at? (bilora.perturbation diagnostics)
    perturbs: ClassVar[bool] = False

    def __init__(self, cfg: Settings | None = None, *, seed: int = 0, **overrides: Any) -> None:
        """``cfg``: the method's settings (default: its config class's defaults); ``overrides``: field values."""
        cfg = self.config_class() if cfg is None else cfg
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{self.name}: expected {self.config_class.__name__}, got {type(cfg).__name__}")
        self.cfg = dataclasses.replace(cfg, **overrides) if overrides else cfg
        self.seed = seed

    def prepare(self, model: PeftModel) -> None:
        """Modify the model before the optimizer is built (default: nothing)."""

    def param_groups(self, model: PeftModel, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": adapters.primary_parameters(model), "lr": lr, "weight_decay": weight_decay, "name": "primary"}]

    def step(self, ctx: StepContext) -> dict[str, float]:
        loss = ctx.forward_backward()
        grad_norm = ctx.clip_and_step(adapters.primary_parameters(ctx.model), loss)
        return {"loss": loss, "grad_norm": grad_norm}

    def clean(self, model: PeftModel) -> ContextManager[None]:
        """Put ``model`` at its unperturbed point for the block (diagnostics); default: it is there."""
        del model
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def perturbation(self, ctx: StepContext) -> Iterator[Perturbation | None]:
        """Inside :meth:`clean`, after a clean backward (its gradients are on the parameters): apply the
        perturbation this step trains at, yield it (:class:`bilora.perturbation.Perturbation`), undo it
        on exit. Default: the method perturbs nothing (None)."""
        del ctx
        yield None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    #: Fixed facts about the method (not settings) written beside its settings in ``bilora_config.json``.
    notes: ClassVar[dict[str, str]] = {}

    def config(self) -> dict[str, Any]:
        """The method's settings (its settings dataclass, whole) and its notes, for ``bilora_config.json``."""
        return dataclasses.asdict(self.cfg) | dict(self.notes)

    def export(self, model: PeftModel, out_dir: str | Path) -> None:
        adapters.save_primary(model, out_dir)

    def split_train(self, n: int) -> None:
        """Called once with the training set size before anything else (bi-level splits it); default: nothing."""

    def train_indices(self) -> Sequence[int] | None:
        """Dataset indices the loop draws its batches from (None: all of them)."""
        return None

    def bind_data(self, fetch: Callable[[list[int]], dict[str, torch.Tensor]], loop: Any) -> None:
        """Called by the loop before ``prepare``: ``fetch(dataset_indices)`` returns a collated batch and
        ``loop`` (:class:`bilora.train.LoopConfig`) gives the batch sizes; default: unused."""
        del fetch, loop


Hook = Callable[..., Any]
