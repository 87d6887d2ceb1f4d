"""The audited routes of ``so8t serve``: /think (think.py) and the OpenAI-compatible /v1 routes (openai.py)."""
