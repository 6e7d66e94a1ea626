"""Memory per GPU of a training run, before it runs: `llamakit plan`.

Every term is a count of numbers times their bytes; nothing is fitted. Sources:
- model states (Rajbhandari et al. 2020, "ZeRO", §3 and Fig. 1; DeepSpeed's
  `estimate_zero2_model_states_mem_needs` / `estimate_zero3_...`): mixed-precision AdamW keeps 2 bytes of 16-bit
  weights, 2 of 16-bit gradients and 12 of fp32 state (master weights, m, v) per parameter = 16; in plain fp32
  (torch autocast keeps fp32 weights) 4 + 4 + 8 = 16 as well. ZeRO-2 shards the optimizer states and the
  gradients over the GPUs, ZeRO-3 the weights too; `--offload` moves optimizer states (and with ZeRO-3 the
  weights) to host memory. What DeepSpeed's ZeRO optimizer holds per rank, from its estimators
  (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_...`) and its code: the reduced gradient partition in
  the weights' precision and an fp32 copy, fp32 master weights, m and v (2 + 4 + 4 + 8 bytes per parameter in bf16;
  it keeps the master copy with fp32 weights too), plus the largest gradient whole until its bucket is reduced
  (its `largest_layer_memory`). ZeRO-3 also keeps gathered weights from the forward for the backward, up to the
  preset's `stage3_max_live_parameters`.
- LoRA (Hu et al. 2021): r·(in + out) trainable numbers per adapted linear layer; the frozen base keeps only its
  weights (no gradients, no optimizer states). The reference policy is the adapter switched off: no copy.
- activations (Korthikanti et al. 2022, "Reducing Activation Recomputation", §4, counted for LLaMA's SwiGLU
  block): per token and layer the backward keeps the normed inputs of attention and MLP, q, k, v, the attention
  output and the residuals (6h + 2·kv elements) and the MLP's gate, up, SiLU and product (4·I); SDPA / flash
  attention keeps no s×s score matrix. With LoRA each adapted linear layer adds two tensors of its output's size
  (the adapter's output and its scaled copy: measured with peft, 2·(3h + 2·kv + 2I) for LLaMA's 7 linears).
  With gradient checkpointing only each layer's input (h) is kept, plus one layer's full set during its
  recomputation.
- logits (causal LMs only): the head meets the scored positions' hidden states apart from the model, HEAD_CHUNK
  positions at a time (toolkit.head_logprobs). A frozen head (LoRA) keeps no logits for backward: one chunk's
  fp32 logits, log-softmax and probabilities at a time. A head that trains keeps every position's fp32 logits, plus
  one chunk's log-softmax and gradient. Under ZeRO-3 (a partitioned head) the model's own head: b·s·V fp32 logits,
  log-softmax and their gradient, 3 copies. rlhf scores the answer positions only, one answer at a time, and
  GRPO / RLOO run a group's prompt once for its K answers (not under DeepSpeed or gradient checkpointing).
- rollout KV cache (PPO / GRPO / RLOO generation): 2 (K and V) · layers · kv heads · head dim · tokens · batch;
  under ZeRO-3 generation gathers the other GPUs' shards of the weights (TRL and OpenRLHF do the same), or one
  layer at a time with `gather_for_generation: false`.

Checked against measured peaks on CPU (tests/cli/test_plan_cli.py, benchmarks/plan_memory.py): the peak resident
memory a real `llamakit sft` adds per rank, for LLaMA sizes of 30M, 82M and 176M parameters, full and LoRA,
without DeepSpeed and under ZeRO-2 and ZeRO-3 on 2 ranks: within 13% at 82M, 2-14% over at 176M, 9-24% under at
30M (docs/plan-memory.md).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import UserError

GIB = 1024**3
STAGES = ("sft", "train-reward", "rlhf", "dpo")
ALGOS = ("ppo", "grpo", "rloo")
ZERO_STAGES = (0, 2, 3)


@dataclass(frozen=True)
class Shape:
    """What the estimate needs to know of a LLaMA-family model."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer of one decoder block: q, k, v, o, gate, up, down."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    @property
    def parameters(self) -> int:
        block = sum(a * b for a, b in self.linear_shapes()) + 2 * self.hidden  # + two RMSNorm weights
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * block + embeddings + self.hidden

    @property
    def largest_tensor(self) -> int:
        """The embedding (or the LM head, its size): the biggest single weight, so the biggest single gradient."""
        return max(self.vocab * self.hidden, *(a * b for a, b in self.linear_shapes()))

    def lora_parameters(self, r: int) -> int:
        """LoRA on every linear layer of every block ("all-linear", llamakit's default)."""
        return self.layers * sum(r * (a + b) for a, b in self.linear_shapes())


