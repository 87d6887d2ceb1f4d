"""/v1/chat/completions and /v1/models driven by the official ``openai`` client against a live server on
127.0.0.1: plain and streamed completions equal to what the model generates, so8t's extension fields,
the audit row, and errors surfacing as the client's exception types."""


import asyncio
import contextlib
import json

import httpx
import openai
import pytest
from serve_helpers import complete, one_torch_thread, open_audit, running_server, verify  # noqa: F401 (autouse)

from so8t.audit.log import read_rows
from so8t.serve.app import create_app
from so8t.serve.engines.hf import HFEngine
from so8t.serve.routes.openai import messages_text
from so8t.serve.thinking import parse_thinking

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 16 + 25?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("openai") / "audit.db"
    engine = HFEngine.load()
    audit = open_audit(path)
    with running_server(create_app(engine, audit)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-checked", max_retries=0, timeout=120)
        yield client, engine, path, audit
    audit.close()
    engine.shutdown()


def expected_answer(engine, messages, max_tokens: int):
    """The parse of the greedy completion, as the server answers it."""
    return parse_thinking(complete(engine, messages, max_tokens).text, engine.encode(messages, max_tokens).opens_thinking)


def test_models_lists_the_served_model(server):
    client, engine, _, _ = server
    assert [model.id for model in client.models.list()] == [engine.name]


def test_a_plain_completion_is_what_the_model_generates_with_its_audit_row(server):
    client, engine, path, audit = server
    completion = client.chat.completions.create(model=engine.name, messages=MESSAGES, max_tokens=12, temperature=0)
    expected = expected_answer(engine, MESSAGES, 12)
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.answer
    assert choice.finish_reason in ("stop", "length")
    extension = completion.model_extra["so8t"]
    assert extension["thinking_sha256"] == expected.thinking_sha256 and extension["thinking_parse"] == expected.case
    assert extension["outcome"] == "answered" and extension["monitor"]["generated_tokens"] == completion.usage.completion_tokens
    assert completion.id == f"chatcmpl-{extension['request_id']}" and completion.model == engine.name
    row = next(row for row in read_rows(path) if row.request_id == extension["request_id"])
    assert (row.outcome, row.status) == ("answered", 200)
    assert row.prompt_hmac == audit.digest(messages_text(MESSAGES)) and row.answer_hmac == audit.digest(expected.answer)
    assert row.thinking_hmac == audit.digest(expected.thinking)


def test_a_streamed_completion_adds_up_to_the_plain_one(server):
    client, engine, path, audit = server
    stream = client.chat.completions.create(model=engine.name, messages=MESSAGES, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    expected = expected_answer(engine, MESSAGES, 12)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == expected.answer
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length") and last.usage.completion_tokens >= 1
    extension = last.model_extra["so8t"]
    assert extension["thinking_sha256"] == expected.thinking_sha256
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])
    row = next(row for row in read_rows(path) if row.request_id == extension["request_id"])
    assert (row.outcome, row.status, row.answer_hmac) == ("answered", 200, audit.digest(expected.answer))


def test_stop_strings_end_the_completion_before_them(server):
    client, engine, _, _ = server
    full = expected_answer(engine, MESSAGES, 20)
    raw = complete(engine, MESSAGES, 20).text
    stop = raw[3:5]  # two characters the greedy completion contains
    completion = client.chat.completions.create(model=engine.name, messages=MESSAGES, max_tokens=20,
                                                temperature=0, stop=[stop])
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.content == parse_thinking(raw[:raw.find(stop)]).answer != full.answer


@pytest.mark.parametrize(
    ("kwargs", "error", "param"),
    [
        ({"model": "gpt-4o"}, openai.NotFoundError, None),
        ({"temperature": 3}, openai.BadRequestError, "temperature"),
        ({"max_tokens": 0}, openai.BadRequestError, "max_tokens"),
        ({"extra_body": {"max_tokens": "5"}}, openai.BadRequestError, "max_tokens"),
        ({"extra_body": {"stream": 1}}, openai.BadRequestError, "stream"),
        ({"messages": []}, openai.BadRequestError, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, openai.BadRequestError, "messages.0.role"),
        ({"extra_body": {"logit_bias": {}}}, openai.BadRequestError, "logit_bias"),
        ({"max_tokens": 2000}, openai.BadRequestError, "max_tokens"),  # over the demo model's 512 positions
        ({"max_tokens": None, "max_completion_tokens": 2000}, openai.BadRequestError, "max_completion_tokens"),
        # The conversation alone is over the 512 positions: the field to shorten is `messages`.
        ({"messages": [{"role": "user", "content": "z" * 600}]}, openai.BadRequestError, "messages"),
        ({"extra_body": {"max_tokens": 4.5}}, openai.BadRequestError, "max_tokens"),
    ],
)
def test_errors_are_the_clients_exception_types(server, kwargs, error, param):
    client, engine, path, _ = server
    arguments = {"model": engine.name, "messages": MESSAGES, "max_tokens": 4, **kwargs}
    with pytest.raises(error) as raised:
        client.chat.completions.create(**arguments)
    body = raised.value.body
    assert body["param"] == param and body["message"]
    request_id = raised.value.response.headers["x-request-id"]
    row = next(row for row in read_rows(path) if row.request_id == request_id)
    assert row.outcome == "rejected" and row.status == raised.value.status_code


