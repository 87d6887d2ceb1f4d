"""``so8t audit verify DB [--key-file K] [--anchors FILE | --expect-head ROWS:MAC]``: checks the keyed chain
of a ``so8t serve`` audit log and the heads anchored outside it. The key file and the anchors file default
to those ``so8t serve`` keeps beside the database (``DB.key``, ``DB.anchors``) when they exist."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..audit import AuditFileError
from ..audit.anchors import Anchor, read_anchors
from ..audit.log import AuditKey, default_files, read_key_id, read_rows
from ..audit.verify import verify_chain


def parse_head(text: str) -> Anchor:
    rows, _, head = text.partition(":")
    if not rows.isdigit() or len(head) != 64:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ROWS:MAC, e.g. 120:{'ab' * 32}")
    return Anchor(int(rows), head.lower(), "--expect-head")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="audit_action", required=True, metavar="action")
    verify = actions.add_parser("verify", help="check the keyed chain and the anchors; name the first bad row "
                                               "(exit status 1)")
    verify.add_argument("database", type=Path, help="the SQLite file of so8t serve --audit-db; opened read-only, "
                                                    "nothing is written beside it")
    verify.add_argument("--key-file", type=Path, help="the server's --audit-key-file (default: DATABASE.key)")
    heads = verify.add_mutually_exclusive_group()
    heads.add_argument("--anchors", type=Path, help="the server's --audit-anchors file: every head in it must "
                                                    "still be in the log (default: DATABASE.anchors if it exists)")
    heads.add_argument("--expect-head", type=parse_head, metavar="ROWS:MAC",
                       help="a head noted earlier (printed by verify, logged by the server)")


def _files(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The key file and the anchors file (None: no anchors to check), saying which defaults were taken."""
    default_key, default_anchors = default_files(args.database)
    key_file, anchors = args.key_file, args.anchors
    if key_file is None:
        if not default_key.is_file():
            raise AuditFileError(f"no --key-file given, and no {default_key} beside the database")
        key_file = default_key
        print(f"so8t audit: key file {key_file} (beside the database; --key-file names another)", file=sys.stderr)
    if anchors is None and args.expect_head is None and default_anchors.is_file():
        anchors = default_anchors
        print(f"so8t audit: anchors {anchors} (beside the database; --anchors names another)", file=sys.stderr)
    return key_file, anchors


def run(args: argparse.Namespace) -> int:
    try:
        rows = read_rows(args.database)
        key_file, anchors_file = _files(args)
        key = AuditKey.load(key_file)
        key_id = read_key_id(args.database)
        if key_id is not None and key_id != key.key_id:
            # audit_meta has no MAC; the rows do: a first row that verifies under this key makes it the
            # log's key, so the stored key id was edited.
            if rows and verify_chain(rows[:1], key).ok:
                print(f"so8t audit: {args.database}: tampered: audit_meta's key id {key_id} is not "
                      f"{key_file}'s ({key.key_id}), yet the rows are MACed under it (the key id was edited)",
                      file=sys.stderr)
                return 1
            raise AuditFileError(f"{args.database}: written with another key (key id {key_id}, "
                                 f"{key_file}'s is {key.key_id})")
        anchors = read_anchors(anchors_file) if anchors_file is not None else []
    except AuditFileError as error:
        print(f"so8t audit: error: {error}", file=sys.stderr)
        return 2
    if args.expect_head is not None:
        anchors = [args.expect_head]
    result = verify_chain(rows, key, anchors)
    if not result.ok:
        where = (f" at row {result.first_bad_seq} (request {result.first_bad_request_id})"
                 if result.first_bad_seq is not None else "")
        print(f"so8t audit: {args.database}: chain broken{where}: {result.reason}", file=sys.stderr)
        return 1
    checked = f", {len(anchors)} anchored head(s) held" if anchors else \
        " (no anchors given: rows deleted from the end would go unnoticed)"
    print(f"so8t audit: {args.database}: {result.rows} rows, chain intact{checked}, head {result.rows}:{result.head_mac}")
    return 0
