"""Rows in, chat messages / prompts / preference pairs out: every row format llamakit reads, in one place.

A row is one row of a JSONL, JSON or Parquet file or a `datasets` directory (`toolkit.io.located_rows`), in any
of: llamakit / OpenAI `{"messages": [{role, content, name?, weight?, tool_calls?}, ...]}`, `{"prompt", "chosen",
"rejected"}`, `{"prompt", "response", "score"}`; TRL conversational, standard, prompt-completion and
implicit-prompt rows; ShareGPT `{"conversations": [{from, value}, ...]}`; Alpaca `{"instruction",
"input", "output"}` and self-instruct seeds (`instances`); ChatLLaMA `{"user_input", "completion"}`; Anthropic
HH text ("\\n\\nHuman: ...\\n\\nAssistant: ...").

Each reader takes the row's place as `loc`, the UserError keywords (`file`, `line`) its file reader built, so a
bad row stops the run with one line naming file, row and field.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from toolkit.errors import UserError

Messages = list[dict[str, Any]]  # role, content, and the OpenAI fields check_messages keeps
Loc = Mapping[str, Any]  # UserError keywords naming a row: file (and line)

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system"}


# ------------------------------------------------------------------------------------------ fields


def check_messages(value: object, key: str = "messages", loc: Loc | None = None, *, sharegpt: bool = False,
                   require_text: bool = False) -> Messages:
    """Chat messages checked: {role, content} with text content (OpenAI text parts joined), and the OpenAI fields
    kept: name, weight (0 or 1 on assistant messages: 0 = no loss in sft), tool_calls (assistant; arguments as JSON
    text) and tool_call_id (tool). Absent (or null) fields stay absent.

    `sharegpt`: the items are ShareGPT {from, value} turns. `require_text`: a blank message is an error (a
    prompt to send); otherwise it is kept (an API request may hold an empty assistant turn).
    """
    loc = loc or {}
    role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
    if not isinstance(value, list) or not value:
        raise UserError(f"expected a non-empty list of {{{role_key}, {text_key}}} messages", field=key, **loc)
    return [_message(m, f"{key}[{i}]", loc, sharegpt, require_text) for i, m in enumerate(value)]


def _message(m: object, name: str, loc: Loc, sharegpt: bool, require_text: bool) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise UserError(f"must be an object, got {type(m).__name__}", field=name, **loc)
    if sharegpt:
        role = SHAREGPT_ROLES.get(str(m.get("from")).lower())
        if role is None:
            raise UserError(f"unknown speaker {m.get('from')!r} (known: {', '.join(SHAREGPT_ROLES)})",
                            field=f"{name}.from", **loc)
        message: dict[str, Any] = {"role": role, "content": _content(m.get("value"), f"{name}.value", loc)}
    else:
        role = m.get("role")
        if role not in ROLES:
            raise UserError(f"unknown role {role!r} (one of: {', '.join(ROLES)})", field=f"{name}.role", **loc)
        calls = m.get("tool_calls")
        content = m.get("content")
        message = {"role": role, "content": "" if content is None and calls else _content(content,
                                                                                           f"{name}.content", loc)}
        for field_name in ("name", "tool_call_id"):
            if m.get(field_name) is not None:
                if not isinstance(m[field_name], str):
                    raise UserError("must be a string", field=f"{name}.{field_name}", **loc)
                message[field_name] = m[field_name]
        if calls is not None:
            if role != "assistant":
                raise UserError("only on assistant messages", field=f"{name}.tool_calls", **loc)
            message["tool_calls"] = _tool_calls(calls, f"{name}.tool_calls", loc)
        if m.get("weight") is not None:
            message["weight"] = _weight(m["weight"], role, f"{name}.weight", loc)
    if require_text and not message["content"].strip() and not message.get("tool_calls"):
        raise UserError("empty text", field=f"{name}.{'value' if sharegpt else 'content'}", **loc)
    return message


def _content(content: object, name: str, loc: Loc) -> str:
    """Text, or OpenAI content parts whose text parts are joined; any other part is an error."""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                what = f"{kind} parts are not supported (text only)" if kind else "must be a {type, text} part"
                raise UserError(what, field=f"{name}[{j}]", **loc)
            texts.append(part["text"])
        return "".join(texts)
    if not isinstance(content, str):
        raise UserError("must be a string", field=name, **loc)
    return content


def _tool_calls(calls: object, name: str, loc: Loc) -> list[dict[str, Any]]:
    """OpenAI tool calls, kept as they are but for dict arguments, written as JSON text as the API sends them."""
    if not isinstance(calls, list) or not calls:
        raise UserError("expected a non-empty list of tool calls", field=name, **loc)
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        args = function.get("arguments", "") if isinstance(function, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or \
                not isinstance(args, (str, dict)):
            raise UserError("expected {name, arguments}", field=f"{name}[{i}].function", **loc)
        if isinstance(args, dict):
            args = json.dumps(args, ensure_ascii=False)
        out.append({**call, "function": {**function, "arguments": args}})
    return out


def _weight(weight: object, role: str, name: str, loc: Loc) -> int:
    if role != "assistant":
        raise UserError("only on assistant messages (OpenAI fine-tuning weight)", field=name, **loc)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
        raise UserError(f"must be 0 or 1, got {weight!r}", field=name, **loc)
    return int(weight)


def _text(row: dict[str, Any], key: str, loc: Loc, *, optional: bool = False) -> str | None:
    """row[key] as non-blank text; `optional`: None where it is absent, null or blank."""
    if key not in row or (optional and row[key] in (None, "")):
        if optional:
            return None
        raise UserError("missing", field=key, **loc)
    value = row[key]
    if not isinstance(value, str):
        raise UserError(f"expected a string, got {type(value).__name__}", field=key, **loc)
    if not value.strip():
        if optional:
            return None
        raise UserError("empty text", field=key, **loc)
    return value


def _with_input(instruction: str, extra: str | None) -> str:
    """An Alpaca instruction and its input as one user text."""
    return f"{instruction}\n\n{extra}" if extra else instruction


# ------------------------------------------------------------------------------------- HH text

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
HH_SPEAKERS = {"user": "Human", "assistant": "Assistant"}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_hh(text: str) -> Messages:
    """Anthropic HH text -> chat messages (each turn's text stripped)."""
    parts = HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text.lstrip())
    return [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
            for speaker, content in zip(parts[1::2], parts[2::2], strict=True)]


