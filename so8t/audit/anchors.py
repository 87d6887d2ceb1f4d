"""The anchors file: the audit log's head (row count and the MAC of the last row) appended outside the
database, one JSON line each (``{"time", "rows", "head"}``), and the check that a log still holds an
anchored head. Rows deleted from the end leave a valid shorter chain, and a rewrite by someone who has
the key a valid other one: only a head noted outside the database tells."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import AuditFileError

@dataclass(frozen=True)
class Anchor:
    rows: int
    head: str
    source: str  # where it came from, for messages: "anchors.txt:3" or "--expect-head"


def append_anchor(path: str | Path, time: str, rows: int, head: str) -> None:
    """One line, appended and fsynced: a crash leaves every earlier line whole."""
    line = json.dumps({"time": time, "rows": rows, "head": head}, separators=(",", ":")) + "\n"
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line.encode("ascii"))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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


def anchor_mismatch(anchor: Anchor, rows: int, row_mac: Callable[[int], str | None],
                    cause: str | None = None) -> str | None:
    """Why a log of ``rows`` rows no longer holds ``anchor``, or None when it does. ``row_mac(n)``: the
    stored MAC of row n (the genesis MAC for n = 0); ``cause``: what happened, when the caller knows."""
    if anchor.rows > rows:
        return f"{anchor.source} saw {anchor.rows} rows, the log has {rows} ({cause or 'rows were deleted from the end'})"
    if row_mac(anchor.rows) != anchor.head:
        return (f"{anchor.source}: row {anchor.rows} is not the row anchored then "
                f"({cause or 'the log was rewritten with the key'})")
    return None
