"""NBD protocol: a sans-I/O core with thin asyncio server and client shells.

protocol.py   constants, struct layouts, limits, errno mapping
messages.py   the messages (events) and their encoding; option payload helpers
core.py       ProtocolCore: parsing, the shared state table (a client's: the handshake)
buffer_pool.py  reusable WRITE payload buffers (a server core's pool)
checks.py     the transmission flags advertised (requests are checked natively:
              native/src/nbd_server/checks.rs)
exports.py    Export, ExportProvider, ExportRefused, PeerInfo
server_handshake.py / connection*.py / reply_output.py / parted_requests.py / server.py
              the asyncio server (NbdServer; connection.py lists its modules)
budget.py     a guest's memory budget over all its connections, and its decision rate
file_serve.py a file export's connections handed to the native serve loop (the driver)
client_handshake.py / client*.py   the asyncio client (NbdClient = NbdBackend; client.py
              lists its modules); its transmission phase is native (native/src/nbd_client)
uri.py        nbd:// and nbd+unix:// URIs
"""
