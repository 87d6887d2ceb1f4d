"""so8t.audit: the keyed, hash-chained audit log of ``so8t serve`` (log.py) and its verification (verify.py)."""
