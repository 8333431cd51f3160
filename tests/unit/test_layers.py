"""The package's layers hold: `lint-imports` checks the contracts of pyproject.toml
(docs/architecture.md explains them), and a broken one fails here with its report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Every contract the config must declare, by name: deleting one is as wrong as breaking it.
CONTRACTS = ("Each layer imports only the layers below it",
             "Products and the lease core get their stores injected")


def lint_imports() -> subprocess.CompletedProcess[str]:
    # The script beside this interpreter: the one installed with the dev extra.
    command = [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)


def test_every_layer_contract_is_kept() -> None:
    result = lint_imports()
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"an import breaks a layer contract:\n{report}"
    for name in CONTRACTS:
        assert f"{name} KEPT" in report, f"the contract '{name}' was not checked:\n{report}"
