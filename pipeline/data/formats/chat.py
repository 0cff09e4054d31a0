"""``chat``: a list of messages (role ``messages``; per message ``role`` and ``content`` keys, remapped
by ``columns.role``/``columns.content`` for ShareGPT ``from``/``value`` data, roles renamed by ``role_map``).

Rules: an optional ``system`` message first, then ``user`` and ``assistant`` alternating, starting with
``user``, at least one ``assistant`` turn. Rendered with the tokenizer's chat template, or
``chat_template`` ('chatml' or an explicit Jinja string). Each assistant turn's text is the
difference between the conversation rendered up to and including it and the conversation before it
rendered with the generation prompt; segments are tokenised one by one (no special tokens added),
so the loss mask is exact: labels on the assistant segments only (all tokens with ``train_on_prompt``).
Evaluation: prompt = everything before the last assistant turn (with the generation prompt),
reference = its content; exact match after extraction plus the held-out loss.
"""

from __future__ import annotations

from typing import Any

from pipeline.data.formats._generation import IGNORE, Generation
from pipeline.data.formats._text import col
from pipeline.data.records import column
from pipeline.data.readers import DataError

ROLES = ("system", "user", "assistant")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED = {"chatml": CHATML}


class ChatTemplateError(DataError):
    pass


def template_of(tokenizer, opts: dict[str, Any]) -> str:
    tpl = opts.get("chat_template")
    if tpl:
        return NAMED.get(tpl, tpl)
    own = getattr(tokenizer, "chat_template", None)
    if not own:
        raise ChatTemplateError(
            f"data.datasets.{opts.get('name', '?')}: the base tokenizer has no chat template; set chat_template to 'chatml' "
            "or to an explicit Jinja template string"
        )
    return own


def render_text(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt)


def segments(tokenizer, template: str, messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, is_assistant) pieces whose concatenation is the rendered conversation."""
    out: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_text(tokenizer, template, messages[:i], True)
        upto = render_text(tokenizer, template, messages[: i + 1], False)
        if not before.startswith(done) or not upto.startswith(before):
            raise ChatTemplateError(
                "the chat template does not render conversations as growing prefixes; the assistant-only mask cannot be derived from it"
            )
        out += [(before[len(done) :], False), (upto[len(before) :], True)]
        done = upto
    full = render_text(tokenizer, template, messages, False)
    if len(full) > len(done):
        out.append((full[len(done) :], False))
    return [(t, a) for t, a in out if t]


class Chat(Generation):
    name = "chat"
    help = "messages with role/content"

    def normalise(self, record, opts, where):
        name = opts.get("name", "?")
        msgs = column(record, col(opts, "messages"), where, "messages", name)
        if not isinstance(msgs, list) or not msgs:
            raise DataError(
                f"{where}: column {col(opts, 'messages')!r} (messages) must be a non-empty list of messages, found {msgs!r:.60}"
            )
        rk, ck = col(opts, "role"), col(opts, "content")
        role_map = opts.get("role_map") or {}
        out = []
        for k, m in enumerate(msgs):
            at = f"{where}: message {k}"
            if not isinstance(m, dict) or rk not in m or ck not in m:
                raise DataError(
                    f"{at}: needs keys {rk!r} and {ck!r} (map them with columns.role / columns.content), found {sorted(m) if isinstance(m, dict) else type(m).__name__}"
                )
            role = role_map.get(m[rk], m[rk])
            if role not in ROLES:
                raise DataError(f"{at}: unknown role {m[rk]!r}; roles are {list(ROLES)} (rename others with data.datasets.{name}.role_map)")
            if not isinstance(m[ck], str) or not m[ck].strip():
                raise DataError(f"{at}: content must be a non-empty string, found {m[ck]!r:.60}")
            out.append({"role": role, "content": m[ck]})
        body = out[1:] if out[0]["role"] == "system" else out
        for k, m in enumerate(body):
            want = "user" if k % 2 == 0 else "assistant"
            if m["role"] != want:
                raise DataError(
                    f"{where}: roles out of order at message {k + len(out) - len(body)}: expected {want!r}, found {m['role']!r} (optional system first, then user and assistant alternating)"
                )
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: the conversation has no assistant turn (nothing to train on)")
        return {"messages": out}

    def render(self, rows, tokenizer, opts, max_length):
        tpl = template_of(tokenizer, opts)
        on_prompt = bool(opts.get("train_on_prompt"))
        cols: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "prompt": [], "reference": []}
        cut = dropped = 0
        for r in rows:
            msgs = r["messages"]
            ids, labels = [], []
            for seg, is_asst in segments(tokenizer, tpl, msgs):
                t = list(tokenizer(seg, add_special_tokens=False)["input_ids"])
                ids += t
                labels += t if (is_asst or on_prompt) else [IGNORE] * len(t)
            n_target = sum(l != IGNORE for l in labels)
            ids, labels = ids[:max_length], labels[:max_length]
            kept = sum(l != IGNORE for l in labels)
            cut += kept < n_target
            if kept == 0 or (not on_prompt and all(l == IGNORE for l in labels)):
                dropped += 1  # every assistant token was cut: nothing to learn from or score
                continue
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            cols["input_ids"].append(ids)
            cols["attention_mask"].append([1] * len(ids))
            cols["labels"].append(labels)
            cols["prompt"].append(render_text(tokenizer, tpl, msgs[:last], True))
            cols["reference"].append(msgs[last]["content"])
        return cols, {"target_truncated": cut, "dropped": dropped, "truncated": sum(len(x) >= max_length for x in cols["input_ids"])}


FORMAT = Chat()
