"""What a deployment needs from a Ray cluster (`resources`): read from the config file,
kept in the store with its pool, and turned into Ray's actor options; and the pool
supervisor letting go of workers an executor never placed. The cluster itself is
exercised in tests/acceptance/test_ray.py."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from batchery.cli import server as server_cli
from batchery.executors.ray_executor import RayExecutor, WorkerLoop, _needs, _why_pending
from batchery.model.deployments import (
    API,
    Resources,
    WorkerPoolSpec,
    parse,
    parse_deployment,
    parse_resources,
    widest,
)
from batchery.model.exceptions import ConfigError
from batchery.queue.pool import PoolPlan, Supervisor
from batchery.stores.sql.store import SqlStore


def test_resources_are_read_with_sizes_and_custom_names() -> None:
    found = parse_resources({"num_cpus": 0.5, "num_gpus": 1, "memory": "4GiB",
                             "custom": {"special": 1}}, "r")
    assert found == Resources(num_cpus=0.5, num_gpus=1.0, memory=4 * 2**30,
                              custom={"special": 1.0})
    assert parse_resources({"memory": "512MB"}, "r").memory == 512 * 10**6
    assert parse_resources({"memory": 1024}, "r").memory == 1024


@pytest.mark.parametrize(("raw", "message"), [
    ({"special": 1}, r"r: expected a mapping of num_cpus, num_gpus, memory, custom \(a "
                     r"cluster's own resources go under 'custom'\)"),
    ({}, "r: expected a mapping"),
    ({"num_cpus": -1}, r"r\.num_cpus: expected a number of at least 0"),
    ({"num_gpus": True}, r"r\.num_gpus: expected a number"),
    ({"memory": "lots"}, r"r\.memory: expected a number of bytes, or a size such as 4GiB"),
    ({"memory": 0}, r"r\.memory: expected a number of bytes"),
    ({"custom": {"special": 0}}, r"r\.custom: expected a mapping of resource names to "
                                 r"positive amounts"),
    ({"custom": ["special"]}, r"r\.custom: expected a mapping"),
])
def test_bad_resources_say_where_and_what(raw: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_resources(raw, "r")


def test_a_deployment_carries_its_resources_in_its_pool() -> None:
    catalog = parse({"endpoints": [{"name": "ep", "deployments": [
        {"name": "v1", "backend": "python", "options": {"predictor": "m:P"},
         "workers": {"min": 1, "max": 4}, "resources": {"num_gpus": 1}},
        {"name": "v2", "backend": "python", "options": {"predictor": "m:P"},
         "resources": {"custom": {"special": 1}}}]}]})
    first, second = catalog.deployments
    assert first.workers == WorkerPoolSpec(min=1, max=4,
                                           resources=Resources(num_gpus=1.0))
    # Without `workers`, the default pool, now with the resources.
    assert second.workers == WorkerPoolSpec(resources=Resources(custom={"special": 1.0}))
    assert second.workers.to_dict()["resources"] == {"custom": {"special": 1.0}}
    with pytest.raises(ConfigError, match=r"d\.resources: only the config file declares"):
        parse_deployment({"name": "x", "backend": "python", "options": {"predictor": "m:P"},
                          "resources": {"num_gpus": 1}}, "d", source=API)


def test_batch_workers_need_the_most_any_batch_deployment_asks_for(tmp_path: Path) -> None:
    """A batch worker may run any deployment's lines: on a cluster, it asks for the widest
    of their resources; a job deployment's own are its pool's alone."""
    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'b.db'}")
    try:
        store.set_deployments(parse({"deployments": [
            {"name": "big", "backend": "echo", "resources": {"num_gpus": 1, "memory": 10}},
            {"name": "wide", "backend": "echo",
             "resources": {"num_cpus": 2, "memory": 20, "custom": {"a": 1}}},
            {"name": "plain", "backend": "echo"},
            {"name": "job", "backend": "python", "options": {"predictor": "m:P"},
             "resources": {"num_gpus": 8}}]}).deployments)
        assert server_cli.batch_resources(store) == Resources(
            num_cpus=2.0, num_gpus=1.0, memory=20, custom={"a": 1.0})
        assert widest([]) is None
        plan = server_cli.batch_pool(2, server_cli.batch_resources(store))
        assert plan.resources == plan.version  # other resources: the pool is started anew
    finally:
        store.close()


def test_the_store_keeps_a_pool_s_resources(tmp_path: Path) -> None:
    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'b.db'}")
    try:
        [deployment] = parse({"deployments": [
            {"name": "gpu", "backend": "python", "options": {"predictor": "m:P"},
             "workers": {"max": 2},
             "resources": {"num_gpus": 0.5, "memory": "1GiB", "custom": {"a100": 1}}}]},
        ).deployments
        store.set_deployments([deployment])
        [read] = [d for d in store.list_deployments() if d.name == "gpu"]
        assert read.workers == deployment.workers
        plain = parse({"deployments": [{"name": "cpu", "backend": "python",
                                        "options": {"predictor": "m:P"}}]}).deployments
        store.set_deployments(plain)
        assert [d.workers for d in store.list_deployments() if d.name == "cpu"] == [None]
    finally:
        store.close()


def _never_run(args: Sequence[str], worker_id: str, host: str) -> WorkerLoop:
    raise AssertionError("no actor is started here")


def test_actor_options_ask_for_a_fraction_of_a_cpu_unless_told() -> None:
    executor = RayExecutor("127.0.0.1:1", _never_run)
    assert executor.actor_options(None) == {"num_cpus": 0.25}
    options = executor.actor_options(Resources(num_cpus=2, num_gpus=1, memory=2**30,
                                               custom={"special": 1}))
    assert options == {"num_cpus": 2, "num_gpus": 1, "memory": 2**30,
                       "resources": {"special": 1}}
    assert _needs(options) == {"CPU": 2.0, "GPU": 1.0, "memory": float(2**30),
                               "special": 1.0}


def test_a_pending_worker_says_whether_any_node_could_hold_it() -> None:
    nodes = [{"CPU": 2.0, "special": 1.0}, {"CPU": 1.0, "other": 1.0}]
    assert _why_pending({"CPU": 0.25, "special": 1.0}, nodes) == \
        "waiting for Ray to place it on a node with CPU 0.25, special 1 free"
    assert _why_pending({"CPU": 0.25, "GPU": 1.0}, nodes) == (
        "no node of the Ray cluster has CPU 0.25, GPU 1; it waits for one to join (Ray's "
        "autoscaler adds one if it can)")


class Unplaced(subprocess.Popen[bytes]):
    """A real process that an executor would report as not placed yet."""

    placed = False


def test_workers_never_placed_are_let_go_when_their_pool_needs_fewer() -> None:
    procs: list[Unplaced] = []

    def spawn(args: Sequence[str]) -> Unplaced:
        procs.append(Unplaced(["sleep", "60"]))
        return procs[-1]

    demand = {"n": 3}
    pools = Supervisor(spawn, lambda: [PoolPlan(name="ep/v1", minimum=1, maximum=3,
                                                demand=demand["n"], args=())])
    try:
        pools.scale()
        assert pools.size("ep/v1") == 3
        demand["n"] = 1
        pools.scale()
        # Two go, the permanent one is kept; none is started in their place.
        assert pools.size("ep/v1") == 1 and len(procs) == 3
        assert sorted(p.wait(30) for p in procs[1:]) == [-signal.SIGKILL] * 2
        assert procs[0].poll() is None
    finally:
        pools.stop(grace_s=5)
