"""Sharpness of a trained adapter: random perturbations, a worst-case attack and 1-D loss curves.

Everything is measured on a fixed evaluation batch set (an :class:`Objective`) with the Bi-LoRA
auxiliary discarded (:func:`bilora.adapters.primary_only`), in eval mode, in two weight spaces
(docs/methods.md, "Sharpness"):

* ``"full"``: the merged weights W' = dequant(W0) + s·B@A of the adapted linear layers, one
  (out, in) tensor per layer in :func:`bilora.adapters.lora_layers` order. Embeddings, norms, biases
  and the head are excluded. A perturbation W' + t·d is applied by a temporary forward on each base
  layer computing ``F.linear(x, dequant(W0) + t·d, bias)``; PEFT adds the LoRA branch s·B@A·x on top.
  The frozen base (nn.Linear or bitsandbytes nf4/fp4 ``Linear4bit``) is never written.
* ``"lora"``: the primary adapter's factors only, [A_0 (r, in), B_0 (out, r), A_1, B_1, ...]. A
  perturbation is added to A, B in place and undone by copying the saved tensors back (bit exact).

Three measurements (the issue "sharpness"):

1. :func:`random_sharpness`: loss(W + t·d) − loss(W) over K random filter-normalised directions d
   at several radii t; mean, sample std (ddof=1), min, max and the values.
2. :func:`attack_curve`: loss and task metrics after θ ← θ + α·∇L/‖∇L‖ (the norm global over
   all tensors of the space) for a list of α.
3. :func:`loss_curve_1d`: loss(W + t·d) along one random filter-normalised direction
   (Li et al. 2018), t on a grid; it is the 1-D slice along random direction 0 of (1).

Filter normalisation (Li et al. 2018), one output row per filter: a Gaussian g is rescaled row by
row, d_i = g_i·‖W_i‖/‖g_i‖, so ‖d_i‖ = ‖W_i‖ for the tensor W it perturbs (W' in the full space, A
or B in the LoRA space); t = 0.01 moves every row by 1 % of its norm.

Determinism: every random direction comes from private generators seeded by a hash of (seed,
space, direction index, tensor index), never from the global RNG, so equal seeds give identical
numbers on the same device. Full-space random directions are never stored: only m row scales per
layer are kept and the Gaussian is regenerated from its seed inside the forward (as Flat-LoRA
does), so memory stays O(out) per layer. The gradient direction of the full space is a dense
(out, in) tensor per layer (the gradient is that big), in float32 (float64 for float64 bases).

Every function leaves the model bit-identical: parameters, buffers, 4-bit quant states, grads
(gradients are taken with ``torch.autograd.grad``, never accumulated into ``.grad``),
requires_grad flags, train/eval mode, active adapters and the global RNG. bitsandbytes' CPU
inference repacking of 4-bit weights (eval mode + no grad on AVX512-BF16 CPUs) is switched off for
the duration, as it would rewrite the weights.

Precision: by default (``dtype="float64"``) everything is measured on a float64 dense copy of the
model (:func:`bilora.layers.dense_copy`: dequant(W0) is exact, so it is the same function). In
float32 a loss difference at t = 0.01 is ~1e-3 and its spread over directions ~1e-5, so float32
summation noise (~1e-7 relative per loss, and dependent on the CPU's vector width) moves the
spread by percents; in float64 the figures are the same on every CPU class. ``dtype="model"``
measures the model as it is (float32 on the fp32 path), at ~half the time and no extra memory.

A perturbation with scale 0 installs nothing, so t = 0 / α = 0 is exactly the unperturbed model.

Cost: :func:`measure` reports wall-clock seconds and the number of loss evaluations (passes over
the batch set), gradient passes and metric evaluations per part and space.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Literal, Sequence, Union

import torch

from bilora import adapters
from bilora.evaluate import predict
from bilora import layers as base_layers
from bilora.metrics import compute
from bilora.sharpness_result import SharpnessResult
from bilora.settings import Settings, setting

SPACES = ("full", "lora")
DTYPES = ("float64", "model")

BatchLoss = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
EvalFn = Callable[[torch.nn.Module], dict[str, float]]


# -- configuration ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SharpnessConfig(Settings):
    """What :func:`measure` computes (``eval.sharpness`` in params.yaml; the single source of these
    defaults, which are the light settings of the default run). An empty tuple, ``n_directions=0``
    or ``curve_points=0`` skips that part."""

    section: ClassVar[str] = "eval.sharpness"

    spaces: tuple[Literal["full", "lora"], ...] = setting(SPACES, "full: merged W0 + s*BA of adapted layers; lora: A, B only.", min_len=1)
    radii: tuple[float, ...] = setting(
        (0.01, 0.05), "Radii of random filter-normalised perturbations (fraction of each row norm).", items={"ge": 0}
    )
    n_directions: int = setting(2, "Random directions per radius and space (0: skip random sharpness).", ge=0)
    attack_alphas: tuple[float, ...] = setting(
        (0.0, 1.0, 2.5), "Step sizes alpha of the worst-case attack theta + alpha*grad/||grad|| (empty: skip).", items={"ge": 0}
    )
    curve_points: int = setting(7, "Points of the 1-D loss curve on [-curve_radius, curve_radius] (0: skip).", ge=0)
    curve_radius: float = setting(0.1, "Half-width of the 1-D loss curve along a random filter-normalised direction.", gt=0)
    ball_radii: tuple[float, ...] = setting(
        (),
        "Global radii r of the ball measurements (bilora.ball): the absolute norm sqrt(sum_l ||eps_l||_F^2) over the space's tensors, the scale of Bi-LoRA's and SAM's rho. Per r: one-step attack r*g/||g||, projected multi-step attack, random directions of global norm r (empty: skip).",
        items={"ge": 0},
    )
    ball_steps: int = setting(10, "Gradient steps per restart of the projected attack in the ball.", ge=1)
    ball_restarts: int = setting(
        1,
        "Restarts of the projected attack: the first starts at the one-step point, the others at seeded random points on the sphere.",
        ge=1,
    )
    ball_step_size: float = setting(0.25, "Projected-attack step eta as a fraction of the radius: eps <- proj(eps + eta*r*g/||g||).", gt=0)
    ball_directions: int = setting(
        0, "Random directions u of global norm 1 per ball radius, each scored antithetically: (L(+r*u) + L(-r*u))/2 - L (0: none).", ge=0
    )
    seed: int = setting(0, "Seed of the random directions (same seed => same numbers).")
    dtype: Literal["float64", "model"] = setting(
        "float64",
        "float64: measure on a float64 dense copy of the adapted model (exact dequantized base; figures independent of the CPU class; ~2x the time of float32, 8 bytes per parameter). model: measure the model as it is (float32 fp32-path kernels on CPU): cheaper, but small-radius figures carry float32 summation noise of a few percent.",
    )

    @property
    def curve_grid(self) -> tuple[float, ...]:
        """The 1-D curve's t values as multiples of ``curve_radius``: ``curve_points`` evenly spaced on [-1, 1]."""
        n = self.curve_points
        return tuple(-1.0 + 2.0 * i / (n - 1) for i in range(n)) if n > 1 else ((0.0,) if n == 1 else ())


