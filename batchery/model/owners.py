"""Who declared what: each deployment and endpoint of a config file has one owner, the
`batchery serve` that published it. A second server on the same store may not silently
replace what a live server declared."""

from __future__ import annotations

from dataclasses import dataclass

from batchery.model.exceptions import ConfigError

#: How often a server says it is alive, in seconds.
HEARTBEAT_S = 10.0
#: A server not seen for this long (and any server that stopped) no longer holds its
#: declarations: the next server that declares them differently takes them over.
STALE_AFTER_S = 60.0


@dataclass(frozen=True, kw_only=True)
class ServerIdentity:
    """A server as its declarations' owner. `id` stays the same across restarts: the
    generated id kept in the data directory, and the config file's path."""

    id: str
    host: str
    config: str | None
    pid: int

    def describe(self) -> str:
        return f"the server on {self.host} (config {self.config or 'none'}, pid {self.pid})"


class OwnershipConflict(ConfigError):
    """A config declares, differently, what another live server owns: one sentence per
    name in `lines`."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines
