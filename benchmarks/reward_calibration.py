"""Is a default `train-reward` model calibrated on pairs it never saw? K-fold cross-validation on HH.

One 80/20 split gives 231 test pairs, where even a perfectly calibrated model shows an ECE of ~0.04-0.05
(`ece_noise`): an ECE goal of 0.03 cannot be checked there. So this runs the whole default protocol
(train on 80%, calibrate on its own held-out share, predict the other 20%) once per fold of a seeded
5-fold split and pools the out-of-fold predictions: every pair of the file is predicted once, by a model
that never saw it, and the pooled ECE is measured on all of them (1155 pairs for the HH dev file).

Prints ONE JSON line: pooled raw and calibrated accuracy / ECE / Brier / NLL, `ece_noise` of the pooled
calibrated predictions, per-fold temperatures (fitted on the fold's held-out pairs vs. the temperature
its test pairs would have wanted; `temperatures` is the default MAP fit, `temperatures_ml` plain maximum
likelihood on the same held-out pairs), and the length-rule accuracy. --out keeps every fold's reward
differences (held-out and test); --from recomputes everything from them without training (another
calibration setting, a plot).

    .venv/bin/python benchmarks/reward_calibration.py --out runs/cal   # 5 folds, ~30 min on 2 idle cores
    .venv/bin/python benchmarks/reward_calibration.py --from runs/cal --plot pooled.png --set temperature_prior_sd=inf
    .venv/bin/python benchmarks/reward_calibration.py --folds 2 --max-pairs 200   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh-harmless-dev.jsonl"


def setting_value(text: str):
    """A --set value as its type: 2 → int, 2e-4 / inf → float, true / false → bool, else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def folds(n: int, k: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i::k] for i in range(k)]


def reward_diffs(directory: Path, pairs, members: bool = False) -> list:
    """r_c − r_r per pair; with `members`, an ensemble's list of member differences per pair."""
    from toolkit.reward.model import TextEncoder, score_texts
    from toolkit.reward.store import load_trained

    net, tokenizer, settings = load_trained(directory, "cpu")
    encoder = TextEncoder(tokenizer, settings.max_length, settings.append_eos)
    texts = [t for p in pairs for t in (p.chosen_text, p.rejected_text)]
    rewards = score_texts(net, encoder, texts, 32, "cpu", members=members)
    if members:
        return [[c - r for c, r in zip(rc, rr, strict=True)] for rc, rr in zip(rewards[0::2], rewards[1::2],
                                                                                strict=True)]
    return [c - r for c, r in zip(rewards[0::2], rewards[1::2], strict=True)]


def shorter_wins(pairs) -> float:
    def final(answer) -> int:
        return len(answer[-1]["content"] if isinstance(answer, list) else answer)
    return sum((final(p.chosen) < final(p.rejected)) + 0.5 * (final(p.chosen) == final(p.rejected))
               for p in pairs) / len(pairs)


