"""Batched sampling with the KV cache, left padding and per-row settings.

One loop serves `llamakit serve`, the in-process `hf:` teacher and the PPO rollout: every row has its
own temperature / top-p / top-k / min-p / seed / stop strings / token budget / penalties / logit bias, and
the log-prob of each sampled token is taken from the same adjusted, temperature-scaled distribution it was
drawn from.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = -1  # -1: none; k >= 0: each token's own log-prob and the k likeliest (OpenAI `logprobs`)
    # OpenAI: subtracted from a token's logit once it was generated at all / once per time it was generated.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM / transformers (CTRL): a token seen in the prompt or the output has a positive logit divided by it,
    # a negative one multiplied by it.
    repetition_penalty: float = 1.0
    min_p: float = 0.0  # vLLM: drop tokens less likely than min_p x the likeliest one (after temperature)
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI: (token id, value added to its logit)
    prompt_logprobs: int = -1  # -1: none; k >= 0: each prompt token's log-prob and the k likeliest (legacy `echo`)


# torch.Generator.manual_seed takes any integer in [-2**63, 2**64) (a negative seed s means s + 2**64) and
# raises OverflowError/ValueError outside it; checked per row so one bad seed cannot fail a whole batch.
SEED_RANGE = (-2**63, 2**64)


def check_params(params: SamplingParams) -> None:
    """Raise ValueError naming the field when `params` cannot be sampled with (non-finite or out of range)."""
    def number(name: str, value, low: float, high: float, kind: type = numbers.Real) -> None:
        if isinstance(value, bool) or not isinstance(value, kind):  # numbers.*: numpy scalars pass too
            raise ValueError(f"{name} must be {'an integer' if kind is numbers.Integral else 'a number'}, "
                             f"got {value!r}")
        if not (low <= value <= high):  # False for NaN too
            raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")

    number("max_new_tokens", params.max_new_tokens, 0, 2**31 - 1, numbers.Integral)
    number("temperature", params.temperature, 0, math.inf)
    if math.isinf(params.temperature):
        raise ValueError("temperature must be finite")
    number("top_p", params.top_p, 0, 1)
    number("top_k", params.top_k, 0, 2**63 - 1, numbers.Integral)
    number("top_logprobs", params.top_logprobs, -1, 2**31 - 1, numbers.Integral)
    number("presence_penalty", params.presence_penalty, -2, 2)
    number("frequency_penalty", params.frequency_penalty, -2, 2)
    number("repetition_penalty", params.repetition_penalty, 0, math.inf)
    if params.repetition_penalty == 0 or math.isinf(params.repetition_penalty):
        raise ValueError(f"repetition_penalty must be positive and finite, got {params.repetition_penalty!r}")
    number("min_p", params.min_p, 0, 1)
    number("prompt_logprobs", params.prompt_logprobs, -1, 2**31 - 1, numbers.Integral)
    for token, bias in params.logit_bias:
        number("logit_bias token id", token, 0, 2**31 - 1, numbers.Integral)
        number(f"logit_bias[{token}]", bias, -100, 100)
    if params.seed is not None:
        number("seed", params.seed, SEED_RANGE[0], SEED_RANGE[1] - 1, numbers.Integral)


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    prompt_tokens: int
    logprobs: list[float] = field(default_factory=list)
    # With top_logprobs >= 0: per token, (token id, log-prob) of the sampled token and then the k likeliest,
    # from the model's own distribution (before temperature / top-p), as OpenAI and vLLM report them.
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # With prompt_logprobs >= 0: the same for every prompt token after the first, given the tokens before it.
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, list | tuple) else [value])
    return ids


def pad_token_id(tokenizer) -> int:
    """The id a batch pads with: the tokenizer's pad token (`load_tokenizer` sets it to EOS where a model has
    none), else 0; padded positions are masked, so the id only has to be a valid one."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p):] = 1
    return input_ids, attention_mask


