"""`docs/promises.md` names the tests that hold each promise of the docs; every one must exist,
so that the list cannot point at a test that was renamed or removed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMISES = ROOT / "docs" / "promises.md"

# `tests/path/to/test_x.py::test_name`, as the list writes each test (parametrised ones by their
# base name, so no `[...]` suffix).
REFERENCE = re.compile(r"`(tests/[\w/.-]+\.py)::(\w+)`")


def references() -> list[tuple[str, str]]:
    return REFERENCE.findall(PROMISES.read_text(encoding="utf-8"))


def test_the_list_names_tests() -> None:
    found = references()
    assert len(found) >= 100, f"{PROMISES} names only {len(found)} tests"
    # A reference the pattern misses (a typo in the form) would silently go unchecked.
    loose = re.findall(r"`tests/[^`]*::[^`]*`", PROMISES.read_text(encoding="utf-8"))
    assert len(loose) == len(found), sorted(set(loose) - {f"`{p}::{n}`" for p, n in found})


def test_every_listed_test_exists() -> None:
    missing = []
    for path, name in sorted(set(references())):
        source = ROOT / path
        if not source.is_file():
            missing.append(f"{path}::{name} (no such file)")
        elif not re.search(rf"^\s*(?:async\s+)?def {name}\(", source.read_text(encoding="utf-8"),
                           re.MULTILINE):
            missing.append(f"{path}::{name} (no function of that name in the file)")
    assert not missing, "docs/promises.md names tests that do not exist:\n" + "\n".join(missing)
