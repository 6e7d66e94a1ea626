"""`llamakit train-reward`, `calibrate`, `eval-reward`: reward models you can trust (logic in toolkit/reward/)."""

from __future__ import annotations

import click

from toolkit.commands.params import NON_EMPTY, SEED, FiniteFloat, NonEmptyPath
from toolkit.config import config_option
from toolkit.models import allow_pickle_option

FORMAT_CHOICE = click.Choice(["auto", "preference", "hh", "implicit", "chatllama"])


def _threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@click.command("train-reward")
@click.option("--data", required=True, type=NonEmptyPath(),
              help="Pairs: llamakit/TRL JSONL (prompt, chosen, rejected), Anthropic HH, TRL implicit prompt, "
                   "ChatLLaMA scored rows (user_input, completion, score), or a `datasets` directory.")
@click.option("--out", required=True, type=NonEmptyPath(file_okay=False), help="Output directory (written atomically).")
@click.option("--model", default="minilm-l6", show_default=True, type=NON_EMPTY,
              help="Backbone: an alias (minilm-l6, smollm2-135m) or a local Hugging Face directory (LLaMA too).")
@click.option("--eval-data", default=None, type=NonEmptyPath(), help="Held-out pairs for calibration (else --eval-split).")
@click.option("--eval-split", default=0.1, show_default=True, type=FiniteFloat(0, 1, max_open=True),
              help="Fraction of --data held out for calibration (> 0 unless --eval-data is given).")
@click.option("--format", "fmt", default="auto", show_default=True, type=FORMAT_CHOICE, help="Input format.")
@click.option("--objective", default="bradley-terry", show_default=True,
              type=click.Choice(["bradley-terry", "regression"]),
              help="Pairwise loss, or MSE to scores of scored rows.")
@click.option("--max-length", default=256, show_default=True, type=click.IntRange(1),
              help="Tokens per text; longer texts keep their end.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1), help="Pairs per micro-batch.")
@click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(1),
              help="Micro-batches per optimizer step.")
@click.option("--epochs", default=1, show_default=True, type=click.IntRange(1),
              help="Reward models overfit fast: one epoch is the usual choice.")
@click.option("--learning-rate", default=1e-4, show_default=True, type=FiniteFloat(0, min_open=True))
@click.option("--weight-decay", default=0.0, show_default=True, type=FiniteFloat(0))
@click.option("--warmup-ratio", default=0.1, show_default=True, type=FiniteFloat(0, 1),
              help="Linear warm-up, then linear decay to 0.")
@click.option("--max-grad-norm", default=1.0, show_default=True, type=FiniteFloat(0),
              help="Gradient clipping norm (0 = off).")
@click.option("--center-rewards", default=0.0, show_default=True, type=FiniteFloat(0),
              help="Coefficient of mean (r_c + r_r)^2 (0.01 is the usual value; 0 = off).")
@click.option("--margin/--no-margin", "use_margin", default=True, show_default=True,
              help="Honour a `margin` column when the data has one.")
@click.option("--lora", is_flag=True, help="Train LoRA adapters (peft) instead of all weights; merged on save.")
@click.option("--lora-r", default=16, show_default=True, type=click.IntRange(1))
@click.option("--bf16", is_flag=True, help="bfloat16 autocast (fast on GPUs / CPUs with bf16 units).")
@click.option("--gradient-checkpointing", is_flag=True, help="Less memory, ~30% more compute.")
@click.option("--group-by-length/--no-group-by-length", default=True, show_default=True,
              help="Batch texts of similar length together (less padding).")
@click.option("--shared-prefix/--no-shared-prefix", default=True, show_default=True,
              help="Causal backbones (LLaMA): run a pair's shared dialogue once and both answers on its cache.")
@click.option("--calibration", default="temperature", show_default=True,
              type=click.Choice(["temperature", "isotonic"]))
@click.option("--temperature-prior-sd", type=FiniteFloat(0, min_open=True, allow_inf=True), default=0.2,
              show_default=True,
              help="Spread of the prior on log T: T moves away from 1 only as far as the held-out pairs show "
                   "(a few hundred pairs pin T down loosely); inf for plain maximum likelihood.")
@click.option("--max-steps", default=None, type=click.IntRange(1),
              help="Stop after this many optimizer steps (unset: run all --epochs).")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier reward model in --out (a directory llamakit did not write is never replaced).")
