"""The keyed audit log: WAL, the HMAC chain over every column, each kind of tampering found (edits,
deletions, a forged append, a rehashed rewrite without the key, and — through the anchors — truncation,
deletion of everything and a rewrite with the key), the key file, the refused format-1 log, concurrent
writers, and ``so8t audit verify`` exit statuses and messages."""

import hashlib
import logging
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from so8t.audit.anchors import read_anchors
from so8t.audit.log import (
    GENESIS_MAC,
    AuditFileError,
    AuditKey,
    AuditLog,
    AuditRecord,
    default_files,
    read_rows,
)
from so8t.audit.verify import verify_chain
from so8t.commands.main import main


def record(index: int, **overrides) -> AuditRecord:
    values = dict(request_id=f"req-{index}", outcome="answered", status=200, latency_ms=10.5 + index,
                  prompt_hmac="a" * 64, thinking_hmac="b" * 64, answer_hmac="c" * 64,
                  safety_label="ALLOW", safety_confidence=0.875)
    return AuditRecord(**{**values, **overrides})


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "audit.key"
    AuditKey.load_or_create(path)
    return path


@pytest.fixture
def database(tmp_path, key_file):
    path = tmp_path / "audit.db"
    log = AuditLog(path, AuditKey.load(key_file), tmp_path / "anchors", anchor_every=2)
    log.append(record(1))
    log.append(record(2, outcome="denied", safety_label="DENY", thinking_hmac=None, answer_hmac=None))
    log.append(record(3, outcome="rejected", status=422, prompt_hmac=None, thinking_hmac=None,
                      answer_hmac=None, safety_label=None, safety_confidence=None))
    log.append(record(4, outcome="error", status=500, error="RuntimeError"))
    log.append(record(5, outcome="cancelled", status=499))
    log.close()
    return path


def execute(path, statement, *parameters):
    connection = sqlite3.connect(path)
    with connection:
        connection.execute(statement, parameters)
    connection.close()


def check(database, key_file, anchors=()):
    return verify_chain(read_rows(database), AuditKey.load(key_file), anchors)


def test_rows_are_chained_by_macs_in_wal_mode(database, key_file):
    connection = sqlite3.connect(database)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    connection.close()
    rows = read_rows(database)
    key = AuditKey.load(key_file)
    assert [row.seq for row in rows] == [1, 2, 3, 4, 5]
    assert rows[0].prev_mac == GENESIS_MAC
    assert all(row.prev_mac == before.row_mac for before, row in zip(rows, rows[1:]))
    assert all(row.row_mac == key.mac(row.chained_values()) for row in rows)
    assert [row.outcome for row in rows] == ["answered", "denied", "rejected", "error", "cancelled"]
    result = verify_chain(rows, key)
    assert result.ok and result.rows == 5 and result.head_mac == rows[-1].row_mac
    assert not verify_chain(rows, AuditKey.generate()).ok  # another key verifies nothing


def test_the_key_file_is_private_and_never_in_the_database(database, key_file, tmp_path):
    assert key_file.stat().st_mode & 0o777 == 0o600
    secret = key_file.read_text().strip()
    assert len(bytes.fromhex(secret)) == 32 and secret.encode() not in database.read_bytes()
    assert AuditKey.load_or_create(key_file)[1] is False  # the second use reads it
    os.chmod(key_file, 0o644)
    with pytest.raises(AuditFileError, match="readable by others"):
        AuditKey.load(key_file)
    with pytest.raises(AuditFileError, match="written with another key"):
        AuditLog(database, AuditKey.generate())


def test_digests_are_keyed():
    key, other = AuditKey.generate(), AuditKey.generate()
    prompt = "How do I bake bread?"
    assert key.digest(prompt) == key.digest(prompt) != other.digest(prompt)
    assert key.digest(prompt) != hashlib.sha256(prompt.encode()).hexdigest()  # guessing needs the key


