"""Run the Anthropic SDK suite again under anthropic 0.x (which sends `X-Api-Key`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ANTHROPIC_0X = ROOT / ".cache" / "anthropic0"


def test_anthropic_0x_passes_the_same_suite() -> None:
    if not (ANTHROPIC_0X / "anthropic").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"anthropic 0.x is not installed in {ANTHROPIC_0X} (scripts/test does it)")
        pytest.skip("anthropic 0.x is not installed; run scripts/test")
    env = {**os.environ, "PYTHONPATH": f"{ANTHROPIC_0X}{os.pathsep}{ROOT}",
           "TEST_EXPECT_ANTHROPIC_MAJOR": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "acceptance" / "test_anthropic_sdk.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
