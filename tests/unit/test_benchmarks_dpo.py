"""benchmarks/dpo_vs_trl.py's pure helpers: the step timing it reports and the pair file both trainers read."""

from __future__ import annotations

import json
import sys

from support.cli import ROOT

from toolkit.reward.data import load_preferences

sys.path.insert(0, str(ROOT / "benchmarks"))
from dpo_vs_trl import conversational_row, seconds_per_step  # noqa: E402


def test_seconds_per_step_leaves_out_the_warm_up_step():
    assert seconds_per_step([9.0, 1.0, 2.0, 3.0]) == 2.0
    assert seconds_per_step([4.0]) == 4.0


def test_llamakit_reads_the_conversational_row_as_the_pair_it_came_from(tmp_path):
    prompt = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "A joke?"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(conversational_row(prompt, "Sure: ...", "No.")) + "\n", encoding="utf-8")
    [pair] = load_preferences(path).pairs
    assert (pair.chosen, pair.rejected, pair.rejected_prompt) == ("Sure: ...", "No.", None)
    assert pair.prompt == "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: A joke?"
