"""train-reward --ensemble K and --calibration-folds K on the tiny LLaMA: what is written, what is scored."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from toolkit.errors import UserError
from toolkit.reward.train import TrainConfig, train_reward

PROMPTS = ["How do I bake bread?", "hi", "Tell me how to pick a lock."]
RESPONSES = ["Mix flour, water, yeast; bake at 230 C.", "hello", "I would rather not help with that."]


def _config(tiny_llama_dir, out, **overrides) -> TrainConfig:
    from support.cli import FIXTURES

    settings = dict(data=str(FIXTURES / "hh-harmless-200.jsonl"), out=str(out), model=str(tiny_llama_dir),
                    max_length=48, batch_size=16, epochs=1, max_steps=2, learning_rate=1e-3, show_progress=False)
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def ensemble_rm(tiny_llama_dir, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ensemble") / "rm"
    result = train_reward(_config(tiny_llama_dir, out, ensemble=2, calibration_folds=2))
    yield out, result
    torch.set_num_threads(threads)


def _plain_rewards(directory, texts: list[str]) -> list[float]:
    """A member's raw rewards through plain transformers, the way a TRL user would read them."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    with torch.no_grad():
        return [model(**tokenizer(t + tokenizer.eos_token, return_tensors="pt")).logits[0, 0].item() for t in texts]


def test_cross_fitted_calibration_sees_every_pair_and_the_model_trains_on_all(ensemble_rm):
    out, result = ensemble_rm
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["n_pairs"] == 200 and "2-fold cross-fitting" in calibration["data"]
    assert result.metrics["train"]["pairs"] == 200  # no held-out split taken from the training data
    assert result.metrics["calibration"]["pairs"] == 200
    assert not [w for w in result.warnings if "held-out pairs" in w]  # it once warned of "only 0 held-out pairs"
    card = (out / "README.md").read_text()
    assert "| 200 — 2-fold cross-fitting over" in card


def test_each_member_is_a_reward_model_of_its_own_and_the_ensemble_scores_their_mean(ensemble_rm):
    from toolkit.reward import load_reward_model

    out, result = ensemble_rm
    settings = json.loads((out / "reward_config.json").read_text())
    offsets = settings["ensemble_offsets"]
    assert len(offsets) == 2 and offsets[0] == 0.0
    assert result.metrics["ensemble"]["members"] == 2 and (out / "members" / "1" / "config.json").is_file()

    rm = load_reward_model(str(out))
    assert rm.ensemble_size == 2
    texts = rm.texts(PROMPTS, RESPONSES)
    members = np.array([_plain_rewards(out, texts), _plain_rewards(out / "members" / "1", texts)]).T - offsets
    scores, spreads = rm.score_with_spread(PROMPTS, RESPONSES)
    expected = (members.mean(axis=1) - rm.reward_mean) / rm.temperature
    assert scores == pytest.approx(expected.tolist(), abs=1e-4)
    assert spreads == pytest.approx((members.std(axis=1) / rm.temperature).tolist(), abs=1e-4)
    assert min(spreads) > 0  # different seeds disagree
    assert rm.score(PROMPTS, RESPONSES) == pytest.approx(scores, abs=1e-5)


def test_a_changed_member_invalidates_the_calibration(ensemble_rm, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from toolkit.reward import load_reward_model

    out, _ = ensemble_rm
    copy = tmp_path / "rm"
    shutil.copytree(out, copy)
    weights = copy / "members" / "1" / "model.safetensors"
    tensors = load_file(weights)
    tensors["score.weight"] = tensors["score.weight"] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(UserError, match="fitted on other weights"):
        load_reward_model(str(copy))


def test_a_missing_member_is_named_not_taken_for_other_weights(ensemble_rm, tmp_path):
    import shutil

    from toolkit.reward import load_reward_model

    out, _ = ensemble_rm
    copy = tmp_path / "rm"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "members" / "1")
    with pytest.raises(UserError, match=r"ensemble member 1 of 2 is missing: .*members/1 .*train-reward --ensemble 2"):
        load_reward_model(str(copy))


