"""The audit log of ``so8t serve`` (SQLite, WAL), keyed, with anchors outside it; ``so8t audit verify``.

One row per request, whatever became of it: keyed digests of what went in and out (never the text
itself), the safety verdict, the latency, and a chain: each row stores the previous row's MAC and its
own, HMAC-SHA256 under the server's key over a canonical serialization of every other column. Without
the key nobody can edit, insert, append or rehash a row undetected, nor test guessed prompts against
the digests. The key lives in its own file (``--audit-key-file``, created with mode 0600 on first use),
never in the database; the database records only the key's id, so a wrong key is told apart from
tampering (the id is not MACed: a key whose id differs yet verifies the first row is the log's key, and
the id was edited).

Deleting rows from the end (or all of them) leaves a valid shorter chain, and an attacker who also has
the key can rewrite and re-MAC everything. Anchors catch both: the head (row count and MAC of the last
row) is appended to a file outside the database every ``anchor_every`` rows, when the log opens and
when it closes, and logged; ``verify --anchors FILE`` (or ``--expect-head N:MAC`` noted anywhere)
checks the log still holds each anchored head. The log refuses to open when it no longer holds the
latest head of its anchors file, unless told to accept that (``accept_truncated``); the acceptance is
then itself a row of the chain (outcome ``truncation_accepted``, the mismatch in ``error``), so the
MACs keep it, and ``verify`` names it beside the anchors that no longer hold.

Reading (``read_rows``, ``verify``) creates nothing beside the database: SQLite's read-only mode would
leave empty ``-wal`` and ``-shm`` files next to a WAL database whose writer closed.

Format: ``so8t-audit/2``. A database from an older so8t (format 1, unkeyed SHA-256 chain) is refused by
both the server and ``verify`` with a message saying so: it cannot be made keyed after the fact.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import shutil
import sqlite3
import stat
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from ..durable import fsync_directory
from . import AuditFileError
from .anchors import anchor_mismatch, append_anchor, read_anchors

FORMAT = "so8t-audit/2 hmac-sha256"
GENESIS_MAC = "0" * 64  # prev_mac of the first row; the head of an empty log
TABLE = "audit_log"
META_TABLE = "audit_meta"
OUTCOMES = ("answered", "escalated", "denied", "rejected", "cancelled", "error")
# Not a request: the server was told to serve on a log that no longer held its anchored head.
TRUNCATION_ACCEPTED = "truncation_accepted"
KEY_BYTES = 32
DEFAULT_ANCHOR_EVERY = 10

log = logging.getLogger("so8t.audit")


def default_files(database: str | Path) -> tuple[Path, Path]:
    """The key file and the anchors file of ``database`` unless named otherwise: beside it, as
    ``DATABASE.key`` and ``DATABASE.anchors`` (where ``so8t serve`` creates them)."""
    return Path(f"{database}.key"), Path(f"{database}.anchors")


@dataclass
class AuditRecord:
    """What the server knows about one request. ``rejected``: the request never reached the model
    (bad input 400/404/413/422, a full queue 503); ``cancelled``: the client went away before its
    answer (499); ``error``: it failed on the way (500). Digests are AuditKey.digest of the text."""

    request_id: str
    outcome: str
    status: int
    latency_ms: float
    prompt_hmac: str | None = None
    thinking_hmac: str | None = None
    answer_hmac: str | None = None
    safety_label: str | None = None
    safety_confidence: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class AuditRow:
    """A stored row: the record plus its position, time and chain MACs."""

    seq: int
    time: str  # UTC, ISO 8601 with microseconds
    request_id: str
    outcome: str
    status: int
    latency_ms: float
    prompt_hmac: str | None
    thinking_hmac: str | None
    answer_hmac: str | None
    safety_label: str | None
    safety_confidence: float | None
    error: str | None
    prev_mac: str
    row_mac: str

    def chained_values(self) -> dict:
        return {name: value for name, value in asdict(self).items() if name != "row_mac"}


COLUMNS = tuple(field.name for field in fields(AuditRow))
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    seq INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    request_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    prompt_hmac TEXT,
    thinking_hmac TEXT,
    answer_hmac TEXT,
    safety_label TEXT,
    safety_confidence REAL,
    error TEXT,
    prev_mac TEXT NOT NULL,
    row_mac TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS {META_TABLE} (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class AuditKey:
    """The server's secret: MACs the chain and keys the text digests."""

    def __init__(self, secret: bytes):
        if len(secret) < 16:
            raise ValueError("an audit key has at least 16 bytes")
        self._secret = secret

    @classmethod
    def generate(cls) -> AuditKey:
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def load(cls, path: str | Path) -> AuditKey:
        """The key in ``path`` (hex); refuses a file that others can read."""
        path = Path(path)
        try:
            mode = path.stat().st_mode
            text = path.read_text().strip()
        except FileNotFoundError:
            raise AuditFileError(f"key file {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as error:
            raise AuditFileError(f"key file {path}: unreadable ({error})") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise AuditFileError(f"key file {path}: readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise AuditFileError(f"key file {path}: expected at least 32 hex digits") from None

    @classmethod
    def load_or_create(cls, path: str | Path) -> tuple[AuditKey, bool]:
        """The key in ``path``, or a new one written there with mode 0600; True when it was created.

        The key is written and fsynced under a temporary name, then hard-linked into place (and the
        directory fsynced): ``path`` never holds a partial key, a crash cannot lose a key whose rows
        are already durable, and of servers starting at once the first link wins and the others load
        its key."""
        path = Path(path)
        if path.exists():
            return cls.load(path), False
        key = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp creates the file with mode 0600: never readable by others.
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(key._secret.hex() + "\n")
                file.flush()
                os.fsync(file.fileno())
            try:
                os.link(temporary, path)  # atomic; never replaces a key already there
            except FileExistsError:  # another server created it first
                return cls.load(path), False
        finally:
            os.unlink(temporary)
        fsync_directory(path.parent)
        return key, True

    @property
    def key_id(self) -> str:
        """Names the key in the database without revealing it."""
        return hmac.new(self._secret, b"so8t audit key id", hashlib.sha256).hexdigest()[:16]

    def digest(self, text: str) -> str:
        """HMAC-SHA256 of the UTF-8 text: without the key, a guessed prompt cannot be checked against it."""
        return hmac.new(self._secret, b"text\x00" + text.encode("utf-8"), hashlib.sha256).hexdigest()

    def mac(self, values: dict) -> str:
        """HMAC-SHA256 of a row's chained columns as canonical JSON (sorted keys, no spaces, ASCII).
        Floats go through repr, which SQLite's 8-byte REAL gives back unchanged."""
        canonical = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        return hmac.new(self._secret, b"row\x00" + canonical.encode("ascii"), hashlib.sha256).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_format(connection: sqlite3.Connection, path: Path, key: AuditKey | None) -> None:
    """Refuses an older (unkeyed) log, a log of another key, or a database that is something else."""
    tables = _tables(connection)
    if TABLE in tables:
        columns = {row[1] for row in connection.execute(f"PRAGMA table_info({TABLE})")}
        if "row_hash" in columns:
            raise AuditFileError(f"{path}: an unkeyed audit log from an older so8t (format 1, plain SHA-256 "
                                 "chain); it cannot be keyed after the fact: serve with a new --audit-db")
        if META_TABLE not in tables or not set(COLUMNS) <= columns:
            raise AuditFileError(f"{path}: not a so8t audit log (unexpected columns)")
    meta = dict(connection.execute(f"SELECT name, value FROM {META_TABLE}")) if META_TABLE in tables else {}
    if meta and meta.get("format") != FORMAT:
        raise AuditFileError(f"{path}: audit log format {meta.get('format')!r}, this so8t reads {FORMAT!r}")
    if key is not None and meta.get("key_id") not in (None, key.key_id):
        raise AuditFileError(f"{path}: written with another key (key id {meta['key_id']}, this key's is {key.key_id})")


class AuditLog:
    """Appends chained rows; safe to share between threads (and between processes, through SQLite's
    write lock: the previous MAC is read inside the same write transaction).

    Opening checks that the log still holds the latest head of ``anchors`` (a log that lost rows from
    its end, or was rewritten, since): if not, AuditFileError, and nothing is written, unless
    ``accept_truncated``, which records the mismatch as a row of the chain and goes on."""

    def __init__(self, path: str | Path, key: AuditKey, anchors: str | Path | None = None,
                 anchor_every: int = DEFAULT_ANCHOR_EVERY, accept_truncated: bool = False):
        self.path = Path(path)
        self.key = key
        self.anchors = Path(anchors) if anchors is not None else None
        self.anchor_every = anchor_every
        mismatch = check_anchors(self.path, self.anchors, key) if self.anchors is not None else None
        if mismatch is not None and not accept_truncated:
            raise AuditFileError(f"{mismatch}; --audit-accept-truncated serves on it anyway and records that in the log")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are the explicit BEGIN IMMEDIATE … COMMIT below.
        self._connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        try:
            _check_format(self._connection, self.path, key)
            mode = self._connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"{self.path}: cannot switch to WAL mode (got {mode})")
            self._connection.execute("PRAGMA synchronous=FULL")  # an acknowledged request's row survives a crash
            self._connection.executescript(SCHEMA)
            self._connection.execute(f"INSERT OR IGNORE INTO {META_TABLE} VALUES ('format', ?), ('key_id', ?)",
                                     (FORMAT, key.key_id))
        except BaseException:
            self._connection.close()
            raise
        if mismatch is not None:
            row = self._append(AuditRecord("-", TRUNCATION_ACCEPTED, 0, 0.0,
                                           error=f"opened on a log that no longer held its anchors: {mismatch}"))
            log.warning("audit log %s: %s; serving on it as asked, recorded as row %d", self.path, mismatch, row.seq)
        self.write_anchor()

    def digest(self, text: str) -> str:
        return self.key.digest(text)

    def append(self, record: AuditRecord) -> AuditRow:
        if record.outcome not in OUTCOMES:
            raise ValueError(f"outcome {record.outcome!r}: expected one of {', '.join(OUTCOMES)}")
        return self._append(record)

    def _append(self, record: AuditRecord) -> AuditRow:
        with self._lock:
            cursor = self._connection.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                last = cursor.execute(f"SELECT seq, row_mac FROM {TABLE} ORDER BY seq DESC LIMIT 1").fetchone()
                seq, prev_mac = (last[0] + 1, last[1]) if last else (1, GENESIS_MAC)
                values = {"seq": seq, "time": _now(), **asdict(record), "prev_mac": prev_mac}
                values["latency_ms"] = float(values["latency_ms"])
                confidence = values["safety_confidence"]
                # JSON (the row MAC) has no NaN: a confidence that is not a number is no confidence.
                values["safety_confidence"] = float(confidence) if confidence is not None and math.isfinite(confidence) else None
                row = AuditRow(**values, row_mac=self.key.mac(values))
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
        if row.seq % self.anchor_every == 0:
            self.write_anchor((row.seq, row.row_mac))
        return row

    def head(self) -> tuple[int, str]:
        """(rows, MAC of the last row)."""
        with self._lock:
            last = self._connection.execute(f"SELECT seq, row_mac FROM {TABLE} ORDER BY seq DESC LIMIT 1").fetchone()
        return (last[0], last[1]) if last else (0, GENESIS_MAC)

    def write_anchor(self, head: tuple[int, str] | None = None) -> None:
        """Appends the head to the anchors file (fsynced) and logs it. A failure is logged, not raised:
        the rows are safe in the database, only this anchor is missing."""
        rows, mac = head if head is not None else self.head()
        log.info("audit anchor: %s rows=%d head=%s", self.path, rows, mac)
        if self.anchors is None:
            return
        try:
            append_anchor(self.anchors, _now(), rows, mac)
        except OSError:
            log.exception("cannot append the audit anchor to %s", self.anchors)

    def close(self) -> None:
        self.write_anchor()
        with self._lock:
            self._connection.close()


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection that reads the log as it stands, rows still in its -wal file included, and creates
    nothing beside it (SQLite's ``mode=ro`` alone creates -wal and -shm files for a WAL database whose
    writer closed, and leaves them behind)."""
    wal, index = Path(f"{path}-wal"), Path(f"{path}-shm")
    with contextlib.ExitStack() as cleanup:
        if not wal.exists():
            # A writer keeps the -wal file while it has the log open: without one, the file is the whole log.
            query = "mode=ro&immutable=1"
        elif index.exists():
            # A running writer's, or a killed one's: read through its WAL index, as another reader would.
            query = "mode=ro"
        else:
            # A -wal without its index (copied without it): SQLite would create the index beside it, so a
            # copy of both is read instead.
            directory = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="so8t-audit-"))
            copy = Path(directory) / path.name
            shutil.copyfile(path, copy)
            shutil.copyfile(wal, f"{copy}-wal")
            path, query = copy, "mode=ro"
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?{query}", uri=True)
        cleanup.callback(connection.close)
        yield connection


def _tables(connection: sqlite3.Connection) -> set[str]:
    return {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def check_anchors(database: str | Path, anchors: str | Path, key: AuditKey | None = None) -> str | None:
    """Why ``database`` no longer holds the latest head in ``anchors`` (rows deleted from its end, the
    file deleted, a rewrite), or None when it does or there is no anchor yet. Reads both and writes
    nothing; raises AuditFileError for a file that is not a (current) audit log, or one of another key."""
    database, anchors = Path(database), Path(anchors)
    latest = read_anchors(anchors)[-1:] if anchors.exists() else []
    if not latest:
        return None
    if not database.exists():  # deleted with all its rows
        return anchor_mismatch(latest[0], 0, lambda rows: GENESIS_MAC)
    with _read_only(database) as connection:
        _check_format(connection, database, key)
        if TABLE not in _tables(connection):
            return anchor_mismatch(latest[0], 0, lambda rows: GENESIS_MAC)
        count = connection.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0]

        def row_mac(seq: int) -> str | None:
            if seq == 0:
                return GENESIS_MAC
            row = connection.execute(f"SELECT row_mac FROM {TABLE} WHERE seq = ?", (seq,)).fetchone()
            return row[0] if row else None

        return anchor_mismatch(latest[0], count, row_mac)


def read_rows(path: str | Path) -> list[AuditRow]:
    """Every row in chain order; raises AuditFileError for a file that is not a (current) audit log."""
    path = Path(path)
    if not path.is_file():
        raise AuditFileError(f"{path}: no such file")
    try:
        with _read_only(path) as connection:
            _check_format(connection, path, None)
            cursor = connection.execute(f"SELECT {', '.join(COLUMNS)} FROM {TABLE} ORDER BY seq")
            return [AuditRow(*values) for values in cursor]
    except sqlite3.DatabaseError as error:
        raise AuditFileError(f"{path}: not a so8t audit log ({error})") from None


def read_key_id(path: str | Path) -> str | None:
    try:
        with _read_only(Path(path)) as connection:
            row = connection.execute(f"SELECT value FROM {META_TABLE} WHERE name = 'key_id'").fetchone()
    except sqlite3.DatabaseError:
        row = None
    return row[0] if row else None
