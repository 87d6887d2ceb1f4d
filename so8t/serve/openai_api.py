"""OpenAI-compatible routes: POST /v1/chat/completions (plain or streamed as server-sent events) and
GET /v1/models.

The conversation is rendered with the model's chat template (so8t.data.dataset.render_prompt), judged as the
text of all its messages, and generated like /think, with the same audit row. ``message.content`` is the
answer (the completion outside the thinking blocks); the thinking stays on the server. so8t's own
fields are in an ``so8t`` object: ``request_id``, ``outcome``, ``thinking_sha256`` (SHA-256 of the
thinking text), ``thinking_parse``, ``safety`` and ``monitor``. A prompt the judge does not ALLOW gets
``content: null``, a ``refusal`` and ``finish_reason: "content_filter"``.

Streaming sends the answer as it is generated: nothing while the model is thinking, then the answer's
text as it grows (text that might still turn out to be the start of a tag or of a stop string is held
back). The last chunk has ``finish_reason``, ``usage`` and the ``so8t`` object; its audit row is written
before it is sent. If that row cannot be written the stream ends with an ``error`` event instead (the
answer's text has been sent by then: the event says it was not audited).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..data.dataset import THINK_CLOSE, THINK_OPEN
from .errors import ApiError, error_body
from .generation import STOP, Generation
from .ledger import STATE_DEFERRED, STATE_RECORDED, STREAM_AUDIT_UNAVAILABLE
from .responses import error_response, monitor_of, refuse, safety_of
from .scheduler import ServerBusy
from .schemas import ChatCompletionRequest
from .service import Decision, Refusal, Service, busy_refusal, model_failure
from .thinking import parse_thinking

OWNER = "so8t"
FINISH_REASON = {STOP: "stop"}  # anything else the model stopped for is "length"
CONTENT_FILTER = "content_filter"

log = logging.getLogger("so8t.serve")


def messages_text(messages: list[dict]) -> str:
    """The conversation as canonical JSON (sorted keys, no spaces): what the audit row's prompt digest is of."""
    return json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def add_openai_routes(app: FastAPI, service: Service) -> None:
    created = int(time.time())

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": service.generator.name, "object": "model", "created": created,
                                            "owned_by": OWNER}]}

    @app.post("/v1/chat/completions", responses={400: {"description": "invalid request (OpenAI error shape)"},
                                                 404: {"description": "unknown model"},
                                                 503: {"description": "server full (Retry-After) or audit log unavailable"}})
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        messages = [message.model_dump() for message in body.messages]
        record = service.start_record(request, messages_text(messages))
        request_id = record.request_id
        if body.model != service.generator.name:
            service.finish_record(request, record, "rejected")
            return error_response(request, ApiError(404, "model not found", message=(
                f"model {body.model!r} is not served here; GET /v1/models lists {service.generator.name!r}")))
        judged = "\n\n".join(message["content"] for message in messages)
        try:
            admission = service.scheduler.admit()
        except ServerBusy:
            return refuse(request, record, busy_refusal())
        decision = None
        try:
            decision = await service.decide(request, record, judged, messages, body.new_tokens, body.temperature,
                                            body.top_p, body.stops, body.length_field)
            if body.stream and decision.request is not None:
                request.scope["state"][STATE_DEFERRED] = True
                return _StreamResponse(_Stream(service, request, record, body, decision, admission))
            generation = None
            if decision.request is not None:
                generation = await service.generate(request, decision.request)
        except Refusal as refusal:
            return refuse(request, record, refusal)
        except Exception as error:  # the judge or the model failed; the traceback goes to the log only
            record.error = type(error).__name__
            return refuse(request, record, model_failure(request_id, error))
        finally:
            if not (body.stream and decision is not None and decision.request is not None):
                admission.release()  # a stream releases it when it ends
        service.finish_record(request, record, decision.outcome)
        completion = _completion(service, record, body, decision, generation)
        if body.stream:  # withheld by the judge: one chunk, then [DONE]
            chunk = _as_chunk(completion, include_usage=True)
            return StreamingResponse(iter([_event(chunk), _DONE]), media_type="text/event-stream")
        return JSONResponse(completion)


