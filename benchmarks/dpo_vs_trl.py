"""llamakit dpo against TRL's DPOTrainer: same model, pairs and settings, seconds per optimizer step.

    .venv/bin/python benchmarks/dpo_vs_trl.py                          # defaults: 64 pairs, 8 steps, LoRA r 16
    .venv/bin/python benchmarks/dpo_vs_trl.py --no-lora --steps 4      # full fine-tune, frozen reference copy
    .venv/bin/python benchmarks/dpo_vs_trl.py --together --threads 1   # both at once, one core each

Data: the HH pairs whose prompt fits --max-prompt-length and whose prompt + answer fits --max-length (so neither
side truncates, as TRL has no max prompt length), in file order: the first --train-pairs train, the next
--heldout-pairs are held out. Both read the same file, in TRL's conversational format with an explicit prompt.

Each trainer runs in its own process (TRL from benchmarks/.peer-venv, built from requirements-trl.txt on first
use), one after the other by default, with --threads torch threads, fp32, no gradient checkpointing, no eval and
no checkpoint during training, the reference = the policy with its LoRA adapter off (or a frozen copy without
LoRA), not precomputed. Timed, on both sides: one optimizer step = the reference forward, the policy forward and
backward, clipping and the optimizer and scheduler step (llamakit's `time/step`, which also collates the batch;
TRL's on_step_begin -> on_step_end, its collation comes before); s/step = the mean over steps 2..N (step 1 pays
one-off warm-up). Model loading, tokenization, the final save and process start are outside on both sides.
speedup = TRL s/step / llamakit s/step. Peak RSS = the child's own ru_maxrss.
The metric is held-out rewards/accuracies (chosen reward > rejected reward, reward = β·(log π − log π_ref)),
computed in this parent process by one function, llamakit's tokenization and log-probs, on both saved policies.
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

from reward_vs_trl import cpu_seconds, peak_rss_mb, peer_python

ROOT = Path(__file__).resolve().parent.parent
HH_DATA = ROOT.parent / "shared" / "data" / "hh-harmless-dev.jsonl"
FIXTURE = ROOT / "tests" / "fixtures" / "hh-harmless-200.jsonl"
# What TRL needs beyond its own requirements here (LoRA: peft; GRPOTrainer's vLLM client module: requests), also in
# requirements-trl.txt now: a peer venv built before they were listed gets them here, once.
PEER_EXTRAS = {"peft": "peft==0.21.2", "requests": "requests==2.34.2"}
SETTINGS = ("train_pairs", "heldout_pairs", "steps", "batch_size", "max_length", "max_prompt_length",
            "learning_rate", "warmup_ratio", "beta", "lora", "lora_r", "lora_alpha", "seed", "threads", "together")


def seconds_per_step(durations: list[float]) -> float:
    """Mean seconds of steps 2..N (step 1 pays one-off warm-up), or of the one step there is."""
    later = durations[1:] or durations
    return sum(later) / len(later)


def conversational_row(prompt: list[dict[str, str]], chosen: str, rejected: str) -> dict:
    """A pair in TRL's conversational format with an explicit prompt (llamakit reads it too)."""
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


# ---- children -----------------------------------------------------------------------------------------------

