"""``so8t serve``: binds the port, checks the paths, loads the model (and the safety judge), opens the
audit log, serves with uvicorn until SIGINT or SIGTERM, drains, and exits 0.

Everything that can fail on bad input (a taken port, a missing directory, a judge directory that is not
a judge, a model that does not load, an unwritable audit database) fails before the server starts, with
one line on stderr and exit status 2, and leaves no file behind: the port is bound first (seconds,
not the model's load time, to find it taken) and the audit database is opened last.

This module is imported for every ``so8t`` command's parser: torch, transformers and FastAPI are
imported inside ``run`` only.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from ..errors import SO8TError
from .library_bars import quiet_library_bars_off_terminal
from .model_options import add_model_arguments, inference_model, positive_int, set_torch_threads

# The log, its key and its anchors (and SQLite's -wal and -shm files) in one folder.
DEFAULT_AUDIT_DB = os.path.join("so8t-audit", "audit.db")
DEFAULT_THRESHOLD = 0.6  # so8t.judge.judge.DEFAULT_THRESHOLD (kept equal by a test; importing it costs torch here)
DEFAULT_MAX_BATCH = 16  # so8t.serve.engines.hf.DEFAULT_MAX_BATCH
DEFAULT_MAX_QUEUE = 64  # so8t.serve.app.DEFAULT_MAX_QUEUE
DEFAULT_ANCHOR_EVERY = 10  # so8t.audit.log.DEFAULT_ANCHOR_EVERY
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOG_FORMAT = "%(levelprefix)s %(message)s"  # uvicorn's: "INFO:     audit anchor: …"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--served-model-name", help="the model name clients send and GET /v1/models lists (default: "
                                                    "a short name from the model and adapter, e.g. "
                                                    "smollm2-135m-instruct+run-20261204)")
    parser.add_argument("--safety-model", help="a so8t train --task classify output directory: the safety judge")
    parser.add_argument("--safety-threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="below this confidence the judge answers ESCALATE (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--audit-db", default=DEFAULT_AUDIT_DB, help="SQLite audit log, created (and its folder) if "
                                                                       "missing (default: %(default)s)")
    parser.add_argument("--audit-key-file", help="the audit log's HMAC key, created (mode 0600) if missing; never "
                                                 "stored in the database (default: AUDIT_DB.key)")
    parser.add_argument("--audit-anchors", help="append-only file the log's head (rows, MAC) is written to "
                                                "(default: AUDIT_DB.anchors)")
    parser.add_argument("--audit-anchor-every", type=positive_int, default=DEFAULT_ANCHOR_EVERY,
                        help="write an anchor every this many rows, and at start and shutdown (default: %(default)s)")
    parser.add_argument("--audit-accept-truncated", action="store_true",
                        help="serve on an audit log that no longer holds the latest head of its anchors file (rows "
                             "deleted from its end, or a rewrite), recording that as a row of the log; without it "
                             "the server refuses to start on such a log")
    parser.add_argument("--max-batch", type=positive_int, default=DEFAULT_MAX_BATCH,
                        help="most prompts generated together in one batch; 1 serves one at a time "
                             "(default: %(default)s)")
    parser.add_argument("--max-queue", type=positive_int, default=DEFAULT_MAX_QUEUE,
                        help="most requests in the server (waiting or generating); beyond, 503 with "
                             "Retry-After (default: %(default)s)")
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                        help="hf: transformers in this process; vllm: vLLM's engine (continuous batching, paged KV "
                             "cache) on a so8t export: --model DIR, or --adapter RUN exported on the fly "
                             "(default: %(default)s)")
    parser.add_argument("--tensor-parallel-size", type=positive_int, default=1,
                        help="--engine vllm: GPUs the model is split over (default: %(default)s)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="--engine vllm: no torch.compile or CUDA graphs; starts sooner, generates slower")
    parser.add_argument("--max-model-len", type=positive_int,
                        help="--engine vllm: the longest prompt + answer in tokens, which sizes the KV cache "
                             "(default: the model's context, e.g. 131072 for Phi-3.5-mini)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="of uvicorn's and so8t's loggers (audit anchors are info) (default: %(default)s)")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a test may have replaced it since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(level: str) -> None:
    """so8t's loggers (so8t.serve, so8t.audit, …) to stderr at ``level``, in uvicorn's format; once per
    process (a second call only changes the level)."""
    from uvicorn.logging import DefaultFormatter

    logger = logging.getLogger("so8t")
    logger.setLevel(level.upper())
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(DefaultFormatter(LOG_FORMAT))
        logger.addHandler(handler)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket; binding here (not in uvicorn) makes --port 0 and a busy port plain."""
    family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, protocol)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)  # taken by another listener shows here, before anything is loaded
    except OSError:
        sock.close()
        raise
    return sock


