"""The PPO loop for causal LMs, readable top to bottom (in the manner of CleanRL's ppo.py).

    for each step:
        1. rollout   sample a prompt batch -> generate (KV cache, left padding, stop on EOS)
                     -> one forward of the actor: log π(a_t) from temperature-scaled logits, V_t
                     -> one forward of π_ref (adapter off / frozen copy): log π_ref(a_t)
                     -> score each response (reward model or rules)
        2. rewards   r_t = −β·KL_t on every token; r_T += score − no-EOS penalty on the last real token
        3. GAE       advantages (γ, λ), returns = advantages + values; whiten advantages
        4. update    ppo_epochs × minibatches: clipped policy loss + vf_coef · clipped value loss
        5. KL        β controller update (fixed or adaptive)
        6. log       metrics.jsonl (TRL names), samples.jsonl, checkpoint

Everything that trains (LM, LoRA adapter, value head or critic) is one module under Accelerate, so
the same code runs on one CPU, under `torchrun --nproc_per_node N` (DDP) or `accelerate launch`.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf.advantages import gae, masked_mean, masked_whiten
from rlhf.config import PPOConfig
from rlhf.kl import make_kl_controller
from rlhf.policy import ActorCritic, Reference, causal_lm, entropy_of, frozen_copy, load_critic, logprobs_of
from rlhf.rewards import RewardFn, make_reward_fn, per_token_rewards, score_rollout
from rlhf.rollout import batch_indices, load_prompts, sample
from toolkit.errors import UserError
from toolkit.io import claim_run_dir, start_run_dir
from toolkit.training.accelerator import autocast, gradient_sync, make_accelerator
from toolkit.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from toolkit.training.model import add_lora, disable_dropout
from toolkit.training.runlog import Curve, RunLog, drop_rows_after, plot_curves

STAT_NAMES = ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio", "ratio_dev")
CURVES = (
    Curve("objective/scores", "reward (score)"),
    Curve("objective/kl", "KL(π‖π_ref) per response"),
    Curve("objective/entropy", "entropy per response"),
    Curve("policy/clipfrac_avg", "clip fraction"),
    Curve("response/length_avg", "response length (tokens)"),
)
# A PPO checkpoint: the LM (adapter or all weights) in policy/, the value head or critic in value.safetensors.
POLICY_DIR, VALUE_FILE = "policy", "value"


@dataclass
class TrainResult:
    out: Path
    step: int  # last step done
    history: list[dict[str, Any]]  # metrics rows of this process's run (all steps on the main process)
    policy_dir: Path | None  # final Hugging Face dir (main process)
    update_stats: dict[str, torch.Tensor] = field(default_factory=dict)  # last step: [epochs, minibatches, micro]


def ppo_loss(logits: torch.Tensor, values: torch.Tensor, responses: torch.Tensor, mask: torch.Tensor,
             logprobs: torch.Tensor, old_values: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor,
             cfg: PPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate policy loss + clipped value loss (− entropy bonus) on one micro-batch."""
    new_logprobs = logprobs_of(logits, responses)
    logprobs_diff = new_logprobs - logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cfg.cliprange, 1.0 + cfg.cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)

    vpredclipped = old_values + torch.clamp(values - old_values, -cfg.cliprange_value, cfg.cliprange_value)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)

    with contextlib.nullcontext() if cfg.ent_coef else torch.no_grad():
        entropy = masked_mean(entropy_of(logits), mask)
    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy

    with torch.no_grad():
        maskb = mask.bool()
        stats = {
            "approxkl": 0.5 * masked_mean(logprobs_diff ** 2, mask),
            "clipfrac": masked_mean((pg_losses2 > pg_losses).float(), mask),
            "pg_loss": pg_loss.detach(),
            "vf_loss": vf_loss.detach(),
            "vf_clipfrac": masked_mean((vf_losses2 > vf_losses1).float(), mask),
            "entropy": entropy.detach(),
            "ratio": masked_mean(ratio, mask),
            "ratio_dev": (ratio - 1).abs()[maskb].max() if maskb.any() else torch.zeros(()),
        }
    return loss, stats


def _trim(rows: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
          context_length: int) -> tuple[slice, slice, int]:
    """Columns a micro-batch needs: drop prompt padding all its rows share, and response padding after
    its longest response. Returns (sequence columns, response columns, context length)."""
    left = int((attention_mask[rows, :context_length].sum(0) > 0).nonzero()[0])
    right = int(response_mask[rows].sum(1).max())
    return slice(left, context_length + right), slice(0, right), context_length - left


