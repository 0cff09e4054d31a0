"""The runs of reports/science/PROTOCOL.md, fixed before any result was seen.

The settings live in ``pipeline/presets/science.yaml`` (a delta over params.yaml, like every preset);
this module adds what a params file cannot say: how many seeds each compared run gets, the learning
rates tried in the tuning phase, and the order the sweep runs in. tests/test_science.py checks that
the preset validates and that its matrix covers every run listed here.
"""

from __future__ import annotations

from dataclasses import dataclass

PRESET = "science"
# The one code revision every run uses (PROTOCOL.md, Revision 1), by commit: a fresh clone may lack the tag
# ``science-v2`` that names it (``git tag science-v2 <CODE_REV>`` restores it), the commit is always there.
CODE_REV = "761ed48655349396e97415794359792cb1c38231"
CODE_TAG = "science-v2"
TASKS = ("mrpc", "stsb")  # Revision 3: STS-B replaces RTE, which failed the learnability rule in the tuning runs
REPLACED = {"rte": "stsb"}
PRIMARY = {"mrpc": "accuracy", "rte": "accuracy", "stsb": "pearson"}  # the primary test metric per task
MAJORITY = {"mrpc": 0.6838, "rte": 0.5271}  # majority-class test accuracy: MRPC dev 279/408 positive, RTE dev 146/277 entailment
# Learnability rule: LoRA's primary test metric must reach this. Classification: the majority class + 5 points;
# STS-B (regression, no majority class): Pearson 0.70, far above the 0 of an unlearned head (Revision 3).
THRESHOLD = {
    "mrpc": (MAJORITY["mrpc"] + 0.05, "majority class + 5 points"),
    "rte": (MAJORITY["rte"] + 0.05, "majority class + 5 points"),
    "stsb": (0.70, "Pearson 0.70"),
}
SEEDS = {"lora": 5, "bilora": 5, "bilora_rho0.5": 5, "lora_sam": 3, "flat_lora": 3}  # compared runs -> seeds 0..n-1
LR_GRID = (2.0e-4, 5.0e-4, 1.0e-3, 2.0e-3)  # LoRA, seed 0, chosen on the validation split (mean over the tasks)
TUNE_SEED = 0
RADII = (0.05, 0.1, 0.2, 0.5)  # global Frobenius radii of eval.sharpness.ball_radii (the preset holds them)
ADAPTERS = ("lora", "bilora", "bilora_rho0.5")  # MRPC adapters committed under reports/science/adapters/


@dataclass(frozen=True, order=True)
class Run:
    """One fine-tune + evaluation of the protocol. ``lr`` is set for tuning runs only."""

    phase: str  # "tune" | "sweep"
    task: str
    method: str
    seed: int
    lr: float | None = None

    @property
    def name(self) -> str:
        """The file stem under reports/science/runs/."""
        base = f"{self.task}-{self.method}-{self.seed}"
        return f"tune-lr{self.lr:g}-{base}" if self.phase == "tune" else base


def tune_runs() -> list[Run]:
    return [Run("tune", t, "lora", TUNE_SEED, lr) for lr in LR_GRID for t in TASKS]


def sweep_runs() -> list[Run]:
    """Seed-major order: an interrupted sweep has balanced seeds across methods and tasks."""
    top = max(SEEDS.values())
    return [Run("sweep", t, m, s) for s in range(top) for t in TASKS for m in SEEDS if s < SEEDS[m]]