# Meta's LLaMA-1 configurations (params.json of the 7B-65B checkpoints; vocabulary 32000, untied head).
PRESETS = {
    "llama-7b": Shape("llama-7b", 32, 4096, 11008, 32, 32, 32000),
    "llama-13b": Shape("llama-13b", 40, 5120, 13824, 40, 40, 32000),
    "llama-33b": Shape("llama-33b", 60, 6656, 17920, 52, 52, 32000),
    "llama-65b": Shape("llama-65b", 80, 8192, 22016, 64, 64, 32000),
}


def shape_of(model: str) -> Shape:
    """A preset name or a model directory with a LLaMA-style config.json (read as JSON: offline, no weights)."""
    if model in PRESETS:
        return PRESETS[model]
    from toolkit.models import resolve

    try:
        config_file = resolve(model) / "config.json"
    except UserError as err:
        raise UserError(f"--model: {err}") from None
    if not config_file.is_file():
        raise UserError(f"--model {model}: not one of {', '.join(PRESETS)} and no config.json there")
    try:
        c = json.loads(config_file.read_text(encoding="utf-8"))
        return Shape(Path(model).name, c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"],
                     c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"],
                     c["vocab_size"], bool(c.get("tie_word_embeddings", False)))
    except (ValueError, KeyError) as err:
        raise UserError(f"--model {model}: not a LLaMA-style config ({type(err).__name__}: {err})",
                        file=str(config_file)) from None


@dataclass(frozen=True)
class PlanConfig:
    stage: str = "rlhf"
    model: str = "llama-7b"
    gpus: int = 1
    gpu_memory_gib: float = 80.0
    lora: bool = False
    lora_r: int = 16
    zero: int = 0
    offload: bool = False
    bf16: bool = True
    gradient_checkpointing: bool = False
    batch_size: int = 1  # per micro-batch: sequences (sft), pairs (train-reward, dpo); rlhf: prompts per rollout
    num_minibatches: int = 1  # rlhf: the update's backward holds 1/num_minibatches of the rollouts
    gradient_accumulation_steps: int = 1  # rlhf: micro-batches per minibatch (the backward holds one)
    max_length: int = 1024  # sft / train-reward / dpo: tokens per sequence
    max_prompt_tokens: int = 256  # rlhf
    max_new_tokens: int = 128  # rlhf
    algo: str = "ppo"  # rlhf: ppo | grpo | rloo
    group_size: int = 4  # grpo / rloo: answers per prompt (the rollout holds batch_size × group_size)
    critic: str = "value-head"  # rlhf ppo: value-head | a model (preset or dir) trained beside the policy
    reward_model: str = ""  # rlhf: the reward model's size (default: the policy's); "rules" = none
    gather_for_generation: bool = True  # rlhf under ZeRO-3: gather all weights to generate (else layer by layer)
    framework_gib: float = 1.0  # CUDA context, allocator fragmentation, NCCL buffers (0 for a CPU estimate)

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise UserError(f"--stage: one of {', '.join(STAGES)}, not {self.stage!r}")
        if self.zero not in ZERO_STAGES:
            raise UserError(f"--zero: 0, 2 or 3 (the presets in templates/accelerate/), not {self.zero}")
        if self.offload and self.zero == 0:
            raise UserError("--offload needs --zero 2 or 3 (DeepSpeed moves the sharded states to host memory)")
        if self.gpus < 1:
            raise UserError("--gpus: at least 1")
        if self.algo not in ALGOS:
            raise UserError(f"--algo: one of {', '.join(ALGOS)}, not {self.algo!r}")
        if self.stage == "rlhf" and self.rollouts % self.num_minibatches:
            raise UserError(f"--num-minibatches: must divide the {self.rollouts} rollouts of a batch "
                            "(as rlhf requires)")
        if self.stage == "rlhf" and self.minibatch % self.gradient_accumulation_steps:
            raise UserError(f"--gradient-accumulation-steps: must divide the minibatch size {self.minibatch} "
                            "(as rlhf requires)")

    @property
    def rollouts(self) -> int:
        """rlhf: answers per rollout batch (one per prompt for PPO, group_size for GRPO / RLOO)."""
        return self.batch_size * (1 if self.algo == "ppo" else self.group_size)

    @property
    def minibatch(self) -> int:
        """rlhf: rollouts per minibatch of the update."""
        return self.rollouts // self.num_minibatches


