"""Prompts in, rollouts out: the prompt file, the per-step prompt batch, and batched KV-cache sampling.

A rollout is laid out as `[left-padded prompt | right-padded response]`, so every row's response
starts at the same column `context_length` and the logits that predict it are one slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from toolkit.chat_format import encode_chat
from toolkit.errors import UserError
from toolkit.io import read_rows
from toolkit.rows import hh_prompt, row_to_messages


@dataclass
class TokenizedPrompt:
    """One prompt of the prompt file, read (`toolkit.rows`) and tokenized for the policy."""

    text: str  # what the reward sees
    ids: list[int]  # what the policy sees (chat template applied)
    row: int  # 1-based row in the prompt file
    context: dict[str, Any] = field(default_factory=dict)  # the row's fields, for rewards that read them
    messages: list[dict[str, str]] = field(default_factory=list)  # the chat as sent (system prompt included)


def load_prompts(path: str, tokenizer, *, chat_template: bool = True, system_prompt: str = "",
                 max_prompt_tokens: int = 256, truncate: bool = False) -> tuple[list[TokenizedPrompt], int]:
    """Read and tokenize a prompt file; return (prompts, number truncated).

    Rows: `prompt` (text) | `messages` / `conversations` (the turns before the last assistant turn) |
    Alpaca `instruction` + `input` | ChatLLaMA `user_input`. A .txt file holds one prompt per line.
    `tokenizer` None reads the prompts without tokenizing them (`ids` stay empty): for a server, which
    applies its own chat template to `messages`.
    """
    if not path:
        raise UserError("--prompts is required (a JSONL/JSON file of prompts, or a .txt file, one per line)")
    file = Path(path)
    if file.suffix == ".txt":
        if not file.is_file():
            raise UserError("no such file", file=path)
        lines = file.read_text(encoding="utf-8").splitlines()
        rows = [({"prompt": line.replace("\\n", "\n")}, n) for n, line in enumerate(lines, 1) if line.strip()]
        if not rows:
            raise UserError("file holds no prompts", file=path)
    else:
        rows = [(row, n) for n, row in enumerate(read_rows(path), 1)]
    prompts, truncated = [], 0
    for row, n in rows:
        messages = row_to_messages(row, path, n, for_prompt=True)
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        if tokenizer is None:
            ids = []
        elif chat_template:
            ids = encode_chat(tokenizer, messages, add_generation_prompt=True)
        else:
            ids = tokenizer("\n\n".join(m["content"] for m in messages)).input_ids
        if len(ids) > max_prompt_tokens:
            if not truncate:
                raise UserError(f"prompt is {len(ids)} tokens, longer than --max-prompt-tokens {max_prompt_tokens} "
                                "(raise it, or pass --truncate-prompts to keep the last tokens)", file=path, line=n)
            ids, truncated = ids[-max_prompt_tokens:], truncated + 1
        prompts.append(TokenizedPrompt(hh_prompt(messages), ids, n, row, messages))
    return prompts, truncated


# The prompt order of pass `epoch` over the file is seeded with seed · PROMPT_ORDER_STRIDE + epoch: a prime
# larger than any number of passes, so no two (seed, epoch) pairs share an order.
PROMPT_ORDER_STRIDE = 100_003


def batch_indices(n_prompts: int, step: int, batch_size: int, rank: int, world_size: int,
                  seed: int) -> list[int]:
    """Prompt indices of `step` (1-based) for one process: a fresh permutation each pass over the file.

    Depends only on (step, seed), never on what ran before, so a resumed run reads the same prompts.
    """
    global_batch = batch_size * world_size
    start = (step - 1) * global_batch + rank * batch_size
    indices = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, n_prompts)
        order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * PROMPT_ORDER_STRIDE + epoch))
        indices.append(int(order[offset]))
    return indices


@dataclass
class Rollout:
    query_responses: torch.Tensor  # [B, context_length + R]
    attention_mask: torch.Tensor  # [B, context_length + R]
    context_length: int
    responses: torch.Tensor  # [B, R], pad after the end
    response_mask: torch.Tensor  # [B, R], 1 on real tokens (EOS included)
    contain_eos: torch.Tensor  # [B] bool
    sample_logprobs: torch.Tensor  # [B, R], from the sampler (0 on padding)
    responses_text: list[str]
    finish_reasons: list[str]

    @property
    def sequence_lengths(self) -> torch.Tensor:
        """Number of real response tokens per row."""
        return self.response_mask.sum(1)


@torch.no_grad()
def sample(lm, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float,
           top_p: float = 1.0, top_k: int = 0) -> Rollout:
    """Generate one response per prompt (batched, KV cache, stop on EOS) and lay the batch out as tensors."""
    from toolkit.generation import SamplingParams, eos_token_ids, generate, left_pad, pad_token_id

    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)]
    try:
        completions = generate(lm, tokenizer, prompt_ids, params * len(prompt_ids))
    except RuntimeError as err:
        if "probability tensor contains" in str(err):
            raise UserError("the policy produced NaN/inf probabilities while sampling (training diverged); "
                            "lower --learning-rate and resume from the last checkpoint") from None
        raise
    device = next(lm.parameters()).device
    pad_id = pad_token_id(tokenizer)
    eos = eos_token_ids(lm, tokenizer)
    queries, query_mask = left_pad(prompt_ids, pad_id)
    R = max(1, max(len(c.token_ids) for c in completions))
    B = len(completions)
    responses = torch.full((B, R), pad_id, dtype=torch.long)
    response_mask = torch.zeros((B, R), dtype=torch.long)
    sample_logprobs = torch.zeros((B, R))
    for i, c in enumerate(completions):
        n = len(c.token_ids)
        responses[i, :n] = torch.tensor(c.token_ids, dtype=torch.long)
        response_mask[i, :n] = 1
        sample_logprobs[i, :n] = torch.tensor(c.logprobs)
    contain_eos = torch.tensor([bool(c.token_ids) and c.token_ids[-1] in eos for c in completions])
    return Rollout(
        query_responses=torch.cat([queries, responses], 1).to(device),
        attention_mask=torch.cat([query_mask, response_mask], 1).to(device),
        context_length=queries.shape[1],
        responses=responses.to(device),
        response_mask=response_mask.to(device),
        contain_eos=contain_eos.to(device),
        sample_logprobs=sample_logprobs.to(device),
        responses_text=[c.text for c in completions],
        finish_reasons=[c.finish_reason for c in completions],
    )
