"""Smoke runs of the benchmarks, so they do not rot. No assertion on time: figures are for the README."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_ceiling_benchmark_runs():
    result = subprocess.run([sys.executable, "benchmarks/ceiling.py", "--rows", "40", "--local"], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["rows"] == report["images"] == 40 and report["images_per_s"] > 0
