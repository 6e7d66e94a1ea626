"""Which examples each process trains on at each optimizer step: a seeded shuffle per epoch, cut into
micro-batches, dealt out to processes and gradient-accumulation slots. Depends only on (seed, step), so a
resumed run sees the same batches as an uninterrupted one."""

from __future__ import annotations

import random

from toolkit.options import SEED_STRIDE


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """The indices 0..n-1 shuffled for `epoch`, cut into batches of `batch_size` (the last may be short)."""
    order = list(range(n))
    random.Random(seed * SEED_STRIDE + epoch).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def step_micro_batches(n: int, *, step: int, steps_per_epoch: int, batch_size: int, accumulation: int,
                       rank: int, world_size: int, seed: int) -> list[list[int]]:
    """This process's micro-batches (example indices) for optimizer step `step` (0-based): each step takes
    `accumulation` consecutive batches per process."""
    epoch, index = divmod(step, steps_per_epoch)
    first = (index * world_size + rank) * accumulation
    return epoch_batches(n, batch_size, epoch, seed)[first:first + accumulation]


def examples_read(n: int, *, start: int, stop: int, steps_per_epoch: int, batch_size: int, accumulation: int,
                  world_size: int, seed: int) -> list[int]:
    """The indices (sorted) that some process trains on in optimizer steps start..stop-1: all of them once the
    steps span an epoch, fewer for a shorter run."""
    read: set[int] = set()
    per_step = world_size * accumulation  # batches an optimizer step takes from its epoch's list
    step = start
    while step < stop and len(read) < n:
        epoch, first = divmod(step, steps_per_epoch)
        end = min(stop, (epoch + 1) * steps_per_epoch)  # this epoch's last step in range, plus one
        last = end - epoch * steps_per_epoch
        for batch in epoch_batches(n, batch_size, epoch, seed)[first * per_step:last * per_step]:
            read.update(batch)
        step = end
    return sorted(read)