def trl_folds(args, pairs, overrides: dict, where: Path) -> list[dict]:
    """TRL's RewardTrainer on the same folds (reward_vs_trl.py's child, in its peer venv): train-reward's backbone,
    epochs, batch, lr, warm-up, max length and seed (its defaults, or --set); TRL drops training pairs longer than
    max_length, as it does. No calibration."""
    import subprocess

    from reward_vs_trl import peer_python

    from toolkit.models import resolve
    from toolkit.reward.train import TrainConfig

    settings = TrainConfig(data="", out="", **{"seed": args.seed, **overrides})
    lines = Path(args.data).read_text(encoding="utf-8").splitlines()
    saved = []
    for k, test_ids in enumerate(folds(len(pairs), args.folds, args.seed)):
        held_out = set(test_ids)
        files = {name: where / f"{name}-{k}.jsonl" for name in ("train", "test")}
        files["train"].write_text("".join(lines[p.line - 1] + "\n" for i, p in enumerate(pairs) if i not in held_out))
        files["test"].write_text("".join(lines[pairs[i].line - 1] + "\n" for i in test_ids))
        diffs_file = where / f"trl-diffs-{k}.json"
        started = time.perf_counter()
        subprocess.run([peer_python(None), str(ROOT / "benchmarks" / "reward_vs_trl.py"), "--child", "trl",
                        "--train", str(files["train"]), "--test", str(files["test"]),
                        "--model-path", str(resolve(settings.model)), "--max-length", str(settings.max_length),
                        "--batch-size", str(settings.batch_size), "--epochs", str(settings.epochs),
                        "--learning-rate", str(settings.learning_rate), "--warmup-ratio", str(settings.warmup_ratio),
                        "--threads", str(args.threads), "--seed", str(settings.seed), "--diffs-out", str(diffs_file)],
                       check=True, stdout=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        fold = {"fold": k, "test_ids": test_ids, "test_diffs": json.loads(diffs_file.read_text()), "heldout_diffs": [],
                "seconds": round(time.perf_counter() - started, 1)}
        (where / f"fold-{k}.json").write_text(json.dumps(fold))
        saved.append(fold)
    return saved


def read_folds(where: str) -> list[dict]:
    """The fold-K.json files an earlier --out run kept, in fold order."""
    return [json.loads(p.read_text()) for p in sorted(Path(where).glob("fold-*.json"))]


def train_folds(args, pairs, overrides: dict, where: Path) -> list[dict]:
    """Train one default reward model per fold; per fold, the reward differences of its test pairs and of
    the held-out pairs its calibration was fitted on (also written to WHERE/fold-K.json)."""
    from toolkit.reward.calibrate import read
    from toolkit.reward.data import split
    from toolkit.reward.train import TrainConfig, train_reward

    lines = Path(args.data).read_text(encoding="utf-8").splitlines()  # train files keep the rows as they are
    saved = []
    for k, test_ids in enumerate(folds(len(pairs), args.folds, args.seed)):
        held_out = set(test_ids)
        train_file = where / f"train-{k}.jsonl"
        train_pairs = [p for i, p in enumerate(pairs) if i not in held_out]
        train_file.write_text("".join(lines[p.line - 1] + "\n" for p in train_pairs), encoding="utf-8")
        out = where / f"rm-{k}"
        # `--set seed=N` draws another model on the same folds (seed noise); else the folds' seed trains too
        cfg = TrainConfig(data=str(train_file), out=str(out), show_progress=False, **{"seed": args.seed, **overrides})
        result = train_reward(cfg)
        _, calibration_pairs = split(train_pairs, read(out).n_pairs / len(train_pairs), cfg.seed)
        test_pairs = [pairs[i] for i in test_ids]
        fold = {"fold": k, "train_pairs": result.metrics["train"]["pairs"], "test_ids": test_ids,
                "test_diffs": reward_diffs(out, test_pairs), "heldout_diffs": reward_diffs(out, calibration_pairs),
                "seconds": result.metrics["train"]["seconds_all_models"]}
        if cfg.ensemble > 1:
            fold["test_member_diffs"] = reward_diffs(out, test_pairs, members=True)
        (where / f"fold-{k}.json").write_text(json.dumps(fold))
        saved.append(fold)
    return saved


def selective(saved: list[dict], p_cal, covered) -> tuple[dict, dict]:
    """Accuracy on the 50% / 80% of pairs the model is surest of (calibrated confidence) and, for an ensemble,
    on those its members agree on most; each member's pooled accuracy. And the curves for --coverage-plot."""
    import numpy as np

    from toolkit.reward.ensemble import pair_disagreement, relative_disagreement
    from toolkit.reward.metrics import confidence, pair_correct, raw_probabilities, selective_accuracy

    correct = pair_correct(p_cal)
    curves = {"calibrated confidence": (correct, -confidence(p_cal))}
    if all("test_member_diffs" in f for f in saved):
        members = np.zeros((int(covered.max()) + 1, len(saved[0]["test_member_diffs"][0])))
        for f in saved:
            members[f["test_ids"]] = f["test_member_diffs"]
        members = members[covered]
        # these take chosen and rejected rewards; the member differences are chosen − rejected already
        curves["ensemble disagreement (std)"] = (correct, pair_disagreement(members, np.zeros_like(members)))
        curves["ensemble relative disagreement (std / |mean|)"] = (
            correct, relative_disagreement(members, np.zeros_like(members)))
    result = {label: {f"{c:.1f}": round(selective_accuracy(ok, unsure, c), 4) for c in (0.5, 0.8)}
              for label, (ok, unsure) in curves.items()}
    if len(curves) > 1:
        result["member_accuracies"] = [round(float(pair_correct(raw_probabilities(members[:, m])).mean()), 4)
                                       for m in range(members.shape[1])]
    return result, curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--max-pairs", type=int, default=None, help="use only the first N pairs (quick runs)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the folds, and the training seed unless --set seed=N (another model, same folds)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="keep the per-fold reward differences here (fold-K.json)")
    parser.add_argument("--from", dest="from_dir", default=None,
                        help="no training: recompute from the fold-K.json files of an earlier --out run")
    parser.add_argument("--peer", choices=["trl"], default=None,
                        help="train TRL's RewardTrainer on the same folds instead, with train-reward's settings (its "
                             "defaults, or --set backbone, epochs, batch, lr, warm-up, max length, seed)")
    parser.add_argument("--against", default=None, metavar="DIR",
                        help="the fold-K.json files of another recipe on the same folds: the accuracy change on the "
                             "pairs both predicted, paired (same pair, both models), with its 95%% interval")
    parser.add_argument("--plot", default=None, help="pooled reliability diagram (raw and calibrated) to this PNG")
    parser.add_argument("--coverage-plot", default=None,
                        help="accuracy on the pairs kept against the fraction kept (surest first) to this PNG")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a train-reward setting other than its default, e.g. --set epochs=2 (repeatable); "
                             "calibration and temperature_prior_sd also apply with --from")
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from benchmarks.paired import paired_points
    from toolkit.reward import calibrate as cal
    from toolkit.reward.data import load_preferences
    from toolkit.reward.metrics import ece_noise, pair_correct, pair_metrics, raw_probabilities
    from toolkit.reward.train import TrainConfig

    defaults = TrainConfig(data="", out="")
    overrides = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        getattr(defaults, key)  # AttributeError names a setting that is not one
        overrides[key] = setting_value(value)
    settings = TrainConfig(data="", out="", **overrides)
    started = time.perf_counter()
    pairs = load_preferences(args.data).pairs[:args.max_pairs]
    if args.from_dir:
        saved = read_folds(args.from_dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            where = Path(args.out) if args.out else Path(tmp)
            where.mkdir(parents=True, exist_ok=True)
            saved = (trl_folds if args.peer == "trl" else train_folds)(args, pairs, overrides, where)
    # every pair of the file, or those of the folds a partial --from run finished (the same pairs for every recipe)
    covered = np.array(sorted(i for f in saved for i in f["test_ids"]))
    n = len(covered)
    p_raw, p_cal, p_cross, per_fold = np.zeros(len(pairs)), np.zeros(len(pairs)), np.zeros(len(pairs)), []
    for k, f in enumerate(saved):
        # Cross-fitting as `--calibration-folds` does it, from the same runs: T fitted on the out-of-fold
        # differences of the OTHER folds' models (~80% of the file, by models trained on 80% of it, as fold k's was).
        others = [d for j, g in enumerate(saved) if j != k for d in g["test_diffs"]]
        crossfit = cal.fit(others, settings.calibration, reward_mean=0.0, reward_std=1.0, data="", fingerprint="",
                           prior_sd=replace(settings, calibration_folds=len(saved)).prior_sd)
        p_cross[f["test_ids"]] = crossfit.probabilities(f["test_diffs"])
        # The same fit train-reward makes at the end of training, on the same held-out differences.
        calibration = cal.fit(f["heldout_diffs"], settings.calibration, reward_mean=0.0, reward_std=1.0, data="",
                              fingerprint="", prior_sd=settings.prior_sd)
        p_raw[f["test_ids"]] = raw_probabilities(f["test_diffs"])
        p_cal[f["test_ids"]] = calibration.probabilities(f["test_diffs"])
        per_fold.append({"fold": k, "calibration_pairs": len(f["heldout_diffs"]),
                         "temperature": round(calibration.temperature, 3),
                         "temperature_ml": round(calibration.temperature_ml, 3),
                         "temperature_crossfit": round(crossfit.temperature, 3),
                         "test_temperature": round(cal.fit_temperature(f["test_diffs"]), 3),
                         "test_accuracy": round(pair_metrics(p_raw[f["test_ids"]])["accuracy"], 4)})
        print(json.dumps(per_fold[-1]), file=sys.stderr, flush=True)
    p_raw, p_cal, p_cross = p_raw[covered], p_cal[covered], p_cross[covered]
    if args.plot:
        from toolkit.reward.plots import reliability_diagram

        reliability_diagram({"raw": p_raw, settings.calibration: p_cal, "cross-fitted": p_cross}, args.plot,
                            title=f"{len(saved)}-fold out-of-fold pairs (n={n})")

    kept, curves = selective(saved, p_cal, covered)
    if args.coverage_plot:
        from toolkit.reward.plots import coverage_plot

        coverage_plot(curves, args.coverage_plot, title=f"{len(saved)}-fold out-of-fold pairs (n={n})")

    def rounded(metrics: dict) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}

    noise = ece_noise(p_cal)
    against = None
    if args.against:
        other = np.full(len(pairs), np.nan)
        for f in read_folds(args.against):
            other[f["test_ids"]] = pair_correct(raw_probabilities(f["test_diffs"]))
        both = ~np.isnan(other[covered])
        # a temperature never flips a verdict, so raw and calibrated accuracy are the same
        gain = 100 * (pair_correct(p_raw[both]) - other[covered][both])
        against = {"dir": args.against, **paired_points(gain.tolist()),
                   "better": int((gain > 0).sum()), "worse": int((gain < 0).sum())}
    print(json.dumps({
        "pairs": n, "folds": len(saved),
        "settings": {"peer": "trl", **overrides} if args.peer else overrides or "defaults",
        "raw": rounded(pair_metrics(p_raw)), "calibrated": rounded(pair_metrics(p_cal)),
        "calibrated_crossfit": rounded(pair_metrics(p_cross)), "accuracy_of_surest": kept,
        "ece_noise_median": round(noise["median"], 4), "ece_noise_p90": round(noise["p90"], 4),
        "temperatures": [f["temperature"] for f in per_fold],
        "temperatures_ml": [f["temperature_ml"] for f in per_fold],
        "temperatures_crossfit": [f["temperature_crossfit"] for f in per_fold],
        "train_seconds": [f.get("seconds") for f in saved],
        "test_temperatures": [f["test_temperature"] for f in per_fold],
        "test_accuracies": [f["test_accuracy"] for f in per_fold],
        **({"against": against} if against else {}),
        "shorter_wins": round(shorter_wins(pairs), 4), "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
