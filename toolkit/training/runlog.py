"""A run's outputs: metrics.jsonl, samples.jsonl (when the trainer has samples), the experiment tracker's
(--report-to), and curves.png (a panel per curve)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.training.trackers import stop_tracking

if TYPE_CHECKING:
    from accelerate import Accelerator


def drop_rows_after(path: Path, step: int) -> None:
    """On resume, forget rows an interrupted run wrote after its last checkpoint."""
    from toolkit.io import read_existing  # tolerates a torn last line

    if not path.is_file():
        return
    keep = [row for row in read_existing(path) if int(row.get("step", 0)) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
    tmp.replace(path)


class RunLog:
    """Main-process writer of metrics (and samples); the other ranks get a no-op instance that only keeps
    `history`, the rows this process logged."""

    def __init__(self, out: Path, enabled: bool, samples: bool = False, tracker: Accelerator | None = None):
        from toolkit.io import RowWriter

        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        self.tracker = tracker  # its trackers (--report-to, started by trackers.start_tracking) get each row too
        self.samples = None
        if not enabled:
            return
        self.metrics = RowWriter(out / "metrics.jsonl")
        if samples:
            self.samples = RowWriter(out / "samples.jsonl")

    def log(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if not self.enabled:
            return
        self.metrics.write(row)
        if self.tracker is not None:
            scalars = {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            self.tracker.log({k: v for k, v in scalars.items() if k != "step"}, step=row["step"])

    def log_samples(self, rows: Sequence[dict[str, Any]]) -> None:
        if self.samples is not None:
            for row in rows:
                self.samples.write(row)

    def close(self) -> None:
        if self.tracker is not None:
            stop_tracking(self.tracker)
        if not self.enabled:
            return
        self.metrics.close()
        if self.samples is not None:
            self.samples.close()


@dataclass(frozen=True)
class Curve:
    """One panel: `key` of every row that has it, against the row's "step"."""

    key: str
    title: str
    smooth: bool = False  # noisy per-step values (a loss): drawn faint, under their moving average
    points: tuple[str, str] | None = None  # (key, legend label): a second series as points (held-out loss)
    baseline: tuple[str, float] | None = None  # (legend label, value): a dashed reference line


def plot_curves(rows: Sequence[dict[str, Any]], path: Path, curves: Sequence[Curve],
                title: str = "") -> Path | None:
    """One PNG with a panel per curve, written under a temporary name and renamed into place."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(max(6, 4 * len(curves)), 3.4), squeeze=False)
    for ax, curve in zip(axes[0], curves, strict=True):
        _panel(ax, rows, curve)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    picked = [r for r in rows if key in r]
    return [r["step"] for r in picked], [r[key] for r in picked]


def _panel(ax, rows: Sequence[dict[str, Any]], curve: Curve) -> None:
    import numpy as np

    steps, values = _series(rows, curve.key)
    if curve.smooth and values:
        ax.plot(steps, values, color="0.75", linewidth=0.8, label="per step")
        window = max(1, min(25, len(values) // 5))
        ax.plot(steps[window - 1:], np.convolve(values, np.ones(window) / window, mode="valid"),
                label=f"{window}-step mean")
    else:
        ax.plot(steps, values, marker="o" if len(values) < 30 else None, ms=3)
    if curve.points:
        key, label = curve.points
        steps, values = _series(rows, key)
        if values:
            ax.plot(steps, values, "o-", label=label)
    if curve.baseline:
        label, value = curve.baseline
        ax.axhline(value, color="0.6", linestyle="--", linewidth=1, label=label)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_title(curve.title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
