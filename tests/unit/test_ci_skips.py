"""In CI a test that skips for want of a module fails instead (tests/conftest.py), except
for the few modules CI machines cannot have."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def _run(tmp_path: Path, source: str, ci: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_suite.py").write_text(source)
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "-p", "no:cov", "-q", "-rA", "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_in_ci_a_missing_module_fails_the_test(tmp_path: Path, ci: str) -> None:
    result = _run(tmp_path, SUITE, ci)
    assert result.returncode == 1, result.stdout
    assert "FAILED test_suite.py::test_needs_a_missing_module" in result.stdout
    assert "batchery_no_such_module is missing, and CI must run this test" in result.stdout
    assert "SKIPPED" in result.stdout and "1 failed, 2 skipped" in result.stdout, result.stdout


def test_in_ci_a_module_level_import_skip_fails_collection(tmp_path: Path) -> None:
    result = _run(tmp_path, MODULE_LEVEL, "true")
    assert result.returncode != 0, result.stdout
    assert "ERROR test_suite.py" in result.stdout, result.stdout
    assert "batchery_no_such_module is missing" in result.stdout


@pytest.mark.parametrize("ci", ["", "false"])
def test_outside_ci_a_missing_module_skips(tmp_path: Path, ci: str) -> None:
    result = _run(tmp_path, SUITE, ci)
    assert result.returncode == 0, result.stdout
    assert "3 skipped" in result.stdout, result.stdout
