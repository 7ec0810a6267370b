"""Quotas: what one unprivileged domain or connection may take from the store.

The defaults are C xenstored's (1000 nodes per domain, 128 watches, 10 open
transactions, 2048-byte values); domain 0 is exempt, as there. Exceeding a node,
value or transaction quota is ENOSPC (what C xenstored answers), too many watches
E2BIG. The output limit guards the store against a client that never reads its
watch events: past it the connection is dropped rather than buffered without end.
"""

from __future__ import annotations

from dataclasses import dataclass

from trustvbd.xenstore.perms import Caller
from trustvbd.xenstore.wire import XsError


@dataclass(frozen=True)
class Quotas:
    nodes_per_domain: int = 1000
    value_size: int = 2048
    watches_per_connection: int = 128
    transactions_per_connection: int = 10
    pending_output: int = 512 * 1024  # bytes queued for one connection

    def check_nodes(self, caller: Caller, owned_after: int) -> None:
        if not caller.privileged and owned_after > self.nodes_per_domain:
            raise XsError("ENOSPC", f"domain {caller.domid} would own more than"
                          f" {self.nodes_per_domain} nodes")

    def check_value(self, caller: Caller, size: int) -> None:
        if not caller.privileged and size > self.value_size:
            raise XsError("ENOSPC", f"value of {size} bytes exceeds {self.value_size}")

    def check_watches(self, caller: Caller, count_after: int) -> None:
        if not caller.privileged and count_after > self.watches_per_connection:
            raise XsError("E2BIG", f"more than {self.watches_per_connection} watches")

    def check_transactions(self, caller: Caller, count_after: int) -> None:
        if not caller.privileged and count_after > self.transactions_per_connection:
            raise XsError("ENOSPC", f"more than {self.transactions_per_connection} open transactions")
