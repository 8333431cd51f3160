"""The echo benchmark on two commits of Batchery, in one run: is the new engine slower?

Each commit is checked out (`git worktree`) into a temporary directory, and
`benchmarks/bench_echo.py` *of that commit* runs there with `PYTHONPATH` pointing at it, so
the server and workers it starts import that commit's code (the same virtual environment
serves both). The two are run alternately, `--rounds` times each (A B A B …), so that what
else the machine does weighs on both alike; the figures are the medians of the end-to-end
lines per second, each run also against its own bare loop.

    .venv/bin/python benchmarks/bench_engine_compare.py --old 1c07256 --new HEAD \\
        --lines 200000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def checkout(commit: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), commit],
                   check=True, capture_output=True)
    cache = ROOT / ".cache"
    if cache.exists() and not (where / ".cache").exists():
        (where / ".cache").symlink_to(cache)
    return where


def run_once(tree: Path, lines: int, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, str(tree / "benchmarks" / "bench_echo.py"),
                    "--lines", str(lines), "--profiler", "none", "--json", str(out)],
                   check=True, cwd=tree, env=env, stdout=subprocess.DEVNULL)
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="the commit before the change")
    parser.add_argument("--new", default="HEAD")
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batchery-compare-") as tmp:
        trees = {name: checkout(commit, Path(tmp) / name)
                 for name, commit in (("old", args.old), ("new", args.new))}
        runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
        try:
            for i in range(args.rounds):
                for name in ("old", "new"):
                    report = run_once(trees[name], args.lines, Path(tmp) / f"{name}-{i}.json")
                    runs[name].append(report)
                    print(f"round {i + 1} {name}: {report['batchery']['lines_per_s']:,} lines/s"
                          f" (ratio to its bare loop {report['ratio']})", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(tree)], check=False, capture_output=True)
    summary = {name: {"lines_per_s": statistics.median(r["batchery"]["lines_per_s"]
                                                        for r in reports),
                      "ratio_to_bare_loop": statistics.median(r["ratio"] for r in reports)}
               for name, reports in runs.items()}
    summary["new_over_old"] = round(summary["new"]["lines_per_s"]
                                    / summary["old"]["lines_per_s"], 3)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"old": args.old, "new": args.new, "lines": args.lines,
                                         "rounds": args.rounds, "summary": summary,
                                         "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
