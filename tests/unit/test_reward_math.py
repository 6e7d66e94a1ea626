"""Reward-model math: the Bradley–Terry loss, calibration, and the metrics (checked against scikit-learn)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from toolkit.errors import UserError
from toolkit.reward import calibrate as cal
from toolkit.reward.constants import TEMPERATURE_PRIOR_SD
from toolkit.reward.metrics import auc, bin_ids, ece, ece_noise, pair_metrics, raw_probabilities, symmetric
from toolkit.reward.train import bradley_terry_loss, length_grouped_batches


def test_bradley_terry_loss_by_hand():
    r_c = torch.tensor([2.0, 0.0, -1.0])
    r_r = torch.tensor([1.0, 0.0, 1.0])
    # −log σ(x) = log(1 + e^{−x}) for x = 1, 0, −2
    expected = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(2))) / 3
    assert bradley_terry_loss(r_c, r_r).item() == pytest.approx(expected, rel=1e-6)


def test_margin_and_centering_terms():
    r_c, r_r = torch.tensor([2.0]), torch.tensor([1.0])
    with_margin = bradley_terry_loss(r_c, r_r, margin=torch.tensor([1.0]))
    assert with_margin.item() == pytest.approx(math.log(2), rel=1e-6)  # 2 − 1 − 1 = 0
    centered = bradley_terry_loss(r_c, r_r, center=0.01)
    assert centered.item() == pytest.approx(math.log(1 + math.exp(-1)) + 0.01 * 9.0, rel=1e-6)


def test_loss_gradient_pushes_chosen_up_and_rejected_down():
    r_c = torch.tensor([0.3], requires_grad=True)
    r_r = torch.tensor([0.5], requires_grad=True)
    bradley_terry_loss(r_c, r_r).backward()
    sigma = 1 / (1 + math.exp(-(0.3 - 0.5)))
    assert r_c.grad.item() == pytest.approx(-(1 - sigma), rel=1e-6)
    assert r_r.grad.item() == pytest.approx(1 - sigma, rel=1e-6)


def test_temperature_against_a_hand_computed_optimum():
    # Three pairs right and one wrong, all with |d| = 1: the NLL optimum puts σ(1/T) = 3/4, so T = 1/ln 3.
    t = cal.fit_temperature([1.0, 1.0, 1.0, -1.0])
    assert t == pytest.approx(1 / math.log(3), rel=1e-5)
    # And it is a minimum: any other T has a higher NLL.
    d = np.array([1.0, 1.0, 1.0, -1.0])
    assert cal.nll_at_temperature(d, t) < min(cal.nll_at_temperature(d, t * 1.1), cal.nll_at_temperature(d, t / 1.1))


def test_map_temperature_solves_the_penalized_first_order_condition():
    # d/du of mean softplus(−d e^−u) + u² / (2 s² n) at u = log T, written out by hand, must vanish.
    d, s = np.array([1.0, 1.0, 1.0, -1.0]), 0.2
    t = cal.fit_temperature(d, prior_sd=s)
    u = math.log(t)
    sigmoid = 1 / (1 + np.exp(d * np.exp(-u)))  # σ(−d/T)
    gradient = np.mean(sigmoid * d * np.exp(-u)) + u / (s * s * len(d))
    assert gradient == pytest.approx(0.0, abs=1e-7)
    ml = cal.fit_temperature(d)  # 1 / ln 3 ≈ 0.91: the prior pulls T between it and 1
    assert ml < t < 1.0
    assert cal.fit_temperature(d, prior_sd=math.inf) == pytest.approx(ml, rel=1e-9)


def test_map_temperature_follows_the_data_when_there_are_many_pairs():
    rng = np.random.default_rng(0)
    z = np.abs(rng.normal(0, 1, 4000))
    d = np.where(rng.random(4000) < 1 / (1 + np.exp(-z)), 1, -1) * z * 3.0  # three times too confident
    assert cal.fit_temperature(d, prior_sd=TEMPERATURE_PRIOR_SD) == pytest.approx(3.0, rel=0.1)


def test_map_temperature_is_closer_to_the_truth_on_small_held_out_sets():
    """A calibrated model (true T = 1), held-out sets of 92 pairs with reward gaps as small as a 1-epoch HH
    model's: plain maximum likelihood scatters T widely, the prior keeps it near 1."""
    rng = np.random.default_rng(3)
    errors_ml, errors_map = [], []
    for _ in range(200):
        z = rng.normal(0, 0.5, 92)
        d = np.where(rng.random(92) < 1 / (1 + np.exp(-z)), z, -z)
        errors_ml.append(abs(math.log(cal.fit_temperature(d))))
        errors_map.append(abs(math.log(cal.fit_temperature(d, prior_sd=TEMPERATURE_PRIOR_SD))))
    assert np.median(errors_map) < 0.5 * np.median(errors_ml)


