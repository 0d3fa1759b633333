"""The tree passes `ruff check` under the configuration in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    # --no-cache: a test run leaves no .ruff_cache in the checkout.
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_tree_passes_ruff() -> None:
    proc = _ruff("--output-format", "concise", ".")
    assert proc.returncode == 0, f"`ruff check .` failed (`ruff check --fix .` mends the fixable ones):\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}"


def test_ruff_uses_the_projects_rules(tmp_path: Path) -> None:
    """The configuration is the one ruff reads: a file placed in the checkout's settings with
    strata imported before numpy, an unused import and a 151-column line fails with exactly
    those rules (a lost [tool.ruff] section would make `ruff check .` pass on defaults)."""
    bad = tmp_path / "bad.py"
    bad.write_text('import os\n\nfrom strata import store\nimport numpy as np\n\nprint(store, np, "' + "x" * 131 + '")\n')
    proc = _ruff("--config", str(ROOT / "pyproject.toml"), "--output-format", "concise", str(bad))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    codes = sorted({line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith(str(bad))})
    assert codes == ["E501", "F401", "I001"], proc.stdout
    # 150 columns are allowed.
    bad.write_text('print("' + "x" * 141 + '")\n')
    assert len(bad.read_text().rstrip("\n")) == 150
    assert _ruff("--config", str(ROOT / "pyproject.toml"), str(bad)).returncode == 0
