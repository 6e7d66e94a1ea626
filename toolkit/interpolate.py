"""`llamakit interpolate`: a trained policy pulled back towards the model it was trained from, in weight space:
θ_w = θ_base + w·(θ_policy − θ_base). WiSE-FT (Wortsman et al. 2022) for fine-tuning, WARP's interpolation
towards the initialisation (Ramé et al. 2024) for RLHF: KL from the base falls about as w² while what training
taught falls about as w, so a policy trained past a KL budget comes back inside it keeping most of its gain.

With `--kl-target` the weight is measured, not guessed: the policy answers `--prompts` (training prompts; the
held-out ones stay for `eval-policy`) and the KL from the base is estimated on those answers exactly as
`eval-policy` does; the next weight follows from KL(w) ≈ w²·c, until a measured weight is within the target.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import UserError
from toolkit.options import SEED_MAX, flag_field

KIND = "interpolated-model"


@dataclass
class InterpolateConfig:
    policy: str = flag_field("", "Trained policy: a Hugging Face directory (rlhf/dpo/sft policy, or a LoRA adapter).",
                             nonempty=True)
    base: str = flag_field("smollm2-135m", "The model POLICY was trained from (same architecture and tokenizer).",
                           nonempty=True)
    out: str = flag_field("", "Directory to write the interpolated model to.", nonempty=True)
    weight: float = flag_field(1.0, "w: the share of POLICY's change from BASE kept (1 = POLICY); with "
                                    "--kl-target, the largest weight tried.", min=0, max=1, min_open=True)
    kl_target: float = flag_field(0.0, "Nats per answer: keep the largest weight whose KL from BASE, measured on "
                                       "--prompts, is at most this (0 = off: use --weight as given).", min=0)
    prompts: str = flag_field("", "Prompts to measure the KL on with --kl-target (training prompts: keep held-out "
                                  "ones for eval-policy).")
    limit: int = flag_field(64, "Prompts of --prompts answered per measurement (the first N).", min=1)
    tries: int = flag_field(3, "Measurements at most with --kl-target.", min=1)
    temperature: float = flag_field(1.0, "Sampling temperature of the measurement (the one eval-policy and rlhf "
                                         "use for the KL).", min=0, min_open=True)
    max_new_tokens: int = flag_field(64, "Answer budget in tokens for the measurement.", min=1)
    batch_size: int = flag_field(16, "Answers generated at once.", min=1)
    seed: int = flag_field(0, "Seed of the measurement's sampling (the same answers' seeds at every weight).",
                           min=0, max=SEED_MAX)
    overwrite: bool = flag_field(False, "Replace an earlier interpolated model in --out (never a directory "
                                        "llamakit did not write).")


@dataclass
class Measurement:
    weight: float
    kl: float  # mean over answers, nats
    kl_sem: float


@dataclass
class InterpolateResult:
    out: Path
    weight: float
    measurements: list[Measurement]
    within_target: bool | None  # None without --kl-target
    seconds: float


def next_weight(weight: float, kl: float, target: float) -> float:
    """The weight whose KL the quadratic model KL(w) = (w / weight)²·kl puts at `target`."""
    return weight * math.sqrt(target / kl) if kl > 0 else weight


def choose_weight(measure: Callable[[float], Measurement], start: float, target: float,
                  tries: int) -> tuple[float, list[Measurement], bool]:
    """The largest measured weight ≤ `start` whose KL is within `target`: (weight, measurements, found). When
    none of `tries` measurements is, the quadratic model's weight from the last one (not measured)."""
    measurements: list[Measurement] = []
    weight = start
    for _ in range(tries):
        m = measure(weight)
        measurements.append(m)
        if m.kl <= target:
            return weight, measurements, True
        weight = next_weight(weight, m.kl, target)
    return weight, measurements, False


def trainable_pairs(model: Any, base: Any) -> list[tuple[Any, Any]]:
    """(policy parameter, base parameter) by name; a tied embedding counts once (named_parameters dedups)."""
    base_params = dict(base.named_parameters())
    pairs = []
    for name, p in model.named_parameters():
        b = base_params.get(name)
        if b is None or b.shape != p.shape:
            found = "missing" if b is None else f"shape {tuple(b.shape)}"
            raise UserError(f"--base: parameter {name} has shape {tuple(p.shape)} in POLICY, {found} in BASE: "
                            "BASE must be the model POLICY was trained from")
        pairs.append((p, b))
    return pairs


def set_weight(pairs: list[tuple[Any, Any]], current: float, weight: float) -> None:
    """Move θ from θ_base + current·Δ to θ_base + weight·Δ in place (no third copy of the model)."""
    import torch

    with torch.no_grad():
        for p, b in pairs:
            p.sub_(b).mul_(weight / current).add_(b)


def _check(cfg: InterpolateConfig) -> None:
    from toolkit.io import claim_output_dir

    if cfg.kl_target > 0 and not cfg.prompts:
        raise UserError("--kl-target measures the KL on --prompts: name a prompt file (training prompts)")
    if cfg.kl_target == 0 and cfg.weight == 1:
        raise UserError("nothing to do: give --weight below 1, or --kl-target with --prompts")
    claim_output_dir(cfg.out, KIND, overwrite=cfg.overwrite)


