"""Batched prediction for classification/regression heads (the auxiliary adapter is never active here)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    dataset: Sequence[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    batch_size: int = 64,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (predictions (N,), labels (N,), logits (N, C)); argmax for C > 1, the raw score for C = 1."""
    model.eval()
    logits, labels = [], []
    n = len(dataset)
    for start in range(0, n, batch_size):
        batch = collate([dataset[i] for i in range(start, min(n, start + batch_size))])
        y = batch.pop("labels")
        out = model(**batch).logits.float()  # (B, C)
        logits.append(out.cpu())
        labels.append(y.cpu())
        if on_batch:
            on_batch(min(n, start + batch_size), n)
    if not logits:
        return np.zeros(0), np.zeros(0), np.zeros((0, 1))
    lg = torch.cat(logits).numpy()
    preds = lg[:, 0] if lg.shape[1] == 1 else lg.argmax(axis=1)
    return preds, torch.cat(labels).numpy(), lg
