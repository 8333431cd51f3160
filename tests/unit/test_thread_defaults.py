"""The CPU threads an in-process model uses per worker when its deployment does not say:
the host's cores shared out among the workers `batchery serve` runs there, at least one."""

from __future__ import annotations

import pytest

from batchery.backends import preloads
from batchery.backends.threads import HOST_WORKERS_ENV, default_threads, host_workers
from batchery.model.deployments import Deployment


@pytest.mark.parametrize(("cores", "workers", "threads"), [
    (2, 2, 1), (2, 1, 2), (16, 16, 1), (16, 4, 4), (16, 3, 5), (2, 8, 1), (1, 1, 1)])
def test_threads_are_the_cores_shared_out_among_the_workers(cores: int, workers: int,
                                                            threads: int) -> None:
    assert default_threads(cores, workers) == threads


def test_the_worker_count_comes_from_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(HOST_WORKERS_ENV, raising=False)
    assert host_workers() == 1  # a lone `batchery worker` uses every core
    monkeypatch.setenv(HOST_WORKERS_ENV, "2")
    assert host_workers() == 2
    assert default_threads(2) == 1
    monkeypatch.setenv(HOST_WORKERS_ENV, "junk")
    assert host_workers() == 1


def test_in_process_models_preload_by_default_and_the_option_overrides() -> None:
    assert preloads(Deployment(name="m", backend="sentence-transformers",
                               options={"model": "x"}))
    assert preloads(Deployment(name="m", backend="llama-cpp", options={"model_path": "x"}))
    assert not preloads(Deployment(name="m", backend="llama-cpp",
                                   options={"model_path": "x", "preload": False}))
    assert not preloads(Deployment(name="e", backend="echo"))
    assert preloads(Deployment(name="e", backend="echo", options={"preload": True}))
    assert not preloads(Deployment(name="o", backend="openai",
                                   options={"base_url": "http://x"}))


def test_preload_must_be_a_boolean() -> None:
    from batchery.backends import check_options
    from batchery.model.exceptions import ConfigError

    with pytest.raises(ConfigError, match=r"deployment 'm': options.preload must be true or "
                                          r"false, not 'yes'"):
        check_options("echo", {"preload": "yes"}, "deployment 'm'", None)
    assert check_options("echo", {"preload": False}, "deployment 'm'", None)["preload"] is False
