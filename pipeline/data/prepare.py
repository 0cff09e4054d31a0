"""Prepared data: deterministic splits, tokenization, ``datasets`` on disk, and each task's collator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, load_from_disk
from transformers import AutoTokenizer

from pipeline.data import catalog, formats
from pipeline.config.schema import DataConfig
from pipeline.data.readers import DataError
from pipeline.data.task import TaskSpec


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
    """Classification/regression rows as the formats render them (kept for callers of the old API)."""
    fmt = formats.get("regression" if regression else "classification")
    return Dataset.from_dict(fmt.render(examples, tokenizer, {}, max_length)[0])


def prepare_task(task: TaskSpec, cfg: DataConfig, tokenizer) -> tuple[DatasetDict, dict[str, Any]]:
    """Read ``task``'s sources (pipeline.data.catalog), split, and render each split with its format."""
    fmt = formats.get(task.format)
    opts = catalog.options(task)
    train_rows, test_rows, meta = catalog.read_splits(task, cfg)
    if "labels" in meta:
        opts["labels"] = meta["labels"]
    if cfg.test_subset:
        test_rows = test_rows[: cfg.test_subset]
    tr, va = split_indices(len(train_rows), cfg)
    eval_only = task.adapter_from is not None  # no train split: empty train and validation, only test is scored
    if not tr and not eval_only:
        raise DataError(
            f"{task.train_file}: no training rows left after the validation split; lower data.val_fraction or raise data.train_subset"
        )
    parts: dict[str, Dataset] = {}
    split_stats: dict[str, dict] = {}
    for split, rows in (("train", [train_rows[i] for i in tr]), ("validation", [train_rows[i] for i in va]), ("test", test_rows)):
        cols, st = fmt.render(rows, tokenizer, opts, cfg.max_length)
        parts[split], split_stats[split] = Dataset.from_dict(cols), st
    if fmt.kind == "generation" and not eval_only:
        if len(parts["train"]) == 0:  # every example lost all its target tokens to truncation
            raise DataError(
                f"{task.train_file}: data.max_length={cfg.max_length} cuts away the whole target of all {len(tr)} training examples, none is left to train on; raise data.max_length or shorten the prompts"
            )
    dd = DatasetDict(parts)
    stats = {
        "task": task.name,
        "format": task.format,
        "rows": {k: len(v) for k, v in dd.items()},
        "train_file_rows": len(train_rows),
        "mean_tokens": {k: (sum(len(x) for x in v["input_ids"]) / max(1, len(v))) for k, v in dd.items()},
        "truncated": {k: st["truncated"] for k, st in split_stats.items()},
    }
    if fmt.kind == "generation":
        stats["target_truncated"] = {k: st.get("target_truncated", 0) for k, st in split_stats.items()}
        stats["dropped"] = {k: st.get("dropped", 0) for k, st in split_stats.items()}
    if meta:
        stats["meta"] = meta
    return dd, stats


def load_split(data_dir: str | Path, task: str, split: str) -> Dataset:
    return load_from_disk(str(Path(data_dir) / task))[split]


def collator_for(task: TaskSpec, tokenizer):
    """Training/loss batches for ``task``, from its format: :class:`bilora.causal.CausalCollator`
    (right padding) for the generation formats, :class:`pipeline.data.formats.classification.Collator` for classification/regression."""
    return formats.get(task.format).collator(tokenizer)


def tokenizer_for(base_dir: str | Path):
    return AutoTokenizer.from_pretrained(str(base_dir))
