"""Causal-LM path: GSM8K answer extraction, SFT tokenisation and truncation, padding, batched greedy
generation, log-likelihood scoring, and a few FineTuner steps on tiny_llama (fast tier)."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

from bilora import adapters, causal, methods
from bilora.causal import IGNORE_INDEX, CausalCollator, extract_answer, gold_answer, tokenize_sft
from bilora.train import FineTuner, LoopConfig
from tests.tiny import tiny_llama

# --------------------------------------------------------------------------------------
# A character-level tokenizer that fits tiny_llama's 128-token vocabulary
# --------------------------------------------------------------------------------------

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]


def char_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """One token per character (ids 4..99), <pad>=0, <s>=1, </s>=2; prepends <s> when ``add_bos``."""
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return char_tokenizer()


def test_char_tokenizer_is_one_token_per_character(tok):
    ids = tok("ab c")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 5
    assert tok.decode(ids, skip_special_tokens=True) == "ab c"
    assert max(tok.get_vocab().values()) < 128


# --------------------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She pays 3 * 4 = <<3*4=12>>12 dollars.\n#### 12", "12"),
        ("#### 1,234", "1234"),  # thousands comma
        ("Total: 1,000,000 grains", "1000000"),
        ("The temperature drops to -5 degrees.", "-5"),  # sign kept
        ("#### -17", "-17"),
        ("So x = 5.0", "5"),  # decimals normalised
        ("#### 5.00", "5"),
        ("The answer is 42.", "42"),  # sentence period is not a decimal point
        ("It costs $18.50 per hour", "18.5"),
        ("#### $1,250", "1250"),  # "$" before
        ("The discount is 25%", "25"),  # "%" after
        ("She walked 12 km", "12"),  # unit after
        ("First 3 apples, then 7 more #### 10 and 99 later", "10"),  # '####' wins over the last number
        ("a #### 1 b #### 2 and 3", "2"),  # the LAST '####'
        ("He works 3-4 hours, so 8", "8"),  # last number, hyphen range is not a minus
        ("between 3-4", "4"),  # a hyphen glued to a digit is not a sign
        ("####  no number here but 6 before", "6"),  # '####' without a number: number after it still found
        ("0.50 of the pie", "0.5"),
        ("007 agents", "7"),
        ("I don't know.", None),  # no number
        ("#### ", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_last_number_when_no_hashes():
    assert extract_answer("2 + 3 = 5, then 5 * 2 = 10") == "10"
    assert extract_answer("#### 7\n#### 8") == "8"


def test_gold_answer():
    assert gold_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72") == "72"
    assert gold_answer("#### 1,080") == "1080"
    with pytest.raises(ValueError, match="no '####'"):
        gold_answer("no final line 5")
    with pytest.raises(ValueError, match="no number"):
        gold_answer("#### none")


def test_prompts_and_targets():
    assert causal.gsm8k_prompt("How many {x}?") == "Question: How many {x}?\nAnswer:"  # braces are safe
    assert causal.gsm8k_target("Steps\n#### 4\n") == " Steps\n#### 4"
    with pytest.raises(ValueError, match="placeholder"):
        causal.fill("no placeholder", "q")


def test_boolq_prompt_is_defined_once():
    """BoolQ is data (pipeline/data/builtin.py, a multiple_choice entry); the library holds no copy of its prompt."""
    from pipeline.data import builtin

    assert not any(n.startswith("BOOLQ") or n.startswith("boolq") for n in dir(causal))
    assert builtin.TASKS["boolq"].options["prompt_template"] == builtin.BOOLQ_PREFIX + "{prompt}" + builtin.BOOLQ_SUFFIX + "\nAnswer:"


# --------------------------------------------------------------------------------------
# SFT tokenisation, truncation and collation
# --------------------------------------------------------------------------------------


def test_prompt_tokens_masked_target_kept_eos_appended(tok):
    ex = tokenize_sft(tok, "Q: 2+2?\nA:", " 4", max_length=64)
    p = tok("Q: 2+2?\nA:")["input_ids"]  # <s> + 11 characters
    t = tok(" 4", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == p + t + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * len(p) + t + [tok.eos_token_id]
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])
    assert ex["input_ids"][0] == tok.bos_token_id


def test_prompt_never_ends_with_eos_even_if_tokenizer_appends_one():
    t = char_tokenizer(add_bos=False)
    t._tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    assert t("ab")["input_ids"][-1] == t.eos_token_id
    ex = tokenize_sft(t, "ab", "c", max_length=16)
    assert ex["input_ids"] == t("ab", add_special_tokens=False)["input_ids"] + t("c", add_special_tokens=False)["input_ids"] + [
        t.eos_token_id
    ]


def test_target_truncated_from_the_right(tok):
    # prompt 1+5 = 6 tokens, target 10 + EOS = 11 tokens, window 10 -> 4 target tokens, no EOS
    ex = tokenize_sft(tok, "abcde", "0123456789", max_length=10)
    assert len(ex["input_ids"]) == 10
    assert ex["input_ids"][:6] == tok("abcde")["input_ids"]
    assert tok.decode(ex["input_ids"][6:]) == "0123"
    assert ex["labels"] == [IGNORE_INDEX] * 6 + ex["input_ids"][6:]
    assert tok.eos_token_id not in ex["input_ids"]


def test_long_prompt_truncated_from_the_left_keeping_bos_and_part_of_target(tok):
    prompt = "x" * 30 + "END"  # 34 tokens with BOS, more than the window
    ex = tokenize_sft(tok, prompt, "0123456789", max_length=16)  # k = min(11, 16 // 4) = 4 target tokens
    assert len(ex["input_ids"]) == 16
    assert ex["input_ids"][0] == tok.bos_token_id
    assert tok.decode(ex["input_ids"][1:12]) == "x" * 8 + "END"  # the END of the prompt survives
    assert tok.decode(ex["input_ids"][12:]) == "0123"
    assert ex["labels"][:12] == [IGNORE_INDEX] * 12 and ex["labels"][12:] == ex["input_ids"][12:]


def test_prompt_exactly_filling_the_window_still_keeps_target(tok):
    ex = tokenize_sft(tok, "x" * 9, "ab", max_length=10)  # prompt 10 tokens = window
    n_target = sum(l != IGNORE_INDEX for l in ex["labels"])
    assert len(ex["input_ids"]) == 10 and n_target >= 1
    assert tok.decode(ex["input_ids"][-n_target:]) == "ab"[:n_target]


def test_min_target_tokens_and_no_bos_tokenizer():
    t = char_tokenizer(add_bos=False)
    ex = tokenize_sft(t, "abcdefghij", "0123", max_length=8, min_target_tokens=5)  # target+EOS = 5 tokens
    assert t.decode(ex["input_ids"][:3]) == "hij"
    assert ex["input_ids"][3:] == t("0123", add_special_tokens=False)["input_ids"] + [t.eos_token_id]
    with pytest.raises(ValueError, match="max_length"):
        tokenize_sft(t, "a", "b", max_length=1)


def test_short_example_not_truncated(tok):
    ex = tokenize_sft(tok, "a", "b", max_length=4)
    assert len(ex["input_ids"]) == 4 and ex["labels"][-1] == tok.eos_token_id


def test_collator_pads_right(tok):
    a = tokenize_sft(tok, "ab", "c", 32)  # 5 tokens
    b = tokenize_sft(tok, "abcd", "ef", 32)  # 8 tokens
    batch = CausalCollator(tok.pad_token_id)([a, b])
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == a["input_ids"] + [tok.pad_token_id] * 3
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 3
    assert batch["labels"][0].tolist() == a["labels"] + [IGNORE_INDEX] * 3
    assert batch["input_ids"][1].tolist() == b["input_ids"] and batch["attention_mask"][1].all()
    assert CausalCollator(tok.pad_token_id, pad_to_multiple_of=16)([a, b])["input_ids"].shape == (2, 16)


def test_collator_left_and_without_labels(tok):
    batch = CausalCollator(7, padding_side="left")([{"input_ids": [1, 2]}, {"input_ids": [3, 4, 5]}])
    assert batch["input_ids"].tolist() == [[7, 1, 2], [3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert "labels" not in batch
    with pytest.raises(ValueError):
        CausalCollator(0, padding_side="middle")


def test_collator_accepts_tensors(tok):
    """A ``datasets`` split in torch format yields tensors, not lists."""
    a = tokenize_sft(tok, "ab", "c", 32)
    b = tokenize_sft(tok, "abcd", "ef", 32)
    as_tensors = [{k: torch.tensor(v) for k, v in e.items()} for e in (a, b)]
    collate = CausalCollator(tok.pad_token_id)
    for k, v in collate(as_tensors).items():
        assert torch.equal(v, collate([a, b])[k])


def test_padding_does_not_change_the_loss(tok):
    """Right padding with labels -100 gives the same per-example loss as no padding."""
    model = tiny_llama()
    a = tokenize_sft(tok, "Q: 1+1\nA:", " 2", 64)
    b = tokenize_sft(tok, "Q: what is 10+20?\nA:", " 30", 64)
    collate = CausalCollator(tok.pad_token_id)
    with torch.no_grad():
        alone = model(**collate([a])).loss
        padded_logits = model(**collate([a, b])).logits[0, : len(a["input_ids"])]
        ref_logits = model(**collate([a])).logits[0]
    # float32, batch of 2 (right-padded, masked) vs batch of 1: the masked keys add exact zeros after the softmax, so
    # only the BLAS blocking (it depends on the shapes) changes the summation order: a few ulp through two layers on
    # logits up to ~0.4 (observed 9e-8); rtol 1e-5 / atol 1e-6 ≈ 10x that.
    torch.testing.assert_close(padded_logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(alone)


# --------------------------------------------------------------------------------------
# Generation and scoring on tiny_llama
# --------------------------------------------------------------------------------------

PROMPTS = ["Question: 2+3?\nAnswer:", "Hi", "Question: how many legs does a cat have?\nAnswer:", "abc"]


def _greedy_unpadded(model, tok, prompt: str, n: int) -> str:
    ids = torch.tensor([causal.encode_prompt(tok, prompt)])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(out, skip_special_tokens=True)


def test_generate_left_padded_batch_equals_unpadded_greedy(tok):
    model = tiny_llama(seed=3)
    model.train()
    got = causal.generate_answers(model, tok, PROMPTS, max_new_tokens=6, batch_size=3)
    assert model.training  # training flag restored
    want = [_greedy_unpadded(model.eval(), tok, p, 6) for p in PROMPTS]
    assert got == want
    assert all(isinstance(g, str) for g in got) and any(g for g in got)
    assert causal.generate_answers(model, tok, PROMPTS, max_new_tokens=6, batch_size=1) == want


def test_generate_cuts_at_stop_string(tok):
    model = tiny_llama(seed=3)
    full = causal.generate_answers(model, tok, PROMPTS[:1], max_new_tokens=6)[0]
    assert len(full) >= 3
    stop = full[2:4]
    cut = causal.generate_answers(model, tok, PROMPTS[:1], max_new_tokens=6, stop=(stop,))[0]
    assert cut == full[: full.find(stop)]


def test_generate_on_peft_model(tok):
    model = adapters.attach_lora(
        tiny_llama(seed=3), adapters.LoraSpec(r=2, alpha=4, target_modules=causal.LLAMA_TARGET_MODULES), "CAUSAL_LM"
    )
    want = [_greedy_unpadded(model, tok, p, 4) for p in PROMPTS]  # B = 0: same as the base
    assert causal.generate_answers(model, tok, PROMPTS, max_new_tokens=4, batch_size=4) == want


def test_loglik_choice_matches_manual_computation(tok):
    model = tiny_llama(seed=5)
    prompts = ["Is water wet?\nAnswer:", "Q"]
    choices = [" true", " false", " x"]
    scores = causal.choice_logprobs(model, tok, prompts, choices, batch_size=4)  # batches mix prompts
    for i, p in enumerate(prompts):
        for j, c in enumerate(choices):
            pid = tok(p)["input_ids"]
            cid = tok(c, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([pid + cid])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            manual = sum(float(logp[len(pid) - 1 + m, cid[m]]) for m in range(len(cid)))
            # float32 log_softmax of batched, right-padded logits vs float64 log_softmax of unpadded float32 logits:
            # sums of log-probabilities up to ~13 carry about 1 ulp there (1e-6), plus the padding's ulp-level logit
            # change (test_padding_does_not_change_the_loss) (observed 1e-6); abs 1e-5 is 10x that.
            assert scores[i][j] == pytest.approx(manual, abs=1e-5)
    picks = causal.loglik_choice(model, tok, prompts, choices)
    assert picks == [max(range(3), key=lambda j: s[j]) for s in scores]


def test_evaluate_gsm8k_and_boolq_shapes(tok, monkeypatch):
    model = tiny_llama(seed=1)
    ex = [{"question": "1+1?", "answer": "1+1=2\n#### 2"}, {"question": "2+2?", "answer": "#### 4"}]
    res = causal.evaluate_gsm8k(model, tok, ex, max_new_tokens=3, return_predictions=True)
    assert res["n"] == 2 and 0.0 <= res["exact_match"] <= 1.0 and len(res["predictions"]) == 2
    # with generations forced, the metric is exact
    monkeypatch.setattr(causal, "generate_answers", lambda *a, **k: ["so #### 2", "it is 5"])
    res = causal.evaluate_gsm8k(model, tok, ex)
    assert res == {"exact_match": 0.5, "n": 2, "no_answer": 0}


# --------------------------------------------------------------------------------------
# Training with the SFT collate
# --------------------------------------------------------------------------------------


def _sft_data(tok) -> list[dict]:
    pairs = [
        (causal.gsm8k_prompt(f"{a}+{b}?"), causal.gsm8k_target(f"{a}+{b}={a + b}\n#### {a + b}"))
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]
    ]
    return causal.sft_dataset(tok, pairs, max_length=48)


@pytest.mark.parametrize("name, cfg", [("lora", {}), ("bilora", {"rho": 0.05, "aux_rank": 2, "aux_alpha": 4})])
def test_finetuner_sft_loss_finite_and_decreasing(tok, name, cfg):
    data = _sft_data(tok)
    model = tiny_llama(seed=0)
    torch.manual_seed(1)
    model = adapters.attach_lora(model, adapters.LoraSpec(r=4, alpha=8, target_modules=causal.LLAMA_TARGET_MODULES), "CAUSAL_LM")
    collate = CausalCollator(causal.pad_id(tok))
    batch = collate(data)
    with torch.no_grad():
        before = float(model(**batch).loss)
    loop = LoopConfig(max_steps=8, batch_size=len(data), lr=2e-2, warmup_ratio=0.0, log_every=100)
    ft = FineTuner(model, methods.build(name, cfg, seed=0), data, collate, loop, seed=0)  # one batch = the fixed batch
    summary = ft.train()
    losses = [h["loss"] for h in ft.history]
    assert all(math.isfinite(v) for v in losses) and summary["steps"] == 8
    # the first logged loss is the loss before any update: the same float32 forward (Bi-LoRA's auxiliary, B = 0, adds
    # exact zeros), once with autograd on, which may pick another kernel (observed identical); rel 1e-6 ≈ 10 ulp of ~5.
    assert losses[0] == pytest.approx(before, rel=1e-6)
    with adapters.primary_only(model), torch.no_grad():
        after = float(model(**batch).loss)
    assert after < before - 0.1, (before, after, losses)
