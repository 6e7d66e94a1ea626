"""The shared training layer: accelerator set-up, dropout, LoRA, schedule, checkpoints, run log + curves."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from toolkit.errors import UserError
from toolkit.training import accelerator as accelerator_module
from toolkit.training.accelerator import autocast, make_accelerator, warn_if_bf16_is_slow
from toolkit.training.checkpoint import (
    MANIFEST,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from toolkit.training.model import add_lora, disable_dropout
from toolkit.training.runlog import Curve, RunLog, drop_rows_after, plot_curves
from toolkit.training.schedule import warmup_linear


def _lrs(total: int, warmup: int) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_linear(optimizer, total, warmup)
    lrs = []
    for _ in range(total):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def test_schedule_is_linear_warmup_then_linear_decay():
    # Without warm-up: exactly the decay the trainers used before the shared schedule.
    assert _lrs(6, 0) == [max(0.0, (6 - s) / 6) for s in range(6)]
    # transformers' warm-up starts from 0 (the old one started at 1/warmup).
    assert _lrs(10, 4) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])


def test_rng_state_round_trips_through_a_checkpoint_file(tmp_path):
    state = rng_state()
    first = (torch.rand(3), random.random())
    torch.save([state], tmp_path / "rng.pt")
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)[0])
    again = (torch.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and first[1] == again[1]


def test_accelerators_with_and_without_bf16_in_one_process():
    """Accelerate fixes its mixed precision once per process; the trainers' bf16 is their own autocast."""
    accelerator = make_accelerator(bf16=True)
    with autocast(accelerator, True):
        assert (torch.ones(2, 2, device=accelerator.device) @ torch.ones(2, 2, device=accelerator.device)).dtype \
            == torch.bfloat16
    accelerator = make_accelerator(bf16=False)
    with autocast(accelerator, False):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert accelerator.gradient_accumulation_steps == 1  # `backward` never divides the loss behind our back


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_dropout = 0.1  # read as a float by LLaMA-style attention, not an nn.Dropout


@pytest.mark.parametrize(("bf16", "device", "has_units", "warned"), [
    (True, "cpu", False, True), (True, "cpu", True, False), (False, "cpu", False, False),
    (True, "cuda", False, False)])
def test_bf16_on_a_cpu_without_bf16_units_is_warned_of(monkeypatch, capsys, bf16, device, has_units, warned):
    monkeypatch.setattr(accelerator_module, "cpu_has_bf16_units", lambda: has_units)
    warn_if_bf16_is_slow(bf16, device)
    err = capsys.readouterr().err
    assert ("warning: --bf16 on a CPU without bfloat16 units" in err) == warned
    assert "drop --bf16" in err if warned else err == ""


def test_cpu_bf16_units_are_read_from_onednn():
    assert accelerator_module.cpu_has_bf16_units() == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_disable_dropout_reaches_modules_attention_and_config():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.3), _Attention())
    model.config = type("Config", (), {"attention_dropout": 0.1, "resid_pdrop": 0.2, "hidden_size": 2})()
    disable_dropout(model)
    assert model[1].p == 0.0 and model[2].attention_dropout == 0.0
    assert model.config.attention_dropout == 0.0 and model.config.resid_pdrop == 0.0 and model.config.hidden_size == 2


def test_add_lora_alpha_defaults_to_twice_the_rank(tiny_llama_dir):
    from toolkit.models import load_causal_lm

    lm, _ = load_causal_lm(tiny_llama_dir)
    assert add_lora(lm, 4).peft_config["default"].lora_alpha == 8
    lm, _ = load_causal_lm(tiny_llama_dir)
    with pytest.raises(UserError, match="--lora-target nonexistent"):
        add_lora(lm, 4, 16, "nonexistent", task_type="CAUSAL_LM")


