"""The merge stage's checks, now in bilora.merge: agreement with the adapter, the drift policy, the reload."""

from __future__ import annotations

import pytest
import torch
from bilora import adapters
from bilora.base import task_model_class
from bilora.merge import MergeCheckError, agreement_drift, check_agreement, dequantize, merge, reload_max_abs_diff
from tests.tiny import cls_examples, collate, nf4_bert, peft_bert, tiny_bert


def _adapter(tmp_path):
    model = peft_bert()
    with torch.no_grad():
        for _, b, _ in adapters.lora_factors(model, adapters.PRIMARY):
            b.normal_(0.0, 0.3)  # B = 0 at init would make the adapter a no-op
    adapters.save_primary(model, tmp_path / "adapter")
    return model.eval()


def _batch():
    batch = collate(cls_examples(6))
    batch.pop("labels")
    return batch


def test_agreement_drift_is_the_relative_frobenius_distance_of_the_logits(tmp_path):
    adapted = _adapter(tmp_path)
    merged = merge(tiny_bert(), tmp_path / "adapter").eval()
    batch = _batch()
    drift = agreement_drift(adapted, merged, batch)
    with torch.no_grad():
        ref, got = adapted(**batch).logits.double(), merged(**batch).logits.double()  # (6, 2)
    by_hand = float(((got - ref) ** 2).sum().sqrt() / (ref**2).sum().sqrt())
    assert drift == pytest.approx(by_hand, rel=1e-12, abs=0)  # the same float64 formula, reduced in another order
    # folding s·B@A into W changes float32 rounding only: ~1e-7 relative on logits of this size
    assert 0 < drift < 1e-5
    other = merge(tiny_bert(seed=5), tmp_path / "adapter").eval()  # a different base: far apart
    assert agreement_drift(adapted, other, batch) > 1e-2


def test_agreement_on_a_4bit_base_with_the_nf4_roundtrip_merge(tmp_path):
    base4 = nf4_bert(tmp_path / "b4")
    torch.manual_seed(1)
    adapted = adapters.attach_lora(base4, adapters.LoraSpec(r=4, alpha=8, modules_to_save=("classifier",)), "SEQ_CLS")
    with torch.no_grad():
        for _, b, _ in adapters.lora_factors(adapted, adapters.PRIMARY):
            b.normal_(0.0, 0.3)
    adapters.save_primary(adapted, tmp_path / "adapter")
    merged = merge(dequantize(nf4_bert(tmp_path / "b4again"), torch.float32), tmp_path / "adapter").eval()
    # dequant(quant(W)) + s·B@A in float32 is the function the adapter computes on the fp32 kernel
    assert agreement_drift(adapted.eval(), merged, _batch()) < 1e-5


def test_check_agreement_policy():
    assert check_agreement("nf4_roundtrip", 1e-6, 1e-4) is None
    assert check_agreement("original", 1e-6, 1e-4) is None
    with pytest.raises(MergeCheckError, match="relative logit drift 2.000e-03 > merge.tolerance 0.0001"):
        check_agreement("nf4_roundtrip", 2e-3, 1e-4)
    warning = check_agreement("original", 2e-3, 1e-4)
    assert warning is not None and "expected" in warning and "nf4_roundtrip" in warning
    assert check_agreement("nf4_roundtrip", 1e-4, 1e-4) is None  # the tolerance itself passes


def test_reload_max_abs_diff_reloads_what_was_saved(tmp_path):
    _adapter(tmp_path)
    merged = merge(tiny_bert(), tmp_path / "adapter").eval()
    batch = _batch()
    merged.save_pretrained(tmp_path / "m32")
    assert reload_max_abs_diff(task_model_class("classification"), tmp_path / "m32", merged, batch, torch.float32) == 0.0
    # bf16: the saved bf16 weights are the merged model cast to bf16, so the reload is exact there too
    merged16 = merge(tiny_bert(), tmp_path / "adapter").eval()
    merged16.to(torch.bfloat16).save_pretrained(tmp_path / "m16")
    assert reload_max_abs_diff(task_model_class("classification"), tmp_path / "m16", merged16, batch, torch.bfloat16) == 0.0
    # a saved model that differs: the check sees it
    with torch.no_grad():
        merged.classifier.bias.add_(0.5)
    assert reload_max_abs_diff(task_model_class("classification"), tmp_path / "m32", merged, batch, torch.float32) == pytest.approx(
        0.5, abs=1e-6
    )


def test_task_model_class_maps_each_kind_once():
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    assert task_model_class("generation") is AutoModelForCausalLM
    assert task_model_class("classification") is AutoModelForSequenceClassification
    assert task_model_class("regression") is AutoModelForSequenceClassification
