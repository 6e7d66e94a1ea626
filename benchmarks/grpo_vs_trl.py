"""llamakit rlhf --algo grpo against TRL's GRPOTrainer: same model, prompts, reward rule and settings, s/step.

    .venv/bin/python benchmarks/grpo_vs_trl.py                          # tiny random LLaMA, 8 prompts × K 4, 6 steps
    .venv/bin/python benchmarks/grpo_vs_trl.py --model smollm2-135m     # the real 135M model (much slower)
    .venv/bin/python benchmarks/grpo_vs_trl.py --together --threads 1   # both at once, one core each

Both sides: the same policy (default a tiny random LLaMA, hidden 128, 2 layers, SmolLM2 tokenizer; or --model), the
prompts of tests/fixtures/prompts-alpaca-32.jsonl as one user turn in the chat template, the same rule reward
(brevity: min(w/T, T/w) over the answer's w words, 0 for none), --prompts-per-step prompts × --group-size answers,
--max-new-tokens (stop at EOS), temperature 1, no top-p/top-k, group-normalised advantages (r − mean) / (std + 1e-4),
the clipped ratio loss (ε 0.2) averaged over all answer tokens of the batch (TRL's loss_type "dapo"), β·k3 KL in
the loss against the reference = the policy with its LoRA adapter off, 1 PPO epoch (num_iterations 1), one
minibatch and one optimizer step per generation batch, constant lr, Adam ε 1e-5, grad clip 1, LoRA r 16 α 32 on all
linear layers, fp32, no gradient checkpointing, CPU, no vLLM, no missing-EOS penalty, no reporting, no checkpoint
but the final save.

Each trainer runs in its own process (TRL from benchmarks/.peer-venv), one after the other by default, with
--threads torch threads. Timed, on both sides: one training step = generate the group answers, score them, the
reference and policy log-probs, advantages, the policy forward and backward and the optimizer step (llamakit's
`time/step`; TRL's on_step_begin -> on_step_end, which holds its _generate_and_score_completions); s/step = the
mean over steps 2..N (step 1 pays one-off warm-up). Model loading, prompt tokenization, the final save and
process start are outside. speedup = TRL s/step / llamakit s/step. Peak RSS = the child's own ru_maxrss.
Metric: the mean reward of the last --metric-steps steps' answers (llamakit objective/raw_scores, TRL reward).
Not matched: the prompt order (each side shuffles with its own seeded sampler) and the sampling RNG. Both take
log π_old from the update's own forward, detached (one iteration, one minibatch).
Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dpo_vs_trl import ensure_peer_extras, seconds_per_step, versions
from reward_vs_trl import cpu_seconds, peak_rss_mb, peer_python

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "tests" / "fixtures" / "prompts-alpaca-32.jsonl"
SETTINGS = ("steps", "prompts_per_step", "group_size", "max_new_tokens", "temperature", "beta", "cliprange",
            "learning_rate", "adam_eps", "max_grad_norm", "target_words", "lora_r", "lora_alpha", "metric_steps",
            "seed", "threads", "together")


def brevity(texts: list[str], target_words: int) -> list[float]:
    """The rule both sides score with: min(w/T, T/w) over the answer's w words, 0 for an empty answer."""
    out = []
    for text in texts:
        words = len(text.split())
        out.append(0.0 if words == 0 else min(words / target_words, target_words / words))
    return out


def load_prompts() -> list[str]:
    return [json.loads(line)["prompt"] for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]


def last_mean(values: list[float], n: int) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail)


# ---- children -----------------------------------------------------------------------------------------------