def split_hh(text: Any, key: str, loc: Loc) -> tuple[str, str]:
    """HH text -> (everything before its last Assistant turn, that turn's answer), verbatim: they join back
    (`hh_join`) to exactly `text`, so the reward model reads HH data as it was written."""
    if not isinstance(text, str):
        raise UserError(f"expected a string, got {type(text).__name__}", field=key, **loc)
    answers = [m for m in HH_TURN.finditer(text) if m.group(1) == "Assistant"]
    if not answers:
        raise UserError(f"no '{ASSISTANT.strip()}' turn in HH text", field=key, **loc)
    return text[:answers[-1].start()], text[answers[-1].end():]


def to_hh(messages: Messages) -> str:
    """Chat messages -> HH text; a system message is folded into the next human turn."""
    out, system = [], ""
    for m in messages:
        if m["role"] == "tool":
            raise UserError("HH text has no place for a tool message")
        if m["role"] == "system":
            system = m["content"].strip() + "\n\n"
            continue
        speaker = HH_SPEAKERS[m["role"]]
        out.append(f"\n\n{speaker}: {system if speaker == 'Human' else ''}{m['content']}")
        if speaker == "Human":
            system = ""
    return "".join(out)


def hh_prompt(messages: Messages) -> str:
    """A prompt as the reward model reads it: a lone user turn as its text, a dialogue as HH text; system
    messages left out (the policy sees them, the reward model does not)."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    return to_hh(turns)


def hh_join(prompt: str, response: str) -> str:
    """The one text the reward model reads for a prompt (plain or HH text) and a response."""
    if prompt.startswith(HUMAN.lstrip()):
        prompt = "\n\n" + prompt
    head = prompt if prompt.startswith(HUMAN) or not prompt else to_hh([{"role": "user", "content": prompt}])
    return head + to_hh([{"role": "assistant", "content": response}])


# TRL's standard (text) format: its trainers tokenise prompt + chosen as one text, so the separator between the two
# is part of the data. llamakit writes a chat prompt as HH text ending with the assistant's cue and each answer with
# the space that follows it: "\n\nHuman: q\n\nAssistant:" + " a" is exactly the HH dialogue.


def standard_prompt(messages: Messages) -> str:
    """Chat messages as HH text ending with the assistant's cue: a TRL standard-format prompt."""
    return to_hh(messages) + ASSISTANT


