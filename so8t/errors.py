"""The one exception type for input a user can fix; the CLI prints its message without a traceback."""


class SO8TError(ValueError):
    """Bad input: a config value, a data file, a model so8t cannot gate, an adapter that does not fit."""
