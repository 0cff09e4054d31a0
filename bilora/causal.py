"""Causal-LM fine-tuning and evaluation: prompt formats, SFT tokenisation, padding, generation, scoring.

Library code: it never imports ``pipeline``, ``stages``, mlflow or dvc. Examples are the dicts the
task readers return (``{"question": str, "answer": str}`` for GSM8K and BoolQ).

Formats
-------
* **GSM8K**: prompt ``"Question: {question}\\nAnswer:"`` (:data:`GSM8K_TEMPLATE`), target
  ``" " + <worked solution ending in "#### N">``. The model learns to write the solution and its
  ``####`` line after ``Answer:``; :func:`extract_answer` reads the number back. This differs from
  the Bi-LoRA authors' ``"Q: ...\\nA: "`` MetaMathQA template (docs/methods.md, "Evaluation") on purpose: the space
  belongs to the target, so BPE tokenisers see ``" Janet"`` as in running text.
* **Multiple choice** (BoolQ and other fixed-answer tasks, defined as data in ``pipeline.data.builtin``):
  scored by **log-likelihood** with :func:`loglik_choice`: the prediction is the choice whose
  tokens have the highest summed log-probability after the prompt. It never produces an
  unparseable answer and costs one forward pass per (prompt, choice).

Templates hold the literal placeholder ``{question}`` and are filled with ``str.replace`` (not
``str.format``), so questions containing braces are safe.

Tokenisation (:func:`tokenize_sft`)
-----------------------------------
The prompt is encoded with the tokenizer's special tokens (a BOS where the tokenizer adds one,
never a trailing EOS), the target without them, and the EOS id is appended to the target. The
two id lists are concatenated, so generation at evaluation time starts exactly where the
training target started (the prompt is encoded the same way by :func:`encode_prompt`).
Labels are ``-100`` on every prompt token; the target tokens (EOS included) are kept.

Padding: right padding for training (:class:`CausalCollator`; Llama-style models do not derive
position ids from the attention mask in a plain forward, so left padding would shift positions),
left padding for batched generation (:func:`generate_answers`, where ``generate`` does derive
them), right padding for log-likelihood scoring.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from bilora import metrics

IGNORE_INDEX = -100

GSM8K_TEMPLATE = "Question: {question}\nAnswer:"
#: Generation stops (and the text is cut) where the model starts a new question.
GSM8K_STOP = ("\nQuestion:",)

#: LoRA target modules for Llama-family causal LMs (all linear layers of attention and MLP).
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------
# Prompts and targets
# --------------------------------------------------------------------------------------


def fill(template: str, question: str) -> str:
    """``template`` with ``{question}`` replaced by ``question`` (literal replace; braces in the question are safe)."""
    if "{question}" not in template:
        raise ValueError(f"prompt template {template!r} has no '{{question}}' placeholder")
    return template.replace("{question}", question)


def gsm8k_prompt(question: str, template: str = GSM8K_TEMPLATE) -> str:
    return fill(template, question)


def gsm8k_target(solution: str) -> str:
    """`" " + solution`: the worked solution, calculator annotations and final ``#### N`` line included."""
    return " " + solution.strip()


# --------------------------------------------------------------------------------------
# GSM8K answer extraction
# --------------------------------------------------------------------------------------

# A number: optional minus (not when glued to a preceding word/digit, as in "3-4"), optional "$",
# digits with proper thousands groups ("1,234") or plain digits, optional decimals.
_NUMBER = re.compile(r"(?P<neg>(?<![\w.])-)?\$?(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<dec>\.\d+)?")


def _numbers(text: str) -> list[str]:
    out = []
    for m in _NUMBER.finditer(text):
        out.append(normalise_number((m.group("neg") or "") + m.group("int") + (m.group("dec") or "")))
    return out


def normalise_number(s: str) -> str:
    """Canonical form of a number string: commas dropped, sign kept, leading zeros and trailing
    decimal zeros/point dropped ("1,234" -> "1234", "5.0" -> "5", "5." -> "5", "-0" -> "0", "0.50" -> "0.5")."""
    s = s.strip().replace(",", "").replace("$", "")
    neg = s.startswith("-")
    s = s.lstrip("+-")
    if "." in s:
        whole, frac = s.split(".", 1)
        frac = frac.rstrip("0")
    else:
        whole, frac = s, ""
    whole = whole.lstrip("0") or "0"
    out = whole + ("." + frac if frac else "")
    return "-" + out if neg and out != "0" else out