def standard_answer(text: str) -> str:
    """An answer as a TRL standard-format completion: the separator first."""
    return " " + text


def unwrap_standard(text: str) -> Messages | None:
    """The messages of a TRL standard-format prompt written by `standard_prompt`; None for any other text."""
    if not text.startswith(HUMAN) or not text.endswith(ASSISTANT):
        return None
    messages = parse_hh(text)
    return messages[:-1] if messages and messages[-1] == {"role": "assistant", "content": ""} else None


def unwrap_answer(value: Any) -> Any:
    """A TRL standard-format completion without its separator (any other value as it is)."""
    return value[1:] if isinstance(value, str) and value.startswith(" ") else value


# ------------------------------------------------------------------------------------ plain text


def dialogue_text(prompt: str | Messages) -> str:
    """A prompt as one text for judges, statistics and text-only formats: a lone user turn as it is, a dialogue
    as "User: ...\\n\\nAssistant: ..." turns (system messages left out)."""
    if isinstance(prompt, str):
        return prompt
    turns = [m for m in prompt if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in turns)


def prompt_messages(prompt: str | Messages) -> Messages:
    """A prompt (text or messages) as chat messages."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def split_last_answer(messages: Messages) -> tuple[Messages, str]:
    """A conversation -> (everything before its last assistant message, that message's text; "" if none)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return messages, ""
    return messages[:last], messages[last]["content"]


# ------------------------------------------------------------- conversations (sft) and prompts (rlhf)


def row_to_messages(row: dict[str, Any], path: str | os.PathLike, line: int | None,
                    for_prompt: bool = False) -> Messages:
    """One row as chat messages: a conversation with an assistant turn to learn from, or with `for_prompt` the
    turns before the answer (an answer in the row is checked, then dropped). `line` None: `path` names the row."""
    loc = {"file": str(path), "line": line}

    def answer(*keys: str) -> Messages:
        for key in keys:
            if key in row:
                return [{"role": "assistant", "content": _text(row, key, loc)}]
        if for_prompt:
            return []
        raise UserError(f"missing the answer (one of: {', '.join(keys)})", **loc)

    if "messages" in row:
        messages = check_messages(row["messages"], "messages", loc)
    elif "conversations" in row:
        messages = check_messages(row["conversations"], "conversations", loc, sharegpt=True)
    elif "instruction" in row:
        instruction = _text(row, "instruction", loc)
        user = _with_input(instruction, _text(row, "input", loc, optional=True))
        messages = [{"role": "user", "content": user}, *answer("output")]
    elif "user_input" in row:
        messages = [{"role": "user", "content": _text(row, "user_input", loc)}, *answer("completion")]
    elif "prompt" in row:
        messages = _prompt_completion(row, loc, for_prompt)
    elif isinstance(row.get("text"), str) and HUMAN in row["text"]:
        messages = check_messages(parse_hh(row["text"]), "text", loc)
    else:
        raise UserError("unknown row format: expected messages | conversations | instruction | user_input | prompt",
                        **loc)

    if for_prompt:
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not any(m["role"] == "user" for m in messages):
            raise UserError("no user turn to use as a prompt", **loc)
    elif not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise UserError("no assistant turn to learn from", **loc)
    return messages


def _prompt_completion(row: dict[str, Any], loc: Loc, for_prompt: bool) -> Messages:
    """TRL prompt-completion rows (messages or text; also a preference row's chosen answer): the prompt's turns,
    its assistant turns weighted 0 (TRL learns the completion only), then the completion."""
    standard = unwrap_standard(row["prompt"]) if isinstance(row["prompt"], str) else None
    if isinstance(row["prompt"], list):
        prompt = check_messages(row["prompt"], "prompt", loc)
    else:
        prompt = standard or [{"role": "user", "content": _text(row, "prompt", loc)}]
    keys = ("response", "completion", "chosen")
    key = next((k for k in keys if k in row), None)
    if key is None:
        if for_prompt:
            return prompt
        raise UserError(f"missing the answer (one of: {', '.join(keys)})", **loc)
    if isinstance(row[key], list):
        completion = check_messages(row[key], key, loc)
    else:
        text = _text(row, key, loc)
        completion = [{"role": "assistant", "content": unwrap_answer(text) if standard else text}]
    if for_prompt:
        return prompt
    return [{**m, "weight": 0} if m["role"] == "assistant" else m for m in prompt] + completion


# ------------------------------------------------------------------------ prompt rows (generate-data)

PROMPT_FIELDS = "prompt, messages, instruction, conversations (ShareGPT), chosen (HH text), user_input"


@dataclass
class PromptRow:
    """An input row of generate-data: the prompt to send, and any answers the row already holds."""

    index: int  # 0-based row number in the file
    line: int | None  # 1-based line of a JSONL file (None inside a JSON array)
    prompt: str | Messages  # text, or chat messages ending with a user message
    response: str | None = None  # an answer already in the row (output, response, last assistant turn)
    responses: list[str] = field(default_factory=list)  # several answers already in the row
    row: dict[str, Any] = field(default_factory=dict)


def _answer_text(row: dict[str, Any], key: str, loc: Loc) -> str:
    """An answer field: text, or (TRL conversational) the assistant's message."""
    if isinstance(row[key], list):
        return _last_answer(row[key], key, loc)[1]
    return _text(row, key, loc)


def _split_dialogue(messages: Messages, key: str, loc: Loc) -> tuple[Messages, str | None]:
    """A dialogue ending with an assistant turn -> (prompt up to the last user turn, that answer)."""
    answer = None
    if messages[-1]["role"] == "assistant":
        answer = messages[-1]["content"]
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise UserError("the dialogue must end with a user message (or a user message and its answer)",
                        field=key, **loc)
    return messages, answer


def parse_prompt_row(row: dict[str, Any], loc: Loc, index: int = 0, line: int | None = None) -> PromptRow:
    """One input row, in whichever supported format it is, -> PromptRow (or a UserError naming the field)."""
    response = None
    responses: list[str] = []
    if "messages" in row:
        messages = check_messages(row["messages"], "messages", loc, require_text=True)
        prompt, response = _split_dialogue(messages, "messages", loc)
    elif "conversations" in row:
        messages = check_messages(row["conversations"], "conversations", loc, sharegpt=True, require_text=True)
        prompt, response = _split_dialogue(messages, "conversations", loc)
    elif "prompt" in row:
        if isinstance(row["prompt"], list):
            prompt, _ = _split_dialogue(check_messages(row["prompt"], "prompt", loc, require_text=True), "prompt", loc)
        else:
            prompt = _text(row, "prompt", loc)
            prompt = unwrap_standard(prompt) or prompt
    elif "instruction" in row:  # Alpaca, or a self-instruct seed task with instances
        instruction = _text(row, "instruction", loc)
        extra = _text(row, "input", loc, optional=True)
        instances = row.get("instances")
        if extra is None and isinstance(instances, list) and instances and isinstance(instances[0], dict):
            extra = instances[0].get("input") or None
            response = instances[0].get("output") or None
        prompt = _with_input(instruction, extra)
        response = _text(row, "output", loc, optional=True) or response
    elif "user_input" in row:  # ChatLLaMA actor / reward rows
        prompt = _text(row, "user_input", loc)
        response = _text(row, "completion", loc, optional=True)
    elif "chosen" in row and isinstance(row["chosen"], str) and "Human:" in row["chosen"]:
        chosen = _text(row, "chosen", loc)
        prompt, response = _split_dialogue(parse_hh(chosen) or [{"role": "user", "content": ""}], "chosen", loc)
        if "rejected" in row:
            rejected = _split_dialogue(parse_hh(_text(row, "rejected", loc)), "rejected", loc)[1]
            responses = [r for r in (response, rejected) if r]
    else:
        raise UserError(f"no prompt field (expected one of: {PROMPT_FIELDS})", **loc)
    for key in ("response", "completion"):
        if key in row and response is None and "user_input" not in row:
            response = _answer_text(row, key, loc)
            if isinstance(row.get("prompt"), str) and isinstance(prompt, list):  # a TRL standard-format row
                response = unwrap_answer(response)
    if "responses" in row:
        value = row["responses"]
        if not isinstance(value, list) or not all(isinstance(r, str) and r.strip() for r in value):
            raise UserError("expected a list of non-empty strings", field="responses", **loc)
        responses = list(value)
    return PromptRow(index, line, prompt, response, responses, row)


# ----------------------------------------------------------------- llamakit rows (data convert, stats)


def row_kind(row: dict[str, Any]) -> str:
    """Which llamakit row a row becomes: conversation | preference | score | prompt."""
    if "chosen" in row and "rejected" in row:
        return "preference"
    if "messages" in row or "conversations" in row:
        return "conversation"
    if isinstance(row.get("text"), str) and HUMAN in row["text"]:  # an HH dialogue (`data convert --to hh`)
        return "conversation"
    if "score" in row and any(k in row for k in ("response", "completion")):
        return "score"
    if "prompt" in row and "completion" in row or "instruction" in row and row.get("output"):
        return "conversation"
    if "user_input" in row and row.get("completion"):
        return "conversation"
    return "prompt"


def _last_answer(value: Any, key: str, loc: Loc) -> tuple[Messages | None, str]:
    """A chosen/rejected value: text, or messages whose last one is the assistant's answer."""
    if isinstance(value, str):
        if not value.strip():
            raise UserError("empty text", field=key, **loc)
        return None, value
    messages = check_messages(value, key, loc, require_text=True)
    if messages[-1]["role"] != "assistant":
        raise UserError("the last message must be the assistant's answer", field=key, **loc)
    return messages[:-1] or None, messages[-1]["content"]


def _compact(prompt: str | Messages) -> str | Messages:
    """A prompt of one plain user message as its text: the one form every format writes it back as."""
    if isinstance(prompt, list) and len(prompt) == 1 and prompt[0].keys() == {"role", "content"} \
            and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return prompt


def llamakit_row(row: dict[str, Any], loc: Loc) -> dict[str, Any]:
    """Any supported row -> a llamakit row of its `row_kind`; keeps id and meta.

        conversation  {"messages": [{"role", "content", ...}, ...]}
        preference    {"prompt": text | messages, "chosen": text, "rejected": text, margin?, score_chosen?, ...}
        score         {"prompt": text | messages, "response": text, "score": number}
        prompt        {"prompt": text | messages}
    """
    keep = {k: row[k] for k in ("id", "meta") if k in row}
    what = row_kind(row)
    if what == "preference":
        extra = {k: row[k] for k in ("margin", "score_chosen", "score_rejected") if k in row}
        return {**keep, **_preference(row, loc), **extra}
    if what == "conversation":
        return {**keep, "messages": _conversation(row, loc)}
    p = parse_prompt_row(row, loc)
    if what == "score":
        score = row["score"]
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            raise UserError("expected a number", field="score", **loc)
        return {**keep, "prompt": _compact(p.prompt), "response": p.response, "score": score}
    return {**keep, "prompt": _compact(p.prompt)}


def _preference(row: dict[str, Any], loc: Loc) -> dict[str, Any]:
    chosen_v, rejected_v = row["chosen"], row["rejected"]
    if "prompt" not in row and isinstance(chosen_v, str) and "Human:" in chosen_v:  # HH text
        chosen_m, rejected_m = parse_hh(chosen_v), parse_hh(rejected_v if isinstance(rejected_v, str) else "")
        if len(chosen_m) < 2 or chosen_m[-1]["role"] != "assistant" or not rejected_m:
            raise UserError("not an HH dialogue ending with an Assistant turn", field="chosen", **loc)
        return {"prompt": _compact(chosen_m[:-1]), "chosen": chosen_m[-1]["content"],
                "rejected": rejected_m[-1]["content"]}
    standard = unwrap_standard(row["prompt"]) if isinstance(row.get("prompt"), str) else None
    if standard:
        chosen_v, rejected_v = unwrap_answer(chosen_v), unwrap_answer(rejected_v)
    implicit, chosen = _last_answer(chosen_v, "chosen", loc)
    _, rejected = _last_answer(rejected_v, "rejected", loc)
    if standard:
        prompt: str | Messages = standard
    elif "prompt" in row:
        prompt = row["prompt"] if isinstance(row["prompt"], str) else \
            check_messages(row["prompt"], "prompt", loc, require_text=True)
    elif implicit:
        prompt = implicit
    else:
        raise UserError("missing", field="prompt", **loc)
    return {"prompt": _compact(prompt), "chosen": chosen, "rejected": rejected}


def _conversation(row: dict[str, Any], loc: Loc) -> Messages:
    if "messages" in row:
        return check_messages(row["messages"], "messages", loc, require_text=True)
    if "conversations" in row:
        return check_messages(row["conversations"], "conversations", loc, sharegpt=True, require_text=True)
    if isinstance(row.get("text"), str) and HUMAN in row["text"]:
        return check_messages(parse_hh(row["text"]), "text", loc, require_text=True)
    if isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list):  # TRL conversational
        return [*check_messages(row["prompt"], "prompt", loc, require_text=True),
                *check_messages(row["completion"], "completion", loc, require_text=True)]
    p = parse_prompt_row(row, loc)
    if p.response is None or not p.response.strip():
        raise UserError("missing or empty answer", field="completion" if "completion" in row else "output", **loc)
    return [*prompt_messages(p.prompt), {"role": "assistant", "content": p.response}]


