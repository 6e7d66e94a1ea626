"""Checkpoints: everything the next step depends on, written atomically with the manifest last.

    checkpoints/step-000010/
        <weights>/          save_pretrained: the LoRA adapter, or all weights (a loadable HF dir)
        <name>.safetensors  whatever else the trainer trains beside them (PPO: its value head or critic)
        optimizer.pt        Adam moments (torch.load(weights_only=True)); not under DeepSpeed, where
        deepspeed/          DeepSpeed's own checkpoint holds them instead: each ZeRO rank's partition of the
                            Adam moments and fp32 master weights, written by that rank (the weights above
                            stay whole and gathered, for users and `llamakit`; resume reads these)
        rng.pt              torch / python (/ cuda) RNG state of every process
        state.json          the step, and the trainer's own state (config, schedule, KL controller ...)
        manifest.json       written last: a directory without it is not a checkpoint; it names the ZeRO
                            stage the optimizer state is laid out for (0: no DeepSpeed)
"""

from __future__ import annotations

import contextlib
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
DEEPSPEED = "deepspeed"  # DeepSpeed's own checkpoint directory (with its zero_to_fp32.py) inside ours
DEEPSPEED_TAG = "zero"  # and its one tag there


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


def deepspeed_engine(accelerator: Accelerator) -> Any | None:
    """The DeepSpeed engine `accelerator.prepare` built for the trainer's model and optimizer; None without."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return None if wrapped is None else wrapped.engine


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, *, weights: str, state: dict[str, Any],
                    tensors: dict[str, dict[str, torch.Tensor]] | None = None, keep: int = 2) -> None:
    """Checkpoint `step`; every process calls it. `model` (a transformers or peft model) goes to
    `<weights>/`, each of `tensors` to `<name>.safetensors`, `state` (JSON) to state.json. Keeps the
    newest `keep` checkpoints (0: all)."""
    from accelerate.utils import broadcast_object_list, gather_object
    from safetensors.torch import save_file

    from toolkit.io import atomic_dir, write_json

    engine = deepspeed_engine(accelerator)
    states = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(checkpoint_dir(out, step), "checkpoint", overwrite=True)) \
            if accelerator.is_main_process else None
        if engine is not None:
            # every rank writes its own ZeRO partition into the main process's temporary directory
            tmp = broadcast_object_list([tmp])[0] if accelerator.num_processes > 1 else tmp
            engine.save_checkpoint(str(tmp / DEEPSPEED), tag=DEEPSPEED_TAG)
        with gathered_weights(accelerator, model):  # every process: ZeRO-3 gathers the weights to save
            if accelerator.is_main_process:
                model.save_pretrained(tmp / weights, safe_serialization=True)
        if accelerator.is_main_process:
            for name, tensor_dict in (tensors or {}).items():
                save_file(tensor_dict, str(tmp / f"{name}.safetensors"))
            if engine is None:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(states, tmp / "rng.pt")
            write_json(tmp / "state.json", {"step": step, **state})
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            write_json(tmp / MANIFEST, {"step": step, "files": files, "zero_stage": _zero_stage(engine)})
    if accelerator.is_main_process and keep > 0:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, weights: str,
                    rank: int, world_size: int, tensors: tuple[str, ...] = (), engine: Any | None = None) -> Restored:
    """Restore the weights (every key accounted for), the optimizer and this rank's RNG from checkpoint
    `path`; the trainer restores the rest from what this returns. Under DeepSpeed (`engine`, see
    `deepspeed_engine`) the engine restores the weights and this rank's optimizer partition from its own files."""
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    _check_layout(path, json.loads((path / MANIFEST).read_text()), _zero_stage(engine))
    rng_states = torch.load(path / "rng.pt", weights_only=True)
    if len(rng_states) != world_size:
        raise UserError(f"checkpoint was written by {len(rng_states)} processes, this run has {world_size}; "
                        "resume with the same number of processes", file=str(path))
    restored = {name: load_file(str(path / f"{name}.safetensors")) for name in tensors}
    if engine is None:
        load_weights(path / weights, model, where=path)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    else:
        _check_kind(path / weights, model, where=path)
        loaded, _ = engine.load_checkpoint(str(path / DEEPSPEED), tag=DEEPSPEED_TAG, load_module_strict=True,
                                           load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise UserError("checkpoint has no DeepSpeed state; start a new --out", file=str(path))
    set_rng_state(rng_states[rank])
    return Restored(int(state.pop("step")), state, restored)


def _zero_stage(engine: Any | None) -> int:
    return 0 if engine is None else int(engine.zero_optimization_stage())


def _check_layout(path: Path, manifest: dict[str, Any], stage: int) -> None:
    """Refuse a checkpoint whose optimizer state is laid out for another ZeRO stage (or none)."""
    written = int(manifest.get("zero_stage", 0))
    if written == stage:
        return
    if stage == 0:
        fix = f"resume it under `accelerate launch --config_file templates/accelerate/deepspeed-zero{written}.yaml`"
    elif written == 0:
        fix = "resume it without DeepSpeed (no DeepSpeed accelerate config)"
    else:
        fix = f"resume it with templates/accelerate/deepspeed-zero{written}.yaml"
    was = f"DeepSpeed ZeRO-{written}" if written else "no DeepSpeed"
    now = f"DeepSpeed ZeRO-{stage}" if stage else "no DeepSpeed"
    raise UserError(f"checkpoint was written under {was}, this run has {now}; {fix}, or start a new --out",
                    file=str(path))


def load_weights(directory: Path, model: nn.Module, where: Path) -> None:
    """Load a save_pretrained directory into `model`, refusing one whose keys do not match: a LoRA adapter
    into a full model or the other way round, or a checkpoint of another architecture."""
    from safetensors.torch import load_file

    _check_kind(directory, model, where)
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        adapter = load_file(str(directory / ADAPTER))
        result = set_peft_model_state_dict(model, adapter)
        # Loading is non-strict on the whole model: the base weights are "missing" by design.
        missing = [k for k in result.missing_keys if "lora_" in k]
        _check_keys(missing, result.unexpected_keys, where)
        return
    state: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    _check_keys([k for k in missing if k not in tied], unexpected, where)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _check_kind(directory: Path, model: nn.Module, where: Path) -> None:
    """Refuse a LoRA adapter for a full model, or full weights for a LoRA one."""
    if hasattr(model, "peft_config") and not (directory / ADAPTER).is_file():
        raise UserError("checkpoint holds full weights but this run uses --lora", file=str(where))
    if not hasattr(model, "peft_config") and (directory / ADAPTER).is_file():
        raise UserError("checkpoint holds a LoRA adapter; resume with --lora", file=str(where))


def _check_keys(missing: list[str], unexpected: list[str], where: Path) -> None:
    if missing or unexpected:
        raise UserError(f"checkpoint does not match the model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})", file=str(where))
