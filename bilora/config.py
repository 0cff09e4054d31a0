"""The library's settings that ``params.yaml`` sets, declared once, in a module that imports no torch.

Each class is a frozen :class:`bilora.settings.Settings` dataclass whose fields carry their default, bounds
and help text (:func:`bilora.settings.setting`). The code that uses a class imports it from here:
:mod:`bilora.train` the loop's :class:`LoopConfig`, :mod:`bilora.adapters` the primary adapter's
:class:`LoraSpec`, :mod:`bilora.distributed` :class:`DistributedConfig`, and each ``bilora/methods/<key>.py``
its method's settings (registered with it: ``@register("bilora", config=BiLoRAConfig)``). They live here,
not beside that code, because the params schema (``pipeline/config/schema.py``) derives its sections from
them and every stage validates ``params.yaml``: declared in a torch-free module, they let the stages that
neither train nor evaluate (``configure``, ``prepare``, ``report``) start without importing torch,
transformers or peft (reports/stage_imports.md). The sharpness settings,
:class:`bilora.sharpness.config.SharpnessConfig`, are torch-free where they are.

:func:`method_settings` gives every method's settings class by key without importing the methods: the
built-in ones (:data:`BUILTIN_METHODS`) and every method registered so far (a plugin of
``train.plugins`` registers through :func:`bilora.methods.register`, which records it in :data:`REGISTERED`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from bilora.settings import Settings, internal, setting


@dataclass(frozen=True)
class LoopConfig(Settings):
    """Optimisation settings shared by every method (``train.loop`` in params.yaml).

    The single source of these defaults: the pipeline's schema is derived from these fields.
    """

    section: ClassVar[str] = "train.loop"

    epochs: float = setting(2.0, "Passes over the training subset.", gt=0)
    batch_size: int = setting(16, "Micro-batch size (examples).", ge=1)
    grad_accum: int = setting(1, "Micro-batches per optimizer step (effective batch = batch_size x grad_accum).", ge=1)
    lr: float = setting(5e-4, "Peak learning rate of the primary adapter (AdamW).", gt=0)
    weight_decay: float = setting(0.0, "AdamW weight decay of the primary adapter.", ge=0)
    warmup_ratio: float = setting(0.03, "Linear warm-up as a fraction of all steps, then cosine decay to 0.", ge=0, lt=1)
    max_grad_norm: float | None = setting(1.0, "Gradient-norm clip over primary parameters only (null: off).", gt=0)
    max_steps: int | None = setting(None, "Stop after this many optimizer steps (overrides epochs).", ge=1)
    log_every: int = setting(5, "Log step metrics to MLflow every N optimizer steps.", ge=1)
    checkpoint_every: int = setting(50, "Write a resumable checkpoint every N optimizer steps (0: never).", ge=0)
    gradient_checkpointing: bool = setting(
        False,
        "Recompute each decoder layer's activations in backward instead of storing them (transformers' gradient checkpointing; same gradients, less memory, ~1 more forward per step). Correct for every method.",
    )
    checkpoint_reentrant: bool = setting(
        False,
        "With gradient_checkpointing: use torch's reentrant checkpoint (enables input gradients on the embeddings, as PEFT does); false: the non-reentrant one torch recommends.",
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = setting(
        "adamw",
        "Primary optimizer: adamw (torch; fused on CUDA) or bitsandbytes adamw_8bit / paged_adamw_8bit / paged_adamw_32bit (paged falls back to unpaged on CPU). Bi-LoRA's auxiliary ascends on the same optimizer (gradient negated for bitsandbytes, which has no maximize).",
    )
    perturbation_every: int = setting(
        100,
        "Every N optimizer steps, measure how much the method's weight perturbation raises the loss and how it aligns with the full-weight gradient (bilora/perturbation.py, docs/perturbation.md); logged as perturbation.* (0: never). Methods that perturb nothing skip it. One measurement costs about 1.7 optimizer steps (measured), so about 1.7 % of training at 100 and 3.3 % at 50.",
        ge=0,
    )
    length_grouped: bool = setting(
        False, "Group each batch by example length (seeded, resumable; cuts padding on causal-LM data). Off: uniformly shuffled batches."
    )

    def steps_per_epoch(self, n_examples: int) -> int:
        micro = math.ceil(n_examples / self.batch_size)
        return math.ceil(micro / self.grad_accum)

    def total_steps(self, n_examples: int) -> int:
        if self.max_steps:
            return self.max_steps
        return max(1, math.ceil(self.epochs * self.steps_per_epoch(n_examples)))


@dataclass(frozen=True)
class LoraSpec(Settings):
    """Primary adapter, used by every method (``train.lora``); PEFT's ``LoraConfig`` is built from it
    (:func:`attach_lora`). It is also the whole configuration of the ``lora`` method, which adds nothing."""

    section: ClassVar[str] = "train.lora"
    r: int = setting(8, "Rank of the primary adapter (every method).", ge=1)
    alpha: float = setting(16.0, "LoRA alpha; scaling s = alpha / r.", gt=0)
    dropout: float = setting(0.0, "Dropout on the adapter input.", ge=0, lt=1)
    target_modules: tuple[str, ...] = setting(
        ("query", "key", "value", "dense"), "Module name suffixes that get adapters (MiniLM: query, key, value, dense).", min_len=1
    )
    modules_to_save: tuple[str, ...] = internal(
        (), "Modules trained in full next to the adapter: the task's format decides (a fresh head)."
    )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class DistributedConfig(Settings):
    """Data-parallel finetune (torchrun) (``train.distributed``); see docs/scaling.md."""

    section: ClassVar[str] = "train.distributed"
    nproc_per_node: int = setting(
        1,
        "Processes (GPUs) per machine for finetune: > 1 launches it under torchrun (data parallel, explicit gradient all-reduce; batch_size is the global micro-batch and must be divisible by it). Only rank 0 writes outputs, checkpoints and MLflow.",
        ge=1,
    )
    backend: Literal["auto", "gloo", "nccl"] = setting("auto", "torch.distributed backend: auto = nccl on CUDA, gloo on CPU.")


@dataclass(frozen=True)
class NoSettings(Settings):
    """A method without settings of its own (it has no ``train.<key>`` section)."""


@dataclass(frozen=True)
class LoraSamConfig(Settings):
    """LoRA-SAM settings."""

    section: ClassVar[str] = "train.lora_sam"
    rho: float = setting(0.01, "SAM radius on the LoRA A/B tensors (Bi-LoRA paper: 0.01 GLUE).", ge=0)


@dataclass(frozen=True)
class BiLoRAConfig(Settings):
    """Bi-LoRA settings."""

    section: ClassVar[str] = "train.bilora"
    rho: float = setting(0.05, "Radius of the global Frobenius ball of the auxiliary perturbation s2*B2*A2 (paper: 0.05 GLUE).", ge=0)
    aux_rank: int = setting(8, "Rank r2 of the auxiliary adapter.", ge=1)
    aux_alpha: float = setting(16.0, "Alpha of the auxiliary adapter (s2 = aux_alpha / aux_rank).", gt=0)
    aux_lr: float | None = setting(None, "Learning rate of the auxiliary ascent (null: same as train.loop.lr).", gt=0)
    fused: bool = setting(
        False,
        "Compute primary and auxiliary in one matmul pair per layer (A=[A1;A2], B=[s1*B1, s2*B2]); same result up to float32 rounding (<=1e-6 relative), each part keeps its own optimizer direction, the auxiliary is still dropped at export.",
    )


@dataclass(frozen=True)
class FlatLoraConfig(Settings):
    """Flat-LoRA (Li et al.) settings."""

    section: ClassVar[str] = "train.flat_lora"
    sigma: float = setting(0.05, "Relative std of the merged-weight noise (Flat-LoRA paper: 0.05); ramps up with a cosine schedule.", ge=0)


@dataclass(frozen=True)
class EFlatLoraConfig(Settings):
    """EFlat-LoRA (Deng et al.) settings.

    ``beta`` is in (0, 1]: with beta = 0 the EMA would keep the first step's perturbation forever
    (methods.md: E_ema <- (1 - beta) E_ema + beta E_B is an EMA of the per-step perturbation).
    """

    section: ClassVar[str] = "train.eflat_lora"
    rho: float = setting(0.05, "Full-weight SAM radius, transferred onto B.", ge=0)
    beta: float = setting(0.9, "EMA factor of the B perturbation (placeholder: unpublished).", gt=0, le=1)
    normalize: Literal["global", "per_layer"] = setting("global", "Normalise the estimated full gradient globally or per layer.")
    rho_schedule: Literal["inv_sqrt", "constant"] = setting("inv_sqrt", "rho_t = rho/sqrt(t) (paper Theorem 2) or constant.")


@dataclass(frozen=True)
class BilevelLoraConfig(Settings):
    """Bi-level BiLoRA (Qiang et al.) settings. Every value is our choice: the paper publishes none.

    ``upper_steps`` >= 1: the method alternates T1 lower and T2 upper iterations (methods.md §6.2);
    with T2 = 0 Λ would never train and the method would be LoRA on D1 only.
    """

    section: ClassVar[str] = "train.bilevel_lora"
    split_ratio: float = setting(
        0.8, "Fraction of train used by the lower level (D1); the rest (D2) trains Lambda. Our choice: unpublished.", gt=0, lt=1
    )
    lower_steps: int = setting(4, "Lower-level (P, Q) steps per cycle. Our choice.", ge=1)
    upper_steps: int = setting(1, "Upper-level (Lambda) steps per cycle. Our choice.", ge=1)
    gamma1: float = setting(0.1, "Weight of the orthogonality regulariser on P, Q. Our choice.", ge=0)
    gamma2: float = setting(0.0, "Weight of the L2 regulariser on Lambda. Our choice.", ge=0)
    upper_lr: float = setting(1e-3, "Learning rate of Lambda. Our choice.", gt=0)


#: The built-in methods: key -> settings class. ``bilora/methods/<key>.py`` implements each and registers it
#: with this class (``bilora/methods/__init__.py`` imports them all).
BUILTIN_METHODS: dict[str, type[Settings]] = {
    "bilevel_lora": BilevelLoraConfig,
    "bilora": BiLoRAConfig,
    "eflat_lora": EFlatLoraConfig,
    "flat_lora": FlatLoraConfig,
    "lora": NoSettings,
    "lora_sam": LoraSamConfig,
}

#: Every registered method: key -> its class (``bilora.methods.register`` fills it, each class carries its
#: ``config_class``). Held here, where nothing imports torch, so :func:`method_settings` can read it.
REGISTERED: dict[str, Any] = {}


def method_settings() -> dict[str, type[Settings]]:
    """Every method's settings class by key (sorted): the built-in ones, imported or not, and every method
    registered so far (a plugin of ``train.plugins`` once its module is imported)."""
    return dict(sorted((BUILTIN_METHODS | {k: cls.config_class for k, cls in REGISTERED.items()}).items()))


def method_module(name: str) -> str:
    """The module that implements method ``name`` (``bilora.methods.<key>`` for a built-in one); KeyError if unknown."""
    if name in REGISTERED:
        return REGISTERED[name].__module__
    if name in BUILTIN_METHODS:
        return f"bilora.methods.{name}"
    raise KeyError(f"unknown method {name!r}; available: {', '.join(method_settings())}")