# -- the loss on a fixed batch set --------------------------------------------------------------
def _batch_size(batch: dict[str, Any]) -> int:
    if "labels" in batch:
        return int(len(batch["labels"]))
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("sharpness: cannot tell the batch size (no tensor in the batch)")


def hf_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own mean loss on one batch (``model(**batch).loss``; the batch holds ``labels``)."""
    device = next(model.parameters()).device
    return model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}).loss


@dataclass
class Objective:
    """L(θ) = Σ_b w_b · loss_b(θ) over a fixed list of batches, w_b = n_b / Σ n (n_b examples in batch b).

    With per-batch mean losses this is the mean over examples. ``batch_loss(model, batch)`` returns
    a scalar tensor (default :func:`hf_loss`).
    """

    batches: Sequence[dict[str, torch.Tensor]]
    batch_loss: BatchLoss = hf_loss
    weights: list[float] = field(init=False)

    def __post_init__(self) -> None:
        if not self.batches:
            raise ValueError("sharpness: the evaluation batch set is empty")
        sizes = [_batch_size(b) for b in self.batches]
        total = float(sum(sizes))
        self.weights = [n / total for n in sizes]

    @classmethod
    def from_dataset(
        cls,
        dataset: Sequence[dict[str, Any]],
        collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
        batch_size: int = 64,
        batch_loss: BatchLoss = hf_loss,
    ) -> "Objective":
        """Collate ``dataset`` once, in order, into fixed batches."""
        n = len(dataset)
        batches = [collate([dataset[i] for i in range(s, min(n, s + batch_size))]) for s in range(0, n, batch_size)]
        return cls(batches, batch_loss)

    @torch.no_grad()
    def value(self, model: torch.nn.Module) -> float:
        """L(θ) as a Python float (accumulated in float64)."""
        return math.fsum(w * float(self.batch_loss(model, b)) for w, b in zip(self.weights, self.batches))

    def grad(self, model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        """(L(θ), [dL/dx for x in inputs]); batch by batch with ``torch.autograd.grad`` (no ``.grad`` is written)."""
        grads: list[torch.Tensor | None] = [None] * len(inputs)
        total = []
        with torch.enable_grad():
            for w, b in zip(self.weights, self.batches):
                loss = self.batch_loss(model, b) * w
                total.append(float(loss.detach()))
                gs = torch.autograd.grad(loss, list(inputs), allow_unused=True)
                for i, g in enumerate(gs):
                    if g is not None:
                        grads[i] = g if grads[i] is None else grads[i].add_(g)
        out = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
        return math.fsum(total), out


def task_eval(
    dataset: Sequence[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    metric_names: Sequence[str],
    batch_size: int = 64,
) -> EvalFn:
    """An ``eval_fn`` for classification/regression heads: :func:`bilora.evaluate.predict` + :func:`bilora.metrics.compute`."""

    def run(model: torch.nn.Module) -> dict[str, float]:
        preds, labels, _ = predict(model, dataset, collate, batch_size=batch_size)
        return compute(metric_names, preds, labels)

    return run


# -- the two spaces -----------------------------------------------------------------------------
def _layers(model: torch.nn.Module, adapter: str = adapters.PRIMARY) -> list[torch.nn.Module]:
    layers = [layer for _, layer in adapters.adapter_layers(model, adapter)]
    if not layers:
        raise ValueError("sharpness: the model has no LoRA layers for the primary adapter")
    for layer in layers:
        if getattr(layer, "merged", False):
            raise ValueError("sharpness: an adapter is merged into the base weights; unmerge it first")
        if getattr(layer, "use_dora", {}).get(adapter, False):
            raise NotImplementedError("sharpness: DoRA layers are not supported")
    return layers


def lora_tensors(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The LoRA space: [A_0 (r, in), B_0 (out, r), A_1, B_1, ...] of the primary adapter."""
    _layers(model)
    return adapters.adapter_parameters(model, adapters.PRIMARY)