def test_calibration_file_keeps_the_prior_and_reads_old_files(tmp_path):
    d = [0.5, 0.2, -0.1, 0.7]
    c = cal.fit(d, "temperature", reward_mean=0.0, reward_std=1.0, data="x", fingerprint="f")
    assert c.prior_sd == TEMPERATURE_PRIOR_SD and c.temperature_ml == pytest.approx(cal.fit_temperature(d))
    cal.write(c, tmp_path)
    back = cal.read(tmp_path)
    assert back.temperature == c.temperature and back.prior_sd == c.prior_sd
    plain = cal.fit(d, "temperature", reward_mean=0.0, reward_std=1.0, data="x", fingerprint="f", prior_sd=math.inf)
    assert plain.temperature == pytest.approx(plain.temperature_ml)
    cal.write(plain, tmp_path)  # inf is not JSON: written as null, read as "no prior"
    assert cal.read(tmp_path).prior_sd is None
    raw = json.loads((tmp_path / "calibration.json").read_text())
    del raw["prior_sd"], raw["temperature_ml"]  # a file from before the prior existed
    (tmp_path / "calibration.json").write_text(json.dumps(raw))
    assert cal.read(tmp_path).temperature == pytest.approx(plain.temperature)
    with pytest.raises(UserError, match="temperature-prior-sd"):
        cal.fit(d, "temperature", reward_mean=0.0, reward_std=1.0, data="x", fingerprint="f", prior_sd=0.0)


def test_temperature_of_an_overconfident_model_is_above_one():
    rng = np.random.default_rng(0)
    # The chosen answer wins with probability σ(z); the model says σ(3z): three times too confident.
    z = np.abs(rng.normal(0, 1, 4000))
    d = np.where(rng.random(4000) < 1 / (1 + np.exp(-z)), 1, -1) * z * 3.0
    assert cal.fit_temperature(d) == pytest.approx(3.0, rel=0.1)


def test_calibration_lowers_nll_and_ece_of_an_overconfident_model():
    rng = np.random.default_rng(1)
    z = np.abs(rng.normal(0, 1.5, 3000))
    d = np.where(rng.random(3000) < 1 / (1 + np.exp(-z)), 1, -1) * z * 4.0
    c = cal.fit(d.tolist(), "temperature", reward_mean=0.0, reward_std=1.0, data="x", fingerprint="f")
    assert c.metrics["calibrated"]["nll"] < c.metrics["raw"]["nll"]
    assert c.metrics["calibrated"]["ece"] < c.metrics["raw"]["ece"]
    assert c.metrics["calibrated"]["ece"] < 0.03
    assert c.metrics["calibrated"]["accuracy"] == c.metrics["raw"]["accuracy"]


def test_isotonic_is_monotone_and_symmetric():
    rng = np.random.default_rng(2)
    d = rng.normal(0.5, 2.0, 500)
    x, y = cal.fit_isotonic(d)
    assert all(b >= a for a, b in zip(y, y[1:], strict=False))
    grid = np.linspace(-5, 5, 41)
    p = np.interp(grid, x, y)
    assert np.allclose(p + np.interp(-grid, x, y), 1.0, atol=1e-9)


def test_metrics_against_scikit_learn():
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

    rng = np.random.default_rng(3)
    p = np.clip(rng.beta(4, 2, 300), 1e-6, 1 - 1e-6)
    m = pair_metrics(p)
    labels, prob = symmetric(p)
    assert m["brier"] == pytest.approx(brier_score_loss(labels, prob), rel=1e-9)
    assert m["nll"] == pytest.approx(log_loss(labels, prob), rel=1e-9)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, prob), rel=1e-9)
    assert m["accuracy"] == pytest.approx(np.mean(p > 0.5))
    frac_pos, mean_pred = calibration_curve(labels, prob, n_bins=15, strategy="uniform")
    counts = np.bincount(bin_ids(prob), minlength=15)
    counts = counts[counts > 0]
    assert m["ece"] == pytest.approx(np.sum(counts / len(prob) * np.abs(frac_pos - mean_pred)), rel=1e-9)
    assert m["n"] == 300 and m["ties"] == 0


def test_auc_with_ties_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    labels = np.array([1, 1, 0, 0, 1, 0])
    scores = np.array([0.5, 0.7, 0.5, 0.2, 0.5, 0.7])
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_ties_count_half_and_ece_by_hand():
    p = raw_probabilities([0.0, 0.0, 2.0, -2.0])
    m = pair_metrics(p)
    assert m["ties"] == 2
    assert m["accuracy"] == pytest.approx((1 + 0.5 * 2) / 4)
    # Bins: the four 0.5s (label 1,0,1,0) -> gap 0; σ(2)=0.881 twice with labels 1,0 -> gap |0.5−0.881|;
    # 1−σ(2)=0.119 twice with labels 0,1 -> the same gap; each such bin holds 2 of 8 predictions.
    s = 1 / (1 + math.exp(-2))
    assert m["ece"] == pytest.approx(2 * (2 / 8) * abs(0.5 - s))
    labels, prob = symmetric(p)
    assert ece(labels, prob) == m["ece"]


