"""The libraries' progress bars (transformers loading weights and writing shards, the hub's downloads) off a
terminal: redirected to a file they print a line per update, so they show only on a terminal."""

from __future__ import annotations

import sys


def quiet_library_bars_off_terminal() -> None:
    if sys.stderr.isatty():
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()
