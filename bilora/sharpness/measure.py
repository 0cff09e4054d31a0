"""Random sharpness, the gradient attack, 1-D loss curves, and :func:`measure`: all of them (with the ball
measurements of :mod:`bilora.sharpness.ball`) and their cost. Overview and conventions: :mod:`bilora.sharpness`."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Sequence

import torch

from bilora import layers as base_layers
from bilora.sharpness import ball
from bilora.sharpness.config import SharpnessConfig
from bilora.sharpness.objective import EvalFn, Objective
from bilora.sharpness.result import SharpnessResult, summary
from bilora.sharpness.space import (
    Direction,
    check_space,
    global_norm,
    lora_tensors,
    measuring,
    perturbation,
    primary_layers,
    random_direction,
    requires_grad_only,
    shifted_forward,
    space_dim,
)


# -- the measurements ---------------------------------------------------------------------------
def gradient_direction(model: torch.nn.Module, space: str, objective: Objective) -> tuple[Direction, float, float]:
    """(∇L/‖∇L‖, ‖∇L‖, L) at the current θ; the norm is global over the space's tensors.

    full: ∇ w.r.t. the merged weight W' of each adapted layer (dL/dW' = dL/d(delta) at a zero
    delta added to dequant(W0) in the base forward), dense (out, in) per layer;
    lora: ∇ w.r.t. A and B. A zero gradient gives a zero direction (and norm 0).
    """
    check_space(space)
    with measuring(model):
        if space == "full":
            layers = primary_layers(model)
            bases = [layer.get_base_layer() for layer in layers]
            leaves = []
            for base in bases:
                base_layers.check_base(base)
                w0 = base_layers.dequantized_weight(base)  # only for its shape, dtype and device
                leaves.append(
                    torch.zeros(w0.shape, dtype=base_layers.work_dtype(w0.dtype), device=w0.device, requires_grad=True)
                )  # (out, in)
                del w0
            forwards = [shifted_forward(b, (lambda w0, leaf=leaf: leaf.to(w0.device)), False) for b, leaf in zip(bases, leaves)]
            with base_layers.forwards_replaced(zip(bases, forwards)), requires_grad_only(model, []):
                loss, grads = objective.grad(model, leaves)
        else:
            params = lora_tensors(model)
            with requires_grad_only(model, params):
                loss, grads = objective.grad(model, params)
    norm = global_norm(grads)
    parts = [g.detach().div_(norm) if norm > 0 else g.detach() for g in grads]
    return Direction(space, parts), norm, loss


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
    check_space(space)
    with measuring(model):
        l0 = objective.value(model) if base_loss is None else base_loss
        values: dict[float, list[float]] = {t: [] for t in radii}
        for k in range(n_directions):
            d = random_direction(model, space, seed, k)
            for t in radii:
                with perturbation(model, d, t):
                    values[t].append(objective.value(model) - l0)
    return {"base_loss": l0, "radii": [{"radius": t, **summary(values[t])} for t in radii] if n_directions else []}


def attack_curve(
    model: torch.nn.Module,
    objective: Objective,
    space: str,
    alphas: Sequence[float],
    eval_fn: EvalFn | None = None,
    base: tuple[float, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Loss and task metrics at θ + α·∇L/‖∇L‖ for each α (gradient taken once, at θ).

    α = 0 is θ itself: with ``base`` = (L(θ), ``eval_fn``(θ)), already computed by the same objective and
    ``eval_fn``, that point takes them and costs no pass (the weights are restored exactly from a copy
    after every perturbation, so the result is the same). Returns {"grad_norm": ‖∇L‖, "base_loss": L(θ),
    "points": [{"alpha", "loss", "metrics"}]} (metrics is {} without ``eval_fn``).
    """
    with measuring(model):
        d, gnorm, l0 = gradient_direction(model, space, objective)
        points = []
        for a in alphas:
            if a == 0 and base is not None:
                points.append({"alpha": a, "loss": base[0], "metrics": dict(base[1])})
                continue
            with perturbation(model, d, a):
                points.append({"alpha": a, "loss": objective.value(model), "metrics": eval_fn(model) if eval_fn else {}})
    return {"grad_norm": gnorm, "base_loss": l0, "points": points}


def loss_curve_1d(
    model: torch.nn.Module,
    objective: Objective,
    space: str,
    points: Sequence[float],
    seed: int = 0,
    index: int = 0,
    base_loss: float | None = None,
) -> list[tuple[float, float]]:
    """[(t, loss(W + t·d))] along random filter-normalised direction ``index`` (Li et al. 2018); t = 0 is
    ``base_loss`` when given (L(W) by the same objective, already computed: no pass)."""
    with measuring(model):
        d = random_direction(model, space, seed, index)
        out = []
        for t in points:
            if t == 0 and base_loss is not None:
                out.append((t, base_loss))
                continue
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
                        "curve": [[t, loss], ...], "ball": bilora.sharpness.ball.ball_sharpness(...) (only with ball_radii),
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
    with measuring(model):
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
            res["attack"] = (
                attack_curve(model, counted, space, cfg.attack_alphas, ev, (l0, out["base"]["metrics"])) if cfg.attack_alphas else None
            )  # type: ignore[arg-type]
            cost["attack_s"] = time.perf_counter() - t
            t = time.perf_counter()
            curve = (
                loss_curve_1d(model, counted, space, [c * cfg.curve_radius for c in cfg.curve_grid], cfg.seed, base_loss=l0)
                if cfg.curve_points
                else []
            )  # type: ignore[arg-type]
            res["curve"] = [[p, v] for p, v in curve]
            cost["curve_s"] = time.perf_counter() - t
            if cfg.ball_radii:
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
