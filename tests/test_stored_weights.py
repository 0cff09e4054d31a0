"""load_base's quantization report reads the original weights tensor by tensor (never the whole fp32 model)
and gives the same per-layer dequantization errors and fp32 footprint as a full fp32 load."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from bilora import base, layers
from bilora.sources import ResolvedBase
from bilora.stored_weights import checkpoint_files, stored_weights
from tests.tiny import tiny_bert, tiny_llama

Q = base.QuantSpec(compute_dtype="float32")


@torch.no_grad()
def full_load_reference(folder, cls) -> tuple[dict[str, float], int]:
    """The report as computed before: the whole original model in fp32, every quantized layer against it."""
    original = cls.from_pretrained(folder, dtype=torch.float32)
    q = cls.from_pretrained(folder, quantization_config=base.bnb_config(Q), device_map="cpu", dtype=torch.float32)
    layers.set_cpu_kernel(q, "fp32")
    ref = dict(original.named_parameters())
    errors = {}
    for name, m in q.named_modules():
        w = getattr(m, "weight", None)
        if w is not None and getattr(w, "quant_state", None) is not None:
            deq = layers.dequantize_param(w, w.quant_state).float()
            orig = ref[f"{name}.weight"].float()
            errors[name] = float((deq - orig).norm() / orig.norm())
    return errors, original.get_memory_footprint()


@pytest.fixture()
def no_full_load(monkeypatch):
    """Fail if anything loads the original model without quantizing it."""
    calls = []
    for cls in (AutoModel, AutoModelForCausalLM):
        orig = cls.from_pretrained.__func__

        def spy(klass, *a, _orig=orig, **kw):
            calls.append(kw.get("quantization_config"))
            return _orig(klass, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


def test_bert_task_checkpoint_streams_with_prefixed_keys(tmp_path, no_full_load):
    folder = tmp_path / "bert"
    tiny_bert(seed=3).save_pretrained(folder)  # a task model: keys are "bert.encoder.layer.0...."
    model, report = base.quantize(ResolvedBase(str(folder)), Q)
    assert all(c is not None for c in no_full_load), "the original model was loaded unquantized"
    want, footprint = full_load_reference(folder, AutoModel)
    assert report["dequant_reference"] == "streamed"
    assert report["n_quantized_layers"] == len(want) == 13  # q, k, v, 3 dense x 2 layers + pooler
    assert report["layers"].keys() == want.keys()
    for name, e in want.items():
        assert report["layers"][name] == pytest.approx(e, rel=1e-12, abs=0)
    assert report["memory_bytes_original"] == footprint
    assert report["stored_dtype"] == "float32"


def test_sharded_bf16_llama_streams_from_the_index(tmp_path, no_full_load):
    folder = tmp_path / "llama"
    tiny_llama(seed=1).to(torch.bfloat16).save_pretrained(folder, max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    files = checkpoint_files(str(folder))
    assert files is not None and {p.name for p in files.values()} == set(index["weight_map"].values())
    model, report = base.quantize(ResolvedBase(str(folder)), Q)
    assert all(c is not None for c in no_full_load)
    want, footprint = full_load_reference(folder, AutoModelForCausalLM)
    assert report["dequant_reference"] == "streamed" and report["n_quantized_layers"] == 14  # 7 linears x 2 layers
    for name, e in want.items():
        assert report["layers"][name] == pytest.approx(e, rel=1e-12, abs=0)
    assert report["memory_bytes_original"] == footprint  # fp32 bytes, whatever the stored dtype
    assert report["stored_dtype"] == "bfloat16"


def test_unmatched_names_fall_back_to_loading_the_stored_dtype(tmp_path, monkeypatch):
    folder = tmp_path / "llama"
    tiny_llama(seed=2).to(torch.bfloat16).save_pretrained(folder)
    shapes = [("model.layers.0.mlp.up_proj", (64, 32)), ("model.layers.9.mlp.up_proj", (64, 32))]
    assert stored_weights(str(folder), shapes[:1]) is not None
    assert stored_weights(str(folder), shapes) is None  # a module without a checkpoint tensor
    assert stored_weights(str(folder), [("model.layers.0.mlp.up_proj", (32, 64))]) is None  # wrong shape
    monkeypatch.setattr(base, "stored_weights", lambda *a, **k: None)
    model, report = base.quantize(ResolvedBase(str(folder)), Q)
    want, footprint = full_load_reference(folder, AutoModelForCausalLM)
    assert report["dequant_reference"] == "loaded"
    for name, e in want.items():
        assert report["layers"][name] == pytest.approx(e, rel=1e-12, abs=0)
    assert report["memory_bytes_original"] == footprint


def test_no_safetensors_means_no_stream(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert checkpoint_files(str(tmp_path)) is None
