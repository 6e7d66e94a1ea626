"""An RLHF run's plumbing (PPO, GRPO, RLOO), so that rlhf/trainer.py holds only the algorithm: set-up
(prompts, reward, actor, reference, critic, optimizer under Accelerate), resume, progress, checkpoints and
the final save."""

from __future__ import annotations

import contextlib
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf.config import PPOConfig
from rlhf.objective import AdaptiveKLController, FixedKLController, make_kl_controller
from rlhf.policy import ActorCritic, Reference, causal_lm, frozen, frozen_copy, load_critic
from rlhf.rewards import RewardFn, make_reward_fn
from rlhf.rollout import TokenizedPrompt, load_prompts
from toolkit.chat_format import context_length as model_context_length
from toolkit.console import console, progress, summary_table
from toolkit.errors import UserError
from toolkit.io import claim_run_dir, read_existing, start_run_dir, write_json
from toolkit.model_card import render_card
from toolkit.models import load_causal_lm, load_tokenizer
from toolkit.training.accelerator import configure_deepspeed, gathered_weights, make_accelerator, zero_stage
from toolkit.training.checkpoint import deepspeed_engine, latest_checkpoint, load_checkpoint, save_checkpoint
from toolkit.training.export import save_adapter, save_model
from toolkit.training.model import add_lora, base_dtype, disable_dropout
from toolkit.training.runlog import Curve, RunLog, drop_rows_after, plot_curves
from toolkit.training.trackers import start_tracking

# Each process seeds its sampler with seed + RANK_SEED_STRIDE · rank so that ranks draw different
# responses; a prime stride keeps (seed, rank) pairs of nearby seeds from landing on the same value.
RANK_SEED_STRIDE = 7919
# A checkpoint: the LM (adapter or all weights) in policy/; PPO's value head or critic in value.safetensors
# (GRPO / RLOO have none, so their checkpoints hold no value file).
POLICY_DIR, VALUE_FILE = "policy", "value"
CURVES = (
    Curve("objective/scores", "reward (score)"),
    Curve("objective/kl", "KL(π‖π_ref) per response"),
    Curve("objective/entropy", "entropy per response"),
    Curve("policy/clipfrac_avg", "clip fraction"),
    Curve("response/length_avg", "response length (tokens)"),
)


@dataclass
class Run:
    """Everything the loop works with, built once by `start_run`."""

    cfg: PPOConfig
    accelerator: Any
    out: Path
    prompts: list[TokenizedPrompt]
    reward_fn: RewardFn
    tokenizer: Any
    actor: torch.nn.Module  # as prepared by Accelerate (DDP / DeepSpeed wrapper): the update's forward + backward
    unwrapped: ActorCritic  # the same module: generation, rollout forwards, checkpoints
    optimizer: torch.optim.Optimizer
    reference: Reference
    kl_ctl: FixedKLController | AdaptiveKLController
    log: RunLog
    start: int  # last step already done; a resumed run goes on after it
    stopped: str = ""  # why the run ended before cfg.steps (--kl-budget), for run.json
    weights_before: deque[list[torch.Tensor]] = field(default_factory=lambda: deque(maxlen=2))  # --kl-budget
    started_at: float = field(default_factory=time.perf_counter)


@dataclass
class TrainResult:
    out: Path
    step: int  # last step done
    history: list[dict[str, Any]]  # metrics rows of this process's run (all steps on the main process)
    policy_dir: Path | None  # final Hugging Face dir (main process)
    update_stats: dict[str, torch.Tensor] = field(default_factory=dict)  # last step: [epochs, minibatches, micro]