def space_dim(model: torch.nn.Module, space: str) -> int:
    """Number of coordinates of the space: Σ out·in over adapted layers (full) or Σ |A| + |B| (lora)."""
    _check_space(space)
    if space == "full":
        return sum(layer.get_base_layer().out_features * layer.get_base_layer().in_features for layer in _layers(model))
    return sum(p.numel() for p in lora_tensors(model))


def _check_space(space: str) -> None:
    if space not in SPACES:
        raise ValueError(f"sharpness: unknown space {space!r}; known: {SPACES}")


# -- directions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeededRows:
    """A full-space direction component stored as a seed: d[i, :] = row_scale[i] · g[i, :], g ~ N(0, 1)^(out, in).

    g is :func:`bilora.layers.layer_noise` of ``seed`` (a private generator on
    ``row_scale``'s device), regenerated whenever it is needed.
    """

    seed: int
    row_scale: torch.Tensor  # (out,) float32
    n_in: int

    def materialize(self, scale: float = 1.0) -> torch.Tensor:
        """scale · d as a dense (out, in) float32 tensor (computed as g · (scale · row_scale))."""
        return base_layers.layer_noise(self.seed, self.row_scale * scale, self.n_in)


Part = Union[torch.Tensor, SeededRows]


@dataclass
class Direction:
    """A direction in one space: ``parts`` aligned with the space's tensors (full: (out, in) per layer; lora: A, B per layer)."""

    space: str
    parts: list[Part]

    def dense(self) -> list[torch.Tensor]:
        """Every part as a dense tensor (seeded parts are generated: full-size memory)."""
        return [p.materialize() if isinstance(p, SeededRows) else p for p in self.parts]

    def norm(self) -> float:
        """Global L2 norm over all parts."""
        return math.sqrt(math.fsum(float(p.double().pow(2).sum()) for p in self.dense()))


def direction_seed(seed: int, space: str, index: int, part: int) -> int:
    """A 63-bit generator seed for (seed, space, direction index, tensor index); a pure function of its inputs."""
    return base_layers.stream_seed("sharpness", seed, space, index, part)


