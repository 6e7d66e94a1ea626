"""`llamakit demo`: the whole RLHF pipeline, offline, on a CPU, each stage the same CLI a user runs.

serve (teacher) → instructions → conversations → preferences → sft → train-reward → rlhf → compare, then the
constraints slice: constraints (verifiable instructions from seed tasks no other stage reads) → rlhf-constraints
(GRPO from the SFT model on the checker, `rules:constraints`, with revised answers in its groups) → eval-policy
(before → after on held-out instructions, the report's headline) → report.
Each stage is a `llamakit ...` command run in this process (`invoke`: one start-up, where a subprocess per stage
paid the ~7 s import of torch and transformers eleven times); a finished stage leaves `stages/NAME.json` (its
command, seconds and result), so running the demo again resumes after the last finished stage.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.console import console
from toolkit.errors import EXIT_ROWS_FAILED, UserError
from toolkit.io import read_existing, write_json
from toolkit.resources import template_path

Invoke = Callable[[list[str]], int | None]  # runs `llamakit ARGS` in this process; its exit code (None: 0)

COMPARE_PROMPTS = (
    "Give me three tips for a good night's sleep.",
    "What is the capital of France?",
    "Write a short thank-you note to a colleague.",
    "Explain what a reward model is in one sentence.",
)


@dataclass(frozen=True)
class Sizes:
    instructions: int
    conversations: int
    turns: int
    candidates: int
    preference_prompts: int
    answer_tokens: int
    sft_steps: int
    reward_steps: int
    reward_max_length: int
    hh_pairs: int
    ppo_steps: int
    ppo_batch: int
    ppo_new_tokens: int
    constraint_train: int  # instructions GRPO on the checker trains on
    constraint_heldout: int  # instructions only eval-policy sees
    constraint_steps: int
    constraint_batch: int  # prompts per GRPO step, CONSTRAINT_GROUP answers each
    constraint_tokens: int


# FULL is sized for 15 minutes of a 2-core CPU. With the constraints slice added, one run (2026-12-02) took
# 1063 s: instructions 97, conversations 111, preferences 179 (24 prompts), sft 111, train-reward 73, rlhf 164
# (3 steps), compare 37, rlhf-constraints 157 (4 steps), eval-policy 99 (32 held-out), the rest start-up; so
# preference prompts 24 -> 16, conversations 16 -> 12, PPO steps 3 -> 2 and 4 -> 3, held-out 32 -> 24.
FULL = Sizes(instructions=24, conversations=12, turns=2, candidates=2, preference_prompts=16, answer_tokens=96,
             sft_steps=10, reward_steps=0, reward_max_length=256, hh_pairs=200, ppo_steps=2, ppo_batch=8,
             ppo_new_tokens=48, constraint_train=64, constraint_heldout=48, constraint_steps=6, constraint_batch=8,
             constraint_tokens=40)
FAST = Sizes(instructions=4, conversations=3, turns=2, candidates=2, preference_prompts=4, answer_tokens=40,
             sft_steps=3, reward_steps=8, reward_max_length=128, hh_pairs=48, ppo_steps=2, ppo_batch=4,
             ppo_new_tokens=16, constraint_train=8, constraint_heldout=4, constraint_steps=2, constraint_batch=2,
             constraint_tokens=16)
# The families an edit by code fixes (rlhf --guide revise), so a few GRPO steps can learn them from the edits: with
# these, two demos' slices moved +17.7 points [+7.4, +28.0] and +9.4 [-3.9, +22.6] on 48 held-out prompts
# (docs/demo.md). Keywords (which no edit adds) and forbidden words (met by 93% of answers before training) only
# dilute the before → after; bullets, JSON and quotes need more room than 40 tokens leave. The benchmark keeps all
# twelve families.
CONSTRAINT_KINDS = "word_limit,no_commas,start_word,title,end_phrase,postscript,lowercase"
CONSTRAINT_GROUP = 4  # answers per prompt in the slice's GRPO
CONSTRAINT_MAX_CHARS = 300  # some seed tasks carry a page of input; PPO and eval-policy cost grows with the prompt


def _stage_commands(run: Path, sizes: Sizes, teacher_url: str | None, model: str,
                    reward_model: str) -> dict[str, list[str]]:
    data = run / "data"
    teacher = ["--teacher", f"openai:{model}", "--base-url", teacher_url or "", "--api-key-env", "LLAMAKIT_DEMO_KEY",
               "--concurrency", "16", "--seed", "0",
               "--timeout", "600"]  # a busy CPU can take minutes per batch; never give up on the local teacher
    return {
        "instructions": ["generate-data", "instructions", "--seeds", str(template_path("demo/seed_tasks.jsonl")),
                         "--out", str(data / "instructions.jsonl"), "--num-instructions", str(sizes.instructions),
                         "--max-tokens", "48", *teacher],
        "conversations": ["generate-data", "conversations", "--prompts", str(data / "prompts.jsonl"),
                          "--out", str(data / "conversations.jsonl"), "--limit", str(sizes.conversations),
                          "--turns", str(sizes.turns), "--max-tokens", str(sizes.answer_tokens),
                          "--user-max-tokens", "40", *teacher],
        "preferences": ["generate-data", "preferences", "--prompts", str(data / "prompts.jsonl"),
                        "--out", str(data / "preferences.jsonl"), "--limit", str(sizes.preference_prompts),
                        "--num-candidates", str(sizes.candidates), "--temperatures", "0.7,1.2",
                        "--max-tokens", str(sizes.answer_tokens),
                        # The teacher judges too, by the logprobs of its first token (the 135M model cannot
                        # follow a "Rating: [[N]]" format); the rules weigh 3x, as so small a judge is weak.
                        "--judge", f"openai:{model}", "--judge-logprobs",
                        "--scorer", "rules:length,refusal,repetition,truncation,format", "--scorer-weight", "3",
                        *teacher],
        "sft": ["sft", "--data", str(data / "conversations.jsonl"), "--model", model, "--out", str(run / "sft"),
                "--lora", "--max-steps", str(sizes.sft_steps), "--batch-size", "4", "--max-length", "256",
                "--learning-rate", "2e-4", "--seed", "0",
                "--overwrite"],  # a stage killed half-way starts again: only a finished stage is kept
        "train-reward": ["train-reward", "--data", str(data / "reward-pairs.jsonl"), "--model", reward_model,
                         "--out", str(run / "reward"), "--eval-split", "0.2", "--epochs", "1", "--batch-size", "16",
                         "--max-length", str(sizes.reward_max_length), "--seed", "0", "--overwrite",
                         *(["--max-steps", str(sizes.reward_steps)] if sizes.reward_steps else [])],
        "rlhf": ["rlhf", "--policy", str(run / "sft" / "model"), "--reward", str(run / "reward"),
                 "--prompts", str(data / "prompts.jsonl"), "--out", str(run / "ppo"), "--lora",
                 "--steps", str(sizes.ppo_steps), "--batch-size", str(sizes.ppo_batch),
                 "--max-new-tokens", str(sizes.ppo_new_tokens), "--num-minibatches", "2", "--seed", "0",
                 "--save-every", "0", "--overwrite"],
        "constraints": ["generate-data", "constraints", "--prompts", str(data / "constraint-instructions.jsonl"),
                        "--out", str(data / "constraint-prompts.jsonl"), "--per-prompt", "1..2",
                        "--kinds", CONSTRAINT_KINDS, "--seed", "0", "--overwrite"],
        # GRPO on the checker itself, from the SFT model: the slice whose effect the report's headline measures.
        # --guide revise: each group's best answer, edited by code to meet its constraints, takes the place of the
        # worst (docs/method-comparison.md: GRPO from the base +13.8 points with it, +7.7 without); the recipe
        # is that run's (lr 3e-4, β 0.04, LoRA r 16, 2 epochs x 2 minibatches). 3 PPO steps moved the slice by
        # noise (-17 to +6 points over eight demo runs on 24 held-out prompts).
        "rlhf-constraints": ["rlhf", "--algo", "grpo", "--guide", "revise", "--group-size", str(CONSTRAINT_GROUP),
                             "--policy", str(run / "sft" / "model"), "--reward", "rules:constraints",
                             "--prompts", str(data / "constraint-train.jsonl"), "--out", str(run / "grpo-constraints"),
                             "--lora", "--lora-r", "16", "--lora-alpha", "32", "--steps", str(sizes.constraint_steps),
                             "--batch-size", str(sizes.constraint_batch), "--max-new-tokens",
                             str(sizes.constraint_tokens), "--temperature", "0.7", "--learning-rate", "3e-4",
                             "--kl-coef", "0.04", "--missing-eos-penalty", "0", "--ppo-epochs", "2",
                             "--num-minibatches", "2", "--seed", "0", "--save-every", "0", "--overwrite"],
        "eval-policy": ["eval-policy", str(run / "grpo-constraints" / "policy"),
                        "--baseline", str(run / "sft" / "model"),
                        "--prompts", str(data / "constraint-heldout.jsonl"), "--scorer", "rules:constraints",
                        "--reward", str(run / "reward"), "--temperature", "0.7", "--max-new-tokens",
                        str(sizes.constraint_tokens), "--batch-size", "32", "--seed", "0", "--out", str(run / "eval"),
                        "--overwrite"],
    }


def _prompt_pool(run: Path, sizes: Sizes) -> int:
    """New instructions from self-instruct first, topped up with the seed tasks' own instructions, so a small
    teacher that writes few usable instructions still leaves every later stage enough prompts."""
    rows = [{"prompt": r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")}
            for r in read_existing(run / "data" / "instructions.jsonl") if r.get("instruction")]
    wanted = max(sizes.conversations, sizes.preference_prompts, sizes.ppo_batch * 2)
    for seed in read_existing(template_path("demo/seed_tasks.jsonl")):
        if len(rows) >= wanted:
            break
        first = (seed.get("instances") or [{}])[0].get("input", "")
        rows.append({"prompt": seed["instruction"] + (f"\n\n{first}" if first else "")})
    _write_jsonl(run / "data" / "prompts.jsonl", rows)
    return len(rows)


def _reward_pairs(run: Path, sizes: Sizes) -> int:
    """Synthetic preference pairs plus a slice of human HH pairs, as one file for train-reward."""
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "source": "synthetic"}
            for r in read_existing(run / "data" / "preferences.jsonl")
            if isinstance(r.get("prompt"), str) and r.get("chosen") and r.get("rejected")
            and r["chosen"] != r["rejected"]]
    from toolkit.reward.data import load_preferences

    # HH text → prompt (the dialogue before the last answer) + the two final answers, as train-reward reads it.
    hh = load_preferences(template_path("demo/hh-harmless-200.jsonl"), fmt="hh").pairs[: sizes.hh_pairs]
    for pair in hh:
        chosen, rejected = pair.chosen.strip(), pair.rejected.strip()
        if pair.rejected_prompt is None and chosen and rejected and chosen != rejected:
            rows.append({"prompt": pair.prompt, "chosen": chosen, "rejected": rejected, "source": "hh"})
    _write_jsonl(run / "data" / "reward-pairs.jsonl", rows)
    return len(rows)


def _constraint_instructions(run: Path, sizes: Sizes) -> None:
    """Instructions for the constraints slice: self-instruct seed tasks the rest of the demo does not ship
    (templates/demo/constraint_tasks.jsonl), so no SFT, reward or PPO stage sees them. Held-out first."""
    pool = {r["prompt"] for r in read_existing(run / "data" / "prompts.jsonl")}
    rows, seen = [], set()
    for task in read_existing(template_path("demo/constraint_tasks.jsonl")):
        prompt = task["instruction"].strip() + (f"\n\n{task['input'].strip()}" if task.get("input") else "")
        if len(prompt) > CONSTRAINT_MAX_CHARS or prompt in pool or prompt.lower() in seen:
            continue
        seen.add(prompt.lower())
        rows.append({"prompt": prompt, "split": "heldout" if len(rows) < sizes.constraint_heldout else "train"})
        if len(rows) == sizes.constraint_heldout + sizes.constraint_train:
            break
    _write_jsonl(run / "data" / "constraint-instructions.jsonl", rows)


def _split_constraint_prompts(run: Path) -> tuple[int, int]:
    """constraint-prompts.jsonl -> constraint-train.jsonl and constraint-heldout.jsonl (by instruction)."""
    data = run / "data"
    heldout = {r["prompt"] for r in read_existing(data / "constraint-instructions.jsonl") if r["split"] == "heldout"}
    rows = read_existing(data / "constraint-prompts.jsonl")
    held = [r for r in rows if r["base_prompt"] in heldout]
    train = [r for r in rows if r["base_prompt"] not in heldout]
    _write_jsonl(data / "constraint-heldout.jsonl", held)
    _write_jsonl(data / "constraint-train.jsonl", train)
    return len(train), len(held)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def _cached(name: str, run: Path) -> dict | None:
    """The result of a stage an earlier run finished, or None."""
    marker = run / "stages" / f"{name}.json"
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text())
    console.print(f"[dim]✓ {name:<13} cached ({done['seconds']:.0f} s earlier run)[/]")
    return done


def _run_stage(name: str, args: list[str], run: Path, invoke: Invoke) -> dict:
    done = _cached(name, run)
    if done is not None:
        return done
    marker = run / "stages" / f"{name}.json"
    console.rule(f"[bold]{name}")
    start = time.perf_counter()
    log = run / "logs" / f"{name}.log"
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            code = invoke([*args, "--json"]) or 0
    except UserError as err:
        raise UserError(f"stage '{name}' failed: {err}; command: llamakit {' '.join(args)}") from None
    finally:
        log.write_text(stdout.getvalue())
        gc.collect()  # the stage's models, before the next stage loads its own
    seconds = time.perf_counter() - start
    if code == EXIT_ROWS_FAILED:  # a data stage with a few failed rows: the rest is usable
        console.print(f"[yellow]{name}: some rows failed (see {log}); the demo goes on with the rows that are done[/]")
    elif code != 0:
        raise UserError(f"stage '{name}' failed (exit {code}); command: llamakit {' '.join(args)}")
    lines = [line for line in stdout.getvalue().splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    done = {"stage": name, "command": ["llamakit", *args], "seconds": round(seconds, 1), "result": result}
    write_json(marker, done)
    console.print(f"[green]✓ {name:<13}[/] {seconds:6.1f} s  {_headline(name, result)}")
    return done


HEADLINES = {  # stage -> (label, path into the stage's --json result)
    "instructions": (("rows", ("rows_done",)), ("failed", ("rows_failed",))),
    "conversations": (("rows", ("rows_done",)), ("failed", ("rows_failed",))),
    "preferences": (("pairs", ("rows_done",)), ("failed", ("rows_failed",)), ("dropped", ("rows_dropped",))),
    "sft": (("steps", ("steps",)), ("loss", ("loss",))),
    "train-reward": (("held-out accuracy", ("heldout", "calibrated", "accuracy")),
                     ("ECE", ("heldout", "calibrated", "ece"))),
    "rlhf": (("steps", ("steps",)), ("score", ("final", "objective/scores")), ("KL", ("final", "objective/kl"))),
    "constraints": (("prompts", ("rows",)), ("constraints", ("constraints",))),
    "rlhf-constraints": (("steps", ("steps",)), ("score", ("final", "objective/scores")),
                         ("KL", ("final", "objective/kl"))),
    "eval-policy": (("constraints met before", ("baseline", "scorer")), ("after", ("policy", "scorer")),
                    ("KL", ("kl",))),
}


def _headline(name: str, result: dict) -> str:
    parts = []
    for label, path in HEADLINES.get(name, ()):
        value: Any = result
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            parts.append(f"{label} {value:.3g}" if isinstance(value, float) else f"{label} {value}")
    return ", ".join(parts)


def _generate_compare(run: Path, sizes: Sizes, model: str) -> dict:
    """Greedy answers of the base model and the PPO policy to the same prompts (for the report)."""
    marker = run / "stages" / "compare.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    from toolkit.chat_format import encode_chat
    from toolkit.generation import SamplingParams, generate
    from toolkit.models import load_causal_lm

    start = time.perf_counter()
    rows = [{"prompt": p} for p in COMPARE_PROMPTS]
    for label, path in (("base", model), ("policy", str(run / "ppo" / "policy"))):
        lm, tokenizer = load_causal_lm(path)
        prompts = [encode_chat(tokenizer, [{"role": "user", "content": p}]) for p in COMPARE_PROMPTS]
        outs = generate(lm, tokenizer, prompts, [SamplingParams(max_new_tokens=sizes.answer_tokens, temperature=0)]
                        * len(prompts))
        for row, out in zip(rows, outs, strict=True):
            row[label] = out.text
    write_json(run / "compare.json", rows)
    done = {"stage": "compare", "command": ["(in-process) greedy answers, base vs policy"],
            "seconds": round(time.perf_counter() - start, 1), "result": {"prompts": len(rows)}}
    write_json(marker, done)
    console.print(f"[green]✓ {'compare':<13}[/] {done['seconds']:6.1f} s  base vs policy on {len(rows)} prompts")
    return done


def run_demo(invoke: Invoke, out: str | Path = "runs/demo", fast: bool = False, model: str = "smollm2-135m",
             reward_model: str = "minilm-l6") -> Path:
    """Run (or resume) every stage through `invoke`; return the report path."""
    import os

    from toolkit.report import write_report
    from toolkit.server_process import running_server

    run = Path(out)
    sizes = FAST if fast else FULL
    for sub in ("data", "stages", "logs"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    write_json(run / "demo.json", {"fast": fast, "model": model, "reward_model": reward_model,
                                    "sizes": sizes.__dict__})
    total = time.perf_counter()
    data_stages = ("instructions", "conversations", "preferences")
    if not all((run / "stages" / f"{s}.json").is_file() for s in data_stages):
        console.rule("[bold]serve")
        key = os.urandom(12).hex()
        os.environ["LLAMAKIT_DEMO_KEY"] = key  # the stages' openai clients read it; never written to disk
        with running_server(model, args=("--api-key-env", "LLAMAKIT_DEMO_KEY", "--max-batch", "16"),
                            env={"LLAMAKIT_DEMO_KEY": key}, log_file=run / "logs" / "serve.log") as server:
            console.print(f"[green]✓ serve[/]         {server.model} at {server.url} (the teacher, via openai)")
            commands = _stage_commands(run, sizes, server.url, model, reward_model)
            _run_stage("instructions", commands["instructions"], run, invoke)
            console.print(f"[dim]prompt pool: {_prompt_pool(run, sizes)} prompts (new instructions + seed tasks)[/]")
            for name in data_stages[1:]:
                _run_stage(name, commands[name], run, invoke)
    else:  # no teacher needed: say so per stage rather than skip silently
        for name in data_stages:
            _cached(name, run)
    commands = _stage_commands(run, sizes, None, model, reward_model)
    pairs = _reward_pairs(run, sizes)
    console.print(f"[dim]reward data: {pairs} pairs (synthetic + {sizes.hh_pairs} HH)[/]")
    for name in ("sft", "train-reward", "rlhf"):
        _run_stage(name, commands[name], run, invoke)
    _generate_compare(run, sizes, model)
    _constraint_instructions(run, sizes)
    _run_stage("constraints", commands["constraints"], run, invoke)
    n_train, n_heldout = _split_constraint_prompts(run)
    console.print(f"[dim]constraints slice: {n_train} train and {n_heldout} held-out instructions[/]")
    for name in ("rlhf-constraints", "eval-policy"):
        _run_stage(name, commands[name], run, invoke)
    report = write_report(run)
    console.print(f"[bold green]demo finished[/] in {time.perf_counter() - total:.0f} s — report: {report}")
    return report
