"""llamakit train-reward against TRL's RewardTrainer: same backbone, pairs, epochs, batch, lr, max length.

    .venv/bin/python benchmarks/reward_vs_trl.py                       # full run (HH dev 80/20, 1 epoch)
    .venv/bin/python benchmarks/reward_vs_trl.py --max-pairs 240       # ~10 minutes on 2 cores
    .venv/bin/python benchmarks/reward_vs_trl.py --together --threads 1   # both at once, one core each

The HH dev file is split 80/20 (seeded). TRL silently drops pairs longer than max_length, so both get
only the pairs that fit (llamakit itself would keep long pairs, cut from the left). Each trainer runs in
its own process, one after the other (2 cores: running them together would halve both), so each
process's peak RSS is its own. TRL runs from benchmarks/.peer-venv (built from requirements-trl.txt on
first use). Pairs/s counts the training loop only, for both. Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = ROOT / "benchmarks" / ".peer-venv"
REQUIREMENTS = ROOT / "benchmarks" / "requirements-trl.txt"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh-harmless-dev.jsonl"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_seconds() -> float:
    """User + system CPU time of this process: a check on pairs/s when other jobs share the machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 1)


def accuracy(diffs: list[float]) -> float:
    return (sum(d > 0 for d in diffs) + 0.5 * sum(d == 0 for d in diffs)) / len(diffs)


# ---- children -----------------------------------------------------------------------------------------------

def run_llamakit(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from toolkit.reward.train import TrainConfig, train_reward

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data=args.train, eval_data=args.test, out=str(Path(tmp) / "rm"), model=args.model_path,
                          max_length=args.max_length, batch_size=args.batch_size, epochs=args.epochs,
                          learning_rate=args.learning_rate, warmup_ratio=args.warmup_ratio,
                          max_steps=args.max_steps, seed=args.seed, show_progress=False)
        result = train_reward(cfg)
    train = result.metrics["train"]
    return {"pairs_per_s": train["pairs_per_s"], "accuracy": result.metrics["heldout"]["raw"]["accuracy"],
            "pairs": train["pairs"], "steps": train["optimizer_steps"], "train_seconds": train["seconds"],
            "texts_cut": train["texts_cut"], "peak_rss_mb": peak_rss_mb(), "cpu_seconds": cpu_seconds()}


def run_trl(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import trl
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging
    from trl import RewardConfig, RewardTrainer

    logging.set_verbosity_error()
    train = [json.loads(line) for line in Path(args.train).read_text(encoding="utf-8").splitlines()]
    test = [json.loads(line) for line in Path(args.test).read_text(encoding="utf-8").splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    tokenizer.eos_token = tokenizer.eos_token or tokenizer.sep_token  # TRL appends EOS; BERT has none
    model = AutoModelForSequenceClassification.from_pretrained(args.model_path, num_labels=1)
    steps = math.ceil(len(train) / args.batch_size) * args.epochs
    if args.max_steps:
        steps = min(steps, args.max_steps)
    gc = {"default": {}, "on": {"gradient_checkpointing": True}, "off": {"gradient_checkpointing": False}}
    with tempfile.TemporaryDirectory() as tmp:
        config = RewardConfig(output_dir=tmp, per_device_train_batch_size=args.batch_size,
                              num_train_epochs=args.epochs, max_steps=args.max_steps or -1,
                              learning_rate=args.learning_rate, warmup_steps=int(args.warmup_ratio * steps),
                              max_length=args.max_length, bf16=False, use_cpu=True, report_to=[],
                              save_strategy="no", logging_steps=10, seed=args.seed, disable_tqdm=True,
                              dataloader_num_workers=0, **gc[args.trl_gradient_checkpointing])
        trainer = RewardTrainer(model=model, args=config, processing_class=tokenizer,
                                train_dataset=datasets.Dataset.from_list(train))
        kept = len(trainer.train_dataset)
        output = trainer.train()
    runtime = output.metrics["train_runtime"]
    pairs_done = min(kept * args.epochs, output.global_step * args.batch_size)
    model.eval()
    diffs = []
    if args.diffs_out:  # the k-fold comparison (reward_calibration.py --peer trl) scores every test pair:
        tokenizer.truncation_side = "left"  # keep each long text's final answer, as llamakit does
    with torch.inference_mode():
        for start in range(0, len(test), 32):
            chunk = test[start:start + 32]
            texts = [r[k] + tokenizer.eos_token for r in chunk for k in ("chosen", "rejected")]
            enc = tokenizer(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
            scores = model(**enc).logits.squeeze(-1).tolist()
            diffs += [c - r for c, r in zip(scores[0::2], scores[1::2], strict=True)]
    if args.diffs_out:
        Path(args.diffs_out).write_text(json.dumps(diffs), encoding="utf-8")
    return {"pairs_per_s": pairs_done / runtime, "accuracy": accuracy(diffs), "pairs": kept,
            "steps": output.global_step, "train_seconds": runtime, "peak_rss_mb": peak_rss_mb(),
            "cpu_seconds": cpu_seconds(),
            "trl_version": trl.__version__, "gradient_checkpointing": bool(config.gradient_checkpointing)}


# ---- parent -------------------------------------------------------------------------------------------------

def peer_python(explicit: str | None) -> str:
    """A Python that can import trl: --trl-python, else benchmarks/.peer-venv (built on first use)."""
    if explicit:
        return explicit
    python = PEER_VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import trl"], capture_output=True).returncode == 0:
        return str(python)
    print(f"building {PEER_VENV} from {REQUIREMENTS.name} (once) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True)
    return str(python)


def prepare(args, tmp: Path) -> tuple[Path, Path, dict]:
    """80/20 split of the HH file, keeping only pairs whose texts fit max_length for TRL too."""
    from toolkit.models import load_tokenizer
    from toolkit.reward.data import load_preferences, split

    data = load_preferences(args.data)
    train_pairs, test_pairs = split(data.pairs, 0.2, args.seed)
    tokenizer = load_tokenizer(args.model_path)
    eos = tokenizer.eos_token or tokenizer.sep_token

    def fits(pairs):
        texts = [t + eos for p in pairs for t in (p.chosen_text, p.rejected_text)]
        lengths = [len(ids) for ids in tokenizer(texts).input_ids]
        return [p for i, p in enumerate(pairs) if max(lengths[2 * i], lengths[2 * i + 1]) <= args.max_length]

    train_fit, test_fit = fits(train_pairs), fits(test_pairs)
    if args.max_pairs:
        train_fit = train_fit[:args.max_pairs]
    files = {}
    for name, pairs in (("train", train_fit), ("test", test_fit)):
        files[name] = tmp / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"chosen": p.chosen_text, "rejected": p.rejected_text}) + "\n"
                                       for p in pairs), encoding="utf-8")
    info = {"train_pairs_all": len(train_pairs), "train_pairs_fit": len(train_fit),
            "test_pairs_all": len(test_pairs), "test_pairs_fit": len(test_fit)}
    return files["train"], files["test"], info