# ------------------------------------------------------------ preference pairs and scored answers (reward)


@dataclass
class Pair:
    """A preference pair as the reward model reads it: HH prompt text and the two answers."""

    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0
    line: int | None = None
    rejected_prompt: str | None = None  # only where a row's two dialogues differ before the last answer

    @property
    def chosen_text(self) -> str:
        return hh_join(self.prompt, self.chosen)

    @property
    def rejected_text(self) -> str:
        return hh_join(self.rejected_prompt if self.rejected_prompt is not None else self.prompt, self.rejected)


@dataclass
class Scored:
    """One answer with its score (ChatLLaMA reward rows, llamakit score rows)."""

    prompt: str
    response: str
    score: float
    line: int | None = None

    @property
    def text(self) -> str:
        return hh_join(self.prompt, self.response)


def preference_pair(row: dict[str, Any], fmt: str, loc: Loc) -> Pair:
    """A preference row of `fmt` (preference | hh | implicit) -> Pair; a pair whose two texts are the same is an
    error."""
    for key in ("chosen", "rejected") + (("prompt",) if fmt == "preference" else ()):
        if key not in row:
            raise UserError("missing", field=key, **loc)
    margin = _margin(row, loc)
    line = loc.get("line")
    if fmt == "hh":
        chosen_prompt, chosen = split_hh(row["chosen"], "chosen", loc)
        rejected_prompt, rejected = split_hh(row["rejected"], "rejected", loc)
        pair = Pair(chosen_prompt, chosen, rejected, margin, line,
                    None if rejected_prompt == chosen_prompt else rejected_prompt)
    elif fmt == "implicit":
        pair = _implicit(row, loc, margin)
    else:
        prompt, chosen, rejected = _unwrap_standard_row(row, "prompt", ("chosen", "rejected"))
        pair = Pair(hh_prompt_field(prompt, "prompt", loc), hh_answer_field(chosen, "chosen", loc),
                    hh_answer_field(rejected, "rejected", loc), margin, line)
        # A blank prompt or a blank preferred answer is a broken row, not a preference; a blank *rejected*
        # answer is kept (models do answer with nothing, and that answer is rightly the worse one).
        for key, text in (("prompt", pair.prompt), ("chosen", pair.chosen)):
            if not text.strip():
                raise UserError("empty text", field=key, **loc)
    if pair.chosen_text == pair.rejected_text:
        raise UserError("identical to 'chosen' (a pair must differ)", field="rejected", **loc)
    return pair


