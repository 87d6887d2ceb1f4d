"""``so8t serve`` on a real pretrained model: SmolLM2-135M-Instruct from its GGUF file, with an adapter that
``so8t train`` made on it (2 steps), asked a plain question by the official ``openai`` client through
the model's chat template; and the model alone streaming a long answer as it generates it. About three
minutes on a 2-core CPU, most of it the training."""

import contextlib
import re
import signal
import sys
import time
from pathlib import Path

import openai
import pytest
from child_processes import started
from serve_helpers import verify, wait_for_health
from test_real_model import gguf_file  # noqa: F401 (the fixture: skips, or fails in CI, without the package)
from test_serve_cli import OFFLINE

from so8t.audit.log import AuditKey, read_rows
from so8t.commands.main import main

pytestmark = pytest.mark.real_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def readable(text: str) -> bool:
    """Words in printable characters: no replacement characters, no control characters but whitespace."""
    return (len(re.findall(r"[A-Za-z]{2,}", text)) >= 3 and "\ufffd" not in text
            and all(character.isprintable() or character.isspace() for character in text))


def test_the_real_gguf_model_with_its_adapter_answers_over_the_openai_api(gguf_file, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    assert main(["train", "--model", str(gguf_file), "--output-dir", str(run), "--max-steps", "2", "--batch-size", "2",
                 "--max-length", "64", "--so8t-layers", "1,14,28", "--warmup-steps", "1", "--learning-rate", "1e-3",
                 "--no-monitor"]) == 0
    audit_db = tmp_path / "audit.db"
    with serving(tmp_path / "logs", "--model", str(gguf_file), "--adapter", str(run), "--audit-db", str(audit_db)) as url:
        assert wait_for_health(url)["gated_layers"] == [1, 14, 28]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        [model] = client.models.list().data
        completion = client.chat.completions.create(model=model.id, messages=QUESTION, max_tokens=32, temperature=0)
    answer = completion.choices[0].message.content
    assert readable(answer), answer
    assert completion.usage.prompt_tokens > 10  # the chat template's turn markers around the question
    [row] = read_rows(audit_db)
    key = AuditKey.load(f"{audit_db}.key")
    assert (row.request_id, row.outcome, row.status) == (completion.model_extra["so8t"]["request_id"], "answered", 200)
    assert row.answer_hmac == key.digest(answer) and verify(audit_db, key).ok


@contextlib.contextmanager
def serving(logs: Path, *arguments: str):
    """A ``so8t serve`` subprocess, its output in LOGS; yields its URL once /health answers, stops it with
    SIGTERM at the end (drained, its audit database closed), killed if it does not stop."""
    command = [sys.executable, "-m", "so8t", "serve", "--port", "0", "--log-level", "warning", *arguments]
    with started(command, logs, env=OFFLINE) as server:
        url = server.wait_for_stdout(r"on (http://127\.0\.0\.1:\d+) ").group(1)
        wait_for_health(url, process=server.process)
        try:
            yield url
        finally:
            server.send(signal.SIGTERM)
            server.wait(120)


def test_a_streamed_answer_of_the_real_model_arrives_as_it_is_generated(gguf_file, tmp_path):  # noqa: F811
    """SmolLM2-Instruct (the default model: no --model) does not open a thinking block: its answer streams
    from the first tokens, not in one piece at the end."""
    with serving(tmp_path / "logs", "--audit-db", str(tmp_path / "audit.db")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        [model] = client.models.list().data
        assert model.id == "smollm2-135m-instruct"
        started = time.perf_counter()
        arrivals, chunks = [], []
        stream = client.chat.completions.create(
            model=model.id, messages=[{"role": "user", "content": "Describe the sea in a long paragraph."}],
            max_tokens=48, temperature=0, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.perf_counter() - started)
                chunks.append(chunk.choices[0].delta.content)
            last = chunk
        plain = client.chat.completions.create(
            model=model.id, messages=[{"role": "user", "content": "Describe the sea in a long paragraph."}],
            max_tokens=48, temperature=0)
    assert last.usage.completion_tokens == 48 and last.choices[0].finish_reason == "length"
    assert "".join(chunks) == plain.choices[0].message.content and readable(plain.choices[0].message.content)
    assert len(chunks) >= 5, chunks
    # The first words arrive while most of the 48 tokens are still to be generated.
    assert arrivals[0] < 0.5 * arrivals[-1], arrivals
    print(f"streamed: {len(chunks)} content chunks, first at {arrivals[0]:.2f} s, last at {arrivals[-1]:.2f} s")
