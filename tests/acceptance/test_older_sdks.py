"""Run the SDK suites again under the older majors, installed beside the current ones by
`scripts/install dev`: openai 1.x, and anthropic 0.x (which sends `X-Api-Key`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("package", "major", "suite"), [
    ("openai", "1", "test_openai_sdk.py"),
    ("openai", "1", "test_line_validation.py"),
    ("openai", "1", "test_responses_batches.py"),
    ("openai", "1", "test_azure_sdk.py"),
    ("anthropic", "0", "test_anthropic_sdk.py"),
])
def test_older_major_passes_the_same_suite(package: str, major: str, suite: str) -> None:
    target = ROOT / ".cache" / f"{package}{major}"
    if not (target / package).is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{package} {major}.x is not installed in {target} (scripts/test does it)")
        pytest.skip(f"{package} {major}.x is not installed; run scripts/test")
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{ROOT}",
           f"TEST_EXPECT_{package.upper()}_MAJOR": major}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "acceptance" / suite)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