def scored_answer(row: dict[str, Any], loc: Loc) -> Scored:
    """A ChatLLaMA reward row (user_input, completion, score) or a llamakit score row -> Scored."""
    prompt_key = "user_input" if "user_input" in row else "prompt"
    answer_key = "completion" if "completion" in row else "response"
    for key in (prompt_key, answer_key, "score"):
        if key not in row:
            raise UserError("missing", field=key, **loc)
    prompt, answer = _unwrap_standard_row(row, prompt_key, (answer_key,))
    prompt = hh_prompt_field(prompt, prompt_key, loc)
    response = hh_answer_field(answer, answer_key, loc)
    score = row["score"]
    if isinstance(score, str):
        try:
            score = float(score)
        except ValueError:
            raise UserError(f"expected a number, got {score!r}", field="score", **loc) from None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or score != score:
        raise UserError(f"expected a number, got {type(score).__name__}", field="score", **loc)
    return Scored(prompt, response, float(score), loc.get("line"))


def _unwrap_standard_row(row: dict[str, Any], prompt_key: str, answer_keys: tuple[str, ...]) -> list[Any]:
    """[prompt, *answers] of a row; a TRL standard-format row's as messages and answers without the separator."""
    standard = unwrap_standard(row[prompt_key]) if isinstance(row[prompt_key], str) else None
    if standard is None:
        return [row[prompt_key], *(row[k] for k in answer_keys)]
    return [standard, *(unwrap_answer(row[k]) for k in answer_keys)]


