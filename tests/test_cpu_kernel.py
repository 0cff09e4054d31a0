"""The project picks bitsandbytes' 4-bit CPU kernel (bilora.layers.set_cpu_kernel), not the CPU.

The model here is a small BERT whose linear shapes bitsandbytes *can* pack (rows a multiple of 32,
columns of the 64-element block), so on a CPU with AVX512-BF16 a forgotten kernel choice would show:
bitsandbytes would repack the weights at the first eval-mode no-grad forward.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from bilora import adapters, base, layers
from bilora.sharpness.config import SharpnessConfig
from bilora.sharpness.measure import measure
from bilora.sharpness.objective import Objective
from bilora.merge import dequantize

pytest.importorskip("bitsandbytes")

HAS_BF16 = layers.cpu_has_avx512_bf16()
needs_bf16 = pytest.mark.skipif(
    not HAS_BF16, reason="this CPU has no AVX512-BF16 (lscpu | grep -o avx512_bf16): bitsandbytes' packed bf16 kernel cannot run"
)


def _saved_base(tmp_path, cpu_kernel: str = "fp32"):
    """Quantize a packable tiny BERT with the library (as load_base does) and save it."""
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "fp32")
    q = base.QuantSpec(compute_dtype="float32", cpu_kernel=cpu_kernel)
    model, report = base.quantize(base.ResolvedBase(str(tmp_path / "fp32")), q)
    out = tmp_path / "base"
    model.save_pretrained(out)
    (out / "bilora_base.json").write_text(json.dumps({"quant": asdict(q)}))  # as stages/load_base records it
    return out, report


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (4, 16), generator=g)  # (B, L)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _q4(model):
    return [m for m in model.modules() if layers.is_4bit(m)]


def _fp32_reference_forward(model, batch):
    """Logits with every 4-bit layer replaced by F.linear on its explicitly dequantized weight."""
    saved = []
    for m in _q4(model):
        w = layers.dequantized_weight(m, torch.float32)  # (out, in)
        saved.append((m, m.forward))
        m.forward = lambda x, w=w, m=m: F.linear(x, w, m.bias)
    try:
        with torch.no_grad():
            return model(**batch).logits
    finally:
        for m, fwd in saved:
            m.forward = fwd


def test_default_kernel_is_fp32_after_loading_on_any_cpu(tmp_path):
    out, report = _saved_base(tmp_path)
    assert report["kernel"]["cpu_kernel"] == "fp32" and report["kernel"]["compute_dtype"] == "float32"
    assert report["kernel"]["cpu_avx512_bf16"] == HAS_BF16
    torch.manual_seed(0)
    model = base.load_for_task(out, "classification", 2).eval()  # kernel read from bilora_base.json
    q4 = _q4(model)
    assert len(q4) == 7 and all(not m.support_avx512bf16_for_cpu for m in q4)
    assert all(layers._packable(m) for m in q4)  # bitsandbytes could pack every layer of this model
    batch = _batch()
    with torch.no_grad():
        got = model(**batch).logits  # eval + no_grad: the path bitsandbytes would repack on
    assert not any(layers.is_packed(m) for m in q4)
    # The fp32 path is dequantize + F.linear: the same numbers as the explicit computation.
    torch.testing.assert_close(got, _fp32_reference_forward(model, batch), rtol=0, atol=0)
    info = layers.kernel_info(model)
    assert info["cpu_kernel"] == "fp32" and info["packed_layers"] == 0 and info["layers_4bit"] == 7


def test_packed_kernel_refused_where_the_cpu_lacks_bf16(tmp_path, monkeypatch):
    out, _ = _saved_base(tmp_path)
    monkeypatch.setattr(layers, "cpu_has_avx512_bf16", lambda: False)
    with pytest.raises(layers.KernelError, match="avx512_bf16"):
        base.load_for_task(out, "classification", 2, cpu_kernel="packed_bf16")
    with pytest.raises(layers.KernelError, match="unknown"):
        layers.set_cpu_kernel(torch.nn.Linear(2, 2), "int8")


@needs_bf16
def test_packed_kernel_opt_in_packs_and_everything_still_works(tmp_path):
    out, _ = _saved_base(tmp_path, cpu_kernel="packed_bf16")
    torch.manual_seed(0)
    model = base.load_for_task(out, "classification", 2).eval()
    assert layers.kernel_info(model)["cpu_kernel"] == "packed_bf16"
    batch = _batch()
    ref = _fp32_reference_forward(model, batch)
    with torch.no_grad():
        got = model(**batch).logits
    q4 = _q4(model)
    assert all(layers.is_packed(m) for m in q4)  # bitsandbytes repacked at the eval forward
    rel = float((got - ref).norm() / ref.norm())
    # A bf16 kernel: close to the fp32 path, not equal. Each of the 7 packed layers rounds its input and block scales
    # to bf16 (2^-8 = 3.9e-3 each at most): 14 such roundings would add up to ~5e-2 if they all lined up, a few 1e-3
    # typically (observed 1.2e-3, norm-wise); 3e-2 rules out a different computation without assuming they cancel.
    assert 0 < rel < 3e-2, rel
    # The dequantized weight of a packed layer equals the unpacked one up to bitsandbytes' bf16 rounding of the block
    # scales at packing (2^-8 relative) and their 8-bit re-quantization (double quant) when the inverse conversion
    # unpacks them again: observed ≤ 6.0e-3 = 0.77 x 2^-7 relative per element, so rtol 2^-7 = two bf16 roundings;
    # atol 1e-6 only for entries that dequantize to ~0. (Deterministic: elementwise roundings, same on every such CPU.)
    torch.manual_seed(0)  # the same fresh head as `model`
    fresh = base.load_for_task(out, "classification", 2, cpu_kernel="fp32")
    for m, f in zip(q4, _q4(fresh)):
        torch.testing.assert_close(layers.dequantized_weight(m), layers.dequantized_weight(f), rtol=2**-7, atol=1e-6)
    # Under fp32_kernel the same model computes exactly the fp32 path, and is left as it was.
    data_before = [m.weight.data.clone() for m in q4]
    with torch.no_grad(), layers.fp32_kernel(model):
        inside = model(**batch).logits
    # The fp32 path on weights that differ from `fresh`'s by ≤ 2^-7 relative per element (above). A matmul turns that
    # into ≤ 2^-7 sum|w x|, above 2^-7 |y| only where y cancels, and the per-weight errors are independent, so they
    # mostly average out: observed ≤ 1.8e-3 = 0.23 x 2^-7 relative on logits ≥ 0.015 in size; atol 1e-5 for logits near 0.
    torch.testing.assert_close(inside, _fp32_reference_forward(fresh, batch), rtol=2**-7, atol=1e-5)
    assert all(layers.is_packed(m) and torch.equal(m.weight.data, d) for m, d in zip(q4, data_before))
    # Merge dequantizes packed weights too.
    plain = dequantize(model, torch.float32)
    # Exact: merge unpacks with the same inverse conversion as fp32_kernel, dequantizes the same way, and nn.Linear
    # runs the F.linear the fp32 path runs (as in test_default_kernel_is_fp32_after_loading_on_any_cpu).
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, inside, rtol=0, atol=0)


@needs_bf16
def test_sharpness_on_packed_model_leaves_it_bit_identical(tmp_path):
    out, _ = _saved_base(tmp_path, cpu_kernel="packed_bf16")
    torch.manual_seed(0)
    model = base.load_for_task(out, "classification", 2)
    torch.manual_seed(1)
    model = adapters.attach_lora(
        model, adapters.LoraSpec(r=4, alpha=8, target_modules=("query", "value"), modules_to_save=("classifier",)), "SEQ_CLS"
    ).eval()
    batch = _batch()
    with torch.no_grad():
        model(**batch)  # packs
    q4 = _q4(model)
    assert all(layers.is_packed(m) for m in q4 if m.support_avx512bf16_for_cpu)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    datas = [m.weight.data.clone() for m in q4]
    examples = [{"input_ids": batch["input_ids"][i].tolist(), "label": i % 2} for i in range(4)]

    def collate(ex):
        ids = torch.tensor([e["input_ids"] for e in ex])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([e["label"] for e in ex])}

    objective = Objective.from_dataset(examples, collate, batch_size=4)
    cfg = SharpnessConfig(radii=(0.01,), n_directions=1, attack_alphas=(0.0, 1.0), curve_points=0, spaces=("full", "lora"))
    result = measure(model, objective, cfg, None).to_dict()
    assert result["spaces"]["full"]["attack"]["points"][1]["loss"] > result["base"]["loss"]
    assert all(torch.equal(m.weight.data, d) for m, d in zip(q4, datas))
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
