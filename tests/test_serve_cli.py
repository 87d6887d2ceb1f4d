"""``so8t serve`` as an operator runs it: the embedded default starts offline on a free port, answers,
logs its audit anchors, stops on Ctrl-C, and leaves its audit files in one folder; what cannot start (a
model that does not load, a busy port, an unusable audit database) exits with status 2 and one line, not a
traceback."""

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from child_processes import run, started
from serve_helpers import one_torch_thread, verify, wait_for_health  # noqa: F401 (autouse)

from so8t.audit.log import AuditKey, read_rows
from so8t.commands.main import main

# One torch thread for the tiny model, as in the in-process tests (see serve_helpers.one_torch_thread).
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_serve_starts_offline_answers_logs_its_anchors_and_stops_on_interrupt(tmp_path):
    """Default options but the port, in an empty folder: at the default log level the audit anchors are on
    stderr (the README tells operators to ship them), and the audit files are in one folder."""
    folder = tmp_path / "folder"
    folder.mkdir()
    with started([sys.executable, "-m", "so8t", "serve", "--model", "demo", "--port", "0", "--served-model-name", "tiny",
                  "--threads", "1"], tmp_path / "logs", env=OFFLINE, cwd=folder) as server:
        url = server.wait_for_stdout(r"^so8t serve: tiny on (http://127\.0\.0\.1:\d+) .*torch threads: 1\)$").group(1)
        health = wait_for_health(url, process=server.process)
        assert health["model"] == "tiny" and health["gated_layers"] == [1, 2, 3, 4]
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny"
        response = httpx.post(f"{url}/think", json={"prompt": "hello", "max_new_tokens": 4}, timeout=120)
        assert response.status_code == 200 and response.json()["outcome"] == "answered"
        server.send(signal.SIGINT)
        assert server.wait(60) == 0, server.stderr[-3000:]
        stderr = server.stderr
    assert "Traceback" not in stderr
    audit_db = folder / "so8t-audit" / "audit.db"
    anchors = re.findall(r"^INFO: +audit anchor: (\S+) rows=(\d+) head=([0-9a-f]{64})$", stderr, re.MULTILINE)
    assert [(path, rows) for path, rows, _ in anchors] == [(str(Path("so8t-audit") / "audit.db"), "0"),
                                                           (str(Path("so8t-audit") / "audit.db"), "1")], stderr
    assert {path.name for path in folder.iterdir()} == {"so8t-audit"}  # nothing else in the working folder
    assert {"audit.db", "audit.db.key", "audit.db.anchors"} <= {path.name for path in audit_db.parent.iterdir()}
    [row] = read_rows(audit_db)
    assert row.request_id == response.json()["request_id"]
    assert anchors[-1][2] == verify(audit_db, AuditKey.load(f"{audit_db}.key")).head_mac
    key_file = audit_db.parent / "audit.db.key"
    assert key_file.stat().st_mode & 0o777 == 0o600  # created on first use, for its owner only
    assert key_file.read_text().strip() not in audit_db.read_bytes().hex()
    assert verify(audit_db, AuditKey.load(key_file)).ok


def so8t_line(text: str) -> str:
    """so8t's own one-line message (third-party libraries may log to stderr on some CPUs)."""
    [line] = [line for line in text.splitlines() if line.startswith("so8t serve:")]
    return line


def serve_subprocess(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "so8t", "serve", "--model", "demo", *args], timeout=timeout, env=OFFLINE)