def run_llamakit(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from toolkit.dpo import DPOConfig, train_dpo

    cfg = DPOConfig(data=args.train, policy=args.model_path, out=args.out, beta=args.beta, max_steps=args.steps,
                    batch_size=args.batch_size, learning_rate=args.learning_rate, warmup_ratio=args.warmup_ratio,
                    max_length=args.max_length, max_prompt_length=args.max_prompt_length, lora=args.lora,
                    lora_r=args.lora_r, lora_alpha=args.lora_alpha, seed=args.seed, overwrite=True)
    result = train_dpo(cfg)
    durations = [row["time/step"] for row in result.history]
    return {"s_per_step": seconds_per_step(durations), "step_seconds": durations, "steps": result.steps,
            "pairs": result.data_stats["pairs"], "train_loss_last": result.history[-1]["loss"],
            "policy": str(result.policy_dir), "peak_rss_mb": peak_rss_mb(), "cpu_seconds": cpu_seconds(),
            "versions": versions()}


def run_trl(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging
    from trl import DPOConfig, DPOTrainer

    logging.set_verbosity_error()
    rows = [json.loads(line) for line in Path(args.train).read_text(encoding="utf-8").splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    ref_model, peft_config = None, None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    else:
        ref_model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    begins: list[float] = []
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            begins.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    config = DPOConfig(output_dir=str(Path(args.out) / "trainer"), per_device_train_batch_size=args.batch_size,
                       gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.learning_rate,
                       lr_scheduler_type="linear", warmup_steps=int(args.warmup_ratio * args.steps),
                       weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", beta=args.beta,
                       loss_type=["sigmoid"], label_smoothing=0.0, max_length=args.max_length,
                       precompute_ref_log_probs=False, gradient_checkpointing=False, bf16=False, fp16=False,
                       use_cpu=True, report_to="none", eval_strategy="no", save_strategy="no", logging_steps=1,
                       seed=args.seed, disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(rows), peft_config=peft_config,
                         callbacks=[Clock()])
    kept = len(trainer.train_dataset)
    output = trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    durations = [end - begin for begin, end in zip(begins, ends, strict=True)]
    policy = trainer.model.merge_and_unload() if args.lora else trainer.model
    policy.save_pretrained(Path(args.out) / "policy", safe_serialization=True)
    tokenizer.save_pretrained(Path(args.out) / "policy")
    return {"s_per_step": seconds_per_step(durations), "step_seconds": durations, "steps": output.global_step,
            "pairs": kept, "train_loss_last": losses[-1], "policy": str(Path(args.out) / "policy"),
            "peak_rss_mb": peak_rss_mb(), "cpu_seconds": cpu_seconds(), "versions": {"trl": trl.__version__,
                                                                                      **versions()}}


# ---- parent -------------------------------------------------------------------------------------------------

def ensure_peer_extras(python: str) -> None:
    """Install the PEER_EXTRAS a peer venv lacks (once)."""
    missing = [pin for module, pin in PEER_EXTRAS.items()
               if subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode != 0]
    if missing:
        print(f"installing {' '.join(missing)} into the peer venv (once) ...", file=sys.stderr)
        subprocess.run([python, "-m", "pip", "install", "-q", *missing], check=True)


def prepare(args, tmp: Path) -> tuple[Path, Path, dict]:
    """The first --train-pairs and the next --heldout-pairs HH pairs that fit without truncation, as two files."""
    from toolkit.dpo import encode_answer, prompt_messages
    from toolkit.models import load_tokenizer
    from toolkit.reward.data import load_preferences

    pairs = load_preferences(args.data).pairs
    tokenizer = load_tokenizer(args.model_path)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    wanted = args.train_pairs + args.heldout_pairs
    rows = []
    for pair in pairs:
        if pair.rejected_prompt is not None or not (pair.chosen.strip() and pair.rejected.strip()):
            continue  # no shared prompt (the dialogues differ before the answer), or an empty answer
        messages = prompt_messages(pair.prompt)
        sides = [encode_answer(tokenizer, messages, answer, eos) for answer in (pair.chosen, pair.rejected)]
        # TRL scores one token more than llamakit (the template's newline after the end-of-turn token).
        if all(len(p) <= args.max_prompt_length and len(p) + len(a) + 1 <= args.max_length for p, a in sides):
            rows.append(conversational_row(messages, pair.chosen, pair.rejected))
            if len(rows) == wanted:
                break
    if len(rows) < wanted:
        sys.exit(f"only {len(rows)} pairs of {args.data} fit --max-length {args.max_length} and "
                 f"--max-prompt-length {args.max_prompt_length}; {wanted} wanted")
    files = {"train": tmp / "train.jsonl", "heldout": tmp / "heldout.jsonl"}
    for name, part in (("train", rows[:args.train_pairs]), ("heldout", rows[args.train_pairs:])):
        files[name].write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return files["train"], files["heldout"], {"file": str(args.data), "pairs_in_file": len(pairs)}


def heldout_accuracy(policy_dirs: list[str], args, heldout: Path) -> list[dict[str, float]]:
    """rewards/accuracies and rewards/margins of each saved policy on the held-out pairs: one function for both
    sides (llamakit's tokenization and log-probs, the base model as the reference, computed once)."""
    import torch

    from toolkit.dpo import collate, concatenated_logps, dpo_loss, load_pairs
    from toolkit.generation import pad_token_id
    from toolkit.models import load_causal_lm

    torch.set_num_threads(args.threads)
    reference, tokenizer = load_causal_lm(args.model_path)
    pairs, _ = load_pairs(str(heldout), tokenizer, args.max_length, args.max_prompt_length)
    pad_id = pad_token_id(tokenizer)
    batches = [collate(pairs[i:i + args.batch_size], pad_id) for i in range(0, len(pairs), args.batch_size)]
    with torch.inference_mode():
        ref = [concatenated_logps(reference, batch) for batch in batches]
        del reference
        results = []
        for policy_dir in policy_dirs:
            policy = load_causal_lm(policy_dir)[0]
            metrics = [dpo_loss(*concatenated_logps(policy, batch), *r, args.beta) for batch, r in zip(batches, ref,
                                                                                                      strict=True)]
            results.append({k: float(torch.cat([m[k] for m in metrics]).mean())
                            for k in ("rewards/accuracies", "rewards/margins")})
    return results


def child(python: str, kind: str, args, train: Path, out: Path) -> subprocess.Popen:
    """Start one trainer in its own process (its own peak RSS); `finish` collects its JSON line."""
    cmd = [python, __file__, "--child", kind, "--train", str(train), "--out", str(out),
           "--model-path", args.model_path, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--max-prompt-length", str(args.max_prompt_length),
           "--learning-rate", str(args.learning_rate), "--warmup-ratio", str(args.warmup_ratio),
           "--beta", str(args.beta), "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha),
           "--threads", str(args.threads), "--seed", str(args.seed), "--lora" if args.lora else "--no-lora"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
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
    parser.add_argument("--data", default=str(HH_DATA if HH_DATA.is_file() else FIXTURE))
    parser.add_argument("--model", default="smollm2-135m", help="llamakit alias or local HF dir")
    parser.add_argument("--train-pairs", type=int, default=64)
    parser.add_argument("--heldout-pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps, both sides")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per trainer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-python", default=None, help="a Python with trl, peft (default: .peer-venv)")
    parser.add_argument("--together", action="store_true",
                        help="run both trainers at the same time (use with --threads 1 on a 2-core machine)")
    parser.add_argument("--details", action="store_true", help="add both runs' per-step seconds to the JSON line")
    parser.add_argument("--child", choices=["llamakit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(run_llamakit(args) if args.child == "llamakit" else run_trl(args)))
        return

    from toolkit.models import resolve

    args.model_path = str(resolve(args.model))
    trl_python = peer_python(args.trl_python)
    ensure_peer_extras(trl_python)
    with tempfile.TemporaryDirectory() as tmp:
        train, heldout, data = prepare(args, Path(tmp))
        mine_out, peer_out = Path(tmp) / "llamakit", Path(tmp) / "trl"
        if args.together:
            procs = [child(sys.executable, "llamakit", args, train, mine_out),
                     child(trl_python, "trl", args, train, peer_out)]
            mine, peer = finish(procs[0], "llamakit"), finish(procs[1], "trl")
        else:
            mine = finish(child(sys.executable, "llamakit", args, train, mine_out), "llamakit")
            peer = finish(child(trl_python, "trl", args, train, peer_out), "trl")
        mine_eval, peer_eval = heldout_accuracy([mine["policy"], peer["policy"]], args, heldout)
    line = {
        "speedup": round(peer["s_per_step"] / mine["s_per_step"], 2),
        "llamakit_s_per_step": round(mine["s_per_step"], 3), "trl_s_per_step": round(peer["s_per_step"], 3),
        "llamakit_peak_rss_mb": round(mine["peak_rss_mb"], 1), "trl_peak_rss_mb": round(peer["peak_rss_mb"], 1),
        "metric": "heldout rewards/accuracies",
        "llamakit_metric": round(mine_eval["rewards/accuracies"], 4),
        "trl_metric": round(peer_eval["rewards/accuracies"], 4),
        "llamakit_heldout_margin": round(mine_eval["rewards/margins"], 4),
        "trl_heldout_margin": round(peer_eval["rewards/margins"], 4),
        "llamakit_train_loss_last": round(mine["train_loss_last"], 4),
        "trl_train_loss_last": round(peer["train_loss_last"], 4),
        "steps_done": {"llamakit": mine["steps"], "trl": peer["steps"]},
        "wall_seconds": {"llamakit": mine["wall_seconds"], "trl": peer["wall_seconds"]},
        "cpu_seconds": {"llamakit": mine["cpu_seconds"], "trl": peer["cpu_seconds"]},
        "model": args.model, "data": data,
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "versions": {"llamakit": mine["versions"], "trl": peer["versions"]},
    }
    if args.details:
        line["step_seconds"] = {"llamakit": [round(s, 3) for s in mine["step_seconds"]],
                                "trl": [round(s, 3) for s in peer["step_seconds"]]}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
