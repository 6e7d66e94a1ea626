"""The shipped DeepSpeed presets (templates/accelerate/deepspeed-zero{2,3}.yaml) run as a user launches them, on
2 CPU ranks (gloo, DeepSpeed's CPU accelerator): the ZeRO engine really trains, and the saved model is whole."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import FIXTURES, ROOT, cli, free_port

pytest.importorskip("deepspeed", reason="the `deepspeed` extra is not installed (make test installs it)")


def launch(preset: str, out: Path, *args, processes: int = 2) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    # DS_ACCELERATOR: the launcher itself would print DeepSpeed's "Setting accelerator to CPU" note on stdout
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    env.pop("RANK", None)
    return subprocess.run([str(accelerate), "launch", "--config_file", f"templates/accelerate/{preset}",
                           "--num_processes", str(processes), "--main_process_port", str(free_port()), "-m", "toolkit",
                           *args, "--out", out, "--json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def zero_shards(checkpoint: Path) -> list[dict]:
    """Each rank's ZeRO optimizer state (its partition of the Adam moments and fp32 weights), rank by rank, as
    DeepSpeed wrote them into the checkpoint."""
    import torch

    files = sorted((checkpoint / "deepspeed").rglob("*optim_states.pt"), key=lambda f: f.name)
    return [torch.load(f, weights_only=False)["optimizer_state_dict"] for f in files]


def tensors_of(state) -> list:
    """Every tensor in a nested state dict, in order: the moments, steps and fp32 partitions."""
    import torch

    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in tensors_of(state[key])]
    if isinstance(state, list | tuple):
        return [t for item in state for t in tensors_of(item)]
    return []


def assert_close_states(resumed: list[dict], straight: list[dict]) -> None:
    import torch

    assert len(resumed) == len(straight) == 2
    for a, b in zip(resumed, straight, strict=True):
        ta, tb = tensors_of(a), tensors_of(b)
        assert len(ta) == len(tb) > 0
        assert all(torch.allclose(x.float(), y.float(), atol=1e-6, rtol=1e-4) for x, y in zip(ta, tb, strict=True))


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def stop_after_step_1_and_resume(preset: str, out: Path, args: list, final: str) -> tuple[list[dict], list[dict]]:
    """Make `out`, a finished 2-step run that checkpointed every step, look stopped after step 1 (step 2's
    checkpoint and the final `final/` gone), and --resume it: its metrics rows before and after. Step 2 again, from
    each rank's own partition of step 1's weights and moments, leaves every rank's optimizer state as the run that
    went straight through left it."""
    import shutil

    before, straight = rows(out), zero_shards(out / "checkpoints" / "step-000002")
    shutil.rmtree(out / "checkpoints" / "step-000002")
    shutil.rmtree(out / final)
    proc = launch(preset, out, *args, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["steps"] == 2, proc.stdout
    after = rows(out)
    assert [r["step"] for r in after] == [1, 2] and after[0] == before[0]  # step 1's row kept, not redone
    assert_close_states(zero_shards(out / "checkpoints" / "step-000002"), straight)
    return before, after


def assert_close_weights(resumed: dict, straight: dict) -> None:
    import torch

    assert resumed.keys() == straight.keys()
    assert all(torch.allclose(resumed[k], straight[k], atol=1e-6, rtol=1e-4) for k in straight)


def launch_two_steps(stage: int, out: Path, args: list) -> None:
    """Launch a 2-step run under ZeRO-`stage` on 2 ranks: its --json line alone on stdout, and each rank's own
    partition of the optimizer in the last checkpoint (the ZeRO engine trained, not DDP in its place)."""
    proc = launch(f"deepspeed-zero{stage}.yaml", out, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["steps"] == 2, proc.stdout
    shards = zero_shards(out / "checkpoints" / "step-000002")
    assert [int(s["zero_stage"]) for s in shards] == [stage, stage]
    assert all(s["partition_count"] in (2, [2]) for s in shards)


EVERY_STEP = ["--save-every", "1", "--keep-checkpoints", "0"]


# Each 2-rank run costs 30-80 s: one case per mechanism and command. Resume legs: dpo (ZeRO-2) and rlhf (ZeRO-3);
# sft's ZeRO-3 resume (the same checkpoint code) ran equal to the straight run when it was built, at 140 s.
@pytest.mark.parametrize(("stage", "lora"), [(3, False), (3, True)], ids=["zero3", "zero3-lora"])
def test_sft_under_deepspeed_saves_a_whole_trained_model(tiny_llama_dir, tmp_path, stage, lora):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sft"
    args = ["sft", "--data", FIXTURES / "alpaca-24.json", "--model", tiny_llama_dir, "--max-steps", "2",
            "--batch-size", "2", "--gradient-accumulation-steps", "2", "--max-length", "64",
            *(["--lora"] if lora else [])]
    proc = launch(f"deepspeed-zero{stage}.yaml", out, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout  # the --json summary alone: once, and no DeepSpeed chatter
    assert json.loads(lines[0])["steps"] == 2
    # the ZeRO engine trained (not DDP in its place), and each rank wrote its own partition of the optimizer
    shards = zero_shards(out / "checkpoints" / "step-000002")
    assert [int(s["zero_stage"]) for s in shards] == [stage, stage]
    assert all(s["partition_count"] in (2, [2]) for s in shards)
    assert not all(torch.equal(a, b) for a, b in zip(*map(tensors_of, shards), strict=True))  # two partitions
    start = load_file(tiny_llama_dir / "model.safetensors")
    saved = load_file(out / "model" / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in start.items()}  # gathered, not shards
    assert any(not torch.equal(saved[k], start[k]) for k in start)
    if not lora:  # the checkpoint's weights are whole too
        checkpoint = load_file(out / "checkpoints" / "step-000002" / "model" / "model.safetensors")
        assert {k: v.shape for k, v in checkpoint.items()} == {k: v.shape for k, v in start.items()}
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.get_input_embeddings().weight.shape == start["model.embed_tokens.weight"].shape
    if lora:
        return
    # resuming needs the same ZeRO stage (each rank's files are laid out for it): without DeepSpeed, refused, and
    # nothing changed (every direction of the check: tests/unit/test_training.py)
    before = rows(out)
    plain = cli(*args, "--out", out, "--resume")
    where = f"\nerror: {out / 'checkpoints' / 'step-000002'}: checkpoint was written under DeepSpeed ZeRO-3, this run"
    assert plain[0] == 2 and (f"{where} has no DeepSpeed; resume it under `accelerate launch --config_file "
                              "templates/accelerate/deepspeed-zero3.yaml`") in "\n" + plain[2], plain[2][-3000:]
    assert rows(out) == before and (out / "model" / "model.safetensors").is_file()


def ppo_args(policy: Path, *extra) -> list:
    return ["rlhf", "--policy", policy, "--reward", "rules:length", "--prompts", FIXTURES / "prompts-alpaca-32.jsonl",
            "--steps", "2", "--batch-size", "4", "--num-minibatches", "2", "--gradient-accumulation-steps", "2",
            "--ppo-epochs", "1", "--max-new-tokens", "8", *extra, *EVERY_STEP]


# ZeRO-3 with LoRA, as the 33B/65B presets run it (its final policy was saved as empty shards before)
@pytest.mark.parametrize("stage, lora", [(3, ["--lora"])])  # ZeRO-2 is shown by sft and dpo
def test_ppo_under_deepspeed(stage, lora, tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "ppo"
    args = ppo_args(tiny_llama_dir, *lora)
    launch_two_steps(stage, out, args)
    assert [r["step"] for r in rows(out)] == [1, 2] and all(r["loss/policy_avg"] == r["loss/policy_avg"]
                                                           for r in rows(out))
    saved = load_file(out / "policy" / "model.safetensors")
    assert_whole_and_trained(saved, load_file(tiny_llama_dir / "model.safetensors"))
    # stopped after step 1 and resumed (the value head comes back with the engine's partitions): as if straight on
    before, after = stop_after_step_1_and_resume(f"deepspeed-zero{stage}.yaml", out, args, "policy")
    assert after[1]["objective/scores"] == pytest.approx(before[1]["objective/scores"], rel=1e-4)
    assert_close_weights(load_file(out / "policy" / "model.safetensors"), saved)


def test_grpo_under_zero2_trains_without_a_critic_and_resumes(tiny_llama_dir, tmp_path):
    """The critic-free loop under ZeRO-2 (rlhf's ZeRO-2 path: PPO's cases are ZeRO-3): K answers per prompt, the
    reference from the start weights, and a resume from each rank's partition as if the run went straight on."""
    from safetensors.torch import load_file

    out = tmp_path / "grpo"
    args = ["rlhf", "--algo", "grpo", "--policy", tiny_llama_dir, "--reward", "rules:length", "--prompts",
            FIXTURES / "prompts-alpaca-32.jsonl", "--steps", "2", "--batch-size", "2", "--group-size", "4",
            "--num-minibatches", "2", "--max-new-tokens", "8", *EVERY_STEP]
    launch_two_steps(2, out, args)
    first, second = rows(out)
    # the mean of both minibatches' ratios: the first is on-policy (1 exactly), the second follows one optimizer step
    assert first["val/ratio"] == pytest.approx(1.0, abs=1e-3) and first["loss/value_avg"] == 0.0  # no critic
    assert first["objective/kl_k3"] == pytest.approx(0.0, abs=1e-6) and second["objective/kl_k3"] > 0
    saved = load_file(out / "policy" / "model.safetensors")
    assert_whole_and_trained(saved, load_file(tiny_llama_dir / "model.safetensors"))
    before, after = stop_after_step_1_and_resume("deepspeed-zero2.yaml", out, args, "policy")
    assert after[1]["loss/policy_avg"] == pytest.approx(before[1]["loss/policy_avg"], rel=1e-4, abs=1e-7)
    assert_close_weights(load_file(out / "policy" / "model.safetensors"), saved)