@dataclass
class Plan:
    """Bytes per GPU by component, and whether they fit."""

    config: PlanConfig
    shape: Shape
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.config.gpu_memory_gib * GIB

    def as_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "model": asdict(self.shape), "parameters": self.shape.parameters,
                "gib": {k: round(v / GIB, 3) for k, v in self.parts.items()}, "total_gib": round(self.total / GIB, 3),
                "fits": self.fits}


def model_states(shape: Shape, cfg: PlanConfig) -> dict[str, float]:
    """Weights, gradients and optimizer states of one trained model, per GPU (ZeRO sharding and offload)."""
    n, shards = shape.parameters, cfg.gpus
    weight_bytes = 2 if cfg.bf16 else 4
    if cfg.lora:
        trainable = shape.lora_parameters(cfg.lora_r)
        weights = n * weight_bytes + trainable * 4.0  # adapters stay fp32 (peft's default)
        grad_bytes = 4
    else:
        trainable, weights, grad_bytes = n, n * float(weight_bytes), weight_bytes
    if cfg.zero == 0:
        grads = trainable * float(grad_bytes)
        # AdamW m and v, + fp32 master weights when the trained weights are 16-bit
        optimizer = trainable * (8.0 if grad_bytes == 4 else 12.0)
    else:
        # DeepSpeed's ZeRO optimizer keeps, per rank, the reduced gradient partition in the weights' precision and
        # an fp32 copy of it, fp32 master weights, m and v: 2 + 4 + 4 + 8 bytes per trained parameter in bf16
        # (estimate_zero2_model_states_mem_needs), and the fp32 master copy even when the weights are fp32
        grads = trainable * float(grad_bytes) / shards + (0.0 if cfg.offload else trainable * 4.0 / shards)
        # and each gradient is whole until its bucket is reduced: the largest one (DeepSpeed's largest_layer_memory)
        largest = max(cfg.lora_r * max(a, b) for a, b in shape.linear_shapes()) if cfg.lora else shape.largest_tensor
        grads += largest * float(grad_bytes)
        optimizer = 0.0 if cfg.offload else trainable * 12.0 / shards
    if cfg.zero == 3:
        weights = 0.0 if cfg.offload else weights / shards
    return {"weights": weights, "gradients": grads, "optimizer": optimizer}


@functools.cache  # the best fit estimates every candidate; the preset is read once
def live_parameters() -> float:
    """How many gathered parameters ZeRO-3 keeps per GPU before it releases any: `stage3_max_live_parameters` of
    the shipped preset. With its `stage3_max_reuse_distance` as large, a weight the backward will use again stays
    gathered from the forward until then, so a model of fewer parameters than this is whole on every GPU."""
    from toolkit.resources import template_path

    return float(json.loads(template_path("deepspeed/zero3.json").read_text())["zero_optimization"]
                 ["stage3_max_live_parameters"])


def gathered_weights(shape: Shape, cfg: PlanConfig) -> float:
    """ZeRO-3's whole weights on a GPU beside its shard: those the forward keeps for the backward (up to
    live_parameters), or all of them while rlhf generates with the policy gathered (layer by layer, it gathers no
    more than the backward keeps)."""
    gathered = min(shape.parameters, live_parameters())
    if cfg.stage == "rlhf" and cfg.gather_for_generation:
        gathered = shape.parameters
    return gathered * (2.0 if cfg.bf16 else 4.0)


def frozen_copy(shape: Shape, cfg: PlanConfig) -> float:
    """A model used without training (reference, reward model): its weights only, sharded under ZeRO-3."""
    weights = shape.parameters * (2.0 if cfg.bf16 else 4.0)
    return weights / cfg.gpus if cfg.zero == 3 else weights