def build_server(app, log_level: str = "info"):
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's graceful shutdown on SIGINT/SIGTERM (stop accepting, finish open requests, run the
        app's shutdown), without re-raising the signal afterwards: a drained server exits 0, not 143."""

        @contextlib.contextmanager
        def capture_signals(self):
            import threading

            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return DrainingServer(uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug")))


def check_engine_options(args: argparse.Namespace, model: str) -> None:
    """The vLLM options go with --engine vllm, which needs vLLM installed and a model folder (``model``,
    made concrete) or a run."""
    if args.engine != "vllm":
        given = [flag for flag, value in (("--tensor-parallel-size", args.tensor_parallel_size != 1),
                                          ("--enforce-eager", args.enforce_eager),
                                          ("--max-model-len", args.max_model_len is not None)) if value]
        if given:
            raise SO8TError(f"{given[0]} is an option of --engine vllm")
        return
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise SO8TError("--engine vllm: vLLM is not installed in this environment (scripts/setup.sh installs it "
                        "into .venv-vllm: run .venv-vllm/bin/so8t serve --engine vllm)")
    if args.adapter is not None:
        from ..models.export import inspect_run

        inspect_run(args.adapter, model)  # a run that does not export fails here, before vLLM starts
    elif not Path(model).expanduser().is_dir():
        raise SO8TError("--engine vllm serves a model folder: --model DIR (e.g. written by so8t export), or "
                        "--adapter RUN (a so8t train run, exported on the fly)")


def audit_files(args: argparse.Namespace) -> tuple[Path, Path]:
    """The key file and the anchors file: as given, or where ``so8t audit verify`` looks by default."""
    from ..audit.log import default_files

    key_file, anchors = default_files(args.audit_db)
    return Path(args.audit_key_file or key_file), Path(args.audit_anchors or anchors)


def open_audit_log(args: argparse.Namespace):
    """The key (created on first use), then the log; a key created for a log that does not open is removed."""
    from ..audit.log import AuditKey, AuditLog

    key_file, anchors = audit_files(args)
    folder = Path(args.audit_db).parent
    made_folder = not folder.exists()
    folder.mkdir(exist_ok=True)
    created = False
    try:
        key, created = AuditKey.load_or_create(key_file)
        return AuditLog(args.audit_db, key, anchors, args.audit_anchor_every, args.audit_accept_truncated)
    except BaseException:
        if created:
            key_file.unlink()
        if made_folder:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: nothing else was in it
        raise


def _fail(message: str) -> int:
    print(f"so8t serve: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.safety_threshold <= 1.0:
        return _fail(f"--safety-threshold {args.safety_threshold}: must be in [0, 1]")
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as error:
        return _fail(f"cannot listen on {args.host}:{args.port}: {error}")
    try:
        return _serve(args, sock)
    finally:
        sock.close()


def _serve(args: argparse.Namespace, sock: socket.socket) -> int:
    import sqlite3

    from ..judge.judge import check_judge_dir

    try:
        model = inference_model(args.model, args.adapter)
        check_engine_options(args, model)
    except SO8TError as error:
        return _fail(str(error))
    try:
        if args.safety_model is not None:
            check_judge_dir(args.safety_model)
    except SO8TError as error:
        return _fail(f"--safety-model: {error}")

    from ..audit.log import AuditFileError
    from ..judge.judge import SafetyJudge
    from ..serve.app import create_app
    from ..serve.engines.hf import HFEngine

    configure_logging(args.log_level)
    quiet_library_bars_off_terminal()
    threads = set_torch_threads(args.threads)
    # Loading runs arbitrary library code: any exception is a model that does not load, not a crash.
    try:
        if args.engine == "vllm":
            from ..serve.engines.vllm import VLLMEngine

            engine = VLLMEngine.load(model, args.adapter, args.served_model_name, args.max_batch,
                                     args.tensor_parallel_size, args.enforce_eager, args.max_model_len)
        else:
            engine = HFEngine.load(model, args.adapter, args.served_model_name, args.max_batch)
    except Exception as error:
        return _fail(f"cannot load the model ({model}): {type(error).__name__}: {error}")
    judge = None
    if args.safety_model is not None:
        try:
            judge = SafetyJudge.load(args.safety_model, args.safety_threshold)
        except Exception as error:
            engine.shutdown()
            return _fail(f"cannot load --safety-model {args.safety_model}: {type(error).__name__}: {error}")
    try:
        audit = open_audit_log(args)
    except (sqlite3.Error, OSError, AuditFileError) as error:
        engine.shutdown()
        return _fail(f"cannot open --audit-db {args.audit_db}: {error}")
    host, port = sock.getsockname()[:2]
    key_file, anchors = audit_files(args)
    print(f"so8t serve: {engine.name} on http://{host}:{port} (model: {model}, adapter: "
          f"{args.adapter or 'none'}, safety judge: {args.safety_model or 'none'}, audit log: {args.audit_db}, "
          f"key: {key_file}, anchors: {anchors}, torch threads: {threads})", flush=True)
    try:
        app = create_app(engine, audit, judge, max_queue=args.max_queue)
        build_server(app, args.log_level).run(sockets=[sock])
    finally:
        engine.shutdown()  # the requests in flight were drained first
        audit.close()
    return 0
