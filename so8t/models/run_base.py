"""The base model a ``so8t train`` output was trained on, as the run recorded it, and checked without
loading anything (no torch: ``so8t serve`` and ``so8t generate`` answer a wrong one at once).

A run records its base in two places:
- ``embedded_base.json`` (``so8t train --model demo``): the seed that rebuilds the random demo, which has
  no checkpoint of its own. Written beside the checkpoints when the run finishes, so a ``checkpoint-N``
  folder reads its run's.
- peft's ``adapter_config.json``, ``base_model_name_or_path``: the hub id, or the absolute directory that
  so8t.models.loading loaded; for a ``.gguf`` file that is its converted directory in the cache
  (so8t.models.source), whose name is the file's SHA-256.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SO8TError
from .source import CONVERTED_MARKER, DEMO_MODEL, check_model, file_sha256, installed_smollm2_gguf

EMBEDDED_BASE_FILE = "embedded_base.json"
PEFT_CONFIG_FILE = "adapter_config.json"
CHECKPOINT_PREFIX = "checkpoint-"


def embedded_base_record(run: Path) -> Path:
    """Where a run on the demo records its seed: in the run, also for its ``checkpoint-N`` folders."""
    record = run / EMBEDDED_BASE_FILE
    if not record.is_file() and run.name.startswith(CHECKPOINT_PREFIX):
        return run.parent / EMBEDDED_BASE_FILE
    return record


def recorded_base(run: Path) -> str | None:
    """``demo``, or the base peft recorded (a hub id or a path); None when the run recorded neither."""
    if embedded_base_record(run).is_file():
        return DEMO_MODEL
    config = run / PEFT_CONFIG_FILE
    if not config.is_file():
        return None
    try:
        recorded = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as error:
        raise SO8TError(f"{config}: unreadable ({error})") from None
    return recorded or None


def converted_name(directory: Path) -> str | None:
    """The ``.gguf`` file name a converted cache directory was made from, or None for any other path."""
    marker = directory / CONVERTED_MARKER
    return Path(marker.read_text().strip()).name if marker.is_file() else None


def run_base_model(adapter: str) -> str | None:
    """The base the run at ``adapter`` was trained on, checked like ``--model`` (None: it recorded none).

    A converted ``.gguf`` directory that the cache no longer holds is the installed default model's file
    when its SHA-256 is that directory's name (converted again when it loads); any other recorded base that
    cannot be found is an SO8TError naming it and ``--model``.
    """
    base = recorded_base(Path(adapter))
    if base is None or base == DEMO_MODEL:
        return base
    path = Path(base).expanduser()
    if path.exists():
        return base
    missing = f"--adapter {adapter} was trained on {base}"
    if path.is_absolute():
        default = installed_smollm2_gguf()
        if path.parent.name == "gguf" and default is not None and file_sha256(default) == path.name:
            return str(default)
        raise SO8TError(f"{missing}, which no longer exists: pass --model with that base model (its hub id, "
                        "directory or .gguf file)")
    try:
        return check_model(base)
    except SO8TError as error:
        reason = str(error).removeprefix(f"--model {base}: ")
        raise SO8TError(f"{missing}: {reason} (or pass --model with that base model)") from None
