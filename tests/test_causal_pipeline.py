"""The real ``dvc repro`` on a causal LM: a tiny Llama (random weights, byte-level BPE tokenizer
trained in memory on a few GSM8K lines) as a local base folder, GSM8K, lora + bilora, every stage."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_pipeline import ROOT, dvc_bin, mlflow_runs, repro, run_env

pytestmark = pytest.mark.slow


def tiny_bpe_tokenizer(vocab_size: int = 400):
    """PreTrainedTokenizerFast: byte-level BPE trained in memory on 200 GSM8K train problems, <s>/</s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = []
    with open(ROOT / "data" / "raw" / "gsm8k" / "train.jsonl", encoding="utf-8") as f:
        for _, row in zip(range(200), f):
            ex = json.loads(row)
            lines += [ex["question"], ex["answer"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_llama_folder(out: Path) -> Path:
    """A Hugging Face folder: tiny LlamaForCausalLM + the tiny byte-level BPE tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_tok = tiny_bpe_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        tie_word_embeddings=True,
    )  # tied like SmolLM2 (merge must rebuild lm_head)
    LlamaForCausalLM(cfg).save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def causal_params(base: Path) -> dict:
    from pipeline.config.presets import load_preset

    raw = load_preset("smollm2_gsm8k_cpu", str(ROOT / "params.yaml"))[1]
    raw["data"].update(tasks=["gsm8k"], train_subset=24, val_fraction=0.0, max_length=96, test_subset=4)
    raw["base"]["source"] = str(base)
    raw["train"].update(methods=["lora", "bilora"], seeds=[0])
    raw["train"]["loop"].update(max_steps=2, batch_size=4, checkpoint_every=1, log_every=1)
    raw["eval"].update(batch_size=4, train_subset=2, max_new_tokens=8)
    raw["eval"]["sharpness"].update(
        enabled=True, examples=4, spaces=["lora"], radii=[0.05], n_directions=1, attack_alphas=[0.0, 1.0], curve_points=3
    )
    raw["merge"].update(task="gsm8k", method="bilora", seed=0, check_examples=2)
    raw["tracking"]["experiment"] = "causal-test"
    return raw


def make_causal_repo(tmp: Path, params: dict) -> Path:
    repo = tmp / "repo"
    repo.mkdir()
    for d in ("bilora", "pipeline", "stages"):
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data" / "raw" / "gsm8k", repo / "data" / "raw" / "gsm8k")
    for f in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / f, repo / f)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = run_env(repo)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "t@t"],
        ["git", "config", "user.name", "t"],
        [dvc_bin(), "init", "-q"],
        [dvc_bin(), "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
    ):
        subprocess.run(cmd, cwd=repo, check=True, env=env, capture_output=True)
    return repo


def test_dvc_repro_causal_lm_gsm8k(tmp_path):
    base = tiny_llama_folder(tmp_path / "tiny-llama")
    repo = make_causal_repo(tmp_path, causal_params(base))
    ran = repro(repo)
    runs = ("gsm8k-lora-0", "gsm8k-bilora-0")
    expected = {"prepare", "load_base", "configure", *(f"{s}@{r}" for s in ("finetune", "evaluate") for r in runs), "merge", "report"}
    assert set(ran) == expected

    # prepare: SFT rows with the prompt masked, raw question + gold answer kept; test_subset applied.
    from datasets import load_from_disk

    dd = load_from_disk(str(repo / "artifacts" / "data" / "gsm8k"))
    assert {"input_ids", "attention_mask", "labels", "prompt", "reference"} <= set(dd["test"].column_names)
    assert len(dd["test"]) == 4 and len(dd["train"]) == 24 and len(dd["validation"]) == 0
    row = dd["train"][0]
    assert row["labels"][0] == -100 and row["labels"][-1] != -100 and len(row["input_ids"]) <= 96

    # load_base: nf4 + provenance + causal quality check.
    qr = json.loads((repo / "artifacts" / "base" / "quant_report.json").read_text())
    assert qr["n_quantized_layers"] > 0 and qr["provenance"]["kind"] == "local"
    assert qr["quality"]["perplexity"] > 1 and isinstance(qr["quality"]["greedy_answer"], str)

    for run in runs:
        adapter = repo / "artifacts" / "finetune" / run / "adapter"
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        assert cfg["task_type"] == "CAUSAL_LM" and not cfg.get("modules_to_save")
        assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        m = json.loads((repo / "metrics" / f"{run}.json").read_text())
        assert 0.0 <= m["test"]["exact_match"] <= 1.0 and m["test"]["n"] == 4
        assert "gap" in m and "exact_match" in m["gap"]
        assert any(k.startswith("lora.attack.a1.loss") for k in m["sharpness"])
        preds = json.loads((repo / "artifacts" / "eval" / run / "predictions_test.json").read_text())
        assert len(preds) == 4 and {"generation", "prediction", "gold"} <= set(preds[0])

    merged = json.loads((repo / "artifacts" / "merged" / "merge_report.json").read_text())
    assert merged["relative_logit_drift"] <= merged["tolerance"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(repo / "artifacts" / "merged" / "model") is not None
    summary = json.loads((repo / "reports" / "summary.json").read_text())
    assert summary["gsm8k.bilora"]["main_metric"] == "exact_match"

    stages = dict(mlflow_runs(repo))
    assert "quality.perplexity" in stages["load_base"]["_metrics"]
    assert "test.exact_match" in stages["evaluate@gsm8k-bilora-0"]["_metrics"]
