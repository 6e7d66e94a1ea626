"""`llamakit dpo`: Direct Preference Optimization of a policy on preference pairs, no reward model.

Pairs come in every format `train-reward` reads (`toolkit.reward.data.load_preferences`). Each prompt goes
through the policy's chat template with the generation prompt; each answer is the assistant turn the template
adds after it, up to its end-of-turn token (as `sft` labels it). The loss is TRL's: with
logits = β·((log π(c) − log π(r)) − (log π_ref(c) − log π_ref(r))),

    sigmoid   −log σ(logits)·(1 − ε) − log σ(−logits)·ε      (ε: label smoothing; cDPO)
    ipo       (logits/β − 1/(2β))²                            (log-probs averaged over answer tokens)
    + α · NLL(c) per token with --rpo-alpha α                 (RPO, Pang et al. 2024: keeps the chosen likely)

where log π(x) sums the answer's token log-probs (prompt and padding masked). Chosen and rejected answers go
through the model in one forward; where a batch saves ≥ 10% of token positions by it, each pair's prompt runs
once and both answers run on its KV cache (`shared_prompt_batch`, as train-reward's shared prefix). The LM head
meets only the answer tokens' positions, a chunk at a time, and a frozen head (LoRA) keeps no logits for backward
(`toolkit.head_logprobs`). The reference is the policy with its LoRA adapter switched off, or a frozen copy
without LoRA; `--precompute-ref` computes its log-probs once before training. A plain torch loop under Accelerate
(DDP / bf16 / gradient accumulation), as `sft`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.errors import SKIP_BAD_ROWS_HELP, UserError, set_aside_warning, suggesting_skip_bad_rows
from toolkit.options import SEED_MAX, check_ranges
from toolkit.options import flag_field as _f
from toolkit.training.trackers import REPORT_TO

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from toolkit.rows import Pair
    from toolkit.training.runlog import RunLog

IGNORE = -100
MODEL_DIR = "model"  # a checkpoint's save_pretrained directory (the LoRA adapter or all weights)
REFERENCE = "reference"  # a checkpoint's precomputed reference log-probs (reference.safetensors)
LOSSES = ("sigmoid", "ipo")
# What each step logs per pair, averaged over the step's pairs (TRL's names); `loss` first.
PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "nll_loss")
MIN_SAVING = 0.1  # the shared-prompt forward runs only where it saves this share of token positions (train-reward's)


# ---- pairs into tokens ---------------------------------------------------------------------------------------

@dataclass
class PairTokens:
    """One pair as token ids: each answer after its prompt, and where the answer starts."""

    chosen: list[int]
    chosen_start: int
    rejected: list[int]
    rejected_start: int


def encode_answer(tokenizer, messages: list[dict[str, str]], answer: str,
                  eos_ids: set[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the prompt with the generation prompt, and the tokens the assistant turn
    adds to it, cut after its first end-of-turn token (the template's trailing newline is not scored);
    the end-of-turn token is appended when the template has none."""
    from toolkit.chat_format import encode_chat

    prompt = encode_chat(tokenizer, messages, add_generation_prompt=True)
    full = encode_chat(tokenizer, [*messages, {"role": "assistant", "content": answer}], add_generation_prompt=False)
    if full[:len(prompt)] != prompt:
        raise UserError("this tokenizer's chat template does not render a conversation turn by turn, "
                        "so answer tokens cannot be located")
    answer_ids = full[len(prompt):]
    ends = [j for j, t in enumerate(answer_ids) if t in eos_ids]
    if ends:
        return prompt, answer_ids[:ends[0] + 1]
    return prompt, answer_ids + sorted(eos_ids)[:1]


def prompt_messages(prompt: str) -> list[dict[str, str]]:
    """A pair's HH prompt text as chat messages (a prompt without HH turns is one user message)."""
    from toolkit.rows import parse_hh

    return parse_hh(prompt) or [{"role": "user", "content": prompt.strip()}]


def tokenize_pairs(pairs: list[Pair], tokenizer, max_length: int,
                   max_prompt_length: int) -> tuple[list[PairTokens], dict[str, int]]:
    """Every pair as PairTokens: a prompt keeps its last `max_prompt_length` tokens, an answer is cut where
    prompt + answer reach `max_length`; the pairs each cut touched are counted."""
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    out, cut_prompts, cut_answers = [], 0, 0
    for pair in pairs:
        sides, prompt_cut, answer_cut = [], False, False
        for prompt, answer in ((pair.prompt, pair.chosen), (pair.rejected_prompt or pair.prompt, pair.rejected)):
            prompt_ids, answer_ids = encode_answer(tokenizer, prompt_messages(prompt), answer, eos)
            if len(prompt_ids) > max_prompt_length:
                prompt_ids, prompt_cut = prompt_ids[-max_prompt_length:], True
            room = max_length - len(prompt_ids)
            if len(answer_ids) > room:
                answer_ids, answer_cut = answer_ids[:room], True
            sides.append((prompt_ids + answer_ids, len(prompt_ids)))
        cut_prompts, cut_answers = cut_prompts + prompt_cut, cut_answers + answer_cut
        out.append(PairTokens(sides[0][0], sides[0][1], sides[1][0], sides[1][1]))
    return out, {"pairs": len(out), "truncated_prompts": cut_prompts, "truncated_answers": cut_answers}