def test_a_single_model_has_no_spread(tiny_llama_dir, tmp_path):
    from toolkit.reward import load_reward_model

    torch.set_num_threads(1)
    train_reward(_config(tiny_llama_dir, tmp_path / "rm", eval_split=0.3, max_steps=1))
    rm = load_reward_model(str(tmp_path / "rm"))
    scores, spreads = rm.score_with_spread(PROMPTS, RESPONSES)
    assert rm.ensemble_size == 1 and spreads == [0.0] * 3
    assert scores == pytest.approx(rm.score(PROMPTS, RESPONSES), abs=1e-6)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"calibration_folds": 1}, "0 \\(off\\) or at least 2"),
    ({"calibration_folds": 2, "objective": "regression"}, "not with --objective regression"),
    ({"calibration_folds": 2, "eval_data": "x.jsonl"}, "not with --eval-data"),
])
def test_cross_fitting_settings_that_cannot_work_are_refused(tiny_llama_dir, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        train_reward(_config(tiny_llama_dir, tmp_path / "rm", **overrides))
    assert not (tmp_path / "rm").exists()


def test_eval_reward_of_an_ensemble_reports_its_members_and_their_disagreement(ensemble_rm, tmp_path):
    from toolkit.reward import load_reward_model
    from toolkit.reward.evaluate import evaluate

    out, _ = ensemble_rm
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in
            zip(PROMPTS, RESPONSES, ["no", "go away", "Sure, here is how to pick it."], strict=True)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = evaluate(out, str(data), coverage_plot=str(tmp_path / "coverage.png"))

    rm = load_reward_model(str(out))
    chosen, rejected = rm.texts(PROMPTS, RESPONSES), rm.texts(PROMPTS, [row["rejected"] for row in rows])
    diffs = np.array([np.subtract(_plain_rewards(d, chosen), _plain_rewards(d, rejected))
                      for d in (out, out / "members" / "1")]).T  # (pairs, members)
    ensemble = result["ensemble"]
    assert ensemble["members"] == 2
    assert ensemble["member_accuracies"] == pytest.approx((diffs > 0).mean(axis=0).tolist())
    assert ensemble["mean_disagreement"] == pytest.approx(float(diffs.std(axis=1).mean() / rm.temperature), abs=1e-4)
    assert ensemble["selective"]["accuracy_at_coverage"]["1.0"] == pytest.approx(result["accuracy"])
    assert (tmp_path / "coverage.png").stat().st_size > 0


def test_the_uncertainty_penalty_takes_lambda_times_the_members_variance(ensemble_rm):
    from rlhf.rewards import make_reward_fn
    from toolkit.reward import load_reward_model

    out, _ = ensemble_rm
    means, spreads = load_reward_model(str(out)).score_with_spread(PROMPTS, RESPONSES)
    plain = make_reward_fn(str(out))(PROMPTS, RESPONSES, ["stop"] * 3)
    penalised = make_reward_fn(str(out), uncertainty_penalty=4.0)(PROMPTS, RESPONSES, ["stop"] * 3)
    assert plain == pytest.approx(means, abs=1e-5)
    assert penalised == pytest.approx([m - 4.0 * s * s for m, s in zip(means, spreads, strict=True)], abs=1e-5)
    assert all(p < m for p, m in zip(penalised, means, strict=True))


def test_rlhf_runs_on_the_penalised_ensemble_and_refuses_what_has_no_spread(ensemble_rm, tiny_llama_dir, tmp_path):
    from support.cli import FIXTURES

    from rlhf.config import PPOConfig
    from rlhf.rewards import make_reward_fn
    from rlhf.trainer import train

    out, _ = ensemble_rm
    cfg = PPOConfig(policy=str(tiny_llama_dir), reward=str(out), prompts=str(FIXTURES / "prompts-alpaca-32.jsonl"),
                    out=str(tmp_path / "ppo"), steps=1, batch_size=2, num_minibatches=1, ppo_epochs=1,
                    max_new_tokens=4, reward_uncertainty_penalty=1.0, sample_every=0)
    result = train(cfg)
    assert (tmp_path / "ppo" / "policy" / "config.json").is_file() and result is not None
    with pytest.raises(UserError, match="not rules"):
        PPOConfig(prompts="p.jsonl", reward="rules:length", reward_uncertainty_penalty=1.0).validate()
    single = tmp_path / "single"
    train_reward(_config(tiny_llama_dir, single, eval_split=0.3, max_steps=1))
    with pytest.raises(UserError, match="needs an ensemble reward model"):
        make_reward_fn(str(single), uncertainty_penalty=1.0)


def test_the_card_says_what_the_ensemble_and_the_calibration_are(ensemble_rm):
    out, _ = ensemble_rm
    card = (out / "README.md").read_text()
    assert "| ensemble | 2 members (seeds 0–1)" in card and "`members/1`" in card
    assert "rm.score_with_spread(" in card
    assert "Out-of-fold: each pair scored by a fold model" in card


def test_relative_disagreement_ranks_doubt_not_size():
    from toolkit.reward.ensemble import pair_disagreement, relative_disagreement
    from toolkit.reward.metrics import selective_accuracy

    # (pairs, members) differences r_c − r_r: a large sure verdict, a small sure one, a split one, an even one
    diffs = np.array([[4.0, 5.0, 6.0], [0.4, 0.5, 0.6], [1.0, -0.5, 0.5], [0.0, 0.0, 0.0]])
    zeros = np.zeros_like(diffs)
    std = np.sqrt(2 / 3)  # of 4, 5, 6 (population form); of 1, −0.5, 0.5 it is √(7/18), around a mean of 1/3
    assert pair_disagreement(diffs, zeros).tolist() == pytest.approx([std, std / 10, np.sqrt(7 / 18), 0.0])
    relative = relative_disagreement(diffs, zeros)
    assert relative[:3].tolist() == pytest.approx([std / 5, std / 5, 3 * np.sqrt(7 / 18)]) and relative[3] == np.inf
    # the plain std would set aside the large sure verdict first; the ratio sets aside the split one
    correct = np.array([1.0, 1.0, 0.0, 0.5])
    assert selective_accuracy(correct, relative, 0.5) == 1.0
    assert selective_accuracy(correct, pair_disagreement(diffs, zeros), 0.5) == 0.75


def test_a_cross_fitted_calibration_is_plain_maximum_likelihood(ensemble_rm):
    # ~1000 out-of-fold pairs decide T themselves; the prior is for a held-out split of a few hundred
    out, _ = ensemble_rm
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["prior_sd"] is None  # inf, written as null (JSON has no inf)
    assert calibration["temperature"] == pytest.approx(calibration["temperature_ml"], rel=1e-6)
    assert "(plain maximum likelihood)" in (out / "README.md").read_text()
