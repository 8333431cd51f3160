"""Run the SDK acceptance suite again under openai 1.x, installed beside the current major."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPENAI_1X = ROOT / ".cache" / "openai1"


def test_openai_1x_passes_the_same_suite() -> None:
    if not (OPENAI_1X / "openai").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"openai 1.x is not installed in {OPENAI_1X} (scripts/test does it)")
        pytest.skip("openai 1.x is not installed; run scripts/test")
    env = {**os.environ, "PYTHONPATH": f"{OPENAI_1X}{os.pathsep}{ROOT}",
           "TEST_EXPECT_OPENAI_MAJOR": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "acceptance" / "test_openai_sdk.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
