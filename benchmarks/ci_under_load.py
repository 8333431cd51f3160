"""Run CI (or any command) with busy loops beside it, and record how it went.

    python3 benchmarks/ci_under_load.py --busy 1 --record benchmarks/RESULTS-ci-load.md

Starts `--busy` processes that spin a core each, runs the command (`bash .ci/run` by
default, in the current directory), samples the load average every 10 s, stops the busy
loops, and appends one row to the `--record` file: when, which commit, the busy loops, the
load (mean and peak of the 1-minute average), the wall time, pytest's summary line and the
exit status. The command's own output goes to `--log`.

Issue #18 asks for ten consecutive loaded runs without a flaky failure: each row is one.
Standard library only, so that it runs from a fresh clone before anything is installed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

_SUMMARY = re.compile(r"^=+ (.*\b(?:passed|failed|error|errors|no tests ran)\b.*) =+$")


def _spin() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=1, help="busy loops beside the command")
    parser.add_argument("--record", type=Path, required=True, help="append the row here")
    parser.add_argument("--log", type=Path, default=Path("ci-under-load.log"))
    parser.add_argument("command", nargs="*", default=["bash", ".ci/run"])
    args = parser.parse_args()

    loads: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(10):
            loads.append(_load())

    busy = [_spin() for _ in range(args.busy)]
    sampler = threading.Thread(target=sample, daemon=True)
    started_at = datetime.datetime.now(datetime.UTC)
    started = time.monotonic()
    sampler.start()
    try:
        with args.log.open("wb") as log:
            rc = subprocess.run(args.command, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "CI": "true"},
                                check=False).returncode
    finally:
        done.set()
        for proc in busy:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.monotonic() - started
    summary = "no pytest summary line"
    for line in args.log.read_text(errors="replace").splitlines():
        found = _SUMMARY.match(line.strip())
        if found:
            summary = found.group(1)
    mean = sum(loads) / len(loads) if loads else _load()
    peak = max(loads, default=mean)
    row = (f"| {started_at:%Y-%m-%d %H:%M} UTC | `{_commit()}` | {args.busy} | {mean:.1f} / "
           f"{peak:.1f} | {wall / 60:.1f} min | {summary} | {rc} |\n")
    if not args.record.exists():
        args.record.write_text(
            "| started | commit | busy loops | load (mean / peak) | wall | pytest | exit |\n"
            "|---|---|---:|---|---:|---|---:|\n")
    with args.record.open("a") as record:
        record.write(row)
    print(row, end="")
    return rc


if __name__ == "__main__":
    sys.exit(main())