@pytest.mark.parametrize(
    ("tamper", "first_bad"),
    [
        ("UPDATE audit_log SET latency_ms = 1.0 WHERE seq = 3", 3),
        ("UPDATE audit_log SET safety_label = 'ALLOW' WHERE seq = 2", 2),
        ("UPDATE audit_log SET safety_confidence = 0.87500001 WHERE seq = 5", 5),
        ("UPDATE audit_log SET time = '2020-01-01T00:00:00.000000Z' WHERE seq = 1", 1),
        ("UPDATE audit_log SET error = NULL WHERE seq = 4", 4),
        ("UPDATE audit_log SET request_id = 'req-x' WHERE seq = 1", 1),
        ("DELETE FROM audit_log WHERE seq = 2", 3),
        ("DELETE FROM audit_log WHERE seq = 1", 2),
        ("UPDATE audit_log SET answer_hmac = 'd' WHERE seq = 4", 4),
        ("UPDATE audit_log SET seq = 7 WHERE seq = 5", 7),
    ],
)
def test_tampering_is_found_at_the_first_bad_row(database, key_file, tamper, first_bad):
    execute(database, tamper)
    result = check(database, key_file)
    assert not result.ok and result.first_bad_seq == first_bad


def test_a_rehashed_rewrite_without_the_key_is_found_at_the_edited_row(database, key_file):
    rows = read_rows(database)
    guessed = AuditKey.generate()  # anything but the server's key: a plain SHA-256 fails the same way
    previous = rows[0].row_mac
    for row in rows[1:]:  # rewrite row 2 and re-chain everything after it
        values = {**row.chained_values(), "safety_label": "ALLOW" if row.seq == 2 else row.safety_label,
                  "prev_mac": previous}
        previous = guessed.mac(values)
        execute(database, "UPDATE audit_log SET safety_label = ?, prev_mac = ?, row_mac = ? WHERE seq = ?",
                values["safety_label"], values["prev_mac"], previous, row.seq)
    result = check(database, key_file)
    assert result.first_bad_seq == 2 and "under this key" in result.reason


def test_a_forged_append_is_found(database, key_file):
    rows = read_rows(database)
    forged = {**rows[-1].chained_values(), "seq": 6, "request_id": "forged", "prev_mac": rows[-1].row_mac}
    mac = hashlib.sha256(repr(forged).encode()).hexdigest()
    execute(database, f"INSERT INTO audit_log VALUES ({', '.join('?' * 14)})", *forged.values(), mac)
    result = check(database, key_file)
    assert result.first_bad_seq == 6 and result.first_bad_request_id == "forged"


def test_anchors_find_truncation_deletion_of_everything_and_a_rewrite_with_the_key(database, key_file, tmp_path):
    anchors = read_anchors(tmp_path / "anchors")
    # Opened (0 rows), every 2 rows (2, 4), closed (5).
    assert [anchor.rows for anchor in anchors] == [0, 2, 4, 5]
    assert check(database, key_file, anchors).ok

    execute(database, "DELETE FROM audit_log WHERE seq = 5")  # truncation: a valid shorter chain
    assert check(database, key_file).ok
    result = check(database, key_file, anchors)
    assert not result.ok and "saw 5 rows, the log has 4" in result.reason

    execute(database, "DELETE FROM audit_log")  # everything
    assert check(database, key_file).ok and check(database, key_file).rows == 0
    assert "saw 2 rows, the log has 0" in check(database, key_file, anchors).reason


def test_a_rewrite_with_the_stolen_key_is_found_by_the_anchors(database, key_file, tmp_path):
    key = AuditKey.load(key_file)
    rows = read_rows(database)
    previous = rows[0].row_mac
    for row in rows[1:]:
        values = {**row.chained_values(), "prev_mac": previous}
        if row.seq == 2:
            values["safety_label"] = "ALLOW"
        previous = key.mac(values)
        execute(database, "UPDATE audit_log SET safety_label = ?, prev_mac = ?, row_mac = ? WHERE seq = ?",
                values["safety_label"], values["prev_mac"], previous, row.seq)
    assert check(database, key_file).ok  # the chain alone cannot tell
    result = check(database, key_file, read_anchors(tmp_path / "anchors"))
    assert not result.ok and result.first_bad_seq == 2 and "rewritten with the key" in result.reason


def test_anchors_are_logged(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="so8t.audit"):
        log = AuditLog(tmp_path / "a.db", AuditKey.generate(), tmp_path / "anchors", anchor_every=3)
        rows = [log.append(record(index)) for index in range(3)]
        log.close()
    assert f"rows=3 head={rows[-1].row_mac}" in caplog.text


