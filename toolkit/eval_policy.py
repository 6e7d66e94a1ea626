"""`llamakit eval-policy`: is this policy better than that one, by how much, and at what KL cost?

Each held-out prompt is answered `samples` times by POLICY and, with a baseline, by BASE, with the same
seed per (prompt, sample) on both sides, so a model compared with itself gives the same answers. Then:

    per side      mean scorer value (and per constraint family with rules:constraints), mean reward-model
                  score, mean answer length (tokens, words), EOS rate (finish_reason "stop")
    KL            mean over POLICY's answers of  Σ_t log π_policy(a_t) − log π_base(a_t),  both taken
                  teacher-forced from the temperature-scaled logits that sampling used (rlhf's functions;
                  T = 1 for greedy decoding): needs both models local and one tokenizer
    win rate      per (prompt, sample) pair, POLICY against BASE by scorer, reward model or pairwise judge
                  (ties count ½), with a 95% Wilson score interval on the paired outcomes

A side is an embedded alias, a Hugging Face directory, an sft / rlhf run directory (its model/ or policy/),
or a server through a teacher spec (`openai:MODEL` with `base_url`): served answers have no log-probs
here, so the KL is reported as unavailable. Only one local model is in memory at a time.

With --best-of N (and --reward), each answer row of each side is the best of N candidates under the reward
model: all N x rows candidates are generated in one batched pass, scored, and the highest-scoring one (ties: the
first) is the answer every metric sees. Candidate c of a row has its own seed, the same on both sides.

With --baseline-answers DIR, BASE's answers are read from an earlier run's OUT instead of generated again (the
same BASE, prompts, seeds and sampling settings, checked): one base, many checkpoints, half the generation.
BASE is still loaded for the log-probs of the KL; every score is computed again.

The KL on POLICY's answers needs log POLICY and log BASE of each answer token. BASE's come from a teacher-forced
pass; POLICY's are the sampler's own (float32: equal to a teacher-forced pass to ~1e-6 per token, and one pass
over every prompt and answer fewer), or with --recompute-logprobs (the default with --bf16) a teacher-forced pass
too, which also reports the sampler's gap from it.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.rollout import TokenizedPrompt, load_prompts
from toolkit.errors import UserError
from toolkit.options import SEED_MAX, SEED_STRIDE

KIND = "eval-policy"  # the manifest kind of OUT
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
INTERVAL = "95% Wilson score interval on the paired outcomes (ties count as half a win)"
TIE_TOLERANCE = 1e-9  # two scores this close are a tie (float noise, not a preference)
KL_BATCH = 8  # rows per teacher-forced forward: the [rows, tokens, vocabulary] logits are the big tensor
TEACHER_KINDS = ("openai", "langchain")  # sides answered by a server, not a local model
# The sampled KL needs POLICY's own samples; the kept answers are not that. Their log-ratio is still the KL-style
# cost of what is shown, and comparable with a single-sample run's; best_of_kl_bound gives the selection's own KL.
BEST_OF_KL_NOTE = ("with --best-of, 'kl' is the mean log π_policy − log π_base over POLICY's kept answers, not the "
                   "KL of best-of-N sampling; best_of_kl_bound = log N − (N − 1)/N bounds the KL of best-of-N from "
                   "the model it samples")


@dataclass
class EvalConfig:
    policy: str
    prompts: str
    baseline: str | None = None
    scorer: str | None = None  # rules:NAMES
    reward: str | None = None  # a train-reward directory
    judge: str | None = None  # a teacher spec comparing POLICY's and BASE's answers pairwise
    samples: int = 1
    best_of: int = 1  # answer with the best of N samples under --reward, on both sides (1 = off)
    temperature: float = 1.0  # rlhf's default: the KL is then the one PPO controlled
    max_new_tokens: int = 64
    batch_size: int = 16
    seed: int = 0
    limit: int = 0  # 0 = every prompt
    system_prompt: str = ""
    chat_template: bool = True
    bf16: bool = False
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0
    concurrency: int = 8
    judge_temperature: float = 0.0
    judge_max_tokens: int = 256
    out: str | None = None
    overwrite: bool = False
    baseline_answers: str | None = None  # an earlier eval-policy OUT whose BASE answers are reused
    # POLICY's log-probs of its answers for the KL: None = the sampler's in float32 (equal to a teacher-forced pass
    # to ~1e-6 per token), a second teacher-forced pass with --bf16, where the two drift apart
    recompute_logprobs: bool | None = None


@dataclass(frozen=True)
class Source:
    """One side of the comparison: a local Hugging Face directory, or a teacher spec for a server."""

    spec: str  # as the user wrote it
    path: Path | None = None  # local model directory
    teacher: str | None = None  # openai:MODEL / langchain:...
    context: int = 0  # the local model's context in tokens

    @property
    def local(self) -> bool:
        return self.path is not None


@dataclass
class Answer:
    text: str
    finish_reason: str | None
    tokens: int
    token_ids: list[int] = field(default_factory=list)  # local models only
    sampler_logprobs: list[float] = field(default_factory=list)  # local models only


@dataclass
class Side:
    """Everything measured on one side's answers (rows in prompt-major order: prompt i, sample j)."""

    name: str  # "policy" | "baseline"
    source: Source
    answers: list[Answer]
    seconds: float
    scores: list[float] | None = None
    parts: list[dict[str, float]] | None = None
    rewards: list[float] | None = None
    logprobs: list[list[float]] | None = None  # on POLICY's answers: BASE's teacher-forced; POLICY's per `kl_from`
    kl_from: str | None = None  # POLICY: "sampler" or "teacher-forced" log-probs of its own answers
    candidate_rewards: list[list[float]] | None = None  # --best-of: every candidate's reward, per row
    kept: list[int] | None = None  # --best-of: which candidate each row kept
    generated_tokens: int | None = None  # --best-of: tokens of all candidates (what the side's time bought)


