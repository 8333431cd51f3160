"""Loading predictors: binding by name, config merges, async methods, one thread per
predictor, the caller's context inside it, and clear errors."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchery.backends.predictor import (
    PredictorError,
    PredictorOptions,
    load_predictor,
    merge_config,
    parse_options,
)
from batchery.model.exceptions import ConfigError

_names = itertools.count()
marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="unset")


@pytest.fixture
def module(tmp_path: Path) -> Iterator[Any]:
    """Writes a predictor module; returns a function giving its options."""
    made: list[str] = []

    def write(source: str, cls: str = "P", **options: Any) -> PredictorOptions:
        name = f"predictor_mod_{next(_names)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        made.append(name)
        return parse_options({"predictor": f"{name}:{cls}", "python_path": [str(tmp_path)],
                              **options}, "options")

    saved = list(sys.path)
    yield write
    sys.path[:] = saved
    for name in made:
        sys.modules.pop(name, None)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_config_merges_deeply_and_the_job_wins() -> None:
    base = {"a": 1, "n": {"x": 1, "y": 2}, "keep": [1]}
    merged = merge_config(base, {"n": {"y": 3}, "b": 2, "keep": [2]})
    assert merged == {"a": 1, "n": {"x": 1, "y": 3}, "b": 2, "keep": [2]}
    assert base == {"a": 1, "n": {"x": 1, "y": 2}, "keep": [1]}


@pytest.mark.parametrize(("init", "expect"), [
    ("def __init__(self, config): self.seen = ('config', config)", ("config", {"k": 2})),
    ("def __init__(self, job): self.seen = ('job', job['id'])", ("job", "j1")),
    ("def __init__(self, job_spec): self.seen = ('job', job_spec['id'])", ("job", "j1")),
    ("def __init__(self, job, config): self.seen = (job['id'], config['k'])", ("j1", 2)),
    ("seen = 'none'", "none"),
])
def test_the_constructor_gets_what_it_declares(module: Any, init: str, expect: Any) -> None:
    options = module(f"""
        class P:
            {init}
            def predict(self, batch):
                return [self.seen for _ in batch]
    """, config={"k": 1})
    loaded = run(load_predictor(options, {"id": "j1", "config": {"k": 2}}))
    assert run(loaded.predict([0], "b")) == [expect]
    loaded.close()


@pytest.mark.parametrize("signature", [
    "predict(self, batch)", "predict(self, payload, batch_id)", "predict(self, batch_id, batch)",
    "predict(self, **kwargs)",
])
def test_predict_binds_by_name(module: Any, signature: str) -> None:
    body = ("return [(kwargs['batch'][0], kwargs['batch_id'])]" if "kwargs" in signature
            else "return [(locals().get('batch', locals().get('payload'))[0], "
                 "locals().get('batch_id'))]")
    options = module(f"""
        class P:
            def {signature}:
                {body}
    """)
    loaded = run(load_predictor(options, {"id": "j"}))
    (answer,) = run(loaded.predict(["item"], "b7"))
    assert answer[0] == "item"
    # A predict that takes `batch_id` (by name, or through **kwargs) is given it; one that
    # does not take it is called without it.
    takes_batch_id = "batch_id" in signature or "**kwargs" in signature
    assert answer[1] == ("b7" if takes_batch_id else None)
    loaded.close()


def test_async_predict_and_async_on_job_complete(module: Any) -> None:
    options = module("""
        import asyncio
        class P:
            calls = []
            async def predict(self, batch):
                await asyncio.sleep(0)
                return [x * 2 for x in batch]
            async def on_job_complete(self):
                P.calls.append("done")
    """)

    async def scenario() -> Any:
        loaded = await load_predictor(options, {"id": "j"})
        assert loaded.is_async and loaded.has_on_job_complete
        result = await loaded.predict([1, 2], "b")
        await loaded.on_job_complete()
        loaded.close()
        return result

    assert run(scenario()) == [2, 4]
    assert sys.modules[options.predictor.split(":")[0]].P.calls == ["done"]


def test_sync_code_runs_on_one_thread_in_the_callers_context(module: Any) -> None:
    options = module("""
        import threading
        from tests.unit.test_predictor import marker
        class P:
            def __init__(self):
                self.thread = threading.get_ident()
            def predict(self, batch):
                return [(threading.get_ident() == self.thread, marker.get())]
    """)

    async def scenario() -> Any:
        marker.set("job-42")
        loaded = await load_predictor(options, {"id": "j"})
        assert not loaded.has_on_job_complete
        result = await loaded.predict([1], "b")
        loaded.close()
        return result

    assert run(scenario()) == [(True, "job-42")]


def test_env_and_return_values(module: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREDICTOR_TEST_ENV", raising=False)
    options = module("""
        import os
        import numpy as np
        class P:
            def __init__(self):
                self.env = os.environ["PREDICTOR_TEST_ENV"]
            def predict(self, batch):
                if batch == ["dict"]:
                    return {"no": "list"}
                if batch == ["none"]:
                    return None
                if batch == ["tuple"]:
                    return (self.env,)
                return np.array([1.5, 2.5])
    """, env={"PREDICTOR_TEST_ENV": 7})
    loaded = run(load_predictor(options, {"id": "j"}))
    assert run(loaded.predict(["tuple"], "b")) == ["7"]
    assert run(loaded.predict(["none"], "b")) is None
    assert run(loaded.predict(["arr"], "b")) == [1.5, 2.5]
    with pytest.raises(PredictorError, match="predict returned dict"):
        run(loaded.predict(["dict"], "b"))
    loaded.close()


def test_loading_errors_are_clear(module: Any) -> None:
    options = module("class P:\n    def __init__(self, model_dir): pass\n"
                     "    def predict(self, batch): return batch\n")
    with pytest.raises(PredictorError, match="requires the argument 'model_dir'"):
        run(load_predictor(options, {"id": "j"}))
    with pytest.raises(PredictorError, match="has no class 'Missing'"):
        run(load_predictor(module("class P: pass\n", cls="Missing"), {"id": "j"}))
    missing = PredictorOptions(predictor="no_such_module_xyz:P")
    with pytest.raises(PredictorError, match="cannot import the predictor module"):
        run(load_predictor(missing, {"id": "j"}))
    with pytest.raises(PredictorError, match="no predict method"):
        run(load_predictor(module("class P: pass\n"), {"id": "j"}))
    with pytest.raises(ValueError, match="boom"):
        run(load_predictor(module("class P:\n    def __init__(self): raise ValueError('boom')"
                                  "\n    def predict(self, batch): pass\n"), {"id": "j"}))


@pytest.mark.parametrize(("options", "field"), [
    ({"predictor": "nocolon"}, "options.predictor"),
    ({"predictor": "m:C", "python_path": "dir"}, "options.python_path"),
    ({"predictor": "m:C", "config": [1]}, "options.config"),
    ({"predictor": "m:C", "env": {"A": {"x": 1}}}, "options.env.A"),
    ({"predictor": "m:C", "model": "x"}, "options.model"),
])
def test_bad_options_name_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_options(options, "options")


def test_relative_python_paths_resolve_against_the_base(tmp_path: Path) -> None:
    options = parse_options({"predictor": "m:C", "python_path": ["models", "/abs"]}, "o",
                            base_dir=tmp_path)
    assert options.python_path == (str(tmp_path / "models"), "/abs")