def extract_answer(text: str) -> str | None:
    """The final numeric answer in a model's (or a reference) solution, normalised; ``None`` if none.

    * If ``####`` occurs, the first number after the **last** ``####``; otherwise the **last** number
      in the text (``None`` when ``####`` is followed by no number and the text has no other).
    * Commas in thousands groups are removed ("1,234" -> "1234"); a leading "-" is kept ("-5"),
      but not a hyphen glued to a word or digit ("3-4" -> "4"); "$" before and units, "%", "." or
      "$" after the number are ignored; "5.0", "5.00" and "5." all give "5".

    Deviation from the Bi-LoRA authors' script (docs/methods.md, "Evaluation"): they drop the sign on both sides;
    here it is kept on both sides (``gold_answer`` uses the same function), which only matters for
    the few GSM8K items with negative answers.
    """
    if "####" in text:
        nums = _numbers(text.rsplit("####", 1)[1])
        if nums:
            return nums[0]
    nums = _numbers(text)
    return nums[-1] if nums else None


def gold_answer(solution: str) -> str:
    """The reference answer of a GSM8K solution (the number on its ``####`` line), normalised."""
    if "####" not in solution:
        raise ValueError(f"GSM8K solution has no '####' line: {solution[-80:]!r}")
    ans = extract_answer(solution)
    if ans is None:
        raise ValueError(f"GSM8K solution has no number after '####': {solution[-80:]!r}")
    return ans


# --------------------------------------------------------------------------------------
# Tokenisation and collation
# --------------------------------------------------------------------------------------


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token before tokenising SFT targets")
    return int(eos)


def pad_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS, else 0 (masked out anyway)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids with the tokenizer's leading special tokens (BOS where it adds one) but never a trailing EOS."""
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] == eos and eos != tokenizer.bos_token_id:
        plain = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not plain or plain[-1] != eos:
            ids.pop()
    return ids


def _adds_bos(tokenizer, prompt_ids: list[int]) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and bool(prompt_ids) and prompt_ids[0] == bos


