"""timeseries.npz / .csv / .parquet: the samples in memory, rewritten whole at every flush.

npz: one ``[samples, width]`` array per per-layer or per-group metric, ``[samples]`` per scalar metric,
plus ``step``, ``epoch``, ``time``, ``layers`` and ``lora_groups``. CSV and Parquet: the wide table of
``Series.columns`` (``alpha/L1``, ``logit_std``, ...), one row per sample. Each file is written beside
its final name and renamed, so a reader never sees half a file.
"""

import importlib.util
import os
import threading
from pathlib import Path

import numpy as np

from .series import Series

HAS_PARQUET = importlib.util.find_spec("pyarrow") is not None


def partial_name(name: str) -> str:
    """A name for the file being written, unique per process and thread (two writers never collide)."""
    return f".{name}.{os.getpid()}-{threading.get_ident()}.partial"


def write_timeseries(series: Series, directory: Path) -> list[Path]:
    import pandas as pd

    directory = Path(directory)
    written = []

    def replace(name: str, write) -> None:
        final = directory / name
        partial = directory / partial_name(name)
        write(partial)
        os.replace(partial, final)
        written.append(final)

    arrays = {"step": series.steps, "epoch": series.epochs, "time": series.times, **series.values}
    arrays["layers"] = np.asarray(series.info.layers, dtype=np.int64)
    arrays["lora_groups"] = np.asarray(series.info.lora_groups, dtype=str)

    def write_npz(path: Path) -> None:
        with open(path, "wb") as file:  # a file object: np.savez would append ".npz" to a path
            np.savez(file, **arrays)

    replace("timeseries.npz", write_npz)
    table = pd.DataFrame(series.columns())
    replace("timeseries.csv", lambda path: table.to_csv(path, index=False))
    if HAS_PARQUET:
        replace("timeseries.parquet", lambda path: table.to_parquet(path, index=False))
    return written
