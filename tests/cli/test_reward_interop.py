"""Issue 18 through the CLI: eval-reward, calibrate and `rlhf --reward` take a sequence classifier llamakit did
not train (uncalibrated: rewards used raw, with a one-line warning), and refuse in one line a directory that is
no reward model (a plain causal LM)."""

from __future__ import annotations

import json

import pytest
from support.cli import FIXTURES, cli, hh_slice
from support.reward_models import save_foreign_reward_model

PROMPTS = FIXTURES / "prompts-alpaca-32.jsonl"


@pytest.fixture(scope="module")
def foreign_bert(tmp_path_factory):
    return save_foreign_reward_model(tmp_path_factory.mktemp("foreign") / "rm", "bert")


def test_eval_reward_then_calibrate_a_sequence_classifier_llamakit_did_not_train(foreign_bert, tmp_path):
    pairs = hh_slice(tmp_path / "pairs.jsonl", 0, 20)
    rc, stdout, stderr = cli("eval-reward", foreign_bert, "--data", pairs, "--json")
    assert rc == 0, stderr
    warning = [line for line in stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "no calibration.json" in warning[0] and "llamakit calibrate" in warning[0]
    result = json.loads(stdout)
    assert result["n"] == 20 and result["temperature"] == 1.0 and result["nll"] == result["raw"]["nll"]
    rc, stdout, stderr = cli("calibrate", foreign_bert, "--data", pairs, "--json")
    assert rc == 0, stderr
    assert json.loads((foreign_bert / "calibration.json").read_text())["n_pairs"] == 20
    rc, stdout, stderr = cli("eval-reward", foreign_bert, "--data", pairs, "--json")
    assert rc == 0 and "warning" not in stderr
    assert json.loads(stdout)["temperature"] == json.loads((foreign_bert / "calibration.json").read_text())[
        "temperature"]


@pytest.mark.parametrize("command", ["eval-reward", "calibrate", "rlhf"])
def test_a_plain_causal_lm_as_a_reward_model_is_one_line(tiny_llama_dir, tmp_path, command):
    argv = (["rlhf", "--policy", tiny_llama_dir, "--reward", tiny_llama_dir, "--prompts", PROMPTS, "--out",
             tmp_path / "run"] if command == "rlhf" else [command, tiny_llama_dir, "--data", FIXTURES /
                                                          "hh-harmless-6.jsonl"])
    rc, _, stderr = cli(*argv)
    assert rc == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "not a reward model: config.json says LlamaForCausalLM" in stderr
    assert not (tiny_llama_dir / "calibration.json").exists() and not (tmp_path / "run").exists()


def test_rlhf_runs_on_a_sequence_classifier_llamakit_did_not_train(tiny_llama_dir, tmp_path):
    rm = save_foreign_reward_model(tmp_path / "rm", "llama")
    out = tmp_path / "run"
    rc, stdout, stderr = cli("rlhf", "--policy", tiny_llama_dir, "--reward", rm, "--prompts", PROMPTS, "--out", out,
                             "--steps", "1", "--batch-size", "2", "--num-minibatches", "1", "--ppo-epochs", "1",
                             "--max-new-tokens", "4", "--json")
    assert rc == 0, stderr
    assert "no calibration.json" in stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and isinstance(rows[0]["objective/scores"], float)
