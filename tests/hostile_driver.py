"""A hostile NBD driver for the mirroring tests: an honest server that misbehaves on command.

    python -m tests.hostile_driver --file F --size BYTES --socket S --control C

Serves one file as one export (any name) on the Unix socket S, fixed-newstyle
handshake with structured replies when asked. Commands, one JSON object per line
on the control socket C, e.g. {"mode": "flip", "rate": 0.05}:

    honest          behave (the default)
    flip            flip one bit of a read reply's data, for a `rate` share of 4 KiB blocks
    stale           reads return the block's contents from before its last write
    swap            reads of a block return its neighbour's contents (b xor 1)
    drop_writes     acknowledge writes without storing them (a `rate` share of them)
    fake_flush      keep writes in memory and acknowledge flushes without storing;
                    {"mode": "crash"} then loses what was never stored
    stall           read requests, answer nothing
    stall_handshake new connections get nothing, not even the greeting, while this holds
                    (then they are closed)
    stall_reads     answer every request but reads (those get nothing, ever)
    slow_reads      answer reads `delay` seconds late (other requests at once)
    slow_writes     do writes, zeroes and flushes at once but answer them `delay` seconds late
    disconnect      close every connection on its next request
    garbage         answer requests with random bytes
    huge_length     answer reads with a structured chunk claiming 2 GiB
    stall_mid_reply answer a read with its header and half its data, then nothing more on
                    that connection (what was asked is read and dropped)
    wrong_cookie    answer with a cookie that was never sent
    double_reply    answer every request twice (the second for a cookie answered already)
    half_then_close answer a read with its header and half its data, then close
    drip            send each read reply a byte every `delay` seconds (default 1)
    simple_reads    answer reads with simple replies though structured ones were negotiated
    no_structured   (new connections) refuse structured replies, then answer reads with
                    structured chunks anyway; setting it closes the current connections
    cross_cookie    answer requests in pairs, each with the other's cookie (a READ's data
                    for a WRITE, or for another READ of another block)
    overlap_chunks  answer reads with two data chunks that overlap (structured)
    outside_chunk   answer reads with a data chunk just past the range asked (structured)
    hole_lie        answer reads with one hole chunk: all zeros (structured)
    errno_zero      answer reads with an error chunk whose error is 0 (structured)
    odd_errno       answer reads with the error 0xFFFFFFFF, no NBD errno at all
    write_data      answer writes with a data chunk, as if they were reads (structured)
    write_errno_zero  store writes, but answer them with an error chunk whose error is 0
    write_odd_errno   store writes, but answer them with the error 0xFFFFFFFF

Only the data its modes concern are touched: the handshake stays honest (but for
stall_handshake), so the
trusted side's refusal is about the lie, not about talking to the driver at all.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import struct
import threading
import time

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
OPT_EXPORT_NAME, OPT_ABORT, OPT_GO, OPT_STRUCTURED_REPLY = 1, 2, 7, 8
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, (1 << 31) + 1
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES = 0, 1, 2, 3, 4, 5, 6
FLAGS = 1 | 4 | 8 | 32 | 64 | 256 | 1024  # flags, flush, fua, trim, write zeroes, multi-conn, cache
BS = 4096


class Hostile:
    def __init__(self, path: str, size: int) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)
        self.size = size
        self.mode = "honest"
        self.rate = 1.0
        self.delay = 0.0
        self.rng = random.Random(7)
        self.lock = threading.Lock()
        self.previous: dict[int, bytes] = {}  # block -> contents before its last write
        self.volatile: dict[int, bytes] = {}  # fake_flush: writes never stored
        self.conns: set[socket.socket] = set()

    # -- storage ------------------------------------------------------------------
    def _pread(self, offset: int, length: int) -> bytearray:
        data = bytearray(os.pread(self.fd, length, offset).ljust(length, b"\0"))
        for b in range(offset // BS, -(-(offset + length) // BS)):
            if b in self.volatile:
                lo = max(b * BS, offset)
                hi = min((b + 1) * BS, offset + length)
                data[lo - offset:hi - offset] = self.volatile[b][lo - b * BS:hi - b * BS]
        return data

    def read(self, offset: int, length: int) -> bytes:
        with self.lock:
            data = self._pread(offset, length)
            mode = self.mode
            if mode == "stale":
                for b in range(offset // BS, -(-(offset + length) // BS)):
                    old = self.previous.get(b)
                    if old is not None and offset <= b * BS and (b + 1) * BS <= offset + length:
                        data[b * BS - offset:(b + 1) * BS - offset] = old
            elif mode == "swap":
                for b in range(offset // BS, (offset + length) // BS):
                    if b * BS >= offset:
                        other = self._pread((b ^ 1) * BS, BS) if (b ^ 1) * BS < self.size else bytes(BS)
                        data[b * BS - offset:(b + 1) * BS - offset] = other
            elif mode == "flip":
                for i in range(0, length, BS):
                    if self.rng.random() < self.rate:
                        j = i + self.rng.randrange(min(BS, length - i))
                        data[j] ^= 1 << self.rng.randrange(8)
        return bytes(data)

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            if self.mode == "drop_writes" and self.rng.random() < self.rate:
                return
            for b in range(offset // BS, -(-(offset + len(data)) // BS)):
                self.previous[b] = bytes(self._pread(b * BS, BS))
            if self.mode == "fake_flush":
                for b in range(offset // BS, -(-(offset + len(data)) // BS)):
                    block = self._pread(b * BS, BS)
                    lo, hi = max(b * BS, offset), min((b + 1) * BS, offset + len(data))
                    block[lo - b * BS:hi - b * BS] = data[lo - offset:hi - offset]
                    self.volatile[b] = bytes(block)
                return
            os.pwrite(self.fd, data, offset)

    def flush(self) -> None:
        with self.lock:
            if self.mode != "fake_flush":
                for b, block in self.volatile.items():
                    os.pwrite(self.fd, block, b * BS)
                self.volatile.clear()
                os.fsync(self.fd)

    def command(self, cmd: dict) -> None:
        with self.lock:
            if cmd.get("mode") == "crash":
                self.volatile.clear()
                self.mode = "honest"
            else:
                self.mode = cmd.get("mode", "honest")
                self.rate = float(cmd.get("rate", 1.0))
                self.delay = float(cmd.get("delay", 0.0))
        if self.mode in ("disconnect", "no_structured"):
            for c in list(self.conns):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # -- the protocol -----------------------------------------------------------------
    def serve(self, conn: socket.socket) -> None:
        self.conns.add(conn)
        try:
            if self.mode == "stall_handshake":
                while self.mode == "stall_handshake":
                    time.sleep(0.05)
                return  # closed: its client gives up on it, or has already
            structured = self._handshake(conn)
            if structured is None:
                return
            send_lock = threading.Lock()
            stalled = False  # stall_mid_reply: a reply was cut short; nothing more is sent
            held: tuple[int, int, int, int, bytes] | None = None  # cross_cookie: its first
            while True:
                head = _recv(conn, 28)
                magic, _flags, typ, cookie, offset, length = struct.unpack(">IHHQQI", head)
                if magic != REQUEST_MAGIC:
                    return
                payload = _recv(conn, length) if typ == WRITE else b""
                mode = self.mode
                if typ == DISC or mode == "disconnect":
                    return
                if mode == "stall" or (mode == "stall_reads" and typ == READ):
                    continue
                if mode == "stall_mid_reply" and typ == READ and not stalled:
                    self._half_reply(conn, send_lock, structured, cookie, offset, length)
                    stalled = True
                if stalled:
                    continue
                if mode == "garbage":
                    conn.sendall(os.urandom(64))
                    continue
                if mode == "half_then_close" and typ == READ:
                    self._half_reply(conn, send_lock, structured, cookie, offset, length)
                    return
                if mode == "drip" and typ == READ:
                    threading.Thread(target=self._drip, daemon=True,
                                     args=(conn, send_lock, structured, cookie, offset,
                                           self.read(offset, length))).start()
                    continue
                if mode == "wrong_cookie":
                    cookie ^= 0x5A5A5A5A
                if mode == "cross_cookie":
                    if held is None:
                        held = (typ, cookie, offset, length, payload)
                        continue
                    htyp, hcookie, hoffset, hlength, hpayload = held
                    held = None
                    self._answer(conn, send_lock, structured, mode, htyp, cookie, hoffset,
                                 hlength, hpayload)
                    cookie = hcookie
                if mode == "slow_reads" and typ == READ:
                    late = threading.Timer(self.delay, self._answer,
                                           (conn, send_lock, structured, mode, typ, cookie, offset,
                                            length, payload))
                    late.daemon = True
                    late.start()
                    continue
                if mode == "slow_writes" and typ != READ:
                    self._do(typ, offset, length, payload)
                    late = threading.Timer(self.delay, self._send,
                                           (conn, send_lock, structured, mode, typ, cookie, offset,
                                            b""))
                    late.daemon = True
                    late.start()
                    continue
                self._answer(conn, send_lock, structured, mode, typ, cookie, offset, length, payload)
        except (OSError, EOFError, struct.error):
            pass
        finally:
            self.conns.discard(conn)
            conn.close()

    def _answer(self, conn: socket.socket, send_lock: threading.Lock, structured: bool, mode: str,
                typ: int, cookie: int, offset: int, length: int, payload: bytes) -> None:
        self._send(conn, send_lock, structured, mode, typ, cookie, offset,
                   self._do(typ, offset, length, payload))

    def _half_reply(self, conn: socket.socket, send_lock: threading.Lock, structured: bool,
                    cookie: int, offset: int, length: int) -> None:
        """A read reply's header and the first half of its data, then nothing more."""
        data = self.read(offset, length)
        with send_lock:
            conn.sendall(_read_reply_head(structured, cookie, offset, length) + data[:length // 2])

    def _drip(self, conn: socket.socket, send_lock: threading.Lock, structured: bool,
              cookie: int, offset: int, data: bytes) -> None:
        """A whole read reply, one byte at a time (holding the connection's sending)."""
        reply = _read_reply_head(structured, cookie, offset, len(data)) + data
        with send_lock:
            for i in range(len(reply)):
                try:
                    conn.send(reply[i:i + 1])
                except OSError:
                    return
                time.sleep(self.delay or 1.0)

    def _send(self, conn: socket.socket, send_lock: threading.Lock, structured: bool, mode: str,
              typ: int, cookie: int, offset: int, reply: bytes) -> None:
        with send_lock:
            try:
                if mode == "double_reply":
                    self._send_one(conn, structured, mode, typ, cookie, offset, reply)
                self._send_one(conn, structured, mode, typ, cookie, offset, reply)
            except OSError:
                if not mode.startswith("slow"):  # a late reply may find the connection dropped
                    raise

    @staticmethod
    def _send_one(conn: socket.socket, structured: bool, mode: str, typ: int, cookie: int,
                  offset: int, reply: bytes) -> None:
        if typ == READ and mode == "no_structured":
            conn.sendall(_read_reply_head(True, cookie, offset, len(reply)) + reply)
        elif typ == READ and mode == "simple_reads":
            conn.sendall(_read_reply_head(False, cookie, offset, len(reply)) + reply)
        elif typ == READ and mode == "huge_length" and structured:
            conn.sendall(struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, 1, 1, cookie,
                                     1 << 31) + struct.pack(">Q", offset))
        elif typ == READ and mode == "odd_errno":
            if structured:
                conn.sendall(_error_chunk(cookie, 0xFFFFFFFF, b"odd"))
            else:
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0xFFFFFFFF, cookie))
        elif typ == READ and structured and mode == "errno_zero":
            conn.sendall(_error_chunk(cookie, 0, b"no error at all"))
        elif typ == READ and structured and mode == "hole_lie":
            conn.sendall(struct.pack(">IHHQIQI", STRUCTURED_REPLY_MAGIC, 1, 2, cookie, 12, offset,
                                     len(reply)))
        elif typ == READ and structured and mode == "outside_chunk":
            conn.sendall(_read_reply_head(True, cookie, offset + len(reply), len(reply)) + reply)
        elif typ == READ and structured and mode == "overlap_chunks" and len(reply) >= 1024:
            half = len(reply) // 2
            conn.sendall(struct.pack(">IHHQIQ", STRUCTURED_REPLY_MAGIC, 0, 1, cookie, 8 + half + 512,
                                     offset) + reply[:half + 512])
            conn.sendall(_read_reply_head(True, cookie, offset + half, len(reply) - half)
                         + reply[half:])
        elif typ == WRITE and mode == "write_odd_errno":
            if structured:
                conn.sendall(_error_chunk(cookie, 0xFFFFFFFF, b"odd"))
            else:
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0xFFFFFFFF, cookie))
        elif typ == WRITE and structured and mode == "write_errno_zero":
            conn.sendall(_error_chunk(cookie, 0, b"no error at all"))
        elif typ == WRITE and structured and mode == "write_data":
            conn.sendall(_read_reply_head(True, cookie, offset, 512) + bytes(512))
        elif typ == READ and structured:
            conn.sendall(_read_reply_head(True, cookie, offset, len(reply)) + reply)
        elif structured:
            conn.sendall(struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, 1, 0, cookie, 0))
        else:
            conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie) + reply)

    def _do(self, typ: int, offset: int, length: int, payload: bytes) -> bytes:
        if typ == READ:
            return self.read(offset, length)
        if typ == WRITE:
            self.write(offset, payload)
        elif typ == WRITE_ZEROES:
            self.write(offset, bytes(length))
        elif typ == FLUSH:
            self.flush()
        return b""

    def _handshake(self, conn: socket.socket) -> bool | None:
        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
        _recv(conn, 4)
        structured = False
        while True:
            magic, opt, length = struct.unpack(">QII", _recv(conn, 16))
            data = _recv(conn, length)
            if magic != IHAVEOPT or opt == OPT_ABORT:
                return None
            if opt == OPT_EXPORT_NAME:
                conn.sendall(struct.pack(">QH", self.size, FLAGS) + bytes(124))
                return False
            if opt == OPT_STRUCTURED_REPLY and self.mode == "no_structured":
                self._reply(conn, opt, REP_ERR_UNSUP)
            elif opt == OPT_STRUCTURED_REPLY:
                structured = True
                self._reply(conn, opt, REP_ACK)
            elif opt == OPT_GO:
                del data
                self._reply(conn, opt, REP_INFO, struct.pack(">HIII", 3, 1, BS, 32 << 20))
                self._reply(conn, opt, REP_INFO, struct.pack(">HQH", 0, self.size, FLAGS))
                self._reply(conn, opt, REP_ACK)
                return structured
            else:
                self._reply(conn, opt, REP_ERR_UNSUP)

    @staticmethod
    def _reply(conn: socket.socket, opt: int, rep: int, data: bytes = b"") -> None:
        conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, rep, len(data)) + data)


