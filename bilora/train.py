"""A small, explicit training loop that bilora owns (in the spirit of torchtune's recipes).

The loop owns data order, the optimizer (AdamW), the warm-up + cosine schedule, logging
and checkpoints; a :class:`bilora.methods.Method` owns what happens inside one optimizer step.

Data order is a pure function of (seed, epoch): each epoch's permutation comes from a private
``torch.Generator`` seeded with ``seed * 1000003 + epoch``, so resuming at step k replays exactly
the batches an uninterrupted run would have seen, without storing the data loader.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from peft import PeftModel
from transformers import get_cosine_schedule_with_warmup

from bilora import checkpoint, distributed, perturbation, scale
from bilora.methods.method import Method, StepContext
from bilora.config import LoopConfig


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Permutation of range(n) for one epoch, from a private generator: (n,) int64."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=g)


#: Step metrics whose second-half median the summary reports: how much, and how well aimed, a perturbation is.
SUMMARY_METRICS = (
    "perturbation.loss_increase",
    "perturbation.relative_increase",
    "perturbation.alignment",
    "perturbation.vs_sam",
    "perturbation.rank_ceiling",
    "perturbation.norm",
    "aux.first_order_increase",
    "aux.relative_first_order_increase",
    "sam.loss_increase",
)


def second_half_medians(history: list[dict[str, float]], max_steps: int) -> dict[str, float]:
    """Median of each :data:`SUMMARY_METRICS` entry over the steps after ``max_steps / 2`` that logged it."""
    out = {}
    for key in SUMMARY_METRICS:
        values = [h[key] for h in history if key in h and h["step"] > max_steps / 2 and math.isfinite(h[key])]
        if values:
            out[key] = float(statistics.median(values))
    return out


class FineTuner:
    """Train ``model`` with ``method`` on ``dataset``; resumable from ``checkpoint_dir``.

    Args:
        model: a PEFT model with the primary adapter attached (the method may add more).
        method: the training method (``bilora.methods.build(name, cfg)``).
        dataset: indexable examples; ``collate(list_of_examples)`` turns them into a batch dict.
        loop: optimisation settings.
        seed: run seed (data order, method generators).
        checkpoint_dir: where resumable checkpoints live (``None``: never checkpoint).
        fingerprint: identity of the run; a checkpoint with another fingerprint is ignored.
        on_log: ``on_log(metrics, step)`` every ``log_every`` steps and at the end.
        on_step: ``on_step(step, max_steps)`` after every optimizer step (progress bars).
        autocast_dtype: autocast the forward passes to this dtype (``bilora.scale.autocast_dtype``
            from ``base.quant.compute_dtype``); None: no autocast (the CPU default).
        min_8bit_size: bitsandbytes optimizers keep 32-bit state below this many elements (tests).
    """

    def __init__(
        self,
        model: PeftModel,
        method: Method,
        dataset: Sequence[dict[str, Any]],
        collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
        loop: LoopConfig,
        *,
        seed: int = 0,
        checkpoint_dir: str | Path | None = None,
        fingerprint: str = "",
        on_log: Callable[[dict[str, float], int], None] | None = None,
        on_step: Callable[[int, int], None] | None = None,
        autocast_dtype: torch.dtype | None = None,
        min_8bit_size: int | None = None,
    ) -> None:
        self.model, self.method, self.dataset, self.collate, self.loop = model, method, dataset, collate, loop
        self.seed = seed
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.fingerprint = fingerprint
        self.on_log = on_log or (lambda m, s: None)
        self.on_step = on_step or (lambda s, t: None)
        self.method.split_train(len(dataset))
        self._check_world()
        self.method.bind_data(lambda indices: collate([dataset[i] for i in indices]), loop)
        self.kbit = scale.prepare_kbit(model, gradient_checkpointing=loop.gradient_checkpointing, use_reentrant=loop.checkpoint_reentrant)
        self.method.prepare(model)
        self.device_type = scale.model_device_type(model)
        self.autocast_dtype = autocast_dtype
        self.optimizer = scale.build_optimizer(
            method.param_groups(model, loop.lr, loop.weight_decay), loop.optimizer, lr=loop.lr, min_8bit_size=min_8bit_size
        )
        self._lengths: list[int] | None = None
        self.max_steps = loop.total_steps(self.n_train)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, math.ceil(loop.warmup_ratio * self.max_steps), self.max_steps)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.resumed_from: int | None = None
        self.resume_note = "no checkpoint"

    @property
    def n_train(self) -> int:
        return len(self._indices())

    def _check_world(self) -> None:
        """Under torch.distributed every rank needs an equal, non-empty slice of every micro-batch."""
        w = distributed.world_size()
        if w == 1:
            return
        if self.loop.batch_size % w:
            raise ValueError(
                f"train.loop.batch_size ({self.loop.batch_size}) is the global micro-batch and must be divisible by the "
                f"number of processes ({w}): use a multiple of {w}, or change train.distributed.nproc_per_node"
            )
        last = self.n_train % self.loop.batch_size
        if 0 < last < w:
            raise ValueError(
                f"the last micro-batch of each epoch has {last} example(s), fewer than the {w} processes: "
                f"make the training set size ({self.n_train}) a multiple of train.loop.batch_size ({self.loop.batch_size})"
            )

    # -- data ---------------------------------------------------------------------------
    def _indices(self) -> list[int]:
        idx = self.method.train_indices()
        return list(idx) if idx is not None else list(range(len(self.dataset)))

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of optimizer step ``step`` (0-based), a pure function of (seed, step).

        Under torch.distributed each rank gets its contiguous slice of every global micro-batch.
        """
        pool = self._indices()
        per_epoch = self.loop.steps_per_epoch(len(pool))
        epoch, within = divmod(step, per_epoch)
        order = epoch_order(len(pool), self.seed, epoch)
        if self.loop.length_grouped:
            lengths = self.lengths()
            order = torch.tensor(scale.length_grouped_order(order.tolist(), [lengths[i] for i in pool], self.loop.batch_size))
        out = []
        for k in range(self.loop.grad_accum):
            start = (within * self.loop.grad_accum + k) * self.loop.batch_size
            chunk = order[start : start + self.loop.batch_size].tolist()
            if chunk and distributed.active():
                chunk = chunk[distributed.rank_slice(len(chunk))]
            if chunk:
                out.append(self.collate([self.dataset[pool[i]] for i in chunk]))
        return out

    def lengths(self) -> list[int]:
        """Token length of every dataset example (``input_ids``), computed once."""
        if self._lengths is None:
            try:
                self._lengths = [len(self.dataset[i]["input_ids"]) for i in range(len(self.dataset))]
            except (KeyError, TypeError) as e:
                raise ValueError("train.loop.length_grouped needs examples with input_ids") from e
        return self._lengths

    def padding_fractions(self) -> dict[str, float] | None:
        """Padding fraction of epoch 0's batches, shuffled and length-grouped (None without input_ids)."""
        try:
            lengths = self.lengths()
        except ValueError:
            return None
        pool = self._indices()
        pl = [lengths[i] for i in pool]
        order = epoch_order(len(pool), self.seed, 0).tolist()
        grouped = scale.length_grouped_order(order, pl, self.loop.batch_size)
        return {
            "shuffled": scale.padding_fraction(order, pl, self.loop.batch_size),
            "length_grouped": scale.padding_fraction(grouped, pl, self.loop.batch_size),
        }

    # -- checkpoints ----------------------------------------------------------------------
    def _ckpt_path(self) -> Path | None:
        return self.checkpoint_dir / "last" if self.checkpoint_dir else None

    def save_checkpoint(self) -> None:
        path = self._ckpt_path()
        if path is None or not distributed.is_main():  # ranks hold identical state: rank 0 writes it
            return
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "method": self.method.state_dict(),
            "rng": checkpoint.rng_state(),
            "history": self.history,
        }
        meta = {
            "step": self.step,
            "max_steps": self.max_steps,
            "fingerprint": self.fingerprint,
            "method": self.method.name,
            "seed": self.seed,
        }
        checkpoint.save(path, self.model, state, meta)

    def try_resume(self) -> bool:
        """Resume from the last checkpoint if it belongs to this run; record why not otherwise."""
        path = self._ckpt_path()
        if path is None:
            self.resume_note = "checkpointing disabled"
            return False
        meta = checkpoint.read_meta(path)
        if meta is None:
            self.resume_note = "no checkpoint"
            return False
        if meta.get("fingerprint") != self.fingerprint:
            self.resume_note = "checkpoint belongs to a different run (params or data changed): starting fresh"
            if distributed.is_main():
                checkpoint.remove(path)
            return False
        state = checkpoint.load(path, self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method"])
        checkpoint.set_rng_state(state["rng"])
        self.history = list(state["history"])
        self.step = int(meta["step"])
        self.resumed_from = self.step
        self.resume_note = f"resumed from step {self.step}/{self.max_steps}"
        return True

    # -- training -------------------------------------------------------------------------
    def diagnose(self, ctx: StepContext) -> dict[str, float]:
        """The perturbation diagnostics (bilora.perturbation) on every ``perturbation_every``-th step of a
        perturbing method; timed apart from the step (``perturbation.seconds``), so step times stay comparable."""
        k = self.loop.perturbation_every
        if not (k and self.method.perturbs and (self.step + 1) % k == 0):
            return {}
        t0 = time.perf_counter()
        out = perturbation.measure(self.method, ctx)
        return {**out, "perturbation.seconds": time.perf_counter() - t0} if out else {}

    def train(self) -> dict[str, Any]:
        """Run (or finish) training; returns a summary."""
        self.model.train()
        t_start = time.perf_counter()
        while self.step < self.max_steps:
            ctx = StepContext(
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                micro_batches=self.micro_batches(self.step),
                step=self.step,
                max_steps=self.max_steps,
                max_grad_norm=self.loop.max_grad_norm,
                device_type=self.device_type,
                autocast_dtype=self.autocast_dtype,
            )
            diagnostics = self.diagnose(ctx)  # before the step: the perturbation this step trains at
            t0 = time.perf_counter()
            metrics = self.method.step(ctx)
            self.step += 1
            metrics.update(
                lr=self.scheduler.get_last_lr()[0],
                step_time=time.perf_counter() - t0,
                forward_passes=float(ctx.passes["forward"]),
                backward_passes=float(ctx.passes["backward"]),
                **diagnostics,
            )
            self.history.append({"step": float(self.step), **metrics})
            if self.step % max(1, self.loop.log_every) == 0 or self.step == self.max_steps or diagnostics:
                self.on_log(metrics, self.step)
            self.on_step(self.step, self.max_steps)
            if self.loop.checkpoint_every and self.step % self.loop.checkpoint_every == 0 and self.step < self.max_steps:
                self.save_checkpoint()
        self.model.eval()
        times = [h["step_time"] for h in self.history]
        diag_time = sum(h.get("perturbation.seconds", 0.0) for h in self.history)
        return {
            "method": self.method.name,
            "seed": self.seed,
            "steps": self.step,
            "n_train": self.n_train,
            "final_loss": self.history[-1]["loss"] if self.history else float("nan"),
            "median_step_time": float(torch.tensor(times).median()) if times else 0.0,
            "perturbation": second_half_medians(self.history, self.max_steps),
            "perturbation_time_fraction": diag_time / (sum(times) + diag_time) if times else 0.0,
            "wall_time_this_process": time.perf_counter() - t_start,
            "resumed_from": self.resumed_from,
            "loop": asdict(self.loop),
            "method_config": self.method.config(),
            "padding_fraction": self.padding_fractions(),
            "optimizer": scale.optimizer_info(self.optimizer),
            "kbit": self.kbit,
            "autocast": str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else "none",
        }
