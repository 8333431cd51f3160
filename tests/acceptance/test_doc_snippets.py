"""Every fenced block of README.md and docs/*.md, taken from the Markdown as written: Python and
shell blocks run against a real server, YAML blocks that are Batchery configs go through
Batchery's own loaders, JSON blocks parse. So the docs cannot drift from what works.

One test per block, with the id `FILE:LLINE` (the line of its opening fence). What a block may
be told, in an HTML comment on the line right before its fence:

- `<!-- snippet: not run: REASON -->`: it cannot run here honestly (another OS, a GPU, hosts
  that do not exist); the reason is required and shown as the skip reason.
- `<!-- snippet: run by tests/PATH.py::TEST -->`: another test runs it (the test must exist).
- `<!-- snippet: with NAME, NAME -->`: a Python fragment that uses names defined earlier in
  its page (`client`, `f`, `batch`...): the test defines them first (`PRELUDES` below).
- `<!-- snippet: reference -->`: a shell list of commands rather than a flow: each command
  runs in turn and must succeed, or be refused for its object's state with one line
  (`error 409: ...`: cancelling a batch that has already ended, say), never anything else.

Everything else runs as written, with only these rewrites: `127.0.0.1:8000` and
`localhost:8000` become the test server's address; the CLI is pointed at that server by its
environment variables; the placeholders `file-...`, `batch_...`, `JOB`, `we_…` and `evt_…`
stand for the newest object of that kind at the moment the line runs; and a line that starts
a server (`scripts/serve ARGS`, `batchery serve ARGS`) starts it in the background on a free
port, with those arguments, and waits until it answers (`scripts/serve`'s `scripts/install`
step is left out: the test's environment is installed already).

Each page has one working directory (a temporary one, with a copy of `examples/`, the
`requests.jsonl` the API pages upload, and `.venv` and `scripts` linked from the checkout) and
at most one server of its own, shared by its blocks, which run in page order: a block sees the
files and objects the blocks above it made.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
RUN = SHELL | {"python"}
DATA = {"json", "jsonl", "yaml", "yml"}
# Blocks that are not code: diagrams, directory trees, PromQL, plain text.
NOT_CODE = {"", "text", "promql"}
FENCE = re.compile(r"^```([\w-]*)\s*$")
MARKER = re.compile(r"^<!--\s*snippet:\s*(.*?)\s*-->\s*$")
SERVE = re.compile(r"^\s*(?:scripts/serve|(?:\S*/)?batchery serve)\b(.*)$")

#: The server each page's blocks run against (paths relative to the page's working dir);
#: `None` for a page whose blocks need none (the `batchery keys` commands work on a file).
PAGE_SERVERS: dict[str, list[str] | None] = {
    "README.md": ["--workers", "1"],
    "docs/api.md": ["--workers", "1", "--config", "examples/deployments.yaml"],
    "docs/webhooks.md": ["--workers", "1", "--config", "examples/deployments.yaml"],
    "docs/jobs.md": ["--workers", "1", "--config", "examples/iris/config.yaml"],
    "docs/configuration.md": None,
    "docs/security.md": None,
}

#: What `<!-- snippet: with ... -->` names: Python run before the fragment, in dependency
#: order. `BASE` is the test server's root URL.
PRELUDES: dict[str, str] = {
    "openai": "import openai\n",
    "client": ("from openai import OpenAI\n"
               "client = OpenAI(base_url=BASE + '/v1', api_key='anything')\n"),
    "anthropic_client": ("import anthropic\n"
                         "anthropic_client = anthropic.Anthropic(base_url=BASE, "
                         "api_key='anything')\n"),
    "f": "f = client.files.create(file=open('requests.jsonl', 'rb'), purpose='batch')\n",
    "requests": ("requests = [{'custom_id': 'q1', 'params': {'model': 'echo', "
                 "'max_tokens': 64, 'messages': [{'role': 'user', 'content': 'Hello'}]}}]\n"),
    # a batch that is still running: 2,000 lines at 5 ms each on `echo-slow`
    "batch": ("import io as _io, json as _json\n"
              "_lines = ''.join(_json.dumps({'custom_id': f'r{i}', 'method': 'POST',\n"
              "    'url': '/v1/chat/completions', 'body': {'model': 'echo-slow',\n"
              "    'messages': [{'role': 'user', 'content': f'line {i}'}]}}) + '\\n'\n"
              "    for i in range(2000))\n"
              "_f = client.files.create(file=('slow.jsonl', _lines.encode()), purpose='batch')\n"
              "batch = client.batches.create(input_file_id=_f.id,\n"
              "    endpoint='/v1/chat/completions', completion_window='24h')\n"),
    # an ended batch of examples/requests.jsonl (two answers, one error), and a reader
    "batch_id": ("import time as _time\n"
                 "_b = client.batches.create(input_file_id=client.files.create(\n"
                 "    file=open('requests.jsonl', 'rb'), purpose='batch').id,\n"
                 "    endpoint='/v1/chat/completions', completion_window='24h')\n"
                 "while _b.status not in ('completed', 'failed', 'expired', 'cancelled'):\n"
                 "    _time.sleep(0.2)\n"
                 "    _b = client.batches.retrieve(_b.id)\n"
                 "batch_id = _b.id\n"),
    "handle": ("handled = []\n"
               "def handle(lines):\n"
               "    handled.extend(lines)\n"),
    "load": "def load(path):\n    return lambda item: item\n",
}
NEEDS = {"f": ["client"], "batch": ["client"], "batch_id": ["client"]}

#: Shell placeholders and the kind of object each stands for.
PLACEHOLDERS = {r"\bfile-\.\.\.": "file", r"\bbatch_\.\.\.": "batch", r"\bJOB\b": "job",
                r"\bwe_…": "webhook", r"\bevt_…": "event"}
NEWEST = '''"""The id of the newest object of a kind on the server the snippet runs against."""
import os, sys
import httpx
server = os.environ["_SNIPPET_SERVER"]
headers = {"Authorization": "Bearer " + os.environ.get("BATCHERY_API_KEY", "anything")}
kind = sys.argv[1]
def first(path, **params):
    got = httpx.get(server + path, params=params, headers=headers, timeout=30)
    got.raise_for_status()
    data = got.json()["data"]
    if not data:
        sys.exit(f"no {kind} on the server yet")
    return data[0]
if kind == "file":
    print(first("/v1/files", order="desc", limit=1)["id"])
elif kind == "batch":
    print(first("/v1/batches", limit=1)["id"])
elif kind == "job":
    print(first("/api/v1/jobs", limit=1)["id"])
elif kind == "webhook":
    print(first("/v1/webhook_endpoints", limit=1)["id"])
elif kind == "event":
    hook = first("/v1/webhook_endpoints", limit=1)["id"]
    print(first(f"/v1/webhook_endpoints/{hook}/deliveries", limit=1)["event_id"])
'''


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    code: str
    marker: str | None

    @property
    def id(self) -> str:
        return f"{self.page}:L{self.line}"

    def options(self) -> dict[str, str]:
        """The marker's parts: `not run`, `run by`, `with`, `reference`."""
        found: dict[str, str] = {}
        if (self.marker or "").startswith("not run"):  # the rest is the reason, `;` and all
            return {"not run": (self.marker or "")[len("not run"):].lstrip(":").strip()}
        for part in (self.marker or "").split(";"):
            part = part.strip()
            if not part:
                continue
            name = next((k for k in ("run by", "with", "reference")
                         if part == k or part.startswith((k + ":", k + " "))), None)
            assert name, f"{self.id}: unknown snippet marker {part!r}"
            found[name] = part[len(name):].lstrip(":").strip()
        return found


