"""benchmarks/device_check.sh under DRY_RUN=1 (no GPU): what a lent machine would send back.

The device tool returns at most 8 files from $OUT, no deeper than 2 folders, named in letters, digits,
'.', '_' and '-': the script writes its logs and caches under /tmp and bundles them at exit."""

import os
import re
import sys
import tarfile
from pathlib import Path

from child_processes import run

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_leaves_at_most_8_plain_files_with_every_log_in_one_archive(tmp_path):
    out = tmp_path / "out"
    environment = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable, "PRECOMPILE_S": "1"}
    result = run(["bash", "benchmarks/device_check.sh"], timeout=300, cwd=ROOT, env=environment)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    files = list(out.rglob("*"))
    assert 0 < len(files) <= 8 and all(path.is_file() for path in files), files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", path.name) for path in files)
    assert {"summary.txt", "environment.txt", "device-check-logs.tar.gz"} <= {path.name for path in files}
    with tarfile.open(out / "device-check-logs.tar.gz") as archive:
        names = {Path(name).name for name in archive.getnames()}
    assert {"summary.txt", "environment.txt", "aot.txt", "pytest.txt", "fsdp.txt", "benchmark.txt", "vllm.txt"} <= names
    assert "DRY_RUN: GPU steps not run" in (out / "summary.txt").read_text()
