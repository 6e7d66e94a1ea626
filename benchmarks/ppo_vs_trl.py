"""Seconds per PPO step and peak memory: llamakit `rlhf` vs TRL's PPOTrainer, same configuration.

Both sides, each in its own process (TRL in benchmarks/.peer-venv, built from requirements-trl.txt
when missing): the same tiny LLaMA policy (hidden 128, 2 layers, SmolLM2 tokenizer), the same tiny
LLaMA reward model (sequence classification, read at the last token), the same 32 prompts in the
chat template, batch 8, 32 new tokens (stop at EOS), 4 PPO epochs × 2 minibatches, k1 KL β=0.05,
missing-EOS penalty 1, temperature 1, lr 1e-5. TRL uses its own design: policy + reference copy +
reward model + a separate value model; llamakit: policy with a value head + reference copy + reward.

s/step is the mean over steps 2..N (the first step pays one-off warm-up on both sides); peak RSS is
the child process's ru_maxrss. Prints ONE JSON line:
{"llamakit_s_per_step", "trl_s_per_step", "speedup", "llamakit_peak_rss_mb", "trl_peak_rss_mb", ...}

    .venv/bin/python benchmarks/ppo_vs_trl.py [--steps 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / "benchmarks" / ".peer-venv"
REQUIREMENTS = ROOT / "benchmarks" / "requirements-trl.txt"
PROMPTS = ROOT / "tests" / "fixtures" / "prompts-alpaca-32.jsonl"
SETTINGS = dict(batch_size=8, response_length=32, ppo_epochs=4, num_minibatches=2, kl_coef=0.05,
                missing_eos_penalty=1.0, temperature=1.0, learning_rate=1e-5, seed=0)


# ---- parent -----------------------------------------------------------------------------------------------

def build_models(work: Path) -> tuple[Path, Path]:
    """The tiny policy and a tiny reward model (same tokenizer, its own random init)."""
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import LlamaForSequenceClassification

    from tests.support.tiny_models import save_tiny_llama, tiny_llama_config
    from toolkit.models import load_tokenizer

    policy = save_tiny_llama(work / "policy", seed=0, hidden=128, layers=2)
    tokenizer = load_tokenizer(policy)
    torch.manual_seed(1)
    config = tiny_llama_config(len(tokenizer), hidden=128, layers=2, num_labels=1,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.bos_token_id)
    reward = work / "reward"
    LlamaForSequenceClassification(config).save_pretrained(reward, safe_serialization=True)
    tokenizer.save_pretrained(reward)
    return policy, reward


def ensure_peer_env() -> Path:
    python = PEER / "bin" / "python"
    probe = [str(python), "-c", "import trl.experimental.ppo"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(PEER)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True)
    return python


def run_child(python: Path, side: str, args: argparse.Namespace, policy: Path, reward: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or os.cpu_count()), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    cmd = [str(python), __file__, "--child", side, "--policy", str(policy), "--reward", str(reward),
           "--steps", str(args.steps), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{side} child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per child (0 = all cores)")
    parser.add_argument("--child", choices=("llamakit", "trl"), default=None)
    parser.add_argument("--policy")
    parser.add_argument("--reward")
    args = parser.parse_args()
    if args.child:
        result = child_llamakit(args) if args.child == "llamakit" else child_trl(args)
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="ppo-vs-trl-"))
    peer_python = ensure_peer_env()
    policy, reward = build_models(work)
    ours = run_child(Path(sys.executable), "llamakit", args, policy, reward)
    theirs = run_child(peer_python, "trl", args, policy, reward)
    print(json.dumps({
        "llamakit_s_per_step": ours["s_per_step"], "trl_s_per_step": theirs["s_per_step"],
        "speedup": round(theirs["s_per_step"] / ours["s_per_step"], 2),
        "llamakit_peak_rss_mb": ours["peak_rss_mb"], "trl_peak_rss_mb": theirs["peak_rss_mb"],
        "steps": args.steps, "threads": args.threads or os.cpu_count(),
        "llamakit_kl": ours["kl"], "trl_kl": theirs["kl"], "trl_version": theirs["version"],
    }))


def _step_seconds(stamps: list[float], start: float) -> float:
    durations = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    later = durations[1:] or durations
    return round(sum(later) / len(later), 3)


def _threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


# ---- llamakit child ----------------------------------------------------------------------------------------

def child_llamakit(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT))
    _threads(args)
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhf.config import PPOConfig
    from rlhf.trainer import train
    from toolkit.chat_format import encode_chat
    from toolkit.models import load_tokenizer

    tokenizer = load_tokenizer(args.reward)
    rm = AutoModelForSequenceClassification.from_pretrained(args.reward, dtype=torch.float32).eval()

    @torch.no_grad()
    def reward_fn(prompts, responses, finish_reasons):
        ids = [encode_chat(tokenizer, [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                           add_generation_prompt=False) for p, r in zip(prompts, responses, strict=True)]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):  # right padding: the score is read at the last real token
            input_ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        hidden = rm.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        last = mask.sum(1) - 1
        return rm.score(hidden[torch.arange(len(ids)), last]).squeeze(-1).tolist()

    s = SETTINGS
    cfg = PPOConfig(policy=args.policy, reward="benchmark:tiny-llama-rm", prompts=str(PROMPTS),
                    out=str(Path(tempfile.mkdtemp()) / "run"), steps=args.steps, batch_size=s["batch_size"],
                    max_new_tokens=s["response_length"], ppo_epochs=s["ppo_epochs"],
                    num_minibatches=s["num_minibatches"], kl_coef=s["kl_coef"],
                    missing_eos_penalty=s["missing_eos_penalty"], temperature=s["temperature"],
                    learning_rate=s["learning_rate"], seed=s["seed"], sample_every=0)
    stamps: list[float] = []
    start = time.perf_counter()
    result = train(cfg, reward_fn=reward_fn, on_step=lambda row: stamps.append(time.perf_counter()))
    return {"s_per_step": _step_seconds(stamps, start), "kl": [round(r["objective/kl"], 4) for r in result.history]}


# ---- TRL child (runs in the peer venv: imports nothing from llamakit) ----------------------------------------

def child_trl(args: argparse.Namespace) -> dict:
    _threads(args)
    import torch
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    s = SETTINGS
    torch.manual_seed(s["seed"])
    tokenizer = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()]
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
           for p in prompts]
    ids = [list(i["input_ids"]) if hasattr(i, "keys") else list(i) for i in ids]  # BatchEncoding in transformers 5
    dataset = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, dtype=torch.float32)
    config = PPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=1,
        num_mini_batches=s["num_minibatches"], num_ppo_epochs=s["ppo_epochs"], response_length=s["response_length"],
        total_episodes=s["batch_size"] * args.steps, local_rollout_forward_batch_size=s["batch_size"],
        stop_token="eos", missing_eos_penalty=s["missing_eos_penalty"], kl_coef=s["kl_coef"], kl_estimator="k1",
        temperature=s["temperature"], learning_rate=s["learning_rate"], num_sample_generations=0,
        report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, bf16=False, fp16=False,
        seed=s["seed"], disable_tqdm=True)
    stamps: list[float] = []
    kls: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "objective/kl" in logs:
                kls.append(round(float(logs["objective/kl"]), 4))

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=dataset, callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    if not stamps:
        raise SystemExit("TRL ran no step")
    return {"s_per_step": _step_seconds(stamps, start), "kl": kls, "version": trl.__version__}


if __name__ == "__main__":
    main()
