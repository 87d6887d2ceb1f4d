"""The ASGI middleware around the audited endpoints (/think, /v1/chat/completions): a RequestAudit for every
request, body checks, the request id header, and the row written before the response starts.

It sits outside FastAPI's routing and validation, so it sees every audited request: the ones a route
answered, the ones validation rejected, and the ones it refuses itself (413, a body that cannot be
parsed). Once a client has its answer, its row is in the database; if the row cannot be written (a full
disk), the client gets a 503 with its request id instead of the answer. Whatever is left unwritten (an
exception, a client gone, a stream that ended early) it writes on the way out.
"""

from __future__ import annotations

import json
import logging

from .lifecycle import AUDIT_UNAVAILABLE, CLIENT_CLOSED_STATUS, STATE_KEY, Ledger, RequestAudit
from .responses import ApiError, error_bytes

AUDITED_PATHS = ("/think", "/v1/chat/completions")
REQUEST_ID_HEADER = b"x-request-id"
SERVER_ERROR = ApiError(500, "internal error", message="the server failed on this request; see its log")

log = logging.getLogger("so8t.serve")


class _ClientGone(Exception):
    """The client disconnected before its body was in."""


class _Refused(Exception):
    """The middleware answers the request itself (a body too large or one that cannot be parsed)."""

    def __init__(self, error: ApiError, headers=()):
        super().__init__(error.error)
        self.error = error
        self.headers = list(headers)


class _AuditedSend:
    """The ``send`` the app gets: writes the row when the response starts (unless deferred) and adds the
    request id header; if the row cannot be written, the response is replaced by a 503."""

    def __init__(self, send, audit: RequestAudit):
        self.send = send
        self.audit = audit
        self.started = False
        self.replaced = False

    async def __call__(self, message) -> None:
        if self.replaced:
            return
        if message["type"] == "http.response.start":
            self.started = True
            if not self.audit.deferred and not await self.audit.write(message["status"]):
                self.replaced = True
                await self.reply(AUDIT_UNAVAILABLE)
                return
            message = {**message, "headers": [*message.get("headers", []),
                                              (REQUEST_ID_HEADER, self.audit.request_id.encode())]}
        await self.send(message)

    async def refuse(self, error: ApiError, headers=()) -> None:
        self.started = True
        written = await self.audit.write(error.status)
        await self.reply(error if written else AUDIT_UNAVAILABLE, headers)

    async def reply(self, error: ApiError, headers=()) -> None:
        body = error_bytes(self.audit.path, self.audit.request_id, error)
        await self.send({"type": "http.response.start", "status": error.status,
                         "headers": [(b"content-type", b"application/json"),
                                     (b"content-length", str(len(body)).encode()),
                                     (REQUEST_ID_HEADER, self.audit.request_id.encode()), *headers]})
        await self.send({"type": "http.response.body", "body": body})


class AuditMiddleware:
    def __init__(self, app, ledger: Ledger, max_body_bytes: int):
        self.app = app
        self.ledger = ledger
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in AUDITED_PATHS:
            return await self.app(scope, receive, send)
        audit = RequestAudit(self.ledger, scope["path"])
        scope.setdefault("state", {})[STATE_KEY] = audit
        audited_send = _AuditedSend(send, audit)
        try:
            body = await self._read_body(scope, receive, audit.path)
            await self.app(scope, _replay(body, receive), audited_send)
        except _Refused as refused:
            await audited_send.refuse(refused.error, refused.headers)
        except _ClientGone:  # no one to answer; the row says so
            audit.finish("cancelled", CLIENT_CLOSED_STATUS)
        except Exception:
            log.exception("request %s failed", audit.request_id)
            if not audited_send.started:
                await audited_send.refuse(SERVER_ERROR)
        finally:
            await audit.write()  # raised, cancelled, or a stream that ended early: once in any case

    async def _read_body(self, scope, receive, path: str) -> bytes:
        """The whole body, checked to parse as JSON; raises _Refused (413 once it is over the limit, by
        Content-Length or by counting; bad input for what cannot be parsed), _ClientGone when the client
        disconnects first."""
        too_large = _Refused(ApiError(413, "request body too large", message=f"the body is over {self.max_body_bytes} "
                                      "bytes"), [(b"connection", b"close")])
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                raise too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        reason = unparseable(body) if body else None  # no body at all: FastAPI names what is missing
        if reason is not None:
            raise _Refused(ApiError.invalid(path, [("body", reason)]))
        return body


def unparseable(body: bytes) -> str | None:
    """Why ``body`` is not a JSON document Python can read, or None. FastAPI answers some of these (deep
    nesting, an integer of more than 4300 digits) with a bare 400 and no request id."""
    try:
        json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as error:
        return f"invalid UTF-8: {error.reason} at byte {error.start}"
    except json.JSONDecodeError as error:
        return f"JSON decode error: {error.msg}"
    except RecursionError:
        return "JSON nested too deeply"
    except ValueError as error:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        return f"JSON value cannot be read: {error}"
    return None


def _replay(body: bytes, receive):
    """A receive() that hands the app the body read already, then passes on (e.g. the disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