def activations(shape: Shape, cfg: PlanConfig, sequences: int, tokens: int, logits: bool) -> float:
    """What the backward needs of one micro-batch's forward: per-layer activations and the LM head's logits."""
    bytes_ = 2 if cfg.bf16 else 4
    per_token_layer = 6 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate
    if cfg.lora:  # measured with peft: each adapted linear keeps its adapter's output and the scaled copy
        per_token_layer += 2 * sum(out for _, out in shape.linear_shapes())
    if cfg.gradient_checkpointing:
        kept = shape.layers * shape.hidden + per_token_layer  # layer inputs, plus one layer recomputed
    else:
        kept = shape.layers * per_token_layer
    total = sequences * tokens * kept * bytes_
    if logits:
        total += head_logits(shape, cfg, sequences * tokens)
    return float(total)


HEAD_CHUNK = 256  # positions per head product: toolkit.head_logprobs.head_logprobs' `chunk`


def head_logits(shape: Shape, cfg: PlanConfig, positions: int, chunk: int = HEAD_CHUNK) -> float:
    """The LM head's fp32 [positions, V] tensors at the backward's peak (see the module's docstring); `chunk`
    positions meet the head at a time (rlhf: one answer's)."""
    row = shape.vocab * 4
    if cfg.zero == 3:
        return 3.0 * positions * row
    chunk_bytes = min(chunk, positions) * row
    return 3.0 * chunk_bytes if cfg.lora else positions * row + 2.0 * chunk_bytes


def kv_cache(shape: Shape, cfg: PlanConfig, sequences: int, tokens: int) -> float:
    return 2.0 * shape.layers * shape.kv_dim * tokens * sequences * (2 if cfg.bf16 else 4)


def estimate(cfg: PlanConfig) -> Plan:
    cfg.validate()
    shape = shape_of(cfg.model)
    plan = Plan(cfg, shape)
    plan.parts.update(model_states(shape, cfg))
    if cfg.zero == 3:
        plan.parts["gathered_weights"] = gathered_weights(shape, cfg)
    if cfg.stage == "sft":
        plan.parts["activations"] = activations(shape, cfg, cfg.batch_size, cfg.max_length, logits=True)
    elif cfg.stage == "train-reward":  # chosen and rejected; a scalar head, no vocabulary projection
        plan.parts["activations"] = activations(shape, cfg, 2 * cfg.batch_size, cfg.max_length, logits=False)
    elif cfg.stage == "dpo":
        plan.parts["activations"] = activations(shape, cfg, 2 * cfg.batch_size, cfg.max_length, logits=True)
        plan.parts["reference"] = 0.0 if cfg.lora else frozen_copy(shape, cfg)
    else:
        _rlhf_parts(plan, shape, cfg)
    plan.parts["framework"] = cfg.framework_gib * GIB
    return plan


def _rlhf_parts(plan: Plan, shape: Shape, cfg: PlanConfig) -> None:
    rollouts = cfg.rollouts
    tokens = cfg.max_prompt_tokens + cfg.max_new_tokens
    # The update's backward holds one micro-batch (a minibatch ÷ gradient accumulation steps). GRPO / RLOO run a
    # group's prompt once where it holds whole groups (rlhf.config.shares_group_prompts; not under DeepSpeed); the
    # head meets the answer positions only, one answer at a time (rlhf.policy.response_logprobs).
    update = cfg.minibatch // cfg.gradient_accumulation_steps
    shared = (cfg.algo != "ppo" and update % cfg.group_size == 0 and not cfg.gradient_checkpointing
              and cfg.zero == 0)
    prompt_runs = update // cfg.group_size if shared else update
    plan.parts["activations"] = (
        activations(shape, cfg, prompt_runs, cfg.max_prompt_tokens, logits=False)
        + activations(shape, cfg, update, cfg.max_new_tokens, logits=False)
        + head_logits(shape, cfg, update * cfg.max_new_tokens, chunk=cfg.max_new_tokens))
    plan.parts["rollout_kv_cache"] = kv_cache(shape, cfg, rollouts, tokens)
    plan.parts["reference"] = 0.0 if cfg.lora else frozen_copy(shape, cfg)
    if cfg.reward_model != "rules":
        plan.parts["reward_model"] = frozen_copy(shape_of(cfg.reward_model) if cfg.reward_model else shape, cfg)
    if cfg.algo == "ppo" and cfg.critic != "value-head":
        critic = shape_of(cfg.critic)
        plan.parts["critic"] = sum(model_states(critic, cfg).values()) + activations(critic, cfg, update, tokens,
                                                                                     logits=False)


