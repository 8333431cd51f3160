"""`batchery run`: a one-shot batch on a private embedded store, resumable after a crash."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.markup import escape

from batchery.cli.options import ChunkSize
from batchery.cli.progress import BatchProgress
from batchery.cli.server import open_stores
from batchery.model.batches import DEFAULT_CHUNK_SIZE, Batch
from batchery.model.exceptions import ConfigError
from batchery.runtime import Runtime
from batchery.settings import Settings
from batchery.workers import worker as new_worker

console = Console(stderr=True, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command()(run)


def run(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT.jsonl", exists=True,
                                               dir_okay=False, help="Batch input file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where the results go.")],
    errors: Annotated[Path | None, typer.Option(
        "--errors", help="Where failed lines go. Default: OUTPUT.errors.jsonl.")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", exists=True, dir_okay=False, help="YAML file declaring deployments.")
    ] = None,
    chunk_size: ChunkSize = DEFAULT_CHUNK_SIZE,
) -> None:
    """Run INPUT.jsonl through the models offline and write OUTPUT. Interrupted, the same
    command picks up where it stopped."""
    state_dir = output.parent / f".{output.name}.batchery"
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / "lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(f"[red]error:[/red] another `batchery run` is writing {output}")
            raise typer.Exit(2) from None
        settings = Settings(data_dir=state_dir, config=config, chunk_size=chunk_size)
        try:
            runtime = open_stores(settings, publish_deployments=True)
        except ConfigError as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(2) from None
        try:
            batch = _run_to_end(runtime, input_path, state_dir)
        finally:
            runtime.close()
        code = _deliver(runtime, batch, output, errors or output.with_name(
            output.name + ".errors.jsonl"))
    shutil.rmtree(state_dir, ignore_errors=True)
    raise typer.Exit(code)


def _fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"input": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _endpoint_of(path: Path) -> str:
    with path.open("rb") as f:
        for raw in f:
            try:
                url = orjson.loads(raw).get("url")
            except (orjson.JSONDecodeError, AttributeError):
                continue
            if isinstance(url, str):
                return url
    return "/v1/chat/completions"


def _start_or_resume(runtime: Runtime, input_path: Path, state_dir: Path) -> str:
    state_file = state_dir / "run.json"
    fingerprint = _fingerprint(input_path)
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if state.get("fingerprint") == fingerprint:
            runtime.store.reset_leases()
            console.print(f"resuming {state['batch_id']}")
            return str(state["batch_id"])
    service = runtime.service
    with input_path.open("rb") as f:
        record = service.upload("default", f, filename=input_path.name, purpose="batch")
    batch = service.create_batch("default", input_file_id=record.id,
                                 endpoint=_endpoint_of(input_path), completion_window="7d")
    state_file.write_text(json.dumps({"fingerprint": fingerprint, "batch_id": batch.id}))
    return batch.id


def _run_to_end(runtime: Runtime, input_path: Path, state_dir: Path) -> Batch:
    batch_id = _start_or_resume(runtime, input_path, state_dir)
    config = dataclasses.replace(runtime.settings.worker_config(), poll_s=0.05)
    worker = new_worker(runtime.store, runtime.files, config)
    thread = threading.Thread(target=worker.run, name="worker", daemon=True)
    thread.start()
    try:
        with BatchProgress(console=console) as progress:
            while True:
                batch = runtime.service.get_batch("default", batch_id)
                progress.update(batch.status.value, batch.total, batch.completed, batch.failed)
                if batch.status.is_terminal:
                    return batch
                time.sleep(0.25)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/yellow] run the same command again to resume")
        raise typer.Exit(130) from None
    finally:
        worker.stop()
        thread.join()


def _deliver(runtime: Runtime, batch: Batch, output: Path, errors: Path) -> int:
    if batch.errors:
        for e in batch.errors:
            where = f"line {e.line}: " if e.line else ""
            console.print(f"[red]{where}{e.code}[/red] {e.message}")
        return 1
    _copy_out(runtime, batch.output_file_id, output)
    if batch.error_file_id:
        _copy_out(runtime, batch.error_file_id, errors)
        console.print(f"[yellow]{batch.failed} line(s) failed[/yellow]: see {errors}")
    console.print(f"{batch.completed} line(s) written to {output}")
    return 0


def _copy_out(runtime: Runtime, file_id: str | None, target: Path) -> None:
    partial = target.with_name(target.name + ".part")
    with partial.open("wb") as out:
        if file_id is not None:
            _, stream = runtime.service.open_content("default", file_id)
            with stream:
                shutil.copyfileobj(stream, out, 1 << 20)
    os.replace(partial, target)
