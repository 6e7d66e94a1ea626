"""Learning check: does `llamakit rlhf` teach the embedded SmolLM2-135M a simple rule on a CPU?

The reward asks for brief answers: 1.0 at `--target-words` words, falling off as min(w/t, t/w), and
the trainer subtracts `missing_eos_penalty` from answers that hit the token budget without EOS.
SmolLM2 tends to answer at length, so the reward starts low and is learnable in a few dozen steps.

Prints ONE JSON line: {"reward_start", "reward_end", "kl_end", "steps", "seconds", ...}
(reward_* = mean of objective/scores, the score PPO maximises: brevity minus the no-EOS penalty, over
the first / last 5 steps; brevity_* = the rule alone; kl_end = objective/kl (k1, TRL's estimate) of
the last step; kl_k3_* = the k3 estimate of the same KL, never negative, lower variance).

Defaults: β = 0.2 instead of the loop's 0.05. The brevity gain is worth about 1 (the no-EOS penalty)
+ 0.5, so with β = 0.05 PPO may spend up to ~30 nats of KL on it, and did (KL 10.5 and rising after
20 steps); with β = 0.2 the KL the reward can pay for is ~5-7 nats, so the KL levels off.

    .venv/bin/python benchmarks/ppo_learning.py            # 20 steps, ~15-20 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARED_ALPACA = ROOT.parent / "shared" / "data" / "alpaca-5000.json"
FIXTURE_PROMPTS = ROOT / "tests" / "fixtures" / "prompts-alpaca-32.jsonl"


def brevity(target_words: int):
    def score(prompts, responses, finish_reasons):
        out = []
        for response in responses:
            words = len(response.split())
            out.append(0.0 if words == 0 else min(words / target_words, target_words / words))
        return out

    return score


def write_prompts(path: Path, n: int) -> Path:
    """Short Alpaca instructions without inputs (from ../shared when present, else the test fixture)."""
    if not SHARED_ALPACA.is_file():
        return FIXTURE_PROMPTS
    rows = json.loads(SHARED_ALPACA.read_text())
    picked = [r["instruction"] for r in rows if not r["input"] and len(r["instruction"]) < 100][:n]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in picked))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--target-words", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--kl-coef", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default); on a "
                        "shared, busy machine 1 thread avoids OpenMP oversubscription")
    parser.add_argument("--out", default=None, help="keep the run here (default: a temp dir)")
    parser.add_argument("--curves", default="", help="also copy the run's curves PNG here (docs/ppo-learning.png)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from rlhf.config import PPOConfig
    from rlhf.trainer import train

    work = Path(tempfile.mkdtemp(prefix="ppo-learning-"))
    out = Path(args.out) if args.out else work / "run"
    cfg = PPOConfig(policy=args.policy, reward=f"custom:brevity-{args.target_words}-words",
                    prompts=str(write_prompts(work / "p.jsonl", 512)),
                    out=str(out), steps=args.steps, batch_size=args.batch_size, num_minibatches=2, ppo_epochs=4,
                    max_new_tokens=args.max_new_tokens, max_prompt_tokens=128, truncate_prompts=True,
                    temperature=1.0, lora=True, lora_r=16, lora_alpha=32, learning_rate=args.learning_rate,
                    kl_coef=args.kl_coef, missing_eos_penalty=1.0, sample_every=5, seed=0)
    t0 = time.perf_counter()
    result = train(cfg, reward_fn=brevity(args.target_words))
    seconds = time.perf_counter() - t0
    rows = result.history
    if args.curves:
        shutil.copyfile(out / "curves.png", args.curves)

    def mean(key: str, part: list[dict]) -> float:
        return round(sum(r[key] for r in part) / len(part), 4)

    first, last = rows[:5], rows[-5:]
    kls = [r["objective/kl"] for r in rows]
    print(json.dumps({
        "reward_start": mean("objective/scores", first), "reward_end": mean("objective/scores", last),
        "kl_end": round(kls[-1], 4), "steps": len(rows), "seconds": round(seconds, 1),
        "brevity_start": mean("objective/raw_scores", first), "brevity_end": mean("objective/raw_scores", last),
        "eos_start": mean("val/num_eos_tokens", first), "eos_end": mean("val/num_eos_tokens", last),
        "length_start": mean("response/length_avg", first), "length_end": mean("response/length_avg", last),
        "kl_min": round(min(kls), 4), "kl_max": round(max(kls), 4),
        "kl_k3_end": round(rows[-1]["objective/kl_k3"], 4),
        "kl_k3_max": round(max(r["objective/kl_k3"] for r in rows), 4), "kl_coef": args.kl_coef,
        "learning_rate": args.learning_rate,
        "s_per_step": round(seconds / len(rows), 2), "policy": args.policy, "threads": args.threads or "default",
        "out": str(out),
    }))


if __name__ == "__main__":
    main()