def extract(page: str) -> list[Block]:
    """The fenced blocks of a page, each with the marker on the line before its fence."""
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"),
                       None)
            assert end is not None, f"{page}:L{i + 1}: the fence is never closed"
            marker = MARKER.match(lines[i - 1]) if i else None
            blocks.append(Block(page, i + 1, opening.group(1).lower(),
                                "\n".join(lines[i + 1:end]) + "\n",
                                marker.group(1) if marker else None))
            i = end
        i += 1
    return blocks


BLOCKS = [b for page in PAGES for b in extract(page)]


# -- sessions: one working directory and one server per page ----------------------------------

@dataclass
class Running:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def serve(cwd: Path, args: list[str], name: str, port: int | None = None) -> Running:
    """`batchery serve ARGS` in `cwd` on `port` (a free one by default), once it answers."""
    port = port or free_port()
    log = cwd / f"{name}.log"
    argv = [sys.executable, "-m", "batchery", "serve", *args, "--port", str(port)]
    if "--data-dir" not in args:
        argv += ["--data-dir", str(cwd / f"{name}-data")]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   env=environment(cwd))
    running = Running(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise AssertionError(f"{' '.join(argv)} exited:\n{log.read_text()}")
        try:
            if httpx.get(running.url + "/healthz", timeout=1).status_code == 200:
                return running
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            running.stop()
            raise AssertionError(f"the server never answered:\n{log.read_text()}")
        time.sleep(0.1)


def environment(cwd: Path, server: str | None = None) -> dict[str, str]:
    """The process environment minus the developer's Batchery and OpenAI settings, with the
    checkout's virtual environment first on PATH, pointed at `server`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BATCHERY_", "OPENAI_", "ANTHROPIC_"))}
    env["PATH"] = f"{cwd / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    if server:
        env["_SNIPPET_SERVER"] = server
        env["BATCHERY_SERVER"] = server
    return env


@dataclass
class Session:
    page: str
    cwd: Path
    server: Running | None = None
    others: list[Running] = field(default_factory=list)
    receiver: ThreadingHTTPServer | None = None

    def url(self) -> str | None:
        args = PAGE_SERVERS.get(self.page, ["--workers", "1"])
        if args is None:
            return None
        if self.server is None:
            self.server = serve(self.cwd, args, "page-server")
        return self.server.url

    def rewrite(self, code: str, url: str | None) -> str:
        """The port rewritten to `url`'s; the example receiver `https://hooks.example.com`
        made a local one that answers 204."""
        code = rewrite_port(code, url)
        if "https://hooks.example.com" in code:
            if self.receiver is None:
                self.receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
                threading.Thread(target=self.receiver.serve_forever, daemon=True).start()
            port = self.receiver.server_address[1]
            code = code.replace("https://hooks.example.com", f"http://127.0.0.1:{port}")
        return code

    def close(self) -> None:
        for running in [*self.others, *([self.server] if self.server else [])]:
            running.stop()
        if self.receiver is not None:
            self.receiver.shutdown()
            self.receiver.server_close()


class Receiver(BaseHTTPRequestHandler):
    """The docs' webhook receiver: takes every delivery."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def workdir(path: Path) -> Path:
    shutil.copytree(ROOT / "examples", path / "examples",
                    ignore=shutil.ignore_patterns("model.pkl", "iris.csv", "__pycache__"))
    shutil.copy(ROOT / "examples" / "requests.jsonl", path / "requests.jsonl")
    for linked in (".venv", "scripts"):
        (path / linked).symlink_to(ROOT / linked)
    (path / "_newest.py").write_text(NEWEST)
    return path


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Session]]:
    made: dict[str, Session] = {}
    yield made
    for session in made.values():
        session.close()


