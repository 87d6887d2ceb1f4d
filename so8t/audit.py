"""The audit log of ``so8t serve`` (SQLite, WAL) and ``so8t audit verify DB``.

One row per /think request, whatever became of it: the hashes of what went in and out (never the text
itself), the safety verdict, the latency, and a hash chain: each row stores the previous row's hash and
its own, SHA-256 over a canonical serialization of every other column, so editing, inserting or
deleting a row breaks the chain at that row. Deleting rows from the end leaves a valid shorter chain:
``verify`` prints the head hash, to be noted somewhere the database's owner cannot rewrite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sqlite3
import sys
import threading
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

GENESIS_HASH = "0" * 64  # prev_hash of the first row
TABLE = "audit_log"
OUTCOMES = ("answered", "escalated", "denied", "rejected", "cancelled", "error")


@dataclass
class AuditRecord:
    """What the server knows about one request. ``rejected``: the request never reached the model
    (bad input 413/422, a full queue 503); ``cancelled``: the client went away before its answer
    (499); ``error``: it failed on the way (500)."""

    request_id: str
    outcome: str
    status: int
    latency_ms: float
    prompt_sha256: str | None = None
    thinking_sha256: str | None = None
    answer_sha256: str | None = None
    safety_label: str | None = None
    safety_confidence: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class AuditRow:
    """A stored row: the record plus its position, time and chain hashes."""

    seq: int
    time: str  # UTC, ISO 8601 with microseconds
    request_id: str
    outcome: str
    status: int
    latency_ms: float
    prompt_sha256: str | None
    thinking_sha256: str | None
    answer_sha256: str | None
    safety_label: str | None
    safety_confidence: float | None
    error: str | None
    prev_hash: str
    row_hash: str

    def expected_hash(self) -> str:
        return row_hash({name: value for name, value in asdict(self).items() if name != "row_hash"})


COLUMNS = tuple(field.name for field in fields(AuditRow))
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    seq INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    request_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    prompt_sha256 TEXT,
    thinking_sha256 TEXT,
    answer_sha256 TEXT,
    safety_label TEXT,
    safety_confidence REAL,
    error TEXT,
    prev_hash TEXT NOT NULL,
    row_hash TEXT NOT NULL
)
"""


def row_hash(values: dict) -> str:
    """SHA-256 of the canonical JSON of a row's columns (all but row_hash): sorted keys, no spaces,
    ASCII only. Floats go through repr, which SQLite's 8-byte REAL gives back unchanged."""
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AuditLog:
    """Appends chained rows; safe to share between threads (and between processes, through SQLite's
    write lock: the previous hash is read inside the same write transaction)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are the explicit BEGIN IMMEDIATE … COMMIT below.
        self._connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        mode = self._connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(f"{self.path}: cannot switch to WAL mode (got {mode})")
        self._connection.execute("PRAGMA synchronous=FULL")  # an acknowledged request's row survives a crash
        self._connection.execute(SCHEMA)

    def append(self, record: AuditRecord) -> AuditRow:
        if record.outcome not in OUTCOMES:
            raise ValueError(f"outcome {record.outcome!r}: expected one of {', '.join(OUTCOMES)}")
        with self._lock:
            cursor = self._connection.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                last = cursor.execute(f"SELECT seq, row_hash FROM {TABLE} ORDER BY seq DESC LIMIT 1").fetchone()
                seq, prev_hash = (last[0] + 1, last[1]) if last else (1, GENESIS_HASH)
                values = {"seq": seq, "time": _now(), **asdict(record), "prev_hash": prev_hash}
                values["latency_ms"] = float(values["latency_ms"])
                confidence = values["safety_confidence"]
                # JSON (the row hash) has no NaN: a confidence that is not a number is no confidence.
                values["safety_confidence"] = float(confidence) if confidence is not None and math.isfinite(confidence) else None
                row = AuditRow(**values, row_hash=row_hash(values))
                placeholders = ", ".join("?" for _ in COLUMNS)
                cursor.execute(f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({placeholders})",
                               [getattr(row, name) for name in COLUMNS])
                cursor.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (a full disk does): a second ROLLBACK would raise
                # "no transaction is active" and hide the real error.
                if self._connection.in_transaction:
                    cursor.execute("ROLLBACK")
                raise
        return row

    def close(self) -> None:
        with self._lock:
            self._connection.close()


def read_rows(path: str | Path) -> list[AuditRow]:
    """Every row in chain order; raises AuditFileError for a file that is not an audit log."""
    path = Path(path)
    if not path.is_file():
        raise AuditFileError(f"{path}: no such file")
    try:
        # Read-only: verifying must not create, migrate or checkpoint anything.
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            cursor = connection.execute(f"SELECT {', '.join(COLUMNS)} FROM {TABLE} ORDER BY seq")
            return [AuditRow(*values) for values in cursor]
        finally:
            connection.close()
    except sqlite3.DatabaseError as error:
        raise AuditFileError(f"{path}: not a so8t audit log ({error})") from None


class AuditFileError(Exception):
    """The file cannot be read as an audit log at all (as opposed to a chain that does not verify)."""


@dataclass(frozen=True)
class Verification:
    rows: int
    head_hash: str  # row_hash of the last row (GENESIS_HASH for an empty log)
    first_bad_seq: int | None = None
    first_bad_request_id: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.first_bad_seq is None


def verify_chain(rows: list[AuditRow]) -> Verification:
    """Walks the chain from the first row; stops at the first row whose position, link or hash is wrong."""
    prev_hash = GENESIS_HASH
    for position, row in enumerate(rows, start=1):
        reason = None
        if row.seq != position:
            reason = f"sequence number {row.seq} where {position} was expected (a row was deleted or inserted)"
        elif row.prev_hash != prev_hash:
            reason = "prev_hash does not match the previous row's hash (a row before it was removed or replaced)"
        else:
            try:
                expected = row.expected_hash()
            except (TypeError, ValueError) as error:  # e.g. a column edited to a type JSON cannot hold
                expected = f"unhashable: {error}"
            if row.row_hash != expected:
                reason = "row_hash does not match the row's contents (the row was edited)"
        if reason is not None:
            return Verification(len(rows), prev_hash, row.seq, row.request_id, reason)
        prev_hash = row.row_hash
    return Verification(len(rows), prev_hash)


# ---------------------------------------------------------------------------------------------
# so8t audit verify DB
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="audit_action", required=True, metavar="action")
    verify = actions.add_parser("verify", help="check the hash chain; name the first bad row (exit status 1)")
    verify.add_argument("database", type=Path, help="the SQLite file of so8t serve --audit-db")


def run(args: argparse.Namespace) -> int:
    try:
        result = verify_chain(read_rows(args.database))
    except AuditFileError as error:
        print(f"so8t audit: error: {error}", file=sys.stderr)
        return 2
    if not result.ok:
        print(f"so8t audit: {args.database}: chain broken at row {result.first_bad_seq} "
              f"(request {result.first_bad_request_id}): {result.reason}", file=sys.stderr)
        return 1
    print(f"so8t audit: {args.database}: {result.rows} rows, chain intact, head {result.head_hash}")
    return 0
