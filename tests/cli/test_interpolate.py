"""`llamakit interpolate` (WiSE-FT towards the base) on tiny random LLaMAs, through the real CLI in this process.

The truths checked: the weight search against hand-computed quadratic, cubic and linear KL curves; the written
model is exactly θ_base + w·(θ_policy − θ_base), a tied embedding moved once; with --kl-target the measured KL
at the kept weight is within the target and the first measurement (w = 1) is not; bad input is one line and
exit 2, and --out never replaces what the user had.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from support.cli import FIXTURES, cli

from toolkit.interpolate import Measurement, choose_weight, next_weight, set_weight, trainable_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def curve(kl_at_one: float, power: float):
    calls: list[float] = []

    def measure(w: float) -> Measurement:
        calls.append(w)
        return Measurement(w, kl_at_one * w ** power, 0.0)

    return measure, calls


def test_a_quadratic_kl_is_met_in_two_measurements():
    """KL(w) = 8w², target 4.5: w = √(4.5/8) = 0.75 after the first measurement, where KL = 4.5 exactly."""
    measure, calls = curve(8.0, 2)
    weight, measurements, found = choose_weight(measure, 1.0, 4.5, tries=3)
    assert found and weight == pytest.approx(0.75) and calls == [1.0, pytest.approx(0.75)]
    assert measurements[-1].kl == pytest.approx(4.5)


def test_a_policy_already_within_the_target_is_kept_whole():
    measure, calls = curve(3.0, 2)
    assert choose_weight(measure, 1.0, 4.5, tries=3) == (1.0, [Measurement(1.0, 3.0, 0.0)], True)
    assert calls == [1.0]


def test_a_kl_flatter_than_quadratic_ends_on_the_model_weight_unmeasured():
    """KL(w) = 8w: 1 -> 0.75 (KL 6) -> 0.75·√0.75 = 0.6495 (KL 5.196), both over 4.5; the third weight,
    0.6495·√(4.5/5.196) = 0.6045, is what the quadratic model predicts and is not measured."""
    measure, calls = curve(8.0, 1)
    weight, measurements, found = choose_weight(measure, 1.0, 4.5, tries=3)
    assert not found and len(calls) == 3
    assert [round(m.kl, 3) for m in measurements] == [8.0, 6.0, 5.196]
    assert weight == pytest.approx(0.75 * math.sqrt(0.75) * math.sqrt(4.5 / (8 * 0.75 * math.sqrt(0.75))))
    assert next_weight(0.5, 0.0, 4.5) == 0.5  # no KL measured: nothing to scale


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("interpolate")


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, work) -> Path:
    """The tiny model with every parameter moved (a stand-in for a trained policy), its final norm × 4 so its
    KL from the base is large."""
    import torch

    from toolkit.models import load_causal_lm

    model, tokenizer = load_causal_lm(tiny_llama_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
        model.model.norm.weight.mul_(4.0)
    model.save_pretrained(work / "trained", safe_serialization=True)
    tokenizer.save_pretrained(work / "trained")
    return work / "trained"


def params(path: Path) -> dict:
    from toolkit.models import load_causal_lm

    return {k: v.clone() for k, v in load_causal_lm(path)[0].state_dict().items()}


def test_set_weight_moves_a_tied_embedding_once(tiny_llama_dir, trained):
    from toolkit.models import load_causal_lm

    model, base = load_causal_lm(trained)[0], load_causal_lm(tiny_llama_dir)[0]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tiny config ties them
    before, start = params(trained), params(tiny_llama_dir)
    pairs = trainable_pairs(model, base)
    set_weight(pairs, 1.0, 0.5)
    set_weight(pairs, 0.5, 0.25)
    for name, value in model.state_dict().items():
        expected = start[name] + 0.25 * (before[name] - start[name])
        assert value.sub(expected).abs().max().item() < 1e-6, name


def test_a_fixed_weight_writes_the_interpolated_model(tiny_llama_dir, trained, work):
    out = work / "half"
    rc, stdout, err = cli("interpolate", "--policy", trained, "--base", tiny_llama_dir, "--weight", "0.5",
                          "--out", out, "--json")
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["weight"] == 0.5 and summary["measurements"] == [] and summary["within_kl_target"] is None
    got, policy, base = params(out), params(trained), params(tiny_llama_dir)
    for name, value in got.items():
        assert value.sub((policy[name] + base[name]) / 2).abs().max().item() < 1e-6, name
    manifest = json.loads((out / "llamakit-manifest.json").read_text(encoding="utf-8"))
    assert (manifest["kind"], manifest["weight"]) == ("interpolated-model", 0.5)
    assert "θ_base + 0.500" in (out / "README.md").read_text(encoding="utf-8")


def test_kl_target_keeps_a_measured_weight_within_it(tiny_llama_dir, trained, work):
    """The first measurement is the policy itself, over the target; the weight kept was measured within it, and
    eval-policy's KL of the written model (same prompts, seeds and settings) is that measurement."""
    settings = ("--prompts", FIXTURES / "prompts-alpaca-32.jsonl", "--limit", "8", "--max-new-tokens", "12",
                "--batch-size", "8", "--temperature", "1.0", "--seed", "0")
    out = work / "targeted"
    rc, stdout, err = cli("interpolate", "--policy", trained, "--base", tiny_llama_dir, "--kl-target", "1.0",
                          "--tries", "5", "--out", out, "--json", *settings)
    assert rc == 0, err
    summary = json.loads(stdout)
    first, last = summary["measurements"][0], summary["measurements"][-1]
    assert first["weight"] == 1.0 and first["kl"] > 1.0
    assert summary["within_kl_target"] is True and last["kl"] <= 1.0 and last["weight"] == summary["weight"] < 1
    rc, stdout, err = cli("eval-policy", out, "--baseline", tiny_llama_dir, "--json", *settings[:2],
                          "--limit", "8", "--max-new-tokens", "12", "--batch-size", "8", "--temperature", "1.0")
    assert rc == 0, err
    assert json.loads(stdout)["kl"] == pytest.approx(last["kl"], abs=1e-3)


