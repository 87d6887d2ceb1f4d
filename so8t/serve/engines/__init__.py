"""Generation engines of ``so8t serve`` and ``so8t generate``: the interface the server needs (base.py) and
the Hugging Face engine (hf.py: batched decoding on one model thread)."""
