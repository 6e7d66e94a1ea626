"""SFT: the assistant-only loss mask, the input formats, packing, and `llamakit sft` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.cli import FIXTURES, cli, run_cli

from toolkit.errors import UserError
from toolkit.rows import row_to_messages
from toolkit.sft import IGNORE, Example, collate, load_examples, pack, tokenize_conversation

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
]


def spans(ids: list[int], labels: list[int]) -> tuple[list[list[int]], list[list[int]]]:
    """Runs of labelled and unlabelled token ids."""
    learned, ignored, current, kind = [], [], [], None
    for token, label in zip(ids, labels, strict=True):
        k = label != IGNORE
        if k != kind and current:
            (learned if kind else ignored).append(current)
            current = []
        kind = k
        current.append(token)
    (learned if kind else ignored).append(current)
    return learned, ignored


def test_loss_mask_covers_assistant_tokens_only(tiny_llama):
    _, tok = tiny_llama
    ids, labels = tokenize_conversation(tok, CONVERSATION)
    assert len(ids) == len(labels)
    assert all(label in (IGNORE, token) for token, label in zip(ids, labels, strict=True))
    learned, ignored = spans(ids, labels)
    assert [tok.decode(s) for s in learned] == ["Hello! How can I help?<|im_end|>", "4.<|im_end|>"]
    unlearned = tok.decode([t for s in ignored for t in s])
    for text in ("Be brief.", "Hi there", "What is 2+2?", "<|im_start|>assistant\n", "<|im_start|>user\n"):
        assert text in unlearned
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_injected_control_tokens_in_text_stay_text(tiny_llama):
    _, tok = tiny_llama
    ids, labels = tokenize_conversation(tok, [{"role": "user", "content": "x<|im_end|>y"},
                                              {"role": "assistant", "content": "ok"}])
    learned, _ = spans(ids, labels)
    assert [tok.decode(s) for s in learned] == ["ok<|im_end|>"]
    assert ids.count(tok.eos_token_id) == 3  # system, user, assistant turns: not the typed one


def test_formats_become_the_same_messages():
    user, answer = "Name a colour.", "Blue."
    expected = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    rows = [
        {"messages": expected},
        {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]},
        {"instruction": user, "input": "", "output": answer},
        {"user_input": user, "completion": answer},
        {"prompt": user, "response": answer},
    ]
    for n, row in enumerate(rows, 1):
        assert row_to_messages(row, "f.jsonl", n) == expected, row
    alpaca = row_to_messages({"instruction": "Sum", "input": "2, 3", "output": "5"}, "f.json", 1)
    assert alpaca[0]["content"] == "Sum\n\n2, 3"
    with pytest.raises(UserError, match=r"f\.jsonl:7: field 'conversations\[1\]\.from': unknown speaker"):
        row_to_messages({"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]},
                        "f.jsonl", 7)
    with pytest.raises(UserError, match=r"f\.jsonl:3: no assistant turn"):
        row_to_messages({"messages": [{"role": "user", "content": "hi"}]}, "f.jsonl", 3)
    with pytest.raises(UserError, match=r"f\.jsonl:2: missing the answer"):
        row_to_messages({"instruction": "x"}, "f.jsonl", 2)


def test_alpaca_fixture_loads_and_long_rows_are_cut(tiny_llama):
    _, tok = tiny_llama
    examples, stats = load_examples(str(FIXTURES / "alpaca-24.json"), tok, max_length=48)
    assert stats["rows"] == 24 and stats["truncated"] > 0
    assert all(len(e.input_ids) <= 48 for e in examples)
    assert stats["examples"] + stats["dropped"] == 24


def test_packing_keeps_conversations_apart(tiny_llama):
    lm, tok = tiny_llama
    a = Example(*tokenize_conversation(tok, CONVERSATION))
    b = Example(*tokenize_conversation(tok, [{"role": "user", "content": "Why is the sky blue?"},
                                             {"role": "assistant", "content": "Rayleigh scattering."}]))
    blocks = pack([b, a], max_length=len(a.input_ids) + len(b.input_ids))
    assert len(blocks) == 1 and blocks[0].starts == [0, len(b.input_ids)]
    packed = collate(blocks, tok.pad_token_id, packed=True)
    assert "attention_mask" not in packed
    assert packed["position_ids"][0, len(b.input_ids)] == 0  # positions restart at the second conversation
    alone = collate([a], tok.pad_token_id, packed=False)
    with torch.no_grad():
        logits_packed = lm(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        logits_alone = lm(**{k: v for k, v in alone.items() if k != "labels"}).logits
    # a's logits do not depend on b sitting before it in the same row
    torch.testing.assert_close(logits_packed[0, len(b.input_ids):], logits_alone[0], atol=1e-4, rtol=1e-4)
    assert len(pack([a, b, a], max_length=len(a.input_ids) + 1)) == 3


def test_sft_cli_end_to_end(tiny_llama_dir, tmp_path):
    out = tmp_path / "sft"
    proc = run_cli("sft", "--data", FIXTURES / "alpaca-24.json", "--model", tiny_llama_dir, "--out", out,
                   "--max-steps", "6", "--batch-size", "4", "--gradient-accumulation-steps", "2",
                   "--learning-rate", "3e-3", "--warmup-ratio", "0", "--max-length", "128", "--save-every", "3",
                   "--packing", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 6 and summary["examples"] == 24
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5  # it learns
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoints" / "step-000006" / "manifest.json").is_file()
    assert (out / "model" / "llamakit-manifest.json").is_file()
    from toolkit.models import load_causal_lm

    model, tok = load_causal_lm(out / "model")
    assert model.config.hidden_size == 64 and tok.eos_token == "<|im_end|>"


def test_sft_cli_bad_row_names_file_and_row(tiny_llama_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant",
                                                                                "content": "b"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "robot", "content": "a"}]}) + "\n")
    proc = run_cli("sft", "--data", data, "--model", tiny_llama_dir, "--out", tmp_path / "out")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {data}:2: ") and last.endswith("(--skip-bad-rows sets such rows aside and "
                                                                  "trains on the rest)")
    assert "Traceback" not in proc.stderr


def test_skip_bad_rows_trains_on_the_rest_and_names_each_row_set_aside(tiny_llama, tiny_llama_dir, tmp_path):
    """An Alpaca file with an empty answer (../shared/data/alpaca-5000.json has one): --skip-bad-rows trains on
    the good rows, and the warning and run.json name every row it set aside."""
    _, tok = tiny_llama
    rows = json.loads((FIXTURES / "alpaca-24.json").read_text())[:6]
    rows[2]["output"], rows[4]["output"] = "", "   "
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(rows))
    with pytest.raises(UserError, match=r"\(row 3\): field 'output': empty text"):
        load_examples(str(data), tok, max_length=256)
    examples, stats = load_examples(str(data), tok, max_length=256, skip_bad_rows=True)
    assert stats["examples"] == len(examples) == 4
    assert [bad.split(": ")[0] for bad in stats["bad_rows"]] == [f"{data} (row 3)", f"{data} (row 5)"]

    out = tmp_path / "out"
    code, _, err = cli("sft", "--data", data, "--model", tiny_llama_dir, "--out", out, "--max-steps", "1",
                       "--batch-size", "2", "--max-length", "64", "--skip-bad-rows")
    assert code == 0, err
    assert f"2 bad row(s) set aside: {data} (row 3): field 'output': empty text; {data} (row 5)" in err
    assert json.loads((out / "run.json").read_text())["data"]["examples"] == 4


def test_resume_gives_the_same_next_losses_as_an_uninterrupted_run(tiny_llama_dir, tmp_path, monkeypatch):
    import toolkit.sft as sft

    def cfg(out: Path, **kw) -> sft.SFTConfig:
        return sft.SFTConfig(data=str(FIXTURES / "alpaca-24.json"), model=str(tiny_llama_dir), out=str(out),
                             max_steps=4, batch_size=4, learning_rate=3e-3, warmup_ratio=0.5, max_length=64,
                             save_every=2, **kw)

    full = sft.train_sft(cfg(tmp_path / "full"))
    save = sft._checkpoint

    def save_then_die(accelerator, out, step, *args):  # a kill right after the step-2 checkpoint
        save(accelerator, out, step, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        sft.train_sft(cfg(tmp_path / "cut"))
    monkeypatch.setattr(sft, "_checkpoint", save)
    resumed = sft.train_sft(cfg(tmp_path / "cut", resume=True))
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4]
    # same weights, Adam moments, warm-up/decay position and batch order -> same next losses
    for a, b in zip(full.history, resumed.history, strict=True):
        for key in ("loss", "lr", "tokens", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


def test_weight_zero_turns_get_no_loss(tiny_llama):
    _, tok = tiny_llama
    messages = [{"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Bad answer.", "weight": 0},
                {"role": "user", "content": "Again?"},
                {"role": "assistant", "content": "Good answer.", "weight": 1}]
    ids, labels = tokenize_conversation(tok, messages)
    learned, _ = spans(ids, labels)
    assert [tok.decode(s) for s in learned] == ["Good answer.<|im_end|>"]
    bad = tok("Bad answer.", add_special_tokens=False).input_ids
    start = next(i for i in range(len(ids)) if ids[i:i + len(bad)] == bad)
    assert labels[start:start + len(bad)] == [IGNORE] * len(bad)


def test_prompt_completion_rows_and_parquet_data(tiny_llama, tmp_path):
    """TRL prompt-completion rows: loss on the completion only; Parquet and datasets dirs read like JSONL."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, tok = tiny_llama
    rows = [{"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Earlier."},
                        {"role": "user", "content": "Now?"}],
             "completion": [{"role": "assistant", "content": "Learned."}]},
            {"prompt": "\n\nHuman: Plain?\n\nAssistant:", "completion": " Yes."}]
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows[:1]).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, stats = load_examples(str(tmp_path / "d.jsonl"), tok, max_length=256)
    assert stats["examples"] == 2
    assert [tok.decode(s) for s in spans(examples[0].input_ids, examples[0].labels)[0]] == ["Learned.<|im_end|>"]
    assert [tok.decode(s) for s in spans(examples[1].input_ids, examples[1].labels)[0]] == ["Yes.<|im_end|>"]
    for path in (tmp_path / "d.parquet", tmp_path / "ds"):
        assert load_examples(str(path), tok, max_length=256)[0] == examples[:1]


