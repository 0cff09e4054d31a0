"""Fast checks of the causal-LM branches of the stages' helpers (no dvc, no artifacts/)."""

from __future__ import annotations

import json

import pytest
import torch

from bilora.causal import IGNORE_INDEX, CausalCollator
from pipeline.config.schema import DataConfig, EvalConfig
from pipeline.data.formats.classification import Collator
from pipeline.data.prepare import collator_for, prepare_task
from pipeline.data.catalog import get_task
from tests.test_causal_pipeline import tiny_bpe_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_bpe_tokenizer(300)


def test_prepare_gsm8k_keeps_raw_test_and_masks_prompt(tok):
    cfg = DataConfig(tasks=["gsm8k"], max_length=64, train_subset=10, val_fraction=0.2, test_subset=3)
    dd, stats = prepare_task(get_task("gsm8k"), cfg, tok)
    assert stats["rows"] == {"train": 8, "validation": 2, "test": 3}
    row = dd["test"][0]
    assert row["prompt"].startswith("Question: ") and row["prompt"].endswith("\nAnswer:") and "####" in row["reference"]
    assert len(row["input_ids"]) == len(row["labels"]) <= 64
    assert row["labels"][0] == IGNORE_INDEX and any(t != IGNORE_INDEX for t in row["labels"])
    json.dumps(stats)  # stats.json stays serialisable


def test_prepare_boolq_and_empty_validation(tok):
    cfg = DataConfig(tasks=["boolq"], max_length=96, train_subset=6, val_fraction=0.0, test_subset=2)
    dd, stats = prepare_task(get_task("boolq"), cfg, tok)
    assert stats["rows"] == {"train": 6, "validation": 0, "test": 2}
    assert dd["test"][0]["answer"] in (0, 1)  # index into the choices ["true", "false"]
    assert dd["test"][0]["prompt"].endswith("\n\nAnswer format: true/false\nAnswer:")


def test_collator_for_picks_causal_collator(tok):
    c = collator_for(get_task("gsm8k"), tok)
    assert isinstance(c, CausalCollator) and c.padding_side == "right" and c.pad_token_id == tok.eos_token_id
    assert isinstance(collator_for(get_task("sst2"), tok), Collator)


def test_quality_check_on_tiny_llama(tok):
    import math

    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from bilora.causal import QUALITY_TEXT, quality_check

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            eos_token_id=tok.eos_token_id,
        )
    )
    q = quality_check(model, tok, max_new_tokens=4)
    ids = tok(QUALITY_TEXT, return_tensors="pt")["input_ids"]  # (1, T)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()  # (1, T, V)
    nll = F.cross_entropy(logits[0, :-1], ids[0, 1:])  # next-token loss, computed here by hand
    # float32 model loss vs the float64 cross-entropy of the same float32 logits: ~1e-7 relative, far inside 1e-5
    assert q["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert q["text_tokens"] == ids.shape[1] and isinstance(q["greedy_answer"], str)


def test_evaluate_generation_gsm8k_and_boolq(tok):
    from datasets import Dataset

    from bilora import adapters
    from pipeline.stage.scoring import evaluate_generation

    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            eos_token_id=tok.eos_token_id,
        )
    )
    model = adapters.attach_lora(model, adapters.LoraSpec(r=2, alpha=4, target_modules=("q_proj", "v_proj")), "CAUSAL_LM")
    ds = Dataset.from_dict(
        {
            "prompt": ["Question: What is 1+1?\nAnswer:", "Question: What is 2+2?\nAnswer:"],
            "reference": [" 1+1=2\n#### 2", " 2+2=4\n#### 4"],
        }
    )
    m, preds = evaluate_generation(model, tok, "gsm8k", ds, batch_size=2, max_new_tokens=3)
    assert set(m) == {"exact_match", "n", "no_answer"} and m["n"] == 2 and len(preds) == 2
    ds = Dataset.from_dict({"prompt": ["is the sky blue\nAnswer:", "is fire cold\nAnswer:"], "answer": [0, 1]})
    m, preds = evaluate_generation(model, tok, "boolq", ds, batch_size=4, max_new_tokens=3)
    assert set(m) == {"accuracy", "n"} and set(preds) <= {"true", "false"}
    assert EvalConfig().max_new_tokens == 256
