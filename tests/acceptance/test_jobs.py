"""The native job API end to end: a real `batchery serve` with endpoints of test
predictors, its per-deployment worker pools, and plain HTTP."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.acceptance.jobs_support import Jobs, deployment, write_config
from tests.conftest import Server, start_server
from tests.helpers import by_label, eventually, metric_samples

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def marks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("marks")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, marks: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("jobs-server")
    config = write_config(root / "config.yaml", [
        {"name": "nums", "default_deployment": "v1", "deployments": [
            deployment("v1", "Doubler", {"marks": str(marks)}),
            deployment("conf", "ConfigEcho", {"a": 1, "nested": {"x": 1, "y": 2}}),
            deployment("async", "AsyncEcho"),
            deployment("writer", "Writer"),
            deployment("crashy", "KillsItself", {"flag": str(marks / "died")},
                       workers={"min": 1, "max": 2, "idle_seconds": 3}),
        ]},
        {"name": "chat", "deployments": [{"name": "e1", "backend": "echo"}]},
    ])
    # Short leases: a killed worker's batch comes back within seconds.
    server = start_server(root, "--config", str(config), "--workers", "1",
                          "--lease-seconds", "2", name="jobs")
    yield server
    server.stop()


@pytest.fixture
def jobs(server: Server) -> Iterator[Jobs]:
    client = Jobs(server.base_url)
    yield client
    client.http.close()


def test_items_job_runs_on_three_workers_and_on_job_complete_runs_once(
        jobs: Jobs, marks: Path) -> None:
    job = jobs.submit("nums", {"item_list": {"items": list(range(30)), "batch_size": 2},
                               "workers": 3, "config": {"sleep": 0.2}})
    assert job["status"] in ("pending", "enqueuing", "running")
    assert job["deployment"] == "v1"
    done = jobs.wait(job["id"])
    assert done["status"] == "succeeded", jobs.logs(job["id"])
    assert done["total_batch_count"] == 15
    assert done["batch_metrics"]["succeeded"] == 15 and done["batch_metrics"]["failed"] == 0
    assert done["batch_metrics"]["average_time_per_batch"] >= 0.2
    assert done["item_counts"] == {"total": 30, "succeeded": 30, "failed": 0}
    # The results are ordered by batch (docs/jobs.md), however the three workers' batches
    # ended: batch i holds items 2i and 2i+1, so the rows come in item order.
    rows = jobs.results(job["id"])
    assert [r["batch_id"] for r in rows] == [f"{job['id']}:{i // 2}" for i in range(30)]
    assert [r["index"] for r in rows] == list(range(30))
    assert all(r["prediction"] == {"double": r["item"] * 2} for r in rows)
    calls = (marks / "on_job_complete").read_text().splitlines()
    assert [c for c in calls if c.endswith(job["id"])] and \
        len([c for c in calls if c.endswith(job["id"])]) == 1
    # Up to its 3 workers took part (how many depends on how soon the pool starts them: two
    # at once inside `predict` is held by test_one_engine_jobs.py's waits), and together
    # they ran every batch once.
    workers = jobs.listing(f"/jobs/{job['id']}/workers")
    assert 1 <= len({w["pid"] for w in workers}) <= 3
    assert sum(w["batches_done"] for w in workers) == 15
    log = jobs.logs_with(job["id"], "batch 14: succeeded")
    for expected in ("completed enqueuing a total of 15 batches", "[job_predictors] batch",
                     "batch 14: succeeded", "executing on_job_complete",
                     "[job_predictors] on_job_complete of", "job ended: succeeded"):
        assert expected in log


def test_config_merges_and_arguments_bind_by_name(jobs: Jobs) -> None:
    job = jobs.submit("nums", {"item_list": {"items": [1], "batch_size": 1},
                               "deployment": "conf", "config": {"nested": {"y": 3}, "b": 2}})
    assert jobs.wait(job["id"])["status"] == "succeeded"
    (row,) = jobs.results(job["id"])
    assert row["prediction"] == {"a": 1, "nested": {"x": 1, "y": 3}, "b": 2}

    job = jobs.submit("nums", {"item_list": {"items": ["a", "b", "c"], "batch_size": 2},
                               "deployment": "async"})
    assert jobs.wait(job["id"])["status"] == "succeeded"
    rows = jobs.results(job["id"])
    assert [r["prediction"]["item"] for r in sorted(rows, key=lambda r: r["index"])] == \
        ["a", "b", "c"]
    assert all(r["prediction"]["job"] == job["id"] for r in rows)
    assert all(r["prediction"]["batch_id"] == r["batch_id"] for r in rows)


def test_failing_batches_become_dead_letters_with_tracebacks(jobs: Jobs) -> None:
    items = [1, {"fail": True}, 3, 4, {"fail": True}, 6]
    job = jobs.submit("nums", {"item_list": {"items": items, "batch_size": 1},
                               "max_retries": 1})
    done = jobs.wait(job["id"])
    assert done["status"] == "completed_with_failures"
    assert done["batch_metrics"]["succeeded"] == 4
    assert done["batch_metrics"]["failed"] == 4  # two batches, two attempts each
    assert done["item_counts"] == {"total": 6, "succeeded": 4, "failed": 2}
    dead = jobs.listing(f"/jobs/{job['id']}/failed_batches")
    assert [d["index"] for d in dead] == [1, 4]
    assert all(d["attempts"] == 2 for d in dead)
    assert all("Traceback" in d["error"] and "ValueError: refusing item" in d["error"]
               for d in dead)
    # The traceback starts at the predictor's frames; Batchery's and asyncio's are folded.
    for d in dead:
        frames = [line for line in d["error"].splitlines() if line.startswith("  File ")]
        assert frames and all("job_predictors.py" in line for line in frames), d["error"]
        assert "frames of batchery/asyncio folded" in d["error"]
    metrics = done["batch_metrics"]
    assert (metrics["batches_succeeded"], metrics["batch_attempts_failed"],
            metrics["batches_dead_lettered"], metrics["items_succeeded"],
            metrics["items_failed"]) == (4, 4, 2, 4, 2)
    assert metrics["avg_time_per_batch"] == metrics["seconds_per_succeeded_batch"] \
        == metrics["average_time_per_batch"]
    assert len(jobs.results(job["id"])) == 4
    with open(f"{done['output_path']}/failed_batches.jsonl", "rb") as saved:
        letters = [orjson.loads(line) for line in saved]
    assert [(d["index"], d["items"], d["attempts"]) for d in letters] == [
        (1, [{"fail": True}], 2), (4, [{"fail": True}], 2)]
    assert all("ValueError" in d["error"] for d in letters)
    log = jobs.logs_with(job["id"], "out of retries: it is now a dead letter")
    assert "out of retries: it is now a dead letter" in log
    # The predictor's own lines go to this job's log, and no other job's do.
    assert f"[job_predictors] batch {job['id']}:" in log
    assert all(job["id"] in line for line in log.splitlines()
               if "[job_predictors] batch" in line)


def test_error_threshold_fails_the_job(jobs: Jobs) -> None:
    items: list[object] = [{"fail": True}, *range(40)]
    job = jobs.submit("nums", {"item_list": {"items": items, "batch_size": 1},
                               "max_retries": 0, "error_threshold": 0, "workers": 1,
                               "config": {"sleep": 0.05}})
    done = jobs.wait(job["id"])
    assert done["status"] == "failed"
    assert "error_threshold of 0" in done["error"]
    assert done["batch_metrics"]["succeeded"] < 40  # the rest never ran


def test_timeout_gives_timed_out(jobs: Jobs) -> None:
    job = jobs.submit("nums", {"item_list": {"items": list(range(20)), "batch_size": 1},
                               "workers": 1, "timeout": 1.5, "config": {"sleep": 0.5}})
    done = jobs.wait(job["id"])
    assert done["status"] == "timed_out"
    assert 0 < done["batch_metrics"]["succeeded"] < 20


def test_stop_ends_the_job_and_no_new_batch_starts(jobs: Jobs) -> None:
    job = jobs.submit("nums", {"item_list": {"items": list(range(50)), "batch_size": 1},
                               "workers": 2, "config": {"sleep": 0.3}})
    jobs.wait_for(job["id"], lambda j: j["batch_metrics"]["succeeded"] >= 2)
    stopped = jobs.http.delete(f"/jobs/{job['id']}")
    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
    done = jobs.wait(job["id"])
    assert done["status"] == "stopped"
    succeeded = done["batch_metrics"]["succeeded"]
    assert succeeded < 50
    time.sleep(1.0)
    assert jobs.get(job["id"])["batch_metrics"]["succeeded"] == succeeded
    assert len(jobs.results(job["id"])) == succeeded
    again = jobs.http.delete(f"/jobs/{job['id']}")
    assert again.status_code == 409


def test_a_worker_killed_mid_batch_has_its_batch_redelivered_exactly_once(
        jobs: Jobs) -> None:
    job = jobs.submit("nums", {"item_list": {"items": list(range(6)), "batch_size": 1},
                               "workers": 1, "config": {"sleep": 1.0}})
    busy = None
    deadline = time.monotonic() + 30
    while busy is None and time.monotonic() < deadline:
        busy = next((w for w in jobs.listing(f"/jobs/{job['id']}/workers")
                     if w["state"] == "running"), None)
        time.sleep(0.05)
    assert busy is not None
    os.kill(busy["pid"], signal.SIGKILL)
    done = jobs.wait(job["id"])
    assert done["status"] == "succeeded"
    rows = jobs.results(job["id"])
    assert sorted(r["index"] for r in rows) == list(range(6))  # each exactly once
    # The killed attempt was not the batch's fault: it costs no retry.
    assert done["batch_metrics"]["failed"] == 0 and done["batch_metrics"]["dead_letters"] == 0
    states = {w["pid"]: w["state"] for w in jobs.listing(f"/jobs/{job['id']}/workers")}
    assert states[busy["pid"]] == "failed"
    assert "stopped renewing its lease" in jobs.logs_with(job["id"], "stopped renewing")


def test_a_predictor_that_kills_its_process_shows_in_worker_states(
        jobs: Jobs, marks: Path) -> None:
    job = jobs.submit("nums", {"item_list": {"items": ["a", "die", "b"], "batch_size": 1},
                               "deployment": "crashy"})
    done = jobs.wait(job["id"])
    assert done["status"] == "succeeded", jobs.logs(job["id"])
    assert (marks / "died").exists()
    assert sorted(r["prediction"] for r in jobs.results(job["id"])) == \
        ["ok:a", "ok:b", "ok:die"]
    states = [w["state"] for w in jobs.listing(f"/jobs/{job['id']}/workers")]
    assert "failed" in states


def test_summary_only_predictors_write_their_own_output(jobs: Jobs, tmp_path: Path) -> None:
    job = jobs.submit("nums", {"item_list": {"items": [1, 2, 3], "batch_size": 2},
                               "deployment": "writer", "output": "summary_only",
                               "output_path": str(tmp_path / "out")})
    done = jobs.wait(job["id"])
    assert done["status"] == "succeeded"
    assert done["output_path"] == str(tmp_path / "out" / job["id"])
    written = sorted(p.name for p in (tmp_path / "out" / job["id"]).iterdir())
    assert written == [f"{job['id']}_0.txt", f"{job['id']}_1.txt"]
    assert jobs.http.get(f"/jobs/{job['id']}/results").status_code == 409


@pytest.mark.parametrize(("body", "param", "words"), [
    ({}, "item_list", "exactly one input"),
    ({"item_list": {"items": [1], "batch_size": 1},
      "delimited_files": {"paths": ["x"], "batch_size": 1}}, "delimited_files", "not item_list"),
    ({"item_list": {"items": [], "batch_size": 1}}, "item_list.items", "non-empty list"),
    ({"item_list": {"items": [1]}}, "item_list.batch_size", "required"),
    ({"item_list": {"items": [1], "batch_size": 1}, "deployment": "nope"}, "deployment",
     "no deployment named 'nope'"),
    ({"item_list": {"items": [1], "batch_size": 1}, "workers": 0}, "workers", "from 1 to"),
    ({"item_list": {"items": [1], "batch_size": 1}, "colour": "red"}, "colour",
     "Unknown field"),
    ({"file_path_lister": {"paths": ["/nonexistent-dir-xyz/"], "batch_size": 1}},
     "file_path_lister.paths", ""),
    ({"file_path_lister": {"paths": ["."], "includes": ["[abc"], "batch_size": 1}},
     "file_path_lister.includes[0]", ""),
])
def test_bad_submissions_get_400_naming_the_field(jobs: Jobs, body: dict[str, object],
                                                  param: str, words: str) -> None:
    response = jobs.http.post("/endpoints/nums/jobs", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]


def test_unknown_endpoint_is_404(jobs: Jobs) -> None:
    response = jobs.http.post("/endpoints/missing/jobs",
                              json={"item_list": {"items": [1], "batch_size": 1}})
    assert response.status_code == 404


def test_delimited_csv_and_parquet_and_file_listing(jobs: Jobs, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.csv").write_text("x,y\n1,2\n3,4\n5,6\n")
    pq.write_table(pa.table({"x": [7, 8], "y": [9, 10]}), data / "sub" / "b.parquet")
    (data / "skip.csv").write_text("x,y\n100,100\n")
    (data / "notes.txt").write_text("hello")

    dry = jobs.submit("nums", {"delimited_files": {
        "paths": [str(data)], "includes": ["**.csv", "**.parquet"],
        "excludes": ["skip*"], "batch_size": 2}, "dry_run": True})
    assert dry["files"] == [str(data / "a.csv"), str(data / "sub" / "b.parquet")]
    assert dry["total_items"] == 5 and dry["total_batch_count"] == 3

    job = jobs.submit("nums", {"delimited_files": {
        "paths": [str(data)], "includes": ["**.csv", "**.parquet"],
        "excludes": ["skip*"], "batch_size": 2}, "deployment": "conf"})
    assert jobs.wait(job["id"])["status"] == "succeeded"
    rows = jobs.results(job["id"])  # ordered by batch: in item order
    assert [r["item"] for r in rows] == [{"x": 1, "y": 2}, {"x": 3, "y": 4}, {"x": 5, "y": 6},
                                         {"x": 7, "y": 9}, {"x": 8, "y": 10}]

    job = jobs.submit("nums", {"file_path_lister": {
        "paths": [str(data)], "excludes": ["**.parquet"], "batch_size": 10},
        "deployment": "conf"})
    assert jobs.wait(job["id"])["status"] == "succeeded"
    assert sorted(r["item"] for r in jobs.results(job["id"])) == sorted(
        str(data / n) for n in ("a.csv", "skip.csv", "notes.txt"))


def test_logs_follow_streams_lines_as_they_happen(jobs: Jobs, server: Server) -> None:
    job = jobs.submit("nums", {"item_list": {"items": list(range(8)), "batch_size": 1},
                               "workers": 1, "config": {"sleep": 0.4}})
    seen: list[tuple[float, str]] = []
    with httpx.stream("GET", f"{server.base_url}/api/v1/jobs/{job['id']}/logs",
                      params={"follow": "true"}, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            seen.append((time.monotonic(), line))
    ended = jobs.get(job["id"])
    assert ended["status"] == "succeeded"
    first_success = next(t for t, line in seen if "batch 0: succeeded" in line)
    last_success = next(t for t, line in seen if "batch 7: succeeded" in line)
    # Lines arrived as the batches ran, not all at the end.
    assert last_success - first_success > 1.5
    assert any("job ended: succeeded" in line for _, line in seen[-3:])


def test_endpoints_are_managed_over_rest_and_usable_as_models(jobs: Jobs,
                                                              server: Server) -> None:
    listed = {e["name"]: e for e in jobs.listing("/endpoints")}
    assert listed["nums"]["default_deployment"] == "v1"
    created = jobs.http.post("/endpoints", json={
        "name": "live", "deployments": [deployment("one", "Doubler"),
                                        deployment("two", "ConfigEcho", {"v": 2})]})
    assert created.status_code == 200, created.text
    assert created.json()["default_deployment"] == "one"
    assert jobs.http.post("/endpoints", json={"name": "live", "deployments": [
        deployment("one", "Doubler")]}).status_code == 409
    added = jobs.http.post("/endpoints/live/deployments", json=deployment("three", "Doubler"))
    assert added.status_code == 200, added.text
    switched = jobs.http.patch("/endpoints/live", json={"default_deployment": "two"})
    assert switched.json()["default_deployment"] == "two"
    job = jobs.submit("live", {"item_list": {"items": [1], "batch_size": 1}})
    assert job["deployment"] == "two"
    assert jobs.wait(job["id"])["status"] == "succeeded"
    assert jobs.results(job["id"])[0]["prediction"] == {"v": 2}
    assert jobs.http.delete("/endpoints/nums").status_code == 403  # from the config file
    for method, path, body, status in [
        ("POST", "/endpoints", {"name": "x"}, 400),
        ("POST", "/endpoints", {"name": "x", "deployments": [{"name": "a", "backend": "python",
                                                              "options": {}}]}, 400),
        ("POST", "/endpoints", {"name": "x", "deployments": [{"name": "a", "backend": "magic"}]},
         400),
        ("PATCH", "/endpoints/live", {"default_deployment": "nope"}, 404),
        ("PATCH", "/endpoints/live", {"default_deployment": 3}, 400),
        ("POST", "/endpoints/missing/deployments", deployment("a", "Doubler"), 404),
        ("POST", "/endpoints/live/deployments", deployment("one", "Doubler"), 409),
    ]:
        answer = jobs.http.request(method, path, json=body)
        assert answer.status_code == status, (method, path, answer.text)
        assert answer.json()["error"]["message"]
    assert jobs.http.delete("/endpoints/live").status_code == 200

    # The OpenAI path: a line's model may name an endpoint (its default deployment).
    output = _one_line_batch(server, "/v1/chat/completions", {
        "model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    assert output["response"]["status_code"] == 200


def test_jobs_are_listed_with_filters_and_pages(jobs: Jobs) -> None:
    ids = [jobs.submit("nums", {"item_list": {"items": [1], "batch_size": 1},
                                "deployment": "conf"})["id"] for _ in range(3)]
    for job_id in ids:
        jobs.wait(job_id)
    page = jobs.http.get("/jobs", params={"endpoint": "nums", "limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    older = jobs.http.get("/jobs", params={"endpoint": "nums", "limit": 2,
                                           "after": page["last_id"]}).json()
    assert older["data"][0]["id"] == ids[0]
    succeeded = jobs.http.get("/jobs", params={"status": "succeeded"}).json()["data"]
    assert all(j["status"] == "succeeded" for j in succeeded)
    assert jobs.http.get("/jobs", params={"status": "nope"}).status_code == 400


def test_batch_timeout_fails_the_attempt(jobs: Jobs) -> None:
    job = jobs.submit("nums", {"item_list": {"items": [1, 2], "batch_size": 1},
                               "batch_timeout": 0.3, "max_retries": 0, "workers": 1,
                               "config": {"sleep": 1.0}})
    done = jobs.wait(job["id"])
    assert done["status"] == "completed_with_failures"
    dead = jobs.listing(f"/jobs/{job['id']}/failed_batches")
    assert len(dead) == 2
    assert all("batch_timeout of 0.3s" in d["error"] for d in dead)


def test_pools_scale_to_zero_and_metrics_show_jobs(jobs: Jobs, server: Server) -> None:
    job = jobs.submit("nums", {"item_list": {"items": [1, 2, 3], "batch_size": 1},
                               "deployment": "conf", "dry_run": False})
    assert jobs.wait(job["id"])["status"] == "succeeded"
    dry = jobs.http.post("/endpoints/nums/jobs", params={"dry_run": "true"},
                         json={"item_list": {"items": [1, 2, 3], "batch_size": 2}})
    assert dry.json()["total_batch_count"] == 2
    # `conf` has min 0, idle_seconds 3: once idle, its workers exit; `crashy` keeps min 1.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "nums/conf" in _pool_workers(server):
        time.sleep(0.5)
    running = _pool_workers(server)
    assert "nums/conf" not in running
    assert running.count("nums/crashy") == 1
    # The gauges hold the counts the API shows (the collector prints every label, even at
    # 0: the values are what is checked). Jobs of other tests may still be ending: the two
    # must agree at some moment.
    def agreeing() -> dict[str, float] | None:
        listed = _all_jobs(jobs)
        samples = metric_samples(server.base_url)
        by_status = by_label(samples, "batchery_jobs", "status")
        expected = {s: float(sum(j["status"] == s for j in listed)) for s in by_status}
        succeeded = sum(j["batch_metrics"]["succeeded"] for j in listed)
        batches = by_label(samples, "batchery_job_batches", "state")
        agree = (by_status == expected and sum(by_status.values()) == len(listed)
                 and batches["succeeded"] == succeeded)
        return by_status if agree else None

    by_status = eventually(agreeing, "/metrics to agree with the jobs listed")
    assert by_status["succeeded"] >= 1


def _all_jobs(jobs: Jobs) -> list[dict[str, Any]]:
    """Every job of the server, page by page."""
    found: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
        response = jobs.http.get("/jobs", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        found += page["data"]
        if not page["has_more"]:
            return found
        after = page["last_id"]


def _pool_workers(server: Server) -> list[str]:
    """The deployments of the worker processes `batchery serve` runs now."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == server.process.pid and b"--deployment" in args:
            found.append(args[args.index(b"--deployment") + 1].decode())
    return found


def test_a_python_endpoint_answers_batch_lines(server: Server) -> None:
    """A line whose model is an endpoint with a `python` default deployment: the body is
    the item, the prediction the response body."""
    output = _one_line_batch(server, "/v1/embeddings", {"model": "nums", "input": "hello"})
    assert output["response"]["body"] == {"seen": {"model": "nums", "input": "hello"}}


def _one_line_batch(server: Server, url: str, body: dict[str, object]) -> dict[str, object]:
    """Runs a one-line OpenAI batch through the SDK; returns its output line."""
    from openai import OpenAI

    with OpenAI(base_url=server.v1, api_key="k") as client:
        line = orjson.dumps({"custom_id": "r1", "method": "POST", "url": url, "body": body})
        upload = client.files.create(file=("in.jsonl", line + b"\n"), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint=url,
                                      completion_window="24h")
        deadline = time.monotonic() + 60
        while batch.status not in ("completed", "failed") and time.monotonic() < deadline:
            time.sleep(0.2)
            batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.output_file_id, batch
        output: dict[str, object] = client.files.content(batch.output_file_id).json()
        return output
