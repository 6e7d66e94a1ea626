"""The PPO loop for causal LMs, readable top to bottom (in the manner of CleanRL's ppo.py), and the
critic-free GRPO and RLOO on the same loop (`--algo`).

    for each step:
        1. rollout   sample a prompt batch -> generate (KV cache, left padding, stop on EOS)
                     (grpo / rloo: each prompt group_size times, a group on consecutive rows)
                     -> one forward of the actor: log π(a_t) from temperature-scaled logits, V_t (PPO only)
                     -> one forward of π_ref (adapter off / frozen copy): log π_ref(a_t)
                     -> score each response (reward model or rules)
        2. rewards   r_t = −β·KL_t on every token; r_T += score − no-EOS penalty on the last real token
                     (grpo / rloo: one reward per answer, score − no-EOS penalty [− β·Σ_t KL_t with the KL
                     in the reward]; with one epoch of one minibatch and the KL in the loss, log π_old comes
                     from the update's own forward instead of one more in step 1, as in TRL)
        3. GAE       advantages (γ, λ), returns = advantages + values; whiten advantages
                     (grpo / rloo: the group baseline instead, the same advantage on every token of the answer)
        4. update    ppo_epochs × minibatches: clipped policy loss + vf_coef · clipped value loss
                     (grpo / rloo: clipped policy loss [+ β · k3 KL with the KL in the loss])
        5. KL        β controller update (fixed or adaptive); with --kl-budget, a batch whose mean KL is over
                     the budget ends the run on the weights of the step before the policy that sampled it
        6. log       metrics.jsonl (TRL names), samples.jsonl, checkpoint

The maths is in rlhf/objective.py, the set-up, resume and final save in rlhf/run.py. Everything that
trains (LM, LoRA adapter, value head or critic) is one module under Accelerate, so the same code runs on
one CPU, under `torchrun --nproc_per_node N` (DDP) or `accelerate launch`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.config import PPOConfig
from rlhf.guide import end_token, revise_groups
from rlhf.objective import (
    gae,
    group_advantages,
    group_loss,
    kl_k3,
    masked_whiten,
    penalise_missing_eos,
    per_token_rewards,
    ppo_loss,
    token_kl,
)
from rlhf.rewards import RewardFn, score_rollout
from rlhf.rollout import Rollout, TokenizedPrompt, batch_indices, sample
from rlhf.run import (
    Run,
    TrainResult,
    finish_run,
    nan_error,
    over_kl_budget,
    remember_weights,
    save,
    start_run,
    step_bar,
)
from toolkit.errors import UserError
from toolkit.training.accelerator import autocast, gradient_sync

STAT_NAMES = ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio", "ratio_dev")


@dataclass
class Experience:
    """One rollout batch as the policy, the reference and the reward saw it (step 1)."""

    prompts: list[TokenizedPrompt]
    rollout: Rollout
    logprobs: torch.Tensor  # [B, R] log π_old(a_t) from the temperature-scaled logits
    ref_logprobs: torch.Tensor  # [B, R] log π_ref(a_t)
    values: torch.Tensor | None  # [B, R] V_t, 0 on padding; None without a value model (grpo / rloo)
    raw_scores: torch.Tensor  # [B] the reward's scores, before the no-EOS penalty
    guided: torch.Tensor  # [B] bool: a revised answer in place of a sample (--guide revise), not the policy's own

    @property
    def sampled(self) -> torch.Tensor:
        """[B] bool: the rows the policy sampled, which the step's KL, entropy and score statistics read."""
        return ~self.guided

    def samples(self, step: int, n: int) -> list[dict[str, Any]]:
        """The first `n` prompt / response / score rows, for samples.jsonl (a revised answer marked so)."""
        r = self.rollout
        return [{"step": step, "prompt": self.prompts[i].text, "response": r.responses_text[i],
                 "score": float(self.raw_scores[i]), "finish_reason": r.finish_reasons[i],
                 **({"source": "revised"} if self.guided[i] else {})}
                for i in range(min(n, len(self.prompts)))]


