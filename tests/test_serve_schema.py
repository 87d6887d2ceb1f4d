"""The published schema (GET /openapi.json) and the server agree: schemathesis generates requests from the
schema, valid and invalid ones, and checks every response against it (status codes, content types, bodies,
valid data accepted, invalid data rejected, no 5xx). The engine is scripted (test_serve_engine.py): this is
about the HTTP contract, not the model.

One rejection of valid data is the contract too: a prompt plus ``max_new_tokens`` that do not fit the
model's context (512 positions here) is bad input, whose reason says so; a schema cannot state a limit on
the sum of a text's token count and a number.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection, positive_data_acceptance
from serve_helpers import open_audit
from test_serve_engine import ScriptedEngine

from so8t.serve.app import create_app

CONTEXT_REASONS = ("fit the model's context", "the model reads at most")
EXAMPLES = 40  # per operation and mode: ~20 s in all on a loaded 2-core machine


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    audit = open_audit(tmp_path_factory.mktemp("schema") / "audit.db")
    yield create_app(ScriptedEngine(["<think>", "a", "</think>", "The answer."], pause_s=0.0), audit)
    audit.close()


@schemathesis.check
def valid_data_is_accepted_unless_it_outgrows_the_context(ctx, response, case):
    try:
        positive_data_acceptance(ctx, response, case)
    except Exception:
        if not any(reason in response.text for reason in CONTEXT_REASONS):
            raise


@schemathesis.check
def invalid_data_is_rejected_also_as_too_large(ctx, response, case):
    # A generated invalid string can pass 256 KiB: refused 413 before it is read, as the schema documents.
    if response.status_code != 413:
        negative_data_rejection(ctx, response, case)


@pytest.mark.parametrize("mode", list(GenerationMode), ids=str)
def test_the_server_does_what_its_schema_says(app, mode):
    api = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in api.get_all_operations()]
    assert {f"{operation.method.upper()} {operation.path}" for operation in operations} >= {
        "POST /think", "POST /v1/chat/completions", "GET /v1/models", "GET /health", "GET /metrics"}
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and not len(operation.body):
            continue  # no body, no parameters: nothing can be made invalid
        @given(case=operation.as_strategy(generation_mode=mode))
        # derandomize: the same examples on every run, so a failure in CI reproduces locally.
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)
        def check(case):
            case.call_and_validate(excluded_checks=[positive_data_acceptance, negative_data_rejection],
                                   additional_checks=[valid_data_is_accepted_unless_it_outgrows_the_context,
                                                      invalid_data_is_rejected_also_as_too_large])

        check()
