from __future__ import annotations

from batchery.cli import main

main()