def test_bf16_lora_trains_on_a_bfloat16_base(tiny_llama_dir, tmp_path):
    """--bf16 with --lora: the frozen base in bfloat16 (half the memory, as TRL/peft load it), adapters in fp32;
    the merged model is saved in bfloat16. Without --lora the weights stay fp32 (master weights under autocast)."""
    from safetensors.torch import load_file

    for lora, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        out = tmp_path / f"run-{lora}"
        code, _, err = cli("sft", "--data", FIXTURES / "alpaca-24.json", "--model", tiny_llama_dir, "--out", out,
                           "--max-steps", "1", "--batch-size", "2", "--max-length", "64", "--bf16",
                           *(["--lora", "--save-adapter"] if lora else []))
        assert code == 0, err[-3000:]
        weights = load_file(str(out / "model" / "model.safetensors"))
        assert {t.dtype for t in weights.values()} == {dtype}, lora
        if lora:
            adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
            assert {t.dtype for t in adapter.values()} == {torch.float32}


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "all-weights"])
def test_first_step_loss_is_the_mean_nll_of_the_assistant_tokens(tiny_llama, tiny_llama_dir, tmp_path, monkeypatch,
                                                                 lora):
    """The head meets the assistant tokens' hidden states apart from the model's call (a frozen head through
    FrozenHeadLogprobs); the loss stays the plain cross-entropy of the logits over those tokens."""
    from toolkit.head_logprobs import FrozenHeadLogprobs
    from toolkit.sft import SFTConfig, train_sft

    model, tokenizer = tiny_llama
    examples, _ = load_examples(str(FIXTURES / "alpaca-24.json"), tokenizer, 64, limit=4)
    batch = collate(examples, tokenizer.pad_token_id, False)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=IGNORE)
    frozen_calls = []
    original = FrozenHeadLogprobs.forward
    monkeypatch.setattr(FrozenHeadLogprobs, "forward", staticmethod(lambda *a: frozen_calls.append(1) or original(*a)))
    result = train_sft(SFTConfig(data=str(FIXTURES / "alpaca-24.json"), model=str(tiny_llama_dir),
                                 out=str(tmp_path / "sft"), limit=4, batch_size=4, max_steps=1, max_length=64,
                                 lora=lora, learning_rate=1e-3))
    assert result.history[0]["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert bool(frozen_calls) == lora  # a head that trains keeps its chunks' logits instead
