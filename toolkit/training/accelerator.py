"""Accelerate, set up one way for every trainer, and the one way they all accumulate gradients."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from toolkit.training.trackers import accelerator_kwargs

if TYPE_CHECKING:
    from accelerate import Accelerator


def make_accelerator(bf16: bool, report_to: str = "none", out: Path = Path(".")) -> Accelerator:
    """Accelerate on whatever is there. Without a GPU it must be told `cpu=True`, or processes started by
    torchrun each believe they are alone instead of forming gloo DDP ranks.

    bf16 is the trainer's own `autocast`, not Accelerate's mixed precision: Accelerate fixes that once per
    process and refuses a change, and one process may train several times with and without --bf16 (the
    Python API, the tests). DeepSpeed is the exception: its engine holds the weights in bf16, so there
    Accelerate is told (and it allows a change under DeepSpeed).

    Gradient accumulation is the trainers' own too (`gradient_sync`): num_steps=1 keeps `backward` from
    dividing the loss again, even when `accelerate launch --gradient_accumulation_steps` sets it.

    `report_to` names the experiment tracker (toolkit/training/trackers.py) logging under `out`: its package
    is checked here, first, before the run touches anything."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, parse_flag_from_env

    tracking = accelerator_kwargs(report_to, out)
    warn_if_bf16_is_slow(bf16, "cuda" if torch.cuda.is_available() else "cpu")
    # what `accelerate launch` with a DeepSpeed config sets; `cpu=True` would silently turn it into plain DDP
    deepspeed = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    cpu = not torch.cuda.is_available() and not deepspeed
    # DeepSpeed on its CPU accelerator: Accelerate names no backend, and each rank would believe it is alone
    handlers = [InitProcessGroupKwargs(backend="gloo")] if deepspeed and not torch.cuda.is_available() else []
    # DeepSpeed print()s its CPU op builds while it starts: stdout is kept for --json
    with contextlib.redirect_stdout(sys.stderr):
        return Accelerator(mixed_precision="bf16" if bf16 and deepspeed else "no", cpu=cpu, kwargs_handlers=handlers,
                           gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1), **tracking)


def cpu_has_bf16_units() -> bool:
    """Whether oneDNN finds bfloat16 instructions (avx512_bf16, AMX) on this CPU."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_if_bf16_is_slow(bf16: bool, device_type: str) -> None:
    """One line on stderr when --bf16 meets a CPU without bfloat16 units: there torch emulates bf16 matmuls,
    and on this project's AVX2 machine a LoRA DPO step of SmolLM2-135M took 136 s with --bf16, 6 s without."""
    if bf16 and device_type == "cpu" and not cpu_has_bf16_units():
        from toolkit.console import console, is_main_rank

        if is_main_rank():
            console.print(f"[yellow]warning:[/] --bf16 on a CPU without bfloat16 units (torch sees "
                          f"{torch.backends.cpu.get_cpu_capability()}): it runs many times slower than float32 "
                          "here; drop --bf16")


def configure_deepspeed(accelerator: Accelerator, micro_batch_size: int, max_grad_norm: float,
                        hidden_size: int | None = None) -> None:
    """Fill the DeepSpeed config's "auto" batch and clipping values before `prepare` (Accelerate takes them
    from a dataloader, which llamakit's trainers do not prepare); nothing without DeepSpeed. Accumulation
    stays 1 in DeepSpeed's eyes: `gradient_sync` tells the engine which micro-batch ends the step.
    `hidden_size` sizes ZeRO's "auto" buckets (Accelerate's formulas) for a model without a `config`."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    zero = ds.get("zero_optimization", {})
    if hidden_size is not None:
        for key, size in (("reduce_bucket_size", hidden_size * hidden_size),
                          ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                          ("stage3_param_persistence_threshold", 10 * hidden_size)):
            if zero.get(key) == "auto":
                zero[key] = size
    ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = max_grad_norm  # the engine clips (0: off); clip_grad_norm_ reads back its norm


def zero_stage(accelerator: Accelerator) -> int:
    """The ZeRO stage of the DeepSpeed config this run was launched with; 0 without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    return 0 if plugin is None else int(plugin.zero_stage)


def forwards_together(accelerator: Accelerator) -> bool:
    """Whether every process must run every forward, in step: under ZeRO-3 each layer's forward gathers its
    weights' shards from all processes, so one process scoring alone (or fewer batches than another) hangs."""
    return zero_stage(accelerator) == 3


def zero_optimizer(accelerator: Accelerator, optimizer: torch.optim.Optimizer) -> dict[str, int] | None:
    """{"stage", "partition_count"} as the ZeRO optimizer DeepSpeed built for a prepared `optimizer` reports
    them (what its checkpoints record): proof that ZeRO, not plain DDP, stepped. None without one."""
    if accelerator.state.deepspeed_plugin is None:
        return None
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    zero = getattr(optimizer, "optimizer", None)  # inside Accelerate's wrapper
    count = getattr(zero, "partition_count", None)
    if count is None:  # DeepSpeed without ZeRO
        return None
    if isinstance(zero, DeepSpeedZeroOptimizer_Stage3):
        return {"stage": 3, "partition_count": int(count)}
    # stages 1 and 2 share one class, and count partitions per parameter group
    return {"stage": 2 if zero.partition_gradients else 1, "partition_count": int(count[0])}


def gathered_weights(accelerator: Accelerator, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Every process enters it: under ZeRO-3 each holds a shard of every weight, and inside this the whole
    weights are back (read-only) so the main process can save or merge them; nothing otherwise."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed  # only under DeepSpeed, which the optional extra installs

    return deepspeed.zero.GatheredParameters(list(model.parameters()))


def autocast(accelerator: Accelerator, bf16: bool) -> torch.autocast:
    """bf16 autocast on the accelerator's device when `bf16` (DeepSpeed's engine runs bf16 by itself)."""
    from accelerate.utils import DistributedType

    enabled = bf16 and accelerator.distributed_type != DistributedType.DEEPSPEED
    return torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=enabled)


def gradient_sync(accelerator: Accelerator, model: torch.nn.Module,
                  last: bool) -> contextlib.AbstractContextManager:
    """Wrap each micro-batch's forward and backward: gradients add up locally, and DDP all-reduces them
    once, in the backward of the optimizer step's last micro-batch. Each micro-batch's loss must already be
    scaled to its share of the step (e.g. divided by the number of micro-batches)."""
    if accelerator.state.deepspeed_plugin is not None:
        # the engine steps in `backward` whenever Accelerate says gradients sync (ZeRO has no no_sync)
        return _sync_gradients(accelerator, last)
    return contextlib.nullcontext() if last else accelerator.no_sync(model)


@contextlib.contextmanager
def _sync_gradients(accelerator: Accelerator, sync: bool):
    accelerator.gradient_state._set_sync_gradients(sync)
    try:
        yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)