def _checkpointed(tiny_llama_dir, out: Path, lora: bool = False):
    from toolkit.models import load_causal_lm

    lm, _ = load_causal_lm(tiny_llama_dir)
    if lora:
        lm = add_lora(lm, 4, 8, task_type="CAUSAL_LM")
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-3)
    lm(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    accelerator = make_accelerator(bf16=False)
    for step in (1, 2):
        save_checkpoint(accelerator, out, step, lm, optimizer, weights="model", state={"note": "x"},
                        tensors={"extra": {"w": torch.arange(3.0)}}, keep=1)
    return lm, optimizer


def test_checkpoint_round_trip(tiny_llama_dir, tmp_path):
    lm, optimizer = _checkpointed(tiny_llama_dir, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002"]  # keep=1 pruned step 1
    path = latest_checkpoint(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["step"] == 2 and {"optimizer.pt", "rng.pt", "state.json", "extra.safetensors"} <= set(
        manifest["files"])
    from toolkit.models import load_causal_lm

    fresh, _ = load_causal_lm(tiny_llama_dir)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    restored = load_checkpoint(path, fresh, fresh_optimizer, weights="model", rank=0, world_size=1,
                               tensors=("extra",))
    assert restored.step == 2 and restored.state == {"note": "x"}
    assert torch.equal(restored.tensors["extra"]["w"], torch.arange(3.0))
    for (name, a), b in zip(lm.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert fresh_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    with pytest.raises(UserError, match="written by 1 processes, this run has 2"):
        load_checkpoint(path, fresh, fresh_optimizer, weights="model", rank=0, world_size=2)


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_checkpoint_with_other_keys_is_refused_in_one_line(tiny_llama_dir, tmp_path, change):
    _checkpointed(tiny_llama_dir, tmp_path)
    path = latest_checkpoint(tmp_path)
    (weights,) = (path / "model").glob("*.safetensors")
    state = load_file(str(weights))
    if change == "missing":
        state.pop("model.layers.0.mlp.up_proj.weight")
    else:
        state["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(state, str(weights), metadata={"format": "pt"})
    from toolkit.models import load_causal_lm

    fresh, _ = load_causal_lm(tiny_llama_dir)
    with pytest.raises(UserError, match=f"does not match the model.*{change}") as err:
        load_checkpoint(path, fresh, torch.optim.AdamW(fresh.parameters()), weights="model", rank=0, world_size=1)
    assert "\n" not in str(err.value)


def test_lora_checkpoint_keys_are_checked_and_kinds_not_mixed(tiny_llama_dir, tmp_path):
    lora, _ = _checkpointed(tiny_llama_dir, tmp_path, lora=True)
    path = latest_checkpoint(tmp_path)
    from toolkit.models import load_causal_lm

    full, _ = load_causal_lm(tiny_llama_dir)
    with pytest.raises(UserError, match="holds a LoRA adapter; resume with --lora"):
        load_checkpoint(path, full, torch.optim.AdamW(full.parameters()), weights="model", rank=0, world_size=1)
    fresh = add_lora(load_causal_lm(tiny_llama_dir)[0], 4, 8, task_type="CAUSAL_LM")
    optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad])
    load_checkpoint(path, fresh, optimizer, weights="model", rank=0, world_size=1)
    trained = {k: v for k, v in lora.state_dict().items() if "lora_" in k}
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in trained.items())
    adapter = path / "model" / "adapter_model.safetensors"
    state = load_file(str(adapter))
    state.pop(next(iter(state)))
    save_file(state, str(adapter))
    with pytest.raises(UserError, match="does not match the model"):
        load_checkpoint(path, fresh, optimizer, weights="model", rank=0, world_size=1)


def test_run_log_and_curves(tmp_path):
    log = RunLog(tmp_path, enabled=True)
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 1.0 / step})
    log.log_samples([{"step": 1}])  # no samples file asked for: nothing written
    log.close()
    assert not (tmp_path / "samples.jsonl").exists()
    drop_rows_after(tmp_path / "metrics.jsonl", 2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}] and len(log.history) == 3
    curve = Curve("loss", "loss", smooth=True, points=("heldout", "held-out"), baseline=("chance", 0.69))
    png = plot_curves([*rows, {"step": 2, "heldout": 0.7}], tmp_path / "curves.png", (curve, Curve("loss", "raw")))
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert plot_curves([], tmp_path / "none.png", (curve,)) is None


@pytest.mark.parametrize(("written", "now", "fix"), [
    (0, 2, "resume it without DeepSpeed (no DeepSpeed accelerate config)"),
    (3, 0, "resume it under `accelerate launch --config_file templates/accelerate/deepspeed-zero3.yaml`"),
    (2, 3, "resume it with templates/accelerate/deepspeed-zero2.yaml"),
])
def test_a_checkpoint_laid_out_for_another_zero_stage_is_refused(tmp_path, written, now, fix):
    # The 2-rank resume tests (tests/cli/test_deepspeed.py) launch ZeRO-3 → ZeRO-2 and ZeRO-3 → plain; this covers
    # every direction of the check without launching DeepSpeed.
    from toolkit.training.checkpoint import _check_layout

    manifest = {"step": 1, "files": []} if written == 0 else {"step": 1, "files": [], "zero_stage": written}
    _check_layout(tmp_path, manifest, written)  # the same layout: nothing to say
    with pytest.raises(UserError, match=re.escape(fix)):
        _check_layout(tmp_path, manifest, now)
