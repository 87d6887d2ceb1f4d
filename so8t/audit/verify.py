"""Verifying an audit log: walking its keyed chain, and checking the heads anchored outside it."""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from .log import GENESIS_MAC, AuditFileError, AuditKey, AuditRow


@dataclass(frozen=True)
class Anchor:
    rows: int
    head: str
    source: str  # where it came from, for messages: "anchors.txt:3" or "--expect-head"


def read_anchors(path: str | Path) -> list[Anchor]:
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise AuditFileError(f"anchors file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise AuditFileError(f"anchors file {path}: unreadable ({error})") from None
    anchors = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            anchors.append(Anchor(int(entry["rows"]), str(entry["head"]), f"{path.name}:{number}"))
        except (ValueError, KeyError, TypeError):
            raise AuditFileError(f"anchors file {path}:{number}: not an anchor line") from None
    return anchors


@dataclass(frozen=True)
class Verification:
    rows: int
    head_mac: str  # row_mac of the last row (GENESIS_MAC for an empty log)
    first_bad_seq: int | None = None
    first_bad_request_id: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


def verify_chain(rows: list[AuditRow], key: AuditKey, anchors: list[Anchor] = ()) -> Verification:
    """Walks the chain from the first row, stopping at the first row whose position, link or MAC is
    wrong; then checks that the log still holds every anchored head."""
    prev_mac = GENESIS_MAC
    for position, row in enumerate(rows, start=1):
        reason = None
        if row.seq != position:
            reason = f"sequence number {row.seq} where {position} was expected (a row was deleted or inserted)"
        elif row.prev_mac != prev_mac:
            reason = "prev_mac does not match the previous row's MAC (a row before it was removed or replaced)"
        else:
            try:
                expected = key.mac(row.chained_values())
            except (TypeError, ValueError) as error:  # e.g. a column edited to a type JSON cannot hold
                expected = f"unhashable: {error}"
            if not hmac.compare_digest(row.row_mac, expected):
                reason = "row_mac does not match the row's contents under this key (the row was edited or forged)"
        if reason is not None:
            return Verification(len(rows), prev_mac, row.seq, row.request_id, reason)
        prev_mac = row.row_mac
    for anchor in anchors:
        if anchor.rows > len(rows):
            return Verification(len(rows), prev_mac, None, None,
                                f"{anchor.source} saw {anchor.rows} rows, the log has {len(rows)} "
                                "(rows were deleted from the end)")
        held = rows[anchor.rows - 1].row_mac if anchor.rows else GENESIS_MAC
        if held != anchor.head:
            bad = rows[anchor.rows - 1] if anchor.rows else None
            return Verification(len(rows), prev_mac, bad.seq if bad else None, bad.request_id if bad else None,
                                f"{anchor.source}: row {anchor.rows} is not the row anchored then "
                                "(the log was rewritten with the key)")
    return Verification(len(rows), prev_mac)
