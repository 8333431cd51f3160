"""Idempotency keys on SQLAlchemy Core: mixed into `SqlStore`, whose engine it shares.

`take_key` runs inside the transaction that inserts the key's object: the key's primary key
decides which of two concurrent creates makes the object. On PostgreSQL the second insert
waits for the first transaction and then does nothing; on SQLite transactions take turns
(`BEGIN IMMEDIATE`). Either way the loser reads the winner's committed row."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, RowMapping

from batchery.model.idempotency import KEY_TTL_S, IdempotencyKey
from batchery.ports.idempotency import IdempotencyKeys
from batchery.stores.sql.tables import idempotency_keys


class SqlIdempotencyStore(IdempotencyKeys):
    engine: Engine

    def find_key(self, project: str, kind: str, key: str, *,
                 newer_than: float) -> IdempotencyKey | None:
        with self.engine.begin() as conn:
            row = conn.execute(idempotency_keys.select().where(
                _named(project, kind, key),
                idempotency_keys.c.created_at >= newer_than)).mappings().first()
        return _key(row) if row else None

    def prune_keys(self, older_than: float) -> int:
        with self.engine.begin() as conn:
            return conn.execute(idempotency_keys.delete().where(
                idempotency_keys.c.created_at < older_than)).rowcount


def take_key(conn: Connection, key: IdempotencyKey) -> IdempotencyKey | None:
    """Take `key` for its object in the caller's transaction: None when taken (insert the
    object), else the record that holds it (insert nothing)."""
    # A key past its lifetime is free again: forget the old record first.
    conn.execute(idempotency_keys.delete().where(
        _named(key.project, key.kind, key.key),
        idempotency_keys.c.created_at < key.created_at - KEY_TTL_S))
    row = {"project": key.project, "kind": key.kind, "key": key.key,
           "fingerprint": key.fingerprint, "object_id": key.object_id,
           "created_at": key.created_at}
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    # RETURNING tells whether the row went in (an insert's rowcount is not reliable).
    inserted = conn.execute(dialect.insert(idempotency_keys).values(**row)
                            .on_conflict_do_nothing()
                            .returning(idempotency_keys.c.object_id)).first()
    if inserted is not None:
        return None
    held = conn.execute(idempotency_keys.select().where(
        _named(key.project, key.kind, key.key))).mappings().one()
    return _key(held)


def _named(project: str, kind: str, key: str) -> sa.ColumnElement[bool]:
    return sa.and_(idempotency_keys.c.project == project, idempotency_keys.c.kind == kind,
                   idempotency_keys.c.key == key)


def _key(row: RowMapping) -> IdempotencyKey:
    return IdempotencyKey(project=row["project"], kind=row["kind"], key=row["key"],
                          fingerprint=row["fingerprint"], object_id=row["object_id"],
                          created_at=row["created_at"])
