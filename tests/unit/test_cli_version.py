"""`batchery --version` prints the package's version and nothing else."""

from __future__ import annotations

import subprocess
import sys

from batchery import __version__


def test_version_prints_the_package_version() -> None:
    done = subprocess.run([sys.executable, "-m", "batchery", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"batchery {__version__}\n"
