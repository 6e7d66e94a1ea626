"""`llamakit plan`: memory per GPU of a training run before it runs, and the set-up that fits."""

from __future__ import annotations

import click

from toolkit.commands.params import FiniteFloat
from toolkit.config import config_option
from toolkit.plan import ALGOS, PRESETS, STAGES, ZERO_STAGES, PlanConfig

DEFAULTS = PlanConfig()


@click.command("plan")
@click.option("--stage", type=click.Choice(STAGES), default=DEFAULTS.stage, show_default=True)
@click.option("--model", default=DEFAULTS.model, show_default=True,
              help=f"{' | '.join(PRESETS)} or a model directory (its config.json is read; no weights needed).")
@click.option("--gpus", type=click.IntRange(1), default=DEFAULTS.gpus, show_default=True)
@click.option("--gpu-memory", default="80GiB", show_default=True, help="Memory of one GPU, e.g. 24GiB.")
@click.option("--lora/--no-lora", default=DEFAULTS.lora, show_default=True)
@click.option("--lora-r", type=click.IntRange(1), default=DEFAULTS.lora_r, show_default=True)
@click.option("--zero", type=click.Choice([str(z) for z in ZERO_STAGES]), default=str(DEFAULTS.zero),
              show_default=True, help="DeepSpeed ZeRO stage (templates/accelerate/deepspeed-zero{2,3}.yaml).")
@click.option("--offload", is_flag=True, help="ZeRO offload: optimizer states (ZeRO-3: weights too) in host memory.")
@click.option("--bf16/--no-bf16", default=DEFAULTS.bf16, show_default=True, help="16-bit weights and activations.")
@click.option("--gradient-checkpointing", is_flag=True, help="Keep only each layer's input for the backward.")
@click.option("--batch-size", type=click.IntRange(1), default=DEFAULTS.batch_size, show_default=True,
              help="Per GPU: sequences (sft) or pairs (train-reward, dpo) per micro-batch; prompts per rollout (rlhf).")
@click.option("--num-minibatches", type=click.IntRange(1), default=DEFAULTS.num_minibatches, show_default=True,
              help="rlhf: minibatches per update epoch, as rlhf's flag (its default 2); the backward holds one.")
@click.option("--gradient-accumulation-steps", type=click.IntRange(1),
              default=DEFAULTS.gradient_accumulation_steps, show_default=True,
              help="rlhf: micro-batches per minibatch, as rlhf's flag; the backward holds one.")
@click.option("--max-length", type=click.IntRange(1), default=DEFAULTS.max_length, show_default=True,
              help="Tokens per sequence (sft, train-reward, dpo).")
@click.option("--max-prompt-tokens", type=click.IntRange(1), default=DEFAULTS.max_prompt_tokens, show_default=True,
              help="rlhf: prompt tokens.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=DEFAULTS.max_new_tokens, show_default=True,
              help="rlhf: answer tokens.")
@click.option("--algo", type=click.Choice(ALGOS), default=DEFAULTS.algo, show_default=True, help="rlhf algorithm.")
@click.option("--group-size", type=click.IntRange(2), default=DEFAULTS.group_size, show_default=True,
              help="grpo / rloo: answers per prompt.")
@click.option("--critic", default=DEFAULTS.critic, show_default=True,
              help="rlhf ppo: value-head, or a critic model (preset or directory) trained beside the policy.")
@click.option("--reward-model", default=DEFAULTS.reward_model,
              help="rlhf: the reward model's size (preset or directory; default: the policy's), or rules (none).")
@click.option("--gather-for-generation/--no-gather-for-generation", default=DEFAULTS.gather_for_generation,
              show_default=True, help="rlhf under ZeRO-3: gather all weights to generate, or one layer at a time.")
@click.option("--framework-gib", type=FiniteFloat(0), default=DEFAULTS.framework_gib, show_default=True,
              help="Per-GPU overhead: CUDA context, allocator fragmentation, communication buffers.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate and the best fit as one JSON object.")
@config_option
def plan_cmd(gpu_memory: str, zero: str, as_json: bool, **settings) -> None:
    """Memory per GPU of a training run (parameters, gradients, optimizer states, activations, rollout KV cache,
    reference / reward / critic copies), whether it fits, and the set-up and launch command that fits best.
    Estimated from counts of numbers (sources in toolkit/plan.py); nothing is loaded or run."""
    from toolkit.console import console, emit_json, summary_table
    from toolkit.plan import best_fit, estimate, launch_command, parse_memory, rows_gib

    cfg = PlanConfig(gpu_memory_gib=parse_memory(gpu_memory), zero=int(zero), **settings)
    plan = estimate(cfg)
    best = plan if plan.fits else best_fit(cfg)
    if as_json:
        emit_json({**plan.as_dict(), "launch": launch_command(plan),
                   "best_fit": None if best is None else {**best.as_dict(), "launch": launch_command(best)}})
        return
    summary_table(f"{cfg.stage} {plan.shape.name}, GiB per GPU", rows_gib(plan))
    console.print(f"{'fits' if plan.fits else 'does NOT fit'} in {cfg.gpu_memory_gib:g} GiB per GPU: "
               f"{launch_command(plan)}", soft_wrap=True)
    if not plan.fits:
        if best is None:
            console.print(f"nothing fits on {cfg.gpus} GPU(s) of {cfg.gpu_memory_gib:g} GiB, even with LoRA and ZeRO-3 "
                       "offload: more GPUs, --gradient-checkpointing, a smaller --batch-size or shorter sequences",
                          soft_wrap=True)
        else:
            console.print(f"fits: {best.total / 2**30:.1f} GiB with {launch_command(best)}", soft_wrap=True)


COMMANDS = [plan_cmd]
