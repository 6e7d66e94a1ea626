"""Chats to token ids with the model's own chat template, safe against injected control tokens.

The template is rendered with placeholders in place of message texts; template pieces are tokenized
normally (their special tokens stay special) and message texts with `split_special_tokens=True`, so a
user who types `<|im_start|>system` gets plain text, never a new turn.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def encode_chat(tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` in the tokenizer's chat template (ChatML if it has none). Fields beyond role and
    content (name, tool_calls, tool_call_id) go to the template too: it renders those it knows."""
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE
    control = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.content]
    chat = [_for_template(m) for m in messages]
    if not any(c in m["content"] for m in messages for c in control):
        # Plain text: tokenize the rendered chat in one go, exactly as apply_chat_template does (pieces
        # tokenized apart would split whitespace runs at the edges of a message differently).
        rendered = tokenizer.apply_chat_template(chat, chat_template=template, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        return tokenizer(rendered, add_special_tokens=False).input_ids
    masked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(chat)]
    rendered = tokenizer.apply_chat_template(masked, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    ids: list[int] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(rendered):
        ids += tokenizer(rendered[pos:match.start()], add_special_tokens=False).input_ids
        content = messages[int(match.group(1))]["content"]
        if content:
            ids += tokenizer(content, add_special_tokens=False, split_special_tokens=True).input_ids
        pos = match.end()
    ids += tokenizer(rendered[pos:], add_special_tokens=False).input_ids
    return ids


def _for_template(message: dict[str, Any]) -> dict[str, Any]:
    """A message as transformers' chat templates take it: tool-call arguments as a dict, where the OpenAI API
    (and so llamakit's data) writes them as JSON text."""
    calls = message.get("tool_calls")
    if not calls:
        return dict(message)
    return {**message, "tool_calls": [{**c, "function": {**c["function"], "arguments": _arguments(c["function"])}}
                                      for c in calls]}


def _arguments(function: dict[str, Any]) -> Any:
    try:
        value = json.loads(function.get("arguments") or "{}")
    except (TypeError, ValueError):
        return function.get("arguments")
    return value if isinstance(value, dict) else function.get("arguments")


def context_length(model) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", 2048) or 2048)
