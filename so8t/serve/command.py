"""``so8t serve``: loads the model (and the safety judge), opens the audit log, binds, serves with uvicorn.

Everything that can fail on bad input (a model that does not load, a busy port, an unwritable audit
database) fails before the server starts, with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import socket
import sqlite3
import sys

from ..errors import SO8TError
from ..judge import DEFAULT_THRESHOLD, check_threshold

DEFAULT_AUDIT_DB = "so8t-audit.db"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id or directory of a causal LM (default: the embedded demo, no download)")
    parser.add_argument("--adapter", help="a so8t train output directory: LoRA adapter, SO8T gates (so8t/), tokenizer")
    parser.add_argument("--safety-model", help="a so8t train --task classify output directory: the safety judge")
    parser.add_argument("--safety-threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="below this confidence the judge answers ESCALATE (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--audit-db", default=DEFAULT_AUDIT_DB, help="SQLite audit log, created if missing "
                                                                       "(default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket; binding here (not in uvicorn) makes --port 0 and a busy port plain."""
    family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, protocol)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def build_server(app, log_level: str = "info"):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug")))


def _fail(message: str) -> int:
    print(f"so8t serve: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from ..audit import AuditLog
    from ..judge import SafetyJudge
    from .app import create_app
    from .loading import load_generator

    try:
        check_threshold(args.safety_threshold)
    except SO8TError as error:
        return _fail(f"--safety-threshold: {error}")
    # Loading runs arbitrary library code: any exception is a model that does not load, not a crash.
    try:
        generator = load_generator(args.model, args.adapter)
    except Exception as error:
        return _fail(f"cannot load the model ({args.model or 'embedded default'}): {type(error).__name__}: {error}")
    judge = None
    if args.safety_model is not None:
        try:
            judge = SafetyJudge.load(args.safety_model, args.safety_threshold)
        except Exception as error:
            return _fail(f"cannot load --safety-model {args.safety_model}: {type(error).__name__}: {error}")
    try:
        audit = AuditLog(args.audit_db)
    except (sqlite3.Error, OSError) as error:
        return _fail(f"cannot open --audit-db {args.audit_db}: {error}")
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as error:
        audit.close()
        return _fail(f"cannot listen on {args.host}:{args.port}: {error}")
    host, port = sock.getsockname()[:2]
    print(f"so8t serve: {generator.name} on http://{host}:{port} (safety judge: {args.safety_model or 'none'}, "
          f"audit log: {args.audit_db})", flush=True)
    try:
        build_server(create_app(generator, audit, judge), args.log_level).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the Ctrl-C it had captured
        pass
    finally:
        sock.close()
        audit.close()
    return 0
