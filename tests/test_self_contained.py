"""The repository stands alone: no file (README, code, --help texts, benchmark results) points a user at
documents that are not in it: design notes, issue numbers, a shared environment file, paths of the
machine it was developed on."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"\bDESIGN(\.md| §)|\bissues? \d|ENVIRONMENT\.md|\.\./shared|/work/(shared|main|wt)\b")


def _repository_files() -> list[Path]:
    try:
        # Tracked files only: a user's own untracked runs and notes are not the repository.
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.splitlines()
        return [ROOT / name for name in listed]
    except (OSError, subprocess.CalledProcessError):  # a copy without git: every file but build outputs
        skipped = {".git", ".venv", "build", "out", "__pycache__"}
        return [path for path in ROOT.rglob("*") if path.is_file() and not skipped & set(path.parts)]


def test_no_file_refers_to_documents_outside_the_repository():
    found = []
    for path in _repository_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary files; a path deleted but not yet staged
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
