"""The audit log: WAL, the hash chain over every column, each kind of tampering found at the right row,
concurrent writers, and ``so8t audit verify`` exit statuses and messages."""

import sqlite3
import threading

import pytest

from so8t.audit import GENESIS_HASH, AuditLog, AuditRecord, read_rows, verify_chain
from so8t.cli import main


def record(index: int, **overrides) -> AuditRecord:
    values = dict(request_id=f"req-{index}", outcome="answered", status=200, latency_ms=10.5 + index,
                  prompt_sha256="a" * 64, thinking_sha256="b" * 64, answer_sha256="c" * 64,
                  safety_label="ALLOW", safety_confidence=0.875)
    return AuditRecord(**{**values, **overrides})


@pytest.fixture
def database(tmp_path):
    path = tmp_path / "audit.db"
    log = AuditLog(path)
    log.append(record(1))
    log.append(record(2, outcome="denied", safety_label="DENY", thinking_sha256=None, answer_sha256=None))
    log.append(record(3, outcome="rejected", status=422, prompt_sha256=None, thinking_sha256=None,
                      answer_sha256=None, safety_label=None, safety_confidence=None))
    log.append(record(4, outcome="error", status=500, error="RuntimeError"))
    log.append(record(5))
    log.close()
    return path


def execute(path, statement, *parameters):
    connection = sqlite3.connect(path)
    with connection:
        connection.execute(statement, parameters)
    connection.close()


def test_rows_are_chained_in_wal_mode(database):
    connection = sqlite3.connect(database)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    connection.close()
    rows = read_rows(database)
    assert [row.seq for row in rows] == [1, 2, 3, 4, 5]
    assert rows[0].prev_hash == GENESIS_HASH
    assert all(row.prev_hash == before.row_hash for before, row in zip(rows, rows[1:]))
    assert all(row.row_hash == row.expected_hash() for row in rows)
    assert [row.outcome for row in rows] == ["answered", "denied", "rejected", "error", "answered"]
    assert rows[2].prompt_sha256 is None and rows[3].error == "RuntimeError"
    result = verify_chain(rows)
    assert result.ok and result.rows == 5 and result.head_hash == rows[-1].row_hash


@pytest.mark.parametrize(
    ("tamper", "first_bad"),
    [
        (("UPDATE audit_log SET latency_ms = 1.0 WHERE seq = 3",), 3),
        (("UPDATE audit_log SET safety_label = 'ALLOW' WHERE seq = 2",), 2),
        (("UPDATE audit_log SET safety_confidence = 0.87500001 WHERE seq = 5",), 5),
        (("UPDATE audit_log SET time = '2020-01-01T00:00:00.000000Z' WHERE seq = 1",), 1),
        (("UPDATE audit_log SET error = NULL WHERE seq = 4",), 4),
        (("UPDATE audit_log SET request_id = 'req-x' WHERE seq = 1",), 1),
        (("DELETE FROM audit_log WHERE seq = 2",), 3),
        (("DELETE FROM audit_log WHERE seq = 1",), 2),
        (("UPDATE audit_log SET answer_sha256 = 'd' WHERE seq = 4",), 4),
        (("UPDATE audit_log SET seq = 7 WHERE seq = 5",), 7),
    ],
)
def test_tampering_is_found_at_the_first_bad_row(database, tamper, first_bad):
    execute(database, *tamper)
    result = verify_chain(read_rows(database))
    assert not result.ok and result.first_bad_seq == first_bad


def test_a_consistently_rehashed_edit_breaks_the_next_link(database):
    rows = read_rows(database)
    forged = rows[1].__class__(**{**rows[1].__dict__, "safety_label": "ALLOW", "row_hash": ""})
    execute(database, "UPDATE audit_log SET safety_label = 'ALLOW', row_hash = ? WHERE seq = 2", forged.expected_hash())
    result = verify_chain(read_rows(database))
    assert result.first_bad_seq == 3 and "prev_hash" in result.reason


def test_verify_command_exit_status_and_messages(database, tmp_path, capsys):
    assert main(["audit", "verify", str(database)]) == 0
    out = capsys.readouterr().out
    assert "5 rows, chain intact" in out and read_rows(database)[-1].row_hash in out

    execute(database, "UPDATE audit_log SET answer_sha256 = ? WHERE seq = 4", "0" * 64)
    assert main(["audit", "verify", str(database)]) == 1
    err = capsys.readouterr().err
    assert "chain broken at row 4 (request req-4)" in err and "edited" in err

    not_a_database = tmp_path / "notes.db"
    not_a_database.write_text("hello")
    assert main(["audit", "verify", str(not_a_database)]) == 2
    assert "not a so8t audit log" in capsys.readouterr().err
    assert main(["audit", "verify", str(tmp_path / "missing.db")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_an_empty_log_verifies(tmp_path, capsys):
    AuditLog(tmp_path / "empty.db").close()
    assert main(["audit", "verify", str(tmp_path / "empty.db")]) == 0
    assert "0 rows" in capsys.readouterr().out


def test_threads_and_two_connections_append_one_chain(tmp_path):
    path = tmp_path / "shared.db"
    logs = [AuditLog(path), AuditLog(path)]  # two writers, as two server processes would be

    def write(log, offset):
        for index in range(25):
            log.append(record(offset + index))

    threads = [threading.Thread(target=write, args=(logs[i % 2], 100 * i)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for log in logs:
        log.close()
    rows = read_rows(path)
    assert len(rows) == 100 and len({row.request_id for row in rows}) == 100
    assert verify_chain(rows).ok


def test_unknown_outcome_is_refused(tmp_path):
    log = AuditLog(tmp_path / "a.db")
    with pytest.raises(ValueError, match="outcome"):
        log.append(record(1, outcome="maybe"))
    log.close()
    assert read_rows(tmp_path / "a.db") == []