def interpolate(cfg: InterpolateConfig) -> InterpolateResult:
    """Load POLICY and BASE, choose the weight (measured with --kl-target), write OUT atomically."""
    import torch

    from toolkit.eval_policy import same_vocabulary
    from toolkit.models import load_causal_lm

    started = time.perf_counter()
    _check(cfg)
    ids = _prompt_ids(cfg) if cfg.kl_target > 0 else []  # a bad file is refused before the models load
    model, tokenizer = load_causal_lm(cfg.policy, dtype=torch.float32)
    base, base_tokenizer = load_causal_lm(cfg.base, dtype=torch.float32)
    if not same_vocabulary(tokenizer, base_tokenizer):
        raise UserError("--base: POLICY and BASE have different tokenizers: BASE must be the model POLICY was "
                        "trained from")
    pairs = trainable_pairs(model, base)
    current = 1.0

    def at(weight: float) -> None:
        nonlocal current
        set_weight(pairs, current, weight)
        current = weight

    measurements: list[Measurement] = []
    within: bool | None = None
    weight = cfg.weight
    if cfg.kl_target > 0:
        measure_at = _measurer(cfg, ids, model, tokenizer, base)

        def measure(w: float) -> Measurement:
            at(w)
            return measure_at(w)

        weight, measurements, within = choose_weight(measure, cfg.weight, cfg.kl_target, cfg.tries)
    at(weight)
    _save(cfg, model, tokenizer, weight, measurements, within)
    return InterpolateResult(Path(cfg.out), weight, measurements, within, time.perf_counter() - started)


def _eval_config(cfg: InterpolateConfig) -> Any:
    from toolkit.eval_policy import EvalConfig

    return EvalConfig(policy=cfg.policy, prompts=cfg.prompts, baseline=cfg.base, temperature=cfg.temperature,
                      max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed, limit=cfg.limit)


def _prompt_ids(cfg: InterpolateConfig) -> list[list[int]]:
    """The first --limit prompts in POLICY's chat template, read and checked as eval-policy does (each leaves room
    for --max-new-tokens in POLICY's context)."""
    from toolkit.eval_policy import encode_prompts, resolve_source

    _, ids = encode_prompts(resolve_source(cfg.policy, "--policy"), _eval_config(cfg), "--policy")
    if not ids:
        raise UserError("no prompts to measure the KL on", file=cfg.prompts)
    return ids


def _measurer(cfg: InterpolateConfig, ids: list[list[int]], model: Any, tokenizer: Any,
              base: Any) -> Callable[[float], Measurement]:
    """KL(θ_w ‖ BASE) on the answers θ_w samples to the prompts `ids`: eval-policy's estimator (the sum of the
    answer's log-ratios: θ_w's from the sampler, BASE's teacher-forced), the same seeds at every weight."""
    from toolkit.console import progress
    from toolkit.eval_policy import answer_logprobs, generate_local, row_seed, standard_error
    from toolkit.generation import pad_token_id

    ecfg = _eval_config(cfg)
    seeds = [row_seed(cfg.seed, k) for k in range(len(ids))]
    pad_id = pad_token_id(tokenizer)

    def measure(weight: float) -> Measurement:
        with progress(transient=True) as bar:
            task = bar.add_task(f"KL at w = {weight:.3f}", total=2 * len(ids), status="")
            advance = lambda n: bar.advance(task, n)  # noqa: E731 - a one-line callback
            answers = generate_local(model, tokenizer, ids, seeds, ecfg, advance)
            tokens = [a.token_ids for a in answers]
            ref = answer_logprobs(base, pad_id, ids, tokens, cfg.temperature, advance)
        kls = [sum(a.sampler_logprobs) - sum(b) for a, b in zip(answers, ref, strict=True)]
        return Measurement(weight, sum(kls) / len(kls), standard_error(kls) or 0.0)

    return measure


def _save(cfg: InterpolateConfig, model: Any, tokenizer: Any, weight: float, measurements: list[Measurement],
          within: bool | None) -> None:
    from toolkit.io import claim_output_dir
    from toolkit.model_card import render_card
    from toolkit.training.export import save_model

    claim_output_dir(cfg.out, KIND, overwrite=cfg.overwrite)  # again: it may have been taken while we measured
    metrics = {"weight": weight, "within_kl_target": within,
               **{f"kl_at_{m.weight:.3f}": round(m.kl, 4) for m in measurements}}
    card = render_card(method="interpolate", summary=f"{cfg.policy} pulled back towards {cfg.base} in weight space: "
                       f"θ = θ_base + {weight:.3f}·(θ_policy − θ_base) (WiSE-FT)", base=cfg.base,
                       data=cfg.prompts, rows=cfg.limit, unit="prompts",
                       config=dataclasses.asdict(cfg), metrics=metrics, model_dir=cfg.out)
    manifest = {"kind": KIND, "base": cfg.base, "policy": cfg.policy, "weight": weight, "kl_target": cfg.kl_target,
                "within_kl_target": within, "measurements": [dataclasses.asdict(m) for m in measurements]}
    save_model(model, tokenizer, Path(cfg.out), manifest, card)
