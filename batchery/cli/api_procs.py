"""The extra API processes of `batchery serve --api-workers N`.

`serve` binds the listening socket once, serves on it itself, and starts N - 1 more
processes that inherit the socket and serve the same app on it: the kernel hands each new
connection to whichever process accepts it first. The API keeps no state of its own between
requests (it is all in the store), so any process may answer any request. Each extra process
stops when `serve` stops, and is sent SIGTERM by the kernel if `serve` dies (even by
SIGKILL); one that dies on its own is started again.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time

from starlette.types import ASGIApp

from batchery.settings import Settings

log = logging.getLogger("batchery")

#: The child's orders, from `serve`: base64 of a pickled `_Orders`.
ORDERS_ENV = "BATCHERY_API_PROCESS"
#: How long a process that died waits before it is started again, in seconds.
RESTART_S = 1.0


class _Orders:
    def __init__(self, settings: Settings, log_level: str, fd: int) -> None:
        self.settings, self.log_level, self.fd = settings, log_level, fd


class ApiProcesses:
    """`count` processes serving the API on `sock`, beside the one that bound it."""

    def __init__(self, count: int, sock: socket.socket, settings: Settings,
                 log_level: str) -> None:
        self.count, self.sock = count, sock
        self._orders = base64.b64encode(pickle.dumps(
            _Orders(settings, log_level, sock.fileno()))).decode()
        self._procs: list[subprocess.Popen[bytes]] = []
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        from batchery.cli.server import POOL_PARENT_ENV

        env = {**os.environ, ORDERS_ENV: self._orders, POOL_PARENT_ENV: str(os.getpid())}
        return subprocess.Popen([sys.executable, "-m", "batchery.cli.api_procs"], env=env,
                                pass_fds=(self.sock.fileno(),))

    def start(self) -> None:
        if self.count <= 0:
            return
        self._procs = [self._spawn() for _ in range(self.count)]
        self._watcher = threading.Thread(target=self._watch, name="api-processes",
                                         daemon=True)
        self._watcher.start()

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _watch(self) -> None:
        while not self._stopping.wait(RESTART_S):
            for i, proc in enumerate(self._procs):
                code = proc.poll()
                if code is not None and not self._stopping.is_set():
                    log.warning("API process %d exited (code %s); starting another", proc.pid,
                                code)
                    self._procs[i] = self._spawn()

    def terminate(self) -> None:
        """Ask the processes to stop (SIGTERM: they finish the requests in hand)."""
        self._stopping.set()
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the processes, and wait for them: SIGTERM, then SIGKILL."""
        self.terminate()
        if self._watcher is not None:
            self._watcher.join()
            self.terminate()  # one the watcher started meanwhile
        deadline = time.monotonic() + timeout_s
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def serve(app: ASGIApp, settings: Settings, *, host: str, port: int, log_level: str,
          processes: int) -> None:
    """Serve `app` on `host:port` in this process and, with `processes` > 1, in as many
    processes in all. Returns when a signal (or a failed start) stops the server."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(),
                            timeout_graceful_shutdown=5)
    # Start-up's objects live as long as the process: keep the collector off them.
    gc.collect()
    gc.freeze()
    if processes <= 1:
        server = uvicorn.Server(config)
        server.run()
        if not server.started:  # the port was taken, say: exit as `uvicorn.run` would
            raise SystemExit(3)
        return
    sock = config.bind_socket()
    others = ApiProcesses(processes - 1, sock, settings, log_level)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # Here, not after `run` returns: uvicorn re-raises the signal that stopped it.
            others.terminate()
            await super().shutdown(sockets)
            await asyncio.to_thread(others.stop)

    others.start()
    server = Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        others.stop()
        sock.close()
    if not server.started:
        raise SystemExit(3)


def _main() -> None:
    import uvicorn

    from batchery.api.app import create_app
    from batchery.cli.server import _exit_with_pool_parent, _logging
    from batchery.runtime import open_runtime
    from batchery.security.auth import KeyRing

    orders: _Orders = pickle.loads(base64.b64decode(os.environ.pop(ORDERS_ENV)))
    _logging(orders.log_level)
    _exit_with_pool_parent()
    settings = orders.settings
    runtime = open_runtime(settings)
    app = create_app(runtime, KeyRing.load(settings.keys_file))
    sock = socket.socket(fileno=orders.fd)
    config = uvicorn.Config(app, log_level=orders.log_level.lower(),
                            timeout_graceful_shutdown=5)
    gc.collect()
    gc.freeze()
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        runtime.close()


if __name__ == "__main__":
    _main()
