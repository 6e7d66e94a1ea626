"""The learning-rate schedule every trainer uses: linear warm-up, then linear decay to 0."""

from __future__ import annotations

import torch


def warmup_linear(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' own schedule: the lr factor climbs from 0 at step 0 to 1 at `warmup_steps`, then falls
    linearly to 0 at `total_steps`. Call `step()` once per optimizer step."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