def train(cfg: PPOConfig, reward_fn: RewardFn | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Run PPO (or GRPO / RLOO) as `cfg` says; write everything under `cfg.out`. `reward_fn` overrides
    `cfg.reward`."""
    cfg.validate()
    run = start_run(cfg, reward_fn)
    accelerator, kl_ctl = run.accelerator, run.kl_ctl
    rank, world = accelerator.process_index, accelerator.num_processes
    update_stats: dict[str, torch.Tensor] = {}
    last_saved = run.start
    try:
        with step_bar(run) as show:
            for step in range(run.start + 1, cfg.steps + 1):
                # ---- 1. rollout -----------------------------------------------------------------------------
                t0 = time.perf_counter()
                indices = batch_indices(len(run.prompts), step, cfg.batch_size, rank, world, cfg.seed)
                answers = 1 if cfg.algo == "ppo" else cfg.group_size
                experience = collect(run, [run.prompts[i] for i in indices for _ in range(answers)])
                mask = experience.rollout.response_mask

                # ---- 2. rewards: KL penalty on every token, score (minus the no-EOS penalty) on the last
                if cfg.algo == "ppo":
                    rewards, _, scores = per_token_rewards(
                        scores=experience.raw_scores, logprobs=experience.logprobs,
                        ref_logprobs=experience.ref_logprobs, mask=mask,
                        contain_eos=experience.rollout.contain_eos, kl_coef=kl_ctl.value,
                        missing_eos_penalty=cfg.missing_eos_penalty)
                    if cfg.whiten_rewards:
                        rewards = masked_whiten(rewards, mask, shift_mean=False)
                    # ---- 3. GAE, whitened advantages -------------------------------------------------------
                    advantages, returns = gae(rewards=rewards, values=experience.values, mask=mask,
                                              gamma=cfg.gamma, lam=cfg.lam)
                    if cfg.whiten_advantages:
                        advantages = masked_whiten(advantages, mask)
                else:  # ---- 3. grpo / rloo: the group baseline, on every token of the answer -------------
                    scores = penalise_missing_eos(experience.raw_scores, experience.rollout.contain_eos,
                                                  cfg.missing_eos_penalty)
                    penalty = 0.0
                    if cfg.kl_mode == "reward":
                        penalty = kl_ctl.value * token_kl(experience.logprobs, experience.ref_logprobs, mask).sum(1)
                    advantages = group_advantages(scores=scores - penalty, group_size=cfg.group_size,
                                                  method=cfg.algo)
                    advantages, returns = advantages[:, None] * mask.to(advantages.dtype), None
                t_rollout = time.perf_counter() - t0

                # ---- 4. PPO epochs over minibatches ---------------------------------------------------------
                t1 = time.perf_counter()
                remember_weights(run)  # for --kl-budget
                update_stats = ppo_update(run, experience, advantages, returns, step)
                t_update = time.perf_counter() - t1

                # ---- 5. KL controller (log π_old is complete only now with cfg.logprobs_from_update) ----------
                kl = token_kl(experience.logprobs, experience.ref_logprobs, mask)
                kl_coef = kl_ctl.value
                batch_kl = float(accelerator.reduce(kl.sum(1)[experience.sampled].mean(), "mean"))
                kl_ctl.update(batch_kl, cfg.rollout_size * world)

                # ---- 6. log, samples, checkpoint ------------------------------------------------------------
                row = metrics_row(run, step, experience, kl=kl, kl_coef=kl_coef, scores=scores,
                                  update_stats=update_stats)
                row.update({"time/rollout": t_rollout, "time/update": t_update, "time/step": time.perf_counter() - t0})
                run.log.log(row)
                if on_step:
                    on_step(row)
                if cfg.sample_every and (step == 1 or step % cfg.sample_every == 0):
                    run.log.log_samples(experience.samples(step, cfg.samples_per_step))
                show(step, row)
                if over_kl_budget(run, step, batch_kl):  # the policy that sampled this batch: back to step − 2's
                    last_saved = step - 2
                    break
                if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                    save(run, step)
                    last_saved = step
    except torch.OutOfMemoryError:
        raise UserError("out of memory; lower --batch-size or raise --num-minibatches / "
                        "--gradient-accumulation-steps, lower --max-new-tokens, or use --lora, --bf16, "
                        "--gradient-checkpointing") from None
    finally:
        run.log.close()
    return finish_run(run, last_saved, update_stats)


def collect(run: Run, prompts: list[TokenizedPrompt]) -> Experience:
    """Step 1: generate one response per prompt and score it (with --guide revise, then put each group's revised
    best answer in place of its worst: rlhf/guide.py), then log π, V (with a value model) and log π_ref on it."""
    cfg, actor = run.cfg, run.unwrapped
    with torch.no_grad(), autocast(run.accelerator, cfg.bf16):
        # the gather ends with generation: ZeRO-3's own hooks then fetch for the forwards below (a forward of a
        # trainable, gathered ZeRO-3 model leaves its weights in flight where the gather would re-partition them)
        with _gathered(run.accelerator, actor.lm, cfg.gather_for_generation):
            rollout = sample(actor.lm, run.tokenizer, [p.ids for p in prompts], cfg.max_new_tokens,
                             cfg.temperature, cfg.top_p, cfg.top_k)
    raw_scores = score_rollout(run.reward_fn, [p.text for p in prompts], rollout.responses_text,
                               rollout.finish_reasons, run.accelerator.device, [p.context for p in prompts])
    guided = torch.zeros(len(prompts), dtype=torch.bool, device=run.accelerator.device)
    if cfg.guide == "revise":  # the revised answers join their groups before any forward reads the rollout
        rollout, raw_scores, guided = revise_groups(prompts, rollout, raw_scores, cfg.group_size, run.reward_fn,
                                                    run.tokenizer, end_token(actor.lm, run.tokenizer),
                                                    cfg.max_new_tokens)
    with torch.no_grad(), autocast(run.accelerator, cfg.bf16):
        responses, ctx, group = rollout.responses, rollout.context_length, _prompt_group(run)
        if cfg.logprobs_from_update:  # ppo_update fills them in
            logprobs, values = torch.zeros(responses.shape, device=responses.device), None
        else:
            logprobs, _, values = actor(rollout.query_responses, rollout.attention_mask, ctx, cfg.temperature,
                                        responses, group)
        ref_logprobs = run.reference.logprobs(rollout.query_responses, rollout.attention_mask, ctx,
                                              cfg.temperature, responses, group)
    if values is not None:
        values = values * rollout.response_mask.float()
    return Experience(prompts, rollout, logprobs, ref_logprobs, values, raw_scores, guided)


def ppo_update(run: Run, experience: Experience, advantages: torch.Tensor, returns: torch.Tensor | None,
               step: int) -> dict[str, torch.Tensor]:
    """Step 4: ppo_epochs passes over the batch in shuffled minibatches, each split into gradient
    accumulation micro-batches; one optimizer step per minibatch. Returns each statistic
    as [ppo_epochs, num_minibatches, gradient_accumulation_steps]."""
    cfg, accelerator, actor, rollout = run.cfg, run.accelerator, run.actor, experience.rollout
    epochs, minibatches, accumulation = cfg.ppo_epochs, cfg.num_minibatches, cfg.gradient_accumulation_steps
    micro_size = cfg.minibatch_size // accumulation
    mask = rollout.response_mask
    kl_in_loss = run.kl_ctl.value if cfg.kl_mode == "loss" else 0.0  # β of the k3 term (grpo / rloo)
    update_stats = {k: torch.zeros(epochs, minibatches, accumulation) for k in STAT_NAMES}
    # grpo / rloo shuffle whole groups where a micro-batch holds whole ones: each group's prompt then runs once
    block = 1 if cfg.algo == "ppo" or micro_size % cfg.group_size else cfg.group_size  # rows shuffled as one
    group = _prompt_group(run) if block > 1 else 1
    for epoch in range(epochs):
        order = (torch.randperm(cfg.rollout_size // block)[:, None] * block + torch.arange(block)).flatten()
        for m in range(minibatches):
            minibatch = order[m * cfg.minibatch_size:(m + 1) * cfg.minibatch_size]
            for g in range(accumulation):
                rows = minibatch[g * micro_size:(g + 1) * micro_size].to(accelerator.device)
                columns, response_columns, context_length = _trim(rows, rollout.attention_mask, mask,
                                                                  rollout.context_length)
                with gradient_sync(accelerator, actor, g == accumulation - 1), autocast(accelerator, cfg.bf16):
                    micro = (rows, response_columns)
                    new_logprobs, entropy, new_values = actor(
                        rollout.query_responses[rows, columns], rollout.attention_mask[rows, columns], context_length,
                        cfg.temperature, rollout.responses[micro], group, "loss" if cfg.ent_coef else "stat")
                    if returns is None:  # grpo / rloo
                        if cfg.logprobs_from_update:
                            experience.logprobs[micro] = new_logprobs.detach().float()
                        loss, stats = group_loss(
                            new_logprobs=new_logprobs, entropy=entropy, mask=mask[micro],
                            logprobs=experience.logprobs[micro], ref_logprobs=experience.ref_logprobs[micro],
                            advantages=advantages[micro], cliprange=cfg.cliprange, kl_coef=kl_in_loss,
                            ent_coef=cfg.ent_coef)
                    else:
                        loss, stats = ppo_loss(
                            new_logprobs=new_logprobs, entropy=entropy, new_values=new_values, mask=mask[micro],
                            logprobs=experience.logprobs[micro], values=experience.values[micro],
                            advantages=advantages[micro], returns=returns[micro], cliprange=cfg.cliprange,
                            cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef, ent_coef=cfg.ent_coef)
                    if not torch.isfinite(loss):
                        raise nan_error(run, step, epoch, m)
                    accelerator.backward(loss / accumulation)
                for k, v in stats.items():
                    update_stats[k][epoch, m, g] = v.float().cpu()
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(actor.parameters(), cfg.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
    return update_stats


def _prompt_group(run: Run) -> int:
    """K where each prompt's K answers lie on consecutive rows and its prompt may run once per forward; else 1.
    Not under DeepSpeed: ZeRO-3 fetches each layer per call, and the grouped forward calls each layer twice."""
    shares = run.cfg.shares_group_prompts and run.accelerator.state.deepspeed_plugin is None
    return run.cfg.group_size if shares else 1


def _trim(rows: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
          context_length: int) -> tuple[slice, slice, int]:
    """Columns a micro-batch needs: drop prompt padding all its rows share, and response padding after
    its longest response. Returns (sequence columns, response columns, context length)."""
    left = int((attention_mask[rows, :context_length].sum(0) > 0).nonzero()[0])
    right = int(response_mask[rows].sum(1).max())
    return slice(left, context_length + right), slice(0, right), context_length - left


def metrics_row(run: Run, step: int, experience: Experience, *, kl: torch.Tensor, kl_coef: float, scores: torch.Tensor,
                update_stats: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One metrics.jsonl row (TRL's names), averaged over processes."""
    accelerator, rollout = run.accelerator, experience.rollout
    sampled = experience.sampled  # a revised answer (--guide revise) is not the policy's: its rows are left out
    maskf = rollout.response_mask.float()[sampled]
    logprobs, ref_logprobs = experience.logprobs[sampled], experience.ref_logprobs[sampled]
    kl, scores = kl[sampled], scores[sampled]
    non_score_reward = -kl_coef * kl
    local = {
        "objective/kl": kl.sum(1).mean(),
        "objective/kl_k3": kl_k3(logprobs, ref_logprobs).mul(maskf).sum(1).mean(),
        "objective/entropy": (-logprobs * maskf).sum(1).mean(),
        "objective/non_score_reward": non_score_reward.sum(1).mean(),
        "objective/rlhf_reward": scores.mean() + non_score_reward.sum(1).mean(),
        "objective/scores": scores.mean(),
        "objective/raw_scores": experience.raw_scores[sampled].mean(),
        "policy/approxkl_avg": update_stats["approxkl"].mean(),
        "policy/clipfrac_avg": update_stats["clipfrac"].mean(),
        "loss/policy_avg": update_stats["pg_loss"].mean(),
        "loss/value_avg": update_stats["vf_loss"].mean(),
        "val/clipfrac_avg": update_stats["vf_clipfrac"].mean(),
        "policy/entropy_avg": update_stats["entropy"].mean(),
        "val/ratio": update_stats["ratio"].mean(),
        "val/ratio_var": update_stats["ratio"].var() if update_stats["ratio"].numel() > 1 else torch.zeros(()),
        "response/length_avg": maskf.sum(1).mean(),
        # the sampler's log-probs against the forward pass's: ~1e-5 when the rollout is on-policy
        # (bf16, top-p / top-k < 1 widen it: the sampler renormalises over the tokens it keeps)
        "val/sampling_logprob_gap": (rollout.sample_logprobs[sampled] - logprobs).abs().mul(maskf).max(),
    }
    reduced = accelerator.reduce(torch.stack([v.float().to(accelerator.device) for v in local.values()]), "mean")
    row: dict[str, Any] = {"step": step, "episode": step * run.cfg.rollout_size * accelerator.num_processes}
    row.update({k: float(v) for k, v in zip(local, reduced.tolist(), strict=True)})
    row["val/num_eos_tokens"] = int(accelerator.reduce(rollout.contain_eos[sampled].sum(), "sum"))
    if run.cfg.guide != "none":
        row["guide/revised"] = int(accelerator.reduce(experience.guided.sum(), "sum"))
    row["objective/kl_coef"] = kl_coef
    row["lr"] = run.optimizer.param_groups[0]["lr"]
    return row


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
