"""Transactions: a snapshot of the tree per transaction, committed only if nothing it used moved.

TRANSACTION_START copies the tree (copy-on-write of the node table; nodes are
immutable). Requests carrying the transaction's id read and write the copy. At
TRANSACTION_END "T" the store compares the generation of every node the
transaction read or wrote with the live tree: if any differs (another client
changed it meanwhile), the end fails with EAGAIN and nothing is applied, as in C
xenstored since Xen 4.9; otherwise the changed nodes replace the live ones and the
transaction's watch events fire. "F" discards it.
"""

from __future__ import annotations

from dataclasses import dataclass

from trustvbd.xenstore.tree import Change, Tree
from trustvbd.xenstore.wire import XsError


@dataclass
class Transaction:
    tx_id: int
    tree: Tree

    @classmethod
    def start(cls, tx_id: int, live: Tree) -> Transaction:
        return cls(tx_id, live.copy())

    def end(self, live: Tree, commit: bool) -> list[Change]:
        """The events to fire; EAGAIN if a node this transaction used changed meanwhile."""
        if not commit:
            return []
        if live.conflicts_with(self.tree):
            raise XsError("EAGAIN", f"transaction {self.tx_id} conflicts with a later change")
        live.apply(self.tree)
        return self.tree.events