def test_ppo_full_fine_tune_under_zero3_has_a_reference_in_shards_of_its_own(tiny_llama_dir, tmp_path):
    """Without LoRA π_ref is a frozen model: under ZeRO-3 transformers loads it in shards too (zero.Init), and a
    copy of the sharded policy would gather the policy's weights, not its own. It was an empty embedding at step 1."""
    from safetensors.torch import load_file

    out = tmp_path / "ppo"
    launch_two_steps(3, out, ppo_args(tiny_llama_dir))
    first, second = rows(out)
    assert first["objective/kl"] == 0.0  # step 1: π = π_ref, token by token (the reference is the start weights)
    assert second["objective/kl"] != 0.0 and first["val/sampling_logprob_gap"] < 1e-4
    assert_whole_and_trained(load_file(out / "policy" / "model.safetensors"),
                             load_file(tiny_llama_dir / "model.safetensors"))


def assert_whole_and_trained(saved: dict, start: dict) -> None:
    """The saved weights have the backbone's shapes (gathered, not ZeRO-3's (0,) shards) and moved from it."""
    import torch

    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in start.items()}
    assert any(not torch.equal(saved[k], start[k]) for k in start)


@pytest.mark.parametrize("stage", [3], ids=["zero3"])  # ZeRO-2 is shown by sft and dpo
def test_train_reward_under_deepspeed_saves_a_whole_trained_model(tiny_llama_dir, tmp_path, stage):
    from safetensors.torch import load_file

    out = tmp_path / "rm"
    proc = launch(f"deepspeed-zero{stage}.yaml", out, "train-reward", "--data", FIXTURES / "hh-harmless-200.jsonl",
                  "--model", tiny_llama_dir, "--max-steps", "2", "--batch-size", "4", "--max-length", "48")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    summary = json.loads(lines[0])
    assert summary["train"]["optimizer_steps"] == 2
    # every held-out pair was scored (all ranks take part in a ZeRO-3 forward), and calibrated on
    assert summary["calibration"]["pairs"] == summary["heldout"]["raw"]["n"] == 20
    # the ZeRO engine trained (not DDP in its place): as the optimizer DeepSpeed built reports itself
    assert summary["train"]["zero"] == {"stage": stage, "partition_count": 2}
    start = {k: v for k, v in load_file(tiny_llama_dir / "model.safetensors").items() if k.startswith("model.")}
    saved = load_file(out / "model.safetensors")
    assert saved["score.weight"].shape == (1, start["model.embed_tokens.weight"].shape[1])
    assert_whole_and_trained({k: v for k, v in saved.items() if k != "score.weight"}, start)


