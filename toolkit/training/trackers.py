"""Experiment trackers (`--report-to`) through Accelerate's own: TensorBoard, Weights & Biases, MLflow.

Every tracker keeps its files local unless the user points it elsewhere: TensorBoard writes OUT/runs, W&B
runs offline into OUT/wandb (unless WANDB_MODE is set; `wandb sync` uploads later), MLflow writes a file store
in OUT/mlruns (unless MLFLOW_TRACKING_URI is set). The package is checked before anything else happens and
the tracker started before the run writes its first file (right after --out is marked as the run's), so a
missing package or a tracker that will not start leaves --out unclaimed and the same command works once it
is fixed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.errors import UserError

if TYPE_CHECKING:
    from accelerate import Accelerator

REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # what each tracker imports
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}  # what pip installs
_LOCAL_DIRS = ("runs", "wandb", "mlruns")  # what the trackers write under OUT


def accelerator_kwargs(report_to: str, out: Path) -> dict[str, Any]:
    """Accelerator(**these): the tracker to log with, once its package is known to import. Accelerate itself
    drops a tracker whose package is missing without a word, so the check is here."""
    if report_to not in REPORT_TO:
        raise UserError(f"--report-to: one of {', '.join(REPORT_TO)}, got '{report_to}'")
    if report_to == "none":
        return {}
    if importlib.util.find_spec(_MODULES[report_to]) is None:
        raise UserError(f"--report-to {report_to} needs the {_PACKAGES[report_to]} package: pip install "
                        f"'llamakit[tracking]' (or pip install {_PACKAGES[report_to]}); nothing was written")
    from accelerate.utils import ProjectConfiguration

    return {"log_with": report_to,
            "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "runs"))}


def start_tracking(accelerator: Accelerator, report_to: str, out: Path, project: str, config: Any) -> None:
    """Start the tracker (main process) with the run's settings as its hyper-parameters. Called once --out is
    marked as the run's and before the run writes anything else: a tracker that fails to start takes back
    what it wrote, and --out that holds nothing else then (a new run) is removed, so nothing is claimed."""
    if report_to == "none" or not accelerator.is_main_process:
        return
    before = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if report_to == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        # MLflow 3 refuses a new file store unless told it is wanted; here it is the point (no server needed).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
    out.mkdir(parents=True, exist_ok=True)  # W&B refuses a `dir` that does not exist (train-reward's staging)
    init = {"wandb": {"dir": str(out), "mode": os.environ.get("WANDB_MODE", "offline")}}
    try:
        accelerator.init_trackers(project, config=_hparams(config), init_kwargs=init)
    except Exception as err:  # noqa: BLE001 - any tracker library's failure becomes the one-line error
        stop_tracking(accelerator)
        _take_back(out, before)
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"--report-to {report_to}: the tracker did not start: {why}; nothing was written") from None


def staging_dir(out: Path) -> Path:
    """Where a run whose --out is written whole at the end (train-reward) keeps its tracker's files until then:
    beside --out, so that `tensorboard --logdir` can follow the run."""
    return out.with_name(f".{out.name}.tracking")


def move_tracked(staging: Path, into: Path) -> None:
    """The finished tracker files from `staging` into the directory about to become --out."""
    if not staging.is_dir():
        return
    for entry in staging.iterdir():
        shutil.move(entry, into / entry.name)
    staging.rmdir()


def stop_tracking(accelerator: Accelerator) -> None:
    """Flush and close the trackers, once (a failed run too: what it logged stays readable)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()


def _take_back(out: Path, before: set[str]) -> None:
    """Remove the tracker directories that were not in `out` before, then `out` itself when only the run's
    marker is left (a run that has not written anything is not a run: claim_output_dir agrees)."""
    from toolkit.io import MANIFEST

    for name in _LOCAL_DIRS:
        if name not in before:
            shutil.rmtree(out / name, ignore_errors=True)
    if out.is_dir() and {p.name for p in out.iterdir()} <= {MANIFEST}:
        shutil.rmtree(out, ignore_errors=True)


def _hparams(config: Any) -> dict[str, bool | int | float | str]:
    """A config dataclass as the flat scalars every tracker takes as hyper-parameters."""
    return {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in dataclasses.asdict(config).items()}
