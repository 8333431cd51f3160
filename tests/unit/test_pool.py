"""The one pool supervisor, with real processes (`sleep`) standing in for workers."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence

from batchery.cli.server import batch_pool
from batchery.queue.pool import PoolPlan, Supervisor


class Spawned:
    def __init__(self) -> None:
        self.args: list[list[str]] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def __call__(self, args: Sequence[str]) -> subprocess.Popen[bytes]:
        self.args.append(list(args))
        proc = subprocess.Popen(["sleep", "60"])
        self.procs.append(proc)
        return proc


def test_a_fixed_pool_replaces_a_worker_that_died() -> None:
    spawned = Spawned()
    pools = Supervisor(spawned, lambda: [batch_pool(2)])
    try:
        pools.scale()
        assert pools.size("batches") == 2
        assert spawned.args == [["--no-jobs"], ["--no-jobs"]]  # permanent: no idle exit
        spawned.procs[0].kill()
        spawned.procs[0].wait()
        pools.scale()
        assert pools.size("batches") == 2 and len(spawned.procs) == 3
    finally:
        pools.stop(grace_s=5)
    assert all(p.returncode == -signal.SIGTERM for p in spawned.procs[1:])


def test_a_pool_follows_its_demand_between_min_and_max() -> None:
    spawned = Spawned()
    demand = {"n": 5}

    def plan() -> list[PoolPlan]:
        return [PoolPlan(name="ep/v1", minimum=1, maximum=3, demand=demand["n"],
                         args=("--deployment", "ep/v1"), idle_s=7.0)]

    pools = Supervisor(spawned, plan)
    try:
        pools.scale()
        assert pools.size("ep/v1") == 3  # capped at max
        # One permanent worker; the others leave by themselves once idle.
        assert [a[-2:] == ["--idle-exit", "7.0"] for a in spawned.args] == [False, True, True]
        demand["n"] = 0
        pools.scale()
        assert pools.size("ep/v1") == 3  # nobody is stopped: extra workers exit when idle
    finally:
        pools.stop(grace_s=5)


def test_a_pool_no_longer_planned_is_stopped() -> None:
    spawned = Spawned()
    wanted = [batch_pool(1)]
    pools = Supervisor(spawned, lambda: list(wanted), retire_grace_s=5)
    try:
        pools.scale()
        wanted.clear()
        pools.scale()
        assert spawned.procs[0].wait(30) == -signal.SIGTERM
        assert pools.size("batches") == 0
    finally:
        pools.stop(grace_s=5)