def child(python: str, kind: str, args, train: Path, test: Path, model_path: str) -> subprocess.Popen:
    """Start one trainer in its own process (its own peak RSS); `finish` collects its JSON line."""
    cmd = [python, __file__, "--child", kind, "--train", str(train), "--test", str(test), "--model-path", model_path,
           "--max-length", str(args.max_length), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
           "--learning-rate", str(args.learning_rate), "--warmup-ratio", str(args.warmup_ratio),
           "--threads", str(args.threads), "--seed", str(args.seed),
           "--trl-gradient-checkpointing", args.trl_gradient_checkpointing]
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"})
    proc.started = time.perf_counter()  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, kind: str) -> dict:
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"{kind} run failed ({proc.returncode}):\n{stderr[-4000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["wall_seconds"] = round(time.perf_counter() - proc.started, 1)  # type: ignore[attr-defined]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--model", default="minilm-l6", help="llamakit alias or local HF dir")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: llamakit's default")
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--max-pairs", type=int, default=None, help="train on the first N fitting pairs only")
    parser.add_argument("--max-steps", type=int, default=None, help="stop both after N optimizer steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-python", default=None, help="a Python with trl (default: benchmarks/.peer-venv)")
    parser.add_argument("--trl-gradient-checkpointing", choices=["default", "on", "off"], default="default",
                        help="TRL's RewardConfig turns it on by default")
    parser.add_argument("--together", action="store_true",
                        help="run both trainers at the same time (use with --threads 1 on a shared 2-core machine)")
    parser.add_argument("--details", action="store_true", help="add both runs' details to the JSON line")
    parser.add_argument("--child", choices=["llamakit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--test", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--diffs-out", help=argparse.SUPPRESS)  # a trl child writes its test-pair differences here
    args = parser.parse_args()
    if args.learning_rate is None:
        from toolkit.reward.train import TrainConfig

        args.learning_rate = TrainConfig(data="", out="").learning_rate
    if args.child:
        print(json.dumps(run_llamakit(args) if args.child == "llamakit" else run_trl(args)))
        return

    from toolkit.models import resolve

    model_path = str(resolve(args.model))
    args.model_path = model_path
    trl_python = peer_python(args.trl_python)
    with tempfile.TemporaryDirectory() as tmp:
        train, test, info = prepare(args, Path(tmp))
        if args.together:
            # Both at once, `--threads` each: on a machine shared with other jobs, both see the same load,
            # so the ratio holds even when the absolute pairs/s do not.
            procs = [child(sys.executable, "llamakit", args, train, test, model_path),
                     child(trl_python, "trl", args, train, test, model_path)]
            mine, peer = finish(procs[0], "llamakit"), finish(procs[1], "trl")
        else:
            mine = finish(child(sys.executable, "llamakit", args, train, test, model_path), "llamakit")
            peer = finish(child(trl_python, "trl", args, train, test, model_path), "trl")
    line = {
        "llamakit_pairs_per_s": round(mine["pairs_per_s"], 3),
        "trl_pairs_per_s": round(peer["pairs_per_s"], 3),
        "speedup": round(mine["pairs_per_s"] / peer["pairs_per_s"], 2),
        "llamakit_accuracy": round(mine["accuracy"], 4),
        "trl_accuracy": round(peer["accuracy"], 4),
        "llamakit_peak_rss_mb": round(mine["peak_rss_mb"], 1),
        "trl_peak_rss_mb": round(peer["peak_rss_mb"], 1),
    }
    if args.details:
        line.update({"data": info, "settings": {k: getattr(args, k) for k in (
            "max_length", "batch_size", "epochs", "learning_rate", "warmup_ratio", "max_pairs", "max_steps",
            "threads", "seed", "trl_gradient_checkpointing", "together")}, "llamakit": mine, "trl": peer})
    print(json.dumps(line))


if __name__ == "__main__":
    main()