def best_fit(cfg: PlanConfig) -> Plan | None:
    """The least machinery that fits, fastest first: full fine-tuning, then LoRA, each on ZeRO-0, 2, 3 (ZeRO only
    with more than one GPU); then ZeRO-3 generating layer by layer (rlhf); offload (slow: every step crosses
    PCIe) only when nothing else fits."""
    from dataclasses import replace

    tries = [(lora, zero, False, True) for lora in (False, True) for zero in ZERO_STAGES if zero == 0 or cfg.gpus > 1]
    if cfg.stage == "rlhf":
        tries += [(lora, 3, False, False) for lora in (False, True) if cfg.gpus > 1]
    tries += [(lora, 3, True, gather) for gather in (True, False) for lora in (False, True)]
    for lora, zero, offload, gather in tries:
        plan = estimate(replace(cfg, lora=lora, zero=zero, offload=offload, gather_for_generation=gather))
        if plan.fits:
            return plan
    return None


def launch_command(plan: Plan) -> str:
    """How to start the run that `plan` describes (a preset from templates/ where one matches)."""
    cfg = plan.config
    command = {"sft": "sft", "train-reward": "train-reward", "rlhf": "rlhf", "dpo": "dpo"}[cfg.stage]
    flags = [*(["--lora"] if cfg.lora else []), *(["--bf16"] if cfg.bf16 else []),
             *(["--gradient-checkpointing"] if cfg.gradient_checkpointing else []),
             *(["--algo", cfg.algo, "--group-size", str(cfg.group_size)]
               if cfg.stage == "rlhf" and cfg.algo != "ppo" else []),
             # rlhf's own defaults differ: the run launched is the run estimated
             *(["--batch-size", str(cfg.batch_size), "--num-minibatches", str(cfg.num_minibatches),
                "--max-prompt-tokens", str(cfg.max_prompt_tokens), "--max-new-tokens", str(cfg.max_new_tokens)]
               if cfg.stage == "rlhf" else []),
             *(["--gradient-accumulation-steps", str(cfg.gradient_accumulation_steps)]
               if cfg.stage == "rlhf" and cfg.gradient_accumulation_steps > 1 else []),
             *(["--no-gather-for-generation"] if cfg.stage == "rlhf" and cfg.zero == 3
               and not cfg.gather_for_generation else [])]
    if cfg.zero:
        launcher = (f"accelerate launch --config_file templates/accelerate/deepspeed-zero{cfg.zero}.yaml "
                    f"--num_processes {cfg.gpus} -m toolkit")
    elif cfg.gpus > 1:
        launcher = f"torchrun --nproc_per_node {cfg.gpus} -m toolkit"
    else:
        launcher = "llamakit"
    note = "  (offload: set offload_optimizer/offload_param device cpu in templates/deepspeed/)" if cfg.offload else ""
    return " ".join([launcher, command, "--model" if cfg.stage in ("sft", "train-reward") else "--policy",
                     cfg.model, *flags]) + note


def rows_gib(plan: Plan) -> list[tuple[str, str]]:
    trainable = plan.shape.lora_parameters(plan.config.lora_r) if plan.config.lora else plan.shape.parameters
    return [("parameters", f"{plan.shape.parameters / 1e9:.2f}B ({trainable / 1e6:,.0f}M trained)"),
            *((name, f"{value / GIB:.1f}") for name, value in plan.parts.items()),
            ("total", f"{plan.total / GIB:.1f}"), ("per GPU available", f"{plan.config.gpu_memory_gib:g}")]


def parse_memory(text: str) -> float:
    """'80GiB', '80', '24GB' (taken as GiB: cards are sold in those), '40G' -> GiB."""
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b").removesuffix("g")
    try:
        value = float(cleaned)
    except ValueError:
        raise UserError(f"--gpu-memory {text!r}: a number of GiB, e.g. 80GiB") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"--gpu-memory {text!r}: must be above 0")
    return value