def random_direction(model: torch.nn.Module, space: str, seed: int = 0, index: int = 0) -> Direction:
    """Random filter-normalised direction number ``index``: each row d_i has the norm of the row W_i it perturbs.

    full: W = merged dequant(W0) + s·B@A per adapted layer, parts are :class:`SeededRows`;
    lora: W = A or B, parts are dense tensors in the factor's dtype (at least float32).
    A zero row of W gets a zero direction row.
    """
    _check_space(space)
    parts: list[Part] = []
    with torch.no_grad():
        if space == "full":
            for i, layer in enumerate(_layers(model)):
                base = layer.get_base_layer()
                base_layers.check_base(base)
                w_norm = base_layers.merged_row_norms(layer, adapters.PRIMARY)  # (out,) float32
                s = direction_seed(seed, space, index, i)
                g_norm = base_layers.layer_noise(s, torch.ones_like(w_norm), base.in_features).norm(dim=1)  # (out,)
                parts.append(SeededRows(s, w_norm / g_norm, base.in_features))
        else:
            for i, p in enumerate(lora_tensors(model)):
                w = p.detach().to(base_layers.work_dtype(p.dtype))
                g = base_layers.layer_noise(direction_seed(seed, space, index, i), torch.ones(w.shape[0], device=w.device), w.shape[1]).to(
                    w.dtype
                )
                parts.append(g.mul_((w.norm(dim=1) / g.norm(dim=1))[:, None]))  # (rows, cols)
    return Direction(space, parts)


# -- applying a perturbation --------------------------------------------------------------------
def _shifted_forward(base: torch.nn.Module, delta_fn: Callable[[torch.Tensor], torch.Tensor], fresh: bool):
    """A replacement ``forward`` for ``base``: F.linear(x, dequant(W0) + delta, bias), one matmul.

    ``delta_fn(w0)`` returns delta (out, in) in w0's work dtype; ``fresh`` says it is a new tensor
    that may be overwritten (then W0 is added in place: one full-size temporary).
    """

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        w0 = base_layers.dequantized_weight(base)  # (out, in); a fresh copy for 4-bit bases, never written
        delta = delta_fn(w0)
        w_eff = delta.add_(w0) if fresh else delta + w0  # (out, in) = dequant(W0) + t·d
        return base_layers.base_linear(base, x, w_eff, base.bias)  # (..., in) -> (..., out)

    return forward


def _delta_fn(part: Part, scale: float) -> tuple[Callable[[torch.Tensor], torch.Tensor], bool]:
    if isinstance(part, SeededRows):
        return (lambda w0: part.materialize(scale).to(device=w0.device, dtype=base_layers.work_dtype(w0.dtype))), True
    return (lambda w0: part.to(device=w0.device, dtype=base_layers.work_dtype(w0.dtype)) * scale), True


@contextmanager
def perturbation(model: torch.nn.Module, direction: Direction, scale: float) -> Iterator[None]:
    """Evaluate the model at θ + scale·direction inside the block; the model is bit-identical afterwards.

    full: each adapted base layer runs F.linear(x, dequant(W0) + scale·d_l, bias) (the LoRA branch
    is added by PEFT), so the merged weight is W' + scale·d_l; nothing is written.
    lora: A, B += scale·d in place, restored by copying the saved tensors back.
    scale == 0 installs nothing.
    """
    _check_space(direction.space)
    if scale == 0.0:
        yield
        return
    if direction.space == "full":
        layers = _layers(model)
        if len(layers) != len(direction.parts):
            raise ValueError(f"sharpness: direction has {len(direction.parts)} parts for {len(layers)} layers")
        bases = [layer.get_base_layer() for layer in layers]
        forwards = []
        for base, part in zip(bases, direction.parts):
            base_layers.check_base(base)
            fn, fresh = _delta_fn(part, scale)
            forwards.append(_shifted_forward(base, fn, fresh))
        with base_layers.forwards_replaced(zip(bases, forwards)):
            yield
        return
    params = lora_tensors(model)
    if len(params) != len(direction.parts):
        raise ValueError(f"sharpness: direction has {len(direction.parts)} parts for {len(params)} LoRA tensors")
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, d in zip(params, direction.parts):
                p.add_(d.to(device=p.device, dtype=p.dtype), alpha=scale)
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


