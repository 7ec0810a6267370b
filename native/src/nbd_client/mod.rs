//! The transmission phase of an NBD client, without I/O (h11 style): requests in,
//! header bytes out; reply bytes in, completions out.
//!
//! The encryption domain talks to untrusted drivers through this, so the server is
//! hostile: a reply is believed only for a cookie in flight, of the right size; a
//! structured read's chunks must lie inside their request and cover it exactly once
//! (`Coverage`); error texts are bounded. Read data goes straight into the request's
//! own target buffer: what is already in the scratch buffer is copied there, the rest
//! is received in place (`recv_space` hands out the target's unfilled part first,
//! then the scratch buffer, so one readv takes a payload's end and the next header).
//! Any violation breaks the connection for good (`Broken`, with what happened);
//! the I/O shell then fails every request still pending.

use std::collections::HashMap;
use std::fmt;

use crate::nbd_wire::{self as wire, ChunkHeader, RequestHeader, SimpleReply};

#[cfg(test)]
mod tests;

/// Scratch receive buffer: replies are parsed here unless their payload goes in place.
/// Every message that is not a payload is at most a chunk header and an error text
/// (~4.2 KiB), so compaction always makes room.
pub const SCRATCH_SIZE: usize = 256 * 1024;
/// Most bytes read into the scratch buffer at once: the start of a large payload
/// that lands there is copied to its target, so this bounds that copy.
pub const RECEIVE_WINDOW: usize = 64 * 1024;
/// After a payload received in place, read little more than a header: if the next
/// reply carries a large payload too, its bytes then go straight to their target.
pub const SMALL_WINDOW: usize = 32;
/// Separate pieces a structured read reply may be split into (bounds bookkeeping).
pub const MAX_FRAGMENTS: usize = 4096;
/// Longest error chunk: error (4), text length (2), text, and an offset (8).
const MAX_ERROR_CHUNK: u32 = 6 + wire::MAX_STRING as u32 + 8;

