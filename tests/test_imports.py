"""The producer runs on machines without a GPU stack.

That it never imports torch is the import contract's to check (`lint-imports`, pyproject's
[tool.importlinter], run by `make test`); this checks it at run time, with torch missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_producer_cli_runs_with_torch_unimportable(tmp_path):
    """Even with torch made unimportable, `producer status` works."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is not installed here')\n")
    env = {
        "PYTHONPATH": f"{blocker}:{ROOT}",
        "FLEETSCRIBE_HOME": str(tmp_path / "home"),
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run(
        [sys.executable, "-m", "producer", "status"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "queued" in out.stdout