def session_for(sessions: dict[str, Session], page: str,
                factory: pytest.TempPathFactory) -> Session:
    if page not in sessions:
        cwd = workdir(factory.mktemp(re.sub(r"\W", "-", page)))
        if page == "docs/jobs.md":  # the iris model the page's endpoint serves, and data/
            train = subprocess.run([sys.executable, "examples/iris/train.py"], cwd=cwd,
                                   capture_output=True, text=True, timeout=300)
            assert train.returncode == 0, train.stderr
            (cwd / "data").mkdir()
            shutil.copy(cwd / "examples" / "iris" / "iris.csv", cwd / "data" / "iris.csv")
        sessions[page] = Session(page, cwd)
    return sessions[page]


# -- runners ----------------------------------------------------------------------------------

def rewrite_port(code: str, url: str | None) -> str:
    if url is None:
        return code
    code = code.replace("http://127.0.0.1:8000", url).replace("http://localhost:8000", url)
    return re.sub(r"\b(?:127\.0\.0\.1|localhost):8000\b", url.removeprefix("http://"), code)


def run_python(block: Block, session: Session) -> None:
    url = session.url()
    assert url, f"{block.id}: PAGE_SERVERS gives {block.page} no server"
    names: list[str] = []
    for name in [n.strip() for n in block.options().get("with", "").split(",") if n.strip()]:
        assert name in PRELUDES, f"{block.id}: nothing defines {name!r} ({sorted(PRELUDES)})"
        for needed in [*NEEDS.get(name, []), name]:
            if needed not in names:
                names.append(needed)
    prelude = f"BASE = {url!r}\n" + "".join(PRELUDES[n] for n in names)
    script = session.cwd / f"snippet_L{block.line}.py"
    script.write_text(prelude + session.rewrite(block.code, url))
    done = subprocess.run([sys.executable, script.name], cwd=session.cwd,
                          env=environment(session.cwd, url), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (f"{block.id} failed:\n{block.code}\n"
                                  f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")


def shell_lines(block: Block) -> list[str]:
    """The commands of a shell block: continuation lines joined; for `console`, the lines
    after a `$ ` prompt."""
    text = block.code.replace("\\\n", " ")
    lines = text.splitlines()
    if block.lang == "console":
        lines = [ln[2:] for ln in lines if ln.startswith("$ ")]
    return [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def run_shell(block: Block, session: Session) -> None:
    """The block's commands, in order, in one bash with `-euo pipefail` (a reference list:
    command by command, see `run_reference`). A line that starts a server splits the block:
    the commands after it run once that server answers."""
    lines = shell_lines(block)
    own = any(SERVE.match(line) for line in lines)
    port = free_port() if own else None
    url = f"http://127.0.0.1:{port}" if own else session.url()
    env = environment(session.cwd, url)
    steps: list[list[str]] = [[]]
    for line in lines:
        started = SERVE.match(line)
        if started:  # a server of the block's own, in the background, on the port chosen
            run_step(block, session, steps[-1], env)
            session.others.append(serve(session.cwd, _split(started.group(1)),
                                        f"L{block.line}-serve", port))
            steps.append([])
            continue
        for pattern, kind in PLACEHOLDERS.items():
            line = re.sub(pattern, f'"$(python _newest.py {kind})"', line)
        steps[-1].append(session.rewrite(line, url))
    run_step(block, session, steps[-1], env)


def run_step(block: Block, session: Session, lines: list[str], env: dict[str, str]) -> None:
    if not lines:
        return
    if "reference" in block.options():
        run_reference(block, session, lines, env)
        return
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)],
                          cwd=session.cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (f"{block.id} failed:\n" + "\n".join(lines)
                                  + f"\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")


def run_reference(block: Block, session: Session, lines: list[str],
                  env: dict[str, str]) -> None:
    """Each command of the list in turn, in one shell (so that `B=...` holds for the next
    ones): each must succeed, or be refused for the state of its object (exit 1 and one line,
    `error 409: ...`: cancelling a batch that has ended, say), never anything else."""
    commands = [c for line in lines
                for c in re.split(r";\s+", re.sub(r"\s+#(\s.*)?$", "", line)) if c.strip()]
    out = session.cwd / f"reference_L{block.line}"
    out.mkdir(exist_ok=True)
    script = "".join(f"{{ {c} ; }} 2>{out}/{i}.err; echo $? >{out}/{i}.rc\n"
                     for i, c in enumerate(commands))
    done = subprocess.run(["bash", "-u", "-c", script], cwd=session.cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{block.id}: {done.stderr}"
    for i, command in enumerate(commands):
        rc = int((out / f"{i}.rc").read_text())
        said = (out / f"{i}.err").read_text().strip()
        assert rc == 0 or (rc == 1 and len(said.splitlines()) == 1
                           and said.startswith("error 409: ")), (
            f"{block.id}: `{command}` exited {rc}:\n{said}\n--- stdout\n{done.stdout}")


def _split(args: str) -> list[str]:
    import shlex

    return shlex.split(args.split("#", 1)[0])


def check_yaml(block: Block, session: Session) -> None:
    """Batchery configs go through the loaders `serve` uses; other YAML (a Prometheus
    scrape config) must parse. A list alone is a fragment of a `deployments:` list."""
    from batchery import backends
    from batchery.model import deployments
    from batchery.security import trust
    from batchery.security.auth import read_keys

    data = yaml.safe_load(block.code)
    if isinstance(data, list):
        data = {"deployments": data}
    assert isinstance(data, dict), f"{block.id}: not a YAML mapping"
    path = session.cwd / f"config_L{block.line}.yaml"
    path.write_text(yaml.safe_dump(data))
    if "keys" in data:
        assert read_keys(path), f"{block.id}: no key in the keys file"
    if data.keys() & {"deployments", "endpoints"}:
        deployments.load(path, check_options=backends.check_options)
    if data.keys() & {"security", "projects"}:
        trust.parse_policy(data, str(path))


def check_json(block: Block) -> None:
    """One JSON document, or JSON lines; `{…}` stands for an object left out."""
    text = block.code.replace("{…}", "{}")
    try:
        json.loads(text)
    except json.JSONDecodeError:
        for line in text.splitlines():
            if line.strip():
                json.loads(line)


# -- tests ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in RUN | DATA],
                         ids=lambda b: b.id)
def test_snippet(block: Block, sessions: dict[str, Session],
                 tmp_path_factory: pytest.TempPathFactory) -> None:
    options = block.options()
    if "not run" in options:
        reason = options["not run"]
        assert len(reason.split()) >= 3, f"{block.id}: say why it is not run"
        pytest.skip(f"{block.id}: {reason}")
    if "run by" in options:
        path, _, name = options["run by"].partition("::")
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), (
            f"{block.id}: {options['run by']} does not exist")
        return
    session = session_for(sessions, block.page, tmp_path_factory)
    if block.lang == "python":
        run_python(block, session)
    elif block.lang in SHELL:
        run_shell(block, session)
    elif block.lang in ("yaml", "yml"):
        check_yaml(block, session)
    else:
        check_json(block)


def test_every_block_is_handled() -> None:
    """A new block must be code this test runs or checks, or marked: a language it does not
    know, or a marker it does not understand, fails here."""
    unknown = [f"{b.id} ({b.lang})" for b in BLOCKS if b.lang not in RUN | DATA | NOT_CODE]
    assert not unknown, f"blocks of a language this test cannot run: {unknown}"
    for block in BLOCKS:
        block.options()
        if block.marker is not None:
            assert block.lang in RUN | DATA, f"{block.id}: a marker on a block that is not run"
    # the extraction finds the pages' blocks
    assert len([b for b in BLOCKS if b.lang in RUN]) >= 30


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in RUN], ids=lambda b: b.id)
def test_every_block_parses(block: Block) -> None:
    """Even a block that is not run is valid Python or shell."""
    if block.lang == "python":
        compile(block.code, block.id, "exec")
    else:
        checked = subprocess.run(["bash", "-n"], input="\n".join(shell_lines(block)),
                                 capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, f"{block.id}: {checked.stderr}"
