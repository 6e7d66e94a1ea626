"""`llamakit dpo`: one flag per field of DPOConfig (YAML keys = flag names)."""

from __future__ import annotations

import click

from toolkit.commands.params import dataclass_options
from toolkit.commands.train import note_checkpoints_kept
from toolkit.config import config_option
from toolkit.dpo import DPOConfig
from toolkit.models import allow_pickle_option


@click.command("dpo")
@dataclass_options(DPOConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as one JSON object.")
@allow_pickle_option
@config_option
def dpo_cmd(as_json: bool, **settings) -> None:
    """Direct Preference Optimization on preference pairs (no reward model); writes OUT/policy.

    Runs on one CPU/GPU as is, and on several under `torchrun --nproc_per_node N -m toolkit dpo ...`.
    """
    from toolkit.console import emit_json
    from toolkit.dpo import train_dpo

    note_checkpoints_kept(settings["out"])
    result = train_dpo(DPOConfig(**settings))
    if as_json and result.policy_dir is not None:
        final = result.history[-1] if result.history else {}
        emit_json({"out": str(result.out), "policy": str(result.policy_dir), "steps": result.steps,
                   "loss": final.get("loss"), "final": final, "eval": result.eval_metrics, **result.data_stats})


COMMANDS = [dpo_cmd]
