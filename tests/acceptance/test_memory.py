"""Bounded memory, measured: a batch of several hundred MB through a real `batchery serve`
(upload, validation, execution, finalization, download) raises no process's peak RSS
beyond what a 10 MB batch took on the same server, plus a margin set by the chunk.

The peak is the kernel's own high-water mark of each process (`VmHWM` in
/proc/PID/status), read and started again at every phase boundary, so no peak between two
polls is missed and each phase gets its own figure. The bound is measured, not guessed:
the small batch runs first on the same processes, and the highest peak of any process of a
role in it is that role's baseline. A process that held the file, its output, or 50 bytes
per line of the big batch (1.1 million lines) would pass it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import Server

pytestmark = [pytest.mark.slow,
              # About a minute on 2 idle cores; room for a machine that runs other suites.
              pytest.mark.timeout(900),
              pytest.mark.skipif(not Path("/proc/self/status").is_file(),
                                 reason="reads peak RSS from /proc")]

#: Requests per chunk (the default): a chunk here is about 250 KB of input.
CHUNK_SIZE = 1000
#: What a process may hold beyond the small batch's peak: a few chunks' input, parsed
#: bodies and answers, the duplicate check's fixed buffer, and the allocator's slack. The
#: big batch is 30 times the small one: 1.2 million lines, so that even 50 bytes a line
#: held anywhere would pass the margin.
MARGIN_MB = 48.0
SMALL_MB, BIG_MB = 10, 300
#: Padding in each request's message, which `echo` answers back: lines of about 250 bytes.
PAD = "m" * 120


def write_input(path: Path, megabytes: int, prefix: str) -> int:
    """A batch file of about `megabytes` MB, written a block at a time; its line count."""
    n = 0
    with path.open("wb") as out:
        while out.tell() < megabytes * 1_000_000:
            block = bytearray()
            for _ in range(1000):
                block += orjson.dumps({
                    "custom_id": f"{prefix}-{n}", "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": "echo", "max_tokens": 4,
                             "messages": [{"role": "user", "content": f"{n} {PAD}"}]}})
                block += b"\n"
                n += 1
            out.write(block)
    return n


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise KeyError("VmHWM")


def process_tree(root: int) -> dict[int, str]:
    """`root` and every process below it, with a short role (`serve`, `worker`, ...)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry)] = int(_stat_fields(int(entry))[1])
    found, frontier = [root], {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
        found += sorted(frontier)
    roles = {}
    for pid in found:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                args = cmdline.read().split(b"\0")
            roles[pid] = next((r.decode() for r in (b"serve", b"worker") if r in args),
                              args[0].decode(errors="replace").rsplit("/", 1)[-1])
    return roles


def reset_peak(pid: int) -> bool:
    """Start `pid`'s high-water mark again from its present RSS (Linux 4.0 and later)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


@dataclass
class Peaks:
    """The peak RSS of every process of a server in each phase: read at each phase
    boundary, where the high-water mark starts again (where the kernel allows it; else each
    figure is the peak so far, which the bound below holds to just the same)."""

    root: int
    roles: dict[int, str] = field(default_factory=dict)
    #: (phase that just ended, {pid: peak RSS in MB in that phase}).
    marks: list[tuple[str, dict[int, float]]] = field(default_factory=list)
    per_phase: bool = True

    def mark(self, phase: str | None) -> None:
        """Read every peak (`phase` None: only start them again)."""
        self.roles.update(process_tree(self.root))
        now = {}
        for pid in self.roles:
            with contextlib.suppress(OSError, KeyError):
                now[pid] = peak_rss_mb(pid)
                self.per_phase &= reset_peak(pid)
        if phase is not None:
            self.marks.append((phase, now))

    def highest(self, prefix: str, role: str) -> float:
        """The highest peak of any process of `role` in the phases of one batch."""
        return max((mb for phase, peaks in self.marks if phase.startswith(prefix)
                    for pid, mb in peaks.items() if self.roles[pid] == role), default=0.0)

    def table(self) -> str:
        pids = sorted(self.roles, key=lambda pid: (self.roles[pid] != "serve", pid))
        rows = ["phase                    " + "".join(
            f"{self.roles[pid]:>9} {pid:<7}" for pid in pids)]
        for phase, peaks in self.marks:
            rows.append(f"{phase:<25}" + "".join(
                f"{peaks[pid]:>14.1f} MB" if pid in peaks else f"{'-':>17}" for pid in pids))
        return "\n".join(rows)


def run_batch(server: Server, source: Path, target: Path, lines: int, prefix: str,
              mark: Callable[[str | None], None]) -> None:
    """Upload, create, wait through each status, download to disk: a peak read after each."""
    with httpx.Client(base_url=server.v1, timeout=600,
                      headers={"Authorization": "Bearer test"}) as client:
        with source.open("rb") as body:
            upload = client.post("/files", data={"purpose": "batch"},
                                 files={"file": (source.name, body, "application/jsonl")})
        assert upload.status_code == 200, upload.text
        mark(f"{prefix}: upload")
        batch = client.post("/batches", json={
            "input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}).json()
        status = batch["status"]
        deadline = time.monotonic() + 900
        while status not in ("completed", "failed", "expired", "cancelled"):
            assert time.monotonic() < deadline, f"batch stuck in {status}"
            time.sleep(0.2)
            batch = client.get(f"/batches/{batch['id']}").json()
            if batch["status"] != status:
                mark(f"{prefix}: {status}")
                status = batch["status"]
        assert status == "completed", batch
        assert batch["request_counts"]["completed"] == lines, batch["request_counts"]
        count = 0
        with target.open("wb") as out, \
                client.stream("GET", f"/files/{batch['output_file_id']}/content") as answer:
            assert answer.status_code == 200
            for block in answer.iter_bytes(1 << 20):
                out.write(block)
                count += block.count(b"\n")
        mark(f"{prefix}: download")
        assert count == lines


def test_peak_memory_is_set_by_the_chunk_not_the_file(server_factory: Callable[..., Server],
                                                       tmp_path: Path) -> None:
    small_lines = write_input(tmp_path / "small.jsonl", SMALL_MB, "s")
    big_lines = write_input(tmp_path / "big.jsonl", BIG_MB, "b")
    # `echo` alone: the figures are Batchery's, not those of model weights the workers would
    # load ahead (the default deployments include real models when their extras are in).
    config = tmp_path / "echo.yaml"
    config.write_text("deployments:\n  - name: echo\n    backend: echo\n")
    server = server_factory("--workers", "2", "--chunk-size", str(CHUNK_SIZE),
                            "--config", str(config))
    peaks = Peaks(server.process.pid)
    deadline = time.monotonic() + 120
    while list(process_tree(server.process.pid).values()).count("worker") < 2:
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.2)

    big = f"{BIG_MB} MB"
    try:
        peaks.mark(None)
        run_batch(server, tmp_path / "small.jsonl", tmp_path / "small.out", small_lines,
                  "10 MB", peaks.mark)
        run_batch(server, tmp_path / "big.jsonl", tmp_path / "big.out", big_lines, big,
                  peaks.mark)
    finally:  # about 2 GB in all, which pytest would keep for the last three runs
        for name in ("small.jsonl", "small.out", "big.jsonl", "big.out"):
            (tmp_path / name).unlink(missing_ok=True)
        shutil.rmtree(server.data_dir / "files", ignore_errors=True)
    how = "VmHWM, reset at each boundary" if peaks.per_phase else "VmHWM so far"
    print(f"\npeak RSS in each phase ({how}); {small_lines} then {big_lines} lines, chunks "
          f"of {CHUNK_SIZE}\n{peaks.table()}")

    # Workers take turns at validating and finalizing, so each process is held to the
    # highest peak of any process of its role (the server, being one, to its own) in the
    # small batch's phases.
    roles = set(peaks.roles.values())
    assert {"serve", "worker"} <= roles
    base = {role: peaks.highest("10 MB", role) for role in roles}
    over = [f"{peaks.roles[pid]} {pid} in {phase}: {mb:.1f} MB"
            for phase, found in peaks.marks if phase.startswith(big)
            for pid, mb in found.items() if mb > base[peaks.roles[pid]] + MARGIN_MB]
    assert not over, (f"peak RSS past the 10 MB batch's ({base}) + {MARGIN_MB} MB: {over}")