def _filter_logits(logits: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Per-row top-k and nucleus filtering (rows with top_k=0 / top_p=1 pass through)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    ranks = torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)
    remove = (top_k[:, None] > 0) & (ranks >= top_k[:, None])
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    mass_before = probs.cumsum(-1) - probs
    remove |= mass_before >= top_p[:, None]
    remove[:, 0] = False  # always keep the most likely token
    return logits.scatter(-1, order, sorted_logits.masked_fill(remove, float("-inf")))


def _sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row, drawn by inverse CDF: the same distribution as torch.multinomial, which on CPU
    takes tens of ms per row over a 49k vocabulary. u is in (0, 1], so a token of probability 0 is never hit."""
    cdf = probs.cumsum(-1)
    u = 1 - torch.rand((probs.shape[0], 1), generator=generator, device=probs.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:])[:, 0].clamp_(max=probs.shape[-1] - 1)


class _Adjustments:
    """Per-row logit adjustments: logit_bias, the repetition penalty and OpenAI's presence / frequency penalties
    before temperature, min-p after it. Built only for what some row asks for, so a batch without any pays
    nothing and a row without any keeps its exact logits (adding 0 and multiplying by 1 are exact)."""

    def __init__(self, params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]], device):
        self.params, self.prompts, self.device = params, prompts, device
        self.bias = self.counts = self.seen = self.min_p = None
        self.built = False
        self.active = any(p.logit_bias or p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1
                          for p in params)
        if any(p.min_p > 0 for p in params):
            self.min_p = torch.tensor([p.min_p for p in params], device=device, dtype=torch.float32)

    def _build(self, vocab: int) -> None:
        """Dense per-row tensors, made on the first step, when the logits' width is known."""
        params, rows = self.params, len(self.params)

        def column(name: str) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in params], device=self.device, dtype=torch.float32)[:, None]

        if any(p.logit_bias for p in params):
            self.bias = torch.zeros((rows, vocab), device=self.device)
            for b, p in enumerate(params):
                for token, value in p.logit_bias:
                    if token >= vocab:
                        raise ValueError(f"logit_bias token id {token} is outside the vocabulary (size {vocab})")
                    self.bias[b, token] = value
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            self.counts = torch.zeros((rows, vocab), device=self.device)
            self.presence, self.frequency = column("presence_penalty"), column("frequency_penalty")
        if any(p.repetition_penalty != 1 for p in params):
            self.seen = torch.zeros((rows, vocab), dtype=torch.bool, device=self.device)
            for b, prompt in enumerate(self.prompts):
                self.seen[b, list(prompt)] = True
            self.repetition = column("repetition_penalty")

    def before_temperature(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return logits
        if not self.built:
            self._build(logits.shape[-1])
            self.built = True
        if self.bias is not None:
            logits = logits + self.bias
        if self.seen is not None:
            penalised = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
            logits = torch.where(self.seen, penalised, logits)
        if self.counts is not None:
            logits = logits - self.counts * self.frequency - (self.counts > 0) * self.presence
        return logits

    def after_temperature(self, scaled: torch.Tensor) -> torch.Tensor:
        if self.min_p is None:
            return scaled
        # p < min_p * p_max  <=>  logit < max logit + log(min_p); log(0) = -inf removes nothing
        floor = scaled.max(-1, keepdim=True).values + torch.log(self.min_p)[:, None]
        return scaled.masked_fill(scaled < floor, float("-inf"))

    def record(self, next_ids: torch.Tensor) -> None:
        if self.counts is not None:
            self.counts.scatter_add_(1, next_ids[:, None], torch.ones_like(self.counts[:, :1]))
        if self.seen is not None:
            self.seen.scatter_(1, next_ids[:, None], True)

    def select(self, index: torch.Tensor) -> None:
        """Keep the rows at `index` (the others finished)."""
        for name in ("bias", "counts", "presence", "frequency", "seen", "repetition", "min_p"):
            if getattr(self, name, None) is not None:
                setattr(self, name, getattr(self, name)[index])


class _StopWatcher:
    """Decodes a row's tokens incrementally; finds stop strings; yields text safe to stream."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.emitted = 0
        self.text = ""
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def update(self, token_ids: list[int], final: bool) -> tuple[str, bool]:
        """Return (new text to emit, stop string found)."""
        self.text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        for s in self.stop:
            cut = self.text.find(s)
            if cut != -1:
                self.text = self.text[:cut]
                return self._emit(len(self.text)), True
        safe = len(self.text) if final else len(self.text) - self.hold
        if not final and self.text.endswith("\ufffd"):  # half of a multi-byte character
            safe = min(safe, len(self.text) - 1)
        return self._emit(safe), False

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted:upto], upto
        return piece


def _distinct(prompts: list[Sequence[int]], device) -> tuple[list[tuple[int, ...]], torch.Tensor | None]:
    """The distinct prompts in order of first appearance, and each row's index among them (None: all distinct)."""
    distinct: dict[tuple[int, ...], int] = {}
    spread = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    return list(distinct), (torch.tensor(spread, device=device) if len(distinct) < len(prompts) else None)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
             on_text: Callable[[int, str], None] | None = None,
             is_cancelled: Callable[[int], bool] | None = None) -> list[Completion]:
    """Sample a completion for every prompt (token ids) in one batch with the KV cache.

    Finished rows leave the batch (and the cache) at once, so a long answer does not make the short
    ones pay. `on_text(row, text)` receives streamed text as it becomes final (stop strings held back);
    a row for which `is_cancelled(row)` turns true (its client went away) ends with finish_reason
    "cancelled".
    """
    from transformers import DynamicCache

    from toolkit.prefix_cache import cache_kwarg, position_ids_from_mask

    if len(prompts) != len(params):
        raise ValueError("one SamplingParams per prompt")
    for p in params:
        check_params(p)
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    eos = torch.tensor(sorted(eos_token_ids(model, tokenizer)) or [pad_id], device=device)
    watchers = [_StopWatcher(tokenizer, p.stop) for p in params]
    watch = [bool(p.stop) or on_text is not None for p in params]
    tokens: list[list[int]] = [[] for _ in params]
    logprobs: list[list[float]] = [[] for _ in params]
    alternatives: list[list[list[tuple[int, float]]]] = [[] for _ in params]
    finish = ["length"] * len(params)

    rows = [i for i, p in enumerate(params) if p.max_new_tokens > 0]  # original index of each batch row
    if rows:
        # Rows that share a prompt (n > 1, GRPO's K answers) prefill it once; the first step copies its cache,
        # logits and mask to each of them.
        distinct, spread = _distinct([prompts[i] for i in rows], device)
        step_ids, attention_mask = (t.to(device) for t in left_pad(distinct, pad_id))
        temperature = torch.tensor([params[i].temperature for i in rows], device=device, dtype=torch.float32)
        top_p = torch.tensor([params[i].top_p for i in rows], device=device, dtype=torch.float32)
        top_k = torch.tensor([params[i].top_k for i in rows], device=device, dtype=torch.long)
        # Seeded rows draw from their own generator so a seed gives the same text whatever the batch.
        generators = {i: torch.Generator(device=device).manual_seed(params[i].seed)
                      for i in rows if params[i].seed is not None}
        adjust = _Adjustments([params[i] for i in rows], [prompts[i] for i in rows], device)
        shared_generator = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        cache = DynamicCache()
        cache_arg = cache_kwarg(model)
        position_ids = position_ids_from_mask(attention_mask)

    while rows:
        out = model(input_ids=step_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        raw = out.logits[:, -1, :].float()
        if spread is not None:
            raw, attention_mask, position_ids = raw[spread], attention_mask[spread], position_ids[spread]
            cache.batch_select_indices(spread)
            spread = None
        logits = adjust.before_temperature(raw)
        greedy = temperature <= 0
        scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
        scaled = adjust.after_temperature(scaled)
        if bool(((top_p < 1) | (top_k > 0)).any()):
            scaled = _filter_logits(scaled, top_p, top_k)
        logp = torch.log_softmax(scaled, dim=-1)
        probs = logp.exp()
        next_ids = torch.where(greedy, logits.argmax(-1), _sample(probs, shared_generator))
        for b, i in enumerate(rows):
            if i in generators and not greedy[b]:
                next_ids[b] = _sample(probs[b:b + 1], generators[i])[0]
        chosen_logp = logp.gather(-1, next_ids[:, None])[:, 0].tolist()
        adjust.record(next_ids)
        hit_eos = torch.isin(next_ids, eos).tolist()
        k = max(params[i].top_logprobs for i in rows)
        if k >= 0:
            model_logp = torch.log_softmax(raw, dim=-1)
            own = model_logp.gather(-1, next_ids[:, None])[:, 0].tolist()
            top = torch.topk(model_logp, k, dim=-1) if k else None

        keep = []
        for b, i in enumerate(rows):
            tokens[i].append(int(next_ids[b]))
            logprobs[i].append(chosen_logp[b])
            if params[i].top_logprobs >= 0:
                n = params[i].top_logprobs
                alternatives[i].append([(int(next_ids[b]), own[b])] + (list(zip(
                    top.indices[b, :n].tolist(), top.values[b, :n].tolist(), strict=True)) if n else []))
            stopped = hit_eos[b]
            out_of_budget = len(tokens[i]) >= params[i].max_new_tokens
            if watch[i]:
                text, stop_hit = watchers[i].update(tokens[i], final=stopped or out_of_budget)
                if text and on_text:
                    on_text(i, text)
                stopped = stopped or stop_hit
            if stopped or out_of_budget:
                finish[i] = "stop" if stopped else "length"
            elif is_cancelled is not None and is_cancelled(i):
                finish[i] = "cancelled"
            else:
                keep.append(b)

        step_ids = next_ids[:, None]
        attention_mask = torch.cat([attention_mask, torch.ones_like(step_ids)], dim=-1)
        position_ids = position_ids[:, -1:] + 1
        if len(keep) < len(rows):
            rows = [rows[b] for b in keep]
            if not rows:
                break
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            step_ids, attention_mask, position_ids = step_ids[index], attention_mask[index], position_ids[index]
            temperature, top_p, top_k = temperature[index], top_p[index], top_k[index]
            adjust.select(index)

    scored = [i for i, p in enumerate(params) if p.prompt_logprobs >= 0 and len(prompts[i]) > 1]
    scores = _prompt_logprobs(model, [prompts[i] for i in scored], [params[i].prompt_logprobs for i in scored],
                              pad_id, device)
    prompt_scores = dict(zip(scored, scores, strict=True))
    completions = []
    for i in range(len(params)):
        text = watchers[i].text if watch[i] else tokenizer.decode(tokens[i], skip_special_tokens=True)
        completions.append(Completion(tokens[i], text, finish[i], len(prompts[i]), logprobs[i], alternatives[i],
                                      prompt_scores.get(i, [])))
    return completions


def _prompt_logprobs(model, prompts: list[Sequence[int]], ks: list[int], pad_id: int,
                     device) -> list[list[list[tuple[int, float]]]]:
    """Per prompt, for each token after the first: (its id, its log-prob given the tokens before it), then the
    k likeliest there. One padded forward of its own, so the sampling loop stays as it is for every row."""
    if not prompts:
        return []
    input_ids, attention_mask = (t.to(device) for t in left_pad(prompts, pad_id))
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    width, scores = input_ids.shape[1], []
    for b, (prompt, k) in enumerate(zip(prompts, ks, strict=True)):
        logp = torch.log_softmax(logits[b, width - len(prompt):width - 1].float(), dim=-1)  # t predicts t + 1
        targets = list(prompt[1:])
        own = logp.gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0].tolist()
        top = torch.topk(logp, k, dim=-1) if k else None
        scores.append([[(t, o)] + (list(zip(top.indices[j].tolist(), top.values[j].tolist(), strict=True)) if k else [])
                       for j, (t, o) in enumerate(zip(targets, own, strict=True))])
    return scores
