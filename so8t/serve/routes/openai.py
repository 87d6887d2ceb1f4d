"""OpenAI-compatible routes: POST /v1/chat/completions (plain or streamed as server-sent events) and
GET /v1/models.

The conversation is rendered with the model's chat template, judged as the text of all its messages, and
generated like /think, with the same audit row. ``message.content`` is the answer (the completion outside
the thinking blocks); the thinking stays on the server unless the request sets ``return_thinking`` (then
it is ``reasoning_content``). so8t's own fields are in an ``so8t`` object: ``request_id``, ``outcome``,
``thinking_sha256`` (SHA-256 of the thinking text), ``thinking_parse``, ``safety`` and ``monitor``. A
prompt the judge does not ALLOW gets ``content: null``, a ``refusal`` and ``finish_reason: "content_filter"``.

Streaming sends the answer as it is generated: a model that does not open a thinking block streams its
answer from its first tokens; a thinking model's answer streams once its block has closed (text that
might still be the start of a tag or of a stop string is held back). The last chunk has
``finish_reason``, ``usage`` and the ``so8t`` object; its audit row is written before it is sent. If that
row cannot be written the stream ends with an ``error`` event instead (the answer's text has been sent by
then: the event says it was not audited).
"""

from __future__ import annotations

import json
import logging
import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from ..admission import Admission
from ..engines.base import STOP, Completion, TextDelta
from ..lifecycle import STREAM_AUDIT_UNAVAILABLE, RequestAudit, request_audit
from ..responses import ApiError, error_body, monitor_of, safety_of
from ..schemas import ChatCompletionRequest
from ..service import Decision, Job, Refusal, Service
from ..thinking import ANSWER, THINKING, AnswerDeltas, Piece, ThinkingStream, parse_thinking

