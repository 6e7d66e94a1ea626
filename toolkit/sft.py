"""`llamakit sft`: supervised fine-tuning of the actor on conversations, loss on assistant tokens only.

Rows (JSONL, JSON, Parquet or a `datasets` directory): llamakit / OpenAI `{"messages": [{role, content}, ...]}`,
ShareGPT `{"conversations": [{from, value}, ...]}`, Alpaca `{"instruction", "input", "output"}`, ChatLLaMA actor
`{"user_input", "completion"}`, or TRL `{"prompt", "completion"}` (messages or text; loss on the completion).
Each conversation goes through the model's own chat template; the tokens each assistant turn adds (its text and
end-of-turn token) are the only labels, but for turns with OpenAI's `weight: 0`. A plain torch loop under
Accelerate (DDP / bf16 / gradient accumulation), LoRA through peft.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.errors import SKIP_BAD_ROWS_HELP, BadRow, UserError, set_aside_warning, suggesting_skip_bad_rows
from toolkit.options import SEED_MAX, check_ranges
from toolkit.options import flag_field as _f
from toolkit.rows import row_to_messages
from toolkit.training.trackers import REPORT_TO

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from toolkit.training.runlog import RunLog

IGNORE = -100
MODEL_DIR = "model"  # a checkpoint's save_pretrained directory (the LoRA adapter or all weights)


# ---- tokenization with the assistant-only mask ---------------------------------------------------------------

def tokenize_conversation(tokenizer, messages: list[dict[str, Any]],
                          eos_ids: set[int] | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels equal input_ids on assistant tokens (but a turn with weight 0) and IGNORE
    everywhere else.

    An assistant turn's tokens are what rendering messages[:i+1] adds to messages[:i] + the generation
    prompt, cut after its first end-of-turn token (trailing newlines of the template are not learned).
    """
    from toolkit.chat_format import encode_chat

    eos_ids = eos_ids if eos_ids is not None else {tokenizer.eos_token_id}
    input_ids = encode_chat(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight") == 0:  # OpenAI's weight 0: shown, not learned
            continue
        prefix = encode_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        upto = encode_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if input_ids[: len(upto)] != upto or upto[: len(prefix)] != prefix:
            raise UserError("this tokenizer's chat template does not render a conversation turn by turn, "
                            "so assistant tokens cannot be located")
        end = len(upto)
        for j in range(len(prefix), len(upto)):
            if upto[j] in eos_ids:
                end = j + 1
                break
        labels[len(prefix):end] = input_ids[len(prefix):end]
    return input_ids, labels


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    starts: list[int] = field(default_factory=lambda: [0])  # where each packed conversation begins


def load_examples(path: str, tokenizer, max_length: int, system_prompt: str = "", limit: int = 0,
                  skip_bad_rows: bool = False) -> tuple[list[Example], dict[str, Any]]:
    """The rows of `path` tokenized for training; stats count rows, examples, truncated and dropped ones, and with
    `skip_bad_rows` list the one-line error of each row that was set aside (else the first one stops the run)."""
    from toolkit.io import located_rows

    bad_rows: list[str] = []
    rows = located_rows(path, bad_lines=bad_rows if skip_bad_rows else None)
    if limit:
        rows = rows[:limit]
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    examples, truncated, dropped = [], 0, 0
    for row, loc in rows:
        try:
            messages = row_to_messages(row, loc["file"], loc.get("line"))
        except UserError as error:
            if not skip_bad_rows:
                raise BadRow(str(error)) from None
            bad_rows.append(str(error))
            continue
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        input_ids, labels = tokenize_conversation(tokenizer, messages, eos)
        if len(input_ids) > max_length:
            input_ids, labels, truncated = input_ids[:max_length], labels[:max_length], truncated + 1
        if all(label == IGNORE for label in labels[1:]):
            dropped += 1
            continue
        examples.append(Example(input_ids, labels))
    if not examples:
        raise UserError(f"no row has assistant tokens within --max-length {max_length}"
                        + (f" ({len(bad_rows)} bad row(s) set aside)" if bad_rows else ""), file=path)
    return examples, {"rows": len(rows), "examples": len(examples), "truncated": truncated, "dropped": dropped,
                      "bad_rows": bad_rows}


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Greedy packing into blocks of at most max_length; position ids restart per example (see collate)."""
    blocks: list[Example] = []
    current = Example([], [], [])
    for ex in examples:
        if current.input_ids and len(current.input_ids) + len(ex.input_ids) > max_length:
            blocks.append(current)
            current = Example([], [], [])
        current.starts.append(len(current.input_ids))
        current.input_ids += ex.input_ids
        current.labels += ex.labels
    if current.input_ids:
        blocks.append(current)
    return blocks


def collate(batch: list[Example], pad_id: int, packed: bool) -> dict[str, Any]:
    """Right-padded tensors. Packed blocks get per-example position ids and no attention mask, so
    transformers builds a block-diagonal causal mask and examples never see each other."""
    import torch

    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    position_ids = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[i, :n] = torch.tensor(ex.input_ids)
        labels[i, :n] = torch.tensor(ex.labels)
        attention_mask[i, :n] = 1
        if packed:
            starts = [*ex.starts, n]
            for a, b in zip(starts[:-1], starts[1:], strict=True):
                position_ids[i, a:b] = torch.arange(b - a)
            position_ids[i, n:] = torch.arange(n - starts[-2], n - starts[-2] + width - n)
        else:
            position_ids[i] = torch.arange(width)
    out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if not packed:
        out["attention_mask"] = attention_mask
    return out


# ---- training ------------------------------------------------------------------------------------------------

@dataclass
class SFTConfig:
    data: str = _f("", "Conversations: llamakit JSONL, ShareGPT, Alpaca JSON or ChatLLaMA actor JSON.",
                   nonempty=True)
    model: str = _f("smollm2-135m", "Model to fine-tune: an embedded alias or a Hugging Face directory.",
                    nonempty=True)
    out: str = _f("runs/sft", "Output directory (model/, metrics.jsonl, curves.png, checkpoints/).",
                  nonempty=True)
    epochs: float = _f(1.0, "Passes over the data (fractions allowed).", min=0, min_open=True)
    max_steps: int = _f(0, "Stop after this many optimizer steps (0 = use --epochs).", min=0)
    batch_size: int = _f(8, "Sequences per micro-batch, per process.", min=1)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", min=1)
    learning_rate: float = _f(2e-5, "Peak AdamW learning rate (LoRA usually wants ~2e-4).",
                              min=0, min_open=True)
    warmup_ratio: float = _f(0.03, "Linear warm-up over this share of steps, then linear decay to 0.",
                             min=0, max=1)
    weight_decay: float = _f(0.0, "AdamW weight decay.", min=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).", min=0)
    max_length: int = _f(1024, "Tokens per sequence; longer conversations are cut (and counted).", min=1)
    packing: bool = _f(False, "Pack several conversations into each sequence (block-diagonal attention).")
    system_prompt: str = _f("", "System message put before every conversation that has none.")
    limit: int = _f(0, "Use only the first N rows (0 = all).", min=0)
    skip_bad_rows: bool = _f(False, SKIP_BAD_ROWS_HELP, negatable=False)
    lora: bool = _f(False, "Train a LoRA adapter (merged into the saved model at the end).")
    lora_r: int = _f(16, "LoRA rank.", min=1)
    lora_alpha: int = _f(32, "LoRA α.", min=1)
    lora_target: str = _f("all-linear", "LoRA target modules: all-linear or a comma list.", nonempty=True)
    save_adapter: bool = _f(False, "Also write OUT/adapter: the LoRA adapter alone (PEFT), on the base model it "
                            "names (needs --lora).")
    bf16: bool = _f(False, "bfloat16 autocast.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward (less memory).")
    seed: int = _f(0, "Seed for shuffling and initialisation.", min=0, max=SEED_MAX)
    save_every: int = _f(0, "Checkpoint every N optimizer steps (0 = only at the end).", min=0)
    keep_checkpoints: int = _f(2, "Checkpoints kept on disk (0 = all).", min=0)
    resume: bool = _f(False, "Continue from the last checkpoint in --out.")
    overwrite: bool = _f(False, "Replace an earlier sft run in --out (never a directory llamakit did not write).")
    report_to: str = _f("none", "Experiment tracker, offline by default: tensorboard (OUT/runs), wandb (OUT/wandb), "
                        "mlflow (OUT/mlruns).", choices=REPORT_TO)

    def validate(self) -> None:
        """Raise UserError naming the flag of a field outside its range (the CLI checks at parse time)."""
        check_ranges(self)
        if self.save_adapter and not self.lora:
            raise UserError("--save-adapter needs --lora (without LoRA no adapter is trained; the whole model is "
                            "saved either way)")


@dataclass
class SFTResult:
    out: Path
    model_dir: Path | None
    steps: int
    history: list[dict[str, Any]]
    data_stats: dict[str, Any]


@dataclass
class _Run:
    """Everything the loop needs, built once by `_set_up`."""

    cfg: SFTConfig
    accelerator: Accelerator
    out: Path
    tokenizer: Any
    examples: list[Example]
    stats: dict[str, Any]
    model: torch.nn.Module  # as prepared by Accelerate (DDP-wrapped when distributed)
    unwrapped: torch.nn.Module  # what checkpoints and the final save see
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    total: int  # optimizer steps in the whole run
    start: int  # optimizer steps already done (a resumed run)


def train_sft(cfg: SFTConfig) -> SFTResult:
    """Fine-tune `cfg.model` on `cfg.data`; write model/, metrics.jsonl, curves.png under `cfg.out`."""
    import torch

    from toolkit.training.progress import loss_bar
    from toolkit.training.runlog import RunLog

    cfg.validate()
    run = _set_up(cfg)
    log = RunLog(run.out, run.accelerator.is_main_process, tracker=run.accelerator)
    t_run = time.perf_counter()
    step = run.start
    try:
        with loss_bar("sft", run.total, run.start, run.accelerator.is_main_process) as advance:
            while step < run.total:
                micro, n_tokens = _step_batches(run, step)
                t0 = time.perf_counter()
                loss, grad_norm = _optimizer_step(run, micro, n_tokens, step + 1)
                step += 1
                _after_step(run, log, advance, step, loss, grad_norm, n_tokens, t0)
    except torch.OutOfMemoryError:
        raise UserError("out of memory; lower --batch-size (raise --gradient-accumulation-steps to keep the "
                        "effective batch), lower --max-length, or use --lora, --bf16, "
                        "--gradient-checkpointing") from None
    finally:
        log.close()
    return _finish(run, log, step, t_run)


def _set_up(cfg: SFTConfig) -> _Run:
    """Accelerator, run directory, data, model, optimizer and schedule, restored from the last checkpoint
    when resuming; every process returns here together."""
    import torch
    from rich.markup import escape

    from toolkit.console import console
    from toolkit.io import claim_run_dir, start_run_dir
    from toolkit.models import load_causal_lm, load_tokenizer
    from toolkit.training.accelerator import configure_deepspeed, make_accelerator
    from toolkit.training.model import base_dtype, make_trainable
    from toolkit.training.runlog import drop_rows_after
    from toolkit.training.schedule import warmup_linear
    from toolkit.training.trackers import start_tracking

    out = Path(cfg.out)
    accelerator = make_accelerator(cfg.bf16, cfg.report_to, out)
    is_main = accelerator.is_main_process
    claim_run_dir(out, "sft-run", resume=cfg.resume, overwrite=cfg.overwrite)
    torch.manual_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.model)  # data errors surface before the model loads
    with suggesting_skip_bad_rows():
        examples, stats = load_examples(cfg.data, tokenizer, cfg.max_length, cfg.system_prompt, cfg.limit,
                                        cfg.skip_bad_rows)
    model, tokenizer = load_causal_lm(cfg.model, dtype=base_dtype(bf16=cfg.bf16, lora=cfg.lora))
    if cfg.packing:
        examples = pack(examples, cfg.max_length)
    if stats["truncated"] and is_main:
        console.print(f"[yellow]warning:[/] {stats['truncated']} conversation(s) cut to --max-length {cfg.max_length}")
    if stats["dropped"] and is_main:
        console.print(f"[yellow]warning:[/] {stats['dropped']} row(s) had no assistant tokens left and were skipped")
    if stats["bad_rows"] and is_main:
        console.print("[yellow]warning:[/] " + escape(set_aside_warning(stats["bad_rows"])), highlight=False,
                      soft_wrap=True)
    model = make_trainable(model, lora=cfg.lora, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                           lora_target=cfg.lora_target, gradient_checkpointing=cfg.gradient_checkpointing,
                           base=cfg.model)

    # Each process takes its share of every optimizer step's micro-batches.
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    steps_per_epoch = max(1, per_epoch // (cfg.gradient_accumulation_steps * accelerator.num_processes))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    scheduler = warmup_linear(optimizer, total, int(cfg.warmup_ratio * total))
    configure_deepspeed(accelerator, cfg.batch_size, cfg.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    start = _resume(accelerator, out, unwrapped, optimizer, scheduler) if cfg.resume else 0
    if cfg.resume and is_main:
        drop_rows_after(out / "metrics.jsonl", start)
    if is_main:
        start_run_dir(out, "sft-run", overwrite=cfg.overwrite)
    start_tracking(accelerator, cfg.report_to, out, "llamakit-sft", cfg)  # before the run's first row
    accelerator.wait_for_everyone()
    return _Run(cfg, accelerator, out, tokenizer, examples, stats, model, unwrapped, optimizer, scheduler,
                steps_per_epoch, total, start)


def _resume(accelerator: Accelerator, out: Path, unwrapped: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Restore the last checkpoint in `out`, if any; the step to continue from."""
    from toolkit.training.checkpoint import deepspeed_engine, latest_checkpoint, load_checkpoint

    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        return 0
    restored = load_checkpoint(checkpoint, unwrapped, optimizer, weights=MODEL_DIR,
                               rank=accelerator.process_index, world_size=accelerator.num_processes,
                               engine=deepspeed_engine(accelerator))
    scheduler.load_state_dict(restored.state["scheduler"])
    return restored.step


def _step_batches(run: _Run, step: int) -> tuple[list[dict[str, Any]], int]:
    """This process's micro-batches for optimizer step `step` (0-based), and their labelled tokens."""
    from toolkit.generation import pad_token_id
    from toolkit.training.batches import step_micro_batches

    cfg, accelerator = run.cfg, run.accelerator
    indices = step_micro_batches(len(run.examples), step=step, steps_per_epoch=run.steps_per_epoch,
                                 batch_size=cfg.batch_size, accumulation=cfg.gradient_accumulation_steps,
                                 rank=accelerator.process_index, world_size=accelerator.num_processes, seed=cfg.seed)
    pad_id = pad_token_id(run.tokenizer)
    micro = [collate([run.examples[i] for i in b], pad_id, cfg.packing) for b in indices]
    return micro, sum(int((m["labels"][:, 1:] != IGNORE).sum()) for m in micro)


def _optimizer_step(run: _Run, micro: list[dict[str, Any]], n_tokens: int, step: int) -> tuple[float, float]:
    """Accumulate the micro-batches' gradients, clip, step; (loss averaged over processes, gradient norm).
    Each micro-batch's loss is a sum over its tokens divided by the step's `n_tokens`, so the step's loss
    is the mean over all its assistant tokens however they fall into micro-batches."""
    import torch

    from toolkit.head_logprobs import hidden_states_out, labelled_logprobs
    from toolkit.training.accelerator import autocast, gradient_sync

    accelerator, model, cfg = run.accelerator, run.model, run.cfg
    loss_sum = 0.0
    for g, batch in enumerate(micro):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with gradient_sync(accelerator, model, g == len(micro) - 1), autocast(accelerator, cfg.bf16):
            # The head (where plain) meets the assistant tokens' hidden states alone, outside the model's call.
            with hidden_states_out(run.unwrapped) as head:
                outputs = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
            loss = -labelled_logprobs(outputs, batch["labels"], head).sum() / max(1, n_tokens)
            if not torch.isfinite(loss):
                raise UserError(f"loss became NaN at step {step}; stopped without saving; lower "
                                "--learning-rate and --resume from the last checkpoint")
            accelerator.backward(loss)
        loss_sum += float(loss.detach())
    grad_norm = (float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
                 if cfg.max_grad_norm > 0 else float("nan"))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "mean")), grad_norm


