"""`llamakit train-reward`, `calibrate`, `eval-reward`: reward models you can trust (logic in toolkit/reward/)."""

from __future__ import annotations

import click

from toolkit.commands.params import NonEmptyPath, dataclass_options, field_option
from toolkit.config import config_option
from toolkit.models import allow_pickle_option
from toolkit.reward.train import TrainConfig

# eval-reward and calibrate score pairs as train-reward's calibration does, in batches of this size.
EVAL_BATCH_SIZE = click.option("--batch-size", default=TrainConfig.eval_batch_size, show_default=True,
                               type=click.IntRange(1))


def _threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@click.command("train-reward")
@dataclass_options(TrainConfig)
@click.option("--threads", default=None, type=click.IntRange(1), help="torch CPU threads (default: torch's choice).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
@allow_pickle_option
@config_option
def train_reward_cmd(threads: int | None, as_json: bool, **settings) -> None:
    """Train a Bradley–Terry reward model and calibrate it on held-out pairs."""
    from toolkit.console import console, emit_json, note_output, summary_table
    from toolkit.reward.train import train_reward

    note_output(f"{settings['out']} is unchanged (a reward model is written whole, once trained)",
                "run the same command again to train it")
    _threads(threads)
    result = train_reward(TrainConfig(**settings, show_progress=not as_json))
    if not result.metrics:  # a non-main rank under accelerate launch
        return
    heldout = result.metrics["heldout"]
    if as_json:
        from toolkit.reward.calibrate import json_safe

        emit_json(json_safe({"out": str(result.out), **result.metrics}))
        return
    raw, calibrated = heldout.get("raw", {}), heldout.get("calibrated", {})
    rows = [("output", str(result.out)), ("training pairs", result.metrics["train"]["pairs"]),
            ("pairs / s", result.metrics["train"]["pairs_per_s"]),
            ("calibration pairs", f"{raw.get('n', 0)} ({result.metrics['heldout_data']})"),
            ("temperature T", result.calibration.temperature),
            ("T by plain max. likelihood", result.calibration.temperature_ml)]
    for key in ("accuracy", "ece", "brier", "nll", "auc"):
        rows.append((f"{key} raw → {result.calibration.method}", f"{_f(raw.get(key))} → {_f(calibrated.get(key))}"))
    if "ensemble" in result.metrics:
        rows.append(("ensemble members", result.metrics["ensemble"]["members"]))
    summary_table("train-reward", rows)
    console.print(f"model card: {result.out / 'README.md'}")


def _f(value) -> str:
    return "—" if value is None or value != value else f"{value:.4f}"


@click.command("eval-reward")
@click.argument("model_dir", type=NonEmptyPath())
@click.option("--data", required=True, type=NonEmptyPath(),
              help="Pairs to evaluate on (any format train-reward reads).")
@field_option(TrainConfig, "format", help="")
@EVAL_BATCH_SIZE
@click.option("--plot", default=None, type=NonEmptyPath(dir_okay=False), help="Write a reliability diagram PNG here.")
@click.option("--coverage-plot", default=None, type=NonEmptyPath(dir_okay=False),
              help="Write a PNG of the accuracy on the most confident pairs against the fraction kept.")
@click.option("--threads", default=None, type=click.IntRange(1), help="torch CPU threads.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: accuracy, ece, brier, nll, auc, n, ties (calibrated) and `raw` with the same, "
                   "by_confidence (accuracy per confidence decile), selective (accuracy on the most confident pairs).")
@config_option
def eval_reward_cmd(model_dir, data, format, batch_size, plot, coverage_plot, threads,  # noqa: A002 - the flag's name
                    as_json):
    """Accuracy, ECE, Brier, NLL and AUC of a reward model on pairs, raw and calibrated. MODEL_DIR: a train-reward
    output or any *ForSequenceClassification directory with num_labels 1."""
    from toolkit.console import emit_json, summary_table
    from toolkit.reward.evaluate import evaluate

    _threads(threads)
    result = evaluate(model_dir, data, fmt=format, batch_size=batch_size, plot=plot, coverage_plot=coverage_plot)
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
    kept = result["selective"]["accuracy_at_coverage"]
    rows.append(("accuracy, 50% / 80% most confident", f"{_f(kept['0.5'])} / {_f(kept['0.8'])}"))
    if "ensemble" in result:
        ensemble = result["ensemble"]
        agreed = ensemble["selective"]["accuracy_at_coverage"]
        rows.append((f"each of the {ensemble['members']} members", " / ".join(map(_f, ensemble["member_accuracies"]))))
        rows.append(("accuracy, 50% / 80% least relative disagreement", f"{_f(agreed['0.5'])} / {_f(agreed['0.8'])}"))
    if plot:
        rows.append(("reliability diagram", plot))
    if coverage_plot:
        rows.append(("coverage plot", coverage_plot))
    summary_table(f"eval-reward {data}", rows)
    summary_table("accuracy by confidence decile", [
        (f"confidence {g['confidence_min']:.3f}–{g['confidence_max']:.3f}",
         f"n {g['n']}, accuracy {_f(g['accuracy'])}")
        for g in result["by_confidence"]])


@click.command("calibrate")
@click.argument("model_dir", type=NonEmptyPath())
@click.option("--data", required=True, type=NonEmptyPath(), help="Held-out pairs the model never trained on.")
@field_option(TrainConfig, "calibration", flag="method", aliases=("calibration",),
              help="Same choices as train-reward --calibration.")
@field_option(TrainConfig, "temperature_prior_sd")
@field_option(TrainConfig, "format", help="")
@EVAL_BATCH_SIZE
@click.option("--threads", default=None, type=click.IntRange(1), help="torch CPU threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the new calibration as one JSON object.")
@config_option
def calibrate_cmd(model_dir, data, calibration, temperature_prior_sd, format, batch_size, threads,  # noqa: A002
                  as_json):
    """Refit the calibration of a reward model on held-out pairs; rewrites calibration.json."""
    from dataclasses import asdict

    from toolkit.console import console, emit_json, summary_table
    from toolkit.reward.evaluate import recalibrate

    _threads(threads)
    fitted, kept_stats = recalibrate(model_dir, data, method=calibration, fmt=format, batch_size=batch_size,
                                     prior_sd=temperature_prior_sd)
    if as_json:
        from toolkit.reward.calibrate import json_safe

        emit_json(json_safe(asdict(fitted)))
        return
    raw, new = fitted.metrics["raw"], fitted.metrics["calibrated"]
    rows = [("pairs", fitted.n_pairs), ("method", fitted.method), ("temperature T", fitted.temperature),
            ("T by plain max. likelihood", fitted.temperature_ml)]
    for key in ("accuracy", "ece", "brier", "nll", "auc"):
        rows.append((f"{key} raw → calibrated", f"{_f(raw[key])} → {_f(new[key])}"))
    summary_table(f"calibrate {model_dir}", rows)
    if not kept_stats:
        console.print("[yellow]warning:[/] no valid calibration.json before: reward mean/std taken from these pairs")


COMMANDS = [train_reward_cmd, eval_reward_cmd, calibrate_cmd]
