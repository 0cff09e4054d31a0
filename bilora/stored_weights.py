"""The original weights of a base, read one tensor at a time from its safetensors files.

``bilora.base.quantize`` compares every 4-bit layer with the weight it was quantized from. Loading the
whole original model for that would hold it in fp32 beside the 4-bit one (~32 GB of host RAM for an
8B base); reading each weight from the checkpoint on demand holds one tensor at a time.

:func:`stored_weights` maps each quantized module to its checkpoint tensor by name: the tensor whose key
is ``<module>.weight`` or ends with ``.<module>.weight`` (a checkpoint saved from a task model has a
prefix such as ``bert.``), of the module's shape. It returns ``None`` (the caller then loads the model)
when the checkpoint is not safetensors or a module has no unique match, e.g. where transformers renames
or fuses weights while loading.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file


def checkpoint_files(path: str, revision: str | None = None) -> dict[str, Path] | None:
    """Tensor key -> the safetensors file holding it, for a local folder or a Hub id (its local cache);
    None when the checkpoint has no safetensors files."""

    def find(name: str) -> str | None:
        return cached_file(
            path, name, revision=revision, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False
        )

    index = find(SAFE_WEIGHTS_INDEX_NAME)
    if index is not None:
        weight_map = json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"]  # key -> shard file name
        shards = {name: find(name) for name in set(weight_map.values())}
        if any(f is None for f in shards.values()):
            return None
        return {key: Path(shards[name]) for key, name in weight_map.items()}
    single = find(SAFE_WEIGHTS_NAME)
    if single is None:
        return None
    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), Path(single))


def match_keys(modules: Iterable[tuple[str, tuple[int, ...]]], files: dict[str, Path]) -> dict[str, str] | None:
    """Module name -> checkpoint key of its weight (unique name-suffix match of the right shape), or None."""
    shapes: dict[str, tuple[int, ...]] = {}
    out: dict[str, str] = {}
    for name, shape in modules:
        hits = [k for k in files if k == f"{name}.weight" or k.endswith(f".{name}.weight")]
        if len(hits) != 1:
            return None
        key = hits[0]
        if key not in shapes:
            with safe_open(str(files[key]), framework="pt") as f:
                shapes[key] = tuple(f.get_slice(key).get_shape())
        if shapes[key] != tuple(shape):
            return None
        out[name] = key
    return out


class StoredWeights:
    """``weights[module_name]``: that module's original weight, read from its file on each access."""

    def __init__(self, keys: dict[str, str], files: dict[str, Path]):
        self.keys, self.files = keys, files

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self.keys[name]
        with safe_open(str(self.files[key]), framework="pt") as f:
            return f.get_tensor(key)


def stored_weights(path: str, modules: Iterable[tuple[str, tuple[int, ...]]], revision: str | None = None) -> StoredWeights | None:
    """Lazy original weights of ``modules`` ((name, (out, in)) pairs), or None when they cannot be matched."""
    files = checkpoint_files(path, revision)
    if files is None:
        return None
    keys = match_keys(modules, files)
    return None if keys is None else StoredWeights(keys, files)