def load_pairs(path: str, tokenizer, max_length: int, max_prompt_length: int,
               skip_bad_rows: bool = False) -> tuple[list[PairTokens], dict[str, Any]]:
    """Tokenized pairs and their stats; with `skip_bad_rows` the rows that do not parse are set aside and listed
    in stats["bad_rows"] (else the first one stops the run)."""
    from toolkit.reward.data import load_preferences, pairs_from_scored

    with suggesting_skip_bad_rows():
        data = load_preferences(path, skip_bad_rows=skip_bad_rows)
    pairs = data.pairs or pairs_from_scored(data.scored)
    if not pairs:
        raise UserError("no preference pair in the file (scored rows need two answers to one prompt)", file=path)
    tokens, stats = tokenize_pairs(pairs, tokenizer, max_length, max_prompt_length)
    return tokens, {**stats, "bad_rows": data.bad_rows}


def collate(batch: list[PairTokens], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [chosen of every pair; rejected of every pair] (2B rows, one forward), with labels equal
    to the answer tokens and IGNORE on prompt and padding."""
    import torch

    rows = [(p.chosen, p.chosen_start) for p in batch] + [(p.rejected, p.rejected_start) for p in batch]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, start) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, start:len(ids)] = input_ids[i, start:len(ids)]
        attention_mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def shared_prompt_batch(batch: list[PairTokens], pad_id: int,
                        min_saving: float | None = MIN_SAVING) -> dict[str, torch.Tensor] | None:
    """The batch for the shared-prompt forward: each pair's prompt once (left-padded `prefix_ids`), then its
    chosen and rejected rest (rows 2i and 2i + 1 of right-padded `suffix_ids`) with `suffix_labels` on the
    answer tokens. A pair is cut where its answers part or the earlier answer starts, whichever comes first:
    the prefix holds no scored token, so each answer's first token is predicted by the prefix's last position.
    A pair that shares no token gets an all-padding prefix row. None when no pair shares a token, or when
    the prefix saves less than `min_saving` of the plain batch's token positions: padding prefixes and
    suffixes each to their own longest eats the saving when prompt lengths vary (None: share anyway)."""
    import torch

    from toolkit.reward.model import common_prefix_length, pad

    cuts = [min(common_prefix_length(p.chosen, p.rejected), p.chosen_start, p.rejected_start) for p in batch]
    if max(cuts) < 1:
        return None
    prefix_ids, prefix_mask = pad([p.chosen[:k] for p, k in zip(batch, cuts, strict=True)], pad_id, "left")
    sides = [(ids[k:], start - k) for p, k in zip(batch, cuts, strict=True)
             for ids, start in ((p.chosen, p.chosen_start), (p.rejected, p.rejected_start))]
    suffix_ids, suffix_mask = pad([ids for ids, _ in sides], pad_id, "right")
    plain = 2 * len(batch) * max(len(ids) for p in batch for ids in (p.chosen, p.rejected))
    if min_saving is not None and prefix_mask.numel() + suffix_mask.numel() > (1 - min_saving) * plain:
        return None
    labels = torch.full_like(suffix_ids, IGNORE)
    for i, (ids, start) in enumerate(sides):
        labels[i, start:len(ids)] = suffix_ids[i, start:len(ids)]
    return {"prefix_ids": prefix_ids, "prefix_mask": prefix_mask, "suffix_ids": suffix_ids,
            "suffix_mask": suffix_mask, "suffix_labels": labels}


def collate_pairs(batch: list[PairTokens], pad_id: int, share: bool) -> dict[str, torch.Tensor]:
    """What `concatenated_logps` takes: the shared-prompt batch where sharing is on and pays, else `collate`'s."""
    shared = shared_prompt_batch(batch, pad_id) if share else None
    return shared if shared is not None else collate(batch, pad_id)


# ---- the maths -------------------------------------------------------------------------------------------------

def sequence_logps(outputs: torch.Tensor, labels: torch.Tensor, average: bool = False,
                   head: torch.nn.Linear | None = None) -> torch.Tensor:
    """Per row: the sum (or mean) of the log-probs of the labelled tokens, each predicted by the output one
    position before it; IGNORE labels (prompt, padding) count for nothing. `outputs`: logits, or with `head` the
    hidden states that feed it (`toolkit.head_logprobs.labelled_logprobs`)."""
    from toolkit.head_logprobs import labelled_logprobs

    total = labelled_logprobs(outputs, labels, head).sum(-1)
    return total / (labels[:, 1:] != IGNORE).sum(-1).clamp(min=1) if average else total


def concatenated_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], average: bool = False,
                       prefix_model: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probs of a batch from `collate_pairs`: a shared-prompt batch (see
    `_shared_prompt_outputs`; `prefix_model`, default `model`, runs its prompts), or a plain one in one forward.
    The model's outputs start at the position before the earliest answer token (`logits_to_keep`): prompt
    positions predict nothing that is scored. A plain linear head (not ZeRO-3-partitioned) is applied apart to
    the answer tokens' hidden states alone (`toolkit.head_logprobs.hidden_states_out`)."""
    from toolkit.head_logprobs import hidden_states_out

    prefix_model = prefix_model if prefix_model is not None else model
    with hidden_states_out(prefix_model) as head:
        if "prefix_ids" in batch:
            outputs, labels = _shared_prompt_outputs(model, prefix_model, batch)
        else:
            labels = batch["labels"]
            first_answer = int((labels != IGNORE).float().argmax(-1).min())
            keep = labels.shape[1] - max(first_answer - 1, 0)
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                            logits_to_keep=keep).logits
            labels = labels[:, labels.shape[1] - keep:]
    logps = sequence_logps(outputs, labels, average, head)
    if "prefix_ids" in batch:  # pairs lie interleaved
        return logps[0::2], logps[1::2]
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


