"""Run outputs: metrics.jsonl (TRL's metric names), samples.jsonl, optional TensorBoard, PNG curves."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toolkit.errors import UserError

CURVES = (
    ("objective/scores", "reward (score)"),
    ("objective/kl", "KL(π‖π_ref) per response"),
    ("objective/entropy", "entropy per response"),
    ("policy/clipfrac_avg", "clip fraction"),
    ("response/length_avg", "response length (tokens)"),
)


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
    """Main-process writer of metrics and samples (the other ranks get a no-op instance)."""

    def __init__(self, out: Path, enabled: bool, report_to: str = "none"):
        from toolkit.io import RowWriter

        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        self._tb = None
        if not enabled:
            return
        self.metrics = RowWriter(out / "metrics.jsonl")
        self.samples = RowWriter(out / "samples.jsonl")
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--report-to tensorboard needs the tensorboard package "
                                "(pip install tensorboard)") from None
            self._tb = SummaryWriter(str(out / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if not self.enabled:
            return
        self.metrics.write(row)
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, int | float) and key != "step":
                    self._tb.add_scalar(key, value, row["step"])

    def log_samples(self, rows: Sequence[dict[str, Any]]) -> None:
        if self.enabled:
            for row in rows:
                self.samples.write(row)

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics.close()
        self.samples.close()
        if self._tb is not None:
            self._tb.close()


def plot_curves(rows: Sequence[dict[str, Any]], path: Path, title: str = "llamakit rlhf") -> Path | None:
    """One PNG with a panel per curve (reward, KL, entropy, clip fraction, response length)."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for ax, (key, label) in zip(axes, CURVES, strict=True):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], marker="o" if len(rows) < 30 else None, ms=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path
