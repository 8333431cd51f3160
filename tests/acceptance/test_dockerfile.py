"""The Dockerfile's build, done without a Docker engine (none runs on CI machines): the
files its COPY lines name, and only those, go into a fresh virtual environment with its
default extras, as its build stage does; then its ENTRYPOINT starts, with the keys file
its usage comment creates. A file the image needs but the Dockerfile forgets to copy, an
extra that does not exist, or an entrypoint option that `serve` refuses fails here.

What this cannot check without an engine: the base image, the apt step, and the user the
container runs as."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of each line of the Dockerfile, continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def build_stage() -> list[tuple[str, str]]:
    """The instructions of the first (build) stage."""
    stages: list[list[tuple[str, str]]] = []
    for word, rest in instructions():
        if word == "FROM":
            stages.append([])
        stages[-1].append((word, rest))
    return stages[0]


def test_the_dockerfile_names_only_extras_that_exist() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    default = dict(rest.split("=", 1) for word, rest in build_stage() if word == "ARG")["EXTRAS"]
    assert default.split(",") and set(default.split(",")) <= set(extras)
    usage = re.findall(r"EXTRAS=([\w,]+)", DOCKERFILE.read_text())
    for named in usage:
        assert set(named.split(",")) <= set(extras), named


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv built as the Dockerfile's build stage builds /opt/batchery."""
    tmp = tmp_path_factory.mktemp("image")
    context = tmp / "src"
    context.mkdir()
    extras = ""
    for word, rest in build_stage():
        if word == "ARG" and rest.startswith("EXTRAS="):
            extras = rest.split("=", 1)[1]
        if word == "COPY":
            *sources, target = shlex.split(rest)
            where = context / target if target not in ("./", ".") else context
            where.mkdir(parents=True, exist_ok=True)
            for source in sources:
                path = ROOT / source
                if path.is_dir():
                    shutil.copytree(path, where, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(path, where / path.name)
    venv = tmp / "opt-batchery"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-cache-dir",
                           f"{context}[{extras}]"], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return venv


def _entrypoint() -> list[str]:
    (args,) = [rest for word, rest in instructions() if word == "ENTRYPOINT"]
    parsed: list[str] = json.loads(args)
    return parsed


def test_the_image_serves_with_the_keys_file_its_usage_creates(image: Path,
                                                              tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()  # the image makes /data
    env = {**os.environ, "PATH": f"{image / 'bin'}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    # The usage comment's `keys create`, with /data where the volume is.
    usage = re.search(r"--entrypoint batchery batchery \\\n#\s+(keys create[^\n]*)",
                      DOCKERFILE.read_text())
    assert usage, "the Dockerfile's usage no longer shows `keys create`"
    created = subprocess.run(["batchery", *shlex.split(usage.group(1).replace("/data", str(data)))],
                             capture_output=True, text=True, env=env, timeout=60)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    command = [arg.replace("/data", str(data)) for arg in _entrypoint()]
    port = free_port()
    command[command.index("--port") + 1] = str(port)
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen([*command, "--keys-file", str(data / "keys.yaml"),
                                "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                               env=env, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert models.status_code == 200
        assert "echo" in [m["id"] for m in models.json()["data"]]
        # The server is the image's own install, not this checkout, and its data is
        # in the volume.
        assert shutil.which("batchery", path=env["PATH"]) == str(image / "bin" / "batchery")
        where = subprocess.run([str(image / "bin" / "python"), "-c",
                                "import batchery; print(batchery.__file__)"],
                               capture_output=True, text=True, env=env, cwd=tmp_path)
        assert where.stdout.startswith(str(image)), where
        assert (data / "batchery.db").exists()
    finally:
        process.terminate()
        process.wait(30)
        log.close()
