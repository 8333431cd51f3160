"""`LeaseLost`: the one signal that a worker no longer holds the work in hand.

The rules every kind of leased work shares are in `batchery.model.leases`; the store
implements them (`batchery.stores.sql.leases`), and `batchery.queue.leased` runs work
under a lease.
"""

from __future__ import annotations


class LeaseLost(Exception):
    """The lease was lost while working: the work was cancelled, stopped, expired, or taken
    over by another worker after this one stopped renewing. Nothing more may be written."""