def start_run(cfg: PPOConfig, reward_fn: RewardFn | None) -> Run:
    """Claim `cfg.out`, load prompts, reward and models, prepare them under Accelerate, resume if asked."""
    out = Path(cfg.out)
    accelerator = make_accelerator(cfg.bf16, cfg.report_to, out)
    if cfg.kl_budget and zero_stage(accelerator) == 3:
        raise UserError("--kl-budget: not under DeepSpeed ZeRO-3, whose processes hold only shards of the weights; "
                        "use --save-every 1 and pick the checkpoint by objective/kl in metrics.jsonl")
    is_main = accelerator.is_main_process
    claim_run_dir(out, "rlhf-run", resume=cfg.resume, overwrite=cfg.overwrite)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    prompts, n_truncated = load_prompts(cfg.prompts, load_tokenizer(cfg.policy), chat_template=cfg.chat_template,
                                        system_prompt=cfg.system_prompt, max_prompt_tokens=cfg.max_prompt_tokens,
                                        truncate=cfg.truncate_prompts)
    if n_truncated and is_main:
        console.print(f"[yellow]warning:[/] {n_truncated} prompt(s) longer than --max-prompt-tokens "
                      f"{cfg.max_prompt_tokens} were cut from the left")
    if cfg.guide == "revise" and not any(p.context.get("constraints") for p in prompts):
        raise UserError("--guide revise edits answers to meet their row's `constraints`, and no row has any "
                        "(`llamakit generate-data constraints` writes them)", file=cfg.prompts)
    reward_fn = reward_fn or make_reward_fn(cfg.reward, prompts, cfg.prompts, cfg.reward_uncertainty_penalty)
    actor, ref_lm, tokenizer = _load_models(cfg, max(len(p.ids) for p in prompts), zero_stage(accelerator) == 3)

    optimizer = torch.optim.AdamW(_trainable(actor), lr=cfg.learning_rate,
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    configure_deepspeed(accelerator, cfg.minibatch_size // cfg.gradient_accumulation_steps, cfg.max_grad_norm,
                        causal_lm(actor.lm).config.hidden_size)
    prepared, optimizer = accelerator.prepare(actor, optimizer)
    unwrapped: ActorCritic = accelerator.unwrap_model(prepared)
    if ref_lm is not None:
        ref_lm.to(accelerator.device)
    kl_ctl = make_kl_controller(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
    torch.manual_seed(cfg.seed + RANK_SEED_STRIDE * accelerator.process_index)
    start = _resume(cfg, out, accelerator, unwrapped, optimizer, kl_ctl) if cfg.resume else 0
    if is_main:
        start_run_dir(out, "rlhf-run", overwrite=cfg.overwrite)
    start_tracking(accelerator, cfg.report_to, out, "llamakit-rlhf", cfg)  # before the run's first row
    accelerator.wait_for_everyone()
    return Run(cfg, accelerator, out, prompts, reward_fn, tokenizer, prepared, unwrapped, optimizer,
               Reference(unwrapped, ref_lm, lambda module: gathered_weights(accelerator, module)), kl_ctl,
               RunLog(out, is_main, samples=True, tracker=accelerator),
               start)


def _load_models(cfg: PPOConfig, longest_prompt: int,
                 partitioned: bool) -> tuple[ActorCritic, torch.nn.Module | None, Any]:
    """(actor: LM + value head or critic, frozen π_ref or None under LoRA, tokenizer). `partitioned`: ZeRO-3
    loads every model in shards (zero.Init); a copy of those would share their gather hooks, so π_ref is
    loaded again from disk, in shards of its own (`Reference` gathers them for each forward)."""
    dtype = base_dtype(bf16=cfg.bf16, lora=cfg.lora)
    lm, tokenizer = load_causal_lm(cfg.policy, dtype=dtype)
    disable_dropout(lm)
    ref_lm = None  # with LoRA, π_ref = the adapter switched off
    if cfg.reference:
        ref_lm = frozen(_reference_lm(cfg.reference, dtype, tokenizer))
    elif not cfg.lora:
        ref_lm = frozen(load_causal_lm(cfg.policy, dtype=dtype)[0]) if partitioned else frozen_copy(lm)
    if cfg.lora:
        lm = add_lora(lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_target, task_type="CAUSAL_LM", base=cfg.policy)
    if cfg.gradient_checkpointing:
        causal_lm(lm).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.train()  # checkpointing only acts in train mode; dropout is already off
    critic = None if cfg.critic == "value-head" else load_critic(cfg.critic, cfg.reward, tokenizer)
    actor = ActorCritic(lm, critic, value_head=cfg.algo == "ppo", recompute_logits=cfg.gradient_checkpointing)
    context = model_context_length(causal_lm(lm))
    if longest_prompt + cfg.max_new_tokens > context:
        raise UserError(f"longest prompt ({longest_prompt} tokens) + --max-new-tokens {cfg.max_new_tokens} exceeds "
                        f"the policy's context of {context} tokens; lower --max-prompt-tokens (with "
                        "--truncate-prompts) or --max-new-tokens", file=cfg.prompts)
    return actor, ref_lm, tokenizer


def _reference_lm(name: str, dtype: torch.dtype, policy_tokenizer) -> torch.nn.Module:
    """--reference: its log-probs are compared token by token with the policy's, so the vocabularies must agree."""
    try:
        lm, tokenizer = load_causal_lm(name, dtype=dtype)
    except UserError as err:
        raise UserError(f"--reference: {err}") from None
    if tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise UserError(f"--reference {name}: a different tokenizer from the policy's; the KL term compares "
                        "log-probs of the policy's tokens, so the reference must share its vocabulary")
    return lm


def _resume(cfg: PPOConfig, out: Path, accelerator, actor: ActorCritic, optimizer: torch.optim.Optimizer,
            kl_ctl: FixedKLController | AdaptiveKLController) -> int:
    """Load the latest checkpoint of `out` (if any) and drop log rows written after it; return its step."""
    start = 0
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None and actor.has_values and not (checkpoint / f"{VALUE_FILE}.safetensors").is_file():
        raise UserError(f"{checkpoint} has no value model (written by --algo grpo or rloo); resume it with "
                        "the same --algo", file=str(checkpoint))
    if checkpoint is not None:
        engine = deepspeed_engine(accelerator)  # which restores the whole actor, value model included
        restored = load_checkpoint(checkpoint, actor.lm, optimizer, weights=POLICY_DIR,
                                   rank=accelerator.process_index, world_size=accelerator.num_processes,
                                   tensors=(VALUE_FILE,) if actor.has_values and engine is None else (), engine=engine)
        if restored.tensors:
            actor.load_value_state_dict(restored.tensors[VALUE_FILE])
        kl_ctl.load_state_dict(restored.state["kl_ctl"])
        start = restored.step
        for group in optimizer.param_groups:
            group["lr"] = cfg.learning_rate  # flags given on resume win
    elif accelerator.is_main_process:
        console.print(f"[yellow]warning:[/] --resume: no checkpoint in '{out}', starting from step 0")
    if accelerator.is_main_process:
        drop_rows_after(out / "metrics.jsonl", start)
        drop_rows_after(out / "samples.jsonl", start)
    return start


@contextlib.contextmanager
def step_bar(run: Run) -> Iterator[Callable[[int, dict[str, Any]], None]]:
    """A progress bar on the main process; yields `show(step, metrics_row)` (a no-op elsewhere)."""
    if not run.accelerator.is_main_process:
        yield lambda step, row: None
        return
    with progress() as bar:
        task = bar.add_task("rlhf", total=run.cfg.steps, status="")
        bar.update(task, completed=run.start)

        def show(step: int, row: dict[str, Any]) -> None:
            bar.update(task, completed=step, status=f"reward {row['objective/scores']:+.3f}  "
                       f"kl {row['objective/kl']:.3f}  len {row['response/length_avg']:.0f}")

        yield show


def save(run: Run, step: int) -> None:
    actor = run.unwrapped
    tensors = {VALUE_FILE: actor.value_state_dict()} if actor.has_values else {}
    save_checkpoint(run.accelerator, run.out, step, actor.lm, run.optimizer, weights=POLICY_DIR,
                    state={"kl_ctl": run.kl_ctl.state_dict(), "config": run.cfg.to_dict()},
                    tensors=tensors, keep=run.cfg.keep_checkpoints)


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the updates change: the LoRA adapter or all weights, and the value head or critic."""
    return [p for p in module.parameters() if p.requires_grad]


def remember_weights(run: Run) -> None:
    """With --kl-budget, before an update: a CPU copy of what it changes (the LoRA adapter or all weights, and the
    value head); the copies from before the last two updates are kept."""
    if run.cfg.kl_budget:
        run.weights_before.append([p.detach().to("cpu", copy=True) for p in _trainable(run.unwrapped)])


def over_kl_budget(run: Run, step: int, kl: float) -> bool:
    """Whether step `step`'s rollouts, sampled by the weights of step − 1, were over --kl-budget at `kl` nats from
    π_ref; if so, the weights of step − 2 (from before the last two updates) are put back, to be saved."""
    budget, weights_before = run.cfg.kl_budget, run.weights_before
    if not budget or kl <= budget:
        return False
    if len(weights_before) < 2:
        which = "the starting policy" if step == 1 else f"the resumed policy (step {step - 1})"
        raise UserError(f"--kl-budget {budget:g}: {which} is already {kl:.2f} nats per answer from the reference "
                        "(the rollouts of its first step); raise the budget or start nearer the reference")
    with torch.no_grad():
        for param, saved in zip(_trainable(run.unwrapped), weights_before[0], strict=True):
            param.copy_(saved)
    inside = f"step {step - 2}'s" if step > 2 else "the starting one"
    run.stopped = (f"the rollouts of step {step} were {kl:.3f} nats from the reference, over --kl-budget "
                   f"{budget:g}; the policy is {inside}, the last one inside")
    if run.accelerator.is_main_process:
        console.print(f"rlhf: stopped: {run.stopped}")
    return True


def nan_error(run: Run, step: int, epoch: int, minibatch: int) -> UserError:
    checkpoint = latest_checkpoint(run.out)
    kept = f"the last good checkpoint is kept: {checkpoint}" if checkpoint else "no checkpoint was written yet"
    return UserError(f"loss became NaN at step {step} (PPO epoch {epoch + 1}, minibatch {minibatch + 1}); "
                     f"stopped without saving; {kept}. Lower --learning-rate (or raise --kl-coef) and --resume")


def finish_run(run: Run, last_saved: int, update_stats: dict[str, torch.Tensor]) -> TrainResult:
    """Final policy as a plain Hugging Face directory (LoRA merged), curves, run.json and the summary table."""
    cfg, policy_dir, history = run.cfg, None, run.log.history
    with gathered_weights(run.accelerator, run.unwrapped):  # every process: ZeRO-3 gathers the weights to save
        if run.accelerator.is_main_process:
            history = read_existing(run.out / "metrics.jsonl")
            final = _row_of_step(history, last_saved)
            policy_dir = _save_policy(run, run.out / "policy", last_saved, final)
    if run.accelerator.is_main_process:
        plot_curves(history, run.out / "curves.png", CURVES, title=f"llamakit rlhf · {cfg.policy} · {cfg.reward}")
        write_json(run.out / "run.json", {"config": cfg.to_dict(), "steps_done": last_saved,
                                          "seconds": time.perf_counter() - run.started_at,
                                          "world_size": run.accelerator.num_processes, "final": final,
                                          **({"stopped": run.stopped} if run.stopped else {})})
        summary_table("rlhf", {"steps": last_saved, "reward (saved step)": final.get("objective/scores"),
                               "kl (saved step)": final.get("objective/kl"), "policy": str(policy_dir)})
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return TrainResult(run.out, last_saved, history, policy_dir, update_stats)


def _row_of_step(history: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """The metrics of the saved policy's step: the last row, unless --kl-budget put back an earlier step's weights."""
    return next((row for row in reversed(history) if row.get("step") == step), {})  # step 0: the start, no row


def _save_policy(run: Run, target: Path, step: int, final: dict[str, Any]) -> Path:
    """OUT/adapter (--save-adapter) before the merge, then the merged policy with its manifest and model card."""
    cfg, lm = run.cfg, run.unwrapped.lm
    adapter = save_adapter(lm, run.tokenizer, run.out / "adapter", "rlhf-adapter") \
        if cfg.save_adapter else None
    card = render_card(method="rlhf", tags=(cfg.algo,), summary=f"RLHF ({cfg.algo.upper()}) against the reward "
                       f"`{cfg.reward}`", base=cfg.policy, data=cfg.prompts, rows=len(run.prompts), unit="prompts",
                       config=cfg.to_dict(), metrics=final, model_dir=target, adapter_dir=adapter)
    manifest = {"kind": "rlhf-policy", "base": cfg.policy, "reward": cfg.reward, "step": step, "lora_merged": cfg.lora}
    return save_model(lm, run.tokenizer, target, manifest, card)
