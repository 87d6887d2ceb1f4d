"""The output directory of ``so8t train``: everything is written into a staging directory next to
``--output-dir`` and renamed into place at the end, so a failed run leaves no half-written output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Written for a run on the embedded demo base, which has no checkpoint of its own: the seed that
# rebuilds its exact weights, so `so8t serve --adapter DIR` serves the base the adapter was trained on.
EMBEDDED_BASE_FILE = "embedded_base.json"


def write_embedded_base_record(directory: Path, seed: int) -> None:
    (directory / EMBEDDED_BASE_FILE).write_text(json.dumps({"seed": seed}) + "\n")


def staging_dir_for(output_dir: Path) -> Path:
    # Fixed name: every rank of a multi-process run must agree on it.
    return output_dir.parent / f".{output_dir.name}.partial"


def publish_outputs(staging: Path, output_dir: Path) -> None:
    """Moves the finished outputs into place; an existing --output-dir (only with --overwrite) goes last."""
    replaced = None
    if output_dir.exists():
        replaced = output_dir.parent / f".{output_dir.name}.replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        output_dir.rename(replaced)
    staging.rename(output_dir)
    if replaced is not None:
        shutil.rmtree(replaced)
