"""What :func:`bilora.sharpness.measure.measure` returns: typed results that know their own headline.

The JSON form (:meth:`SharpnessResult.to_dict`, written to ``sharpness.json``) is the nested dict
documented on :func:`~bilora.sharpness.measure.measure`; :meth:`SharpnessResult.from_dict` reads it back.
:meth:`SharpnessResult.headline` gives the flat DVC metrics (``metrics/*.json`` ``sharpness``
section). Their key names (``full.random.r0.01.mean``, ``lora.attack.a2.5.accuracy``, ...) are
fixed: users' ``dvc metrics`` history depends on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def summary(values: list[float]) -> dict[str, Any]:
    """mean, sample std (ddof=1; 0 for one value), min, max and the values: the JSON form of :class:`RadiusStats` less its radius."""
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "values": list(values)}


@dataclass(frozen=True)
class RadiusStats:
    """loss(W + t·d_k) − loss(W) over the K random directions at one radius t."""

    radius: float
    mean: float
    std: float  # sample std (ddof=1); 0 for K = 1
    min: float
    max: float
    values: list[float]  # K values, direction order

    def to_dict(self) -> dict[str, Any]:
        return {"radius": self.radius, "mean": self.mean, "std": self.std, "min": self.min, "max": self.max, "values": list(self.values)}


@dataclass(frozen=True)
class RandomResult:
    base_loss: float
    radii: list[RadiusStats]  # in the order of the configured radii

    def largest(self) -> RadiusStats | None:
        """The statistics at the largest radius (the last such entry if a radius repeats); None if none."""
        return max(reversed(self.radii), key=lambda r: r.radius) if self.radii else None

    def to_dict(self) -> dict[str, Any]:
        return {"base_loss": self.base_loss, "radii": [r.to_dict() for r in self.radii]}


@dataclass(frozen=True)
class AttackPoint:
    alpha: float
    loss: float
    metrics: dict[str, float]  # {} when no task metric was evaluated

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "loss": self.loss, "metrics": dict(self.metrics)}


@dataclass(frozen=True)
class AttackResult:
    grad_norm: float
    base_loss: float
    points: list[AttackPoint]  # in the order of the configured alphas

    def largest(self) -> AttackPoint | None:
        """The point at the largest alpha (the last such point if an alpha repeats); None if none."""
        return max(reversed(self.points), key=lambda p: p.alpha) if self.points else None

    def to_dict(self) -> dict[str, Any]:
        return {"grad_norm": self.grad_norm, "base_loss": self.base_loss, "points": [p.to_dict() for p in self.points]}


@dataclass(frozen=True)
class BallPoint:
    """Loss increases at one global radius r (bilora.sharpness.ball): one-step attack, projected attack, random directions."""

    radius: float
    one_step: float
    pgd: float  # max over restarts and iterates, and at least one_step
    pgd_restarts: list[float]
    random: RadiusStats | None  # None without ball_directions

    def to_dict(self) -> dict[str, Any]:
        rnd = None if self.random is None else {k: v for k, v in self.random.to_dict().items() if k != "radius"}
        return {"radius": self.radius, "one_step": self.one_step, "pgd": self.pgd, "pgd_restarts": list(self.pgd_restarts), "random": rnd}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BallPoint":
        rnd = d.get("random")
        return cls(d["radius"], d["one_step"], d["pgd"], list(d["pgd_restarts"]), RadiusStats(d["radius"], **rnd) if rnd else None)


@dataclass(frozen=True)
class BallResult:
    base_loss: float
    grad_norm: float
    steps: int
    restarts: int
    step_size: float
    radii: list[BallPoint]

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_loss": self.base_loss,
            "grad_norm": self.grad_norm,
            "steps": self.steps,
            "restarts": self.restarts,
            "step_size": self.step_size,
            "radii": [r.to_dict() for r in self.radii],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BallResult":
        return cls(d["base_loss"], d["grad_norm"], d["steps"], d["restarts"], d["step_size"], [BallPoint.from_dict(r) for r in d["radii"]])


@dataclass(frozen=True)
class SpaceResult:
    """All measurements in one weight space ("full" or "lora")."""

    dim: int
    random: RandomResult
    attack: AttackResult | None  # None when no alphas were configured
    curve: list[list[float]]  # [[t, loss(W + t·d_0)], ...]
    cost: dict[str, float]  # random_s, attack_s, curve_s, (ball_s,) loss_evals, grad_passes, metric_evals
    ball: BallResult | None = None  # None without ball_radii

    def headline(self, space: str, main_metric: str) -> dict[str, float]:
        """Mean and std of random sharpness per radius; attack loss (and main metric, if measured) per alpha."""
        out: dict[str, float] = {}
        for r in self.random.radii:
            out[f"{space}.random.r{r.radius:g}.mean"] = r.mean
            out[f"{space}.random.r{r.radius:g}.std"] = r.std
        for pt in self.attack.points if self.attack else []:
            if main_metric in pt.metrics:
                out[f"{space}.attack.a{pt.alpha:g}.{main_metric}"] = pt.metrics[main_metric]
            out[f"{space}.attack.a{pt.alpha:g}.loss"] = pt.loss
        for b in self.ball.radii if self.ball else []:
            out[f"{space}.ball.r{b.radius:g}.pgd"] = b.pgd
            out[f"{space}.ball.r{b.radius:g}.one_step"] = b.one_step
            if b.random is not None:
                out[f"{space}.ball.r{b.radius:g}.random"] = b.random.mean
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "random": self.random.to_dict(),
            "attack": self.attack.to_dict() if self.attack else None,
            "curve": [list(c) for c in self.curve],
            "cost": dict(self.cost),
        } | ({"ball": self.ball.to_dict()} if self.ball else {})


@dataclass(frozen=True)
class SharpnessResult:
    config: dict[str, Any]  # the SharpnessConfig as a dict
    spaces: dict[str, SpaceResult]
    base: dict[str, Any]  # {"loss": L(θ), "metrics": {...}}
    cost: dict[str, float] = field(default_factory=dict)  # total_s, loss_evals, grad_passes, metric_evals

    @property
    def base_loss(self) -> float:
        return float(self.base["loss"])

    def headline(self, main_metric: str) -> dict[str, float]:
        """The flat DVC metrics: ``<space>.random.r<t>.mean|std`` per radius and
        ``<space>.attack.a<α>.<main_metric>|loss`` per alpha, ``<space>.ball.r<r>.pgd|one_step|random`` per ball radius. Timings stay out (they are in ``cost``)."""
        out: dict[str, float] = {}
        for space, res in self.spaces.items():
            out |= res.headline(space, main_metric)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (keys in the order ``sharpness.json`` has always had)."""
        return {
            "config": dict(self.config),
            "spaces": {s: r.to_dict() for s, r in self.spaces.items()},
            "base": dict(self.base),
            "cost": dict(self.cost),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SharpnessResult":
        spaces = {}
        for name, s in d["spaces"].items():
            rnd = RandomResult(s["random"]["base_loss"], [RadiusStats(**r) for r in s["random"]["radii"]])
            att = s.get("attack")
            attack = AttackResult(att["grad_norm"], att["base_loss"], [AttackPoint(**p) for p in att["points"]]) if att else None
            spaces[name] = SpaceResult(
                s["dim"],
                rnd,
                attack,
                [list(c) for c in s["curve"]],
                dict(s.get("cost", {})),
                BallResult.from_dict(s["ball"]) if s.get("ball") else None,
            )
        return cls(dict(d.get("config", {})), spaces, dict(d["base"]), dict(d.get("cost", {})))
