"""POST /think: a prompt in; the answer, the SHA-256 of the thinking (and the thinking if asked), the
judge's verdict and the logit statistics out."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from ..engines.base import Completion
from ..lifecycle import request_audit
from ..responses import monitor_of, safety_of
from ..schemas import ThinkRequest, ThinkResponse
from ..service import Decision, Job, Service
from ..thinking import parse_thinking

RESPONSES = {413: {"description": "body too large"}, 422: {"description": "invalid field, or a body that is not JSON"},
             499: {"description": "the client closed the connection first (audit row only)"},
             503: {"description": "server full (Retry-After) or audit log unavailable"}}


def think_router(service: Service) -> APIRouter:
    router = APIRouter()

    @router.post("/think", response_model=ThinkResponse, responses=RESPONSES)
    async def think(request: Request, body: ThinkRequest) -> Response:
        audit = request_audit(request)
        audit.start(body.prompt)

        def respond(decision: Decision, completion: Completion | None) -> Response:
            safety = safety_of(decision.verdict)
            if completion is None:
                return JSONResponse(ThinkResponse(
                    request_id=audit.request_id, outcome=decision.outcome, answer=None, thinking_sha256=None,
                    thinking_parse=None, safety=safety, latency_ms=audit.record.latency_ms).body())
            parsed = parse_thinking(completion.text, decision.request.prompt.opens_thinking)
            audit.answered(parsed)
            return JSONResponse(ThinkResponse(
                request_id=audit.request_id, outcome=decision.outcome, answer=parsed.answer,
                thinking_sha256=parsed.thinking_sha256, thinking_parse=parsed.case,
                thinking=parsed.thinking if body.return_thinking else None, safety=safety,
                monitor=monitor_of(completion), latency_ms=audit.record.latency_ms).body())

        job = Job(judged_text=body.prompt, prompt=body.prompt, sampling=body.sampling)
        return await service.handle(request, audit, job, respond)

    return router
