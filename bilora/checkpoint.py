"""Self-describing, atomic training checkpoints that hold everything needed to resume exactly.

Layout of one checkpoint directory::

    adapters.safetensors   every adapter tensor (primary AND auxiliary) and trainable head
    state.pt               optimizer, scheduler, method state, RNG states, history (read with weights_only=True)
    meta.json              step and the run fingerprint; written last

A checkpoint is written to a temporary sibling directory and renamed into place, so a crash
mid-write never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bilora.io import atomic_dir


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA tensor of every adapter plus anything trainable (e.g. a classification head)."""
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad or ".lora_" in n}


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))


def save(path: Path, model: torch.nn.Module, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Atomically write a checkpoint to ``path`` (replacing any previous one)."""
    with atomic_dir(path) as tmp:
        save_file(adapter_state(model), str(tmp / "adapters.safetensors"))
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


def read_meta(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / "meta.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def load(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Restore adapter tensors into ``model`` (strictly: every saved tensor must exist) and return the state."""
    tensors = load_file(str(path / "adapters.safetensors"))
    params = dict(model.named_parameters())
    missing = [k for k in tensors if k not in params]
    if missing:
        raise KeyError(f"checkpoint {path} has tensors the model lacks: {missing[:3]}")
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)
    return torch.load(path / "state.pt", weights_only=True)


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
