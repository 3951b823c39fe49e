"""The repository passes ``ruff check`` with the settings committed in pyproject.toml.

ruff is in the test extra and runs as ``python -m ruff`` from this
interpreter's environment, so a missing ruff fails here rather than skipping:
a lint gate that quietly skips is no gate.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_check_passes_on_the_whole_repository():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"ruff check found problems (settings: [tool.ruff] in pyproject.toml):\n{result.stdout}{result.stderr}"
