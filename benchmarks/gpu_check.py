"""GPU check: PPO with LoRA in bfloat16 on randomly initialised LLaMA 1B and 7B, measured beside `llamakit plan`.

No weights are needed: each size is a LLaMA configuration (TinyLlama-1.1B's and Meta's LLaMA-7B's shapes, with
the embedded SmolLM2 tokenizer's vocabulary) initialised at random on the GPU and saved as a normal HF directory.
For each size: 3 PPO steps (`rlhf.trainer.train`, the code `llamakit rlhf` runs) with LoRA, bf16 and gradient
checkpointing on the rule reward, then the seconds per step, the rollout's tokens per second, the peak GPU memory
(torch.cuda.max_memory_allocated) and `llamakit plan`'s estimate of the same run. With more than one GPU and
DeepSpeed installed, one ZeRO-3 step of the 1B model on all of them (accelerate launch with
templates/accelerate/deepspeed-zero3.yaml).

Prints ONE JSON line. Without a CUDA device it says so in that line and exits 0; `--cpu-smoke` runs the same
code on a tiny LLaMA on the CPU (what the test runs, so this script cannot rot unseen).

    .venv/bin/python benchmarks/gpu_check.py            # on a machine with a GPU: under 8 min on one H200
    .venv/bin/python benchmarks/gpu_check.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ROOT / "tests" / "fixtures" / "prompts-alpaca-32.jsonl"
# (layers, hidden, intermediate, heads, kv heads): TinyLlama-1.1B and LLaMA-7B
SIZES = {"1b": (22, 2048, 5632, 32, 4), "7b": (32, 4096, 11008, 32, 32), "tiny": (2, 64, 128, 4, 4)}


def save_random_llama(size: str, out: Path, device: str) -> Path:
    """A LLaMA of `size` with random weights (bf16 on a GPU), the embedded tokenizer, as an HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from toolkit.models import load_tokenizer

    layers, hidden, intermediate, heads, kv_heads = SIZES[size]
    tokenizer = load_tokenizer("smollm2-135m")
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


def ppo_run(model_dir: Path, out: Path, args: argparse.Namespace, device: str) -> dict[str, Any]:
    import torch

    from rlhf.config import PPOConfig
    from rlhf.trainer import train
    from toolkit.plan import GIB, PlanConfig, estimate

    on_gpu = device == "cuda"
    cfg = PPOConfig(policy=str(model_dir), reward="rules:length", prompts=str(PROMPTS), out=str(out),
                    steps=args.steps, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                    max_prompt_tokens=args.max_prompt_tokens, truncate_prompts=True, lora=True, bf16=on_gpu,
                    gradient_checkpointing=True, ppo_epochs=1, num_minibatches=2, seed=0, overwrite=True)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - started
    rows = result.history
    rollout_tokens = sum(r["response/length_avg"] * args.batch_size for r in rows)
    plan = estimate(PlanConfig(stage="rlhf", model=str(model_dir), lora=True, bf16=on_gpu,
                               gradient_checkpointing=True, batch_size=args.batch_size,
                               max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                               reward_model="rules", framework_gib=0))
    measured = torch.cuda.max_memory_allocated() / GIB if on_gpu else None
    return {"seconds_per_step": round(sum(r["time/step"] for r in rows) / len(rows), 2),
            "rollout_tokens_per_s": round(rollout_tokens / sum(r["time/rollout"] for r in rows), 1),
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
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=128)
    parser.add_argument("--out", default=None, help="work directory (default: a temp dir)")
    args = parser.parse_args()

    import torch

    if args.cpu_smoke:
        device, sizes = "cpu", ["tiny"]
        args.steps, args.batch_size, args.max_new_tokens = 1, 2, 4
    elif not torch.cuda.is_available():
        print(json.dumps({"gpu": None, "skipped": "no CUDA device here: run this on a machine with a GPU"}))
        return
    else:
        device, sizes = "cuda", [s.strip() for s in args.sizes.split(",") if s.strip()]
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                              "gpus": torch.cuda.device_count() if device == "cuda" else 0,
                              "torch": torch.__version__}
    for size in sizes:
        model_dir = save_random_llama(size, work / f"llama-{size}", device)
        result[size] = ppo_run(model_dir, work / f"ppo-{size}", args, device)
        if device == "cuda":
            torch.cuda.empty_cache()
    deepspeed = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True).returncode == 0
    if device == "cuda" and result["gpus"] > 1 and deepspeed:
        result["zero3_1b"] = zero3_step(work / "llama-1b", work / "zero3", result["gpus"])
    else:
        result["zero3_1b"] = {"skipped": "needs more than one GPU and deepspeed (pip install 'llamakit[deepspeed]')"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