# zero3: the frozen reference loads in ZeRO-3 shards of its own (a copy of the policy's gathered the policy's)
@pytest.mark.parametrize(("stage", "lora"), [(2, False), (3, False), (3, True)], ids=["zero2", "zero3", "zero3-lora"])
def test_dpo_under_deepspeed_saves_a_whole_trained_policy(tiny_llama_dir, tmp_path, stage, lora):
    from safetensors.torch import load_file

    out, data = tmp_path / "dpo", FIXTURES / "hh-harmless-200.jsonl"
    extra = []
    if lora:  # and the forwards outside training: precomputed reference log-probs, held-out pairs (an odd
        # number of them, so the ranks' shares differ: under ZeRO-3 every rank must run every forward)
        lines = data.read_text().splitlines(keepends=True)
        (tmp_path / "train.jsonl").write_text("".join(lines[:16]))
        (tmp_path / "eval.jsonl").write_text("".join(lines[16:21]))
        data, extra = tmp_path / "train.jsonl", ["--lora", "--precompute-ref", "--eval-data", tmp_path / "eval.jsonl"]
    args = ["dpo", "--data", data, "--policy", tiny_llama_dir, "--max-steps", "2", "--batch-size", "2",
            "--gradient-accumulation-steps", "2", "--max-length", "64", "--max-prompt-length", "32",
            "--learning-rate", "1e-3", *extra, *([] if lora else EVERY_STEP)]
    launch_two_steps(stage, out, args)
    assert [r["step"] for r in rows(out)] == [1, 2] and all(r["loss"] == r["loss"] for r in rows(out))
    if not lora:  # step 1, before any update: π = π_ref on every pair, so the loss is ln 2 (the reference is right)
        assert rows(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    if lora:
        reference = load_file(out / "checkpoints" / "step-000002" / "reference.safetensors")["train"]
        assert reference.shape == (16, 2) and bool((reference < 0).all())  # every pair's log-probs, both answers
        held_out = json.loads((out / "run.json").read_text())["eval"]
        assert 0 <= held_out["eval/rewards/accuracies"] <= 1 and held_out["eval/loss"] > 0
    saved = load_file(out / "policy" / "model.safetensors")
    assert_whole_and_trained(saved, load_file(tiny_llama_dir / "model.safetensors"))
    if stage == 2:  # stopped after step 1 and resumed under ZeRO-2 (the moments and fp32 weights it partitions)
        before, after = stop_after_step_1_and_resume(f"deepspeed-zero{stage}.yaml", out, args, "policy")
        assert after[1]["loss"] == pytest.approx(before[1]["loss"], rel=1e-4)
        assert_close_weights(load_file(out / "policy" / "model.safetensors"), saved)


SEVERAL_MODELS = "--ensemble and --calibration-folds train several models in one run: not under DeepSpeed"


# One rank is enough to show a refusal: it comes before any model is loaded or trained.
@pytest.mark.parametrize(("command", "message"), [
    (["train-reward", "--data", FIXTURES / "hh-harmless-200.jsonl", "--ensemble", "2"], SEVERAL_MODELS),
], ids=["reward-ensemble"])  # --calibration-folds is refused by the same check
def test_what_deepspeed_cannot_run_is_refused_up_front(tiny_llama_dir, tmp_path, command, message):
    out = tmp_path / "out"
    model = ["--policy" if command[0] == "dpo" else "--model", tiny_llama_dir]
    proc = launch("deepspeed-zero3.yaml", out, *command, *model, processes=1)
    # the rank's one-line error and its exit code 2 (a user error, not a crash), as the launcher reports them
    assert proc.returncode != 0 and f"\nerror: {message}" in proc.stderr, proc.stderr[-3000:]
    assert "failed (exitcode: 2)" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()