def _completion(service: Service, record, body: ChatCompletionRequest, decision: Decision,
                generation: Generation | None) -> dict:
    """The chat.completion object; fills the record's output digests."""
    extension = {"request_id": record.request_id, "outcome": decision.outcome, "thinking_sha256": None,
                 "thinking_parse": None}
    safety = safety_of(decision.verdict)
    if safety is not None:
        extension["safety"] = safety.model_dump()
    prompt_tokens = len(decision.request.input_ids) if decision.request is not None else 0
    if generation is None:
        message = {"role": "assistant", "content": None,
                   "refusal": f"withheld: the safety judge answered {decision.verdict.label}"}
        finish_reason, completion_tokens = CONTENT_FILTER, 0
    else:
        parsed = parse_thinking(generation.text)
        service.record_outputs(record, parsed)
        extension["thinking_sha256"] = parsed.thinking_sha256
        extension["thinking_parse"] = parsed.case
        extension["monitor"] = monitor_of(generation).model_dump()
        message = {"role": "assistant", "content": parsed.answer}
        finish_reason, completion_tokens = FINISH_REASON.get(generation.finish_reason, "length"), generation.new_tokens
    return {
        "id": f"chatcmpl-{record.request_id}", "object": "chat.completion", "created": int(time.time()),
        "model": service.generator.name,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "so8t": extension,
    }


def _as_chunk(completion: dict, include_usage: bool) -> dict:
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


class AnswerStream:
    """The answer part of a growing completion, as deltas whose concatenation is the final answer.

    The answer is released once the first thinking block has closed (before that, any text could
    still become thinking: ``x</think>`` makes x the thinking); a tail that could be the start of a tag
    is held back; what parse_thinking calls the answer then only grows.
    """

    def __init__(self):
        self.sent = ""

    def feed(self, text: str) -> str:
        stable = _without_partial_tag(text)
        if THINK_CLOSE not in stable:
            return ""
        return self._delta(parse_thinking(stable).answer)

    def finish(self, text: str) -> str:
        return self._delta(parse_thinking(text).answer)

    def _delta(self, answer: str) -> str:
        if not answer.startswith(self.sent):
            return ""  # cannot happen by the construction above; never resend or contradict
        delta, self.sent = answer[len(self.sent):], answer
        return delta


def _without_partial_tag(text: str) -> str:
    for tag in (THINK_OPEN, THINK_CLOSE):
        for length in range(len(tag) - 1, 0, -1):
            if text.endswith(tag[:length]):
                return text[:-length]
    return text


class _Stream:
    def __init__(self, service: Service, request: Request, record, body: ChatCompletionRequest,
                 decision: Decision, admission):
        self.service = service
        self.request = request
        self.record = record
        self.body = body
        self.decision = decision
        self.admission = admission

    def _chunk(self, delta: dict) -> bytes:
        return _event({"id": f"chatcmpl-{self.record.request_id}", "object": "chat.completion.chunk",
                       "created": int(time.time()), "model": self.service.generator.name,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}]})

    async def events(self):
        state = self.request.scope["state"]
        generation_request = self.decision.request
        texts: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        generation_request.on_text = lambda text: loop.call_soon_threadsafe(texts.put_nowait, text)
        task = asyncio.ensure_future(self.service.scheduler.generate(generation_request))
        answer = AnswerStream()
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            while not task.done():
                getter = asyncio.ensure_future(texts.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                delta = answer.feed(getter.result())
                if delta:
                    yield self._chunk({"content": delta})
            try:
                generation = task.result()
            except Exception as error:
                log.error("model call failed for request %s", self.record.request_id, exc_info=error)
                self.record.error = type(error).__name__
                self.service.finish_record(self.request, self.record, "error")
                self.record.status = 500
                state[STATE_RECORDED] = True
                await self.service.ledger.write(self.record)
                yield _event(error_body(self.request.scope["path"], self.record.request_id,
                                        ApiError(500, "model call failed")))
                return
            self.service.metrics.generated_tokens.inc(generation.new_tokens)
            delta = answer.finish(generation.text)
            if delta:
                yield self._chunk({"content": delta})
            self.service.finish_record(self.request, self.record, self.decision.outcome)
            self.record.status = 200
            completion = _completion(self.service, self.record, self.body, self.decision, generation)
            state[STATE_RECORDED] = True
            if not await self.service.ledger.write(self.record):
                yield _event(error_body(self.request.scope["path"], self.record.request_id,
                                        STREAM_AUDIT_UNAVAILABLE))
                return
            include_usage = self.body.stream_options is not None and self.body.stream_options.include_usage
            yield _event(_as_chunk(completion, include_usage))
            yield _DONE
        except BaseException:  # the client went away (the task is cancelled) or the stream broke
            self.end()
            raise

    def end(self) -> None:
        """Once the response is over, however it ended: an unrecorded stream is a client that went away
        (499), and the stream's place in the server is given back."""
        self.decision.request.cancelled.set()  # no effect on a finished generation
        if not self.request.scope["state"].get(STATE_RECORDED):
            self.service.finish_record(self.request, self.record, "cancelled")
            self.record.status = 499
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
