"""`train-reward`: a Bradley–Terry reward model, calibrated on held-out pairs, in one readable loop.

    loss = −log σ(r_c − r_r − margin)  +  center · mean (r_c + r_r)²

Chosen and rejected texts of a batch go through the model in ONE forward (concatenated); on a causal
backbone, where a batch saves ≥ 10% of token positions by it, the dialogue a pair shares runs once and both
answers run on its KV cache (model.shared_prefix_batch). Batches are
grouped by length (little padding), padded only to their own longest text, and every text longer than
`max_length` keeps its END (the final answer). With `--objective regression` the loss is the MSE to a
row's score (ChatLLaMA's scored data). Under `accelerate launch` the batches are split between ranks.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from toolkit.errors import SKIP_BAD_ROWS_HELP, UserError, set_aside_warning, suggesting_skip_bad_rows
from toolkit.options import SEED_MAX, check_ranges
from toolkit.options import flag_field as _f
from toolkit.reward.constants import METHODS, TEMPERATURE_PRIOR_SD
from toolkit.reward.data import (
    FORMATS,
    PreferenceData,
    load_preferences,
    pairs_from_scored,
    split,
    split_by_prompt,
)
from toolkit.rows import Pair, Scored
from toolkit.training.trackers import REPORT_TO, move_tracked, staging_dir, start_tracking, stop_tracking

OBJECTIVES = ("bradley-terry", "regression")
MIN_CALIBRATION_PAIRS = 50
STATS_TEXTS = 256  # training texts scored after training for the reward mean / std
# Held-out reward differences spread less than this put nearly every verdict σ(r_c − r_r) within 0.45-0.55: seen
# when a run's loss jumps and settles back at log 2 (2 of 15 folds of the 5-fold HH benchmark at the defaults, none
# of 10 at lr 5e-5).
COLLAPSED_SPREAD = 0.1


@dataclass
class TrainConfig:
    """Every knob of `llamakit train-reward`: each field declared with `_f` is one flag (toolkit/options.py)."""

    data: str = _f(help="Pairs: llamakit/TRL JSONL (prompt, chosen, rejected), Anthropic HH, TRL implicit prompt, "
                   "ChatLLaMA scored rows (user_input, completion, score), or a `datasets` directory.", path="any",
                   nonempty=True)
    out: str = _f(help="Output directory (written atomically).", path="dir", nonempty=True)
    model: str = _f("minilm-l6", "Backbone: an alias (minilm-l6, smollm2-135m) or a local Hugging Face directory "
                    "(LLaMA too).", nonempty=True)
    eval_data: str | None = _f(None, "Held-out pairs for calibration (else --eval-split).", path="any")
    eval_split: float = _f(0.1, "Fraction of --data held out for calibration (> 0 unless --eval-data is given).",
                           min=0, max=1, max_open=True)
    format: str = _f("auto", "Input format.", choices=FORMATS)
    objective: str = _f("bradley-terry", "Pairwise loss, or MSE to scores of scored rows.", choices=OBJECTIVES)
    # 512 tokens at batch 4: 60.7% on unseen HH pairs against 58.1% for 256 at 16 (docs/reward-models.md)
    max_length: int = _f(512, "Tokens per text; longer texts keep their end.", min=1)
    batch_size: int = _f(4, "Pairs per micro-batch.", min=1)  # or scored rows
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", min=1, aliases=("grad-accum",))
    epochs: int = _f(1, "Reward models overfit fast: one epoch is the usual choice.", min=1)
    learning_rate: float = _f(1e-4, min=0, min_open=True)
    weight_decay: float = _f(0.0, min=0)
    warmup_ratio: float = _f(0.1, "Linear warm-up, then linear decay to 0.", min=0, max=1)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).", min=0)
    center_rewards: float = _f(0.0, "Coefficient of mean (r_c + r_r)^2 (0.01 is the usual value; 0 = off).",
                               min=0)  # the usual value: Eisenstein et al. 2023
    use_margin: bool = _f(True, "Honour a `margin` column when the data has one.", flag="margin")
    candidate_pairs: bool = _f(False, "Also train on every two of a row's K scored candidates (meta.candidates, kept "
                               "by `generate-data preferences`) that score apart: all K-choose-2 comparisons of a "
                               "prompt, as InstructGPT's RM; --eval-split then holds out whole prompts.",
                               negatable=False)
    skip_bad_rows: bool = _f(False, SKIP_BAD_ROWS_HELP, negatable=False)
    lora: bool = _f(False, "Train LoRA adapters (peft) instead of all weights; merged on save.", negatable=False)
    lora_r: int = _f(16, min=1)
    bf16: bool = _f(False, "bfloat16 autocast (fast on GPUs / CPUs with bf16 units).", negatable=False)
    gradient_checkpointing: bool = _f(False, "Less memory, ~30% more compute.", negatable=False)
    group_by_length: bool = _f(True, "Batch texts of similar length together (less padding).")
    group_by_prompt: bool = _f(True, "Keep a prompt's pairs side by side in the micro-batches and forward each "
                               "distinct text of a micro-batch once (InstructGPT's grouping of a prompt's K-choose-2 "
                               "comparisons; the loss is the same). Not with --shared-prefix on a causal backbone, "
                               "which runs each pair's dialogue once instead.")
    shared_prefix: bool = _f(True, "Causal backbones (LLaMA): run a pair's shared dialogue once and both answers on "
                             "its cache.")
    calibration: str = _f("temperature", choices=METHODS)
    calibration_folds: int = _f(0, "Cross-fit the calibration (K ≥ 2): K fold models score the pairs they did not "
                                "train on, the calibrator is fitted on all of them, and the model then trains on "
                                "every pair. (K + 1)× the training time; 0: calibrate on the --eval-split share.",
                                min=0)
    ensemble: int = _f(1, "Members of a reward ensemble, seeds --seed, --seed + 1 …: its reward is their mean, "
                       "their spread the uncertainty (eval-reward, rlhf --reward-uncertainty-penalty). "
                       "K× the training and scoring time.", min=1)
    temperature_prior_sd: float | None = _f(None, "Spread of the prior on log T, so T moves away from 1 only as far as "
                                            "the calibration pairs show. Unset: 0.2 on a held-out split (a few hundred "
                                            "pairs pin T down loosely), none with --calibration-folds (every pair); "
                                            "inf: plain maximum likelihood.", min=0, min_open=True, inf=True)
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (unset: run all --epochs).", min=1)
    seed: int = _f(0, min=0, max=SEED_MAX)
    eval_batch_size: int = 32  # pairs per forward when scoring held-out pairs (--batch-size of calibrate)
    overwrite: bool = _f(False, "Replace an earlier reward model in --out (a directory llamakit did not write is "
                         "never replaced).", negatable=False)
    report_to: str = _f("none", "Experiment tracker, offline by default: tensorboard (OUT/runs), wandb (OUT/wandb), "
                        "mlflow (OUT/mlruns); beside --out until the model is written.", choices=REPORT_TO)
    show_progress: bool = True

    @property
    def prior_sd(self) -> float:
        """--temperature-prior-sd as the fit uses it: on the ~1000 out-of-fold pairs of cross-fitting the data
        decide (the 0.2 prior held an ensemble's T at 0.78 where its test folds wanted 0.37-0.66)."""
        if self.temperature_prior_sd is not None:
            return self.temperature_prior_sd
        return math.inf if self.calibration_folds else TEMPERATURE_PRIOR_SD

    def validate(self) -> None:
        """Raise UserError naming the flag of a setting outside its range or choices (the CLI checks both at
        parse time)."""
        check_ranges(self)
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown --objective '{self.objective}' (one of {', '.join(OBJECTIVES)})")
        if self.calibration not in METHODS:
            raise UserError(f"unknown --calibration '{self.calibration}' ({' or '.join(METHODS)})")
        if self.calibration_folds == 1:
            raise UserError("--calibration-folds must be 0 (off) or at least 2")
        if self.calibration_folds and (self.eval_data or self.objective == "regression"):
            raise UserError("--calibration-folds cross-fits on the training pairs: not with "
                            + ("--eval-data (calibrate on those instead)" if self.eval_data
                               else "--objective regression"))


@dataclass
class TrainResult:
    out: Path
    metrics: dict[str, Any]
    calibration: Any
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Run:
    """What `_set_up` builds before the first step. Item i is pair i (texts and ids 2i chosen, 2i + 1 rejected)
    or, with `--objective regression`, scored row i."""

    accelerator: Any
    model: Any  # prepared by Accelerate
    tokenizer: Any
    backbone_path: Path
    encoder: Any  # model.TextEncoder
    optimizer: Any
    scheduler: Any
    total_steps: int  # optimizer steps of this process
    batches_per_epoch: int  # micro-batches of this process
    texts: list[str]
    ids: list[list[int]]
    lengths: list[int]  # of each item's longest text
    targets: list[float]  # regression: each row's score
    margins: list[float]  # pairs: each pair's margin (0 without --margin)
    shared: bool  # pairs run their shared dialogue once (model.shared_prefix_batch)
    units: list[list[int]] | None  # items kept side by side in the batches (a prompt's pairs), or each alone
    n_cut: int  # texts cut to --max-length
    tag: str = ""  # which model of the run this is ("member 2/3", "fold 1/5"): progress label, tracker prefix


@dataclass
class _Fitted:
    """One trained model of the run: its set-up, what its loop counted, and the unwrapped model (eval mode)."""

    run: _Run
    log: _Log
    model: Any


@dataclass
class _Log:
    """What the loop counts: the progress bar, metrics.json and loss.png read it."""

    step: int = 0
    micro: int = 0  # micro-batches, counted across epochs
    items_seen: int = 0  # by all processes
    seconds: float = 0.0
    tokens_forwarded: int = 0  # padded positions included: they run too
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, mean micro-batch loss)
    eval_points: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out NLL)
    recent: list[tuple[float, float]] = field(default_factory=list)  # last 20 micro-batches' (loss, accuracy)
    heldout_rewards: list[tuple[float, float]] | None = None  # (r_c, r_r) of each held-out pair, last epoch


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, group: bool = True,
                           megabatch: int = 50, units: list[list[int]] | None = None) -> list[list[int]]:
    """Shuffle, sort each megabatch of `megabatch` batches by length, cut into batches, shuffle the batches:
    random like a plain shuffle across batches, similar lengths inside one (HF's LengthGroupedSampler).
    `units` (default: each item alone) are items that move together and stay side by side, so that a unit
    of at most `batch_size` items shares a batch with its own items as often as the cut allows."""
    rng = random.Random(seed)
    units = units if units is not None else [[i] for i in range(len(lengths))]
    order = list(range(len(units)))
    rng.shuffle(order)
    if group:
        chunks, size, start = [], batch_size * megabatch, 0
        while start < len(order):  # megabatches of whole units, about `size` items each
            end, n = start, 0
            while end < len(order) and n < size:
                n += len(units[order[end]])
                end += 1
            chunks.append(sorted(order[start:end], key=lambda u: -max(lengths[i] for i in units[u])))
            start = end
    else:
        chunks = [order]
    batches = []
    for chunk in chunks:
        items = [i for u in chunk for i in units[u]]
        batches += [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    if group:
        rng.shuffle(batches)
    return batches


def prompt_units(pairs: list[Pair]) -> list[list[int]]:
    """The pairs' indices grouped by prompt, in order of first appearance."""
    units: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        units.setdefault(pair.prompt, []).append(i)
    return list(units.values())


def bradley_terry_loss(r_chosen, r_rejected, margin=None, center: float = 0.0):
    """−log σ(r_c − r_r − margin), plus the centering term center · mean (r_c + r_r)²."""
    import torch.nn.functional as F

    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center:
        loss = loss + center * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def _read(path: str, cfg: TrainConfig, warnings: list[str]) -> PreferenceData:
    """A preference file; with --skip-bad-rows its rows that do not parse are set aside, named in a warning."""
    with suggesting_skip_bad_rows():
        data = load_preferences(path, cfg.format, skip_bad_rows=cfg.skip_bad_rows,
                                candidate_pairs=cfg.candidate_pairs)
    if data.bad_rows:
        warnings.append(set_aside_warning(data.bad_rows))
    return data


def _load(cfg: TrainConfig, warnings: list[str]) -> tuple[list[Pair], list[Scored], list[Pair], str, str]:
    """(train pairs, train scored rows, held-out pairs, format, held-out description)."""
    data = _read(cfg.data, cfg, warnings)
    regression = cfg.objective == "regression"
    if regression and not data.scored:
        raise UserError("--objective regression needs scored rows (user_input / completion / score)",
                        file=cfg.data)
    heldout_scored: list[Scored] = []
    if cfg.calibration_folds:
        # Cross-fitting: every pair trains the final model, and every pair is scored by a fold model.
        _require_pairs(data, cfg.calibration_folds)
        heldout, train_scored, where = [], [], f"{cfg.calibration_folds}-fold cross-fitting over {cfg.data}"
        train_pairs = data.pairs or pairs_from_scored(data.scored)
    elif cfg.eval_data:
        held = _read(cfg.eval_data, cfg, warnings)
        heldout = held.pairs or pairs_from_scored(held.scored)
        train_pairs, train_scored, where = data.pairs, data.scored, cfg.eval_data
    else:
        if not 0.0 < cfg.eval_split < 1.0:
            raise UserError("--eval-split must be between 0 and 1 (or give --eval-data)")
        where = f"{cfg.eval_split:.0%} held out of {cfg.data}"
        if data.scored:
            # Split by prompt: every answer to a prompt lands on the same side, so held-out pairs exist.
            train_scored, heldout_scored = split_by_prompt(data.scored, cfg.eval_split, cfg.seed)
            heldout, train_pairs = pairs_from_scored(heldout_scored), []
        elif cfg.candidate_pairs:
            # a prompt's comparisons share its answers: hold out whole prompts, or calibration sees trained answers
            n_prompts = len({pair.prompt for pair in data.pairs})
            if n_prompts < 2:
                raise UserError(f"--candidate-pairs holds out whole prompts: needs at least 2, got {n_prompts}",
                                file=data.source)
            n_out = min(n_prompts - 1, max(1, round(n_prompts * cfg.eval_split)))
            train_pairs, heldout = split_by_prompt(data.pairs, n_out / n_prompts, cfg.seed)
            train_scored = []
        else:
            _require_pairs(data, 2)
            n_out = min(len(data.pairs) - 1, max(1, round(len(data.pairs) * cfg.eval_split)))
            train_pairs, heldout = split(data.pairs, n_out / len(data.pairs), cfg.seed)
            train_scored = []
    if not regression and train_scored:
        train_pairs = pairs_from_scored(train_scored)
        if not train_pairs:
            raise UserError("scored rows give no pairs (no prompt has two answers with different scores); "
                            "use --objective regression", file=cfg.data)
        train_scored = []
    if regression:
        if len(train_scored) < 2:
            raise UserError(f"needs at least 2 scored rows to train on, got {len(train_scored)}", file=cfg.data)
    elif len(train_pairs) < 1 or (not cfg.eval_data and len(data.pairs) < 2):
        _require_pairs(data, 2)
    if cfg.calibration_folds:
        pass  # the calibrator sees every pair, out of fold
    elif not heldout:
        warnings.append("no held-out pairs to calibrate on: temperature left at 1 "
                        "(give --eval-data with pairs, or scored rows with several answers per prompt)")
    elif len(heldout) < MIN_CALIBRATION_PAIRS:
        warnings.append(f"calibrating on only {len(heldout)} held-out pairs: T and the metrics are noisy "
                        f"(use ≥ {MIN_CALIBRATION_PAIRS})")
    return train_pairs, train_scored, heldout, data.format, where


def _require_pairs(data: PreferenceData, n: int) -> None:
    if len(data.pairs) < n:
        raise UserError(f"only {len(data.pairs)} pair(s); training needs at least {n} "
                        "(at least 1 to train on and 1 held out for calibration)", file=data.source)


def train_reward(cfg: TrainConfig) -> TrainResult:
    """Train, calibrate on the held-out pairs, and write the reward model directory atomically."""
    cfg.validate()
    warnings: list[str] = []
    # Data first: a bad file fails in a second, before torch and the backbone are loaded.
    train_pairs, train_scored, heldout, fmt, heldout_from = _load(cfg, warnings)
    from toolkit.io import claim_output_dir, ensure_writable_dir

    # An unwritable --out, or one holding something this run would replace, fails now, not after training.
    claim_output_dir(cfg.out, "reward-model", overwrite=cfg.overwrite)
    ensure_writable_dir(Path(cfg.out).parent)
    from toolkit.training.accelerator import forwards_together, gathered_weights, make_accelerator

    accelerator = make_accelerator(cfg.bf16, cfg.report_to, staging_dir(Path(cfg.out)))
    if accelerator.state.deepspeed_plugin is not None and (cfg.ensemble > 1 or cfg.calibration_folds):
        # one DeepSpeed engine per run: Accelerate prepares one model under a DeepSpeed config
        raise UserError("--ensemble and --calibration-folds train several models in one run: not under DeepSpeed "
                        "(launch them without a DeepSpeed config)")
    start_tracking(accelerator, cfg.report_to, staging_dir(Path(cfg.out)), "llamakit-reward", cfg)
    started = time.perf_counter()
    try:
        crossfit = _cross_fit(cfg, accelerator, train_pairs, warnings) if cfg.calibration_folds else None
        members = [_fit(replace(cfg, seed=cfg.seed + m), accelerator, train_pairs, train_scored, heldout, warnings,
                        tag=f"member {m + 1}/{cfg.ensemble}" if cfg.ensemble > 1 else "",
                        first=m == 0 and crossfit is None)
                   for m in range(cfg.ensemble)]
    finally:
        stop_tracking(accelerator)
    accelerator.wait_for_everyone()
    stats = _reward_stats(cfg, members[0].run, [m.model for m in members]) \
        if accelerator.is_main_process or forwards_together(accelerator) else None
    data = {"data": cfg.data, "format": fmt, "pairs": len(train_pairs), "scored_rows": len(train_scored),
            "seconds_all_models": round(time.perf_counter() - started, 2)}
    metrics, calibration = {}, None  # what the other ranks return
    with gathered_weights(accelerator, members[0].model):  # every process: ZeRO-3 gathers the weights to save
        if accelerator.is_main_process:
            metrics, calibration = _save(cfg, members, crossfit, data, heldout_from, warnings, stats)
    accelerator.wait_for_everyone()
    return TrainResult(Path(cfg.out), metrics, calibration, warnings)


def _fit(cfg: TrainConfig, accelerator, train_pairs: list[Pair], train_scored: list[Scored], heldout: list[Pair],
         warnings: list[str], tag: str = "", first: bool = True) -> _Fitted:
    """Set up and train one model of the run (seeded by cfg.seed) on these items, scoring `heldout` after each
    epoch."""
    run = _set_up(cfg, accelerator, train_pairs, train_scored, warnings, tag, first)
    log = _train(cfg, run, heldout)
    return _Fitted(run, log, accelerator.unwrap_model(run.model).eval())


def _cross_fit(cfg: TrainConfig, accelerator, pairs: list[Pair], warnings: list[str]) -> list[float]:
    """Out-of-fold reward differences of every pair (toolkit/reward/crossfit.py), from fold models trained as
    the final model is (an ensemble of as many members when --ensemble > 1)."""
    from toolkit.reward.crossfit import out_of_fold, prompt_folds

    folds = prompt_folds([p.prompt for p in pairs], cfg.calibration_folds, cfg.seed)
    done = []

    def fit_and_score(train_ids: list[int], test_ids: list[int]) -> list[float]:
        done.append(len(done) + 1)
        train, test = [pairs[i] for i in train_ids], [pairs[i] for i in test_ids]
        fold_diffs = []
        for m in range(cfg.ensemble):
            fitted = _fit(replace(cfg, seed=cfg.seed + m), accelerator, train, [], test, warnings,
                          tag=f"fold {done[-1]}/{len(folds)}" + (f" member {m + 1}" if cfg.ensemble > 1 else ""),
                          first=len(done) == 1 and m == 0)
            # Rank 0 scored the fold; the other ranks only train and save nothing.
            fold_diffs.append([c - r for c, r in fitted.log.heldout_rewards or [(0.0, 0.0)] * len(test)])
            accelerator.free_memory()  # the fold model is done with: let it go before the next one
        return [sum(d) / len(d) for d in zip(*fold_diffs, strict=True)]

    return out_of_fold(len(pairs), folds, fit_and_score)


# ---- set-up -----------------------------------------------------------------------------------------------

def _set_up(cfg: TrainConfig, accelerator, train_pairs: list[Pair], train_scored: list[Scored], warnings: list[str],
            tag: str = "", first: bool = True) -> _Run:
    """Seed, backbone and head, the training texts tokenized once, AdamW and its schedule; the run's warnings
    are shown when its `first` model is set up."""
    import torch
    from accelerate.utils import set_seed
    from rich.markup import escape

    from toolkit.console import console
    from toolkit.reward.model import TextEncoder, new_reward_model, wants_eos
    from toolkit.training.accelerator import configure_deepspeed
    from toolkit.training.schedule import warmup_linear

    set_seed(cfg.seed)
    model, tokenizer, backbone_path = new_reward_model(cfg.model, lora=cfg.lora, lora_r=cfg.lora_r,
                                                       gradient_checkpointing=cfg.gradient_checkpointing)
    encoder = TextEncoder(tokenizer, cfg.max_length, wants_eos(tokenizer))
    regression = cfg.objective == "regression"
    if regression:
        texts, targets, margins = [row.text for row in train_scored], [row.score for row in train_scored], []
    else:
        texts, targets = [t for p in train_pairs for t in (p.chosen_text, p.rejected_text)], []
        margins = [p.margin if cfg.use_margin else 0.0 for p in train_pairs]
    # Causal backbones only: an encoder's prefix tokens attend to the answer, so nothing can be shared there.
    # A gradient-checkpointed backbone drops its KV cache, which the shared-prefix forward runs on.
    shared = not regression and cfg.shared_prefix and not cfg.gradient_checkpointing and model.shares_prefix
    ids, n_cut = encoder.encode_pairs(texts[0::2], texts[1::2]) if shared else encoder.encode(texts)
    if n_cut and first:
        warnings.append(f"{n_cut} of {len(texts)} training texts were longer than --max-length {cfg.max_length} "
                        "tokens and were cut from the left (their final answer is kept)")
    if first and accelerator.is_main_process and cfg.show_progress:  # now, not after minutes of training
        for w in warnings:  # whole lines: a warning names files and rows, and a script may grep it
            console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    per_item = 1 if regression else 2
    units = prompt_units(train_pairs) if not regression and not shared and cfg.group_by_prompt else None
    lengths = [max(len(ids[per_item * i + k]) for k in range(per_item)) for i in range(len(ids) // per_item)]

    batches_per_epoch, total_steps = _step_counts(cfg, len(lengths), accelerator.num_processes)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    # Not prepared: Accelerate would step a prepared scheduler once per process, and total_steps counts
    # this process's optimizer steps.
    scheduler = warmup_linear(optimizer, total_steps, int(cfg.warmup_ratio * total_steps))
    configure_deepspeed(accelerator, cfg.batch_size, cfg.max_grad_norm, model.model.config.hidden_size)
    model, optimizer = accelerator.prepare(model, optimizer)
    return _Run(accelerator=accelerator, model=model, tokenizer=tokenizer, backbone_path=backbone_path,
                encoder=encoder, optimizer=optimizer, scheduler=scheduler, total_steps=total_steps,
                batches_per_epoch=batches_per_epoch, texts=texts, ids=ids, lengths=lengths, targets=targets,
                margins=margins, shared=shared, units=units, n_cut=n_cut, tag=tag)


def _step_counts(cfg: TrainConfig, n_items: int, world: int) -> tuple[int, int]:
    """(micro-batches per epoch, optimizer steps in all) of each of `world` processes."""
    batches_per_epoch = math.ceil(n_items / cfg.batch_size) // world or 1
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    return batches_per_epoch, total_steps


# ---- the loop ---------------------------------------------------------------------------------------------

def _train(cfg: TrainConfig, run: _Run, heldout: list[Pair]) -> _Log:
    """Epochs of length-grouped micro-batches, an optimizer step every --grad-accum of them, and the held-out
    NLL after each epoch."""
    from toolkit.training.accelerator import forwards_together

    log = _Log()
    world, rank = run.accelerator.num_processes, run.accelerator.process_index
    run.model.train()
    # The models of an ensemble or of cross-fitting log under their own names ("fold_2_5/loss").
    prefix = re.sub(r"\W+", "_", run.tag).strip("_") + "/" if run.tag else ""
    label = f"train-reward {run.tag}".strip()
    with _progress_bar(cfg.show_progress and run.accelerator.is_main_process, run.total_steps, label) as show:
        for epoch in range(cfg.epochs):
            batches = length_grouped_batches(run.lengths, cfg.batch_size, cfg.seed * 1000 + epoch,
                                             cfg.group_by_length, units=run.units)
            started = time.perf_counter()
            micro_losses: list[float] = []  # of the step under way, in this epoch
            for batch in batches[:run.batches_per_epoch * world][rank::world]:
                if log.step >= run.total_steps:
                    break
                # An optimizer step every gradient_accumulation_steps micro-batches, counted across epochs.
                log.micro += 1
                last = log.micro % cfg.gradient_accumulation_steps == 0
                loss, right, tokens = _train_micro_batch(cfg, run, batch, last)
                micro_losses.append(loss)
                log.tokens_forwarded += tokens
                log.items_seen += len(batch) * world
                log.recent = (log.recent + [(loss, right)])[-20:]
                if last:
                    log.step += 1
                    log.history.append((log.step, sum(micro_losses) / len(micro_losses)))
                    run.accelerator.log({f"{prefix}loss": log.history[-1][1]}, step=log.step)
                    micro_losses = []
                    show(log.step, _status(cfg, epoch, log.recent))
            log.seconds += time.perf_counter() - started
            if heldout and (run.accelerator.is_main_process or forwards_together(run.accelerator)):
                log.heldout_rewards, nll = _evaluate(cfg, run, heldout)
                log.eval_points.append((log.step, nll))
                run.accelerator.log({f"{prefix}eval/nll": nll}, step=log.step)
            if log.step >= run.total_steps:
                break
    return log


@contextlib.contextmanager
def _progress_bar(visible: bool, total: int, label: str) -> Iterator[Callable[[int, str], None]]:
    """show(step, status): a progress bar's update, or nothing when it is not `visible`."""
    if not visible:
        yield lambda step, status: None
        return
    from toolkit.console import progress

    with progress(transient=False) as bar:
        task = bar.add_task(label, total=total, status="")
        yield lambda step, status: bar.update(task, completed=step, status=status)


def _status(cfg: TrainConfig, epoch: int, recent: list[tuple[float, float]]) -> str:
    status = f"epoch {epoch + 1}/{cfg.epochs} loss {sum(x for x, _ in recent) / len(recent):.3f}"
    if cfg.objective != "regression":
        status += f" acc {sum(a for _, a in recent) / len(recent):.2f}"
    return status


def _train_micro_batch(cfg: TrainConfig, run: _Run, batch: list[int], last: bool) -> tuple[float, float, int]:
    """Forward and backward one micro-batch; on the `last` micro-batch of an accumulation also clip and take
    the optimizer step. Returns (loss, accuracy (nan for regression), tokens forwarded)."""
    from toolkit.training.accelerator import autocast, gradient_sync

    accelerator, model = run.accelerator, run.model
    tensors, gather = _batch_tensors(cfg, run, batch)
    with gradient_sync(accelerator, model, last):
        with autocast(accelerator, cfg.bf16):
            rewards = model(*(t.to(accelerator.device) for t in tensors))
        if gather is not None:
            rewards = rewards[gather.to(rewards.device)]
        loss, right = _loss(cfg, run, batch, rewards, interleaved=len(tensors) == 4)
        accelerator.backward(loss / cfg.gradient_accumulation_steps)
    if last:
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.item(), right, sum(t.numel() for t in tensors[1::2])  # the masks: padded positions run too


def _batch_tensors(cfg: TrainConfig, run: _Run, batch: list[int]) -> tuple[tuple, Any]:
    """(the model's inputs for the items of `batch`, gather): a shared-prefix batch where it pays, else padded
    texts. `gather` (or None) maps the forwarded texts' rewards back to the batch's texts where a text that
    recurs in the batch (a prompt's answer in several of its pairs) is forwarded once."""
    import torch

    from toolkit.reward.model import pad, shared_prefix_batch

    ids, pad_id = run.ids, run.tokenizer.pad_token_id
    if run.shared:
        tensors = shared_prefix_batch([ids[2 * i] for i in batch], [ids[2 * i + 1] for i in batch], pad_id)
        if tensors is not None:
            return tensors, None
    if cfg.objective == "regression":
        return pad([ids[i] for i in batch], pad_id), None
    # All chosen first, then all rejected: one forward, split in two.
    texts = [ids[2 * i] for i in batch] + [ids[2 * i + 1] for i in batch]
    if run.units is None:
        return pad(texts, pad_id), None
    distinct: dict[tuple[int, ...], int] = {}
    gather = [distinct.setdefault(tuple(t), len(distinct)) for t in texts]
    if len(distinct) == len(texts):
        return pad(texts, pad_id), None
    return pad([list(t) for t in distinct], pad_id), torch.tensor(gather)


def _loss(cfg: TrainConfig, run: _Run, batch: list[int], rewards, interleaved: bool) -> tuple[Any, float]:
    """(loss, accuracy on the batch's pairs) for the rewards of `batch`; accuracy is nan for regression."""
    import torch

    device = run.accelerator.device
    if cfg.objective == "regression":
        target = torch.tensor([run.targets[i] for i in batch], device=device)
        return torch.nn.functional.mse_loss(rewards, target), float("nan")
    # Shared-prefix rows are chosen_0, rejected_0, chosen_1 ...; plain ones all chosen first.
    r_c, r_r = (rewards[0::2], rewards[1::2]) if interleaved else rewards.chunk(2)
    margin = torch.tensor([run.margins[i] for i in batch], device=device)
    loss = bradley_terry_loss(r_c, r_r, margin if any(run.margins[i] for i in batch) else None, cfg.center_rewards)
    return loss, float((r_c > r_r).float().mean())


def _evaluate(cfg: TrainConfig, run: _Run, heldout: list[Pair]) -> tuple[list[tuple[float, float]], float]:
    """((r_c, r_r) of each held-out pair, their NLL under the raw model), leaving the model in training mode."""
    from toolkit.reward.metrics import pair_metrics, raw_probabilities
    from toolkit.training.accelerator import autocast

    with autocast(run.accelerator, cfg.bf16):
        rewards = _score_pairs(cfg, run, run.accelerator.unwrap_model(run.model), heldout)
    run.model.train()
    return rewards, pair_metrics(raw_probabilities([c - r for c, r in rewards]))["nll"]


def _score_pairs(cfg: TrainConfig, run: _Run, model, pairs: list[Pair]) -> list[tuple[float, float]]:
    from toolkit.reward.model import score_texts

    texts = [t for p in pairs for t in (p.chosen_text, p.rejected_text)]
    distinct = list(dict.fromkeys(texts))  # a prompt's answer in several held-out pairs is scored once
    scores = dict(zip(distinct, score_texts(model, run.encoder, distinct, cfg.eval_batch_size, run.accelerator.device),
                      strict=True))
    return [(scores[p.chosen_text], scores[p.rejected_text]) for p in pairs]


# ---- after training: statistics, calibration, the directory -----------------------------------------------

def _save(cfg: TrainConfig, members: list[_Fitted], crossfit: list[float] | None, data: dict[str, Any],
          heldout_from: str, warnings: list[str],
          stats: tuple[float, float, list[float]]) -> tuple[dict[str, Any], Any]:
    """Calibrate (on the out-of-fold differences when cross-fitted, else on the held-out pairs) and write the
    model (and an ensemble's other members), calibration.json, metrics.json, the plots and the card into --out
    at once; `stats` are the members' `_reward_stats`, which under ZeRO-3 every process computes together.
    Returns (metrics, calibration)."""
    from toolkit.console import console
    from toolkit.io import atomic_dir, write_json
    from toolkit.reward import calibrate as cal
    from toolkit.reward import card
    from toolkit.reward.ensemble import MEMBERS_DIR
    from toolkit.reward.store import RewardSettings, fingerprint, save_reward_model

    run, log, model = members[0].run, members[0].log, members[0].model
    mean, std, offsets = stats
    diffs = crossfit if crossfit is not None else _heldout_diffs(members)
    collapsed = collapse_warning(diffs)
    if collapsed:
        warnings.append(collapsed)
        if cfg.show_progress:  # _save runs on the main process only
            console.print(f"[yellow]warning:[/] {collapsed}")
    settings = RewardSettings(backbone=str(cfg.model), max_length=cfg.max_length, append_eos=run.encoder.append_eos,
                              objective=cfg.objective, lora=cfg.lora, read_at=model.read_at)
    with atomic_dir(cfg.out, "reward-model", overwrite=cfg.overwrite) as tmp:
        save_reward_model(model, run.tokenizer, replace(settings, ensemble_offsets=offsets if len(members) > 1
                                                        else []), tmp)
        for m, member in enumerate(members[1:], start=1):  # each a reward-model directory of its own
            save_reward_model(member.model, run.tokenizer, settings, tmp / MEMBERS_DIR / str(m))
        calibration = cal.fit(diffs, cfg.calibration, reward_mean=mean, reward_std=std, data=heldout_from,
                              fingerprint=fingerprint(tmp), prior_sd=cfg.prior_sd)
        cal.write(calibration, tmp)
        metrics = _metrics(cfg, members, data, calibration, heldout_from, warnings, offsets)
        write_json(tmp / "metrics.json", cal.json_safe(metrics))
        _plot(cfg, log, diffs, calibration, tmp)
        eos = run.tokenizer.eos_token if run.encoder.append_eos else None
        (tmp / "README.md").write_text(card.render(cfg, metrics, calibration, architecture=type(model.model).__name__,
                                                   eos=eos), encoding="utf-8")
        move_tracked(staging_dir(Path(cfg.out)), tmp)
    return metrics, calibration


def collapse_warning(diffs: list[float]) -> str | None:
    """A warning when the calibration pairs' reward differences are nearly all alike (a collapsed run), else None."""
    if len(diffs) < MIN_CALIBRATION_PAIRS:
        return None
    spread = statistics.pstdev(diffs)
    if spread >= COLLAPSED_SPREAD:
        return None
    return (f"the reward differences on the {len(diffs)} calibration pairs barely vary (std {spread:.3f}): nearly "
            "every verdict is within 0.45-0.55, as when training collapses; train again with another --seed or "
            "--learning-rate 5e-5")


def _heldout_diffs(members: list[_Fitted]) -> list[float]:
    """r_c − r_r of each held-out pair under the ensemble's mean (the offsets cancel in a difference)."""
    per_member = [[c - r for c, r in m.log.heldout_rewards] for m in members if m.log.heldout_rewards]
    return [sum(d) / len(d) for d in zip(*per_member, strict=True)] if per_member else []


def _metrics(cfg: TrainConfig, members: list[_Fitted], data: dict[str, Any], calibration, heldout_from: str,
             warnings: list[str], offsets: list[float]) -> dict[str, Any]:
    from toolkit.training.accelerator import zero_optimizer

    run, log = members[0].run, members[0].log
    pairs_per_s = log.items_seen / log.seconds if log.seconds else 0.0
    metrics = {
        "heldout": calibration.metrics,
        "heldout_data": heldout_from,
        "train": {**data, "texts_cut": run.n_cut, "shared_prefix": run.shared,
                  "tokens_forwarded": log.tokens_forwarded, "optimizer_steps": log.step,
                  "items_seen": log.items_seen, "seconds": round(log.seconds, 2),
                  "pairs_per_s": round(pairs_per_s, 3),
                  "final_loss": log.history[-1][1] if log.history else None,
                  "loss_history": [round(v, 5) for _, v in log.history]},
        "calibration": {"method": calibration.method, "temperature": calibration.temperature,
                        "temperature_ml": calibration.temperature_ml, "prior_sd": cfg.prior_sd,
                        "reward_mean": calibration.reward_mean, "reward_std": calibration.reward_std,
                        "pairs": calibration.n_pairs, "cross_fitting_folds": cfg.calibration_folds},
        "settings": {k: v for k, v in asdict(cfg).items() if k != "show_progress"},
        "backbone_path": str(run.backbone_path),
        "warnings": warnings,
    }
    zero = zero_optimizer(run.accelerator, run.optimizer)
    if zero:  # under DeepSpeed: the ZeRO stage that trained, as its optimizer reports it
        metrics["train"]["zero"] = zero
    if len(members) > 1:
        metrics["ensemble"] = {"members": len(members), "offsets": offsets,
                               "seeds": [cfg.seed + i for i in range(len(members))],
                               "final_losses": [m.log.history[-1][1] if m.log.history else None for m in members],
                               "seconds": [round(m.log.seconds, 2) for m in members]}
    return metrics


def _reward_stats(cfg: TrainConfig, run: _Run, models: list) -> tuple[float, float, list[float]]:
    """Mean and std of the (ensemble's) raw reward on a sample of the training texts, the PPO loop's centring
    and scale, and each member's offset onto member 0's scale (toolkit/reward/ensemble.py)."""
    from toolkit.reward.ensemble import offsets_from_means
    from toolkit.reward.model import score_texts
    from toolkit.training.accelerator import autocast

    rng = random.Random(cfg.seed)
    sample = rng.sample(run.texts, min(STATS_TEXTS, len(run.texts)))
    with autocast(run.accelerator, cfg.bf16):
        per_model = [score_texts(model, run.encoder, sample, cfg.eval_batch_size, run.accelerator.device)
                     for model in models]
    offsets = offsets_from_means([sum(r) / len(r) for r in per_model])
    rewards = [sum(r - o for r, o in zip(column, offsets, strict=True)) / len(models)
               for column in zip(*per_model, strict=True)]
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / max(1, len(rewards) - 1)) or 1.0
    return mean, std, offsets


def _plot(cfg: TrainConfig, log: _Log, diffs: list[float], calibration, out: Path) -> None:
    """loss.png (training and held-out loss) and, with held-out pairs, reliability.png."""
    from toolkit.reward import plots
    from toolkit.reward.metrics import raw_probabilities
    from toolkit.training.runlog import Curve, plot_curves

    curve = Curve("loss", "training loss", smooth=True, points=("heldout_loss", "held-out"),
                  baseline=None if cfg.objective == "regression" else ("chance (ln 2)", math.log(2)))
    plot_curves([{"step": s, "loss": v} for s, v in log.history]
                + [{"step": s, "heldout_loss": v} for s, v in log.eval_points], out / "loss.png", (curve,))
    if diffs:
        plots.reliability_diagram({"raw": raw_probabilities(diffs), calibration.method:
                                   calibration.probabilities(diffs)}, out / "reliability.png",
                                  title=f"Held-out pairs (n={len(diffs)})")
