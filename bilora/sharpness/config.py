"""What :func:`bilora.sharpness.measure.measure` computes: ``eval.sharpness`` in params.yaml (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from bilora.settings import Settings, setting

SPACES = ("full", "lora")
DTYPES = ("float64", "model")


@dataclass(frozen=True)
class SharpnessConfig(Settings):
    """What :func:`bilora.sharpness.measure.measure` computes (``eval.sharpness`` in params.yaml; the single source of these
    defaults, which are the light settings of the default run, chosen by bench/eval_budget.py: docs/flatness.md). An empty tuple, ``n_directions=0``
    or ``curve_points=0`` skips that part."""

    section: ClassVar[str] = "eval.sharpness"

    spaces: tuple[Literal["full", "lora"], ...] = setting(
        ("full",), "full: merged W0 + s*BA of adapted layers; lora: A, B only.", min_len=1
    )
    radii: tuple[float, ...] = setting(
        (0.05,), "Radii of random filter-normalised perturbations (fraction of each row norm).", items={"ge": 0}
    )
    n_directions: int = setting(2, "Random directions per radius and space (0: skip random sharpness).", ge=0)
    attack_alphas: tuple[float, ...] = setting(
        (0.0, 1.0), "Step sizes alpha of the worst-case attack theta + alpha*grad/||grad|| (empty: skip).", items={"ge": 0}
    )
    curve_points: int = setting(3, "Points of the 1-D loss curve on [-curve_radius, curve_radius] (0: skip).", ge=0)
    curve_radius: float = setting(0.1, "Half-width of the 1-D loss curve along a random filter-normalised direction.", gt=0)
    ball_radii: tuple[float, ...] = setting(
        (),
        "Global radii r of the ball measurements (bilora.sharpness.ball): the absolute norm sqrt(sum_l ||eps_l||_F^2) over the space's tensors, the scale of Bi-LoRA's and SAM's rho. Per r: one-step attack r*g/||g||, projected multi-step attack, random directions of global norm r (empty: skip).",
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