# -- measurement context ------------------------------------------------------------------------
@contextmanager
def _requires_grad_only(model: torch.nn.Module, keep: Sequence[torch.Tensor]) -> Iterator[None]:
    ids = {id(t) for t in keep}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in ids)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def _measuring(model: torch.nn.Module) -> Iterator[None]:
    """Primary adapter only, eval mode, 4-bit layers on the dequantize (fp32 path) kernel; all undone on exit."""
    modes = [(m, m.training) for m in model.modules()]
    primary = adapters.primary_only(model) if hasattr(getattr(model, "base_model", None), "active_adapters") else nullcontext()
    try:
        with base_layers.fp32_kernel(model), primary:
            model.eval()
            yield
    finally:
        for m, mode in modes:
            m.training = mode


# -- the measurements ---------------------------------------------------------------------------
def gradient_direction(model: torch.nn.Module, space: str, objective: Objective) -> tuple[Direction, float, float]:
    """(∇L/‖∇L‖, ‖∇L‖, L) at the current θ; the norm is global over the space's tensors.

    full: ∇ w.r.t. the merged weight W' of each adapted layer (dL/dW' = dL/d(delta) at a zero
    delta added to dequant(W0) in the base forward), dense (out, in) per layer;
    lora: ∇ w.r.t. A and B. A zero gradient gives a zero direction (and norm 0).
    """
    _check_space(space)
    with _measuring(model):
        if space == "full":
            layers = _layers(model)
            bases = [layer.get_base_layer() for layer in layers]
            leaves = []
            for base in bases:
                base_layers.check_base(base)
                w0 = base_layers.dequantized_weight(base)  # only for its shape, dtype and device
                leaves.append(
                    torch.zeros(w0.shape, dtype=base_layers.work_dtype(w0.dtype), device=w0.device, requires_grad=True)
                )  # (out, in)
                del w0
            forwards = [_shifted_forward(b, (lambda w0, leaf=leaf: leaf.to(w0.device)), False) for b, leaf in zip(bases, leaves)]
            with base_layers.forwards_replaced(zip(bases, forwards)), _requires_grad_only(model, []):
                loss, grads = objective.grad(model, leaves)
        else:
            params = lora_tensors(model)
            with _requires_grad_only(model, params):
                loss, grads = objective.grad(model, params)
    norm = math.sqrt(math.fsum(float(g.double().pow(2).sum()) for g in grads))
    parts = [g.detach().div_(norm) if norm > 0 else g.detach() for g in grads]
    return Direction(space, parts), norm, loss


def _summary(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "values": list(values)}


def random_sharpness(
    model: torch.nn.Module,
    objective: Objective,
    space: str,
    radii: Sequence[float],
    n_directions: int,
    seed: int = 0,
    base_loss: float | None = None,
) -> dict[str, Any]:
    """loss(W + t·d_k) − loss(W) for K random filter-normalised directions d_k (k = 0..K-1) and each t.

    Returns {"base_loss": L(W), "radii": [{"radius": t, "mean", "std" (ddof=1; 0 for K=1), "min",
    "max", "values": [K floats, direction order]}]}.
    """
    _check_space(space)
    with _measuring(model):
        l0 = objective.value(model) if base_loss is None else base_loss
        values: dict[float, list[float]] = {t: [] for t in radii}
        for k in range(n_directions):
            d = random_direction(model, space, seed, k)
            for t in radii:
                with perturbation(model, d, t):
                    values[t].append(objective.value(model) - l0)
    return {"base_loss": l0, "radii": [{"radius": t, **_summary(values[t])} for t in radii] if n_directions else []}


def attack_curve(
    model: torch.nn.Module, objective: Objective, space: str, alphas: Sequence[float], eval_fn: EvalFn | None = None
) -> dict[str, Any]:
    """Loss and task metrics at θ + α·∇L/‖∇L‖ for each α (gradient taken once, at θ).

    Returns {"grad_norm": ‖∇L‖, "base_loss": L(θ), "points": [{"alpha", "loss", "metrics"}]}
    (metrics is {} without ``eval_fn``).
    """
    with _measuring(model):
        d, gnorm, l0 = gradient_direction(model, space, objective)
        points = []
        for a in alphas:
            with perturbation(model, d, a):
                points.append({"alpha": a, "loss": objective.value(model), "metrics": eval_fn(model) if eval_fn else {}})
    return {"grad_norm": gnorm, "base_loss": l0, "points": points}


