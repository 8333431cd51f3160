"""What a job shows its user: tracebacks that start at their code, and `batch_metrics`
whose names say what they count."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from batchery.api.job_wire import batch_metrics
from batchery.api.responses import JobBatchMetrics
from batchery.jobs.runner import readable_traceback
from batchery.model.jobs import BatchMetrics, InputKind, Job, JobInput, JobOptions

USER_CODE = '''
def helper(x):
    raise ValueError(f"refusing {x}")


def predict(x):
    return helper(x)
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    (tmp_path / "my_predictor.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_predictor", raising=False)
    import my_predictor  # type: ignore[import-not-found]

    return my_predictor


def _raised_through_asyncio(module: object) -> BaseException:
    async def run() -> object:
        return await asyncio.to_thread(module.predict, 3)  # type: ignore[attr-defined]

    try:
        asyncio.run(run())
    except ValueError as exc:
        return exc
    raise AssertionError("predict did not raise")


def test_a_traceback_starts_at_the_users_frames_with_ours_folded(user_module: object) -> None:
    shown = readable_traceback(_raised_through_asyncio(user_module))
    lines = shown.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: refusing 3"
    assert "my_predictor.py\", line 7, in predict" in shown
    assert "my_predictor.py\", line 3, in helper" in shown
    folded = [line for line in lines if "frames of batchery/asyncio folded" in line]
    assert folded and all(line.strip().startswith("… ") for line in folded)
    assert "asyncio/" not in shown and "/batchery/" not in shown.replace("batchery/asyncio", "")


def test_a_traceback_without_a_user_frame_is_kept_whole() -> None:
    try:
        asyncio.run(asyncio.sleep("soon"))  # type: ignore[arg-type]
    except TypeError as exc:
        # As the runner catches it: from a frame of Batchery's, so without this test's.
        assert exc.__traceback__ is not None
        error = exc.with_traceback(exc.__traceback__.tb_next)
    shown = readable_traceback(error)
    assert "folded" not in shown and "asyncio" in shown and shown.startswith("Traceback")


def test_chained_exceptions_keep_both_parts(user_module: object) -> None:
    try:
        try:
            user_module.predict(1)  # type: ignore[attr-defined]
        except ValueError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as exc:
        shown = readable_traceback(exc)
    assert "ValueError: refusing 1" in shown and shown.rstrip().endswith("RuntimeError: wrapped")
    assert "direct cause of the following exception" in shown


def test_batch_metrics_name_batches_attempts_and_items() -> None:
    job = Job(id="job_1", project="p", endpoint="e", deployment="v1",
              input=JobInput(kind=InputKind.ITEM_LIST, batch_size=1, items=[1, 2, 3, 4, 5]),
              options=JobOptions(), output_path="/tmp/out", items_succeeded=3, items_failed=2,
              metrics=BatchMetrics(succeeded=3, failed=5, dead_letters=2, total_time_s=1.5))
    shown = batch_metrics(job)
    assert shown == {"succeeded": 3, "failed": 5, "dead_letters": 2,
                     "average_time_per_batch": 0.5, "avg_time_per_batch": 0.5,
                     "batches_succeeded": 3, "batch_attempts_failed": 5,
                     "batches_dead_lettered": 2, "items_succeeded": 3, "items_failed": 2,
                     "seconds_per_succeeded_batch": 0.5}
    JobBatchMetrics.model_validate(shown)
    schema = JobBatchMetrics.model_json_schema()["properties"]
    assert set(schema) == set(shown)
    assert all(schema[name].get("description") for name in shown)
    assert "attempts, not batches" in schema["failed"]["description"]
