"""`llamakit interpolate`: one flag per field of InterpolateConfig (YAML keys = flag names)."""

from __future__ import annotations

import click

from toolkit.commands.params import dataclass_options
from toolkit.config import config_option
from toolkit.interpolate import InterpolateConfig
from toolkit.models import allow_pickle_option


@click.command("interpolate")
@dataclass_options(InterpolateConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@allow_pickle_option
@config_option
def interpolate_cmd(as_json: bool, **settings) -> None:
    """Pull a trained policy back towards its base in weight space: θ_base + w·(θ_policy − θ_base) (WiSE-FT).

    KL from the base falls about as w², what training taught about as w: a policy trained past a KL budget comes
    back inside it. With --kl-target N --prompts TRAIN.jsonl the weight is the largest whose measured KL
    (eval-policy's estimator, on the first --limit prompts) is at most N nats per answer.
    """
    from toolkit.console import console, emit_json
    from toolkit.interpolate import interpolate

    result = interpolate(InterpolateConfig(**settings))
    summary = {"out": str(result.out), "weight": result.weight, "within_kl_target": result.within_target,
               "measurements": [{"weight": m.weight, "kl": m.kl, "kl_sem": m.kl_sem} for m in result.measurements],
               "seconds": round(result.seconds, 2)}
    if as_json:
        emit_json(summary)
        return
    for m in result.measurements:
        console.print(f"w = {m.weight:.3f}: KL from the base {m.kl:.2f} ± {m.kl_sem:.2f} nats per answer")
    if result.within_target is False:
        console.print(f"[yellow]no measured weight was within --kl-target; wrote the quadratic model's "
                      f"w = {result.weight:.3f} (not measured): raise --tries to measure it[/yellow]")
    console.print(f"wrote {result.out} (w = {result.weight:.3f})")


COMMANDS = [interpolate_cmd]
