"""`llamakit eval-policy`: POLICY (and BASE) answer held-out prompts; scores, KL and win rate."""

from __future__ import annotations

import click

from toolkit.commands.params import NON_EMPTY, SEED, FiniteFloat, NonEmptyPath
from toolkit.config import config_option
from toolkit.models import allow_pickle_option

MODEL_HELP = ("an embedded alias (smollm2-135m), a Hugging Face directory, an sft/rlhf run directory (its model/ "
              "or policy/), or a server: openai:MODEL with --base-url")


@click.command("eval-policy")
@click.argument("policy", type=NON_EMPTY)
@click.option("--prompts", required=True, type=NonEmptyPath(),
              help="Held-out prompts: JSONL/JSON rows (prompt | messages | instruction | conversations) or .txt.")
@click.option("--baseline", type=NON_EMPTY, default=None, help=f"BASE to compare with: {MODEL_HELP}.")
@click.option("--baseline-answers", type=NonEmptyPath(file_okay=False), default=None,
              help="An earlier eval-policy --out with the same BASE, prompts and sampling settings: BASE's answers "
                   "are read from it, not generated again (BASE still loads for the KL).")
@click.option("--scorer", type=NON_EMPTY, default=None,
              help="Rule scorers, e.g. rules:constraints (per constraint family too) or rules:length,refusal.")
@click.option("--reward", type=NonEmptyPath(file_okay=False), default=None,
              help="A reward-model directory from train-reward (calibrated): mean score and win rate by it.")
@click.option("--judge", type=NON_EMPTY, default=None,
              help="A teacher LLM comparing POLICY's and BASE's answers pairwise, asked twice with positions "
                   "swapped (openai:MODEL, hf:MODEL, langchain:module:Class).")
@click.option("--samples", type=click.IntRange(1), default=1, show_default=True,
              help="Answers per prompt and side (seeds shared by both sides).")
@click.option("--best-of", type=click.IntRange(1), default=1, show_default=True,
              help="Answer with the best of N samples under --reward (1 = off), on both sides alike (same "
                   "candidate seeds); every metric sees the kept answer. Needs --temperature > 0.")
@click.option("--temperature", type=FiniteFloat(0), default=1.0, show_default=True,
              help="Sampling temperature (0 = greedy); the KL uses the same temperature-scaled logits. "
                   "rlhf samples at 1.0 by default.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True,
              help="Answer budget in tokens; generation stops at EOS.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
              help="Answers generated together by a local model.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seeds every answer (prompt, sample).")
@click.option("--limit", type=click.IntRange(0), default=0, show_default=True,
              help="Use only the first N prompts (0 = all).")
@click.option("--system-prompt", default="", show_default=True,
              help="Optional system message before every prompt (as rlhf --system-prompt).")
@click.option("--chat-template/--no-chat-template", default=True, show_default=True,
              help="Wrap prompts in a local model's chat template (a server applies its own).")
@click.option("--bf16", is_flag=True, help="Load local models in bfloat16 (faster on CPUs with avx512_bf16).")
@click.option("--recompute-logprobs/--sampler-logprobs", default=None,
              help="POLICY's log-probs of its answers for the KL from a teacher-forced pass (and the sampler's gap "
                   "from it reported) or the sampler's own, one pass fewer. Default: the sampler's in float32, "
                   "recomputed with --bf16.")
@click.option("--base-url", type=NON_EMPTY, default=None,
              help="OpenAI-compatible server for openai: specs (POLICY, --baseline, --judge).")
@click.option("--api-key-env", type=NON_EMPTY, default="OPENAI_API_KEY", show_default=True,
              help="Environment variable holding the server's API key.")
@click.option("--timeout", type=FiniteFloat(0.001), default=60.0, show_default=True,
              help="Seconds per server request.")
@click.option("--concurrency", type=click.IntRange(1), default=8, show_default=True,
              help="Server requests in flight at once.")
@click.option("--judge-temperature", type=FiniteFloat(0), default=0.0, show_default=True)
@click.option("--judge-max-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--out", type=NonEmptyPath(file_okay=False), default=None,
              help="Directory for answers.jsonl, summary.json, report.md and report.html (written when done).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier eval-policy output in --out (nothing else).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout.")
@allow_pickle_option
@config_option
def eval_policy_cmd(as_json: bool, **settings) -> None:
    """Is POLICY better than BASE? Both answer the held-out prompts; per side: mean scorer value (and per
    constraint family with rules:constraints), reward-model score, answer length, EOS rate; then the
    sampled KL(POLICY ‖ BASE) on POLICY's answers and the win rate of POLICY (ties ½) with a 95% interval.
    With --best-of N each side answers with the best of N samples under --reward (a baseline every RLHF paper
    reports)."""
    from toolkit.console import emit_json, note_output, summary_table
    from toolkit.eval_policy import EvalConfig, evaluate, terminal_rows

    if settings["out"]:
        note_output(f"nothing was written to {settings['out']} (eval-policy writes it when done)",
                    "run the same command again")
    result = evaluate(EvalConfig(**settings))
    if as_json:
        emit_json(result.summary)
    else:
        summary_table("eval-policy: POLICY | BASE", terminal_rows(result.summary))


COMMANDS = [eval_policy_cmd]
