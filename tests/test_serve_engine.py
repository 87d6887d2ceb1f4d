"""The server against the engine interface alone: a scripted engine (no model, nothing of Hugging Face) that
streams a fixed completion piece by piece. A thinking model's thinking stays hidden and its answer streams
once the block closes (the thinking too, as ``reasoning_content``, when asked); a model that does not think
streams from its first piece; /think answers from the same engine; an engine without logit statistics
gives null statistics."""

import asyncio
import time

import httpx
import openai
import pytest
from serve_helpers import open_audit, running_server

from so8t.audit.log import read_rows
from so8t.models.demo import build_demo_tokenizer
from so8t.serve.app import create_app
from so8t.serve.engines.base import STOP, Completion, Engine, TextDelta
from so8t.serve.thinking import sha256_text

PAUSE_S = 0.1  # between pieces: streaming shows as arrival times this far apart
THINKING_MODEL = ["<th", "ink>", "secret ", "plan", "</think>", "\n", "The ", "answer ", "is ", "41."]
PLAIN_MODEL = ["Paris ", "is ", "the ", "capital ", "of ", "France."]
QUESTION = [{"role": "user", "content": "What is 16 + 25?"}]


class ScriptedEngine(Engine):
    name = "scripted"
    context_length = 512
    gated_layers = [3]

    def __init__(self, pieces: list[str], pause_s: float = PAUSE_S):
        self.tokenizer = build_demo_tokenizer()
        self.pieces = pieces
        self.pause_s = pause_s
        self.cancelled: list[str] = []

    async def stream(self, request):
        for piece in self.pieces:
            await asyncio.sleep(self.pause_s)
            yield TextDelta(piece)
        yield Completion(text="".join(self.pieces), prompt_tokens=len(request.prompt.ids), new_tokens=len(self.pieces),
                         finish_reason=STOP, logit_stats=None, sigma_alpha={3: 0.1})

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)


@pytest.fixture
def serve(tmp_path):
    audits = []

    def serving(pieces):
        audit = open_audit(tmp_path / f"audit-{len(audits)}.db")
        audits.append(audit)
        return running_server(create_app(ScriptedEngine(pieces), audit))

    yield serving
    for audit in audits:
        audit.close()


def streamed(url: str, **extra) -> tuple[list[tuple[float, dict]], object]:
    """(seconds since the request, delta) of each chunk that carries text, and the last chunk."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    started, arrivals = time.perf_counter(), []
    for chunk in client.chat.completions.create(model="scripted", messages=QUESTION, stream=True, **extra):
        delta = chunk.choices[0].delta.model_dump(exclude_none=True)
        if delta.get("content") or delta.get("reasoning_content"):
            arrivals.append((time.perf_counter() - started, delta))
        last = chunk
    return arrivals, last


def test_a_thinking_models_answer_streams_once_its_block_closes_and_its_thinking_stays_hidden(serve):
    with serve(THINKING_MODEL) as url:
        arrivals, last = streamed(url)
        asked, _ = streamed(url, extra_body={"return_thinking": True})
    contents = [delta["content"] for _, delta in arrivals]
    assert "".join(contents) == "The answer is 41." and len(contents) == 4
    assert not any("secret" in delta.get("content", "") or "reasoning_content" in delta for _, delta in arrivals)
    assert arrivals[0][0] >= 6 * PAUSE_S  # not before the block closed (6 pieces in)
    assert arrivals[-1][0] - arrivals[0][0] >= 2 * PAUSE_S  # then piece by piece, not at the end
    assert last.model_extra["so8t"]["thinking_sha256"] == sha256_text("secret plan")
    assert last.model_extra["so8t"]["thinking_parse"] == "closed"
    assert "".join(delta.get("reasoning_content", "") for _, delta in asked) == "secret plan"
    assert "".join(delta.get("content", "") for _, delta in asked) == "The answer is 41."


def test_a_model_that_does_not_think_streams_from_its_first_piece(serve):
    with serve(PLAIN_MODEL) as url:
        arrivals, last = streamed(url)
    assert [delta["content"] for _, delta in arrivals] == ["Paris", " is", " the", " capital", " of", " France."]
    assert arrivals[-1][0] - arrivals[0][0] >= 4 * PAUSE_S
    assert last.choices[0].finish_reason == "stop" and last.model_extra["so8t"]["thinking_parse"] == "none"


def test_think_and_plain_completions_answer_from_the_engine_without_logit_statistics(serve, tmp_path):
    with serve(THINKING_MODEL) as url:
        think = httpx.post(f"{url}/think", json={"prompt": "What is 16 + 25?", "return_thinking": True}, timeout=60)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        plain = client.chat.completions.create(model="scripted", messages=QUESTION,
                                               extra_body={"return_thinking": True})
        health = httpx.get(f"{url}/health").json()
    body = think.json()
    assert (body["answer"], body["thinking"], body["thinking_parse"]) == ("The answer is 41.", "secret plan", "closed")
    assert body["monitor"] == {"generated_tokens": len(THINKING_MODEL), "logit_mean": None, "logit_std": None,
                               "logit_min": None, "logit_max": None, "logit_nonfinite": None, "exact_logit_stats": [],
                               "sigma_alpha": {"3": 0.1}}
    message = plain.choices[0].message
    assert message.content == "The answer is 41." and message.model_extra["reasoning_content"] == "secret plan"
    assert health["model"] == "scripted" and health["gated_layers"] == [3]
    assert [(row.outcome, row.status) for row in read_rows(tmp_path / "audit-0.db")] == [("answered", 200)] * 2
