"""Every format on tiny hand-written files in a temp folder: prepare -> one fine-tune step -> evaluate
(tiny BERT / tiny Llama, tiny in-memory BPE tokenizer); chat rendering and the assistant-only mask
token by token; parquet/folder/nested sources."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from bilora import adapters, methods
from bilora.train import FineTuner, LoopConfig
from pipeline.data import formats
from pipeline.data.catalog import get_task, options
from pipeline.config.schema import DataConfig
from pipeline.data.prepare import prepare_task
from pipeline.data.formats.chat import CHATML
from tests.test_causal_pipeline import tiny_bpe_tokenizer

IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    t = tiny_bpe_tokenizer(300)
    t.pad_token = t.eos_token
    return t


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def data_cfg(name: str, decl: dict, **kw) -> DataConfig:
    return DataConfig(
        tasks=[name],
        datasets={name: decl},
        train_subset=None,
        val_fraction=kw.pop("val_fraction", 0.0),
        max_length=kw.pop("max_length", 64),
        **kw,
    )


def _model_for(fmt, tok, n_labels):
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if fmt.kind == "generation":
        m = LlamaForCausalLM(
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
        targets = ("q_proj", "v_proj")
    else:
        m = BertForSequenceClassification(
            BertConfig(
                vocab_size=len(tok),
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=128,
                num_labels=n_labels,
                problem_type="regression" if fmt.kind == "regression" else "single_label_classification",
            )
        )
        targets = ("query", "value")
    spec = adapters.LoraSpec(r=2, alpha=4, target_modules=targets, modules_to_save=fmt.modules_to_save)
    return adapters.attach_lora(m, spec, fmt.peft_task_type)


def run_format(tmp_path, tok, name, decl, **kw):
    """prepare -> one optimizer step -> score on test; returns (dataset dict, stats, metrics)."""
    cfg = data_cfg(name, decl, **kw)
    task = get_task(name, cfg)
    dd, stats = prepare_task(task, cfg, tok)
    fmt = formats.get(task.format)
    n_labels = stats.get("meta", {}).get("num_labels", task.num_labels)
    model = _model_for(fmt, tok, n_labels)
    ft = FineTuner(
        model,
        methods.build("lora", {}, seed=0),
        dd["train"],
        fmt.collator(tok),
        LoopConfig(max_steps=1, batch_size=2, log_every=1),
        seed=0,
        checkpoint_dir=tmp_path / "ckpt",
    )
    summary = ft.train()
    assert summary["steps"] == 1 and torch.isfinite(torch.tensor(summary["final_loss"]))
    opts = options(task) | ({"labels": stats["meta"]["labels"]} if "meta" in stats else {})
    metrics, preds = fmt.score(model, tok, dd["test"], opts, task.metrics, batch_size=4, max_new_tokens=3)
    assert metrics["n"] == len(dd["test"]) and len(preds) == len(dd["test"])
    return dd, stats, metrics


def test_classification_csv_custom_columns_labels_inferred(tmp_path, tok):
    rows = [
        ("great film", "pos"),
        ("awful plot", "neg"),
        ("loved it", "pos"),
        ("boring", "neg"),
        ("superb, moving", "pos"),
        ("dull", "neg"),
    ]
    with open(tmp_path / "reviews.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        w.writerows(rows)
    decl = {
        "format": "classification",
        "train": str(tmp_path / "reviews.csv"),
        "test_fraction": 0.34,
        "columns": {"text": "review", "label": "sentiment"},
    }
    dd, stats, m = run_format(tmp_path, tok, "reviews", decl)
    assert stats["meta"] == {"labels": ["neg", "pos"], "num_labels": 2}
    assert stats["rows"] == {"train": 4, "validation": 0, "test": 2}
    assert set(m) == {"accuracy", "f1", "n"}
    assert set(dd["train"]["labels"]) <= {0, 1}


def test_regression_tsv_pair(tmp_path, tok):
    lines = ["s1\ts2\tscore", "a cat\ta dog\t1.5", "the sun\tthe star\t3.0", "hello\thi\t4.5", "red\tblue\t0.5", "one\ttwo\t2.0"]
    (tmp_path / "sim.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    decl = {
        "format": "regression",
        "train": str(tmp_path / "sim.tsv"),
        "test": str(tmp_path / "sim.tsv"),
        "columns": {"text": "s1", "text_pair": "s2", "label": "score"},
    }
    dd, stats, m = run_format(tmp_path, tok, "sim", decl)
    assert dd["test"]["labels"] == [1.5, 3.0, 4.5, 0.5, 2.0]
    assert set(m) == {"pearson", "spearman", "n"}


def test_alpaca_json_mask_on_output_only(tmp_path, tok):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ] * 3
    (tmp_path / "alpaca.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    decl = {"format": "alpaca", "train": str(tmp_path / "alpaca.json"), "test_fraction": 0.34}
    dd, stats, m = run_format(tmp_path, tok, "inst", decl, max_length=128)
    row = dd["train"][0]
    target = [t for t, l in zip(row["input_ids"], row["labels"]) if l != IGNORE]
    assert tok.decode(target) == row["reference"] + tok.eos_token  # loss exactly on the output + EOS
    assert "### Response:\n" in row["prompt"] and row["prompt"].startswith("Below is an instruction")
    assert set(m) == {"exact_match", "no_answer", "loss", "perplexity", "n"} and m["perplexity"] > 1


def test_prompt_completion_parquet_train_on_prompt(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"q": f"What is {i}+1?", "a": f" {i + 1}"} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    decl = {
        "format": "prompt_completion",
        "train": str(tmp_path / "qa.parquet"),
        "test_fraction": 0.34,
        "columns": {"prompt": "q", "completion": "a"},
        "extraction": "final_number",
        "train_on_prompt": True,
    }
    dd, stats, m = run_format(tmp_path, tok, "qa", decl)
    row = dd["train"][0]
    assert row["labels"] == row["input_ids"]  # train_on_prompt: every token carries the loss
    assert stats["target_truncated"] == {"train": 0, "validation": 0, "test": 0}


def test_multiple_choice_llm_adapters_style(tmp_path, tok):
    base = "Please choose the correct answer to the question: {q}\n\nAnswer1: yes Answer2: no\n\nAnswer format: answer1/answer2"
    rows = [
        {
            "instruction": base.format(q=f"question {i}?"),
            "input": "",
            "output": f"the correct answer is answer{1 + i % 2}",
            "answer": f"answer{1 + i % 2}",
        }
        for i in range(6)
    ]
    decl = {
        "format": "multiple_choice",
        "train": write_jsonl(tmp_path / "mc.jsonl", rows),
        "test_fraction": 0.5,
        "columns": {"prompt": "instruction"},
        "choices": ["answer1", "answer2"],
        "prompt_template": "{prompt}\nAnswer:",
    }
    dd, stats, m = run_format(tmp_path, tok, "mc", decl)
    assert set(m) == {"accuracy", "n"} and 0.0 <= m["accuracy"] <= 1.0
    assert all(r.endswith("\nAnswer:") for r in dd["test"]["prompt"])


SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "hello"},
        {"from": "human", "value": "2+2?"},
        {"from": "gpt", "value": "4"},
    ]
}


def test_chat_sharegpt_through_the_pipeline(tmp_path, tok):
    decl = {
        "format": "chat",
        "train": write_jsonl(tmp_path / "chat.jsonl", [SHAREGPT] * 4),
        "test_fraction": 0.5,
        "columns": {"messages": "conversations", "role": "from", "content": "value"},
        "chat_template": "chatml",
    }
    dd, stats, m = run_format(tmp_path, tok, "chat", decl, max_length=128)
    assert dd["test"][0]["reference"] == "4"
    assert dd["test"][0]["prompt"].endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_and_assistant_mask_token_by_token(tok):
    """Hand-written ChatML rendering of one conversation: the loss is on the assistant turns
    (content + '<|im_end|>\\n') and nowhere else."""
    fmt = formats.get("chat")
    opts = {
        "name": "c",
        "columns": {"messages": "conversations", "role": "from", "content": "value"},
        "role_map": {"human": "user", "gpt": "assistant"},
        "chat_template": "chatml",
    }
    row = fmt.normalise(SHAREGPT, opts, "x.jsonl:1")
    cols, stats = fmt.render([row], tok, opts, 512)
    pieces = [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        ("hello<|im_end|>\n", True),
        ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        ("4<|im_end|>\n", True),
    ]
    ids, labels = [], []
    for text, trained in pieces:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if trained else [IGNORE] * len(t)
    assert cols["input_ids"][0] == ids
    assert cols["labels"][0] == labels
    assert stats["target_truncated"] == 0
    # truncation inside the last assistant turn is counted; a cut that leaves no assistant token drops the row
    cut, st = fmt.render([row], tok, opts, len(ids) - 2)
    assert st["target_truncated"] == 1 and len(cut["input_ids"]) == 1
    short, st = fmt.render([row], tok, opts, 5)
    assert st["dropped"] == 1 and short["input_ids"] == []


def test_chat_uses_the_tokenizers_own_template_and_says_when_none(tok):
    from pipeline.data.readers import DataError

    fmt = formats.get("chat")
    opts = {
        "name": "c",
        "columns": {"messages": "conversations", "role": "from", "content": "value"},
        "role_map": {"human": "user", "gpt": "assistant"},
    }
    row = fmt.normalise(SHAREGPT, opts, "x.jsonl:1")
    with pytest.raises(DataError, match="no chat template.*chatml"):
        fmt.render([row], tok, opts, 64)
    tok2 = tiny_bpe_tokenizer(300)
    tok2.chat_template = CHATML
    own, _ = fmt.render([row], tok2, opts, 512)
    named, _ = fmt.render([row], tok, opts | {"chat_template": "chatml"}, 512)
    assert own == named


def test_nested_self_instruct_explode(tmp_path, tok):
    rows = [
        {
            "id": f"t{i}",
            "instruction": f"Task {i}",
            "instances": [{"input": "", "output": f"out {i}a"}, {"input": "x", "output": f"out {i}b"}],
        }
        for i in range(3)
    ]
    decl = {
        "format": "alpaca",
        "train": write_jsonl(tmp_path / "seed.jsonl", rows),
        "test_fraction": 0.34,
        "explode": "instances",
        "columns": {"input": "instances.input", "output": "instances.output"},
    }
    cfg = data_cfg("si", decl, max_length=128)
    dd, stats = prepare_task(get_task("si", cfg), cfg, tok)
    assert stats["train_file_rows"] == 4 and stats["rows"]["test"] == 2  # 6 instances, 2 held out
    refs = set(dd["train"]["reference"]) | set(dd["test"]["reference"])
    assert refs == {f"out {i}{s}" for i in range(3) for s in "ab"}


def test_folder_source(tmp_path, tok):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"prompt": "p1", "completion": " c1"}, {"prompt": "p2", "completion": " c2"}])
    write_jsonl(folder / "b.jsonl", [{"prompt": "p3", "completion": " c3"}])
    (folder / "notes.txt").write_text("ignored")
    cfg = data_cfg("pc", {"format": "prompt_completion", "train": str(folder), "test": str(folder / "b.jsonl")})
    dd, stats = prepare_task(get_task("pc", cfg), cfg, tok)
    assert sorted(dd["train"]["prompt"]) == ["p1", "p2", "p3"] and dd["test"]["reference"] == [" c3"]