def test_length_grouped_batches_cover_everything_once_and_reduce_padding():
    rng = np.random.default_rng(4)
    lengths = rng.integers(10, 256, 1000).tolist()
    grouped = length_grouped_batches(lengths, 16, seed=0)
    plain = length_grouped_batches(lengths, 16, seed=0, group=False)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert sorted(i for b in plain for i in b) == list(range(1000))

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert padded(grouped) < 0.7 * padded(plain)
    assert length_grouped_batches(lengths, 16, seed=1) != grouped  # another epoch, another order


def test_prompt_units_stay_side_by_side_and_single_items_batch_as_before():
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 7, 200).tolist()  # pairs per prompt: 1 … 6
    units, start = [], 0
    for size in sizes:
        units.append(list(range(start, start + size)))
        start += size
    lengths = rng.integers(10, 256, start).tolist()
    for group in (True, False):
        batches = length_grouped_batches(lengths, 16, seed=0, group=group, units=units)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(start))
        if not group:  # one shuffled order: a unit's items are consecutive in it
            assert all(flat.index(u[-1]) - flat.index(u[0]) == len(u) - 1 for u in units)
        # a unit's items are cut over at most two batches
        batch_of = {i: k for k, b in enumerate(batches) for i in b}
        assert all(len({batch_of[i] for i in u}) <= 2 for u in units)
        together = sum(len({batch_of[i] for i in u}) == 1 for u in units)
        assert together > 0.6 * len(units)
        singles = [[i] for i in range(start)]
        assert (length_grouped_batches(lengths, 16, seed=3, group=group, units=singles)
                == length_grouped_batches(lengths, 16, seed=3, group=group))


def test_a_text_that_recurs_in_a_micro_batch_is_forwarded_once():
    from types import SimpleNamespace

    from toolkit.reward.model import pad
    from toolkit.reward.train import TrainConfig, _batch_tensors, prompt_units
    from toolkit.rows import Pair

    # one prompt's three answers a > b > c as its three comparisons, and a pair of another prompt
    pairs = [Pair("p1", "a", "b"), Pair("p1", "a", "c"), Pair("p1", "b", "c"), Pair("p2", "x", "y")]
    assert prompt_units(pairs) == [[0, 1, 2], [3]]
    token = {"a": [5, 6, 7], "b": [5, 8], "c": [5, 9, 9, 9], "x": [4], "y": [4, 3]}
    ids = [token[t] for p in pairs for t in (p.chosen, p.rejected)]
    run = SimpleNamespace(ids=ids, tokenizer=SimpleNamespace(pad_token_id=0), shared=False,
                          units=prompt_units(pairs))
    cfg = TrainConfig(data="d", out="o")
    batch = [0, 1, 2, 3]
    (input_ids, mask), gather = _batch_tensors(cfg, run, batch)
    assert input_ids.shape[0] == 5  # a, b, c, x, y: 5 forwards for 8 texts
    every_text, every_mask = pad([ids[2 * i] for i in batch] + [ids[2 * i + 1] for i in batch], 0)
    # the reward of the batch's k-th text (chosen first, then rejected) is the forward's gather[k]-th
    assert input_ids[gather].tolist() == every_text.tolist()
    assert mask[gather].tolist() == every_mask.tolist()
    run.units = None  # --no-group-by-prompt: every text forwarded
    (input_ids, _), gather = _batch_tensors(cfg, run, batch)
    assert input_ids.shape[0] == 8 and gather is None


def test_ece_noise_of_a_constant_confidence_by_hand():
    # Every pair at p = 0.7: both non-empty bins hold one side of each pair, so ECE = |k/n − 0.7| with
    # k ~ Binomial(n, 0.7) chosen wins; its median is ≈ 0.6745 · sqrt(0.7 · 0.3 / n) (normal approximation).
    n = 400
    noise = ece_noise([0.7] * n, draws=4000)
    expected_median = 0.6745 * math.sqrt(0.21 / n)
    assert noise["median"] == pytest.approx(expected_median, rel=0.15)
    assert noise["p90"] == pytest.approx(1.645 * math.sqrt(0.21 / n), rel=0.15)
    assert ece_noise([0.7] * (4 * n), draws=4000)["median"] == pytest.approx(expected_median / 2, rel=0.15)


def test_ece_noise_is_zero_for_coin_flips_and_seeded():
    assert ece_noise([0.5] * 50)["median"] == 0.0  # σ = 1/2 both ways: nothing to miscalibrate
    p = np.random.default_rng(1).uniform(0.3, 0.9, 200)
    assert ece_noise(p) == ece_noise(p)