def test_every_request_has_one_row_and_the_chain_holds(server):
    _, _, path, audit = server
    rows = read_rows(path)
    assert len({row.request_id for row in rows}) == len(rows) and verify(path, audit).ok


def test_an_integral_float_token_limit_is_an_integer_as_the_schema_says(server):
    client, engine, _, _ = server
    completion = client.chat.completions.create(model=engine.name, messages=MESSAGES, temperature=0,
                                                extra_body={"max_tokens": 4.0})
    assert completion.usage.completion_tokens <= 4


def test_a_busy_server_answers_503_with_retry_after(tmp_path):
    engine = HFEngine.load()
    audit = open_audit(tmp_path / "audit.db")
    with running_server(create_app(engine, audit, max_queue=1)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        with httpx.Client(timeout=120) as http:
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                futures = [pool.submit(http.post, f"{url}/think", json={"prompt": "hi", "max_new_tokens": 60,
                                                                         "temperature": 0}) for _ in range(6)]
                statuses = [future.result().status_code for future in futures]
                busy = [future.result() for future in futures if future.result().status_code == 503]
            with pytest.raises(openai.APIStatusError) as raised:
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    pending = pool.submit(http.post, f"{url}/think", json={"prompt": "hi", "max_new_tokens": 200})
                    while httpx.get(f"{url}/health").json()["queue_depth"] == 0:
                        pass
                    client.chat.completions.create(model=engine.name, messages=MESSAGES, max_tokens=4)
            pending.result()
    audit.close()
    assert 200 in statuses and busy
    assert all(response.headers["retry-after"] == "1" and response.json()["error"] == "server busy" for response in busy)
    assert raised.value.status_code == 503 and raised.value.response.headers["retry-after"] == "1"
    rows = read_rows(tmp_path / "audit.db")
    assert sum(row.status == 503 and row.outcome == "rejected" for row in rows) == len(busy) + 1


def asgi_scope(path: str, body: bytes) -> dict:
    """An ASGI 2.4 HTTP scope of a JSON POST, as uvicorn builds it."""
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 9),
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}


def test_a_stream_whose_start_cannot_be_sent_gives_back_its_place_and_is_recorded_cancelled(tmp_path):
    """Under ASGI 2.4 a client gone before the response start makes ``send`` raise OSError: the event
    generator never runs, yet the stream's place in the queue comes back and its row says 499."""
    engine = HFEngine.load()
    audit = open_audit(tmp_path / "audit.db")
    app = create_app(engine, audit, max_queue=1)
    body = json.dumps({"model": engine.name, "messages": MESSAGES, "max_tokens": 4, "stream": True}).encode()
    scope = asgi_scope("/v1/chat/completions", body)

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            raise OSError("the client went away")

    async def scenario():
        async with app.router.lifespan_context(app):
            with contextlib.suppress(Exception):
                await app(scope, receive, send)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                assert (await client.get("/health")).json()["queue_depth"] == 0
                answered = await client.post("/v1/chat/completions", json={**json.loads(body), "stream": False})
                assert answered.status_code == 200  # the one place in the queue is free

    asyncio.run(scenario())
    audit.close()
    rows = read_rows(tmp_path / "audit.db")
    assert [(row.outcome, row.status) for row in rows] == [("cancelled", 499), ("answered", 200)]


@pytest.mark.parametrize("path", ["/think", "/v1/chat/completions"])
def test_a_client_gone_while_uploading_its_body_is_recorded_cancelled(server, path):
    _, engine, audit_path, audit = server
    body = json.dumps({"model": engine.name, "messages": MESSAGES, "prompt": "hi", "max_tokens": 4}).encode()
    messages = iter([{"type": "http.request", "body": body[:10], "more_body": True}, {"type": "http.disconnect"}])
    sent = []

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    app = create_app(engine, audit)
    before = len(read_rows(audit_path))

    async def scenario():
        async with app.router.lifespan_context(app):
            await app(asgi_scope(path, body), receive, send)

    asyncio.run(scenario())
    assert sent == []  # nobody to answer
    [row] = read_rows(audit_path)[before:]
    assert (row.outcome, row.status) == ("cancelled", 499)
