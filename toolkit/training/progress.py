"""The progress bar of a training run: on the main process only, showing the last loss."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def loss_bar(name: str, total: int, start: int, enabled: bool) -> Iterator[Callable[[int, float], None]]:
    """Yields `advance(step, loss)`; a no-op where `enabled` is false (the other processes)."""
    from toolkit.console import progress

    if not enabled:
        yield lambda step, loss: None
        return
    with progress() as bar:
        task = bar.add_task(name, total=total, status="")
        bar.update(task, completed=start)
        yield lambda step, loss: bar.update(task, completed=step, status=f"loss {loss:.4f}")


@contextlib.contextmanager
def count_bar(name: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n)` for a pass over `total` items that is not a training step (gone when done); a no-op
    where `enabled` is false."""
    from toolkit.console import progress

    if not enabled:
        yield lambda n: None
        return
    with progress(transient=True) as bar:
        task = bar.add_task(name, total=total, status="")
        yield lambda n: bar.update(task, advance=n)
