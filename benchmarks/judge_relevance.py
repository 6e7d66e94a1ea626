"""Can a judge tell an answer to the question from an answer to another question? Alpaca, offline.

Each pair: an Alpaca instruction with its own reference answer and with the reference answer of another
instruction (fluent, well formed, just off topic, so length and format rules cannot tell them apart). The real
`llamakit generate-data preferences` ranks the two through a real `llamakit serve` with the embedded teacher as
the judge: `--judge-logprobs` (the expected digit under the first-token distribution), and the pointwise text
judge ("Rating: [[N]]"), which the 135M model mostly cannot follow. Ties count half; rows the judge could
not score count half too (they are in OUT.failed.jsonl).

Prints ONE JSON line: pairs, each judge's accuracy (chance 0.5) and its failed / tied rows, the "longer answer
wins" rule on the same pairs, the mean digit mass of the logprob judge, and the seconds of each run.

    .venv/bin/python benchmarks/judge_relevance.py    # 40 pairs: ~3 min for the logprob judge, ~15 for the
                                                      # text judge (48 tokens per rating, retried once)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from toolkit.server_process import running_server  # noqa: E402

ALPACA = ROOT.parent / "shared" / "data" / "alpaca-5000.json"


def pairs(n: int, seed: int) -> list[dict]:
    rows = [r for r in json.loads(ALPACA.read_text(encoding="utf-8"))
            if not r["input"] and 5 <= len(r["output"].split()) <= 60]
    random.Random(seed).shuffle(rows)
    rows = rows[:n]
    return [{"prompt": r["instruction"], "own": r["output"], "other": rows[(i + 1) % n]["output"]}
            for i, r in enumerate(rows)]


def rank(items: list[dict], url: str, where: Path, *flags: str) -> dict:
    prompts = where / "pairs.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p["prompt"], "responses": [p["own"], p["other"]]}) + "\n"
                               for p in items), encoding="utf-8")
    out = where / "ranked.jsonl"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "toolkit", "generate-data", "preferences", "--prompts", prompts,
                           "--out", out, "--judge", "openai:smollm2-135m", "--base-url", url,
                           "--api-key-env", "BENCH_KEY", "--concurrency", "16", "--max-retries", "1",
                           "--timeout", "600", "--json", *flags], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if proc.returncode not in (0, 3):  # 3: finished, some rows failed (counted below)
        raise SystemExit(f"generate-data failed ({proc.returncode}): {proc.stderr[-500:]}")
    ranked = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] if out.exists() else []
    own = {p["prompt"]: p["own"] for p in items}
    right = sum(r["chosen"] == own[r["prompt"]] for r in ranked)
    unsure = len(items) - len(ranked)  # ties (dropped) and rows the judge could not score (failed)
    masses = [c["judge"]["rating_mass"] for r in ranked for c in r["meta"]["candidates"]
              if "rating_mass" in c.get("judge", {})]
    return {"accuracy": round((right + unsure / 2) / len(items), 4), "ranked": len(ranked), "tied_or_failed": unsure,
            "digit_mass": round(sum(masses) / len(masses), 4) if masses else None, "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    items = pairs(args.pairs, args.seed)
    longer = sum((len(p["own"]) > len(p["other"])) + 0.5 * (len(p["own"]) == len(p["other"])) for p in items)
    key = os.urandom(8).hex()
    os.environ["BENCH_KEY"] = key
    with running_server("smollm2-135m", args=("--api-key-env", "BENCH_KEY", "--max-batch", "16"),
                        env={"BENCH_KEY": key}) as server, tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "lp").mkdir()
        (Path(tmp) / "text").mkdir()
        logprob = rank(items, server.url, Path(tmp) / "lp", "--judge-logprobs")
        text = rank(items, server.url, Path(tmp) / "text", "--judge-max-tokens", "48")
    print(json.dumps({"pairs": len(items), "logprob_judge": logprob, "text_judge": text,
                      "longer_wins": round(longer / len(items), 4)}))


if __name__ == "__main__":
    main()
