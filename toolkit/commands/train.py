"""`llamakit sft` and `llamakit rlhf`: one flag per field of SFTConfig / PPOConfig (YAML keys = flag names)."""

from __future__ import annotations

import click

from rlhf.config import PPOConfig
from toolkit.commands.params import dataclass_options
from toolkit.config import config_option
from toolkit.models import allow_pickle_option
from toolkit.sft import SFTConfig


@click.command("sft")
@dataclass_options(SFTConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as one JSON object.")
@allow_pickle_option
@config_option
def sft_cmd(as_json: bool, **settings) -> None:
    """Supervised fine-tuning on conversations (loss on assistant tokens only); writes OUT/model."""
    from toolkit.console import emit_json
    from toolkit.sft import train_sft

    note_checkpoints_kept(settings["out"])
    result = train_sft(SFTConfig(**settings))
    if as_json:
        final = result.history[-1] if result.history else {}
        emit_json({"out": str(result.out), "model": str(result.model_dir), "steps": result.steps,
                   "loss": final.get("loss"), **result.data_stats})


@click.command("rlhf")
@dataclass_options(PPOConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as one JSON object.")
@allow_pickle_option
@config_option
def rlhf_cmd(as_json: bool, **settings) -> None:
    """PPO of the policy against a reward model or rule scorers; writes OUT/policy and OUT/metrics.jsonl.

    Runs on one CPU/GPU as is, and on several under `torchrun --nproc_per_node N -m toolkit rlhf ...`
    or `accelerate launch --config_file templates/accelerate/... -m toolkit rlhf ...`.
    """
    from rlhf.trainer import train
    from toolkit.console import emit_json

    note_checkpoints_kept(settings["out"])
    cfg = PPOConfig(**settings)
    result = train(cfg)
    if as_json and result.policy_dir is not None:
        emit_json({"out": str(result.out), "policy": str(result.policy_dir), "algo": cfg.algo, "guide": cfg.guide,
                   "steps": result.step, "final": result.history[-1] if result.history else {}})


def note_checkpoints_kept(out: str) -> None:
    """What SIGINT/SIGTERM leaves of a training run: its checkpoints, which --resume continues from."""
    from toolkit.console import note_output

    def kept() -> str:
        from pathlib import Path

        from toolkit.training.checkpoint import latest_checkpoint

        last = latest_checkpoint(Path(out))
        if last is None:
            return f"no checkpoint was written to {out} yet (--save-every N writes one every N steps)"
        return f"the last checkpoint is kept: {last}"

    note_output(kept, "run the same command with --resume to continue from the last checkpoint")


COMMANDS = [sft_cmd, rlhf_cmd]
