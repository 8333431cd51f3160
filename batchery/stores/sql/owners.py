"""The owners of a config file's deployments and endpoints (`model.owners`): servers, their
heartbeats, and publishing a config without replacing what another live server declared."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from batchery.model.deployments import CONFIG, Deployment, Endpoint
from batchery.model.owners import STALE_AFTER_S, OwnershipConflict, ServerIdentity
from batchery.stores.sql.job_store import deployment_row, endpoint_row
from batchery.stores.sql.tables import config_owners, deployments, endpoints, servers

#: A transaction-scoped PostgreSQL advisory lock: servers publish one at a time.
_PUBLISH_LOCK = 0x62617463_6F776E


class SqlOwnerStore:
    engine: Engine

    def publish_config(self, items: Sequence[Deployment], declared: Sequence[Endpoint],
                       owner: ServerIdentity, *, take_over: bool = False,
                       now: float | None = None) -> list[str]:
        """Record `owner` and write its config's deployments and endpoints. What it
        declared before and no longer does goes; what another server declared stays. A
        name another live server declared differently is refused (`OwnershipConflict`,
        one sentence per name) unless `take_over`; one whose owner stopped or went silent
        is taken over. Returns a sentence per name taken over."""
        now = time.time() if now is None else now
        claims = _claims(items, declared)
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"),
                             {"key": _PUBLISH_LOCK})
            _upsert_server(conn, owner, now)
            current = {(r["kind"], r["name"]): r for r in conn.execute(
                sa.select(config_owners, servers.c.host, servers.c.config, servers.c.pid,
                          servers.c.last_seen, servers.c.stopped_at)
                .join(servers, servers.c.id == config_owners.c.server_id, isouter=True)
            ).mappings()}
            conflicts, notes, taken = [], [], []
            for key, digest in claims.items():
                row = current.get(key)
                if row is None or row["server_id"] == owner.id:
                    taken.append(key)
                elif row["digest"] == digest:
                    continue  # declared the same way: its owner keeps it
                elif _live(row, now) and not take_over:
                    conflicts.append(_conflict(key, row, now))
                else:
                    notes.append(_taking(key, row, now))
                    taken.append(key)
            if conflicts:
                raise OwnershipConflict(conflicts)
            kept = {k for k, r in current.items()
                    if r["server_id"] != owner.id and k not in taken}
            _replace(conn, items, declared, kept)
            conn.execute(config_owners.delete().where(config_owners.c.server_id == owner.id))
            for kind, name in taken:
                conn.execute(config_owners.delete().where(
                    (config_owners.c.kind == kind) & (config_owners.c.name == name)))
            if taken:
                conn.execute(config_owners.insert(), [
                    {"kind": kind, "name": name, "server_id": owner.id,
                     "digest": claims[(kind, name)]} for kind, name in taken])
        return notes

    def heartbeat_server(self, server_id: str, now: float | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(servers.update().where(servers.c.id == server_id).values(
                last_seen=time.time() if now is None else now, stopped_at=None))

    def stop_server(self, server_id: str, now: float | None = None) -> None:
        """The server stopped cleanly: what it declared may be taken over at once."""
        with self.engine.begin() as conn:
            conn.execute(servers.update().where(servers.c.id == server_id).values(
                stopped_at=time.time() if now is None else now))


def _claims(items: Sequence[Deployment],
            declared: Sequence[Endpoint]) -> dict[tuple[str, str], str]:
    """(kind, name) -> digest of the declaration, for the deployments outside endpoints
    and the endpoints with their deployments."""
    claims = {("deployment", d.name): _digest(deployment_row(d))
              for d in items if d.endpoint is None}
    for e in declared:
        members = [deployment_row(d) for d in items if d.endpoint == e.name]
        row = {k: v for k, v in endpoint_row(e).items() if k != "created_at"}
        claims[("endpoint", e.name)] = _digest({"endpoint": row, "deployments": members})
    return claims


def _digest(value: Any) -> str:
    return hashlib.sha256(orjson.dumps(_unsealed(value), option=orjson.OPT_SORT_KEYS)
                          ).hexdigest()


def _unsealed(value: Any) -> Any:
    """Sealed credentials differ on every seal: a declaration's digest ignores them."""
    if isinstance(value, dict):
        if len(value) == 1 and next(iter(value)) == "$sealed":
            return "<sealed>"
        return {k: _unsealed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unsealed(v) for v in value]
    return value


def _upsert_server(conn: Connection, owner: ServerIdentity, now: float) -> None:
    values = {"host": owner.host, "config": owner.config, "pid": owner.pid,
              "started_at": now, "last_seen": now, "stopped_at": None}
    if conn.execute(servers.update().where(servers.c.id == owner.id)
                    .values(**values)).rowcount == 0:
        conn.execute(servers.insert().values(id=owner.id, **values))


def _live(row: Any, now: float) -> bool:
    return (row["last_seen"] is not None and row["stopped_at"] is None
            and now - row["last_seen"] < STALE_AFTER_S)


def _who(row: Any) -> str:
    return (f"the server on {row['host']} (config {row['config'] or 'none'}, "
            f"pid {row['pid']})")


def _conflict(key: tuple[str, str], row: Any, now: float) -> str:
    kind, name = key
    return (f"{kind} '{name}' is declared differently by {_who(row)}, which is running "
            f"(seen {max(0, now - row['last_seen']):.0f} s ago) and owns it: declare it the "
            f"same way, remove it from this config, stop that server, or pass --take-over")


def _taking(key: tuple[str, str], row: Any, now: float) -> str:
    kind, name = key
    if row["last_seen"] is None:
        why = "which is no longer recorded"
    elif row["stopped_at"] is not None:
        why = "which stopped"
    elif now - row["last_seen"] >= STALE_AFTER_S:
        why = f"not seen for {now - row['last_seen']:.0f} s"
    else:
        why = "which is running (--take-over)"
    return f"taking over {kind} '{name}' from {_who(row)}, {why}"


def _replace(conn: Connection, items: Sequence[Deployment], declared: Sequence[Endpoint],
             kept: set[tuple[str, str]]) -> None:
    """Write the config's rows. Config rows of other servers (`kept`) stay; the rest of
    the config rows (this server's earlier ones, or unowned) go, as does any name the
    API took that the config now declares."""
    names = [d.name for d in items] + [e.name for e in declared]
    kept_deployments = [n for k, n in kept if k == "deployment"]
    kept_endpoints = [n for k, n in kept if k == "endpoint"]
    conn.execute(deployments.delete().where(sa.or_(
        (deployments.c.source == CONFIG) & deployments.c.name.not_in(kept_deployments)
        & (deployments.c.endpoint.is_(None) | deployments.c.endpoint.not_in(kept_endpoints)),
        deployments.c.name.in_(names),
        deployments.c.endpoint.in_([e.name for e in declared]))))
    conn.execute(endpoints.delete().where(sa.or_(
        (endpoints.c.source == CONFIG) & endpoints.c.name.not_in(kept_endpoints),
        endpoints.c.name.in_(names))))
    if items:
        conn.execute(deployments.insert(), [deployment_row(d) for d in items])
    if declared:
        conn.execute(endpoints.insert(), [endpoint_row(e) for e in declared])