def _margin(row: dict[str, Any], loc: Loc) -> float:
    value = row.get("margin")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"expected a number, got {type(value).__name__}", field="margin", **loc)
    return float(value)


def hh_prompt_field(value: Any, key: str, loc: Loc) -> str:
    """A prompt field (text, or messages) as the reward model reads it (`hh_prompt`)."""
    return _text_or_messages(value, key, loc, _hh_prompt_of)


def hh_answer_field(value: Any, key: str, loc: Loc) -> str:
    """An answer field (text, or assistant messages, maybe with later turns) as one text."""
    return _text_or_messages(value, key, loc, _hh_answer_of)


def _text_or_messages(value: Any, key: str, loc: Loc, render: Callable[[Messages, str, Loc], str]) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return render(check_messages(value, key, loc), key, loc)
    raise UserError(f"expected a string or a list of messages, got {type(value).__name__}", field=key, **loc)


def _hh_prompt_of(messages: Messages, key: str, loc: Loc) -> str:
    if not any(m["role"] != "system" for m in messages):
        raise UserError("no user or assistant message", field=key, **loc)
    return hh_prompt(messages)


def _hh_answer_of(messages: Messages, key: str, loc: Loc) -> str:
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[0]["role"] != "assistant":
        raise UserError("expected the answer as assistant message(s)", field=key, **loc)
    return turns[0]["content"] + to_hh(turns[1:])


def _implicit(row: dict[str, Any], loc: Loc, margin: float) -> Pair:
    """TRL's implicit-prompt rows: the shared start of chosen and rejected is the prompt."""
    chosen, rejected, line = row["chosen"], row["rejected"], loc.get("line")
    if isinstance(chosen, list) and isinstance(rejected, list):
        c = check_messages(chosen, "chosen", loc)
        r = check_messages(rejected, "rejected", loc)
        n = 0
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        while n > 0 and c[n - 1]["role"] == "assistant":  # the answers start at an assistant turn
            n -= 1
        if n == 0:
            raise UserError("no shared user turn before the answers", field="chosen", **loc)
        return Pair(_hh_prompt_of(c[:n], "chosen", loc), _hh_answer_of(c[n:], "chosen", loc),
                    _hh_answer_of(r[n:], "rejected", loc), margin, line)
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise UserError(f"expected a string, got {type(value).__name__}", field=key, **loc)
    n = len(os.path.commonprefix([chosen, rejected]))
    space = max(chosen.rfind(" ", 0, n), chosen.rfind("\n", 0, n))
    n = space + 1 if space >= 0 else 0  # cut between words, not inside one
    return Pair(chosen[:n].rstrip(), chosen[n:], rejected[n:], margin, line)