def test_sigterm_drains_the_request_in_flight_exits_0_and_closes_the_database(tmp_path):
    audit_db = tmp_path / "audit.db"
    with started([sys.executable, "-m", "so8t", "serve", "--model", "demo", "--port", "0", "--audit-db", str(audit_db),
                  "--log-level", "warning"], tmp_path / "logs", env=OFFLINE) as server:
        url = server.wait_for_stdout(r"on (http://127\.0\.0\.1:\d+) ").group(1)
        wait_for_health(url, process=server.process)
        with httpx.Client(timeout=120) as client:
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(client.post, f"{url}/think",
                                      json={"prompt": "a long one", "max_new_tokens": 400, "temperature": 0})
                while httpx.get(f"{url}/health").json()["queue_depth"] == 0:  # the request is in
                    time.sleep(0.01)
                server.send(signal.SIGTERM)
                response = pending.result()
        assert server.wait(60) == 0, server.stderr[-3000:]
        assert "Traceback" not in server.stderr
    assert response.status_code == 200 and response.json()["monitor"]["generated_tokens"] >= 1
    # SQLite checkpoints and removes the WAL file when the last connection closes cleanly.
    assert not (tmp_path / "audit.db-wal").exists()
    [row] = read_rows(audit_db)
    assert row.request_id == response.json()["request_id"] and row.outcome == "answered"


