"""Tiny offline models and data for fast tests (nothing is downloaded)."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from bilora import adapters


def tiny_bert(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def cls_examples(n: int = 32, length: int = 12, seed: int = 0, num_labels: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, length), generator=g)
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return [{"input_ids": ids[i].tolist(), "label": int(labels[i])} for i in range(n)]


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([e["input_ids"] for e in examples])  # (B, L)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([e["label"] for e in examples])}


SPEC = adapters.LoraSpec(r=4, alpha=8, target_modules=("query", "key", "value", "dense"), modules_to_save=("classifier",))


def peft_bert(seed: int = 0, spec: adapters.LoraSpec = SPEC):
    model = tiny_bert(seed=seed)
    torch.manual_seed(seed + 1)
    return adapters.attach_lora(model, spec, "SEQ_CLS")


def nf4_bert(folder, seed: int = 0, *, cpu_kernel: str = "fp32") -> BertForSequenceClassification:
    """:func:`tiny_bert` saved to ``folder`` and reloaded nf4 (double quant, fp32 compute, head kept
    full precision), with the project's 4-bit CPU kernel set before any forward (bilora.layers)."""
    from transformers import BitsAndBytesConfig

    from bilora import layers

    tiny_bert(seed=seed).save_pretrained(folder)
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["classifier"],
    )
    model = BertForSequenceClassification.from_pretrained(folder, quantization_config=q, device_map="cpu")
    layers.set_cpu_kernel(model, cpu_kernel)
    return model
