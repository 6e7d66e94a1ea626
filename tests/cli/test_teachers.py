"""The four teacher kinds behind one `chat(messages, **params)`; openai/langchain against a real server."""

from __future__ import annotations

import asyncio

import pytest
from support.cli import API_KEY

from toolkit.errors import UserError
from toolkit.teachers import HFTeacher, close_teacher, make_teacher

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def chat(teacher, **params):
    async def run():
        try:
            return await teacher.chat(MESSAGES, **params)
        finally:
            await close_teacher(teacher)
    return asyncio.run(run())


def test_openai_teacher_against_llamakit_serve(tiny_server, monkeypatch):
    monkeypatch.setenv("MY_KEY", API_KEY)
    teacher = make_teacher("openai:tiny", base_url=tiny_server.url, api_key_env="MY_KEY", max_retries=0)
    reply = chat(teacher, max_tokens=5, temperature=0.5, seed=1, stop=["\n\n\n"])
    assert reply.model == "tiny"
    assert 1 <= reply.completion_tokens <= 5 and reply.prompt_tokens > 0
    assert reply.finish_reason in ("stop", "length")
    assert API_KEY not in repr(reply.meta)


def test_openai_teacher_wrong_key_fails_loudly(tiny_server, monkeypatch):
    import openai

    monkeypatch.setenv("MY_KEY", "wrong")
    teacher = make_teacher("openai:tiny", base_url=tiny_server.url, api_key_env="MY_KEY", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        chat(teacher, max_tokens=2)


def test_langchain_teacher_against_llamakit_serve(tiny_server):
    # langchain-openai caches one async HTTP client per (base_url, timeout) for the whole process; a client
    # made under an earlier test's event loop cannot be reused, so this test asks for its own timeout.
    teacher = make_teacher("langchain:langchain_openai:ChatOpenAI",
                           kwargs={"base_url": tiny_server.url, "api_key": API_KEY, "model": "tiny", "max_retries": 0,
                                   "timeout": 61})
    reply = chat(teacher, max_tokens=4, temperature=0)
    assert isinstance(reply.text, str)
    assert 1 <= reply.completion_tokens <= 4
    assert reply.finish_reason in ("stop", "length")


def test_hf_teacher_batches_concurrent_chats(tiny_llama_dir):
    teacher = HFTeacher(str(tiny_llama_dir))

    async def run():
        try:
            return await asyncio.gather(*(teacher.chat([{"role": "user", "content": f"q{i}"}], max_tokens=6, seed=i)
                                          for i in range(6)))
        finally:
            await close_teacher(teacher)

    replies = asyncio.run(run())
    assert len(replies) == 6 and all(1 <= r.completion_tokens <= 6 for r in replies)
    assert teacher.engine.stats.sequences == 6
    assert teacher.engine.stats.batches < 6


def test_every_teacher_reports_the_same_logprobs(tiny_server, tiny_llama_dir, monkeypatch):
    """openai:, langchain: (through llamakit serve) and hf: (in process) read the same tiny model: asked for
    the first token's 5 likeliest alternatives, all three give the same tokens and log-probs."""
    monkeypatch.setenv("MY_KEY", API_KEY)
    params = {"max_tokens": 2, "temperature": 0, "logprobs": True, "top_logprobs": 5}
    teachers = [make_teacher("openai:tiny", base_url=tiny_server.url, api_key_env="MY_KEY", max_retries=0),
                make_teacher("langchain:langchain_openai:ChatOpenAI",
                             kwargs={"base_url": tiny_server.url, "api_key": API_KEY, "model": "tiny",
                                     "max_retries": 0, "timeout": 63}),
                HFTeacher(str(tiny_llama_dir))]
    firsts = []
    for teacher in teachers:
        reply = chat(teacher, **params)
        assert reply.logprobs is not None and len(reply.logprobs) == reply.completion_tokens
        firsts.append(reply.logprobs[0])
        assert len(reply.logprobs[0]) == 5
    for other in firsts[1:]:
        assert [t for t, _ in other] == [t for t, _ in firsts[0]]
        assert [lp for _, lp in other] == pytest.approx([lp for _, lp in firsts[0]], abs=1e-4)
    assert chat(HFTeacher(str(tiny_llama_dir)), max_tokens=2).logprobs is None  # only when asked


def test_rules_teacher_scores_but_cannot_write():
    teacher = make_teacher("rules:refusal,truncation")
    assert teacher.score("q", "I'm sorry, I cannot help.", "stop") == pytest.approx(0.5)
    assert teacher.score("q", "Sure: Paris.", "stop") == pytest.approx(1.0)
    with pytest.raises(UserError, match="cannot write"):
        chat(teacher)


@pytest.mark.parametrize("spec, message", [
    ("gpt-4", "unknown teacher kind"),
    ("openai:", "needs a target"),
    ("langchain:nope_module:Chat", "cannot import"),
    ("langchain:langchain_openai", "module.path:ClassName"),
    ("rules:lenght", "unknown rule"),
])
def test_bad_specs_are_user_errors(spec, message):
    with pytest.raises(UserError, match=message):
        make_teacher(spec)


def test_openai_without_key_or_base_url(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(UserError, match="OPENAI_API_KEY"):
        make_teacher("openai:gpt-4o-mini")


def test_hf_teacher_on_a_peft_adapter_dir(tiny_llama_dir, tmp_path):
    """`hf:ADAPTER_DIR` (adapter_config.json + adapter_model.safetensors, as TRL writes): the teacher's first-token
    log-probs are base + adapter's as plain peft computes them."""
    import torch
    from support.adapters import peft_logits, save_tiny_adapter

    from toolkit.chat_format import encode_chat

    adapter = save_tiny_adapter(tiny_llama_dir, tmp_path / "adapter")
    teacher = make_teacher(f"hf:{adapter}")
    assert isinstance(teacher, HFTeacher)
    reply = chat(teacher, max_tokens=1, temperature=0, logprobs=True, top_logprobs=5)
    top = torch.log_softmax(peft_logits(tiny_llama_dir, adapter, encode_chat(teacher.engine.tokenizer, MESSAGES))[-1],
                            -1).topk(5)
    assert [lp for _, lp in reply.logprobs[0]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert [t for t, _ in reply.logprobs[0]] == [teacher.engine.tokenizer.decode([i]) for i in top.indices.tolist()]