def test_a_format_1_log_is_refused_with_a_clear_message(tmp_path, key_file, capsys):
    legacy = tmp_path / "legacy.db"
    execute(legacy, "CREATE TABLE audit_log (seq INTEGER PRIMARY KEY, time TEXT, request_id TEXT, outcome TEXT, "
                    "status INTEGER, latency_ms REAL, prompt_sha256 TEXT, thinking_sha256 TEXT, answer_sha256 TEXT, "
                    "safety_label TEXT, safety_confidence REAL, error TEXT, prev_hash TEXT, row_hash TEXT)")
    with pytest.raises(AuditFileError, match="unkeyed audit log from an older so8t"):
        AuditLog(legacy, AuditKey.load(key_file))
    assert main(["audit", "verify", str(legacy), "--key-file", str(key_file)]) == 2
    assert "cannot be keyed after the fact" in capsys.readouterr().err


def test_verify_command_exit_status_and_messages(database, key_file, tmp_path, capsys):
    key, anchors = ["--key-file", str(key_file)], ["--anchors", str(tmp_path / "anchors")]
    assert main(["audit", "verify", str(database), *key, *anchors]) == 0
    out = capsys.readouterr().out
    head = read_rows(database)[-1].row_mac
    assert f"5 rows, chain intact, 4 anchored head(s) held, head 5:{head}" in out
    assert main(["audit", "verify", str(database), *key]) == 0
    assert "no anchors given" in capsys.readouterr().out
    assert main(["audit", "verify", str(database), *key, "--expect-head", f"5:{head}"]) == 0
    capsys.readouterr()

    execute(database, "DELETE FROM audit_log WHERE seq >= 4")
    assert main(["audit", "verify", str(database), *key, "--expect-head", f"5:{head}"]) == 1
    assert "saw 5 rows, the log has 3 (rows were deleted from the end)" in capsys.readouterr().err
    execute(database, "UPDATE audit_log SET answer_hmac = ? WHERE seq = 1", "0" * 64)
    assert main(["audit", "verify", str(database), *key]) == 1
    assert "chain broken at row 1 (request req-1)" in capsys.readouterr().err

    other_key = tmp_path / "other.key"
    AuditKey.load_or_create(other_key)
    assert main(["audit", "verify", str(database), "--key-file", str(other_key)]) == 2
    assert "written with another key" in capsys.readouterr().err
    not_a_database = tmp_path / "notes.db"
    not_a_database.write_text("hello")
    assert main(["audit", "verify", str(not_a_database), *key]) == 2
    assert "not a so8t audit log" in capsys.readouterr().err
    assert main(["audit", "verify", str(tmp_path / "missing.db"), *key]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["audit", "verify", str(database), *key, "--expect-head", "five"])


def test_an_empty_log_verifies(tmp_path, key_file, capsys):
    AuditLog(tmp_path / "empty.db", AuditKey.load(key_file)).close()
    assert main(["audit", "verify", str(tmp_path / "empty.db"), "--key-file", str(key_file)]) == 0
    assert "0 rows" in capsys.readouterr().out


def test_threads_and_two_connections_append_one_chain(tmp_path):
    path, key = tmp_path / "shared.db", AuditKey.generate()
    logs = [AuditLog(path, key), AuditLog(path, key)]  # two writers, as two server processes would be

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
    assert verify_chain(rows, key).ok


def test_unknown_outcome_is_refused(tmp_path):
    log = AuditLog(tmp_path / "a.db", AuditKey.generate())
    with pytest.raises(ValueError, match="outcome"):
        log.append(record(1, outcome="maybe"))
    log.close()
    assert read_rows(tmp_path / "a.db") == []


