"""Prepared data: deterministic splits, tokenization, ``datasets`` on disk, and dynamic-padding batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, load_from_disk
from transformers import AutoTokenizer, DataCollatorWithPadding

from pipeline.config import DataConfig
from pipeline.tasks import DataError, TaskSpec


def split_indices(n: int, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """Seeded shuffle of range(n) -> (train, validation) index lists, disjoint.

    ``train_subset`` caps how many training-file rows are used at all; ``val_fraction`` of those
    are held out as validation.
    """
    g = torch.Generator().manual_seed(cfg.split_seed)
    perm = torch.randperm(n, generator=g).tolist()
    used = perm[: cfg.train_subset] if cfg.train_subset else perm
    n_val = round(cfg.val_fraction * len(used))
    return used[n_val:], used[:n_val]


def tokenize(examples: list[dict[str, Any]], tokenizer, max_length: int, regression: bool) -> Dataset:
    a = [e["text_a"] for e in examples]
    b = [e["text_b"] for e in examples] if examples and examples[0].get("text_b") is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length)
    cols = {k: enc[k] for k in enc.keys()}
    cols["labels"] = [float(e["label"]) if regression else int(e["label"]) for e in examples]
    return Dataset.from_dict(cols)


def tokenize_generation(task: TaskSpec, examples: list[dict[str, Any]], tokenizer, max_length: int) -> Dataset:
    """Causal-LM SFT rows (``bilora.causal``): ``input_ids``/``attention_mask``/``labels`` (prompt masked
    with -100) plus the raw ``question`` and gold ``answer`` kept for generation/log-likelihood evaluation."""
    from bilora import causal

    pairs = causal.gsm8k_pairs(examples) if task.name == "gsm8k" else causal.boolq_pairs(examples)
    rows = causal.sft_dataset(tokenizer, pairs, max_length)
    cols: dict[str, list] = {k: [r[k] for r in rows] for k in ("input_ids", "attention_mask", "labels")}
    cols["question"] = [e["question"] for e in examples]
    cols["answer"] = [e["answer"] for e in examples]
    if not rows:
        return Dataset.from_dict({k: [] for k in cols})
    return Dataset.from_dict(cols)


def prepare_task(task: TaskSpec, cfg: DataConfig, tokenizer) -> tuple[DatasetDict, dict[str, Any]]:
    raw = Path(cfg.raw_dir)
    train_rows = task.read(raw, "train")
    test_rows = task.read(raw, "test")
    if cfg.test_subset:
        test_rows = test_rows[: cfg.test_subset]
    tr, va = split_indices(len(train_rows), cfg)
    if not tr:
        raise DataError(f"{raw / task.train_file}: no training rows left after the validation split; lower data.val_fraction or raise data.train_subset")
    regression = task.kind == "regression"
    if task.kind == "generation":
        dd = DatasetDict(
            train=tokenize_generation(task, [train_rows[i] for i in tr], tokenizer, cfg.max_length),
            validation=tokenize_generation(task, [train_rows[i] for i in va], tokenizer, cfg.max_length),
            test=tokenize_generation(task, test_rows, tokenizer, cfg.max_length),
        )
    else:
        dd = DatasetDict(
            train=tokenize([train_rows[i] for i in tr], tokenizer, cfg.max_length, regression),
            validation=tokenize([train_rows[i] for i in va], tokenizer, cfg.max_length, regression) if va else tokenize([], tokenizer, cfg.max_length, regression),
            test=tokenize(test_rows, tokenizer, cfg.max_length, regression),
        )
    stats = {
        "task": task.name,
        "rows": {k: len(v) for k, v in dd.items()},
        "train_file_rows": len(train_rows),
        "mean_tokens": {k: (sum(len(x) for x in v["input_ids"]) / max(1, len(v))) for k, v in dd.items()},
        "truncated": {k: sum(len(x) >= cfg.max_length for x in v["input_ids"]) for k, v in dd.items()},
    }
    return dd, stats


def load_split(data_dir: str | Path, task: str, split: str) -> Dataset:
    return load_from_disk(str(Path(data_dir) / task))[split]


def collator_for(task: TaskSpec, tokenizer):
    """Training/loss batches for ``task``: :class:`bilora.causal.CausalCollator` (right padding) for
    generation tasks, :class:`Collator` otherwise."""
    if task.kind == "generation":
        from bilora.causal import CausalCollator, pad_id

        return CausalCollator(pad_id(tokenizer))
    return Collator(tokenizer)


class Collator:
    """Dynamic padding to the longest sequence of the batch: list[dict] -> dict of (B, L) tensors."""

    def __init__(self, tokenizer) -> None:
        self.inner = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return dict(self.inner(examples))


def tokenizer_for(base_dir: str | Path):
    return AutoTokenizer.from_pretrained(str(base_dir))
