"""In CI a test that skips for want of a module fails instead (tests/conftest.py), except
for the few modules CI machines cannot have; elsewhere it skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import conftest

ROOT = Path(__file__).resolve().parents[2]

SUITE = '''
import pytest

def test_needs_a_missing_module():
    pytest.importorskip("batchery_no_such_module")

def test_needs_vllm():
    pytest.importorskip("vllm.batchery_no_such_module")  # missing whether vLLM is or not

def test_skips_for_another_reason():
    pytest.skip("SQLite has no busy rows")
'''
MODULE_LEVEL = '''
import pytest

pytest.importorskip("batchery_no_such_module")

def test_never_collected():
    pass
'''


def _run(tmp_path: Path, ci: str) -> str:
    """Both suites, run by a pytest of their own with this project's conftest as a plugin;
    its report."""
    (tmp_path / "test_suite.py").write_text(SUITE)
    (tmp_path / "test_module_level.py").write_text(MODULE_LEVEL)
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "-p", "no:cov", "-q", "-rA", "--continue-on-collection-errors",
         "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    return f"exit {result.returncode}\n{result.stdout}"


def test_in_ci_a_missing_module_fails_the_test_and_its_module(tmp_path: Path) -> None:
    report = _run(tmp_path, "true")
    assert report.startswith("exit 1\n"), report
    assert "FAILED test_suite.py::test_needs_a_missing_module" in report
    assert "ERROR test_module_level.py" in report  # skipped at import: its collection fails
    assert "batchery_no_such_module is missing, and CI must run this test" in report
    # vLLM (CI_MAY_LACK) and a skip for another reason stay skips.
    assert "1 failed, 2 skipped, 1 error" in report, report


def test_outside_ci_a_missing_module_skips(tmp_path: Path) -> None:
    report = _run(tmp_path, "")
    assert report.startswith("exit 0\n"), report
    assert "4 skipped" in report, report


@pytest.mark.parametrize(("value", "ci"), [
    ("true", True), ("1", True), ("yes", True), ("TRUE", True),
    ("", False), ("0", False), ("false", False), ("no", False)])
def test_what_counts_as_ci(value: str, ci: bool) -> None:
    assert conftest.is_ci(value) is ci
