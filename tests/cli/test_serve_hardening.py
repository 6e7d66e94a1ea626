"""`llamakit serve` hardening (issue 14): one bad request never fails the others of its batch, non-finite
numbers are refused, web pages cannot drive the server (Host allow-list, Origin, exact JSON media type),
the bearer scheme is case-insensitive, and out-of-range flags are one-line errors.

The HTTP tests run against one real `llamakit serve` without a key (the default, and the case a web page
can reach); the engine tests drive the real BatchingEngine on the tiny model in this process.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from support.cli import API_KEY, run_cli

from toolkit.engine import BatchingEngine
from toolkit.generation import SamplingParams, generate

EXTRA_HOSTS = ("--allowed-hosts", "models.internal,other.test", "--allowed-hosts", "third.test")


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    """No key; a 150 ms batch window so a burst of requests shares one batch."""
    from toolkit.server_process import running_server

    with running_server(str(tiny_llama_dir), args=(*EXTRA_HOSTS, "--max-tokens-cap", "32", "--max-n", "4",
                                                   "--batch-wait-ms", "150", "--served-name", "tiny")) as running:
        yield running


def base(server) -> str:
    return f"http://127.0.0.1:{server.port}"


def chat(i: int = 0, **extra) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 6, **extra}


def post(server, content: bytes | str, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{base(server)}/v1/chat/completions", content=content, timeout=60,
                      headers={"Content-Type": "application/json", **(headers or {})})


def sse_events(text: str) -> list:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    return error


# ---------------------------------------------------------------- defect 3: one request fails only itself

BAD_SEEDS = [123456789012345678901234567890, 2**64 - 1, 2**63, -2**63 - 1]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_huge_seed_in_a_batch_fails_only_its_own_request(server, stream):
    async def burst():
        async with httpx.AsyncClient(base_url=base(server), timeout=120) as client:
            good = [client.post("/v1/chat/completions", json=chat(i, seed=i, stream=stream)) for i in range(4)]
            bad = [client.post("/v1/chat/completions", json=chat(9, seed=s, stream=stream)) for s in BAD_SEEDS]
            return await asyncio.gather(*good, *bad)

    before = httpx.get(f"{base(server)}/health").json()
    responses = asyncio.run(burst())
    for response in responses[:4]:
        assert response.status_code == 200, response.text
        if stream:
            events = sse_events(response.text)
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events
        else:
            assert isinstance(response.json()["choices"][0]["message"]["content"], str)
    for response in responses[4:]:
        assert_openai_error(response, 400, "seed")
    after = httpx.get(f"{base(server)}/health").json()
    assert after["sequences"] - before["sequences"] == 4  # the bad ones never reached the engine


def test_seeds_at_the_ends_of_int64_work_with_n_choices(server):
    for seed in (2**63 - 1, -2**63):
        response = post(server, json.dumps(chat(seed=seed, n=3, temperature=1.0)))
        assert response.status_code == 200, response.text
        assert len(response.json()["choices"]) == 3
    # the same seed gives the same text, whatever the batch (negative seeds too)
    texts = {post(server, json.dumps(chat(seed=-5, temperature=1.0))).json()["choices"][0]["message"]["content"]
             for _ in range(2)}
    assert len(texts) == 1


def run_rows(engine: BatchingEngine, rows: list[tuple[list[int], SamplingParams, bool]]) -> list:
    """Submit every row at once (streamed or not); each result is (streamed text, Completion) or the error."""
    async def one(prompt, params, stream):
        try:
            if not stream:
                return None, await engine.complete(prompt, params)
            text, done = "", None
            async for kind, value in engine.stream(prompt, params):
                if kind == "text":
                    text += value
                else:
                    done = value
            return text, done
        except Exception as err:  # noqa: BLE001 - the result under test
            return err

    async def all_rows():
        return await asyncio.gather(*(one(*row) for row in rows))

    return asyncio.run(all_rows())


@pytest.fixture
def engine(tiny_llama):
    model, tokenizer = tiny_llama
    engine = BatchingEngine(model, tokenizer, max_batch=8, wait_ms=300)
    yield engine
    engine.close()


GOOD = [SamplingParams(max_new_tokens=8, temperature=1.0, seed=1), SamplingParams(max_new_tokens=8, temperature=0),
        SamplingParams(max_new_tokens=8, temperature=0.7, top_k=5, seed=-3)]


def check_good_rows(tiny_llama, prompts, results) -> None:
    """Every good row completed, with the text it gets alone; streamed text equals the final text."""
    model, tokenizer = tiny_llama
    for prompt, params, result in zip(prompts, GOOD, results, strict=True):
        assert not isinstance(result, Exception), result
        streamed, completion = result
        assert completion.text == generate(model, tokenizer, [prompt], [params])[0].text
        if streamed is not None:
            assert streamed == completion.text


def test_engine_drops_a_row_whose_settings_cannot_be_sampled(engine, tiny_llama):
    _, tokenizer = tiny_llama
    prompts = [tokenizer(f"hello {i}").input_ids for i in range(len(GOOD))]
    bad = [SamplingParams(max_new_tokens=8, seed=2**70), SamplingParams(max_new_tokens=8, temperature=float("nan"))]
    results = run_rows(engine, [(p, s, i % 2 == 0) for i, (p, s) in enumerate(zip(prompts, GOOD, strict=True))]
                       + [(prompts[0], b, True) for b in bad])
    check_good_rows(tiny_llama, prompts, results[:len(GOOD)])
    assert isinstance(results[-2], ValueError) and "seed" in str(results[-2])
    assert isinstance(results[-1], ValueError) and "temperature" in str(results[-1])
    assert (engine.stats.batches, engine.stats.sequences) == (1, len(GOOD))  # the good rows still shared a batch


def test_engine_reruns_rows_alone_when_one_row_fails_the_batch(engine, tiny_llama):
    model, tokenizer = tiny_llama
    prompts = [tokenizer(f"hello {i}").input_ids for i in range(len(GOOD))]
    poisoned = [1, 2, model.config.vocab_size + 5]  # passes the settings check, breaks the embedding lookup
    results = run_rows(engine, [(p, s, i % 2 == 1) for i, (p, s) in enumerate(zip(prompts, GOOD, strict=True))]
                       + [(poisoned, GOOD[0], True)])
    check_good_rows(tiny_llama, prompts, results[:len(GOOD)])
    assert isinstance(results[-1], IndexError)
    assert engine.stats.sequences == len(GOOD)


# ---------------------------------------------------------------- defect 4: non-finite numbers

@pytest.mark.parametrize("raw, param", [
    ('{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "temperature"),
    ('{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}', "top_p"),
    ('{"messages": [{"role": "user", "content": "x"}], "temperature": -Infinity}', "temperature"),
    ('{"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1e999}', "presence_penalty"),
    ('{"messages": [{"role": "user", "content": "x", "weight": NaN}]}', "messages[0].weight"),
    ('{"messages": [{"role": "user", "content": "x"}], "top_k": -1}', "top_k"),
    ('{"messages": [{"role": "user", "content": "x"}], "top_k": 1e400}', "top_k"),
])
def test_non_finite_and_out_of_range_numbers_are_400(server, raw, param):
    error = assert_openai_error(post(server, raw), 400, param)
    if param == "top_k" and "-1" in raw:
        assert "'top_k' must be >= 0" in error["message"] and "None" not in error["message"]


def test_huge_top_k_is_harmless(server):
    assert post(server, json.dumps(chat(top_k=10**30, seed=1))).status_code == 200


# ---------------------------------------------------------------- defect 6: web pages cannot drive the server

@pytest.mark.parametrize("path", ["/health", "/v1/models"])
def test_unknown_host_is_refused_on_every_route(server, path):
    for host in ("attacker.example", f"attacker.example:{server.port}", "127.0.0.1.attacker.example"):
        response = httpx.get(f"{base(server)}{path}", headers={"Host": host}, timeout=30)
        assert assert_openai_error(response, 421)["code"] == "host_not_allowed"


def test_dns_rebinding_post_is_refused(server):
    host = f"attacker.example:{server.port}"
    response = post(server, json.dumps(chat()), {"Host": host, "Origin": f"http://{host}"})
    assert_openai_error(response, 421)
    assert post(server, json.dumps(chat()), {"Host": host, "Content-Type": "text/plain"}).status_code == 421


def test_allowed_hosts_loopback_and_ip_literals_pass(server):
    for host in ("models.internal", "other.test", f"third.test:{server.port}", "Models.Internal.",
                 f"localhost:{server.port}", f"127.0.0.1:{server.port}", "app.localhost", "10.1.2.3"):
        response = httpx.get(f"{base(server)}/v1/models", headers={"Host": host}, timeout=30)
        assert response.status_code == 200, (host, response.text)


@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain; charset=application/json",
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                          "application/jsonp", "text/json"])
def test_a_body_that_is_not_exactly_json_is_415(server, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = httpx.post(f"{base(server)}/v1/chat/completions", content=json.dumps(chat()).encode(),
                          headers=headers, timeout=60)
    assert_openai_error(response, 415)


def test_cross_origin_requests_are_403(server):
    for origin in ("http://attacker.example", "null", f"http://localhost:{server.port + 1}",
                   f"https://127.0.0.1:{server.port}x"):
        response = post(server, json.dumps(chat()), {"Origin": origin})
        assert_openai_error(response, 403)
        assert httpx.get(f"{base(server)}/health", headers={"Origin": origin}).status_code == 403


def test_good_requests_still_work(server):
    for content_type in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        assert post(server, json.dumps(chat()), {"Content-Type": content_type}).status_code == 200
    same_origin = post(server, json.dumps(chat()), {"Origin": f"http://127.0.0.1:{server.port}"})
    assert same_origin.status_code == 200
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert isinstance(reply.choices[0].message.content, str)
    streamed = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=3, stream=True))
    assert streamed


# ---------------------------------------------------------------- defect 10: bearer scheme in any case

def test_bearer_scheme_is_case_insensitive(tiny_server):
    url = f"http://127.0.0.1:{tiny_server.port}/v1/models"
    for header in (f"Bearer {API_KEY}", f"bearer {API_KEY}", f"BEARER {API_KEY}", f"bEaReR  {API_KEY}"):
        assert httpx.get(url, headers={"Authorization": header}, timeout=30).status_code == 200, header
    for header in (f"Bearer {API_KEY}x", f"Bearer {API_KEY[:-1]}", f"Basic {API_KEY}", API_KEY, "Bearer", ""):
        response = httpx.get(url, headers={"Authorization": header}, timeout=30)
        assert assert_openai_error(response, 401)["code"] == "invalid_api_key"


# ---------------------------------------------------------------- defect 8: flag ranges

@pytest.mark.parametrize("flag, value", [("--port", "99999"), ("--port", "-1"), ("--max-batch", "0"),
                                         ("--max-queue", "0"), ("--max-tokens-cap", "0"), ("--max-n", "0"),
                                         ("--batch-wait-ms", "-1")])
def test_out_of_range_flags_are_one_line_errors(tiny_llama_dir, flag, value):
    proc = run_cli("serve", "--model", tiny_llama_dir, flag, value, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and flag in errors[0], proc.stderr
