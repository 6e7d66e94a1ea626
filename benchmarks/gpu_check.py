"""GPU check: PPO, GRPO and DPO with LoRA in bfloat16 on randomly initialised LLaMA 1B and 7B, beside `llamakit plan`.

No weights are needed: each size is a LLaMA configuration (TinyLlama-1.1B's and Meta's LLaMA-7B's shapes, with
the embedded SmolLM2 tokenizer's vocabulary) initialised at random on the GPU and saved as a normal HF directory.
For each size and method: 3 steps with LoRA and bf16 of PPO and GRPO (`rlhf.trainer.train`, the code `llamakit
rlhf` runs; gradient checkpointing, the length rule as reward) and of DPO (`toolkit.dpo.train_dpo`, the code of
`llamakit dpo`, on HH pairs), then the seconds per step, the rollout's tokens per second (PPO, GRPO), the peak GPU
memory (torch.cuda.max_memory_allocated) and `llamakit plan`'s estimate of the same run. With more than one GPU and
DeepSpeed installed, one ZeRO-3 step of the 1B model on all of them (accelerate launch with
templates/accelerate/deepspeed-zero3.yaml).

Prints ONE JSON line. Without a CUDA device it says so in that line and exits 0; `--cpu-smoke` runs the same
code on a tiny LLaMA on the CPU (what the test runs, so this script cannot rot unseen).

    .venv/bin/python benchmarks/gpu_check.py            # on a machine with a GPU: under 8 min on one H200
    .venv/bin/python benchmarks/gpu_check.py --cpu-smoke

`--tokenizer DIR` takes the tokenizer from a directory instead of the embedded SmolLM2 package (a machine without
it needs only the tokenizer files); `--json-out FILE` also writes the line after each run, so a run cut short
keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ROOT / "tests" / "fixtures" / "prompts-alpaca-32.jsonl"
PAIRS = ROOT / "tests" / "fixtures" / "hh-harmless-200.jsonl"
METHODS = ("ppo", "grpo", "dpo")
MINIBATCHES = 2  # per PPO / GRPO epoch
# (layers, hidden, intermediate, heads, kv heads): TinyLlama-1.1B and LLaMA-7B
SIZES = {"1b": (22, 2048, 5632, 32, 4), "7b": (32, 4096, 11008, 32, 32), "tiny": (2, 64, 128, 4, 4)}


def save_random_llama(size: str, out: Path, device: str, tokenizer_name: str = "smollm2-135m") -> Path:
    """A LLaMA of `size` with random weights (bf16 on a GPU), the embedded tokenizer, as an HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from toolkit.models import load_tokenizer

    layers, hidden, intermediate, heads, kv_heads = SIZES[size]
    tokenizer = load_tokenizer(tokenizer_name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    return out


def rl_run(model_dir: Path, out: Path, args: argparse.Namespace, device: str, algo: str) -> dict[str, Any]:
    """`algo` (ppo | grpo) for args.steps steps; GRPO samples args.group_size answers to each of the prompts."""

    from rlhf.config import PPOConfig
    from rlhf.trainer import train
    from toolkit.plan import PlanConfig

    on_gpu = device == "cuda"
    group = args.group_size if algo != "ppo" else 1
    prompts = max(1, args.batch_size // group)  # the same rollouts per step for every algorithm
    cfg = PPOConfig(policy=str(model_dir), reward="rules:length", prompts=str(PROMPTS), out=str(out), algo=algo,
                    group_size=args.group_size, steps=args.steps, batch_size=prompts,
                    max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                    truncate_prompts=True, lora=True, bf16=on_gpu, gradient_checkpointing=True, ppo_epochs=1,
                    num_minibatches=MINIBATCHES, seed=0, overwrite=True)
    started = _reset_peak(on_gpu)
    rows = train(cfg).history
    seconds = time.perf_counter() - started
    rollout_tokens = sum(r["response/length_avg"] * prompts * group for r in rows)
    plan = PlanConfig(stage="rlhf", model=str(model_dir), lora=True, bf16=on_gpu, gradient_checkpointing=True,
                      batch_size=prompts, num_minibatches=MINIBATCHES, max_prompt_tokens=args.max_prompt_tokens,
                      max_new_tokens=args.max_new_tokens, algo=algo, group_size=args.group_size,
                      reward_model="rules", framework_gib=0)
    return {**_measured(rows, plan, on_gpu, seconds),
            "rollout_tokens_per_s": round(rollout_tokens / sum(r["time/rollout"] for r in rows), 1)}


def dpo_run(model_dir: Path, out: Path, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """`llamakit dpo` for args.steps steps on HH pairs (batch args.batch_size // 2 pairs, max length 512)."""
    from toolkit.dpo import DPOConfig, train_dpo
    from toolkit.plan import PlanConfig

    on_gpu = device == "cuda"
    pairs = max(1, args.batch_size // 2)
    max_length = 512 if on_gpu else 128
    cfg = DPOConfig(data=str(PAIRS), policy=str(model_dir), out=str(out), lora=True, bf16=on_gpu,
                    batch_size=pairs, max_length=max_length, max_prompt_length=max_length // 2,
                    max_steps=args.steps, seed=0, overwrite=True)
    started = _reset_peak(on_gpu)
    rows = train_dpo(cfg).history
    seconds = time.perf_counter() - started
    plan = PlanConfig(stage="dpo", model=str(model_dir), lora=True, bf16=on_gpu, batch_size=pairs,
                      max_length=max_length, framework_gib=0)
    return {**_measured(rows, plan, on_gpu, seconds), "loss_last": round(rows[-1]["loss"], 4)}


def _reset_peak(on_gpu: bool) -> float:
    """Start a run's peak afresh: the previous run's model can sit in a reference cycle until the garbage
    collector runs (on the H200, 1.7 GiB of the 1B PPO run was still counted in the GRPO run after it)."""
    import torch

    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return time.perf_counter()


def _measured(rows: list[dict[str, Any]], plan_config: Any, on_gpu: bool, seconds: float) -> dict[str, Any]:
    import torch

    from toolkit.plan import GIB, estimate

    plan = estimate(plan_config)
    measured = torch.cuda.max_memory_allocated() / GIB if on_gpu else None
    return {"seconds_per_step": round(sum(r["time/step"] for r in rows) / len(rows), 2),
            "peak_gpu_gib": None if measured is None else round(measured, 2),
            "plan_estimate_gib": round(plan.total / GIB, 2),
            "plan_vs_measured": None if measured is None else round(plan.total / GIB / measured, 3),
            "steps": len(rows), "seconds_total": round(seconds, 1)}


def zero3_step(model_dir: Path, out: Path, gpus: int) -> dict[str, Any]:
    """One PPO step of `model_dir` under DeepSpeed ZeRO-3 on every GPU, through the CLI."""
    command = ["accelerate", "launch", "--config_file", str(ROOT / "templates/accelerate/deepspeed-zero3.yaml"),
               "--num_processes", str(gpus), "-m", "toolkit", "rlhf", "--policy", str(model_dir), "--reward",
               "rules:length", "--prompts", str(PROMPTS), "--out", str(out), "--steps", "1", "--batch-size", "4",
               "--max-new-tokens", "64", "--lora", "--bf16", "--overwrite", "--json"]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    return {"ok": proc.returncode == 0, "seconds": round(time.perf_counter() - started, 1),
            "error": None if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="the tiny LLaMA on the CPU (tests)")
    parser.add_argument("--sizes", default="1b,7b", help="comma list of: " + ", ".join(SIZES))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of: " + ", ".join(METHODS))
    parser.add_argument("--group-size", type=int, default=4, help="GRPO answers per prompt")
    parser.add_argument("--tokenizer", default="smollm2-135m", help="tokenizer alias or directory")
    parser.add_argument("--json-out", default=None, help="also write the JSON line here after every run")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=128)
    parser.add_argument("--out", default=None, help="work directory (default: a temp dir)")
    args = parser.parse_args()

    import torch

    if args.cpu_smoke:
        device, sizes = "cpu", ["tiny"]
        args.steps, args.batch_size, args.max_new_tokens, args.group_size = 1, 4, 4, 2
    elif not torch.cuda.is_available():
        print(json.dumps({"gpu": None, "skipped": "no CUDA device here: run this on a machine with a GPU"}))
        return
    else:
        device, sizes = "cuda", [s.strip() for s in args.sizes.split(",") if s.strip()]
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                              "gpus": torch.cuda.device_count() if device == "cuda" else 0,
                              "torch": torch.__version__}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for size in sizes:
        model_dir = save_random_llama(size, work / f"llama-{size}", device, args.tokenizer)
        result[size] = {}
        for method in methods:
            run_dir = work / f"{method}-{size}"
            result[size][method] = (dpo_run(model_dir, run_dir, args, device) if method == "dpo"
                                    else rl_run(model_dir, run_dir, args, device, method))
            _write(result, args.json_out)
            if device == "cuda":  # a 7B policy is 13.5 GB: four of them would fill a 64 GB disk
                shutil.rmtree(run_dir, ignore_errors=True)
    deepspeed = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True).returncode == 0
    if device == "cuda" and result["gpus"] > 1 and deepspeed:
        result["zero3_1b"] = zero3_step(work / "llama-1b", work / "zero3", result["gpus"])
    else:
        result["zero3_1b"] = {"skipped": "needs more than one GPU and deepspeed (pip install 'llamakit[deepspeed]')"}
    _write(result, args.json_out)
    print(json.dumps(result))


def _write(result: dict[str, Any], path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
