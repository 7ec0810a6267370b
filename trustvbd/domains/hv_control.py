"""The hypervisor's control socket: `trustvbd status` and `trustvbd policy load` ask here.

One typed request per connection, one JSON line each way (domains/messages.py);
the reply carries the request's id back ("reply_to"). Mode 0600: only the user
that runs `up` may ask.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from trustvbd.domains.messages import (
    ErrorCode,
    Failed,
    HvStatus,
    Message,
    MessageError,
    PolicyLoad,
    ScrubQuery,
    StatusQuery,
    decode,
    error_code,
)

log = logging.getLogger("trustvbd.hv")
MAX_REQUEST = 64 * 1024
READ_TIMEOUT = 10.0

StatusSource = Callable[[], Awaitable[dict[str, Any]]]
PolicyLoader = Callable[[str], Awaitable[Message]]
Scrubber = Callable[[str], Awaitable[Message]]


async def answer(line: bytes, status: StatusSource, policy_load: PolicyLoader,
                 scrub: Scrubber) -> dict[str, Any]:
    """The reply to one request line (never raises)."""
    rid = None
    try:
        raw = json.loads(line)
        rid = raw.get("id") if isinstance(raw, dict) else None
        if type(rid) is not int:
            rid = None
            raise MessageError('a control request carries its request id, "id" (an integer)')
        request = decode(raw, StatusQuery, PolicyLoad, ScrubQuery)
        reply: Message
        if isinstance(request, StatusQuery):
            reply = HvStatus(await status())
        elif isinstance(request, ScrubQuery):
            reply = await scrub(request.disk)
        else:
            assert isinstance(request, PolicyLoad)
            reply = await policy_load(request.path)
    except ValueError as exc:  # MessageError and JSONDecodeError are ValueErrors
        reply = Failed(ErrorCode.BAD_MESSAGE, str(exc))
    except Exception as exc:
        log.exception("control request failed")
        reply = Failed(error_code(exc), str(exc))
    return {**reply.encode(), "reply_to": rid}


async def serve_control(path: Path, status: StatusSource, policy_load: PolicyLoader,
                        scrub: Scrubber) -> asyncio.AbstractServer:
    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            reply = await answer(line, status, policy_load, scrub)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, OSError, ValueError):
            pass  # a client that says nothing in time, or too much, is hung up on
        finally:
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    server = await asyncio.start_unix_server(client, str(path), limit=MAX_REQUEST)
    os.chmod(path, 0o600)
    return server
