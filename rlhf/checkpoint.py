"""Checkpoints: everything the next step depends on, written atomically with the manifest last.

    checkpoints/step-000010/
        policy/             save_pretrained: the LoRA adapter, or all weights (a loadable HF dir)
        value.safetensors   value head (or separate critic)
        optimizer.pt        Adam moments (torch.load(weights_only=True))
        rng.pt              torch / python RNG state of every process
        state.json          step, KL controller, config
        manifest.json       written last: a directory without it is not a checkpoint
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import UserError

MANIFEST = "manifest.json"


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, actor, optimizer, kl_ctl, config: dict[str, Any],
                    rng_states: list[dict[str, Any]], keep: int = 2) -> Path:
    """Write checkpoint `step` (main process only) and prune older ones down to `keep`."""
    from rlhf.policy import save_value_state
    from toolkit.io import atomic_dir, write_json

    target = checkpoint_dir(out, step)
    with atomic_dir(target, "checkpoint", overwrite=True) as tmp:
        actor.lm.save_pretrained(tmp / "policy", safe_serialization=True)
        save_value_state(tmp / "value.safetensors", actor)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_states, tmp / "rng.pt")
        write_json(tmp / "state.json", {"step": step, "kl_ctl": kl_ctl.state_dict(), "config": config})
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        write_json(tmp / MANIFEST, {"step": step, "files": files})
    if keep > 0:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (manifest present), oldest first."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d{6,}", p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def load_checkpoint(path: Path, actor, optimizer, kl_ctl, rank: int, world_size: int) -> int:
    """Restore weights, optimizer, KL controller and this rank's RNG; return the step it was taken at."""
    from safetensors.torch import load_file

    from rlhf.policy import load_value_state

    state = json.loads((path / "state.json").read_text())
    rng_states = torch.load(path / "rng.pt", weights_only=True)
    if len(rng_states) != world_size:
        raise UserError(f"checkpoint was written by {len(rng_states)} processes, this run has {world_size}; "
                        "resume with the same number of processes", file=str(path))
    policy = path / "policy"
    if hasattr(actor.lm, "peft_config"):
        from peft import set_peft_model_state_dict

        if not (policy / "adapter_model.safetensors").is_file():
            raise UserError("checkpoint holds full weights but this run uses --lora", file=str(path))
        set_peft_model_state_dict(actor.lm, load_file(str(policy / "adapter_model.safetensors")))
    else:
        if (policy / "adapter_model.safetensors").is_file():
            raise UserError("checkpoint holds a LoRA adapter; resume with --lora", file=str(path))
        weights: dict[str, torch.Tensor] = {}
        for file in sorted(policy.glob("*.safetensors")):
            weights.update(load_file(str(file)))
        missing, unexpected = actor.lm.load_state_dict(weights, strict=False)
        tied = set(getattr(actor.lm, "_tied_weights_keys", None) or ())
        if unexpected or any(k not in tied for k in missing):
            raise UserError(f"checkpoint does not match the policy (missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]})", file=str(path))
        if hasattr(actor.lm, "tie_weights"):
            actor.lm.tie_weights()
    load_value_state(path / "value.safetensors", actor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    kl_ctl.load_state_dict(state["kl_ctl"])
    set_rng_state(rng_states[rank])
    return int(state["step"])
