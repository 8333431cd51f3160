"""The iris example as its README runs it: train, serve its config, score items and the
CSV file as two jobs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.acceptance.jobs_support import Jobs
from tests.conftest import start_server

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "iris"


def test_the_iris_example_scores_items_and_a_csv_file(tmp_path: Path) -> None:
    from sklearn.datasets import load_iris

    model, data = tmp_path / "model.pkl", tmp_path / "iris.csv"
    subprocess.run([sys.executable, str(EXAMPLE / "train.py"), "--out", str(model),
                    "--csv", str(data)], check=True, capture_output=True)
    # As the README serves it: a data directory of its own.
    readme = (EXAMPLE / "README.md").read_text()
    assert "--config examples/iris/config.yaml --data-dir data/iris" in readme
    server = start_server(tmp_path, "--config", str(EXAMPLE / "config.yaml"), "--workers", "1",
                          "--data-dir", str(tmp_path / "data" / "iris"))
    jobs = Jobs(server.base_url)
    config = {"model_path": str(model)}  # the job's config wins over the deployment's
    try:
        items = [[5.1, 3.5, 1.4, 0.2], [6.4, 3.2, 4.5, 1.5], [6.3, 3.3, 6.0, 2.5]]
        job = jobs.submit("iris", {"item_list": {"items": items, "batch_size": 2},
                                   "config": config})
        assert jobs.wait(job["id"])["status"] == "succeeded", jobs.logs(job["id"])
        rows = sorted(jobs.results(job["id"]), key=lambda r: r["index"])
        assert [r["prediction"]["label"] for r in rows] == ["setosa", "versicolor",
                                                            "virginica"]

        job = jobs.submit("iris", {"delimited_files": {"paths": [str(data)], "batch_size": 50},
                                   "config": {**config, "threshold": 0.0}})
        done = jobs.wait(job["id"])
        assert done["status"] == "succeeded" and done["total_batch_count"] == 3
        rows = sorted(jobs.results(job["id"]), key=lambda r: r["index"])
        names = list(load_iris().target_names)
        truth = [names[t] for t in load_iris().target]
        right = sum(r["prediction"]["label"] == t for r, t in zip(rows, truth, strict=True))
        assert right / len(truth) >= 0.95
        log = jobs.logs(job["id"])
        assert "[iris_predictor] batch" in log and "complete: 3 batches" in log, log
    finally:
        jobs.http.close()
        server.stop()
