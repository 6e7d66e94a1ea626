"""Every PPO hyper-parameter in one dataclass (CleanRL style). Defaults follow DESIGN.md ("PPO").

This module imports nothing heavy: the CLI builds one `--flag` per field from it (help text in
`metadata["help"]`), and a YAML preset's keys are the same flag names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - "help" reads best here
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class PPOConfig:
    # --- run ---------------------------------------------------------------------------------------
    policy: str = _f("smollm2-135m", "Actor to optimise: an embedded alias or a Hugging Face directory.")
    reward: str = _f("rules:length", "Reward: a reward-model directory (train-reward) or rules:NAMES.")
    prompts: str = _f("", "Prompt file: JSONL/JSON rows with prompt | messages | instruction | conversations.")
    out: str = _f("runs/rlhf", "Output directory (metrics, samples, curves, checkpoints, policy/).")
    seed: int = _f(0, "Seed for prompt order, sampling and initialisation.")
    steps: int = _f(100, "PPO iterations (one rollout batch + its updates each).")
    # --- rollout -----------------------------------------------------------------------------------
    batch_size: int = _f(8, "Prompts (= responses) per rollout batch, per process.")
    max_new_tokens: int = _f(64, "Response budget in tokens; generation stops at EOS.")
    max_prompt_tokens: int = _f(256, "Longest prompt in tokens (after the chat template).")
    truncate_prompts: bool = _f(False, "Cut longer prompts from the left with a warning instead of failing.")
    temperature: float = _f(1.0, "Sampling temperature; log-probs use the same temperature-scaled logits.")
    top_p: float = _f(1.0, "Nucleus sampling (1 = off; < 1 makes the rollout slightly off-policy).")
    top_k: int = _f(0, "Top-k sampling (0 = off; > 0 makes the rollout slightly off-policy).")
    chat_template: bool = _f(True, "Wrap prompts in the policy's chat template (off: raw text).")
    system_prompt: str = _f("", "Optional system message put before every prompt.")
    # --- PPO ---------------------------------------------------------------------------------------
    ppo_epochs: int = _f(4, "Passes of PPO updates over each rollout batch.")
    num_minibatches: int = _f(2, "Minibatches per PPO epoch (batch_size must divide evenly).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per minibatch (lowers memory, same maths).")
    gamma: float = _f(1.0, "Discount γ.")
    lam: float = _f(0.95, "GAE λ.")
    cliprange: float = _f(0.2, "Policy ratio clip ε.")
    cliprange_value: float = _f(0.2, "Value clip around the rollout values.")
    vf_coef: float = _f(0.1, "Value loss coefficient.")
    ent_coef: float = _f(0.0, "Entropy bonus coefficient (0 = off).")
    whiten_advantages: bool = _f(True, "Whiten advantages over the batch's real tokens.")
    whiten_rewards: bool = _f(False, "Whiten the per-token rewards before GAE.")
    missing_eos_penalty: float = _f(1.0, "Subtracted from the score of a response that hit the budget without EOS.")
    # --- KL ------------------------------------------------------------------------------------------
    kl_coef: float = _f(0.05, "β of the per-token k1 KL penalty (the start value when adaptive).")
    adaptive_kl: bool = _f(False, "Adapt β towards kl_target (Ziegler et al. 2019).")
    kl_target: float = _f(6.0, "Target KL (nats per response) for the adaptive controller.")
    kl_horizon: int = _f(10000, "Horizon (episodes) of the adaptive controller.")
    # --- optimisation --------------------------------------------------------------------------------
    learning_rate: float = _f(1e-5, "Adam learning rate (constant).")
    adam_eps: float = _f(1e-5, "Adam ε.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).")
    bf16: bool = _f(False, "bfloat16 autocast (GPUs with bf16, recent CPUs).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward (less memory, ~30% slower).")
    gather_for_generation: bool = _f(True, "Under DeepSpeed ZeRO-3, gather the whole policy on each GPU to "
                                     "generate (fast; needs the full weights' memory). Off: ZeRO-3 gathers "
                                     "layer by layer (slow, fits 33B/65B).")
    # --- actor / reference / critic ---------------------------------------------------------------------
    lora: bool = _f(False, "Train a LoRA adapter; the reference is the adapter disabled (no second copy).")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA α.")
    lora_target: str = _f("all-linear", "LoRA target modules: all-linear or a comma list (q_proj,v_proj).")
    critic: str = _f("value-head", "value-head (on the policy) | reward (separate model from the reward dir) | DIR.")
    # --- logging / checkpoints --------------------------------------------------------------------------
    save_every: int = _f(0, "Checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = _f(2, "Checkpoints kept on disk (oldest removed).")
    resume: bool = _f(False, "Continue from the last checkpoint in --out.")
    sample_every: int = _f(10, "Write sample completions to samples.jsonl every N steps (0 = never).")
    samples_per_step: int = _f(2, "Completions written each time.")
    report_to: str = _f("none", "none | tensorboard (needs the tensorboard package).")

    def validate(self) -> None:
        """Raise UserError for settings that cannot work, naming the flag."""
        from toolkit.errors import UserError

        def bad(name: str, why: str) -> None:
            raise UserError(f"--{name.replace('_', '-')}: {why}")

        if self.steps < 1:
            bad("steps", "must be at least 1")
        if self.batch_size < 1:
            bad("batch_size", "must be at least 1")
        if self.num_minibatches < 1 or self.batch_size % self.num_minibatches:
            bad("num_minibatches", f"must divide --batch-size {self.batch_size}")
        minibatch = self.batch_size // self.num_minibatches
        if self.gradient_accumulation_steps < 1 or minibatch % self.gradient_accumulation_steps:
            bad("gradient_accumulation_steps", f"must divide the minibatch size {minibatch}")
        if self.temperature <= 0:
            bad("temperature", "PPO samples, so it must be > 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.max_new_tokens < 1:
            bad("max_new_tokens", "must be at least 1")
        if self.max_prompt_tokens < 1:
            bad("max_prompt_tokens", "must be at least 1")
        if not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1:
            bad("lam", "γ and λ must be in [0, 1]")
        if self.ppo_epochs < 1:
            bad("ppo_epochs", "must be at least 1")
        if self.report_to not in ("none", "tensorboard"):
            bad("report_to", "none or tensorboard")
        if self.learning_rate <= 0:
            bad("learning_rate", "must be > 0")

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(PPOConfig))