@click.option("--threads", default=None, type=click.IntRange(1), help="torch CPU threads (default: torch's choice).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
@allow_pickle_option
@config_option
def train_reward_cmd(data, out, model, eval_data, eval_split, fmt, objective, max_length, batch_size, grad_accum,
                     epochs, learning_rate, weight_decay, warmup_ratio, max_grad_norm, center_rewards, use_margin,
                     lora, lora_r, bf16, gradient_checkpointing, group_by_length, shared_prefix, calibration, temperature_prior_sd,
                     max_steps, seed, overwrite, threads, as_json):
    """Train a Bradley–Terry reward model and calibrate it on held-out pairs."""
    from toolkit.console import console, emit_json, note_output, summary_table
    from toolkit.reward.train import TrainConfig, train_reward

    note_output(f"{out} is unchanged (a reward model is written whole, once trained)",
                "run the same command again to train it")
    _threads(threads)
    cfg = TrainConfig(data=data, out=out, model=model, eval_data=eval_data, eval_split=eval_split, format=fmt,
                      objective=objective, max_length=max_length, batch_size=batch_size, grad_accum=grad_accum,
                      epochs=epochs, learning_rate=learning_rate, weight_decay=weight_decay,
                      warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, center_rewards=center_rewards,
                      use_margin=use_margin, lora=lora, lora_r=lora_r, bf16=bf16,
                      gradient_checkpointing=gradient_checkpointing, group_by_length=group_by_length,
                      shared_prefix=shared_prefix,
                      calibration=calibration, temperature_prior_sd=temperature_prior_sd, max_steps=max_steps, seed=seed, overwrite=overwrite,
                      show_progress=not as_json)
    result = train_reward(cfg)
    if not result.metrics:  # a non-main rank under accelerate launch
        return
    heldout = result.metrics["heldout"]
    if as_json:
        from toolkit.reward.calibrate import json_safe

        emit_json(json_safe({"out": str(result.out), **result.metrics}))
        return
    raw, calibrated = heldout.get("raw", {}), heldout.get("calibrated", {})
    rows = [("output", str(result.out)), ("training pairs", result.metrics["train"]["pairs"]),
            ("pairs / s", result.metrics["train"]["pairs_per_s"]), ("held-out pairs", raw.get("n", 0)),
            ("temperature T", result.calibration.temperature),
            ("T by plain max. likelihood", result.calibration.temperature_ml)]
    for key in ("accuracy", "ece", "brier", "nll", "auc"):
        rows.append((f"{key} raw → {result.calibration.method}", f"{_f(raw.get(key))} → {_f(calibrated.get(key))}"))
    summary_table("train-reward", rows)
    console.print(f"model card: {result.out / 'README.md'}")


def _f(value) -> str:
    return "—" if value is None or value != value else f"{value:.4f}"


@click.command("eval-reward")
@click.argument("model_dir", type=NonEmptyPath())
@click.option("--data", required=True, type=NonEmptyPath(), help="Pairs to evaluate on (any format train-reward reads).")
@click.option("--format", "fmt", default="auto", show_default=True, type=FORMAT_CHOICE)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--plot", default=None, type=NonEmptyPath(dir_okay=False), help="Write a reliability diagram PNG here.")
@click.option("--threads", default=None, type=click.IntRange(1), help="torch CPU threads.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: accuracy, ece, brier, nll, auc, n, ties (calibrated) and `raw` with the same.")
@config_option
def eval_reward_cmd(model_dir, data, fmt, batch_size, plot, threads, as_json):
    """Accuracy, ECE, Brier, NLL and AUC of a reward model on pairs, raw and calibrated."""
    from toolkit.console import emit_json, summary_table
    from toolkit.reward.evaluate import evaluate

    _threads(threads)
    result = evaluate(model_dir, data, fmt=fmt, batch_size=batch_size, plot=plot)
    if as_json:
        from toolkit.reward.calibrate import json_safe

        emit_json(json_safe(result))  # NaN (e.g. AUC of one pair) is not JSON: null instead
        return
    rows = [("pairs", result["n"]), ("ties", result["ties"]), ("calibration", result["method"]),
            ("temperature T", result["temperature"])]
    for key in ("accuracy", "ece", "brier", "nll", "auc"):
        rows.append((f"{key} raw → calibrated", f"{_f(result['raw'][key])} → {_f(result[key])}"))
    noise = result["ece_noise"]
    rows.append(("ECE from sampling noise alone", f"median {_f(noise['median'])}, 90% {_f(noise['p90'])} "
                 f"(a perfectly calibrated model on {result['n']} pairs)"))
    if plot:
        rows.append(("reliability diagram", plot))
    summary_table(f"eval-reward {data}", rows)


@click.command("calibrate")
@click.argument("model_dir", type=NonEmptyPath())
@click.option("--data", required=True, type=NonEmptyPath(), help="Held-out pairs the model never trained on.")
@click.option("--method", "--calibration", "method", default="temperature", show_default=True,
              type=click.Choice(["temperature", "isotonic"]), help="Same choices as train-reward --calibration.")
@click.option("--temperature-prior-sd", type=FiniteFloat(0, min_open=True, allow_inf=True), default=0.2,
              show_default=True,
              help="Spread of the prior on log T: T moves away from 1 only as far as the held-out pairs show "
                   "(a few hundred pairs pin T down loosely); inf for plain maximum likelihood.")
@click.option("--format", "fmt", default="auto", show_default=True, type=FORMAT_CHOICE)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--threads", default=None, type=click.IntRange(1), help="torch CPU threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the new calibration as one JSON object.")
@config_option
def calibrate_cmd(model_dir, data, method, temperature_prior_sd, fmt, batch_size, threads, as_json):
    """Refit the calibration of a reward model on held-out pairs; rewrites calibration.json."""
    from dataclasses import asdict

    from toolkit.console import console, emit_json, summary_table
    from toolkit.reward.evaluate import recalibrate

    _threads(threads)
    calibration, kept_stats = recalibrate(model_dir, data, method=method, fmt=fmt, batch_size=batch_size,
                                          prior_sd=temperature_prior_sd)
    if as_json:
        from toolkit.reward.calibrate import json_safe

        emit_json(json_safe(asdict(calibration)))
        return
    raw, new = calibration.metrics["raw"], calibration.metrics["calibrated"]
    rows = [("pairs", calibration.n_pairs), ("method", calibration.method), ("temperature T", calibration.temperature),
            ("T by plain max. likelihood", calibration.temperature_ml)]
    for key in ("accuracy", "ece", "brier", "nll", "auc"):
        rows.append((f"{key} raw → calibrated", f"{_f(raw[key])} → {_f(new[key])}"))
    summary_table(f"calibrate {model_dir}", rows)
    if not kept_stats:
        console.print("[yellow]warning:[/] no valid calibration.json before: reward mean/std taken from these pairs")


COMMANDS = [train_reward_cmd, eval_reward_cmd, calibrate_cmd]
