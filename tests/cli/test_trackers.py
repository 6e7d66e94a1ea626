"""`--report-to`: real TensorBoard and MLflow runs read back with their own readers, and a tracker that is
missing or does not start stopping the command before --out is claimed.

A run goes through a child process where its environment is the point (a package made unimportable, MLflow's
process-wide tracking URI), and through this process (`cli`) otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.cli import FIXTURES, cli, hh_slice, run_cli

TINY_SFT = ("--data", FIXTURES / "alpaca-24.json", "--max-steps", "2", "--batch-size", "4", "--max-length", "64",
            "--warmup-ratio", "0")


def sft(model: Path, out: Path, *flags: str, env: dict | None = None):
    return run_cli("sft", "--model", model, "--out", out, *TINY_SFT, *flags, env=env, timeout=300)


def losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def test_tensorboard_gets_the_loss_of_every_step(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli("sft", "--model", tiny_llama_dir, "--out", out, *TINY_SFT, "--report-to", "tensorboard")
    assert code == 0, err[-3000:]
    logged = scalars(out / "runs", "loss")
    assert sorted(logged) == [1, 2]
    for step, loss in losses(out):
        assert logged[step] == pytest.approx(loss, rel=1e-5)


def test_mlflow_file_store_under_out_holds_metrics_and_params(tiny_llama_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):  # the defaults are tested
        monkeypatch.delenv(name, raising=False)
    proc = sft(tiny_llama_dir, out, "--report-to", "mlflow")
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("llamakit-sft")
    [run] = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, pytest.approx(m.value, rel=1e-5)) for m in history] == losses(out)
    assert run.data.params["max_steps"] == "2" and run.data.params["report_to"] == "mlflow"
    assert run.info.status == "FINISHED"


def blocked(tmp_path: Path, module: str) -> dict[str, str]:
    """An environment whose Python cannot import `module`: a sitecustomize puts None in sys.modules under its
    name, Python's own way of marking a module unimportable (import raises ModuleNotFoundError and
    importlib.util.find_spec answers None), whether or not the package is installed."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    return {"PYTHONPATH": str(site)}


def test_missing_tracker_package_stops_before_out_is_touched(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    proc = sft(tiny_llama_dir, out, "--report-to", "wandb", env=blocked(tmp_path, "wandb"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --report-to wandb needs the wandb package")
    assert "pip install 'llamakit[tracking]'" in last and "Traceback" not in proc.stderr
    assert not out.exists()
    code, _, err = cli("sft", "--model", tiny_llama_dir, "--out", out, *TINY_SFT)  # the same --out, no tracker
    assert code == 0, err[-3000:]


def test_tracker_that_does_not_start_leaves_out_unclaimed(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    proc = sft(tiny_llama_dir, out, "--report-to", "mlflow", env={"MLFLOW_TRACKING_URI": "bogus://nowhere"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --report-to mlflow: the tracker did not start: ") and "bogus" in last
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    code, _, err = cli("sft", "--model", tiny_llama_dir, "--out", out, *TINY_SFT)
    assert code == 0, err[-3000:]


def test_rlhf_without_tensorboard_claims_nothing_and_logs_once_installed(tiny_llama_dir, tmp_path):
    out = tmp_path / "rlhf"
    args = ("rlhf", "--policy", tiny_llama_dir, "--prompts", FIXTURES / "prompts-alpaca-32.jsonl",
            "--reward", "rules:length", "--out", out, "--steps", "2", "--batch-size", "4", "--num-minibatches", "2",
            "--ppo-epochs", "1", "--max-new-tokens", "8", "--report-to", "tensorboard")
    proc = run_cli(*args, env=blocked(tmp_path, "tensorboard"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --report-to tensorboard needs the tensorboard "
                                                            "package: pip install 'llamakit[tracking]'")
    assert not out.exists()
    code, _, err = cli(*args)  # tensorboard importable again
    assert code == 0, err[-3000:]
    assert sorted(scalars(out / "runs", "objective/scores")) == [1, 2]


def test_dpo_and_train_reward_log_their_loss_to_tensorboard(tiny_llama_dir, tmp_path):
    data = hh_slice(tmp_path / "pairs.jsonl", 0, 16)
    dpo, rm = tmp_path / "dpo", tmp_path / "rm"
    code, _, err = cli("dpo", "--data", data, "--policy", tiny_llama_dir, "--out", dpo, "--max-steps", "2",
                       "--max-length", "48", "--max-prompt-length", "24", "--batch-size", "2", "--report-to",
                       "tensorboard")
    assert code == 0, err[-3000:]
    assert sorted(scalars(dpo / "runs", "loss")) == [1, 2]
    code, _, err = cli("train-reward", "--data", data, "--model", tiny_llama_dir, "--out", rm, "--max-steps", "2",
                       "--batch-size", "4", "--max-length", "48", "--eval-split", "0.25", "--report-to",
                       "tensorboard")
    assert code == 0, err[-3000:]
    assert sorted(scalars(rm / "runs", "loss")) == [1, 2]  # moved in with the model, written whole at the end
    assert (rm / "llamakit-manifest.json").is_file() and not list(tmp_path.glob(".rm*"))


def scalars(runs: Path, tag: str) -> dict[int, float]:
    """{step: value} of scalar `tag` in the TensorBoard event files under `runs`, read by TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for path in runs.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            return {e.step: e.value for e in acc.Scalars(tag)}
    return {}
