"""`llamakit serve` on 127.0.0.1, driven by the real `openai` and `langchain-openai` clients."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from support.cli import API_KEY


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url, api_key=API_KEY, max_retries=0, timeout=120)


def ask(client, content="Hello there", **params):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **params)


def base(server) -> str:
    return f"http://127.0.0.1:{server.port}"


def test_plain_completion_reports_usage_truthfully(client):
    reply = ask(client, max_tokens=5, temperature=0.8, seed=1)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= reply.usage.completion_tokens <= 5
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 5
    assert reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_seed_reproduces_and_temperature_zero_is_greedy(client):
    a = ask(client, max_tokens=12, temperature=1.0, seed=7).choices[0].message.content
    b = ask(client, max_tokens=12, temperature=1.0, seed=7).choices[0].message.content
    assert a == b
    g1 = ask(client, max_tokens=12, temperature=0).choices[0].message.content
    g2 = ask(client, max_tokens=12, temperature=0, seed=3).choices[0].message.content
    assert g1 == g2


def test_n_choices(client):
    reply = ask(client, max_tokens=6, n=3, seed=11)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert 3 <= reply.usage.completion_tokens <= 18
    texts = {c.message.content for c in reply.choices}
    assert len(texts) > 1  # different seeds per choice


def test_stop_sequence_cuts_text(client):
    full = ask(client, max_tokens=30, temperature=1.0, seed=2).choices[0].message.content
    assert len(full) > 10, full
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = ask(client, max_tokens=30, temperature=1.0, seed=2, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert stop not in cut.choices[0].message.content


def test_streaming_equals_plain_and_reports_usage(client):
    plain = ask(client, max_tokens=16, temperature=0).choices[0].message.content
    chunks = list(ask(client, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_streaming_with_n_choices(client):
    chunks = list(ask(client, max_tokens=8, temperature=0.9, seed=5, n=2, stream=True))
    texts = {0: "", 1: ""}
    finished = set()
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1}
    plain = ask(client, max_tokens=8, temperature=0.9, seed=5, n=2)
    assert [texts[0], texts[1]] == [c.message.content for c in plain.choices]


def test_logprobs_are_the_models_own_distribution(client, tiny_llama):
    import torch

    from toolkit.chat_format import encode_chat

    reply = ask(client, max_tokens=3, temperature=0, logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    first = content[0]
    assert len(first.top_logprobs) == 5
    assert first.token == first.top_logprobs[0].token  # greedy picks the likeliest token
    assert [t.logprob for t in first.top_logprobs] == sorted((t.logprob for t in first.top_logprobs), reverse=True)
    model, tokenizer = tiny_llama
    ids = encode_chat(tokenizer, [{"role": "user", "content": "Hello there"}])
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    top = torch.topk(expected, 5)
    assert [t.token for t in first.top_logprobs] == [tokenizer.decode([i]) for i in top.indices.tolist()]
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    # Sampling at a temperature does not change the reported distribution.
    hot = ask(client, max_tokens=1, temperature=1.5, seed=4, logprobs=True, top_logprobs=5).choices[0].logprobs
    assert [t.logprob for t in hot.content[0].top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert ask(client, max_tokens=2).choices[0].logprobs is None


@pytest.mark.parametrize("extra, param", [({"top_logprobs": 3}, "top_logprobs"),
                                          ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                                          ({"logprobs": "yes"}, "logprobs"),
                                          ({"logprobs": True, "stream": True}, "logprobs")])
def test_bad_logprobs_requests_are_400(tiny_server, extra, param):
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, **extra}
    response = httpx.post(f"{base(tiny_server)}/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_models_and_health(client, tiny_server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(f"{base(tiny_server)}/health").json()  # no key needed
    assert health["status"] == "ok"


def test_auth_required(tiny_server):
    bad = openai.OpenAI(base_url=tiny_server.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        ask(bad, max_tokens=2)
    response = httpx.get(f"{base(tiny_server)}/v1/models")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (json.dumps({"messages": []}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "messages[0].role"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "messages[0].content"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 99}).encode(), 400, "n"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": [1]}).encode(), 400, "stop"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 2_000_000}]}).encode(), 413, None),
])
def test_bad_requests_get_openai_style_errors(tiny_server, body, status, param):
    response = httpx.post(f"{base(tiny_server)}/v1/chat/completions", content=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param:
        assert error["param"] == param
    assert httpx.get(f"{base(tiny_server)}/health").json()["status"] == "ok"


def test_context_overflow_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="context"):
        ask(client, content="word " * 600, max_tokens=64)  # the tiny model has 512 positions


def test_special_tokens_in_user_text_stay_text(client):
    plain = ask(client, content="", max_tokens=1).usage.prompt_tokens
    injected = ask(client, content="<|im_start|>", max_tokens=1).usage.prompt_tokens
    assert injected - plain > 1  # spelled out as ordinary tokens, not the one control token


def test_concurrent_requests_are_batched(tiny_server):
    before = httpx.get(f"{base(tiny_server)}/health").json()

    async def burst():
        async with openai.AsyncOpenAI(base_url=tiny_server.url, api_key=API_KEY, max_retries=0) as aclient:
            return await asyncio.gather(*(aclient.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=8, seed=i)
                for i in range(12)))

    replies = asyncio.run(burst())
    assert len(replies) == 12 and all(r.choices[0].message.content is not None for r in replies)
    after = httpx.get(f"{base(tiny_server)}/health").json()
    sequences = after["sequences"] - before["sequences"]
    batches = after["batches"] - before["batches"]
    assert sequences == 12
    assert batches < sequences  # several requests shared one generate call


def test_langchain_chat_openai(tiny_server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=tiny_server.url, api_key=API_KEY, model="tiny", max_tokens=6, temperature=0,
                     max_retries=0)
    message = llm.invoke("Hello")
    assert isinstance(message.content, str)
    assert message.usage_metadata["output_tokens"] >= 1
    streamed = "".join(chunk.content for chunk in llm.stream("Hello"))
    assert streamed == message.content
    batch = asyncio.run(llm.abatch(["a", "b", "c"], config={"max_concurrency": 3}))
    assert len(batch) == 3
    scored = llm.bind(logprobs=True, top_logprobs=3).invoke("Hello")
    assert len(scored.response_metadata["logprobs"]["content"][0]["top_logprobs"]) == 3


@pytest.mark.slow
def test_embedded_smollm2_answers_sensibly():
    from toolkit.server_process import running_server

    with running_server("smollm2-135m") as server:
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=20, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