def _after_step(run: _Run, log: RunLog, advance: Callable[[int, float], None], step: int, loss: float,
                grad_norm: float, n_tokens: int, t0: float) -> None:
    """Log the step's metrics row, move the bar, checkpoint when one is due (and always at the last step)."""
    cfg = run.cfg
    log.log({"step": step, "epoch": round(step / run.steps_per_epoch, 4), "loss": loss, "grad_norm": grad_norm,
             "lr": run.scheduler.get_last_lr()[0], "tokens": n_tokens, "time/step": time.perf_counter() - t0})
    advance(step, loss)
    if (cfg.save_every and step % cfg.save_every == 0) or step == run.total:
        _checkpoint(run.accelerator, run.out, step, run.unwrapped, run.optimizer, run.scheduler, cfg)


def _finish(run: _Run, log: RunLog, step: int, t_run: float) -> SFTResult:
    """Save the (merged) model, plot the curves, write run.json and print the summary (main process)."""
    from toolkit.console import summary_table
    from toolkit.io import read_existing, write_json
    from toolkit.training.accelerator import gathered_weights
    from toolkit.training.runlog import Curve, plot_curves

    cfg, out, stats = run.cfg, run.out, run.stats
    model_dir = None
    history = read_existing(out / "metrics.jsonl") if run.accelerator.is_main_process else log.history
    with gathered_weights(run.accelerator, run.unwrapped):  # every process: ZeRO-3 gathers the weights to save
        if run.accelerator.is_main_process:
            model_dir = _save_model(run, out / "model", step, history[-1] if history else {})
    if run.accelerator.is_main_process:
        plot_curves(history, out / "curves.png", (Curve("loss", "loss (assistant tokens)"),), title="llamakit sft")
        write_json(out / "run.json", {"config": dataclasses.asdict(cfg), "steps": step, "data": stats,
                                      "seconds": time.perf_counter() - t_run,
                                      "final_loss": history[-1]["loss"] if history else None})
        summary_table("sft", {"examples": stats["examples"], "steps": step,
                              "loss (last)": history[-1]["loss"] if history else None, "model": str(model_dir)})
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return SFTResult(out, model_dir, step, history, stats)


