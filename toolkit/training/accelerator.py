"""Accelerate, set up one way for every trainer, and the one way they all accumulate gradients."""

from __future__ import annotations

import contextlib
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
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, GradientAccumulationPlugin

    tracking = accelerator_kwargs(report_to, out)
    cpu = not torch.cuda.is_available()
    deepspeed = PartialState(cpu=cpu).distributed_type == DistributedType.DEEPSPEED
    return Accelerator(mixed_precision="bf16" if bf16 and deepspeed else "no", cpu=cpu,
                       gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1), **tracking)


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
    return contextlib.nullcontext() if last else accelerator.no_sync(model)
