"""The producer and the store run on machines without a GPU stack: they never import torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys
import producer.__main__, producer.enqueue, producer.discover, producer.status, producer.samples
import db.__main__, db.query, db.store, db.migrate, db.session
import worker.settings, worker.app, worker.video
heavy = sorted(m for m in ("torch", "transformers", "torchvision", "peft") if m in sys.modules)
print(",".join(heavy) or "clean")
"""


def test_producer_and_db_do_not_import_torch():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"


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
