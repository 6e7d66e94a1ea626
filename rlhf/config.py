"""Every PPO hyper-parameter in one dataclass (CleanRL style). Defaults follow DESIGN.md ("PPO").
GRPO and RLOO (`algo`) run the same loop without a critic and read the same fields, plus `group_size` and
`kl_in`; the value-model fields (vf_coef, cliprange_value, gamma, lam, whitening, critic) are PPO's only.

This module imports nothing heavy: the CLI builds one `--flag` per field from it (help text and range in
each field's metadata, see toolkit/options.py), and a YAML preset's keys are the same flag names.
`check_ranges` applies the same ranges to a config built in Python, so the dataclass is the one place a
range is written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from toolkit.errors import UserError
from toolkit.options import SEED_MAX, check_ranges
from toolkit.options import flag_field as _f
from toolkit.training.trackers import REPORT_TO

ALGOS = ("ppo", "grpo", "rloo")
GUIDES = ("none", "revise")  # rlhf/guide.py
KL_IN = ("auto", "loss", "reward")


@dataclass
class PPOConfig:
    # --- run ---------------------------------------------------------------------------------------
    policy: str = _f("smollm2-135m", "Actor to optimise: an embedded alias or a Hugging Face directory.",
                     nonempty=True)
    reward: str = _f("rules:length", "Reward: a reward-model directory (train-reward) or rules:NAMES.",
                     nonempty=True)
    prompts: str = _f("", "Prompt file: JSONL/JSON rows with prompt | messages | instruction | "
                      "conversations.", nonempty=True)
    out: str = _f("runs/rlhf", "Output directory (metrics, samples, curves, checkpoints, policy/).",
                  nonempty=True)
    seed: int = _f(0, "Seed for prompt order, sampling and initialisation.", min=0, max=SEED_MAX)
    steps: int = _f(100, "PPO iterations (one rollout batch + its updates each).", min=1)
    algo: str = _f("ppo", "ppo (value head or critic) | grpo | rloo (critic-free: a baseline from "
                   "--group-size answers per prompt).", choices=ALGOS)
    group_size: int = _f(4, "Answers per prompt for grpo/rloo (K, at least 2).", min=1)
    guide: str = _f("none", "grpo/rloo: revise puts each group's best answer, edited by code to meet more of its "
                    "prompt's constraints (rows with `constraints`, as generate-data constraints writes), in place of "
                    "the group's worst where the reward scores the edit higher (off-policy guidance, LUFFY-style).",
                    choices=GUIDES)
    # --- rollout -----------------------------------------------------------------------------------
    batch_size: int = _f(8, "Prompts (= responses) per rollout batch, per process.", min=1)
    max_new_tokens: int = _f(64, "Response budget in tokens; generation stops at EOS.", min=1)
    max_prompt_tokens: int = _f(256, "Longest prompt in tokens (after the chat template).", min=1)
    truncate_prompts: bool = _f(False, "Cut longer prompts from the left with a warning instead of failing.")
    temperature: float = _f(1.0, "Sampling temperature; log-probs use the same temperature-scaled logits "
                             "(PPO samples, so > 0).", min=0, min_open=True)
    top_p: float = _f(1.0, "Nucleus sampling (1 = off; < 1 makes the rollout slightly off-policy).",
                      min=0, max=1, min_open=True)
    top_k: int = _f(0, "Top-k sampling (0 = off; > 0 makes the rollout slightly off-policy).", min=0)
    chat_template: bool = _f(True, "Wrap prompts in the policy's chat template (off: raw text).")
    system_prompt: str = _f("", "Optional system message put before every prompt.")
    # --- PPO ---------------------------------------------------------------------------------------
    ppo_epochs: int = _f(4, "Passes of PPO updates over each rollout batch.", min=1)
    num_minibatches: int = _f(2, "Minibatches per PPO epoch (batch_size must divide evenly).", min=1)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per minibatch (lowers memory, same maths).",
                                          min=1)
    gamma: float = _f(1.0, "Discount γ.", min=0, max=1)
    lam: float = _f(0.95, "GAE λ.", min=0, max=1)
    cliprange: float = _f(0.2, "Policy ratio clip ε.", min=0)
    cliprange_value: float = _f(0.2, "Value clip around the rollout values.", min=0)
    vf_coef: float = _f(0.1, "Value loss coefficient.", min=0)
    ent_coef: float = _f(0.0, "Entropy bonus coefficient (0 = off).", min=0)
    whiten_advantages: bool = _f(True, "Whiten advantages over the batch's real tokens.")
    whiten_rewards: bool = _f(False, "Whiten the per-token rewards before GAE.")
    missing_eos_penalty: float = _f(1.0, "Subtracted from the score of a response that hit the budget without EOS.",
                                     min=0)
    reward_uncertainty_penalty: float = _f(0.0, "λ: with an ensemble reward model (train-reward --ensemble K), the "
                                           "score is the members' mean − λ·their variance (uncertainty-weighted "
                                           "optimisation, Coste et al. 2023); 0 = the mean.", min=0)
    # --- KL ------------------------------------------------------------------------------------------
    kl_coef: float = _f(0.05, "β of the per-token k1 KL penalty (the start value when adaptive).", min=0)
    adaptive_kl: bool = _f(False, "Adapt β towards kl_target (Ziegler et al. 2019).")
    kl_target: float = _f(6.0, "Target KL (nats per response) for the adaptive controller.",
                          min=0, min_open=True)
    kl_horizon: int = _f(10000, "Horizon (episodes) of the adaptive controller.", min=1)
    kl_budget: float = _f(0.0, "Stop when a rollout batch's mean KL to π_ref (objective/kl, nats per answer) "
                          "exceeds this; the policy that sampled it is over, so the run ends on the weights "
                          "of the step before (0 = off; a small --batch-size makes the mean noisy). Keeps a CPU "
                          "copy of the trainable weights from before each of the last two updates: the adapter "
                          "with --lora, else two copies of the whole policy.", min=0)
    kl_in: str = _f("auto", "Where β·KL goes: reward (k1 penalty) | loss (k3 term, grpo/rloo only) | auto "
                    "(loss for grpo, reward for ppo and rloo).", choices=KL_IN)
    # --- optimisation --------------------------------------------------------------------------------
    learning_rate: float = _f(1e-5, "Adam learning rate (constant).", min=0, min_open=True)
    adam_eps: float = _f(1e-5, "Adam ε.", min=0, min_open=True)
    weight_decay: float = _f(0.0, "AdamW weight decay.", min=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).", min=0)
    bf16: bool = _f(False, "bfloat16 autocast (GPUs with bf16, recent CPUs).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward, and the logits of a head that "
                                             "trains (less memory, ~30% slower).")
    gather_for_generation: bool = _f(True, "Under DeepSpeed ZeRO-3, gather the whole policy on each GPU to "
                                     "generate (fast; needs the full weights' memory). Off: ZeRO-3 gathers "
                                     "layer by layer (slow, fits 33B/65B).")
    # --- actor / reference / critic ---------------------------------------------------------------------
    lora: bool = _f(False, "Train a LoRA adapter; the reference is the adapter disabled (no second copy) unless "
                    "--reference names another model.")
    reference: str = _f("", "π_ref of the KL term: a model other than the starting --policy (an alias or a Hugging "
                        "Face directory, same tokenizer), loaded as a frozen copy. For RL after DPO or SFT: "
                        "--reference BASE keeps the KL to the base model. Empty: the starting policy.")
    lora_r: int = _f(16, "LoRA rank.", min=1)
    lora_alpha: int = _f(32, "LoRA α.", min=1)
    lora_target: str = _f("all-linear", "LoRA target modules: all-linear or a comma list (q_proj,v_proj).",
                          nonempty=True)
    save_adapter: bool = _f(False, "Also write OUT/adapter: the LoRA adapter alone (PEFT), on the base policy it "
                            "names (needs --lora).")
    critic: str = _f("value-head", "value-head (on the policy) | reward (separate model from the reward dir) | DIR.",
                     nonempty=True)
    # --- logging / checkpoints --------------------------------------------------------------------------
    save_every: int = _f(0, "Checkpoint every N steps (0 = only at the end).", min=0)
    keep_checkpoints: int = _f(2, "Checkpoints kept on disk (oldest removed; 0 = all).", min=0)
    resume: bool = _f(False, "Continue from the last checkpoint in --out.")
    overwrite: bool = _f(False, "Replace an earlier rlhf run in --out (never a directory llamakit did not write).")
    sample_every: int = _f(10, "Write sample completions to samples.jsonl every N steps (0 = never).", min=0)
    samples_per_step: int = _f(2, "Completions written each time.", min=0)
    report_to: str = _f("none", "Experiment tracker, offline by default: tensorboard (OUT/runs), wandb (OUT/wandb), "
                        "mlflow (OUT/mlruns).", choices=REPORT_TO)

    def validate(self) -> None:
        """Raise UserError for settings that cannot work, naming the flag (ranges: see the field metadata)."""

        def bad(name: str, why: str) -> None:
            raise UserError(f"--{name.replace('_', '-')}: {why}")

        check_ranges(self)
        if self.algo not in ALGOS:
            bad("algo", " | ".join(ALGOS))
        if self.kl_in not in KL_IN:
            bad("kl_in", " | ".join(KL_IN))
        if self.save_adapter and not self.lora:
            bad("save_adapter", "needs --lora (without LoRA no adapter is trained; the whole policy is saved either "
                "way)")
        if self.reward_uncertainty_penalty and self.reward.startswith("rules"):
            bad("reward_uncertainty_penalty", "needs an ensemble reward model (train-reward --ensemble K), not rules")
        if self.algo == "ppo" and self.kl_in == "loss":
            bad("kl_in", "loss needs --algo grpo or rloo (PPO puts the KL in the reward)")
        if self.algo != "ppo":
            if self.group_size < 2:
                bad("group_size", f"--algo {self.algo} needs at least 2 answers per prompt")
            if self.critic != "value-head":
                bad("critic", f"--algo {self.algo} trains no critic; leave it at value-head")
        if self.guide not in GUIDES:
            bad("guide", " | ".join(GUIDES))
        if self.guide != "none" and self.algo == "ppo":
            bad("guide", "needs --algo grpo or rloo (a revised answer joins its prompt's group)")
        if self.rollout_size % self.num_minibatches:
            batch = (f"--batch-size {self.batch_size}" if self.algo == "ppo" else
                     f"--batch-size × --group-size {self.rollout_size}")
            bad("num_minibatches", f"must divide {batch}")
        minibatch = self.minibatch_size
        if minibatch % self.gradient_accumulation_steps:
            bad("gradient_accumulation_steps", f"must divide the minibatch size {minibatch}")
        if self.report_to not in REPORT_TO:
            bad("report_to", " | ".join(REPORT_TO))

    @property
    def rollout_size(self) -> int:
        """Responses per rollout batch, per process: one per prompt for PPO, group_size for GRPO / RLOO."""
        return self.batch_size if self.algo == "ppo" else self.batch_size * self.group_size

    @property
    def minibatch_size(self) -> int:
        return self.rollout_size // self.num_minibatches

    @property
    def kl_mode(self) -> str:
        """`kl_in` with auto resolved: "loss" (k3 in the loss) or "reward" (k1 penalty in the reward)."""
        if self.kl_in != "auto":
            return self.kl_in
        return "loss" if self.algo == "grpo" else "reward"

    @property
    def logprobs_from_update(self) -> bool:
        """grpo / rloo with one epoch of one minibatch and the KL in the loss: the policy does not move between
        the rollout and the update's forward, so log π_old is that forward's log-probs, detached (ratio 1, as TRL
        with num_iterations 1), and the rollout skips its own forward of the policy."""
        return self.algo != "ppo" and self.ppo_epochs == 1 and self.num_minibatches == 1 and self.kl_mode == "loss"

    @property
    def shares_group_prompts(self) -> bool:
        """grpo / rloo: a group's K answers follow one prompt, which then runs once per forward over whole groups
        (rlhf.policy.response_hidden); not with gradient checkpointing, which drops the cache the answers run on."""
        return self.algo != "ppo" and not self.gradient_checkpointing

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
