"""Verifying an audit log: walking its keyed chain, and checking the heads anchored outside it."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from .anchors import Anchor, anchor_mismatch
from .log import GENESIS_MAC, TRUNCATION_ACCEPTED, AuditKey, AuditRow


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
    wrong; then checks that the log still holds every anchored head. A server told to serve on a log
    that no longer held its anchors recorded that as a row: the anchors it overrode still fail (the
    rows they saw are gone all the same), and the reason names that row as the cause."""
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

    def row_mac(count: int) -> str:
        return rows[count - 1].row_mac if count else GENESIS_MAC

    for anchor in anchors:
        # Rows up to an acceptance row were kept; an anchor beyond it may have seen rows lost before it.
        accepted = next((row for row in rows if row.outcome == TRUNCATION_ACCEPTED and row.seq <= anchor.rows), None)
        cause = accepted and (f"rows were lost before row {accepted.seq}, where the server was told to serve on "
                              f"the log anyway, at {accepted.time}")
        reason = anchor_mismatch(anchor, len(rows), row_mac, cause)
        if reason is not None:
            bad = rows[anchor.rows - 1] if 0 < anchor.rows <= len(rows) else None
            return Verification(len(rows), prev_mac, bad.seq if bad else None, bad.request_id if bad else None, reason)
    return Verification(len(rows), prev_mac)
