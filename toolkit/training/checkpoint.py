"""Checkpoints: everything the next step depends on, written atomically with the manifest last.

    checkpoints/step-000010/
        <weights>/          save_pretrained: the LoRA adapter, or all weights (a loadable HF dir)
        <name>.safetensors  whatever else the trainer trains beside them (PPO: its value head or critic)
        optimizer.pt        Adam moments (torch.load(weights_only=True))
        rng.pt              torch / python (/ cuda) RNG state of every process
        state.json          the step, and the trainer's own state (config, schedule, KL controller ...)
        manifest.json       written last: a directory without it is not a checkpoint
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from toolkit.errors import UserError
from toolkit.training.accelerator import gathered_weights

if TYPE_CHECKING:
    from accelerate import Accelerator

MANIFEST = "manifest.json"
ADAPTER = "adapter_model.safetensors"


@dataclass
class Restored:
    step: int  # the step the checkpoint was taken at
    state: dict[str, Any]  # what the trainer put in state.json beside the step
    tensors: dict[str, dict[str, torch.Tensor]]  # each <name>.safetensors the trainer asked for


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


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


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, *, weights: str, state: dict[str, Any],
                    tensors: dict[str, dict[str, torch.Tensor]] | None = None, keep: int = 2) -> None:
    """Checkpoint `step`; every process calls it. `model` (a transformers or peft model) goes to
    `<weights>/`, each of `tensors` to `<name>.safetensors`, `state` (JSON) to state.json. Keeps the
    newest `keep` checkpoints (0: all)."""
    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    from toolkit.io import atomic_dir, write_json

    states = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    with gathered_weights(accelerator, model):  # every process: ZeRO-3 gathers the weights to save
        if accelerator.is_main_process:
            with atomic_dir(checkpoint_dir(out, step), "checkpoint", overwrite=True) as tmp:
                model.save_pretrained(tmp / weights, safe_serialization=True)
                for name, tensor_dict in (tensors or {}).items():
                    save_file(tensor_dict, str(tmp / f"{name}.safetensors"))
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(states, tmp / "rng.pt")
                write_json(tmp / "state.json", {"step": step, **state})
                files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
                write_json(tmp / MANIFEST, {"step": step, "files": files})
            if keep > 0:
                for old in list_checkpoints(out)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, weights: str,
                    rank: int, world_size: int, tensors: tuple[str, ...] = ()) -> Restored:
    """Restore the weights (every key accounted for), the optimizer and this rank's RNG from checkpoint
    `path`; the trainer restores the rest from what this returns."""
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    rng_states = torch.load(path / "rng.pt", weights_only=True)
    if len(rng_states) != world_size:
        raise UserError(f"checkpoint was written by {len(rng_states)} processes, this run has {world_size}; "
                        "resume with the same number of processes", file=str(path))
    load_weights(path / weights, model, where=path)
    restored = {name: load_file(str(path / f"{name}.safetensors")) for name in tensors}
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    set_rng_state(rng_states[rank])
    return Restored(int(state.pop("step")), state, restored)


def load_weights(directory: Path, model: nn.Module, where: Path) -> None:
    """Load a save_pretrained directory into `model`, refusing one whose keys do not match: a LoRA adapter
    into a full model or the other way round, or a checkpoint of another architecture."""
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        if not (directory / ADAPTER).is_file():
            raise UserError("checkpoint holds full weights but this run uses --lora", file=str(where))
        adapter = load_file(str(directory / ADAPTER))
        result = set_peft_model_state_dict(model, adapter)
        # Loading is non-strict on the whole model: the base weights are "missing" by design.
        missing = [k for k in result.missing_keys if "lora_" in k]
        _check_keys(missing, result.unexpected_keys, where)
        return
    if (directory / ADAPTER).is_file():
        raise UserError("checkpoint holds a LoRA adapter; resume with --lora", file=str(where))
    state: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    _check_keys([k for k in missing if k not in tied], unexpected, where)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _check_keys(missing: list[str], unexpected: list[str], where: Path) -> None:
    if missing or unexpected:
        raise UserError(f"checkpoint does not match the model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})", file=str(where))