def _shared_prompt_outputs(model: torch.nn.Module, prefix_model: torch.nn.Module,
                           batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, labels) of a shared-prompt batch, chosen and rejected rows interleaved. A causal token sees only
    what precedes it, so a pair's prompt has the same keys and values under either answer: the prompts run once
    (left-padded, positions from the mask, only the last position's output), both answers run on their cache
    (gradients flow through it), and the prompt's last output predicts each suffix's token 0. Under DDP
    `prefix_model` is the unwrapped module and `model` the wrapped one: DDP then sees one forward, and the one
    backward reaches every parameter once."""
    import torch

    from toolkit.prefix_cache import shared_prefix_forward

    # Column 0 stands for the prompt's last position; as in the plain forward, outputs start one before the
    # earliest scored token.
    labels = torch.nn.functional.pad(batch["suffix_labels"], (1, 0), value=IGNORE)
    width = labels.shape[1] - 1  # the suffixes'
    first_answer = int((labels != IGNORE).float().argmax(-1).min())
    keep = labels.shape[1] - max(first_answer - 1, 0)
    prefix, suffix = shared_prefix_forward(model, batch["prefix_ids"], batch["prefix_mask"], batch["suffix_ids"],
                                           batch["suffix_mask"], 2, prefix_model=prefix_model,
                                           prefix_kwargs={"logits_to_keep": 1},
                                           suffix_kwargs={"logits_to_keep": min(keep, width)})
    outputs = suffix.logits
    if keep > width:
        outputs = torch.cat([prefix.logits.repeat_interleave(2, dim=0).to(outputs.dtype), outputs], dim=1)
    return outputs, labels[:, labels.shape[1] - keep:]


def chosen_nll(chosen: torch.Tensor, batch: dict[str, torch.Tensor], average: bool = False) -> torch.Tensor:
    """Per pair: the chosen answer's negative log-likelihood per token, from its sequence log-prob (`chosen`,
    a sum, or already a mean when `average`) and the batch's labels (either batch layout)."""
    if average:
        return -chosen
    if "suffix_labels" in batch:  # every labelled suffix token is scored (token 0 by the prompt's last logits)
        tokens = (batch["suffix_labels"][0::2] != IGNORE).sum(-1)
    else:
        labels = batch["labels"]
        tokens = (labels[: labels.shape[0] // 2, 1:] != IGNORE).sum(-1)
    return -chosen / tokens.clamp(min=1)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             nll: torch.Tensor | None = None, rpo_alpha: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-pair loss and TRL's metrics (rewards are β·(log π − log π_ref), detached). `nll`: the chosen
    answers' per-token NLL (`chosen_nll`), added to the loss × `rpo_alpha` (RPO) and logged as nll_loss."""
    import torch
    import torch.nn.functional as F

    logits = beta * ((chosen - rejected) - (ref_chosen - ref_rejected))
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    elif loss_type == "ipo":
        losses = (logits / beta - 1 / (2 * beta)) ** 2  # IPO eq. 17, β as τ
    else:
        raise UserError(f"unknown --loss '{loss_type}' (one of {', '.join(LOSSES)})")
    if nll is None:
        nll = torch.zeros_like(losses)
    elif rpo_alpha:
        losses = losses + rpo_alpha * nll
    reward_c, reward_r = beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()
    return {"loss": losses, "rewards/chosen": reward_c, "rewards/rejected": reward_r,
            "rewards/accuracies": (reward_c > reward_r).float(), "rewards/margins": reward_c - reward_r,
            "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach(), "nll_loss": nll.detach()}


# ---- configuration ---------------------------------------------------------------------------------------------

@dataclass
class DPOConfig:
    data: str = _f("", "Preference pairs: any format train-reward reads (llamakit, TRL, HH, datasets dir, "
                       "annotate export).", nonempty=True)
    policy: str = _f("smollm2-135m", "Model to train: an embedded alias or a Hugging Face directory.",
                     nonempty=True)
    out: str = _f("runs/dpo", "Output directory (policy/, metrics.jsonl, curves.png, checkpoints/).",
                  nonempty=True)
    eval_data: str = _f("", "Held-out pairs, evaluated at the end (eval/ metrics in run.json).")
    loss: str = _f("sigmoid", "sigmoid (DPO) or ipo.", choices=LOSSES)
    beta: float = _f(0.1, "β: strength of the pull towards the reference (higher = closer).",
                     min=0, min_open=True)
    label_smoothing: float = _f(0.0, "ε: the share of labels assumed flipped (conservative DPO; sigmoid only).",
                                min=0, max=0.5, max_open=True)
    rpo_alpha: float = _f(0.0, "α of RPO: add α × the chosen answer's per-token NLL to the loss, so the chosen "
                               "answer gets likelier rather than both falling (TRL's rpo_alpha; 1.0 in the RPO paper).",
                          min=0)
    epochs: float = _f(1.0, "Passes over the pairs (fractions allowed).", min=0, min_open=True)
    max_steps: int = _f(0, "Stop after this many optimizer steps (0 = use --epochs).", min=0)
    batch_size: int = _f(4, "Pairs per micro-batch, per process (each pair is two sequences).", min=1)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", min=1)
    learning_rate: float = _f(5e-6, "Peak AdamW learning rate: 10× TRL's 5e-7, since a CPU run is a few hundred "
                                    "steps rather than thousands (LoRA usually wants ~5e-5).", min=0, min_open=True)
    warmup_ratio: float = _f(0.1, "Linear warm-up over this share of steps, then linear decay to 0.", min=0, max=1)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).", min=0)
    max_length: int = _f(512, "Tokens of prompt + answer; longer answers lose their end (and are counted).", min=2)
    max_prompt_length: int = _f(256, "Tokens of the prompt; longer prompts keep their last tokens (counted).",
                                min=1)
    lora: bool = _f(False, "Train a LoRA adapter (merged into the saved policy; the reference is the adapter off).")
    lora_r: int = _f(16, "LoRA rank.", min=1)
    lora_alpha: int = _f(32, "LoRA α.", min=1)
    lora_target: str = _f("all-linear", "LoRA target modules: all-linear or a comma list.", nonempty=True)
    save_adapter: bool = _f(False, "Also write OUT/adapter: the LoRA adapter alone (PEFT), on the base policy it "
                            "names (needs --lora).")
    bf16: bool = _f(False, "bfloat16 autocast.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward (less memory).")
    shared_prefix: bool = _f(True, "Run a pair's shared prompt once and both answers on its cache (where it saves "
                             "≥ 10% of token positions; not with --gradient-checkpointing or DeepSpeed).")
    skip_bad_rows: bool = _f(False, SKIP_BAD_ROWS_HELP, negatable=False)
    precompute_ref: bool = _f(False, "Compute the reference log-probs once before training, of the pairs the "
                                     "steps will read (no reference forward per step; without --lora the "
                                     "reference copy is then freed).")
    seed: int = _f(0, "Seed for shuffling and initialisation.", min=0, max=SEED_MAX)
    save_every: int = _f(0, "Checkpoint every N optimizer steps (0 = only at the end).", min=0)
    keep_checkpoints: int = _f(2, "Checkpoints kept on disk (0 = all).", min=0)
    resume: bool = _f(False, "Continue from the last checkpoint in --out.")
    overwrite: bool = _f(False, "Replace an earlier dpo run in --out (never a directory llamakit did not write).")
    report_to: str = _f("none", "Experiment tracker, offline by default: tensorboard (OUT/runs), wandb (OUT/wandb), "
                        "mlflow (OUT/mlruns).", choices=REPORT_TO)

    def validate(self) -> None:
        """Raise UserError naming the flag of a field outside its range (the CLI checks at parse time)."""
        check_ranges(self)
        if self.max_prompt_length >= self.max_length:
            raise UserError(f"--max-prompt-length {self.max_prompt_length} leaves no room for the answer within "
                            f"--max-length {self.max_length}; make it smaller")
        if self.save_adapter and not self.lora:
            raise UserError("--save-adapter needs --lora (without LoRA no adapter is trained; the whole policy is "
                            "saved either way)")


@dataclass
class DPOResult:
    out: Path
    policy_dir: Path | None
    steps: int
    history: list[dict[str, Any]]
    data_stats: dict[str, Any]
    eval_metrics: dict[str, float]


# ---- training --------------------------------------------------------------------------------------------------

@dataclass
class _Run:
    """Everything the loop needs, built once by `_set_up`."""

    cfg: DPOConfig
    accelerator: Accelerator
    out: Path
    tokenizer: Any
    pairs: list[PairTokens]
    eval_pairs: list[PairTokens]
    stats: dict[str, Any]
    model: torch.nn.Module  # as prepared by Accelerate (DDP-wrapped when distributed)
    unwrapped: torch.nn.Module  # what checkpoints, the reference (adapter off) and the final save see
    reference: torch.nn.Module | None  # the frozen copy (no LoRA, not precomputed)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    total: int  # optimizer steps in the whole run
    start: int  # optimizer steps already done (a resumed run)
    # "train"/"eval": [N, 2], NaN for a pair no step reads
    ref_logps: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    shared: bool = False  # batches may take the shared-prompt forward (`collate_pairs`)
    shared_batches: int = 0  # this process's training micro-batches that took it, in this run


def train_dpo(cfg: DPOConfig) -> DPOResult:
    """DPO of `cfg.policy` on `cfg.data`; write policy/, metrics.jsonl, curves.png, run.json under `cfg.out`."""
    import torch

    from toolkit.training.progress import loss_bar
    from toolkit.training.runlog import RunLog

    cfg.validate()
    run = _set_up(cfg)
    log = RunLog(run.out, run.accelerator.is_main_process, tracker=run.accelerator)
    t_run = time.perf_counter()
    step = run.start
    try:
        with loss_bar("dpo", run.total, run.start, run.accelerator.is_main_process) as advance:
            while step < run.total:
                t0 = time.perf_counter()
                metrics, grad_norm = _optimizer_step(run, _step_indices(run, step), step + 1)
                step += 1
                _after_step(run, log, advance, step, metrics, grad_norm, t0)
        eval_metrics = _evaluate(run) if run.eval_pairs else {}
    except torch.OutOfMemoryError:
        raise UserError("out of memory; lower --batch-size (raise --gradient-accumulation-steps to keep the "
                        "effective batch), lower --max-length, or use --lora, --bf16, --gradient-checkpointing, "
                        "--precompute-ref") from None
    finally:
        log.close()
    return _finish(run, log, step, t_run, eval_metrics)


def _set_up(cfg: DPOConfig) -> _Run:
    """Accelerator, run directory, pairs, policy and reference, optimizer and schedule, restored from the last
    checkpoint when resuming; every process returns here together."""
    import torch

    from toolkit.io import claim_run_dir, start_run_dir
    from toolkit.models import load_causal_lm, load_tokenizer
    from toolkit.training.accelerator import configure_deepspeed, make_accelerator, zero_stage
    from toolkit.training.batches import examples_read
    from toolkit.training.model import base_dtype, make_trainable
    from toolkit.training.runlog import drop_rows_after
    from toolkit.training.schedule import warmup_linear
    from toolkit.training.trackers import start_tracking

    out = Path(cfg.out)
    accelerator = make_accelerator(cfg.bf16, cfg.report_to, out)
    claim_run_dir(out, "dpo-run", resume=cfg.resume, overwrite=cfg.overwrite)
    torch.manual_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.policy)  # data errors surface before the model loads
    pairs, stats = load_pairs(cfg.data, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.skip_bad_rows)
    eval_pairs: list[PairTokens] = []
    if cfg.eval_data:  # its rows set aside are named with the training file's, each by its own file
        eval_pairs, eval_stats = load_pairs(cfg.eval_data, tokenizer, cfg.max_length, cfg.max_prompt_length,
                                            cfg.skip_bad_rows)
        stats["bad_rows"] += eval_stats["bad_rows"]
    _warn_about_data(accelerator, stats, cfg)
    dtype = base_dtype(bf16=cfg.bf16, lora=cfg.lora)
    model, tokenizer = load_causal_lm(cfg.policy, dtype=dtype)
    reference = None  # with LoRA: the adapter switched off
    if not cfg.lora:  # under ZeRO-3 both load in shards (zero.Init); a copy would gather the policy's, not its own
        partitioned = zero_stage(accelerator) == 3
        reference = _frozen(load_causal_lm(cfg.policy, dtype=dtype)[0] if partitioned else copy.deepcopy(model),
                            accelerator.device)
    model = make_trainable(model, lora=cfg.lora, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                           lora_target=cfg.lora_target, gradient_checkpointing=cfg.gradient_checkpointing,
                           base=cfg.policy)

    # Each process takes its share of every optimizer step's micro-batches.
    per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    steps_per_epoch = max(1, per_epoch // (cfg.gradient_accumulation_steps * accelerator.num_processes))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=0.0)
    scheduler = warmup_linear(optimizer, total, int(cfg.warmup_ratio * total))
    configure_deepspeed(accelerator, cfg.batch_size, cfg.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    run = _Run(cfg, accelerator, out, tokenizer, pairs, eval_pairs, stats, model, accelerator.unwrap_model(model),
               reference, optimizer, scheduler, steps_per_epoch, total, 0)
    # A gradient-checkpointed model drops the KV cache the shared prompt is kept in. DeepSpeed's engine is not
    # split into a prompt and an answer forward (and under ZeRO-3 every process must run the same forwards,
    # which a per-batch choice between one and two cannot promise).
    run.shared = cfg.shared_prefix and not cfg.gradient_checkpointing and accelerator.state.deepspeed_plugin is None
    if cfg.resume:
        run.start = _resume(run)
        if accelerator.is_main_process:
            drop_rows_after(out / "metrics.jsonl", run.start)
    if cfg.precompute_ref:
        # Only the pairs the steps still to run will read (a run shorter than an epoch reads fewer than all); a
        # resumed run's come from its checkpoint. Held-out pairs may change between runs: all of them, anew.
        read = examples_read(len(pairs), start=run.start, stop=total, steps_per_epoch=steps_per_epoch,
                             batch_size=cfg.batch_size, accumulation=cfg.gradient_accumulation_steps,
                             world_size=accelerator.num_processes, seed=cfg.seed)
        run.ref_logps = {"train": _fill_ref_logps(run, pairs, read, run.ref_logps.get("train"))}
        if eval_pairs:
            run.ref_logps["eval"] = _fill_ref_logps(run, eval_pairs, range(len(eval_pairs)))
        run.reference = None  # its log-probs are all there: the copy's memory goes back
    if accelerator.is_main_process:
        start_run_dir(out, "dpo-run", overwrite=cfg.overwrite)
    start_tracking(accelerator, cfg.report_to, out, "llamakit-dpo", cfg)  # before the run's first row
    accelerator.wait_for_everyone()
    return run


def _warn_about_data(accelerator: Accelerator, stats: dict[str, Any], cfg: DPOConfig) -> None:
    from rich.markup import escape

    from toolkit.console import console

    if not accelerator.is_main_process:
        return
    if stats["bad_rows"]:
        console.print("[yellow]warning:[/] " + escape(set_aside_warning(stats["bad_rows"])), highlight=False,
                      soft_wrap=True)
    if stats["truncated_prompts"]:
        console.print(f"[yellow]warning:[/] {stats['truncated_prompts']} pair(s) had their prompt cut to its last "
                      f"--max-prompt-length {cfg.max_prompt_length} tokens")
    if stats["truncated_answers"]:
        console.print(f"[yellow]warning:[/] {stats['truncated_answers']} pair(s) had an answer cut to fit "
                      f"--max-length {cfg.max_length}")


def _frozen(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The reference without LoRA: the loaded policy as it is, never trained."""
    from toolkit.training.model import disable_dropout

    reference = model.to(device).eval()
    reference.requires_grad_(False)
    disable_dropout(reference)
    return reference


def _resume(run: _Run) -> int:
    """Restore the last checkpoint in --out, if any (with its precomputed reference log-probs); the step to
    continue from."""
    from toolkit.training.checkpoint import deepspeed_engine, latest_checkpoint, load_checkpoint

    checkpoint = latest_checkpoint(run.out)
    if checkpoint is None:
        return 0
    tensors = (REFERENCE,) if run.cfg.precompute_ref and (checkpoint / f"{REFERENCE}.safetensors").is_file() else ()
    restored = load_checkpoint(checkpoint, run.unwrapped, run.optimizer, weights=MODEL_DIR, tensors=tensors,
                               rank=run.accelerator.process_index, world_size=run.accelerator.num_processes,
                               engine=deepspeed_engine(run.accelerator))
    run.scheduler.load_state_dict(restored.state["scheduler"])
    if tensors:
        run.ref_logps = {"train": restored.tensors[REFERENCE]["train"].to(run.accelerator.device)}
    return restored.step


def _step_indices(run: _Run, step: int) -> list[list[int]]:
    """This process's micro-batches (pair indices) for optimizer step `step` (0-based)."""
    from toolkit.training.batches import step_micro_batches

    cfg, accelerator = run.cfg, run.accelerator
    return step_micro_batches(len(run.pairs), step=step, steps_per_epoch=run.steps_per_epoch,
                              batch_size=cfg.batch_size, accumulation=cfg.gradient_accumulation_steps,
                              rank=accelerator.process_index, world_size=accelerator.num_processes, seed=cfg.seed)


def _batch(run: _Run, pairs: list[PairTokens], indices: list[int]) -> dict[str, torch.Tensor]:
    from toolkit.generation import pad_token_id

    pad_id = pad_token_id(run.tokenizer)
    tensors = collate_pairs([pairs[i] for i in indices], pad_id, run.shared)
    return {k: v.to(run.accelerator.device) for k, v in tensors.items()}


def _reference_logps(run: _Run, split: str, indices: list[int],
                     batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's (chosen, rejected) log-probs of a batch of `split` ("train" / "eval"): precomputed, or
    a forward."""
    if split in run.ref_logps:
        both = run.ref_logps[split][indices]
        return both[:, 0], both[:, 1]
    return _reference_forward(run, batch)


def _reference_forward(run: _Run, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's (chosen, rejected) log-probs: the frozen copy, or the policy with its adapter off."""
    import torch

    from toolkit.training.accelerator import autocast, gathered_weights

    average = run.cfg.loss == "ipo"
    with torch.no_grad(), autocast(run.accelerator, run.cfg.bf16):
        if run.reference is not None:
            with gathered_weights(run.accelerator, run.reference):  # its ZeRO-3 shards, outside any engine
                return concatenated_logps(run.reference, batch, average)
        with run.unwrapped.disable_adapter():
            return concatenated_logps(run.unwrapped, batch, average)


def _forward_share(accelerator: Accelerator, n: int) -> list[int]:
    """Which of `n` pairs this process runs through a model outside training: its share, or all of them under
    ZeRO-3, where every process must run the same forwards (shares of an odd `n` differ in batches). The
    callers' results do not change: a table filled twice, or sums whose ratios are the means."""
    from toolkit.training.accelerator import forwards_together

    if forwards_together(accelerator):
        return list(range(n))
    return list(range(accelerator.process_index, n, accelerator.num_processes))


def _fill_ref_logps(run: _Run, pairs: list[PairTokens], wanted: Iterable[int],
                    table: torch.Tensor | None = None) -> torch.Tensor:
    """The [N, 2] reference log-probs `table` (NaN where never computed; a new one when None) with every `wanted`
    pair's filled in: each process computes a share of those missing, all get the whole."""
    import torch
    from accelerate.utils import gather_object

    from toolkit.training.progress import count_bar

    table = torch.full((len(pairs), 2), float("nan")) if table is None else table.cpu().clone()
    unknown = torch.isnan(table[:, 0]).tolist()
    missing = [j for j in wanted if unknown[j]]
    world = run.accelerator.num_processes
    # The table is filled by index, so the pass may take the pairs in any order: by length, batches pad less.
    mine = sorted((missing[k] for k in _forward_share(run.accelerator, len(missing))),
                  key=lambda j: _lengths(pairs[j]))
    rows = []
    with count_bar("reference log-probs", len(mine), run.accelerator.is_main_process) as advance:
        for i in range(0, len(mine), run.cfg.batch_size):
            indices = mine[i:i + run.cfg.batch_size]
            chosen, rejected = _reference_forward(run, _batch(run, pairs, indices))
            rows += [(j, float(c), float(r)) for j, c, r in zip(indices, chosen, rejected, strict=True)]
            advance(len(indices))
    if world > 1:
        rows = gather_object(rows)
    for j, c, r in rows:
        table[j] = torch.tensor([c, r])
    return table.to(run.accelerator.device)


def _lengths(pair: PairTokens) -> tuple[int, int]:
    """(prompt, longer answer) in tokens: what a shared-prompt batch pads to."""
    prompt = min(pair.chosen_start, pair.rejected_start)
    return prompt, max(len(pair.chosen), len(pair.rejected)) - prompt


def _optimizer_step(run: _Run, micro: list[list[int]], step: int) -> tuple[dict[str, float], float]:
    """Accumulate the micro-batches' gradients, clip, step; (metrics averaged over every pair of the step on
    every process, gradient norm). Each micro-batch's loss is its pairs' loss sum divided by this process's
    pairs in the step, so the step's loss is the mean over its pairs however they fall into micro-batches."""
    import torch

    from toolkit.training.accelerator import autocast, gradient_sync

    accelerator, cfg = run.accelerator, run.cfg
    n_pairs = sum(len(m) for m in micro)
    sums = torch.zeros(len(PAIR_METRICS) + 1, device=accelerator.device)  # + the pair count
    for g, indices in enumerate(micro):
        batch = _batch(run, run.pairs, indices)
        run.shared_batches += "prefix_ids" in batch
        ref_chosen, ref_rejected = _reference_logps(run, "train", indices, batch)
        with gradient_sync(accelerator, run.model, g == len(micro) - 1), autocast(accelerator, cfg.bf16):
            chosen, rejected = concatenated_logps(run.model, batch, cfg.loss == "ipo", prefix_model=run.unwrapped)
            metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta, cfg.loss, cfg.label_smoothing,
                               chosen_nll(chosen, batch, cfg.loss == "ipo"), cfg.rpo_alpha)
            loss = metrics["loss"].sum() / n_pairs
            if not torch.isfinite(loss):
                raise UserError(f"loss became NaN at step {step}; stopped without saving; lower "
                                "--learning-rate and --resume from the last checkpoint")
            accelerator.backward(loss)
        sums += torch.stack([*(metrics[k].detach().float().sum() for k in PAIR_METRICS),
                             torch.tensor(float(len(indices)), device=accelerator.device)])
    grad_norm = (float(accelerator.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm))
                 if cfg.max_grad_norm > 0 else float("nan"))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return _means(accelerator, sums), grad_norm


def _means(accelerator: Accelerator, sums: torch.Tensor) -> dict[str, float]:
    """Per-pair means of PAIR_METRICS from this process's sums (last entry: the pair count), over processes."""
    total = accelerator.reduce(sums, "sum")
    count = float(total[-1]) or 1.0
    return {k: float(v) / count for k, v in zip(PAIR_METRICS, total[:-1], strict=True)}


def _after_step(run: _Run, log: RunLog, advance: Callable[[int, float], None], step: int,
                metrics: dict[str, float], grad_norm: float, t0: float) -> None:
    """Log the step's metrics row, move the bar, checkpoint when one is due (and always at the last step)."""
    cfg = run.cfg
    log.log({"step": step, "epoch": round(step / run.steps_per_epoch, 4), **metrics,
             "lr": run.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "time/step": time.perf_counter() - t0})
    advance(step, metrics["loss"])
    if (cfg.save_every and step % cfg.save_every == 0) or step == run.total:
        _checkpoint(run, step)


def _evaluate(run: _Run) -> dict[str, float]:
    """PAIR_METRICS of the final policy on the held-out pairs, prefixed eval/ (each process a share)."""
    import torch

    from toolkit.training.accelerator import autocast

    accelerator, cfg = run.accelerator, run.cfg
    mine = _forward_share(accelerator, len(run.eval_pairs))
    sums = torch.zeros(len(PAIR_METRICS) + 1, device=accelerator.device)
    run.unwrapped.eval()
    for i in range(0, len(mine), cfg.batch_size):
        indices = mine[i:i + cfg.batch_size]
        batch = _batch(run, run.eval_pairs, indices)
        ref_chosen, ref_rejected = _reference_logps(run, "eval", indices, batch)
        with torch.no_grad(), autocast(accelerator, cfg.bf16):
            chosen, rejected = concatenated_logps(run.unwrapped, batch, average=cfg.loss == "ipo")
        metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta, cfg.loss, cfg.label_smoothing,
                           chosen_nll(chosen, batch, cfg.loss == "ipo"), cfg.rpo_alpha)
        sums += torch.stack([*(metrics[k].float().sum() for k in PAIR_METRICS),
                             torch.tensor(float(len(indices)), device=accelerator.device)])
    return {f"eval/{k}": v for k, v in _means(accelerator, sums).items()}


CURVES = ("loss", "rewards/accuracies", "rewards/margins")


def _finish(run: _Run, log: RunLog, step: int, t_run: float, eval_metrics: dict[str, float]) -> DPOResult:
    """Save the (merged) policy, plot the curves, write run.json and print the summary (main process)."""
    from toolkit.console import summary_table
    from toolkit.io import read_existing, write_json
    from toolkit.training.accelerator import gathered_weights
    from toolkit.training.runlog import Curve, plot_curves

    cfg, out, stats = run.cfg, run.out, run.stats
    policy_dir = None
    history = read_existing(out / "metrics.jsonl") if run.accelerator.is_main_process else log.history
    final = history[-1] if history else {}
    with gathered_weights(run.accelerator, run.unwrapped):  # every process: ZeRO-3 gathers the weights to save
        if run.accelerator.is_main_process:
            policy_dir = _save_policy(run, out / "policy", step, {**final, **eval_metrics})
    if run.accelerator.is_main_process:
        plot_curves(history, out / "curves.png", [Curve(k, k, smooth=True) for k in CURVES],
                    title=f"llamakit dpo ({cfg.loss}, β={cfg.beta})")
        write_json(out / "run.json", {"config": dataclasses.asdict(cfg), "steps": step, "data": stats,
                                      "seconds": time.perf_counter() - t_run,
                                      "world_size": run.accelerator.num_processes, "shared_prefix": run.shared,
                                      "shared_prefix_batches": run.shared_batches, "final": final,
                                      "eval": eval_metrics})
        summary_table("dpo", {"pairs": stats["pairs"], "steps": step, "loss (last)": final.get("loss"),
                              "accuracy (last)": final.get("rewards/accuracies"),
                              **({"eval accuracy": eval_metrics["eval/rewards/accuracies"]} if eval_metrics else {}),
                              "policy": str(policy_dir)})
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return DPOResult(out, policy_dir, step, history, stats, eval_metrics)


def _checkpoint(run: _Run, step: int) -> None:
    from toolkit.training.checkpoint import save_checkpoint

    tensors = {REFERENCE: {"train": run.ref_logps["train"].cpu().contiguous()}} if run.ref_logps else None
    save_checkpoint(run.accelerator, run.out, step, run.unwrapped, run.optimizer, weights=MODEL_DIR,
                    state={"scheduler": run.scheduler.state_dict(), "config": dataclasses.asdict(run.cfg)},
                    tensors=tensors, keep=run.cfg.keep_checkpoints)


def _save_policy(run: _Run, target: Path, step: int, metrics: dict[str, Any]) -> Path:
    """OUT/adapter (--save-adapter) before the merge, then the merged policy with its manifest and model card."""
    from toolkit.model_card import render_card
    from toolkit.training.export import save_adapter, save_model

    cfg = run.cfg
    adapter = save_adapter(run.unwrapped, run.tokenizer, run.out / "adapter", "dpo-adapter") \
        if cfg.save_adapter else None
    card = render_card(method="dpo", summary=f"Direct Preference Optimization ({cfg.loss} loss, β = {cfg.beta})",
                       base=cfg.policy, data=cfg.data, rows=run.stats["pairs"], unit="pairs",
                       config=dataclasses.asdict(cfg), metrics=metrics, model_dir=target,
                       adapter_dir=adapter)
    manifest = {"kind": "dpo-policy", "base": cfg.policy, "data": cfg.data, "loss": cfg.loss, "beta": cfg.beta,
                "steps": step, "lora_merged": cfg.lora}
    return save_model(run.unwrapped, run.tokenizer, target, manifest, card)
