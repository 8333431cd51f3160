"""The one lease implementation: claim, renew, release with a not-before delay, fenced
commit, and the expired leases to reap, for any table that holds leased work.

Two shapes of table use it:

- **queue rows** (`chunks`, `job_batches`) have a `state` column: `queued` rows are
  claimable once their `not_before` has passed, a claimed row is `leased`, and only a
  leased row with the current token may be renewed or committed;
- **phase rows** (`batches`, `jobs`) carry batch- or job-level work that a filter picks
  (a status, a stage): such a row is claimable while its lease is free or expired, and a
  release with a delay keeps it unclaimable until then (the lease's expiry doubling as a
  not-before time).

Both shapes share the columns `lease_owner`, `lease_token` and `lease_expires_at`, and the
database's clock: workers on several hosts agree on what has expired.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from batchery.model import ids

_LEASE_CLEARED = {"lease_owner": None, "lease_token": None, "lease_expires_at": None}


@dataclass(frozen=True, kw_only=True, slots=True)
class Claimed:
    key: Any
    token: str
    #: The claimed row, read in the claiming transaction.
    row: sa.RowMapping


class Leases:
    """Lease operations on `table`, keyed by its column `key`. With `state`, rows are queue
    rows whose state column moves between `queued` and `leased`."""

    def __init__(self, table: sa.Table, *, key: str, now: sa.ColumnElement[float],
                 state: str | None = None, queued: str = "queued",
                 leased: str = "leased") -> None:
        self.table = table
        self.key = table.c[key]
        self.now = now
        self.state = table.c[state] if state else None
        self.queued, self.leased = queued, leased
        # The statements of the hot path, built once: building a statement costs more CPU
        # than running it. Their parameters are named so as not to clash with columns.
        lease: dict[str, Any] = {
            "lease_owner": sa.bindparam("p_owner"), "lease_token": sa.bindparam("p_token"),
            "lease_expires_at": self.now + sa.bindparam("p_lease_s", type_=sa.Float)}
        if self.state is not None:
            lease[self.state.name] = self.leased
        self._take = table.update().where(self.key == sa.bindparam("p_key")).values(**lease)
        self._row = table.select().where(self.key == sa.bindparam("p_key"))
        fenced = [self.key == sa.bindparam("p_key"),
                  table.c.lease_token == sa.bindparam("p_held")]
        if self.state is not None:
            fenced.append(self.state == self.leased)
        self._fenced = sa.and_(*fenced)

    # -- claim -------------------------------------------------------------------------

    def claimable(self) -> sa.ColumnElement[bool]:
        c = self.table.c
        if self.state is not None:
            return sa.and_(self.state == self.queued,
                           sa.or_(c.not_before.is_(None), c.not_before <= self.now))
        return sa.or_(c.lease_expires_at.is_(None), c.lease_expires_at < self.now)

    def claim_query(self, *, where: Sequence[sa.ColumnElement[bool]] = (),
                    order_by: Sequence[sa.ColumnElement[Any]] = (),
                    join: tuple[sa.Table, sa.ColumnElement[bool]] | None = None
                    ) -> sa.Select[Any]:
        """The query for the first claimable row that `where` admits, skipping rows that
        another transaction has locked (build it once, and pass it to `claim`)."""
        query = sa.select(self.key).select_from(self.table)
        if join is not None:
            query = query.join(*join)
        return (query.where(self.claimable(), *where)
                .order_by(*(order_by or (self.key,))).limit(1)
                .with_for_update(skip_locked=True, of=self.table))

    def claim(self, conn: Connection, owner: str, lease_s: float, *,
              where: Sequence[sa.ColumnElement[bool]] = (),
              order_by: Sequence[sa.ColumnElement[Any]] = (),
              join: tuple[sa.Table, sa.ColumnElement[bool]] | None = None,
              pick: Any = None, values: dict[str, Any] | None = None,
              query: sa.Select[Any] | None = None) -> Claimed | None:
        """Lease the first claimable row that `where` admits (or that `query`, from
        `claim_query`, finds), skipping rows that another transaction has locked.
        `pick(conn, query)` may choose among candidates instead (it returns a key or None);
        `values` are set together with the lease."""
        if query is None:
            query = self.claim_query(where=where, order_by=order_by, join=join)
        key = pick(conn, query) if pick is not None else conn.execute(query).scalar()
        if key is None:
            return None
        token = ids.lease_token()
        if values:
            update: dict[str, Any] = {"lease_owner": owner, "lease_token": token,
                                      "lease_expires_at": self.now + lease_s, **values}
            if self.state is not None:
                update[self.state.name] = self.leased
            conn.execute(self.table.update().where(self.key == key).values(**update))
        else:
            conn.execute(self._take, {"p_key": key, "p_owner": owner, "p_token": token,
                                      "p_lease_s": lease_s})
        row = conn.execute(self._row, {"p_key": key}).mappings().one()
        return Claimed(key=key, token=token, row=row)

    # -- the lease holder's writes -----------------------------------------------------

    def fence(self, key: Any, token: str,
              *extra: sa.ColumnElement[bool]) -> sa.ColumnElement[bool]:
        """True only for the row while `token` holds its lease (and `extra` holds)."""
        held = [self.key == key, self.table.c.lease_token == token, *extra]
        if self.state is not None:
            held.append(self.state == self.leased)
        return sa.and_(*held)

    def renew(self, conn: Connection, key: Any, token: str, lease_s: float,
              *extra: sa.ColumnElement[bool]) -> bool:
        result = conn.execute(self.table.update().where(self.fence(key, token, *extra))
                              .values(lease_expires_at=self.now + lease_s))
        return result.rowcount == 1

    def commit(self, conn: Connection, key: Any, token: str, values: dict[str, Any],
               *extra: sa.ColumnElement[bool], keep_lease: bool = False) -> bool:
        """Write `values` if `token` still holds the lease; unless `keep_lease`, the lease
        ends with the write. The caller's other writes belong in the same transaction."""
        update = dict(values) if keep_lease else {**_LEASE_CLEARED, **values}
        result = conn.execute(self.table.update().where(self.fence(key, token, *extra))
                              .values(**update))
        return result.rowcount == 1

    def fenced_update(self, values: dict[str, Any], *, keep_lease: bool = False) -> sa.Update:
        """A `commit` built once: run it with `run_fenced`. `values` may hold bind
        parameters (named unlike any column) that `run_fenced` is given."""
        update = dict(values) if keep_lease else {**_LEASE_CLEARED, **values}
        return self.table.update().where(self._fenced).values(**update)

    def run_fenced(self, conn: Connection, statement: sa.Update, key: Any, token: str,
                   params: dict[str, Any]) -> bool:
        """Run a `fenced_update`: True if `token` still held the lease."""
        return conn.execute(statement, {"p_key": key, "p_held": token,
                                        **params}).rowcount == 1

    def release(self, conn: Connection, key: Any, token: str, *, delay_s: float = 0.0,
                values: dict[str, Any] | None = None) -> bool:
        """Give the work back, claimable again after `delay_s` seconds. For a phase row the
        release needs only the token (its status may have moved on since)."""
        update: dict[str, Any] = {**_LEASE_CLEARED, **(values or {})}
        if self.state is not None:
            update[self.state.name] = self.queued
            update["not_before"] = self.now + delay_s if delay_s else None
            where = self.fence(key, token)
        else:
            update["lease_expires_at"] = self.now + delay_s if delay_s else None
            where = sa.and_(self.key == key, self.table.c.lease_token == token)
        return conn.execute(self.table.update().where(where).values(**update)).rowcount == 1

    # -- leases whose holder went away -------------------------------------------------

    def expired(self, conn: Connection, *columns: sa.ColumnElement[Any],
                join: tuple[sa.Table, sa.ColumnElement[bool]] | None = None
                ) -> list[sa.Row[Any]]:
        """Leased rows whose lease ran out: their worker stopped renewing. `columns` may
        come from a table `join`ed on."""
        assert self.state is not None, "phase rows are claimable again once expired"
        c = self.table.c
        query = sa.select(self.key.label("key"), c.lease_token, c.lease_owner, *columns)
        if join is not None:
            query = query.select_from(self.table.join(*join))
        query = query.where(self.state == self.leased, c.lease_expires_at < self.now)
        return list(conn.execute(query))

    def requeue_expired(self, conn: Connection, key: Any, token: str,
                        values: dict[str, Any]) -> bool:
        """Put a reaped row back in the queue (fenced by the token that expired)."""
        assert self.state is not None
        update = {**_LEASE_CLEARED, "not_before": None, self.state.name: self.queued,
                  **values}
        return conn.execute(self.table.update().where(self.fence(key, token))
                            .values(**update)).rowcount == 1

    def free_all(self, conn: Connection) -> None:
        """Free every lease without counting anything (a store with a single owner)."""
        c = self.table.c
        if self.state is not None:
            conn.execute(self.table.update().where(self.state == self.leased).values(
                **_LEASE_CLEARED, **{self.state.name: self.queued}))
        else:
            conn.execute(self.table.update().where(c.lease_token.is_not(None))
                         .values(**_LEASE_CLEARED))