def _checkpoint(accelerator, out: Path, step: int, model, optimizer, scheduler, cfg: SFTConfig) -> None:
    from toolkit.training.checkpoint import save_checkpoint

    save_checkpoint(accelerator, out, step, model, optimizer, weights=MODEL_DIR,
                    state={"scheduler": scheduler.state_dict(), "config": dataclasses.asdict(cfg)},
                    keep=cfg.keep_checkpoints)


def _save_model(run: _Run, target: Path, step: int, final: dict[str, Any]) -> Path:
    """OUT/adapter (--save-adapter) before the merge, then the merged model with its manifest and model card."""
    from toolkit.model_card import render_card
    from toolkit.training.export import save_adapter, save_model

    cfg = run.cfg
    adapter = save_adapter(run.unwrapped, run.tokenizer, run.out / "adapter", "sft-adapter") \
        if cfg.save_adapter else None
    card = render_card(method="sft", summary="Supervised fine-tuning (loss on assistant tokens only)", base=cfg.model,
                       data=cfg.data, rows=run.stats["rows"], unit="conversations", config=dataclasses.asdict(cfg),
                       metrics=final, model_dir=target, adapter_dir=adapter)
    return save_model(run.unwrapped, run.tokenizer, target, {"kind": "sft-model", "base": cfg.model, "data": cfg.data,
                                                             "steps": step, "lora_merged": cfg.lora}, card)