def one_line_error(rc: int, err: str) -> str:
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_bad_input_is_one_line_and_nothing_is_replaced(tiny_llama_dir, trained, work, tmp_path):
    from support.tiny_models import save_tiny_llama

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me", encoding="utf-8")
    line = one_line_error(*cli("interpolate", "--policy", trained, "--base", tiny_llama_dir, "--weight", "0.5",
                               "--out", mine)[::2])
    assert "not written by llamakit" in line and (mine / "notes.txt").read_text(encoding="utf-8") == "keep me"
    line = one_line_error(*cli("interpolate", "--policy", trained, "--base", tiny_llama_dir, "--kl-target", "2",
                               "--out", tmp_path / "a")[::2])
    assert "--prompts" in line
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "Name a fruit."}\n{not json\n', encoding="utf-8")
    line = one_line_error(*cli("interpolate", "--policy", trained, "--base", tiny_llama_dir, "--kl-target", "2",
                               "--prompts", broken, "--out", tmp_path / "a")[::2])
    assert f"{broken}:2" in line and not (tmp_path / "a").exists()
    line = one_line_error(*cli("interpolate", "--policy", trained, "--base", tiny_llama_dir, "--out",
                               tmp_path / "b")[::2])
    assert "nothing to do" in line
    other = save_tiny_llama(tmp_path / "wider", hidden=32)
    line = one_line_error(*cli("interpolate", "--policy", trained, "--base", other, "--weight", "0.5", "--out",
                               tmp_path / "c")[::2])
    assert "--base" in line and "shape" in line
    assert not (tmp_path / "c").exists()
    own = ("interpolate", "--policy", trained, "--base", tiny_llama_dir, "--weight", "0.5", "--out", tmp_path / "own")
    assert cli(*own)[0] == 0
    assert "--overwrite" in one_line_error(*cli(*own)[::2])  # its own earlier output: replaced only when asked
    assert cli(*own, "--overwrite")[0] == 0