OWNER = "so8t"
FINISH_REASON = {STOP: "stop"}  # anything else the model stopped for is "length"
CONTENT_FILTER = "content_filter"
RESPONSES = {200: {"description": "a chat.completion, or with `stream: true` its chunks as server-sent events",
                   # Each event's `data`: a chat.completion.chunk as JSON, or the error object, or [DONE].
                   "content": {"text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                                                "properties": {"data": {"type": "string"}}}}}},
             400: {"description": "invalid request, or a body that is not JSON (OpenAI error shape)"},
             404: {"description": "unknown model"}, 413: {"description": "body too large"},
             503: {"description": "server full (Retry-After) or audit log unavailable"}}
# A too-long request names the fields an OpenAI client sent: the conversation, or its token limit.
OVERFLOW_FIELDS = {"prompt": "messages"}

log = logging.getLogger("so8t.serve")


def messages_text(messages: list[dict]) -> str:
    """The conversation as canonical JSON (sorted keys, no spaces): what the audit row's prompt digest is of."""
    return json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def openai_router(service: Service) -> APIRouter:
    router = APIRouter(prefix="/v1")
    created = int(time.time())
    name = service.engine.name

    @router.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": OWNER}]}

    @router.post("/chat/completions", responses=RESPONSES)
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        audit = request_audit(request)
        messages = [message.model_dump() for message in body.messages]
        audit.start(messages_text(messages))
        if body.model != name:
            return service.refuse(audit, _unknown_model(body.model, name))

        def respond(decision: Decision, completion: Completion | None) -> Response:
            result = _completion(audit, name, body, decision, completion)
            if body.stream:  # withheld by the judge: one chunk, then [DONE]
                return StreamingResponse(iter([_event(_last_chunk(result, True)), _DONE]),
                                         media_type="text/event-stream")
            return JSONResponse(result)

        def stream(decision: Decision, admission: Admission) -> Response:
            return _StreamResponse(_Stream(service, audit, body, decision, admission))

        job = Job(judged_text="\n\n".join(message["content"] for message in messages), prompt=messages,
                  sampling=body.sampling, fields={**OVERFLOW_FIELDS, "max_new_tokens": body.length_field})
        return await service.handle(request, audit, job, respond, stream if body.stream else None)

    return router


def _unknown_model(model: str, served: str) -> Refusal:
    return Refusal(ApiError(404, "model not found", message=(
        f"model {model!r} is not served here; GET /v1/models lists {served!r}")), "rejected")


def _completion(audit: RequestAudit, name: str, body: ChatCompletionRequest, decision: Decision,
                completion: Completion | None) -> dict:
    """The chat.completion object; fills in the audit row's output digests."""
    extension = {"request_id": audit.request_id, "outcome": decision.outcome, "thinking_sha256": None,
                 "thinking_parse": None}
    safety = safety_of(decision.verdict)
    if safety is not None:
        extension["safety"] = safety.model_dump()
    prompt_tokens = len(decision.request.prompt.ids) if decision.request is not None else 0
    if completion is None:
        message = {"role": "assistant", "content": None,
                   "refusal": f"withheld: the safety judge answered {decision.verdict.label}"}
        finish_reason, completion_tokens = CONTENT_FILTER, 0
    else:
        parsed = parse_thinking(completion.text, decision.request.prompt.opens_thinking)
        audit.answered(parsed)
        extension.update(thinking_sha256=parsed.thinking_sha256, thinking_parse=parsed.case,
                         monitor=monitor_of(completion).model_dump())
        message = {"role": "assistant", "content": parsed.answer}
        if body.return_thinking:
            message["reasoning_content"] = parsed.thinking
        finish_reason = FINISH_REASON.get(completion.finish_reason, "length")
        completion_tokens = completion.new_tokens
    return {
        "id": f"chatcmpl-{audit.request_id}", "object": "chat.completion", "created": int(time.time()),
        "model": name,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "so8t": extension,
    }


def _last_chunk(completion: dict, include_usage: bool) -> dict:
    """The last chunk of a stream: the choice's finish reason (and a withheld message), usage, so8t."""
    choice = completion["choices"][0]
    delta = {} if choice["message"]["content"] is not None else {"role": "assistant", "content": None,
                                                                  "refusal": choice["message"]["refusal"]}
    chunk = {**completion, "object": "chat.completion.chunk",
             "choices": [{"index": 0, "delta": delta, "finish_reason": choice["finish_reason"], "logprobs": None}]}
    if not include_usage:
        chunk.pop("usage")
    return chunk


def _event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


_DONE = b"data: [DONE]\n\n"


class _Stream:
    """One streamed completion: the engine's text deltas through the thinking parser to the client, then
    the audit row, then the last chunk."""

    def __init__(self, service: Service, audit: RequestAudit, body: ChatCompletionRequest, decision: Decision,
                 admission: Admission):
        self.service = service
        self.audit = audit
        self.body = body
        self.decision = decision
        self.admission = admission
        audit.deferred = True  # written when the stream ends
        self.thinking = ThinkingStream(decision.request.prompt.opens_thinking)
        self.answer = AnswerDeltas()

    def _chunk(self, delta: dict) -> bytes:
        return _event({"id": f"chatcmpl-{self.audit.request_id}", "object": "chat.completion.chunk",
                       "created": int(time.time()), "model": self.service.engine.name,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}]})

    def _chunks(self, pieces: list[Piece]) -> list[bytes]:
        chunks = []
        thinking = "".join(piece.text for piece in pieces if piece.kind == THINKING)
        if thinking and self.body.return_thinking:
            chunks.append(self._chunk({"reasoning_content": thinking}))
        answer = self.answer.add([piece for piece in pieces if piece.kind == ANSWER])
        if answer:
            chunks.append(self._chunk({"content": answer}))
        return chunks

    async def events(self):
        yield self._chunk({"role": "assistant", "content": ""})
        completion = None
        deltas = self.service.engine.stream(self.decision.request)
        try:
            async for event in deltas:
                if isinstance(event, TextDelta):
                    for chunk in self._chunks(self.thinking.feed(event.text)):
                        yield chunk
                else:
                    completion = event
        except Exception as error:
            log.error("model call failed for request %s", self.audit.request_id, exc_info=error)
            self.audit.finish("error", 500, error)
            await self.audit.write()
            yield _event(error_body(self.audit.path, self.audit.request_id, ApiError(500, "model call failed")))
            return
        finally:
            await deltas.aclose()
        for chunk in self._chunks(self.thinking.finish()):
            yield chunk
        self.service.metrics.generated_tokens.inc(completion.new_tokens)
        result = _completion(self.audit, self.service.engine.name, self.body, self.decision, completion)
        self.audit.finish(self.decision.outcome, 200)
        if not await self.audit.write():
            yield _event(error_body(self.audit.path, self.audit.request_id, STREAM_AUDIT_UNAVAILABLE))
            return
        include_usage = self.body.stream_options is not None and self.body.stream_options.include_usage
        yield _event(_last_chunk(result, include_usage))
        yield _DONE

    def end(self) -> None:
        """Once the response is over, however it ended: a stream whose row was not written is a client
        that went away (499), its generation stops, and its place in the server is given back."""
        self.service.engine.cancel(self.audit.request_id)  # no effect on a finished generation
        if not self.audit.recorded:
            self.audit.finish("cancelled", 499)
        self.admission.release()


class _StreamResponse(StreamingResponse):
    """A stream's server-sent events. Ends the stream even where its event generator never runs (sending
    the response start failed: the client went away first) or is left suspended mid-stream."""

    def __init__(self, stream: _Stream):
        super().__init__(stream.events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self.stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.stream.end()