def tokenize_sft(tokenizer, prompt: str, target: str, max_length: int, *, min_target_tokens: int | None = None) -> dict[str, list[int]]:
    """One supervised example: ``{"input_ids", "attention_mask", "labels"}`` (lists of ints).

    ``input_ids = prompt_ids + target_ids + [eos]``; ``labels`` is ``-100`` on the prompt positions and
    equals ``input_ids`` on the target positions (EOS included); ``attention_mask`` is all ones.

    Truncation to ``max_length`` tokens never drops the whole target. With ``k = min(len(target
    incl. EOS), min_target_tokens)`` and ``min_target_tokens`` defaulting to ``max(1, max_length // 4)``:

    * the sequence fits: nothing is cut;
    * the prompt leaves room for at least ``k`` target tokens: the **target is cut from the right**
      (the EOS is then lost, as the solution was not finished);
    * otherwise (in particular when the prompt alone fills ``max_length``): the target keeps its
      first ``k`` tokens and the **prompt is cut from the left** to the remaining
      ``max_length - k`` tokens (its BOS, if the tokenizer adds one, is kept in front).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one prompt and one target token), got {max_length}")
    p = encode_prompt(tokenizer, prompt)
    t = list(tokenizer(target, add_special_tokens=False)["input_ids"]) + [_eos_id(tokenizer)]
    if len(p) + len(t) > max_length:
        k = min(len(t), max(1, min_target_tokens if min_target_tokens is not None else max_length // 4))
        if len(p) <= max_length - k:
            t = t[: max_length - len(p)]
        else:
            t = t[:k]
            budget = max_length - k
            if _adds_bos(tokenizer, p) and budget >= 1:
                p = [p[0]] + (p[len(p) - (budget - 1) :] if budget > 1 else [])
            else:
                p = p[len(p) - budget :]
    ids = p + t
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(p) + t}


def sft_dataset(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int, **kw: Any) -> list[dict[str, list[int]]]:
    """:func:`tokenize_sft` over ``(prompt, target)`` pairs."""
    return [tokenize_sft(tokenizer, p, t, max_length, **kw) for p, t in pairs]


def gsm8k_pairs(examples: Sequence[dict], template: str = GSM8K_TEMPLATE) -> list[tuple[str, str]]:
    return [(gsm8k_prompt(e["question"], template), gsm8k_target(e["answer"])) for e in examples]


def _pad(rows: Sequence[Sequence[int]], value: int, length: int, side: str) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            if side == "right":
                out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            else:
                out[i, length - len(r) :] = torch.as_tensor(r, dtype=torch.long)
    return out


def _mask(example: dict[str, Sequence[int]]) -> Sequence[int]:
    mask = example.get("attention_mask")
    return [1] * len(example["input_ids"]) if mask is None else mask


@dataclass(frozen=True)
class CausalCollator:
    """Dynamic padding of :func:`tokenize_sft` examples into a batch of ``(B, L)`` int64 tensors.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 and ``labels`` (when
    present) with -100; ``L`` is the longest example, rounded up to ``pad_to_multiple_of``. Right
    padding (the default) is the one to train with. Sequences may be lists, numpy arrays or tensors
    (a ``datasets`` split in torch format); other keys of the examples are ignored.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")

    def __call__(self, examples: Sequence[dict[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": _pad([e["input_ids"] for e in examples], self.pad_token_id, length, self.padding_side),
            "attention_mask": _pad([_mask(e) for e in examples], 0, length, self.padding_side),
        }
        if "labels" in examples[0]:
            for e in examples:
                if len(e["labels"]) != len(e["input_ids"]):
                    raise ValueError(f"labels ({len(e['labels'])}) and input_ids ({len(e['input_ids'])}) differ in length")
            batch["labels"] = _pad([e["labels"] for e in examples], IGNORE_INDEX, length, self.padding_side)
        return batch


# --------------------------------------------------------------------------------------
# Generation and scoring
# --------------------------------------------------------------------------------------


def _model_device(model: torch.nn.Module) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    return next(model.parameters()).device


class _EvalMode:
    """Put the model in eval mode for the block; restore its training flag afterwards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.was_training)


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 256,
    batch_size: int = 16,
    *,
    stop: Sequence[str] = (),
) -> list[str]:
    """Greedy continuations of ``prompts`` (only the new text, in input order).

    Prompts are encoded by :func:`encode_prompt`, grouped by length (longest first) into batches of
    ``batch_size``, **left**-padded, and decoded greedily for at most ``max_new_tokens`` tokens.
    Each continuation is cut at its first EOS, decoded with special tokens skipped, and cut before
    the first occurrence of any string in ``stop`` (generation of a row also ends there, through
    ``generate``'s ``stop_strings``). The model's training flag is restored afterwards.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} encodes to no tokens; generation needs at least one")
    pad, eos, dev = pad_id(tokenizer), tokenizer.eos_token_id, _model_device(model)
    gen_kw: dict[str, Any] = dict(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
    stop = tuple(s for s in stop if s)
    if stop:
        gen_kw.update(stop_strings=list(stop), tokenizer=tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    with _EvalMode(model):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            length = max(len(encoded[i]) for i in idx)
            input_ids = _pad([encoded[i] for i in idx], pad, length, "left").to(dev)
            attention_mask = _pad([[1] * len(encoded[i]) for i in idx], 0, length, "left").to(dev)
            seqs = model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kw)
            for i, row in zip(idx, seqs[:, length:].tolist()):
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                out[i] = _cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop)
    return out


@torch.no_grad()
def choice_logprobs(
    model: torch.nn.Module, tokenizer, prompts: Sequence[str], choices: Sequence[str], batch_size: int = 16
) -> list[list[float]]:
    """``[i][j]`` = summed log-probability of the tokens of ``choices[j]`` (encoded without special
    tokens) following ``prompts[i]`` (encoded by :func:`encode_prompt`). Not length-normalised.

    The (prompt, choice) sequences are scored ``batch_size`` at a time, right-padded, one forward each.
    """
    if not choices:
        raise ValueError("no choices to score")
    c_ids = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices]
    if any(not c for c in c_ids):
        raise ValueError(f"every choice must encode to at least one token: {list(choices)}")
    rows: list[tuple[int, int, list[int], int]] = []  # (prompt index, choice index, ids, prompt length)
    for i, prompt in enumerate(prompts):
        p = encode_prompt(tokenizer, prompt)
        if not p:
            raise ValueError(f"prompt {i} encodes to no tokens; the first choice token needs a context")
        rows += [(i, j, p + c, len(p)) for j, c in enumerate(c_ids)]
    scores = [[0.0] * len(choices) for _ in prompts]
    pad, dev = pad_id(tokenizer), _model_device(model)
    with _EvalMode(model):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            length = max(len(r[2]) for r in chunk)
            input_ids = _pad([r[2] for r in chunk], pad, length, "right").to(dev)
            attention_mask = _pad([[1] * len(r[2]) for r in chunk], 0, length, "right").to(dev)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, L, V)
            k = max(len(r[2]) - r[3] for r in chunk)  # longest choice in the chunk
            # position t predicts token t+1: choice tokens r[3] .. are predicted from r[3]-1 ..
            pos = torch.tensor([[min(r[3] - 1 + m, length - 1) for m in range(k)] for r in chunk], device=logits.device)  # (B, k)
            tgt = torch.tensor([[r[2][min(r[3] + m, len(r[2]) - 1)] for m in range(k)] for r in chunk], device=logits.device)  # (B, k)
            valid = torch.tensor([[m < len(r[2]) - r[3] for m in range(k)] for r in chunk], device=logits.device)  # (B, k)
            picked = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).float()  # (B, k, V)
            lp = torch.log_softmax(picked, dim=-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # (B, k)
            totals = (lp * valid).sum(dim=1).tolist()
            for (i, j, _, _), s in zip(chunk, totals):
                scores[i][j] = float(s)
    return scores


def loglik_choice(model: torch.nn.Module, tokenizer, prompts: Sequence[str], choices: Sequence[str], batch_size: int = 16) -> list[int]:
    """Index of the most likely choice per prompt (summed log-probability; ties go to the first)."""
    return [max(range(len(s)), key=lambda j: (s[j], -j)) for s in choice_logprobs(model, tokenizer, prompts, choices, batch_size)]


# --------------------------------------------------------------------------------------
# Task evaluation
# --------------------------------------------------------------------------------------


def evaluate_gsm8k(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[dict],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    template: str = GSM8K_TEMPLATE,
    stop: Sequence[str] = GSM8K_STOP,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Greedy GSM8K exact match: ``{"exact_match": float in [0, 1], "n": int, "no_answer": int}``.

    ``no_answer`` counts generations with no number (scored wrong). With ``return_predictions``
    the result also holds ``"predictions"``: ``[{"generation", "prediction", "gold"}]`` in input order.
    For Bi-LoRA models, call this inside ``adapters.primary_only(model)``.
    """
    if not examples:
        raise ValueError("no GSM8K examples to evaluate")
    golds = [gold_answer(e["answer"]) for e in examples]
    gens = generate_answers(
        model, tokenizer, [gsm8k_prompt(e["question"], template) for e in examples], max_new_tokens, batch_size, stop=stop
    )
    preds = [extract_answer(g) for g in gens]
    result: dict[str, Any] = {
        "exact_match": metrics.exact_match(["" if p is None else p for p in preds], golds),
        "n": len(examples),
        "no_answer": sum(p is None for p in preds),
    }
    if return_predictions:
        result["predictions"] = [{"generation": g, "prediction": p, "gold": y} for g, p, y in zip(gens, preds, golds)]
    return result


# -- quality check of a quantized base (stage load_base) -----------------------------------------
#: Fixed text and question of the causal-LM quality check (perplexity, one greedy answer).
QUALITY_TEXT = (
    "The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889 "
    "for the World's Fair. Paris is also home to the Louvre, the most visited museum in the world."
)
QUALITY_PROMPT = "Question: What is the capital of France?\nAnswer:"


@torch.no_grad()
def quality_check(model: torch.nn.Module, tokenizer: Any, max_new_tokens: int = 16) -> dict[str, Any]:
    """Causal LMs only: perplexity of the quantized model on :data:`QUALITY_TEXT` and its greedy
    answer to :data:`QUALITY_PROMPT` (a quick sign that quantization kept the model usable)."""
    model.eval()
    dev = next(model.parameters()).device
    ids = tokenizer(QUALITY_TEXT, return_tensors="pt")["input_ids"].to(dev)
    loss = float(model(input_ids=ids, labels=ids).loss)
    answer = generate_answers(model, tokenizer, [QUALITY_PROMPT], max_new_tokens=max_new_tokens, batch_size=1, stop=GSM8K_STOP)[0]
    return {
        "perplexity": math.exp(loss),
        "text_tokens": int(ids.shape[1]),
        "prompt": QUALITY_PROMPT,
        "greedy_answer": answer,
        "max_new_tokens": max_new_tokens,
    }
