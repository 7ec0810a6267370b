"""NBD protocol: a sans-I/O core with thin asyncio server and client shells.

protocol.py   constants, struct layouts, limits, errno mapping
messages.py   the messages (events) and their encoding; option payload helpers
core.py       ProtocolCore: parsing, the shared state table (a client's: the handshake)
buffer_pool.py  reusable WRITE payload buffers (a server core's pool)
checks.py     server-side request validation and advertised flags
exports.py    Export, ExportProvider, ExportRefused, PeerInfo
server_handshake.py / connection*.py / reply_output.py / parted_requests.py / server.py
              the asyncio server (NbdServer; connection.py lists its modules)
client_handshake.py / client*.py   the asyncio client (NbdClient = NbdBackend; client.py
              lists its modules); its transmission phase is native (native/src/nbd_client)
uri.py        nbd:// and nbd+unix:// URIs
"""