def test_servers_creating_the_key_at_once_all_end_with_the_same_complete_key(tmp_path, monkeypatch):
    path = tmp_path / "keys" / "audit.key"
    barrier = threading.Barrier(8)
    keys, errors = [], []

    def start():
        barrier.wait()
        try:
            keys.append(AuditKey.load_or_create(path))
        except Exception as error:  # noqa: BLE001 (any failure is what the test looks for)
            errors.append(error)

    for _ in range(5):
        path.unlink(missing_ok=True)
        keys.clear()
        threads = [threading.Thread(target=start) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == [] and len(keys) == 8
        assert {key.key_id for key, _ in keys} == {AuditKey.load(path).key_id}
        assert sum(created for _, created in keys) == 1
    assert sorted(os.listdir(path.parent)) == ["audit.key"] and path.stat().st_mode & 0o777 == 0o600

    # Deterministically: another server's key lands while this one writes its own; this one loads it.
    path.unlink()
    theirs, generate = AuditKey.generate(), AuditKey.generate

    def racing_generate():
        path.write_text(theirs._secret.hex() + "\n")
        path.chmod(0o600)
        return generate()

    monkeypatch.setattr(AuditKey, "generate", staticmethod(racing_generate))
    key, created = AuditKey.load_or_create(path)
    assert (key.key_id, created) == (theirs.key_id, False)


def test_a_created_key_file_and_its_directory_are_fsynced(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync

    def recording_fsync(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        return fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    path = tmp_path / "audit.key"
    AuditKey.load_or_create(path)
    assert synced[-1] == str(tmp_path) and len(synced) == 2  # the key's data (temporary name), then the directory
    assert synced[0].startswith(str(tmp_path / ".audit.key."))


def test_an_edited_key_id_is_tampering_not_another_key(database, key_file, tmp_path, capsys):
    execute(database, "UPDATE audit_meta SET value = ? WHERE name = 'key_id'", "0123456789abcdef")
    assert main(["audit", "verify", str(database), "--key-file", str(key_file)]) == 1
    assert "tampered: audit_meta's key id 0123456789abcdef" in capsys.readouterr().err
    other_key = tmp_path / "other.key"
    AuditKey.load_or_create(other_key)
    assert main(["audit", "verify", str(database), "--key-file", str(other_key)]) == 2  # truly another key
    assert "written with another key" in capsys.readouterr().err


def served_log(directory, count: int = 5):
    """A log as ``so8t serve --audit-db DIR/audit.db`` leaves it: key and anchors beside it, closed."""
    database = directory / "audit.db"
    key_file, anchors = default_files(database)
    key, _ = AuditKey.load_or_create(key_file)
    log = AuditLog(database, key, anchors, anchor_every=2)
    for index in range(count):
        log.append(record(index))
    log.close()
    return database


def test_verify_defaults_to_the_key_and_anchors_beside_the_database_and_says_so(tmp_path, capsys):
    database = served_log(tmp_path)
    head = read_rows(database)[-1].row_mac
    assert main(["audit", "verify", str(database)]) == 0
    captured = capsys.readouterr()
    assert f"5 rows, chain intact, 4 anchored head(s) held, head 5:{head}" in captured.out
    assert f"key file {database}.key (beside the database" in captured.err
    assert f"anchors {database}.anchors (beside the database" in captured.err
    assert main(["audit", "verify", str(database), "--expect-head", f"5:{head}"]) == 0  # not the anchors file
    assert "1 anchored head(s) held" in capsys.readouterr().out

    Path(f"{database}.anchors").unlink()
    assert main(["audit", "verify", str(database)]) == 0
    assert "no anchors given" in capsys.readouterr().out
    Path(f"{database}.key").rename(tmp_path / "elsewhere.key")
    assert main(["audit", "verify", str(database)]) == 2
    assert f"no --key-file given, and no {database}.key beside the database" in capsys.readouterr().err
    assert main(["audit", "verify", str(database), "--key-file", str(tmp_path / "elsewhere.key")]) == 0


def test_verify_creates_nothing_beside_a_closed_log(tmp_path, capsys):
    database = served_log(tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert before == ["audit.db", "audit.db.anchors", "audit.db.key"]  # the writer closed: no -wal, no -shm
    assert main(["audit", "verify", str(database)]) == 0
    execute(database, "DELETE FROM audit_log WHERE seq = 5")  # exit 1, and 2, read the log just the same
    assert main(["audit", "verify", str(database)]) == 1
    assert main(["audit", "verify", str(database), "--key-file", str(tmp_path / "missing.key")]) == 2
    assert sorted(os.listdir(tmp_path)) == before


WRITE_AND_DIE = """
import os, sys
from so8t.audit.log import AuditKey, AuditLog, AuditRecord
log = AuditLog(sys.argv[1], AuditKey.load(sys.argv[1] + ".key"), sys.argv[1] + ".anchors")
for index in range(3):
    log.append(AuditRecord(f"late-{index}", "answered", 200, 1.0))
os._exit(0)  # killed: SQLite never checkpoints, the rows stay in the -wal file
"""


def test_verify_reads_rows_only_in_the_wal_of_a_killed_writer_and_creates_nothing(tmp_path, capsys):
    database = served_log(tmp_path)
    subprocess.run([sys.executable, "-c", WRITE_AND_DIE, str(database)], check=True, timeout=120)
    before = sorted(os.listdir(tmp_path))
    assert {"audit.db-wal", "audit.db-shm"} <= set(before)
    without_wal = sqlite3.connect(f"{database.as_uri()}?mode=ro&immutable=1", uri=True)
    assert without_wal.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0] == 5  # the file alone
    without_wal.close()
    rows = read_rows(database)
    assert [row.request_id for row in rows[5:]] == ["late-0", "late-1", "late-2"]
    assert main(["audit", "verify", str(database), "--expect-head", f"8:{rows[-1].row_mac}"]) == 0
    assert "8 rows, chain intact" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == before

    Path(f"{database}-shm").unlink()  # a copy of the log and its -wal, without the WAL index
    assert [row.request_id for row in read_rows(database)] == [row.request_id for row in rows]
    assert main(["audit", "verify", str(database), "--expect-head", f"8:{rows[-1].row_mac}"]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(set(before) - {"audit.db-shm"})


def files_of(directory) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.mark.parametrize("damage", ["truncated", "rewritten with the key", "deleted"])
def test_a_log_that_lost_its_anchored_head_is_refused_and_nothing_is_written(tmp_path, damage):
    database = served_log(tmp_path)
    key_file, anchors = default_files(database)
    key = AuditKey.load(key_file)
    if damage == "truncated":
        execute(database, "DELETE FROM audit_log WHERE seq >= 4")
        reason = "audit.db.anchors:4 saw 5 rows, the log has 3 (rows were deleted from the end)"
    elif damage == "rewritten with the key":
        last = read_rows(database)[-1]
        forged = {**last.chained_values(), "safety_label": "DENY"}
        execute(database, "UPDATE audit_log SET safety_label = 'DENY', row_mac = ? WHERE seq = 5", key.mac(forged))
        reason = "audit.db.anchors:4: row 5 is not the row anchored then (the log was rewritten with the key)"
    else:
        database.unlink()
        reason = "audit.db.anchors:4 saw 5 rows, the log has 0 (rows were deleted from the end)"
    before = files_of(tmp_path)
    with pytest.raises(AuditFileError) as refused:
        AuditLog(database, key, anchors)
    assert str(refused.value) == f"{reason}; --audit-accept-truncated serves on it anyway and records that in the log"
    assert files_of(tmp_path) == before


def test_accepting_a_truncated_log_is_a_row_of_the_chain_that_verify_names(tmp_path, capsys, caplog):
    database = served_log(tmp_path)
    key_file, anchors = default_files(database)
    key = AuditKey.load(key_file)
    execute(database, "DELETE FROM audit_log WHERE seq >= 4")
    with caplog.at_level(logging.WARNING, logger="so8t.audit"):
        log = AuditLog(database, key, anchors, accept_truncated=True)
    log.append(record(9))
    log.close()
    assert "saw 5 rows, the log has 3" in caplog.text and "recorded as row 4" in caplog.text
    rows = read_rows(database)
    accepted = rows[3]
    assert (accepted.seq, accepted.request_id, accepted.outcome, accepted.status) == (4, "-", "truncation_accepted", 0)
    assert accepted.error == ("opened on a log that no longer held its anchors: audit.db.anchors:4 saw 5 rows, "
                              "the log has 3 (rows were deleted from the end)")
    assert verify_chain(rows, key).ok and [row.request_id for row in rows[4:]] == ["req-9"]
    AuditLog(database, key, anchors).close()  # the latest anchor is the accepted log's: it opens again

    assert main(["audit", "verify", str(database)]) == 1  # the rows the older anchors saw are gone all the same
    assert (f"chain broken at row 4 (request -): audit.db.anchors:3: row 4 is not the row anchored then (rows "
            f"were lost before row 4, where the server was told to serve on the log anyway, at {accepted.time})"
            ) in capsys.readouterr().err
    assert main(["audit", "verify", str(database), "--expect-head", f"5:{rows[-1].row_mac}"]) == 0