def run_llamakit(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from rlhf.config import PPOConfig
    from rlhf.trainer import train

    cfg = PPOConfig(policy=args.model_path, reward="benchmark:brevity", prompts=str(PROMPTS), out=args.out,
                    seed=args.seed, steps=args.steps, algo="grpo", group_size=args.group_size,
                    batch_size=args.prompts_per_step, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, ppo_epochs=1, num_minibatches=1, cliprange=args.cliprange,
                    missing_eos_penalty=0.0, kl_coef=args.beta, kl_in="loss", learning_rate=args.learning_rate,
                    adam_eps=args.adam_eps, weight_decay=0.0, max_grad_norm=args.max_grad_norm, lora=True,
                    lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_target="all-linear", sample_every=0,
                    overwrite=True)
    result = train(cfg, reward_fn=lambda prompts, responses, finish_reasons: brevity(responses, args.target_words))
    durations = [row["time/step"] for row in result.history]
    rewards = [row["objective/raw_scores"] for row in result.history]
    return {"s_per_step": seconds_per_step(durations), "step_seconds": durations, "steps": result.step,
            "rewards": rewards, "peak_rss_mb": peak_rss_mb(), "cpu_seconds": cpu_seconds(),
            "versions": versions()}


def run_trl(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging
    from trl import GRPOConfig, GRPOTrainer

    logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(args.model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in load_prompts()])
    peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                             target_modules="all-linear", task_type="CAUSAL_LM")

    def reward(prompts, completions, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return brevity(texts, args.target_words)

    begins: list[float] = []
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            begins.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    rollout = args.prompts_per_step * args.group_size
    # One generation batch = one optimizer step: batch = prompts × K answers, no accumulation, one iteration.
    config = GRPOConfig(output_dir=str(Path(args.out) / "trainer"), per_device_train_batch_size=rollout,
                        gradient_accumulation_steps=1, steps_per_generation=1, num_generations=args.group_size,
                        num_iterations=1, max_completion_length=args.max_new_tokens, temperature=args.temperature,
                        top_p=1.0, top_k=0, repetition_penalty=1.0, beta=args.beta, epsilon=args.cliprange,
                        loss_type="dapo", scale_rewards="group", mask_truncated_completions=False,
                        max_steps=args.steps, learning_rate=args.learning_rate, lr_scheduler_type="constant",
                        warmup_steps=0, adam_epsilon=args.adam_eps, weight_decay=0.0,
                        max_grad_norm=args.max_grad_norm, optim="adamw_torch", use_vllm=False,
                        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, report_to="none",
                        save_strategy="no", eval_strategy="no", logging_steps=1, log_completions=False,
                        seed=args.seed, disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[Clock()])
    output = trainer.train()
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    durations = [end - begin for begin, end in zip(begins, ends, strict=True)]
    trainer.model.merge_and_unload().save_pretrained(Path(args.out) / "policy", safe_serialization=True)
    return {"s_per_step": seconds_per_step(durations), "step_seconds": durations, "steps": output.global_step,
            "rewards": rewards, "peak_rss_mb": peak_rss_mb(), "cpu_seconds": cpu_seconds(),
            "versions": {"trl": trl.__version__, **versions()}}


# ---- parent -------------------------------------------------------------------------------------------------

def model_path(args, tmp: Path) -> str:
    """The tiny random LLaMA (hidden 128, 2 layers, SmolLM2 tokenizer) or the --model alias / directory."""
    sys.path.insert(0, str(ROOT))
    if args.model == "tiny":
        from tests.support.tiny_models import save_tiny_llama

        return str(save_tiny_llama(tmp / "tiny-llama", seed=args.seed, hidden=128, layers=2))
    from toolkit.models import resolve

    return str(resolve(args.model))


def child(python: str, kind: str, args, out: Path) -> subprocess.Popen:
    """Start one trainer in its own process (its own peak RSS); `finish` collects its JSON line."""
    cmd = [python, __file__, "--child", kind, "--out", str(out), "--model-path", args.model_path,
           *(f"--{name.replace('_', '-')}={getattr(args, name)}" for name in SETTINGS if name != "together")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    proc.started = time.perf_counter()  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, kind: str) -> dict:
    stdout, stderr = proc.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{kind} run failed ({proc.returncode}):\n{stderr[-4000:]}")
    result = json.loads(lines[-1])
    result["wall_seconds"] = round(time.perf_counter() - proc.started, 1)  # type: ignore[attr-defined]
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (random tiny LLaMA), a llamakit alias or a local HF dir")
    parser.add_argument("--steps", type=int, default=6, help="training steps (= optimizer steps), both sides")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4, help="answers per prompt (TRL num_generations)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.04, help="β of the k3 KL term in the loss")
    parser.add_argument("--cliprange", type=float, default=0.2)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--adam-eps", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--target-words", type=int, default=10, help="T of the brevity reward")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--metric-steps", type=int, default=3, help="the metric averages the last N steps")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per trainer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-python", default=None, help="a Python with trl, peft (default: .peer-venv)")
    parser.add_argument("--together", action="store_true",
                        help="run both trainers at the same time (use with --threads 1 on a 2-core machine)")
    parser.add_argument("--details", action="store_true", help="add per-step seconds and rewards to the JSON line")
    parser.add_argument("--child", choices=["llamakit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(run_llamakit(args) if args.child == "llamakit" else run_trl(args)))
        return

    trl_python = peer_python(args.trl_python)
    ensure_peer_extras(trl_python)
    with tempfile.TemporaryDirectory() as tmp:
        args.model_path = model_path(args, Path(tmp))
        mine_out, peer_out = Path(tmp) / "llamakit", Path(tmp) / "trl"
        if args.together:
            procs = [child(sys.executable, "llamakit", args, mine_out), child(trl_python, "trl", args, peer_out)]
            mine, peer = finish(procs[0], "llamakit"), finish(procs[1], "trl")
        else:
            mine = finish(child(sys.executable, "llamakit", args, mine_out), "llamakit")
            peer = finish(child(trl_python, "trl", args, peer_out), "trl")
    line = {
        "speedup": round(peer["s_per_step"] / mine["s_per_step"], 2),
        "llamakit_s_per_step": round(mine["s_per_step"], 3), "trl_s_per_step": round(peer["s_per_step"], 3),
        "llamakit_peak_rss_mb": round(mine["peak_rss_mb"], 1), "trl_peak_rss_mb": round(peer["peak_rss_mb"], 1),
        "metric": f"mean brevity reward of the last {args.metric_steps} steps",
        "llamakit_metric": round(last_mean(mine["rewards"], args.metric_steps), 4),
        "trl_metric": round(last_mean(peer["rewards"], args.metric_steps), 4),
        "llamakit_first_step_reward": round(mine["rewards"][0], 4),
        "trl_first_step_reward": round(peer["rewards"][0], 4),
        "steps_done": {"llamakit": mine["steps"], "trl": peer["steps"]},
        "wall_seconds": {"llamakit": mine["wall_seconds"], "trl": peer["wall_seconds"]},
        "cpu_seconds": {"llamakit": mine["cpu_seconds"], "trl": peer["cpu_seconds"]},
        "model": args.model, "prompts": PROMPTS.name,
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "versions": {"llamakit": mine["versions"], "trl": peer["versions"]},
    }
    if args.details:
        for key in ("step_seconds", "rewards"):
            line[key] = {"llamakit": [round(s, 4) for s in mine[key]], "trl": [round(s, 4) for s in peer[key]]}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