def _read_reply_head(structured: bool, cookie: int, offset: int, length: int) -> bytes:
    """A READ reply's header for `length` bytes of data: one OFFSET_DATA chunk flagged DONE,
    or a simple reply."""
    if structured:
        return struct.pack(">IHHQIQ", STRUCTURED_REPLY_MAGIC, 1, 1, cookie, 8 + length, offset)
    return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie)


def _error_chunk(cookie: int, error: int, text: bytes) -> bytes:
    """A structured NBD_REPLY_TYPE_ERROR chunk flagged DONE."""
    return struct.pack(">IHHQIIH", STRUCTURED_REPLY_MAGIC, 1, (1 << 15) + 1, cookie,
                       6 + len(text), error, len(text)) + text


def _recv(conn: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return bytes(out)


def _listen(path: str) -> socket.socket:
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    return sock


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--control", required=True)
    args = ap.parse_args()
    server = Hostile(args.file, args.size)
    data, control = _listen(args.socket), _listen(args.control)

    def commands() -> None:
        while True:
            c, _ = control.accept()
            with c, c.makefile("rwb") as f:
                for line in f:
                    server.command(json.loads(line))
                    f.write(b"ok\n")
                    f.flush()

    threading.Thread(target=commands, daemon=True).start()
    print("ready", flush=True)
    while True:
        conn, _ = data.accept()
        threading.Thread(target=server.serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        time.sleep(0)
