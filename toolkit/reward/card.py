"""The model card (README.md) written beside a reward model's weights, from templates/reward_model_card.md."""

from __future__ import annotations

import math
from typing import Any


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return "—" if value is None else str(value)


def _prior(sd: float | None) -> str | None:
    """The prior's spread for the card; None for plain maximum likelihood (no prior, or an infinitely wide one)."""
    return None if sd is None or math.isinf(sd) else _num(sd)


def render(cfg, metrics: dict[str, Any], calibration, *, architecture: str, eos: str | None) -> str:
    """The card of a reward model saved as a transformers `architecture` whose texts end with `eos` (None: as the
    tokenizer ends them)."""
    import jinja2

    from toolkit.resources import template_path

    path = template_path("reward_model_card.md")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    heldout = metrics.get("heldout") or {}
    rows = [(name, {k: _num(v) for k, v in m.items()}) for name, m in
            (("raw", heldout.get("raw")), (f"calibrated ({calibration.method})", heldout.get("calibrated"))) if m]
    train = metrics["train"]
    return env.from_string(path.read_text(encoding="utf-8")).render(
        backbone=cfg.model, objective=cfg.objective, data=cfg.data, data_format=train["format"], out=cfg.out,
        max_length=cfg.max_length, train_pairs=train["pairs"], scored_rows=train["scored_rows"],
        texts_cut=train["texts_cut"], heldout_n=calibration.n_pairs, heldout_data=metrics["heldout_data"],
        lora=f"LoRA r={cfg.lora_r}, merged" if cfg.lora else "all weights trained", epochs=cfg.epochs,
        batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay, center_rewards=cfg.center_rewards,
        steps=train["optimizer_steps"], seconds=train["seconds"], pairs_per_s=train["pairs_per_s"],
        metric_rows=rows, method=calibration.method, temperature=_num(calibration.temperature),
        temperature_ml=_num(calibration.temperature_ml), prior_sd=_prior(calibration.prior_sd),
        reward_mean=_num(calibration.reward_mean), reward_std=_num(calibration.reward_std),
        has_reliability=calibration.n_pairs > 0, warnings=metrics.get("warnings") or [], architecture=architecture,
        eos=eos, members=cfg.ensemble, seeds=f"{cfg.seed}–{cfg.seed + cfg.ensemble - 1}",
        crossfit=bool(cfg.calibration_folds))