def loss_curve_1d(
    model: torch.nn.Module, objective: Objective, space: str, points: Sequence[float], seed: int = 0, index: int = 0
) -> list[tuple[float, float]]:
    """[(t, loss(W + t·d))] along random filter-normalised direction ``index`` (Li et al. 2018)."""
    with _measuring(model):
        d = random_direction(model, space, seed, index)
        out = []
        for t in points:
            with perturbation(model, d, t):
                out.append((t, objective.value(model)))
    return out


class _Counted:
    """Counts loss evaluations and gradient passes of an objective (for the cost report)."""

    def __init__(self, inner: Objective) -> None:
        self.inner, self.values, self.grads = inner, 0, 0

    def value(self, model: torch.nn.Module) -> float:
        self.values += 1
        return self.inner.value(model)

    def grad(self, model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        self.grads += 1
        return self.inner.grad(model, inputs)


def measure(
    model: torch.nn.Module, objective: Objective, cfg: SharpnessConfig = SharpnessConfig(), eval_fn: EvalFn | None = None
) -> SharpnessResult:
    """All three measurements in each space of ``cfg``, with their cost, as a :class:`SharpnessResult`.

    Its ``to_dict()`` (JSON-serialisable) is {"config": cfg, "base": {"loss", "metrics"},
     "spaces": {space: {"dim", "random": random_sharpness(...), "attack": attack_curve(...),
                        "curve": [[t, loss], ...], "ball": bilora.ball.ball_sharpness(...) (only with ball_radii),
                        "cost": {"random_s", "attack_s", "curve_s", "ball_s" (with ball_radii),
                        "loss_evals", "grad_passes", "metric_evals"}}},
     "cost": {"total_s", "loss_evals", "grad_passes", "metric_evals"}}
    A "loss_eval" is one pass of the model over the batch set; a "grad_pass" a forward+backward pass.
    """
    start = time.perf_counter()
    counted = _Counted(objective)
    metric_evals = 0

    def counted_eval(m: torch.nn.Module) -> dict[str, float]:
        nonlocal metric_evals
        metric_evals += 1
        return eval_fn(m)  # type: ignore[misc]

    ev = counted_eval if eval_fn is not None else None
    out: dict[str, Any] = {
        "config": asdict(cfg) | {"curve_points": cfg.curve_grid},
        "spaces": {},
    }  # the grid, as before curve_points was a count
    if cfg.dtype == "float64":
        model = base_layers.dense_copy(model, torch.float64)
    with _measuring(model):
        l0 = counted.value(model)
        out["base"] = {"loss": l0, "metrics": ev(model) if ev else {}}
        for space in cfg.spaces:
            before = (counted.values, counted.grads, metric_evals)
            res: dict[str, Any] = {"dim": space_dim(model, space)}
            cost: dict[str, Any] = {}
            t = time.perf_counter()
            res["random"] = random_sharpness(model, counted, space, cfg.radii, cfg.n_directions, cfg.seed, base_loss=l0)  # type: ignore[arg-type]
            cost["random_s"] = time.perf_counter() - t
            t = time.perf_counter()
            res["attack"] = attack_curve(model, counted, space, cfg.attack_alphas, ev) if cfg.attack_alphas else None  # type: ignore[arg-type]
            cost["attack_s"] = time.perf_counter() - t
            t = time.perf_counter()
            curve = (
                loss_curve_1d(model, counted, space, [c * cfg.curve_radius for c in cfg.curve_grid], cfg.seed) if cfg.curve_points else []
            )  # type: ignore[arg-type]
            res["curve"] = [[p, v] for p, v in curve]
            cost["curve_s"] = time.perf_counter() - t
            if cfg.ball_radii:
                from bilora import ball  # bilora.ball builds on this module

                t = time.perf_counter()
                res["ball"] = ball.ball_sharpness(
                    model,
                    counted,
                    space,
                    cfg.ball_radii,
                    cfg.ball_steps,
                    cfg.ball_restarts,
                    cfg.ball_step_size,
                    cfg.ball_directions,
                    cfg.seed,
                    l0,
                )  # type: ignore[arg-type]
                cost["ball_s"] = time.perf_counter() - t
            cost["loss_evals"] = counted.values - before[0]
            cost["grad_passes"] = counted.grads - before[1]
            cost["metric_evals"] = metric_evals - before[2]
            res["cost"] = cost
            out["spaces"][space] = res
    out["cost"] = {
        "total_s": time.perf_counter() - start,
        "loss_evals": counted.values,
        "grad_passes": counted.grads,
        "metric_evals": metric_evals,
    }
    return SharpnessResult.from_dict(out)