def train(cfg: PPOConfig, reward_fn: RewardFn | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Run PPO as `cfg` says; write everything under `cfg.out`. `reward_fn` overrides `cfg.reward`."""
    from toolkit.chat_format import context_length as model_context_length
    from toolkit.console import console, progress, summary_table
    from toolkit.models import load_causal_lm, load_tokenizer

    cfg.validate()
    accelerator = make_accelerator(cfg.bf16)
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    out = Path(cfg.out)
    claim_run_dir(out, "rlhf-run", resume=cfg.resume, overwrite=cfg.overwrite)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    # ---- prompts --------------------------------------------------------------------------------------
    prompts, n_truncated = load_prompts(cfg.prompts, load_tokenizer(cfg.policy), chat_template=cfg.chat_template,
                                        system_prompt=cfg.system_prompt, max_prompt_tokens=cfg.max_prompt_tokens,
                                        truncate=cfg.truncate_prompts)
    if n_truncated and is_main:
        console.print(f"[yellow]warning:[/] {n_truncated} prompt(s) longer than --max-prompt-tokens "
                      f"{cfg.max_prompt_tokens} were cut from the left")
    reward_fn = reward_fn or make_reward_fn(cfg.reward, prompts, cfg.prompts)

    # ---- actor, reference, critic ---------------------------------------------------------------------
    lm, tokenizer = load_causal_lm(cfg.policy)
    disable_dropout(lm)
    ref_lm = None if cfg.lora else frozen_copy(lm)  # with LoRA, π_ref = the adapter switched off
    if cfg.lora:
        lm = add_lora(lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_target, task_type="CAUSAL_LM")
    if cfg.gradient_checkpointing:
        causal_lm(lm).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.train()  # checkpointing only acts in train mode; dropout is already off
    critic = None if cfg.critic == "value-head" else load_critic(cfg.critic, cfg.reward, tokenizer)
    actor = ActorCritic(lm, critic)
    longest, context = max(len(p.ids) for p in prompts), model_context_length(causal_lm(lm))
    if longest + cfg.max_new_tokens > context:
        raise UserError(f"longest prompt ({longest} tokens) + --max-new-tokens {cfg.max_new_tokens} exceeds the "
                        f"policy's context of {context} tokens; lower --max-prompt-tokens (with "
                        "--truncate-prompts) or --max-new-tokens", file=cfg.prompts)

    # ---- optimizer, Accelerate, KL controller, resume ----------------------------------------------------
    optimizer = torch.optim.AdamW([p for p in actor.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    actor, optimizer = accelerator.prepare(actor, optimizer)
    unwrapped: ActorCritic = accelerator.unwrap_model(actor)
    if ref_lm is not None:
        ref_lm.to(device)
    reference = Reference(unwrapped, ref_lm)
    kl_ctl = make_kl_controller(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
    torch.manual_seed(cfg.seed + 7919 * rank)  # each process samples differently
    start = 0
    if cfg.resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is not None:
            restored = load_checkpoint(checkpoint, unwrapped.lm, optimizer, weights=POLICY_DIR, rank=rank,
                                       world_size=world, tensors=(VALUE_FILE,))
            unwrapped.load_value_state_dict(restored.tensors[VALUE_FILE])
            kl_ctl.load_state_dict(restored.state["kl_ctl"])
            start = restored.step
            for group in optimizer.param_groups:
                group["lr"] = cfg.learning_rate  # flags given on resume win
        elif is_main:
            console.print(f"[yellow]warning:[/] --resume: no checkpoint in '{out}', starting from step 0")
        if is_main:
            drop_rows_after(out / "metrics.jsonl", start)
            drop_rows_after(out / "samples.jsonl", start)
    if is_main:
        start_run_dir(out, "rlhf-run", overwrite=cfg.overwrite)
    accelerator.wait_for_everyone()
    log = RunLog(out, is_main, cfg.report_to, samples=True)

    B, E, M = cfg.batch_size, cfg.ppo_epochs, cfg.num_minibatches
    G = cfg.gradient_accumulation_steps
    micro_size = cfg.minibatch_size // G
    update_stats: dict[str, torch.Tensor] = {}
    last_saved = start
    t_run = time.perf_counter()
    try:
        with progress() if is_main else contextlib.nullcontext() as bar:
            task = bar.add_task("rlhf", total=cfg.steps, status="") if bar else None
            if bar:
                bar.update(task, completed=start)
            for step in range(start + 1, cfg.steps + 1):
                # ---- 1. rollout ---------------------------------------------------------------------------
                t0 = time.perf_counter()
                batch = [prompts[i] for i in batch_indices(len(prompts), step, B, rank, world, cfg.seed)]
                with torch.no_grad(), autocast(accelerator, cfg.bf16), _gathered(accelerator, unwrapped.lm,
                                                                               cfg.gather_for_generation):
                    rollout = sample(unwrapped.lm, tokenizer, [p.ids for p in batch], cfg.max_new_tokens,
                                     cfg.temperature, cfg.top_p, cfg.top_k)
                    responses, mask, ctx = rollout.responses, rollout.response_mask, rollout.context_length
                    logits, values = unwrapped(rollout.query_responses, rollout.attention_mask, ctx, cfg.temperature)
                    logprobs = logprobs_of(logits, responses)
                    del logits
                    ref_logprobs = reference.logprobs(rollout.query_responses, rollout.attention_mask, ctx,
                                                      cfg.temperature, responses)
                raw_scores = score_rollout(reward_fn, [p.text for p in batch], rollout.responses_text,
                                           rollout.finish_reasons, device, [p.context for p in batch])

                # ---- 2. rewards: KL penalty on every token, score (minus the no-EOS penalty) on the last
                maskf = mask.float()
                values = values * maskf
                rewards, kl, scores = per_token_rewards(raw_scores, logprobs, ref_logprobs, mask,
                                                        rollout.contain_eos, kl_ctl.value, cfg.missing_eos_penalty)
                non_score_reward = -kl_ctl.value * kl
                if cfg.whiten_rewards:
                    rewards = masked_whiten(rewards, mask, shift_mean=False)

                # ---- 3. GAE, whitened advantages ---------------------------------------------------------------
                advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
                if cfg.whiten_advantages:
                    advantages = masked_whiten(advantages, mask)
                t_rollout = time.perf_counter() - t0

                # ---- 4. PPO epochs over minibatches ---------------------------------------------------------
                t1 = time.perf_counter()
                update_stats = {k: torch.zeros(E, M, G) for k in STAT_NAMES}
                for epoch in range(E):
                    order = torch.randperm(B)
                    for m in range(M):
                        minibatch = order[m * cfg.minibatch_size:(m + 1) * cfg.minibatch_size]
                        for g in range(G):
                            rows = minibatch[g * micro_size:(g + 1) * micro_size].to(device)
                            cols, rcols, mctx = _trim(rows, rollout.attention_mask, mask, ctx)
                            with gradient_sync(accelerator, actor, g == G - 1), autocast(accelerator, cfg.bf16):
                                new_logits, new_values = actor(rollout.query_responses[rows, cols],
                                                               rollout.attention_mask[rows, cols], mctx,
                                                               cfg.temperature)
                                loss, stats = ppo_loss(new_logits, new_values, responses[rows, rcols],
                                                       mask[rows, rcols], logprobs[rows, rcols],
                                                       values[rows, rcols], advantages[rows, rcols],
                                                       returns[rows, rcols], cfg)
                                if not torch.isfinite(loss):
                                    raise _nan_error(step, epoch, m, out)
                                accelerator.backward(loss / G)
                            for k, v in stats.items():
                                update_stats[k][epoch, m, g] = v.float().cpu()
                        if cfg.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(actor.parameters(), cfg.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                t_update = time.perf_counter() - t1

                # ---- 5. KL controller ------------------------------------------------------------------------
                mean_kl = accelerator.reduce(kl.sum(1).mean(), "mean")
                kl_coef_used = kl_ctl.value
                kl_ctl.update(float(mean_kl), B * world)

                # ---- 6. log, samples, checkpoint --------------------------------------------------------------
                local = {
                    "objective/kl": kl.sum(1).mean(),
                    # k3 = (r − 1) − log r, r = π_ref/π: the same KL, never negative per token, lower variance
                    "objective/kl_k3": (torch.expm1(ref_logprobs - logprobs) - (ref_logprobs - logprobs))
                    .mul(maskf).sum(1).mean(),
                    "objective/entropy": (-logprobs * maskf).sum(1).mean(),
                    "objective/non_score_reward": non_score_reward.sum(1).mean(),
                    "objective/rlhf_reward": scores.mean() + non_score_reward.sum(1).mean(),
                    "objective/scores": scores.mean(),
                    "objective/raw_scores": raw_scores.mean(),
                    "policy/approxkl_avg": update_stats["approxkl"].mean(),
                    "policy/clipfrac_avg": update_stats["clipfrac"].mean(),
                    "loss/policy_avg": update_stats["pg_loss"].mean(),
                    "loss/value_avg": update_stats["vf_loss"].mean(),
                    "val/clipfrac_avg": update_stats["vf_clipfrac"].mean(),
                    "policy/entropy_avg": update_stats["entropy"].mean(),
                    "val/ratio": update_stats["ratio"].mean(),
                    "val/ratio_var": update_stats["ratio"].var() if update_stats["ratio"].numel() > 1
                    else torch.zeros(()),
                    "response/length_avg": mask.sum(1).float().mean(),
                    # the sampler's log-probs against the forward pass's: ~1e-5 when the rollout is on-policy
                    # (bf16, top-p / top-k < 1 widen it: the sampler renormalises over the tokens it keeps)
                    "val/sampling_logprob_gap": (rollout.sample_logprobs - logprobs).abs().mul(maskf).max(),
                }
                reduced = accelerator.reduce(torch.stack([v.float().to(device) for v in local.values()]), "mean")
                row: dict[str, Any] = {"step": step, "episode": step * B * world}
                row.update({k: float(v) for k, v in zip(local, reduced.tolist(), strict=True)})
                row["val/num_eos_tokens"] = int(accelerator.reduce(rollout.contain_eos.sum(), "sum"))
                row["objective/kl_coef"] = kl_coef_used
                row["lr"] = optimizer.param_groups[0]["lr"]
                row["time/rollout"] = t_rollout
                row["time/update"] = t_update
                row["time/step"] = time.perf_counter() - t0
                log.log(row)
                if on_step:
                    on_step(row)
                if cfg.sample_every and (step == 1 or step % cfg.sample_every == 0):
                    log.log_samples([{"step": step, "prompt": batch[i].text, "response": rollout.responses_text[i],
                                      "score": float(raw_scores[i]), "finish_reason": rollout.finish_reasons[i]}
                                     for i in range(min(cfg.samples_per_step, B))])
                if bar:
                    bar.update(task, completed=step, status=f"reward {row['objective/scores']:+.3f}  "
                               f"kl {row['objective/kl']:.3f}  len {row['response/length_avg']:.0f}")
                if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                    save_checkpoint(accelerator, out, step, unwrapped.lm, optimizer, weights=POLICY_DIR,
                                    state={"kl_ctl": kl_ctl.state_dict(), "config": cfg.to_dict()},
                                    tensors={VALUE_FILE: unwrapped.value_state_dict()}, keep=cfg.keep_checkpoints)
                    last_saved = step
    except torch.OutOfMemoryError:
        raise UserError("out of memory; lower --batch-size or raise --num-minibatches / "
                        "--gradient-accumulation-steps, lower --max-new-tokens, or use --lora, --bf16, "
                        "--gradient-checkpointing") from None
    finally:
        log.close()

    # ---- final policy: a plain Hugging Face directory (LoRA merged) ------------------------------------
    policy_dir = None
    history = log.history
    if is_main:
        policy_dir = _save_policy(unwrapped, tokenizer, out / "policy", cfg, last_saved)
        from toolkit.io import read_existing, write_json

        history = read_existing(out / "metrics.jsonl")
        plot_curves(history, out / "curves.png", CURVES, title=f"llamakit rlhf · {cfg.policy} · {cfg.reward}")
        final = history[-1] if history else {}
        write_json(out / "run.json", {"config": cfg.to_dict(), "steps_done": last_saved,
                                      "seconds": time.perf_counter() - t_run, "world_size": world,
                                      "final": final})
        summary_table("rlhf", {"steps": last_saved, "reward (last)": final.get("objective/scores"),
                               "kl (last)": final.get("objective/kl"), "policy": str(policy_dir)})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(out, last_saved, history, policy_dir, update_stats)


def _gathered(accelerator, module: torch.nn.Module, gather: bool):
    """Under DeepSpeed ZeRO-3 the weights are sharded: gather them all for generation, as TRL and OpenRLHF
    do, unless `gather` is off — then ZeRO-3's own hooks gather one layer at a time during each forward,
    slower but the full model never has to fit on one GPU (33B/65B). A no-op everywhere else.
    (deepspeed is not a llamakit dependency; see templates/deepspeed/.)"""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if not gather or plugin is None or getattr(plugin, "zero_stage", 0) != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()))


def _nan_error(step: int, epoch: int, minibatch: int, out: Path) -> UserError:
    checkpoint = latest_checkpoint(out)
    kept = f"the last good checkpoint is kept: {checkpoint}" if checkpoint else "no checkpoint was written yet"
    return UserError(f"loss became NaN at step {step} (PPO epoch {epoch + 1}, minibatch {minibatch + 1}); "
                     f"stopped without saving; {kept}. Lower --learning-rate (or raise --kl-coef) and --resume")


def _save_policy(actor: ActorCritic, tokenizer, target: Path, cfg: PPOConfig, step: int) -> Path:
    from toolkit.io import atomic_dir, write_json

    lm = actor.lm
    if hasattr(lm, "merge_and_unload"):
        lm = lm.merge_and_unload()  # the adapter folded into the weights: a plain model for `serve`
    with atomic_dir(target, "rlhf-policy", overwrite=True) as tmp:  # inside this run's own --out
        lm.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "llamakit-manifest.json", {"kind": "rlhf-policy", "base": cfg.policy,
                                                    "reward": cfg.reward, "step": step, "lora_merged": cfg.lora})
    return target
