"""The cluster ledger's change log: what each transaction changed, so that a
node brings its copies of the products up to date by reading what the others
did since its last transaction (O(changes)), not every lease of a product
again (O(leases)).

Each writing transaction appends one row, numbered by the ledger lock row's
``version`` (taken under that lock, so the numbers have no gaps): a msgpack
list of entries.  A node whose copies are at version ``v`` applies the rows
after ``v`` in order; a node that finds a gap (rows pruned while it was away)
or a ``reset`` (new terms) drops its copies and reads the products again.
Entries are plain lists:

    ["put", lease...]          a lease granted, or changed as a whole (borrowed)
                               (the lease's fields in the order of its row)
    ["del", lease_id]          a lease ended (its seat's queue served by the writer)
    ["exp", lease_id, at]      a lease renewed
    ["queue", waiter...]       a waiter joined the queue (its row's fields)
    ["done", seq]              a waiter left it (served, timed out, withdrawn)
    ["reset"]                  new terms: every copy is read again
"""

from __future__ import annotations

from typing import Any

import msgpack

from floatd.core.changes import Change, DeleteLease, PutLease, SetExpiry
from floatd.core.ledger import LocalLedger
from floatd.core.seats import Lease, Waiter
from floatd.store.pg_rows import lease_of, lease_values, waiter_of, waiter_values

#: Rows kept: a node more than this many transactions behind reads its
#: products again.
KEEP = 20_000


def lease_entry(le: Lease) -> list[Any]:
    return ["put", *lease_values(le)]


def entries_of(changes: list[Change]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for change in changes:
        if isinstance(change, PutLease):
            out.append(lease_entry(change.lease))
        elif isinstance(change, DeleteLease):
            out.append(["del", change.lease_id])
        elif isinstance(change, SetExpiry):
            out.append(["exp", change.lease_id, change.expires_at])
    return out


def queue_entry(seq: int, waiter: Waiter, node: str) -> list[Any]:
    return ["queue", seq, *waiter_values(waiter, node)]


def encode(entries: list[list[Any]]) -> bytes:
    return bytes(msgpack.packb(entries, use_bin_type=True))


class Follower:
    """Copies of products (LocalLedgers) and the queue positions of their
    waiters, kept current from the change log."""

    def __init__(self) -> None:
        self.copies: dict[str, LocalLedger] = {}
        self.seq_of: dict[Waiter, int] = {}
        self.by_seq: dict[int, Waiter] = {}
        #: The log version the copies are at; -1: none kept.
        self.version = -1

    def drop(self) -> None:
        self.copies.clear()
        self.seq_of.clear()
        self.by_seq.clear()
        self.version = -1

    def place(self, waiter: Waiter, seq: int) -> None:
        self.seq_of[waiter] = seq
        self.by_seq[seq] = waiter

    def unplace(self, waiter: Waiter) -> int:
        seq = self.seq_of.pop(waiter)
        self.by_seq.pop(seq, None)
        return seq

    def follow(self, rows: list[tuple[int, bytes]], version: int) -> None:
        """Apply the log rows after our version up to ``version``; drop the
        copies instead if a row is missing or one says reset."""
        if self.version < 0 or not self.copies:
            self.drop()
            self.version = version
            return
        if len(rows) != version - self.version or (rows and rows[0][0] != self.version + 1):
            self.drop()
            self.version = version
            return
        for _, body in rows:
            for entry in msgpack.unpackb(body, raw=False):
                if entry[0] == "reset":
                    self.drop()
                    self.version = version
                    return
                self._apply(entry)
        self.version = version

    def _apply(self, entry: list[Any]) -> None:
        kind = entry[0]
        if kind == "put":
            copy = self.copies.get(entry[3])
            if copy is not None:
                copy.follow_put(lease_of(entry[1:]))
        elif kind in ("del", "exp"):
            for copy in self.copies.values():
                if copy.lease(entry[1]) is not None:
                    if kind == "del":
                        copy.follow_delete(entry[1])
                    else:
                        copy.follow_expiry(entry[1], entry[2])
                    break
        elif kind == "queue":
            copy = self.copies.get(entry[5])
            if copy is not None and copy.terms(entry[5]) is not None:
                waiter = waiter_of(entry[1:])
                copy.requeue(waiter)
                self.place(waiter, entry[1])
        elif kind == "done":
            gone = self.by_seq.get(entry[1])
            if gone is not None:
                self.unplace(gone)
                copy = self.copies.get(gone.claim.product)
                if copy is not None:
                    copy.follow_unqueue(gone)