/// Where a READ's data is received: the caller's buffer, exactly `length` bytes.
pub trait ReadTarget {
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl ReadTarget for Vec<u8> {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

/// The connection is unusable: the server broke the protocol (the reason says how).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken(pub String);

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A request we must not send (the caller's bug or a closed connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

/// One request answered: `error` is the NBD error (0: success) with the server's text.
/// A READ's target comes back filled (on success) or untouched-or-partly-written.
#[derive(Debug)]
pub struct Completion<T> {
    pub cookie: u64,
    pub error: u32,
    pub message: String,
    pub target: Option<T>,
}

/// The byte ranges of a request that structured chunks have described so far,
/// merged and sorted; a chunk outside the request or over an earlier one is refused.
#[derive(Debug, Default)]
struct Coverage {
    ranges: Vec<(u32, u32)>, // [start, end) relative to the request's offset
    covered: u64,
}

impl Coverage {
    /// Claims [offset, offset+length) of the request at `base` (`size` bytes); its position.
    fn claim(&mut self, base: u64, size: u32, offset: u64, length: u32) -> Result<u32, Broken> {
        let outside = || {
            Broken(format!(
                "chunk [{offset}, {}) lies outside the request [{base}, {})",
                offset as u128 + length as u128,
                base as u128 + size as u128
            ))
        };
        let at = offset.checked_sub(base).ok_or_else(outside)?;
        if length == 0 || at + length as u64 > size as u64 {
            return Err(outside());
        }
        let (at, end) = (at as u32, at as u32 + length);
        let i = self.ranges.partition_point(|&(start, _)| start <= at);
        if (i > 0 && self.ranges[i - 1].1 > at) || (i < self.ranges.len() && self.ranges[i].0 < end) {
            return Err(Broken(format!(
                "chunk [{offset}, {}) overlaps an earlier chunk",
                offset + length as u64
            )));
        }
        let join_left = i > 0 && self.ranges[i - 1].1 == at;
        let join_right = i < self.ranges.len() && self.ranges[i].0 == end;
        match (join_left, join_right) {
            (true, true) => {
                self.ranges[i - 1].1 = self.ranges[i].1;
                self.ranges.remove(i);
            }
            (true, false) => self.ranges[i - 1].1 = end,
            (false, true) => self.ranges[i].0 = at,
            (false, false) => {
                if self.ranges.len() == MAX_FRAGMENTS {
                    return Err(Broken(format!(
                        "read reply fragmented into more than {MAX_FRAGMENTS} pieces"
                    )));
                }
                self.ranges.insert(i, (at, end));
            }
        }
        self.covered += length as u64;
        Ok(at)
    }
}

#[derive(Debug)]
struct InFlight<T> {
    typ: u16,
    offset: u64,
    length: u32,
    target: Option<T>,
    coverage: Coverage,
    error: u32,
    message: String,
}

/// What finishes when a payload being received in place is complete.
#[derive(Debug, Clone, Copy)]
enum Then {
    Reply,                // a simple reply's data: the request is answered
    Chunk { done: bool }, // an OFFSET_DATA chunk: the reply ends if `done`
}

#[derive(Debug)]
struct Direct {
    cookie: u64,
    at: usize,   // next byte of the target to fill
    left: usize, // bytes still to come
    then: Then,
}

/// The client end of one NBD connection in transmission, without I/O.
#[derive(Debug)]
pub struct ClientCore<T> {
    structured: bool,
    next_cookie: u64,
    in_flight: HashMap<u64, InFlight<T>>,
    scratch: Box<[u8]>,
    start: usize, // first unparsed byte in scratch
    end: usize,   // end of received bytes in scratch
    window: usize,
    direct: Option<Direct>,
    completions: Vec<Completion<T>>,
    broken: Option<Broken>,
    disconnected: bool,
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    wire::be_u64(bytes, at)
}

pub fn command_name(typ: u16) -> String {
    match typ {
        wire::CMD_READ => "READ".into(),
        wire::CMD_WRITE => "WRITE".into(),
        wire::CMD_RING_WRITE => "RING_WRITE".into(),
        wire::CMD_DISC => "DISC".into(),
        wire::CMD_FLUSH => "FLUSH".into(),
        wire::CMD_TRIM => "TRIM".into(),
        wire::CMD_CACHE => "CACHE".into(),
        wire::CMD_WRITE_ZEROES => "WRITE_ZEROES".into(),
        other => format!("CMD_{other:#x}"),
    }
}

impl<T: ReadTarget> ClientCore<T> {
    /// A core for a connection whose handshake negotiated structured replies or not.
    pub fn new(structured: bool) -> Self {
        Self {
            structured,
            next_cookie: 1,
            in_flight: HashMap::new(),
            scratch: vec![0u8; SCRATCH_SIZE].into_boxed_slice(),
            start: 0,
            end: 0,
            window: RECEIVE_WINDOW,
            direct: None,
            completions: Vec::new(),
            broken: None,
            disconnected: false,
        }
    }

    pub fn broken(&self) -> Option<&Broken> {
        self.broken.as_ref()
    }

    /// Requests sent and not yet answered.
    pub fn pending(&self) -> usize {
        self.in_flight.len()
    }

    /// True while part of a reply has been received and the rest has not.
    pub fn mid_reply(&self) -> bool {
        self.direct.is_some() || self.end > self.start
    }

    /// Whether a READ of `length` bytes with a target of that size would be accepted by
    /// `request` (so a caller can keep its target when it would not).
    pub fn takes_read(&self, length: u32) -> bool {
        self.broken.is_none() && !self.disconnected && length <= wire::MAX_PAYLOAD
    }

    /// Registers a request and returns its cookie and header. A WRITE is followed on
    /// the wire by its `payload_len` bytes (the shell sends them); a READ needs a
    /// `target` of exactly `length` bytes, which comes back with its completion.
    pub fn request(
        &mut self,
        typ: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload_len: Option<usize>,
        target: Option<T>,
    ) -> Result<(u64, [u8; wire::REQUEST_SIZE]), Refused> {
        if let Some(broken) = &self.broken {
            return Err(Refused(format!("the connection failed earlier: {broken}")));
        }
        if self.disconnected {
            return Err(Refused("the connection was disconnected (NBD_CMD_DISC sent)".into()));
        }
        if typ == wire::CMD_DISC {
            return Err(Refused("disconnect with disconnect(), not as a request".into()));
        }
        match (typ, payload_len) {
            (wire::CMD_WRITE, Some(n)) if n == length as usize => {}
            (wire::CMD_WRITE, _) => return Err(Refused("a WRITE needs exactly `length` bytes of data".into())),
            (wire::CMD_RING_WRITE, Some(wire::RING_DESCRIPTOR)) => {}
            (wire::CMD_RING_WRITE, _) => return Err(Refused("a ring WRITE carries a 16-byte descriptor".into())),
            (_, Some(_)) => return Err(Refused("only WRITE requests carry data".into())),
            _ => {}
        }
        if matches!(typ, wire::CMD_READ | wire::CMD_WRITE | wire::CMD_RING_WRITE) && length > wire::MAX_PAYLOAD {
            return Err(Refused(format!(
                "{} of {length} bytes exceeds 32 MiB",
                command_name(typ)
            )));
        }
        let mut target = target;
        let target_len = target.as_mut().map(|t| t.bytes_mut().len());
        match (typ, target_len) {
            (wire::CMD_READ, Some(n)) if n == length as usize => {}
            (wire::CMD_READ, _) => {
                return Err(Refused(
                    "a READ needs a writable target of exactly `length` bytes".into(),
                ));
            }
            (_, Some(_)) => return Err(Refused("only READ requests take a target".into())),
            _ => {}
        }
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.in_flight.insert(
            cookie,
            InFlight {
                typ,
                offset,
                length,
                target,
                coverage: Coverage::default(),
                error: 0,
                message: String::new(),
            },
        );
        Ok((
            cookie,
            RequestHeader {
                flags,
                typ,
                cookie,
                offset,
                length,
            }
            .encode(),
        ))
    }

    /// NBD_CMD_DISC's header: no request may follow; replies still pending may.
    pub fn disconnect(&mut self) -> [u8; wire::REQUEST_SIZE] {
        self.disconnected = true;
        RequestHeader {
            flags: 0,
            typ: wire::CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .encode()
    }

    /// Where the next received bytes go: the unfilled rest of a payload being received
    /// in place (if any), then the scratch buffer. Fill them in that order and call
    /// `received` with the total.
    pub fn recv_space(&mut self) -> (&mut [u8], &mut [u8]) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.scratch.len() - self.end < RECEIVE_WINDOW {
            self.scratch.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let window = (self.end + self.window).min(self.scratch.len());
        let scratch = &mut self.scratch[self.end..window];
        let direct: &mut [u8] = match &self.direct {
            Some(d) => match self.in_flight.get_mut(&d.cookie).and_then(|r| r.target.as_mut()) {
                Some(t) => &mut t.bytes_mut()[d.at..d.at + d.left],
                None => &mut [],
            },
            None => &mut [],
        };
        (direct, scratch)
    }

    /// `n` bytes were written into what `recv_space` handed out (in its order).
    pub fn received(&mut self, n: usize) -> Result<(), Broken> {
        if let Some(broken) = &self.broken {
            return Err(broken.clone());
        }
        let mut n = n;
        if let Some(d) = &mut self.direct {
            let took = n.min(d.left);
            d.at += took;
            d.left -= took;
            n -= took;
            if d.left == 0 {
                let d = self.direct.take().expect("checked above");
                self.window = SMALL_WINDOW;
                self.guard(|core| core.payload_done(d.cookie, d.then))?;
            }
        } else {
            self.window = RECEIVE_WINDOW;
        }
        self.end += n;
        self.guard(Self::parse)
    }

    /// Feeds bytes received elsewhere (a TLS stream, a test), copying them.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), Broken> {
        while !data.is_empty() {
            let (direct, scratch) = self.recv_space();
            let a = direct.len().min(data.len());
            direct[..a].copy_from_slice(&data[..a]);
            let b = scratch.len().min(data.len() - a);
            scratch[..b].copy_from_slice(&data[a..a + b]);
            data = &data[a + b..];
            self.received(a + b)?;
        }
        Ok(())
    }

    /// The requests answered since the last call, in the order their replies ended.
    pub fn take_completions(&mut self) -> Vec<Completion<T>> {
        std::mem::take(&mut self.completions)
    }

    /// Gives up on every request still pending (the shell fails them): their cookies.
    pub fn abandon_all(&mut self) -> Vec<u64> {
        self.abandon_targets().into_iter().map(|(c, _)| c).collect()
    }

    /// As `abandon_all`, with each request's read target (if it had one), in cookie order.
    pub fn abandon_targets(&mut self) -> Vec<(u64, Option<T>)> {
        self.direct = None;
        let mut out: Vec<(u64, Option<T>)> = self.in_flight.drain().map(|(c, r)| (c, r.target)).collect();
        out.sort_unstable_by_key(|(c, _)| *c);
        out
    }

    /// The read target of request `cookie`, while it is in flight.
    pub fn target_mut(&mut self, cookie: u64) -> Option<&mut T> {
        self.in_flight.get_mut(&cookie).and_then(|r| r.target.as_mut())
    }

    fn guard(&mut self, step: impl FnOnce(&mut Self) -> Result<(), Broken>) -> Result<(), Broken> {
        step(self).inspect_err(|err| {
            self.broken = Some(err.clone());
            self.direct = None;
        })
    }

    fn parse(&mut self) -> Result<(), Broken> {
        while self.direct.is_none() {
            let avail = self.end - self.start;
            if avail < 4 {
                return Ok(());
            }
            let head = &self.scratch[self.start..self.end];
            let magic = wire::be_u32(head, 0);
            let progressed = if magic == wire::SIMPLE_REPLY_MAGIC {
                if avail < wire::SIMPLE_REPLY_SIZE {
                    return Ok(());
                }
                self.simple_reply(SimpleReply::decode(head))?
            } else if magic == wire::STRUCTURED_REPLY_MAGIC {
                if !self.structured {
                    return Err(Broken("structured reply chunk, but none were negotiated".into()));
                }
                if avail < wire::CHUNK_HEADER_SIZE {
                    return Ok(());
                }
                self.chunk(ChunkHeader::decode(head))?
            } else {
                return Err(Broken(format!("bad reply magic {magic:#010x}")));
            };
            if !progressed {
                return Ok(());
            }
        }
        Ok(())
    }

    fn unknown(cookie: u64) -> Broken {
        Broken(format!("reply for unknown cookie {cookie:#x}"))
    }

    /// Parses a simple reply at `start`; false if more bytes are needed.
    fn simple_reply(&mut self, reply: SimpleReply) -> Result<bool, Broken> {
        let structured = self.structured;
        let req = self
            .in_flight
            .get_mut(&reply.cookie)
            .ok_or_else(|| Self::unknown(reply.cookie))?;
        let body = self.start + wire::SIMPLE_REPLY_SIZE;
        if req.typ != wire::CMD_READ || reply.error != 0 {
            if req.typ == wire::CMD_READ && structured {
                return Err(Broken(
                    "simple reply to a READ after structured replies were negotiated".into(),
                ));
            }
            self.start = body;
            self.complete(reply.cookie, reply.error, String::new());
            return Ok(true);
        }
        if structured {
            return Err(Broken(
                "simple reply to a READ after structured replies were negotiated".into(),
            ));
        }
        let length = req.length as usize;
        self.receive_into(reply.cookie, 0, length, body, Then::Reply)
    }

    /// Routes `length` payload bytes starting at `body` into the request's target at `at`:
    /// what is here is copied, the rest is received in place. True if it is all here.
    fn receive_into(&mut self, cookie: u64, at: usize, length: usize, body: usize, then: Then) -> Result<bool, Broken> {
        let have = (self.end - body).min(length);
        let req = self.in_flight.get_mut(&cookie).expect("looked up by the caller");
        let target = req.target.as_mut().expect("reads have a target").bytes_mut();
        target[at..at + have].copy_from_slice(&self.scratch[body..body + have]);
        if have == length {
            self.start = body + length;
            self.payload_done(cookie, then)?;
            return Ok(true);
        }
        self.start = 0;
        self.end = 0;
        self.direct = Some(Direct {
            cookie,
            at: at + have,
            left: length - have,
            then,
        });
        Ok(false)
    }

    fn payload_done(&mut self, cookie: u64, then: Then) -> Result<(), Broken> {
        match then {
            Then::Reply => {
                self.complete(cookie, 0, String::new());
                Ok(())
            }
            Then::Chunk { done } => self.chunk_done(cookie, done),
        }
    }

    /// Parses a structured reply chunk at `start`; false if more bytes are needed.
    fn chunk(&mut self, chunk: ChunkHeader) -> Result<bool, Broken> {
        let body = self.start + wire::CHUNK_HEADER_SIZE;
        let have = self.end - body;
        let done = chunk.flags & wire::REPLY_FLAG_DONE != 0;
        let length = chunk.length;
        let req = self
            .in_flight
            .get_mut(&chunk.cookie)
            .ok_or_else(|| Self::unknown(chunk.cookie))?;
        let (typ, req_offset, req_length) = (req.typ, req.offset, req.length);
        let not_read = |kind: &str| Broken(format!("{kind} chunk in reply to {}", command_name(typ)));
        match chunk.typ {
            wire::CHUNK_OFFSET_DATA => {
                if typ != wire::CMD_READ {
                    return Err(not_read("OFFSET_DATA"));
                }
                if length <= 8 || length - 8 > req_length {
                    return Err(Broken(format!(
                        "OFFSET_DATA chunk of {length} bytes for a read of {req_length} bytes"
                    )));
                }
                if have < 8 {
                    return Ok(false);
                }
                let offset = be_u64(&self.scratch, body);
                let at = req.coverage.claim(req_offset, req_length, offset, length - 8)?;
                self.receive_into(
                    chunk.cookie,
                    at as usize,
                    (length - 8) as usize,
                    body + 8,
                    Then::Chunk { done },
                )
            }
            wire::CHUNK_OFFSET_HOLE => {
                if typ != wire::CMD_READ {
                    return Err(not_read("OFFSET_HOLE"));
                }
                if length != 12 {
                    return Err(Broken(format!("OFFSET_HOLE chunk of {length} bytes, expected 12")));
                }
                if have < 12 {
                    return Ok(false);
                }
                let offset = be_u64(&self.scratch, body);
                let hole = wire::be_u32(&self.scratch, body + 8);
                if hole == 0 {
                    return Err(Broken("OFFSET_HOLE chunk of zero bytes".into()));
                }
                let at = req.coverage.claim(req_offset, req_length, offset, hole)? as usize;
                if let Some(target) = req.target.as_mut() {
                    target.bytes_mut()[at..at + hole as usize].fill(0);
                }
                self.start = body + 12;
                self.chunk_done(chunk.cookie, done)?;
                Ok(true)
            }
            wire::CHUNK_NONE => {
                if length != 0 || !done {
                    return Err(Broken("NONE chunk must be empty and final".into()));
                }
                self.start = body;
                self.chunk_done(chunk.cookie, done)?;
                Ok(true)
            }
            kind if kind & wire::CHUNK_ERROR_BIT != 0 => {
                if !(6..=MAX_ERROR_CHUNK).contains(&length) {
                    return Err(Broken(format!("error chunk of {length} bytes")));
                }
                let length = length as usize;
                if have < length {
                    return Ok(false);
                }
                let bytes = &self.scratch[body..body + length];
                let error = wire::be_u32(bytes, 0);
                let text_len = wire::be_u16(bytes, 4) as usize;
                if text_len > length - 6 {
                    return Err(Broken("error chunk message overruns the chunk".into()));
                }
                if kind == wire::CHUNK_ERROR_OFFSET {
                    if length - 6 - text_len != 8 {
                        return Err(Broken("ERROR_OFFSET chunk has a bad length".into()));
                    }
                    let offset = be_u64(bytes, length - 8);
                    if !(req_offset <= offset && (offset - req_offset) < req_length.max(1) as u64) {
                        return Err(Broken(format!("ERROR_OFFSET {offset} lies outside the request")));
                    }
                }
                let message = String::from_utf8_lossy(&bytes[6..6 + text_len]).into_owned();
                if req.error == 0 {
                    req.error = if error == 0 { wire::ERR_EIO } else { error };
                    req.message = message;
                }
                self.start = body + length;
                self.chunk_done(chunk.cookie, done)?;
                Ok(true)
            }
            other => Err(Broken(format!("unexpected structured chunk type {other}"))),
        }
    }

    fn chunk_done(&mut self, cookie: u64, done: bool) -> Result<(), Broken> {
        if !done {
            return Ok(());
        }
        let req = self.in_flight.get_mut(&cookie).expect("a chunk's request is in flight");
        if req.error != 0 {
            let (error, message) = (req.error, std::mem::take(&mut req.message));
            self.complete(cookie, error, message);
            return Ok(());
        }
        if req.typ == wire::CMD_READ && req.coverage.covered != req.length as u64 {
            return Err(Broken(format!(
                "structured read reply covers {} of {} bytes",
                req.coverage.covered, req.length
            )));
        }
        self.complete(cookie, 0, String::new());
        Ok(())
    }

    fn complete(&mut self, cookie: u64, error: u32, message: String) {
        let req = self.in_flight.remove(&cookie).expect("a reply's request is in flight");
        self.completions.push(Completion {
            cookie,
            error,
            message,
            target: req.target,
        });
    }
}
