"""``so8t serve`` as an operator runs it: the embedded default starts offline on a free port, answers,
stops on Ctrl-C; what cannot start (a model that does not load, a busy port, an unusable audit
database) exits with status 2 and one line, not a traceback."""

import os
import re
import signal
import socket
import subprocess
import sys

import httpx

from so8t.audit import read_rows, verify_chain
from so8t.cli import main
from serve_helpers import one_torch_thread, wait_for_health  # noqa: F401 (autouse)

# One torch thread for the tiny model, as in the in-process tests (see serve_helpers.one_torch_thread).
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_serve_starts_offline_answers_and_stops_on_interrupt(tmp_path):
    audit_db = tmp_path / "audit.db"
    process = subprocess.Popen(
        [sys.executable, "-m", "so8t", "serve", "--port", "0", "--audit-db", str(audit_db), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=OFFLINE,
    )
    try:
        banner = process.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+) ", banner)
        assert match, f"no address in {banner!r}; stderr: {process.stderr.read() if process.poll() is not None else ''}"
        url = match.group(1)
        health = wait_for_health(url, process=process)
        assert health["model"] == "so8t-demo-phi3" and health["gated_layers"] == [1, 2, 3, 4]
        response = httpx.post(f"{url}/think", json={"prompt": "hello", "max_new_tokens": 4}, timeout=120)
        assert response.status_code == 200 and response.json()["outcome"] == "answered"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in process.stderr.read()
    [row] = read_rows(audit_db)
    assert row.request_id == response.json()["request_id"] and verify_chain([row]).ok


def test_a_model_that_does_not_load_is_one_line_and_status_2(tmp_path):
    missing = tmp_path / "no-such-model"
    result = subprocess.run([sys.executable, "-m", "so8t", "serve", "--model", str(missing), "--port", "0",
                             "--audit-db", str(tmp_path / "audit.db")],
                            capture_output=True, text=True, timeout=300, env=OFFLINE)
    assert result.returncode == 2
    # Search for so8t's own line: third-party libraries may log to stderr on some CPUs.
    assert any(line.startswith(f"so8t serve: error: cannot load the model ({missing})")
               for line in result.stderr.splitlines()), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "audit.db").exists()  # nothing was created for a server that never started


def test_other_start_failures_are_status_2(tmp_path, capsys):
    assert main(["serve", "--safety-model", str(tmp_path / "no-judge"), "--audit-db", str(tmp_path / "a.db")]) == 2
    assert "cannot load --safety-model" in capsys.readouterr().err

    (tmp_path / "file").write_text("")
    assert main(["serve", "--audit-db", str(tmp_path / "file" / "audit.db"), "--port", "0"]) == 2
    assert "cannot open --audit-db" in capsys.readouterr().err

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--audit-db", str(tmp_path / "b.db")]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err

    not_an_adapter = tmp_path / "empty-adapter"
    not_an_adapter.mkdir()
    (not_an_adapter / "so8t").mkdir()
    assert main(["serve", "--adapter", str(not_an_adapter), "--audit-db", str(tmp_path / "c.db")]) == 2
    assert "so8t_adapter.json not found" in capsys.readouterr().err
