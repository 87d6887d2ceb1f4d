"""A JSON object read from a file a user handed over (a run, a judge, an export), or one line saying why not."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SO8TError


def read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SO8TError(f"{path}: unreadable ({error})") from None
    if not isinstance(value, dict):
        raise SO8TError(f"{path}: expected a JSON object")
    return value
