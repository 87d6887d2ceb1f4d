"""The one exception type for input a user can fix; the CLI prints its message without a traceback."""


class SO8TError(ValueError):
    """Bad input: a config value, a data file, a model so8t cannot gate, an adapter that does not fit."""


class ConfigValueError(SO8TError):
    """A config field's bad value (``alpha_target=5.0: …``); ``so8t train`` reports it under the flag that set
    the field instead (``--alpha-target 5.0: …``), from ``field``, ``value`` and ``reason``."""

    def __init__(self, owner: str, field: str, value, reason: str):
        super().__init__(f"{owner}{field}={value!r}: {reason}")
        self.field, self.value, self.reason = field, value, reason
