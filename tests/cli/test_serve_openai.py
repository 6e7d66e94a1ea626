"""`llamakit serve` says no (issue 18): every OpenAI parameter is honoured or refused with a 400 naming it,
unknown keys and unknown models are refused as OpenAI refuses them, penalties / logit_bias / min_p /
repetition_penalty really change sampling (each request its own, in a shared batch), and the legacy
/v1/completions works with the real `openai` client and LangChain's `OpenAI` LLM. All against the real server
of conftest.py (`--served-name tiny`, a bearer key, --max-tokens-cap 64, --max-n 4)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch
from support.cli import API_KEY

from toolkit.chat_format import encode_chat
from toolkit.generation import SamplingParams, generate

AUTH = {"Authorization": f"Bearer {API_KEY}"}
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url, api_key=API_KEY, max_retries=0, timeout=120)


def base(server) -> str:
    return f"http://127.0.0.1:{server.port}"


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base(server)}/v1/{route}", json=body, headers=AUTH, timeout=120)


def local_chat(tiny_llama, messages, **params) -> str:
    model, tokenizer = tiny_llama
    return generate(model, tokenizer, [encode_chat(tokenizer, messages)], [SamplingParams(**params)])[0].text


def local_text(tiny_llama, prompt: str, **params):
    model, tokenizer = tiny_llama
    return generate(model, tokenizer, [tokenizer(prompt).input_ids], [SamplingParams(**params)])[0]


# ---------------------------------------------------------------- refused, never ignored

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("extra, param", [
    ({"tools": [TOOL]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"functions": [TOOL["function"]]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"verbosity": "low"}, "verbosity"),
    ({"store": True}, "store"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
])
def test_unsupported_chat_parameters_are_refused_by_name(client, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, **extra)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param, error
    assert error["code"] == "unsupported_parameter" and error["type"] == "invalid_request_error"
    assert param.split(".")[0] in error["message"]


@pytest.mark.parametrize("extra, param", [
    ({"frobnicate": 1}, "frobnicate"),
    ({"guided_json": {}}, "guided_json"),
    ({"stream": True, "stream_options": {"chunk_size": 3}}, "stream_options.chunk_size"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # OpenAI: only with stream
    ({"n": 5}, "n"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"999999999": 1}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"user": 5}, "user"),
])
def test_unknown_keys_and_bad_values_are_400(tiny_server, extra, param):
    response = post(tiny_server, "chat/completions", {"model": "tiny", "messages": HELLO, "max_tokens": 2, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    if param in ("frobnicate", "guided_json"):  # in OpenAI's words
        assert response.json()["error"]["message"] == f"Unrecognized request argument supplied: {param}"


def test_harmless_values_of_refusable_parameters_pass(client):
    reply = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=2, tool_choice="none", modalities=["text"], store=False,
        service_tier="auto", response_format={"type": "text"}, user="u1", metadata={"k": "v"},
        safety_identifier="s", prompt_cache_key="p")
    assert isinstance(reply.choices[0].message.content, str)


# ---------------------------------------------------------------- model names

def test_unknown_model_is_404_and_the_served_one_answers(client, tiny_server):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2)
    assert caught.value.body["code"] == "model_not_found" and "gpt-4o" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", max_tokens=2)
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    # the path it was started from is a name too (the demo asks for `openai:<its --model>`)
    started_as = str(tiny_server.process.args[tiny_server.process.args.index("--model") + 1])
    assert post(tiny_server, "chat/completions", {"model": started_as, "messages": HELLO,
                                                  "max_tokens": 1}).json()["model"] == "tiny"
    assert httpx.get(f"{base(tiny_server)}/v1/models/nope").status_code == 401  # the key first


# ---------------------------------------------------------------- honoured for real

SETTINGS = [  # (openai client keywords, extra_body, the same in SamplingParams)
    ({"frequency_penalty": 1.5, "presence_penalty": 0.5}, {}, {"frequency_penalty": 1.5, "presence_penalty": 0.5}),
    ({}, {"repetition_penalty": 2.0}, {"repetition_penalty": 2.0}),
    ({"logit_bias": {"1000": 100}}, {}, {"logit_bias": ((1000, 100.0),)}),
    ({"temperature": 1.2, "seed": 3}, {"min_p": 0.3}, {"temperature": 1.2, "seed": 3, "min_p": 0.3}),
]


@pytest.mark.parametrize("keywords, extra_body, local", SETTINGS)
def test_penalties_bias_and_min_p_are_applied(client, tiny_llama, keywords, extra_body, local):
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, extra_body=extra_body,
                                           **{"temperature": 0, **keywords})
    expected = local_chat(tiny_llama, HELLO, max_new_tokens=8, **{"temperature": 0, **local})
    assert reply.choices[0].message.content == expected
    if "seed" not in local:  # the setting changed the answer
        assert expected != local_chat(tiny_llama, HELLO, max_new_tokens=8, temperature=0)
    if "logit_bias" in local:
        assert expected == tiny_llama[1].decode([1000] * 8)


def test_settings_of_one_request_never_reach_another_in_the_same_batch(tiny_server, tiny_llama):
    rows = [{}, {"frequency_penalty": 2.0, "presence_penalty": 2.0}, {"logit_bias": {"1000": 100}}, {},
            {"repetition_penalty": 3.0}, {"logit_bias": {"2000": 100}}]
    before = httpx.get(f"{base(tiny_server)}/health").json()

    async def burst():
        async with httpx.AsyncClient(base_url=base(tiny_server), headers=AUTH, timeout=120) as http:
            return await asyncio.gather(*(http.post("/v1/chat/completions", json={
                "model": "tiny", "messages": HELLO, "max_tokens": 6, "temperature": 0, **row}) for row in rows))

    texts = [r.json()["choices"][0]["message"]["content"] for r in asyncio.run(burst())]
    after = httpx.get(f"{base(tiny_server)}/health").json()
    assert after["batches"] - before["batches"] < len(rows)  # some of them shared a batch
    for row, text in zip(rows, texts, strict=True):
        local = {**row, "logit_bias": tuple((int(t), float(b)) for t, b in row.get("logit_bias", {}).items())}
        assert text == local_chat(tiny_llama, HELLO, max_new_tokens=6, temperature=0, **local), row
    assert texts[0] == texts[3] and len(set(texts)) == 5


# ---------------------------------------------------------------- legacy /v1/completions

def test_completions_with_the_openai_client(client, tiny_llama):
    reply = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8, temperature=0)
    expected = local_text(tiny_llama, "The capital of France is", max_new_tokens=8, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "text_completion" and reply.model == "tiny"
    assert choice.text == expected.text and choice.index == 0 and choice.finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(tiny_llama[1]("The capital of France is").input_ids)
    assert reply.usage.completion_tokens == expected.completion_tokens
    # token ids are a prompt too; echo puts the prompt in front; the default max_tokens is OpenAI's 16
    ids = tiny_llama[1]("The capital of France is").input_ids
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == choice.text
    echoed = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == "The capital of France is" + choice.text
    default = client.completions.create(model="tiny", prompt="Hi", temperature=0)
    assert default.usage.completion_tokens <= 16


def test_completions_many_prompts_n_seed_and_stop(client, tiny_llama):
    reply = client.completions.create(model="tiny", prompt=["one", "two"], n=2, max_tokens=6, temperature=1.0,
                                      seed=9)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    again = client.completions.create(model="tiny", prompt=["one", "two"], n=2, max_tokens=6, temperature=1.0,
                                      seed=9)
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]
    assert reply.choices[0].text == local_text(tiny_llama, "one", max_new_tokens=6, temperature=1.0, seed=9).text
    assert reply.choices[3].text == local_text(tiny_llama, "two", max_new_tokens=6, temperature=1.0, seed=10).text
    full = client.completions.create(model="tiny", prompt="go", max_tokens=20, temperature=1.0, seed=2).choices[0]
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    cut = client.completions.create(model="tiny", prompt="go", max_tokens=20, temperature=1.0, seed=2, stop=stop)
    assert cut.choices[0].text == full.text[:full.text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_completions_legacy_logprobs_are_the_models_own(client, tiny_llama):
    model, tokenizer = tiny_llama
    prompt = "Hello there"
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == reply.choices[0].text
    assert lp.text_offset[0] == len(prompt) and lp.text_offset == sorted(lp.text_offset)
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([tokenizer(prompt).input_ids])).logits[0, -1].float(), -1)
    top = torch.topk(first, 3)
    assert list(lp.top_logprobs[0]) == [tokenizer.decode([i]) for i in top.indices.tolist()]
    assert list(lp.top_logprobs[0].values()) == pytest.approx(top.values.tolist(), abs=1e-4)
    assert lp.token_logprobs[0] == pytest.approx(top.values[0].item(), abs=1e-4)  # greedy: the likeliest
    hot = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=1.5, seed=1, logprobs=0)
    for token, alternatives in zip(hot.choices[0].logprobs.tokens, hot.choices[0].logprobs.top_logprobs, strict=True):
        assert list(alternatives) == [token]  # k = 0: the sampled token alone


def test_echo_with_logprobs_scores_the_prompt(client, tiny_llama):
    """What lm-evaluation-harness sends for log-likelihoods: echo, logprobs, max_tokens 0."""
    model, tokenizer = tiny_llama
    prompt = "The capital of France is Paris"
    ids = tokenizer(prompt).input_ids
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = reply.choices[0]
    assert choice.text == prompt and reply.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in ids] and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None and all(len(alt) <= 3 for alt in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] == len(prompt) - len(lp.tokens[-1])
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    own = expected.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert lp.token_logprobs[1:] == pytest.approx(own, abs=1e-4)
    more = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=1, temperature=0)
    generated = more.choices[0].logprobs
    assert len(generated.tokens) == len(ids) + more.usage.completion_tokens
    assert generated.token_logprobs[:len(ids)] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert generated.text_offset[len(ids)] == len(prompt)


def test_completions_stream_like_openai(client):
    plain = client.completions.create(model="tiny", prompt="Once upon", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="Once upon", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    echoed = list(client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=3, temperature=0,
                                            stream=True, echo=True))
    texts = {0: "", 1: ""}
    for c in echoed:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts[0].startswith("a") and texts[1].startswith("b")


@pytest.mark.parametrize("extra, param", [
    ({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of"), ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": 6}, "logprobs"), ({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"), ({"prompt": [10**9]}, "prompt"), ({"messages": HELLO}, "messages"),
    ({"max_tokens": 65}, "max_tokens"), ({"logprobs": 1, "stream": True}, "logprobs"),
    ({"tools": [TOOL]}, "tools"),
])
def test_bad_completions_requests_are_400(tiny_server, extra, param):
    response = post(tiny_server, "completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_langchain_openai_llm(tiny_server, client):
    from langchain_openai import OpenAI

    llm = OpenAI(base_url=tiny_server.url, api_key=API_KEY, model="tiny", max_tokens=8, temperature=0, max_retries=0)
    text = llm.invoke("Tell me a story")
    assert text == client.completions.create(model="tiny", prompt="Tell me a story", max_tokens=8,
                                             temperature=0).choices[0].text
    assert "".join(llm.stream("Tell me a story")) == text
    assert llm.batch(["a", "b"]) == [client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0)
                                     .choices[0].text for p in ("a", "b")]


# ---------------------------------------------------------------- the schema

def test_openapi_schema_is_served_behind_the_same_guards(tiny_server):
    url = f"{base(tiny_server)}/openapi.json"
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(url, headers={**AUTH, "Host": "attacker.example"}, timeout=30).status_code == 421
    schema = httpx.get(url, headers=AUTH, timeout=30).json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model_id}"} <= set(schema["paths"])
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "echo", "logprobs", "logit_bias"} <= set(body["properties"])
    assert "refused" in body["properties"]["suffix"]["description"]
