"""The coverage gate's wiring: CI's run (`scripts/test` with no arguments) measures branch
coverage of the package, servers and workers included, and fails below a floor that is a
real number, not zero. The gate itself acts in that run."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_whole_suite_is_measured_and_has_a_floor() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["coverage"]
    assert config["run"]["branch"] is True
    assert config["run"]["source"] == ["batchery"]
    assert "subprocess" in config["run"]["patch"]
    assert config["report"]["fail_under"] >= 50
    script = (ROOT / "scripts" / "test").read_text()
    whole = script.split('if [ $# -eq 0 ]; then', 1)[1].split("fi", 1)[0]
    assert "pytest --cov" in whole and "--cov-fail-under=0" not in whole
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("exec scripts/test")
