"""`llamakit rlhf` as a user runs it: a complete output directory, bad input, and two DDP processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.cli import FIXTURES, ROOT, free_port, run_cli

PROMPTS = FIXTURES / "prompts-alpaca-32.jsonl"
TRL_METRICS = ("objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward",
               "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
               "val/clipfrac_avg", "val/num_eos_tokens", "time/rollout", "time/update")
TINY = ("--steps", "2", "--batch-size", "4", "--num-minibatches", "2", "--ppo-epochs", "2",
        "--max-new-tokens", "8", "--sample-every", "1")


def test_rlhf_cli_writes_a_complete_output_dir(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("rlhf", "--config", ROOT / "templates" / "rlhf-demo.yaml", "--policy", tiny_llama_dir,
                   "--reward", "rules:length", "--prompts", PROMPTS, "--out", out, *TINY, "--save-every", "1",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and (summary["algo"], summary["guide"]) == ("ppo", "none")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for name in TRL_METRICS:
        assert all(isinstance(r[name], int | float) for r in rows), name
    assert rows[0]["objective/kl"] == 0.0 or abs(rows[0]["objective/kl"]) < 1e-4
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and all("response" in s for s in samples)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-000001", "step-000002"]
    last = out / "checkpoints" / "step-000002"
    manifest = json.loads((last / "manifest.json").read_text())
    assert manifest["step"] == 2 and "optimizer.pt" in manifest["files"]
    assert (last / "policy" / "adapter_model.safetensors").is_file()  # the demo preset trains LoRA
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["lora"] is True and run["config"]["policy"] == str(tiny_llama_dir)
    # the final policy is a plain HF directory (adapter merged) that load_causal_lm / serve load
    from toolkit.generation import SamplingParams, generate
    from toolkit.models import load_causal_lm

    assert not (out / "policy" / "adapter_config.json").exists()
    model, tok = load_causal_lm(out / "policy")
    completion = generate(model, tok, [tok("Hello").input_ids], [SamplingParams(max_new_tokens=4, seed=0)])[0]
    assert len(completion.token_ids) == 4


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_critic_free_cli_writes_metrics_checkpoints_and_a_policy(tiny_llama_dir, tmp_path, algo):
    out = tmp_path / algo
    proc = run_cli("rlhf", "--algo", algo, "--group-size", "2", "--policy", tiny_llama_dir, "--reward", "rules:length",
                   "--prompts", PROMPTS, "--out", out, "--steps", "2", "--batch-size", "2", "--num-minibatches", "2",
                   "--ppo-epochs", "1", "--max-new-tokens", "6", "--sample-every", "1", "--save-every", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and [r["episode"] for r in rows] == [4, 8]
    for name in TRL_METRICS:  # PPO's columns, the value ones 0
        assert all(isinstance(r[name], int | float) for r in rows), name
    assert all(r["loss/value_avg"] == 0 for r in rows)
    checkpoint = out / "checkpoints" / "step-000002"
    assert (checkpoint / "policy").is_dir() and not list(checkpoint.glob("value*"))
    assert json.loads((out / "run.json").read_text())["config"]["algo"] == algo
    assert (out / "policy" / "config.json").is_file() and (out / "curves.png").is_file()
    bad = run_cli("rlhf", "--algo", algo, "--group-size", "1", "--policy", tiny_llama_dir, "--prompts", PROMPTS,
                  "--out", tmp_path / "bad")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last == f"error: --group-size: --algo {algo} needs at least 2 answers per prompt"


def test_grpo_guided_by_revised_answers_trains_on_them_and_keeps_them_out_of_the_statistics(tiny_llama_dir,
                                                                                             tmp_path):
    # a word limit the tiny model's 16 random tokens break and code meets by cutting (an edit that fits the budget)
    prompts = tmp_path / "constraints.jsonl"
    limit = {"kind": "word_limit", "args": {"relation": "at_most", "num_words": 3}}
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()[:8]]
    prompts.write_text("".join(json.dumps({"prompt": f"{r['prompt']}\n\nAnswer in at most 3 words.",
                                           "constraints": [limit]}) + "\n" for r in rows))
    out = tmp_path / "guided"
    proc = run_cli("rlhf", "--algo", "grpo", "--guide", "revise", "--group-size", "2", "--policy", tiny_llama_dir,
                   "--reward", "rules:constraints", "--prompts", prompts, "--out", out, "--steps", "2",
                   "--batch-size", "4", "--num-minibatches", "2", "--ppo-epochs", "1", "--max-new-tokens", "16",
                   "--sample-every", "1", "--samples-per-step", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    revised = [r["guide/revised"] for r in rows]
    assert sum(revised) >= 1 and all(0 <= n <= 4 for n in revised), revised  # at most one per group
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    marked = [s for s in samples if s.get("source") == "revised"]
    assert len(marked) == sum(revised)  # every row of each step is in samples.jsonl
    assert all(s["score"] > 0 and s["finish_reason"] == "stop" for s in marked)
    for r, n in zip(rows, revised, strict=True):  # the statistics read the sampled rows only
        sampled = [s for s in samples if s["step"] == r["step"] and s.get("source") != "revised"]
        assert len(sampled) == 8 - n
        assert r["objective/raw_scores"] == pytest.approx(sum(s["score"] for s in sampled) / len(sampled))
    for settings, message in ((("--algo", "ppo"), "--guide: needs --algo grpo or rloo"),
                              (("--algo", "grpo", "--prompts", PROMPTS, "--reward", "rules:length"),
                               "--guide revise edits answers to meet their row's `constraints`")):
        bad = run_cli("rlhf", "--guide", "revise", "--policy", tiny_llama_dir, "--prompts", prompts, "--out",
                      tmp_path / "bad", *settings)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
        assert message in bad.stderr.strip().splitlines()[-1]


def test_rlhf_cli_bad_input_is_one_clear_line(tiny_llama_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    proc = run_cli("rlhf", "--policy", tiny_llama_dir, "--prompts", empty, "--out", tmp_path / "a", *TINY)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {empty}: file is empty"
    assert not (tmp_path / "a").exists()  # nothing written


def _rlhf_under_torchrun(policy: Path, out: Path, *flags: str) -> None:
    """`llamakit rlhf` in two DDP processes (torchrun, one thread each) on the fixture prompts; both exit 0."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()),
                           "-m", "toolkit", "rlhf", "--policy", str(policy), "--prompts", str(PROMPTS),
                           "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]  # no rank left waiting for the other


