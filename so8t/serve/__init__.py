"""so8t.serve: the /think endpoint of ``so8t serve``.

command (CLI) → loading (model, adapter, gates) → app (routes) with ledger (request id, 413, audit row
and metrics per request), worker (the one model thread), generation, thinking (parse and hash),
schemas and metrics. The audit log itself is ``so8t.audit``; the safety judge ``so8t.judge``.
Nothing is imported here: every ``so8t`` command's parser imports ``so8t.serve.command``, which must stay
light (``from so8t.serve.app import create_app`` for the app).
"""