def test_a_missing_model_directory_is_named_before_anything_loads(tmp_path):
    missing = tmp_path / "no-such-model"
    result = serve_subprocess("--model", str(missing), "--port", "0", "--audit-db", str(tmp_path / "db" / "audit.db"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert so8t_line(result.stderr) == f"so8t serve: error: --model {missing}: no such directory or file"
    assert not (tmp_path / "db").exists()  # nothing was created for a server that never started


def test_without_model_the_default_or_the_demo_an_adapter_was_trained_on(generation_run, tmp_path):
    from so8t.commands.model_options import inference_model
    from so8t.errors import SO8TError
    from so8t.models.source import default_model

    assert (generation_run / "embedded_base.json").is_file()  # trained with --model demo
    assert inference_model(None, str(generation_run)) == "demo"
    assert inference_model(None, None) == default_model() and default_model().endswith(".gguf")
    assert inference_model("demo", str(generation_run)) == "demo"
    (tmp_path / "run").mkdir()  # a run on another base records no demo seed
    assert inference_model(None, str(tmp_path / "run")) == default_model()
    with pytest.raises(SO8TError, match="--adapter .*: no such directory"):
        inference_model(None, str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def generation_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("generate") / "run"
    assert main(["train", "--model", "demo", "--output-dir", str(output), "--max-steps", "2", "--warmup-steps", "1", "--no-monitor"]) == 0
    return output


def test_a_generation_run_as_safety_model_is_not_a_judge(generation_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("so8t.serve.engines.hf.HFEngine.load", _must_not_load)
    assert main(["serve", "--port", "0", "--safety-model", str(generation_run),
                 "--audit-db", str(tmp_path / "db" / "audit.db")]) == 2
    assert so8t_line(capsys.readouterr().err) == (
        f"so8t serve: error: --safety-model: {generation_run} is not a so8t judge: its adapter_config.json is a "
        "CAUSAL_LM adapter (a so8t train --task generate output?), a judge's is SEQ_CLS")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["serve", "--port", "0", "--safety-model", str(empty), "--audit-db", str(tmp_path / "db" / "a.db")]) == 2
    assert so8t_line(capsys.readouterr().err) == (
        f"so8t serve: error: --safety-model: {empty} is not a so8t judge (so8t train --task classify output): "
        "missing config.json or adapter_config.json, tokenizer.json, tokenizer_config.json")
    assert main(["serve", "--safety-model", str(tmp_path / "no-judge"), "--port", "0",
                 "--audit-db", str(tmp_path / "db" / "b.db")]) == 2
    assert "--safety-model: " in capsys.readouterr().err
    assert not (tmp_path / "db").exists()


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the check that failed")


def test_a_taken_port_is_found_before_the_model_loads_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("so8t.serve.engines.hf.HFEngine.load", _must_not_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--audit-db", str(tmp_path / "db" / "audit.db")]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in so8t_line(capsys.readouterr().err)
    assert not (tmp_path / "db").exists()


def test_other_start_failures_are_status_2(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["serve", "--model", "demo", "--audit-db", str(tmp_path / "file" / "audit.db"), "--port", "0"]) == 2
    assert "cannot open --audit-db" in capsys.readouterr().err

    not_an_adapter = tmp_path / "empty-adapter"
    not_an_adapter.mkdir()
    (not_an_adapter / "so8t").mkdir()
    assert main(["serve", "--model", "demo", "--adapter", str(not_an_adapter), "--audit-db", str(tmp_path / "c.db"),
                 "--port", "0"]) == 2
    assert "so8t_adapter.json not found" in capsys.readouterr().err
    assert not (tmp_path / "c.db").exists()


def test_serve_defaults_match_the_modules_they_stand_for():
    from so8t.audit.log import DEFAULT_ANCHOR_EVERY
    from so8t.judge.judge import DEFAULT_THRESHOLD
    from so8t.commands import serve as command
    from so8t.serve import app
    from so8t.serve.engines import hf

    assert command.DEFAULT_THRESHOLD == DEFAULT_THRESHOLD and command.DEFAULT_ANCHOR_EVERY == DEFAULT_ANCHOR_EVERY
    assert (command.DEFAULT_MAX_BATCH, command.DEFAULT_MAX_QUEUE) == (hf.DEFAULT_MAX_BATCH, app.DEFAULT_MAX_QUEUE)


def test_a_log_shorter_than_its_anchors_is_refused_unless_accepted_and_the_acceptance_is_a_row(tmp_path):
    from so8t.audit.log import AuditLog, AuditRecord
    from so8t.audit.verify import verify_chain

    audit_db = tmp_path / "audit.db"
    key, _ = AuditKey.load_or_create(tmp_path / "audit.db.key")
    log = AuditLog(audit_db, key, tmp_path / "audit.db.anchors")
    for index in range(5):
        log.append(AuditRecord(f"req-{index}", "answered", 200, 1.0))
    log.close()
    connection = sqlite3.connect(audit_db)  # rows deleted from the end while the server was down
    with connection:
        connection.execute("DELETE FROM audit_log WHERE seq >= 4")
    connection.close()
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    refused = serve_subprocess("--port", "0", "--audit-db", str(audit_db))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert so8t_line(refused.stderr) == (
        f"so8t serve: error: cannot open --audit-db {audit_db}: audit.db.anchors:2 saw 5 rows, the log has 3 "
        "(rows were deleted from the end); --audit-accept-truncated serves on it anyway and records that in the log")
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before

    with started([sys.executable, "-m", "so8t", "serve", "--model", "demo", "--port", "0", "--audit-db", str(audit_db),
                  "--audit-accept-truncated", "--log-level", "warning"], tmp_path / "logs", env=OFFLINE) as server:
        wait_for_health(server.wait_for_stdout(r"on (http://\S+) ").group(1), process=server.process)
        server.send(signal.SIGINT)
        assert server.wait(60) == 0, server.stderr[-3000:]
        assert "saw 5 rows, the log has 3" in server.stderr
    rows = read_rows(audit_db)
    assert [(row.seq, row.outcome) for row in rows[3:]] == [(4, "truncation_accepted")]
    assert verify_chain(rows, key).ok  # the chain goes on through the acceptance


def test_threads_default_to_half_the_cpus_and_the_name_to_model_and_adapter(monkeypatch, tmp_path):
    from so8t.commands.model_options import default_threads, torch_threads
    from so8t.models.inference import served_model_name

    assert default_threads() == max(1, len(os.sched_getaffinity(0)) // 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert torch_threads(None) == default_threads() and torch_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert torch_threads(None) is None  # torch reads OMP_NUM_THREADS itself
    run = tmp_path / "run-20261204"
    run.mkdir()
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert served_model_name(str(gguf), str(run)) == "smollm2-135m-instruct+run-20261204"
    assert served_model_name("HuggingFaceTB/SmolLM2-135M-Instruct", None) == "smollm2-135m-instruct"
    assert served_model_name("demo", f"{run}/") == "so8t-demo-phi3+run-20261204"
