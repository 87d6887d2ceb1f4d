"""so8t.audit: the keyed, hash-chained audit log of ``so8t serve`` (log.py), the heads anchored outside
it (anchors.py) and verification (verify.py)."""


class AuditFileError(Exception):
    """The file (database, key or anchors) cannot be used at all, as opposed to a chain that does not verify."""
