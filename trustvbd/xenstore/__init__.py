"""The XenStore wire protocol and the store's engine, without I/O.

`wire` frames messages (xs_wire.h), `paths` checks paths, `perms` decides access,
`tree` holds the nodes, `transactions`, `watches` and `quotas` do what they say,
`pairing` spots the writes that pair a frontend with a backend directory, `core`
runs sessions over all of it, and `client` is an asyncio client for the launcher and
the tests. The store domain (`trustvbd.domains.store`) is the thin asyncio shell.
"""