@pytest.mark.parametrize(("algo", "answers"), [("ppo", 1), ("grpo", 2)])
def test_two_ddp_processes_with_torchrun(tiny_llama_dir, tmp_path, algo, answers):
    out = tmp_path / "ddp"
    _rlhf_under_torchrun(tiny_llama_dir, out, "--lora", "--algo", algo, "--group-size", str(max(answers, 2)), *TINY)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # one writer: rank 0
    assert rows[-1]["episode"] == 2 * 4 * answers * 2  # two processes × batch 4 × answers per prompt × 2 steps
    assert json.loads((out / "run.json").read_text())["world_size"] == 2

    rng = torch.load(out / "checkpoints" / "step-000002" / "rng.pt", weights_only=True)
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # ranks sample differently


def test_kl_budget_under_two_ddp_processes_stops_both_on_the_same_step(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "ddp"
    # step 1's rollouts come from the start (KL 0); later ones from a policy large updates away
    _rlhf_under_torchrun(tiny_llama_dir, out, "--learning-rate", "1e-3", "--kl-coef", "0", "--kl-budget", "1e-3",
                         "--save-every", "1", "--keep-checkpoints", "0", *TINY[2:], "--steps", "6")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    over = next(r["step"] for r in rows if r["objective/kl"] > 1e-3)  # the k1 mean of 8 answers can be < 0
    assert [r["step"] for r in rows] == list(range(1, over + 1)) and over >= 2
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["steps_done"] == over - 2 and f"step {over} were" in run["stopped"]
    inside = out / "checkpoints" / f"step-{over - 2:06d}" / "policy" if over > 2 else tiny_llama_dir
    saved, expected = load_file(out / "policy" / "model.safetensors"), load_file(inside / "model.safetensors")
    assert all(torch.equal(saved[name], expected[name]) for name in expected)
    moved = load_file(out / "checkpoints" / f"step-{over - 1:06d}" / "policy" / "model.safetensors")
    assert not all(torch.equal(saved[name], moved[name]) for name in moved)  # the update of step over − 1 undone


def test_presets_parse_with_the_config_loader_and_document_memory_and_launch():
    import click
    import yaml

    from rlhf.config import PPOConfig
    from toolkit.commands.train import rlhf_cmd, sft_cmd
    from toolkit.config import load_config
    from toolkit.sft import SFTConfig

    for prefix, command, cls in (("rlhf-", rlhf_cmd, PPOConfig), ("sft-", sft_cmd, SFTConfig)):
        presets = sorted((ROOT / "templates").glob(f"{prefix}*.yaml"))
        assert presets
        for preset in presets:
            # what `llamakit rlhf --config PRESET` does: every key a known flag, every value of its type
            values = load_config(str(preset), command, click.Context(command))
            config = cls(**values)
            if isinstance(config, PPOConfig):
                config.prompts = config.prompts or "prompts.jsonl"  # a preset leaves --prompts to the command
                config.validate()  # batch / minibatch / accumulation sizes fit together
    for preset in sorted((ROOT / "templates").glob("rlhf-llama-*.yaml")):
        comments = "\n".join(line for line in preset.read_text().splitlines() if line.startswith("#"))
        assert "Memory" in comments and " GB" in comments, preset.name
        launch = "accelerate launch --config_file templates/accelerate/" if "deepspeed" in preset.name \
            else "llamakit rlhf"
        assert launch in comments and f"--config templates/{preset.name}" in comments, preset.name
    for name in ("zero2.json", "zero3.json"):
        assert json.loads((ROOT / "templates" / "deepspeed" / name).read_text())["zero_optimization"]["stage"] in (2, 3)
    for accelerate_config in sorted((ROOT / "templates" / "accelerate").glob("*.yaml")):
        data = yaml.safe_load(accelerate_config.read_text())
        ds_file = data.get("deepspeed_config", {}).get("deepspeed_config_file")
        assert ds_file is None or (ROOT / ds_file).is_file(), accelerate_config.name
