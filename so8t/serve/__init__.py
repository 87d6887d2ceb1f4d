"""so8t.serve: the HTTP server of ``so8t serve`` (/think, the OpenAI-compatible /v1 routes, /health,
/metrics), each audited request one row of ``so8t.audit``, the prompt checked by ``so8t.judge``.

Nothing is imported here: ``from so8t.serve.app import create_app`` for the app.
"""
