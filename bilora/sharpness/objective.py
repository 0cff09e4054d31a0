"""The loss on a fixed evaluation batch set (:class:`Objective`) and a task-metric ``eval_fn``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from bilora.evaluate import predict
from bilora.metrics import compute

BatchLoss = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
EvalFn = Callable[[torch.nn.Module], dict[str, float]]


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