@dataclass
class EvalResult:
    summary: dict[str, Any]  # what --json prints
    rows: list[dict[str, Any]]  # OUT/answers.jsonl
    out: Path | None


# ------------------------------------------------------------------------------------------ statistics


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / n (successes may hold halves for ties)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_outcomes(policy: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """1 where POLICY scored higher, 0 where lower, ½ for a tie; one per (prompt, sample) pair."""
    return [0.5 if abs(p - b) <= TIE_TOLERANCE else float(p > b) for p, b in zip(policy, baseline, strict=True)]


def win_rate(outcomes: Sequence[float]) -> dict[str, Any]:
    n = len(outcomes)
    wins, ties = sum(o == 1.0 for o in outcomes), sum(o == 0.5 for o in outcomes)
    low, high = wilson_interval(wins + ties / 2, n)
    return {"rate": (wins + ties / 2) / n if n else None, "low": low, "high": high, "wins": wins, "ties": ties,
            "losses": n - wins - ties, "n": n}


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def standard_error(values: Sequence[float]) -> float | None:
    """The standard error of the mean of `values` (sample standard deviation / √n); None below two values."""
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def family_means(parts: Sequence[Mapping[str, float]]) -> tuple[dict[str, float], dict[str, int]]:
    """Per constraint kind: the mean of `constraints/<kind>` over the answers whose prompt asks for it
    (each answer's share of its prompt's constraints of that kind), and how many answers that is."""
    values: dict[str, list[float]] = {}
    for row in parts:
        for key, value in row.items():
            if key.startswith("constraints/"):
                values.setdefault(key.split("/", 1)[1], []).append(value)
    return ({kind: sum(v) / len(v) for kind, v in sorted(values.items())},
            {kind: len(v) for kind, v in sorted(values.items())})


# ------------------------------------------------------------------------------------------ sides


def resolve_source(spec: str, flag: str) -> Source:
    """POLICY / BASE as given -> a Source; a spec that names no model is a one-line UserError."""
    kind, _, rest = spec.partition(":")
    if kind in TEACHER_KINDS:
        if not rest.strip():
            raise UserError(f"{flag} '{spec}' needs a model name, e.g. openai:MODEL (with --base-url for a server)")
        return Source(spec, teacher=spec)
    if kind == "rules":
        raise UserError(f"{flag} '{spec}': rule scorers score answers, they cannot write them; give a model "
                        "and pass the rules as --scorer")
    path = model_dir(rest if kind == "hf" and rest else spec, flag)
    return Source(spec, path=path, context=causal_lm_context(path, flag))


def model_dir(name: str, flag: str) -> Path:
    """An alias, a model or PEFT adapter directory, or an sft / rlhf run directory (its model/ or policy/) -> the
    model dir."""
    from toolkit.models import ADAPTER_CONFIG, EMBEDDED, resolve

    if name in EMBEDDED:
        return resolve(name)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise UserError(f"{flag} '{name}' is neither an embedded alias ({', '.join(EMBEDDED)}), a model or run "
                        "directory, nor a server (openai:MODEL with --base-url)")
    for candidate in (path, path / "policy", path / "model"):
        if (candidate / "config.json").is_file() or (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise UserError(f"{flag} '{name}' is not a model: no config.json (nor {ADAPTER_CONFIG}) in it, nor in its "
                    "policy/ (an rlhf run) or model/ (an sft run)")


def causal_lm_context(path: Path, flag: str) -> int:
    """The model's context in tokens, after checking (config only, no weights) that it is a causal LM (an
    adapter's: its base's)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from toolkit.models import config_dir, load_errors, one_line

    if (path / "reward_config.json").is_file():
        raise UserError(f"{flag} '{path}' is a reward model (train-reward), not a policy: pass it as --reward")
    try:
        config = AutoConfig.from_pretrained(config_dir(path), trust_remote_code=False)
    except load_errors() as err:
        raise UserError(f"{flag} '{path}': cannot read config.json: {one_line(err)}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{flag} '{path}' is not a causal language model (model_type '{config.model_type}')")
    return int(getattr(config, "max_position_embeddings", 0) or 2048)


def check_teacher(spec: str, cfg: EvalConfig, flag: str) -> None:
    """What building the teacher would refuse, said now rather than after the other side's generation."""
    kind, _, rest = spec.partition(":")
    if kind not in (*TEACHER_KINDS, "hf"):
        raise UserError(f"{flag} '{spec}' must be a teacher spec: openai:MODEL, langchain:module:Class or hf:MODEL")
    if kind == "openai" and not cfg.base_url and not os.environ.get(cfg.api_key_env):
        raise UserError(f"{flag} {spec} needs an API key in ${cfg.api_key_env} (or --base-url for a local server)")
    if kind == "hf":
        model_dir(rest, flag)


def row_seed(seed: int, index: int) -> int:
    """The sampling seed of answer row `index`, the same for POLICY and BASE."""
    return (seed * SEED_STRIDE + index) % SEED_MAX


def candidate_seed(seed: int, index: int, candidate: int) -> int:
    """The sampling seed of --best-of candidate `candidate` of answer row `index`, the same for POLICY and BASE.
    It is the row seed's own stream counted down from its top (SEED_STRIDE - 1 - c), where no run's rows reach:
    counting up would give candidate c of row 0 the plain seed of row c."""
    return row_seed(row_seed(seed, index), SEED_STRIDE - 1 - candidate)


def answer_seeds(cfg: EvalConfig, rows: int) -> list[int]:
    """One seed per answer to generate: per row, or per row and candidate (row-major) with --best-of."""
    if cfg.best_of == 1:
        return [row_seed(cfg.seed, k) for k in range(rows)]
    return [candidate_seed(cfg.seed, k, c) for k in range(rows) for c in range(cfg.best_of)]


def best_of_kl_bound(n: int) -> float:
    """log N - (N - 1) / N: the usual analytic KL of best-of-N sampling from the model it samples, an upper
    bound on it (Beirami et al. 2024); 0 for N = 1."""
    return math.log(n) - (n - 1) / n


def read_prompts(cfg: EvalConfig, tokenizer: Any = None) -> list[TokenizedPrompt]:
    """The prompt rows, read as `rlhf` reads them (chat template, system prompt), first --limit kept."""
    prompts, _ = load_prompts(cfg.prompts, tokenizer, chat_template=cfg.chat_template,
                              system_prompt=cfg.system_prompt, max_prompt_tokens=sys.maxsize)
    return prompts[:cfg.limit] if cfg.limit else prompts


def check_fit(prompts: Sequence[TokenizedPrompt], source: Source, cfg: EvalConfig, flag: str) -> None:
    for p in prompts:
        if len(p.ids) + cfg.max_new_tokens > source.context:
            raise UserError(f"prompt is {len(p.ids)} tokens: with --max-new-tokens {cfg.max_new_tokens} it does "
                            f"not fit the context of {flag} ({source.context} tokens); shorten it or lower "
                            "--max-new-tokens", file=cfg.prompts, line=p.row)


# ------------------------------------------------------------------------------------------ answers


def generate_local(model: Any, tokenizer: Any, prompt_ids: Sequence[list[int]], seeds: Sequence[int],
                   cfg: EvalConfig, advance: Callable[[int], None]) -> list[Answer]:
    """Batched, seeded sampling with the KV cache (the loop `serve` and the PPO rollout use)."""
    from toolkit.generation import SamplingParams, generate

    params = [SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=s) for s in seeds]
    answers: list[Answer] = []
    for start in range(0, len(params), cfg.batch_size):
        stop = start + cfg.batch_size
        for c in generate(model, tokenizer, prompt_ids[start:stop], params[start:stop]):
            answers.append(Answer(c.text, c.finish_reason, c.completion_tokens, c.token_ids, c.logprobs))
        advance(len(params[start:stop]))
    return answers


async def _ask_all(teacher: Any, chats: Sequence[list[dict[str, str]]], seeds: Sequence[int], cfg: EvalConfig,
                   advance: Callable[[int], None]) -> list[Any]:
    limit = asyncio.Semaphore(cfg.concurrency)

    async def one(messages: list[dict[str, str]], seed: int) -> Any:
        async with limit:
            reply = await teacher.chat(messages, temperature=cfg.temperature, max_tokens=cfg.max_new_tokens,
                                       seed=seed)
        advance(1)
        return reply

    return await asyncio.gather(*(one(m, s) for m, s in zip(chats, seeds, strict=True)))


async def _with_teacher(spec: str, cfg: EvalConfig, work: Callable[[Any], Any]) -> Any:
    """Run `work(teacher)`; a failing server becomes one line naming the spec."""
    from toolkit.models import one_line
    from toolkit.teachers import close_teacher, make_teacher

    teacher = make_teacher(spec, base_url=cfg.base_url, api_key_env=cfg.api_key_env, timeout=cfg.timeout)
    try:
        return await work(teacher)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - openai / httpx / LangChain errors: one line, not a traceback
        raise UserError(f"{spec}: {type(err).__name__}: {one_line(err)}") from None
    finally:
        await close_teacher(teacher)


def generate_served(spec: str, chats: Sequence[list[dict[str, str]]], seeds: Sequence[int], cfg: EvalConfig,
                    advance: Callable[[int], None]) -> list[Answer]:
    replies = asyncio.run(_with_teacher(spec, cfg, lambda t: _ask_all(t, chats, seeds, cfg, advance)))
    return [Answer(r.text, r.finish_reason, r.completion_tokens) for r in replies]


def answer_logprobs(model: Any, pad_id: int, prompt_ids: Sequence[list[int]], answer_ids: Sequence[list[int]],
                    temperature: float, advance: Callable[[int], None]) -> list[list[float]]:
    """log π(a_t) of each answer token, teacher-forced, from the temperature-scaled logits that sampling used
    (rlhf's response_hidden / response_logprobs; greedy decoding samples from T = 1)."""
    import torch

    from rlhf.policy import response_hidden, response_logprobs
    from toolkit.generation import left_pad

    scale = temperature if temperature > 0 else 1.0
    device = next(model.parameters()).device
    out: list[list[float]] = []
    with torch.no_grad():
        for start in range(0, len(answer_ids), KL_BATCH):
            prompts, answers = prompt_ids[start:start + KL_BATCH], answer_ids[start:start + KL_BATCH]
            queries, query_mask = left_pad(prompts, pad_id)
            width = max(1, max(len(a) for a in answers))
            responses = torch.full((len(answers), width), pad_id, dtype=torch.long)
            response_mask = torch.zeros((len(answers), width), dtype=torch.long)
            for i, a in enumerate(answers):
                responses[i, :len(a)] = torch.tensor(a, dtype=torch.long)
                response_mask[i, :len(a)] = 1
            sequences = torch.cat([queries, responses], 1).to(device)
            mask = torch.cat([query_mask, response_mask], 1).to(device)
            hidden = response_hidden(model, sequences, mask, queries.shape[1])
            logprobs = response_logprobs(model, hidden, responses.to(device), scale)[0].cpu()
            out += [logprobs[i, :len(a)].tolist() for i, a in enumerate(answers)]
            advance(len(answers))
    return out


def same_vocabulary(a: Any, b: Any) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def encode_prompts(source: Source, cfg: EvalConfig, flag: str) -> tuple[Any, list[list[int]]]:
    """A local side's tokenizer, and the token ids of each answer row's prompt (prompt-major, `samples` rows
    per prompt) in that side's chat template, each checked to leave room for --max-new-tokens."""
    from toolkit.models import load_tokenizer

    tokenizer = load_tokenizer(source.path)
    prompts = read_prompts(cfg, tokenizer)
    check_fit(prompts, source, cfg, flag)
    return tokenizer, [p.ids for p in prompts for _ in range(cfg.samples)]


def kl_unavailable(policy: Source, baseline: Source | None, tokenizers: Mapping[str, Any]) -> str | None:
    """Why KL(POLICY ‖ BASE) cannot be estimated here, or None when it can (asked before any generation)."""
    if baseline is None:
        return "no --baseline to compare with"
    for source, flag in ((policy, "POLICY"), (baseline, "--baseline")):
        if not source.local:
            return f"{flag} {source.spec} is a server: its log-probs of POLICY's answers are not available"
    if not same_vocabulary(tokenizers["policy"], tokenizers["baseline"]):
        return "POLICY and BASE have different tokenizers"
    return None


def keep_best(side: Side, questions: Sequence[str], rm: Any, n: int) -> None:
    """Row k's candidates are side.answers[k·n:(k+1)·n]: keep the one `rm` scores highest (ties: the first, as
    max() picks); its reward is the candidate's score, not a second scoring."""
    scores = rm.score([q for q in questions for _ in range(n)], [a.text for a in side.answers])
    side.candidate_rewards = [scores[k * n:(k + 1) * n] for k in range(len(questions))]
    side.kept = [max(range(n), key=group.__getitem__) for group in side.candidate_rewards]
    side.generated_tokens = sum(a.tokens for a in side.answers)
    side.answers = [side.answers[k * n + c] for k, c in enumerate(side.kept)]
    side.rewards = [group[c] for group, c in zip(side.candidate_rewards, side.kept, strict=True)]


def run_side(name: str, source: Source, ids: Sequence[list[int]] | None, cfg: EvalConfig,
             prompts: Sequence[TokenizedPrompt], bar: Any, rm: Any = None, logprobs_of: Sequence[Answer] | None = None,
             own_logprobs: bool = False, given: tuple[list[Answer], float] | None = None) -> Side:
    """Answer every (prompt, sample) row with one side (`ids`: a local side's encoded prompts per row), with
    --best-of the best of N candidates under `rm`; or take the `given` (answers, seconds) of an earlier run. A
    local side also takes the teacher-forced log-probs of `logprobs_of` (POLICY's answers, for the KL; its own
    answers with `own_logprobs`), each under this side's own encoding of its prompt."""
    if given is not None:
        side = Side(name, source, *given)
        if source.local and logprobs_of is not None:
            _with_model(source, cfg, lambda model, tokenizer: _logprobs(side, model, tokenizer, ids, logprobs_of,
                                                                      cfg, bar))
        return side
    n = cfg.best_of
    questions = [p.text for p in prompts for _ in range(cfg.samples)]
    seeds = answer_seeds(cfg, len(questions))
    advance = _task(bar, f"{name} answers" + (f" ({n} candidates each)" if n > 1 else ""), len(seeds))
    start = time.perf_counter()
    if not source.local:
        chats = [p.messages for p in prompts for _ in range(cfg.samples * n)]
        side = Side(name, source, generate_served(source.teacher, chats, seeds, cfg, advance),
                    time.perf_counter() - start)
        if n > 1:
            keep_best(side, questions, rm, n)
        return side

    def answer(model: Any, tokenizer: Any) -> Side:
        start = time.perf_counter()  # generation only, as tokens_per_s reports it
        side = Side(name, source, generate_local(model, tokenizer, [i for i in ids for _ in range(n)], seeds, cfg,
                                                 advance), time.perf_counter() - start)
        if n > 1:
            keep_best(side, questions, rm, n)
        if own_logprobs or logprobs_of is not None:
            _logprobs(side, model, tokenizer, ids, side.answers if own_logprobs else logprobs_of, cfg, bar)
        return side

    return _with_model(source, cfg, answer)


def _with_model(source: Source, cfg: EvalConfig, work: Callable[[Any, Any], Any]) -> Any:
    """`work(model, tokenizer)` with the side's local model loaded, freed afterwards (one model in memory)."""
    import torch

    from toolkit.models import load_causal_lm

    model, tokenizer = load_causal_lm(source.path, dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
    try:
        return work(model, tokenizer)
    finally:
        del model
        gc.collect()


def _logprobs(side: Side, model: Any, tokenizer: Any, ids: Sequence[list[int]], of: Sequence[Answer],
              cfg: EvalConfig, bar: Any) -> None:
    from toolkit.generation import pad_token_id

    pad_id = pad_token_id(tokenizer)
    side.logprobs = answer_logprobs(model, pad_id, ids, [a.token_ids for a in of], cfg.temperature,
                                    _task(bar, f"log-probs ({side.name})", len(of)))


def _task(bar: Any, description: str, total: int) -> Callable[[int], None]:
    task = bar.add_task(description, total=total, status="")
    return lambda n: bar.advance(task, n)


# ------------------------------------------------------------------------------------------ scores


def score_side(side: Side, rows: Sequence[tuple[TokenizedPrompt, int]], scorer: Any, rm: Any) -> None:
    texts = [a.text for a in side.answers]
    if scorer is not None:
        side.parts = [scorer.explain(p.text, a.text, a.finish_reason, p.context)
                      for (p, _), a in zip(rows, side.answers, strict=True)]
        side.scores = [scorer.combine(parts) for parts in side.parts]
    if rm is not None and side.rewards is None:  # --best-of scored the kept answers already
        side.rewards = rm.score([p.text for p, _ in rows], texts)


async def _judge_pairs(teacher: Any, questions: Sequence[str], policy: Sequence[str], baseline: Sequence[str],
                       cfg: EvalConfig, advance: Callable[[int], None]) -> list[dict[str, str]]:
    """Each pair asked twice with the positions swapped (prompts/judge_pairwise.txt); POLICY wins only when
    both verdicts name it; a disagreement, [[C]] or a reply with no verdict is a tie."""
    from toolkit.generate.preferences import parse_verdict, swap_verdict
    from toolkit.generate.runner import Unparsable
    from toolkit.resources import render_prompt

    limit = asyncio.Semaphore(cfg.concurrency)

    async def verdict(question: str, a: str, b: str) -> str:
        prompt = render_prompt("judge_pairwise", prompt=question, response_a=a, response_b=b)
        async with limit:
            reply = await teacher.chat([{"role": "user", "content": prompt}], temperature=cfg.judge_temperature,
                                       max_tokens=cfg.judge_max_tokens, seed=cfg.seed)
        advance(1)
        try:
            return parse_verdict(reply.text)
        except Unparsable:
            return "none"

    async def one(question: str, p: str, b: str) -> dict[str, str]:
        first, swapped = await asyncio.gather(verdict(question, p, b), verdict(question, b, p))
        outcome = {"x": "policy", "y": "baseline"}.get(swap_verdict(first, swapped), "tie")
        return {"first": first, "swapped": swapped, "outcome": outcome}

    return list(await asyncio.gather(*(one(q, p, b) for q, p, b in zip(questions, policy, baseline, strict=True))))


def judge_answers(cfg: EvalConfig, questions: Sequence[str], policy: Side, baseline: Side,
                  bar: Any) -> list[dict[str, str]]:
    advance = _task(bar, "judge", 2 * len(questions))
    pairs = [a.text for a in policy.answers], [a.text for a in baseline.answers]
    return asyncio.run(_with_teacher(cfg.judge, cfg, lambda t: _judge_pairs(t, questions, *pairs, cfg, advance)))


# ------------------------------------------------------------------------------------------ the run


def check(cfg: EvalConfig) -> tuple[Any, list[TokenizedPrompt]]:
    """What can be refused before anything loads: flags together, OUT, the prompt file and its rows, the
    scorer, the server and judge specs. Returns (scorer, prompts)."""
    from toolkit.io import claim_output_dir
    from toolkit.scorers import parse_rules

    if cfg.best_of > 1 and not cfg.reward:
        raise UserError(f"--best-of {cfg.best_of} keeps the answer the reward model scores highest: give --reward "
                        "RM_DIR too")
    if cfg.best_of > 1 and cfg.temperature == 0:
        raise UserError(f"--best-of {cfg.best_of} needs --temperature > 0: greedy decoding gives {cfg.best_of} "
                        "identical answers")
    if cfg.baseline_answers and not cfg.baseline:
        raise UserError("--baseline-answers reuses BASE's answers of an earlier run: give --baseline too (the same "
                        "BASE, loaded for the KL)")
    if cfg.judge and not cfg.baseline:
        raise UserError("--judge compares POLICY's answers with BASE's: give --baseline too")
    if cfg.scorer and not cfg.scorer.startswith("rules"):
        raise UserError(f"--scorer takes rules:NAMES, got '{cfg.scorer}' (an LLM goes to --judge, a reward "
                        "model to --reward)")
    if cfg.judge and cfg.judge.startswith("rules"):
        raise UserError(f"--judge takes an LLM (openai:, langchain:, hf:), got '{cfg.judge}': rules go to --scorer")
    if cfg.out:
        claim_output_dir(cfg.out, KIND, overwrite=cfg.overwrite)
    scorer = parse_rules(cfg.scorer) if cfg.scorer else None
    prompts = read_prompts(cfg)
    if scorer is not None:  # a row the rules cannot score stops the run before anything is generated
        for p in prompts:
            scorer.check_context(p.context, file=cfg.prompts, line=p.row)
    for spec, flag in ((cfg.policy, "POLICY"), (cfg.baseline, "--baseline")):
        if spec and spec.partition(":")[0] in TEACHER_KINDS:
            check_teacher(spec, cfg, flag)
    if cfg.judge:
        check_teacher(cfg.judge, cfg, "--judge")
    if cfg.reward and cfg.reward.startswith("rules"):
        raise UserError(f"--reward takes a reward-model directory, got '{cfg.reward}': rules go to --scorer")
    return scorer, prompts


# what decides BASE's answers besides the model and the prompts: an earlier run's answers are reused only when equal
ANSWER_SETTINGS = ("samples", "temperature", "max_new_tokens", "seed", "bf16", "system_prompt", "chat_template")
ANSWER_DEFAULTS = {"system_prompt": "", "chat_template": True}  # not recorded by runs before --baseline-answers


def reused_baseline(cfg: EvalConfig, source: Source, rows: Sequence[tuple[TokenizedPrompt, int]]
                    ) -> tuple[list[Answer], float]:
    """BASE's answers and generation seconds from --baseline-answers DIR, in this run's row order; refused in one
    line when DIR's BASE, prompts or sampling settings differ from this run's."""
    directory = Path(cfg.baseline_answers)
    summary_file, answers_file = directory / "summary.json", directory / "answers.jsonl"
    flag = "--baseline-answers"
    for needed in (summary_file, answers_file):
        if not needed.is_file():
            raise UserError(f"{flag}: no {needed.name} here (an earlier `eval-policy --baseline ... --out DIR`)",
                            file=str(directory))
    try:
        earlier = json.loads(summary_file.read_text(encoding="utf-8"))
        base = earlier["baseline"]
        answered = [json.loads(line) for line in answers_file.read_text(encoding="utf-8").splitlines() if line]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{flag}: cannot read the earlier run: {err}", file=str(directory)) from None
    if not base:
        raise UserError(f"{flag}: that run had no --baseline", file=str(summary_file))
    if cfg.best_of > 1 or earlier.get("best_of", 1) > 1:
        raise UserError(f"{flag} reuses single answers: not with --best-of (here or in the earlier run)")
    theirs = base.get("path") or base.get("model")
    ours = str(source.path) if source.local else source.spec
    same = Path(theirs).resolve() == source.path.resolve() if source.local and base.get("path") else theirs == ours
    if not same:
        raise UserError(f"{flag}: that run's BASE was {theirs}, this one's is {ours}", file=str(summary_file))
    for key in ANSWER_SETTINGS:
        if earlier.get(key, ANSWER_DEFAULTS.get(key)) != getattr(cfg, key):
            raise UserError(f"{flag}: that run's --{key.replace('_', '-')} was {earlier.get(key)!r}, this one's "
                            f"is {getattr(cfg, key)!r} (BASE would answer otherwise)", file=str(summary_file))
    by_row = {(r.get("prompt"), r.get("sample")): r for r in answered if r.get("policy") == "baseline"}
    answers = []
    for p, j in rows:
        row = by_row.get((p.text, j))
        if row is None:
            raise UserError(f"{flag}: that run has no BASE answer to prompt row {p.row} (sample {j}): other prompts",
                            file=str(answers_file))
        answers.append(Answer(row["answer"], row["finish_reason"], row["tokens"]))
    return answers, float(base.get("seconds") or 0.0)


def recomputes_logprobs(cfg: EvalConfig) -> bool:
    """Whether POLICY's log-probs of its own answers come from a teacher-forced pass (as BASE's always do) rather
    than from the sampler: asked for, or by default with --bf16."""
    return cfg.bf16 if cfg.recompute_logprobs is None else cfg.recompute_logprobs


def load_reward(cfg: EvalConfig) -> Any:
    """The reward model of --reward (refused when not calibrated), or None."""
    if not cfg.reward:
        return None
    from toolkit.reward import load_reward_model

    return load_reward_model(cfg.reward)


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Answer, score and compare; write OUT (when given) only once everything is done."""
    from toolkit.console import progress

    started = time.perf_counter()
    scorer, prompts = check(cfg)
    sources = {"policy": resolve_source(cfg.policy, "POLICY")}
    if cfg.baseline:
        sources["baseline"] = resolve_source(cfg.baseline, "--baseline")
    tokenizers, ids = {}, {}
    for name, source in sources.items():  # every prompt checked against every local context before any work
        if source.local:
            tokenizers[name], ids[name] = encode_prompts(source, cfg, "POLICY" if name == "policy" else "--baseline")
    if tokenizers:  # a local model generates on the CPU
        from toolkit.training.accelerator import warn_if_bf16_is_slow

        warn_if_bf16_is_slow(cfg.bf16, "cpu")
    why_no_kl = kl_unavailable(sources["policy"], sources.get("baseline"), tokenizers)
    rm = load_reward(cfg)
    rows = [(p, j) for p in prompts for j in range(cfg.samples)]
    reused = reused_baseline(cfg, sources["baseline"], rows) if cfg.baseline_answers else None
    # transient: a failure half-way is one line on the terminal, not bars and a line
    with progress(transient=True) as bar:
        # POLICY's log-probs of its own answers: the sampler's, or teacher-forced as BASE's (recomputes_logprobs)
        recompute = recomputes_logprobs(cfg)
        policy = run_side("policy", sources["policy"], ids.get("policy"), cfg, prompts, bar, rm,
                          own_logprobs=why_no_kl is None and recompute)
        if why_no_kl is None:
            policy.kl_from = "teacher-forced" if recompute else "sampler"
            if not recompute:
                policy.logprobs = [a.sampler_logprobs for a in policy.answers]
        baseline = None
        if cfg.baseline:
            baseline = run_side("baseline", sources["baseline"], ids.get("baseline"), cfg, prompts, bar, rm,
                                logprobs_of=policy.answers if why_no_kl is None else None, given=reused)
        for side in (policy, baseline):
            if side is not None:
                score_side(side, rows, scorer, rm)
        verdicts = judge_answers(cfg, [p.text for p, _ in rows], policy, baseline, bar) if cfg.judge else None
    kls = None
    if why_no_kl is None:
        kls = [sum(lp) - sum(lb) for lp, lb in zip(policy.logprobs, baseline.logprobs, strict=True)]
    summary = summarize(cfg, policy, baseline, kls, why_no_kl, verdicts, len(prompts))
    answer_rows = output_rows(rows, policy, baseline, kls, verdicts)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    out = write_output(cfg, summary, answer_rows) if cfg.out else None
    return EvalResult(summary, answer_rows, out)


def side_summary(side: Side) -> dict[str, Any]:
    n = len(side.answers)
    per_family, counts = family_means(side.parts or [])
    tokens = sum(a.tokens for a in side.answers)
    generated = side.generated_tokens if side.generated_tokens is not None else tokens
    gap = None
    if side.kl_from == "teacher-forced":
        # the sampler's log-probs (KV cache, batched) against the teacher-forced ones used for the KL
        diffs = [abs(s - t) for a, lps in zip(side.answers, side.logprobs, strict=True)
                 for s, t in zip(a.sampler_logprobs, lps, strict=True)]
        gap = mean(diffs)
    return {"model": side.source.spec, "path": str(side.source.path) if side.source.local else None,
            "served": not side.source.local, "answers": n, "scorer": mean(side.scores or []),
            "per_family": per_family, "family_answers": counts, "reward": mean(side.rewards or []),
            "tokens": tokens / n if n else None, "words": mean([_words(a.text) for a in side.answers]),
            "eos_rate": mean([float(a.finish_reason == "stop") for a in side.answers]),
            "sampler_logprob_gap": gap, "kl_logprobs": side.kl_from, "best_of": best_of_summary(side),
            "seconds": round(side.seconds, 3),
            "tokens_per_s": round(generated / side.seconds, 1) if side.seconds > 0 else None}


def best_of_summary(side: Side) -> dict[str, Any] | None:
    """What selection bought: the kept answers' mean reward against the mean over every candidate."""
    if side.candidate_rewards is None:
        return None
    kept = mean(side.rewards or [])
    candidates = mean([r for group in side.candidate_rewards for r in group])
    return {"kept_reward": kept, "candidate_reward": candidates, "gain": kept - candidates,
            "generated_tokens": side.generated_tokens}


def _words(text: str) -> int:
    from toolkit.constraints import count_words

    return count_words(text)


def summarize(cfg: EvalConfig, policy: Side, baseline: Side | None, kls: list[float] | None,
              why_no_kl: str | None, verdicts: list[dict[str, str]] | None, n_prompts: int) -> dict[str, Any]:
    wins: dict[str, Any] = {}
    if baseline is not None:
        if policy.scores is not None:
            wins["scorer"] = win_rate(paired_outcomes(policy.scores, baseline.scores))
        if policy.rewards is not None:
            wins["reward"] = win_rate(paired_outcomes(policy.rewards, baseline.rewards))
        if verdicts is not None:
            wins["judge"] = win_rate([{"policy": 1.0, "baseline": 0.0}.get(v["outcome"], 0.5) for v in verdicts])
            wins["judge"]["no_verdict"] = sum("none" in (v["first"], v["swapped"]) for v in verdicts)
    kl_sem = standard_error(kls) if kls is not None else None
    return {"policy": side_summary(policy), "baseline": side_summary(baseline) if baseline is not None else None,
            "kl": mean(kls) if kls is not None else None, "kl_sem": kl_sem, "kl_unavailable": why_no_kl,
            "kl_note": BEST_OF_KL_NOTE if cfg.best_of > 1 else None,
            "best_of_kl_bound": best_of_kl_bound(cfg.best_of) if cfg.best_of > 1 else None,
            "win_rate": wins, "interval": INTERVAL if wins else None,
            "prompts": n_prompts, "samples": cfg.samples, "best_of": cfg.best_of, "prompts_file": cfg.prompts,
            "scorer": cfg.scorer, "reward_model": cfg.reward, "judge": cfg.judge, "temperature": cfg.temperature,
            "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "bf16": cfg.bf16,
            "system_prompt": cfg.system_prompt, "chat_template": cfg.chat_template,
            "baseline_answers": cfg.baseline_answers, "out": cfg.out}


def prompt_id(p: TokenizedPrompt) -> str:
    """The row's own `id` (generate-data writes one), else a hash of the prompt text."""
    given = p.context.get("id")
    if isinstance(given, (str, int)) and not isinstance(given, bool):
        return str(given)
    return hashlib.sha256(p.text.encode("utf-8")).hexdigest()[:16]


def output_rows(rows: Sequence[tuple[TokenizedPrompt, int]], policy: Side, baseline: Side | None,
                kls: list[float] | None, verdicts: list[dict[str, str]] | None) -> list[dict[str, Any]]:
    """One row per prompt x sample x side, prompt-major (a pair's two rows are neighbours)."""
    out = []
    for k, (p, j) in enumerate(rows):
        for side in (policy, baseline):
            if side is None:
                continue
            a = side.answers[k]
            row: dict[str, Any] = {"prompt_id": prompt_id(p), "row": p.row, "sample": j, "policy": side.name,
                                   "model": side.source.spec, "prompt": p.text, "answer": a.text,
                                   "finish_reason": a.finish_reason, "tokens": a.tokens, "words": _words(a.text)}
            scores = {}
            if side.scores is not None:
                scores["scorer"] = side.scores[k]
            if side.rewards is not None:
                scores["reward"] = side.rewards[k]
            row["scores"] = scores
            if side.parts is not None:
                row["rules"] = side.parts[k]
            if side.candidate_rewards is not None:
                row["best_of"] = {"rewards": side.candidate_rewards[k], "kept": side.kept[k]}
            if side is policy and kls is not None:
                row["kl"] = kls[k]
            if side is policy and verdicts is not None:
                row["judge"] = verdicts[k]
            out.append(row)
    return out


# ------------------------------------------------------------------------------------------ OUT


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _win_text(w: Mapping[str, Any]) -> str:
    return (f"{_num(w['rate'])} [{_num(w['low'])}, {_num(w['high'])}] "
            f"({w['wins']} wins, {w['ties']} ties, {w['losses']} losses)")


def metric_rows(summary: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, POLICY, BASE) as text: the table of the terminal summary and of the reports."""
    policy, base = summary["policy"], summary["baseline"] or {}
    rows = [("model", policy["model"], base.get("model", "—")), ("answers", _num(policy["answers"]),
                                                                   _num(base.get("answers")))]
    if summary["scorer"]:
        rows.append((f"scorer ({summary['scorer']})", _num(policy["scorer"]), _num(base.get("scorer"))))
    for kind in policy["per_family"]:
        rows.append((f"constraints/{kind} (n={policy['family_answers'][kind]})", _num(policy["per_family"][kind]),
                     _num(base.get("per_family", {}).get(kind))))
    if summary["reward_model"]:
        rows.append(("reward model", _num(policy["reward"]), _num(base.get("reward"))))
    if policy.get("best_of"):
        rows.append((f"reward, mean of all {summary['best_of']} candidates",
                     _num(policy["best_of"]["candidate_reward"]),
                     _num((base.get("best_of") or {}).get("candidate_reward"))))
    rows += [("tokens", _num(policy["tokens"], 1), _num(base.get("tokens"), 1)),
             ("words", _num(policy["words"], 1), _num(base.get("words"), 1)),
             ("EOS rate", _num(policy["eos_rate"]), _num(base.get("eos_rate")))]
    return rows


def kl_text(summary: Mapping[str, Any]) -> str:
    if summary["kl"] is None:
        return f"unavailable ({summary['kl_unavailable']})"
    text = f"{summary['kl']:.4f} ± {_num(summary['kl_sem'], 4)} nats per answer"
    if summary.get("best_of", 1) > 1:  # summaries written before --best-of have no such key
        text += (f" (on the best-of-{summary['best_of']} answers; best-of-N's own KL "
                 f"≤ {summary['best_of_kl_bound']:.4f})")
    return text


def win_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(f"win rate by {by}", _win_text(w)) for by, w in summary["win_rate"].items()]


def terminal_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Key/value rows for toolkit.console.summary_table: 'POLICY | BASE' per metric."""
    two = summary["baseline"] is not None
    rows = [(m, f"{p} | {b}" if two else p) for m, p, b in metric_rows(summary)]
    rows += [("KL(POLICY ‖ BASE)", kl_text(summary)), *win_rows(summary)]
    if summary["out"]:
        rows.append(("out", summary["out"]))
    return rows


def answer_pairs(rows: Sequence[Mapping[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The first `limit` prompts' first-sample answers side by side: prompt, policy, baseline (text) and
    policy_score, baseline_score (the scorer's, when there is one)."""
    pairs: list[dict[str, Any]] = []
    for row in rows:
        if row["policy"] == "policy" and row["sample"] == 0 and len(pairs) < limit:
            pairs.append({"prompt": row["prompt"], "policy": row["answer"], "baseline": "",
                          "policy_score": row["scores"].get("scorer"), "baseline_score": None})
        elif row["policy"] == "baseline" and row["sample"] == 0 and pairs and not pairs[-1]["baseline"]:
            pairs[-1].update(baseline=row["answer"], baseline_score=row["scores"].get("scorer"))
    return pairs


def render_reports(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], examples: int = 4) -> tuple[str, str]:
    """(report.md, report.html) from templates/eval_policy/."""
    import jinja2

    from toolkit.resources import template_path

    context = {"s": summary, "metrics": metric_rows(summary), "kl": kl_text(summary), "wins": win_rows(summary),
               "examples": answer_pairs(rows, examples), "interval": INTERVAL,
               "temperature": _num(summary["temperature"], 2)}
    texts = []
    for name, escape in (("report.md", False), ("report.html", True)):
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=escape, keep_trailing_newline=True)
        texts.append(env.from_string(template_path(f"eval_policy/{name}").read_text(encoding="utf-8")).render(**context))
    return texts[0], texts[1]


def write_output(cfg: EvalConfig, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Path:
    """OUT/answers.jsonl, summary.json, report.md, report.html, built aside and renamed into place."""
    from toolkit.io import atomic_dir, write_json

    markdown, html = render_reports(summary, rows)
    with atomic_dir(cfg.out, KIND, overwrite=cfg.overwrite) as tmp:
        with open(tmp / "answers.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        write_json(tmp / "summary.json", summary)
        (tmp / "report.md").write_text(markdown, encoding="utf-8")
        (tmp / "report.html").write_text(html, encoding="utf-8")
    return Path(cfg.out)
