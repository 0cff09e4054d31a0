"""The runs of reports/science/limited/PROTOCOL.md (second protocol: limited data), fixed before any sweep run.

The settings live in ``pipeline/presets/science_limited.yaml`` (a delta over params.yaml). This module adds
what a params file cannot say: the training sizes, the replicates and their data subsets, the fit phase
that fixes the step budget, and the run order. tests/test_science_limited.py checks that the preset
validates and that every run of the protocol resolves from it.

A replicate ``r`` at size ``N`` draws its training subset with ``data.split_seed = split_seed(N, r)``
(pipeline.data.prepare.split_indices: a seeded shuffle of the train file, the first ``val_rows(N)`` rows
held out as validation, the next ``N`` rows trained on) and trains with ``train.seeds = [r]``. Every arm of
that replicate gets the same two seeds, so the arms share the subset, the data order and the
initialisation, and differ only in the method: the differences are paired.
"""

from __future__ import annotations

from dataclasses import dataclass

PRESET = "science_limited"
# The code revision every run uses (PROTOCOL.md), by commit; the tag names it for humans.
CODE_REV = "6af5a6eb61270301dc8f692941f6da5e249e1213"  # the commit of PROTOCOL.md Revision 1; the tag science-limited-v1 names it
CODE_TAG = "science-limited-v1"
TASKS = ("stsb", "mrpc")  # STS-B primary, MRPC secondary
PRIMARY = {"mrpc": "accuracy", "stsb": "pearson"}
SIZES = (256, 1024)  # training examples per replicate
VAL_FRACTION = 0.2  # data.val_fraction: N / (1 - 0.2) rows drawn, a fifth of them held out as validation
ARMS = ("lora", "bilora", "bilora_rho0.5_auxlr10x")  # LoRA; Bi-LoRA at the paper's rho 0.05; the pilot's choice
CONTRASTS = tuple((t, a) for t in TASKS for a in ARMS[1:])  # the 4 primary contrasts (arm - LoRA, pooled over N)
REPLICATES = 8
# Smallest effect of interest, in the primary metric's units (PROTOCOL.md, "Calling an effect").
SESOI = {"stsb": 0.005, "mrpc": 0.008}
ALPHA = 0.05  # family-wise, Holm over CONTRASTS
# Fit phase: LoRA, replicate 0, N = 256; the budget is the smallest of these step counts at which the train
# subset is fitted on both tasks (FIT); the sweep refuses to start until the preset holds that budget.
FIT_STEPS = (100, 200, 400)
FIT = {"mrpc": 0.95, "stsb": 0.95}  # train accuracy (MRPC), train Pearson (STS-B)
FIT_SIZE = 256
ADAPTER_TASK = "mrpc"  # every replicate's adapter of every arm at both sizes is committed for this task


def val_rows(size: int) -> int:
    """Validation rows held out of the drawn rows (prepare: round(VAL_FRACTION * drawn))."""
    return round(VAL_FRACTION * drawn(size))


def drawn(size: int) -> int:
    """``data.train_subset``: rows drawn from the train file so that ``size`` remain for training."""
    return round(size / (1 - VAL_FRACTION))


def split_seed(size: int, replicate: int) -> int:
    """``data.split_seed`` of replicate ``replicate`` at ``size``: distinct per (size, replicate), so subsets at
    the two sizes are separate draws; readable as "size, then replicate" (256003 = N 256, replicate 3)."""
    return 1000 * size + replicate


@dataclass(frozen=True, order=True)
class Run:
    """One fine-tune + evaluation. ``steps`` is set for fit-phase runs only (the sweep's budget is the preset's)."""

    phase: str  # "fit" | "sweep"
    task: str
    method: str  # an arm
    size: int
    replicate: int
    steps: int | None = None

    @property
    def seed(self) -> int:
        """train.seeds = [replicate]: the training seed (initialisation, data order, dropout)."""
        return self.replicate

    @property
    def name(self) -> str:
        """The file stem under reports/science/limited/runs/."""
        base = f"{self.task}-n{self.size}-{self.method}-{self.replicate}"
        return f"fit-s{self.steps}-{base}" if self.phase == "fit" else base


def fit_runs() -> list[Run]:
    return [Run("fit", t, "lora", FIT_SIZE, 0, s) for s in FIT_STEPS for t in TASKS]


def sweep_runs() -> list[Run]:
    """Replicate-major order: an interrupted sweep has whole replicates (all arms, both sizes, both tasks)."""
    return [Run("sweep", t, a, n, r) for r in range(REPLICATES) for t in TASKS for n in SIZES for a in ARMS]
