//! The server's transmission phase of NBD, without I/O (h11 style): request bytes in,
//! checked requests out; reply headers framed into bytes.
//!
//! `Framer::parse` takes the received bytes and hands out every complete request,
//! each already checked against the negotiated export (`Checker`). A WRITE's payload
//! is either in the bytes given (small ones wait there until whole) or, when large,
//! received by the shell straight into a buffer of its own: `parse` then says how big
//! (`Parsed::want`) and the shell calls `payload_received` when it is full. A WRITE
//! longer than `REQUEST_PART` comes out as pieces of at most that size, so a hostile
//! 4 GiB length holds one piece of memory at a time; a refused one longer than
//! `REFUSED_DRAIN_MAX` ends the parse like NBD_CMD_DISC (its refusal is the last item,
//! without payload: the shell answers it and closes). Anything that cannot be answered
//! with an error reply (a bad magic) is a `ProtocolError`: the connection is dropped.
//! Nothing may follow NBD_CMD_DISC; bytes after it are dropped unread.

use std::ops::Range;

use crate::nbd_wire::{
    RequestHeader, CMD_DISC, CMD_READ, CMD_WRITE, CMD_WRITE_ZEROES, FLAG_DF, FLAG_FAST_ZERO, FLAG_FUA, FLAG_NO_HOLE,
    REQUEST_SIZE, TFLAG_SEND_FAST_ZERO, TFLAG_SEND_FUA,
};

mod checks;
mod replies;
#[cfg(test)]
pub(crate) mod tests;

pub use checks::{Checker, Refusal};
pub use replies::{frame_block_status, frame_read_error, frame_read_part, frame_reply, MAX_DESCRIPTORS};

/// The most one backend call handles; longer WRITEs arrive in pieces of this size.
pub const REQUEST_PART: u32 = crate::nbd_wire::MAX_PAYLOAD;
/// Payload remainders above this are received straight into their own buffer.
pub const DIRECT_THRESHOLD: usize = 64 * 1024;
/// A WRITE payload up to this size that is not all here waits for the rest among the
/// received bytes (half the shell's receive buffer, so it always fits).
pub const WAIT_MAX: usize = 128 * 1024;
/// A refused WRITE longer than this (the maximum payload advertised) is answered at once
/// and ends the connection: draining up to 4 GiB of a payload that is refused anyway
/// held the connection (and its reads) for as long as the peer cared to send.
pub const REFUSED_DRAIN_MAX: u32 = 2 * REQUEST_PART;

#[derive(Debug, PartialEq, Eq)]
pub struct ProtocolError(pub String);

/// Where a request's payload is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// No payload (any request but WRITE).
    None,
    /// These bytes of the buffer given to `parse`.
    Inline(Range<usize>),
    /// The buffer the shell has just filled for `Parsed::want`.
    Received,
}

/// One request, or one piece of a WRITE longer than REQUEST_PART.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub head: RequestHeader,
    /// Why the request is refused (the error reply to send), or None to serve it.
    pub refusal: Option<Refusal>,
    /// Where this item's data starts: the request's offset, or the piece's.
    pub offset: u64,
    /// Bytes of this item: the request's length, or the piece's.
    pub length: u32,
    pub payload: Payload,
    /// For a piece of a long WRITE: Some(true) for the last one.
    pub piece: Option<bool>,
}

/// What `parse` did with the bytes it was given.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Bytes consumed: the rest is kept and given again with more after it.
    pub consumed: usize,
    /// Non-zero: receive the next `want` payload bytes into a buffer of their own, of
    /// which the unconsumed bytes are the start (fewer than `want`), then call
    /// `payload_received`.
    pub want: usize,
}

#[derive(Debug)]
enum State {
    Headers,
    /// A WRITE's payload, `done` bytes of it handed out so far.
    Payload {
        head: RequestHeader,
        refusal: Option<Refusal>,
        done: u32,
    },
    /// NBD_CMD_DISC was received: nothing may follow.
    Disconnected,
}

/// The request side of one connection in transmission.
#[derive(Debug)]
pub struct Framer {
    checker: Checker,
    state: State,
}

impl Framer {
    pub fn new(checker: Checker) -> Self {
        Self {
            checker,
            state: State::Headers,
        }
    }

    pub fn disconnected(&self) -> bool {
        matches!(self.state, State::Disconnected)
    }

    /// Bytes of the current WRITE payload (or piece) still to be handed out as one item.
    fn piece(head: &RequestHeader, done: u32) -> u32 {
        (head.length - done).min(REQUEST_PART)
    }

    /// Parses every complete request in `buf`, appending them to `out`.
    pub fn parse(&mut self, buf: &[u8], out: &mut Vec<Item>) -> Result<Parsed, ProtocolError> {
        let mut at = 0;
        loop {
            let avail = buf.len() - at;
            match &mut self.state {
                State::Disconnected => {
                    return Ok(Parsed {
                        consumed: buf.len(),
                        want: 0,
                    })
                }
                State::Payload { head, done, .. } => {
                    let piece = Self::piece(head, *done);
                    if avail < piece as usize {
                        return Ok(Parsed {
                            consumed: at,
                            want: piece as usize,
                        });
                    }
                    let end = at + piece as usize;
                    out.push(self.finish_piece(Payload::Inline(at..end)));
                    at = end;
                }
                State::Headers => {
                    if avail < REQUEST_SIZE {
                        return Ok(Parsed { consumed: at, want: 0 });
                    }
                    let head = RequestHeader::decode(&buf[at..])
                        .map_err(|magic| ProtocolError(format!("bad request magic {magic:#010x}")))?;
                    let refusal = self.checker.check(&head);
                    let body = at + REQUEST_SIZE;
                    if head.typ != CMD_WRITE {
                        if head.typ == CMD_DISC {
                            self.state = State::Disconnected;
                        }
                        out.push(Item {
                            head,
                            refusal,
                            offset: head.offset,
                            length: head.length,
                            payload: Payload::None,
                            piece: None,
                        });
                        at = body;
                        continue;
                    }
                    if refusal.is_some() && head.length > REFUSED_DRAIN_MAX {
                        // No payload item: the refusal, then nothing more is read.
                        self.state = State::Disconnected;
                        out.push(Item {
                            head,
                            refusal,
                            offset: head.offset,
                            length: head.length,
                            payload: Payload::None,
                            piece: None,
                        });
                        at = body;
                        continue;
                    }
                    let length = head.length as usize;
                    let have = buf.len() - body;
                    if head.length <= REQUEST_PART {
                        if have >= length {
                            out.push(Item {
                                head,
                                refusal,
                                offset: head.offset,
                                length: head.length,
                                payload: Payload::Inline(body..body + length),
                                piece: None,
                            });
                            at = body + length;
                            continue;
                        }
                        if length - have <= DIRECT_THRESHOLD && length <= WAIT_MAX {
                            return Ok(Parsed { consumed: at, want: 0 }); // small: wait here
                        }
                    }
                    self.state = State::Payload { head, refusal, done: 0 };
                    at = body;
                }
            }
        }
    }

    /// The buffer asked for by `Parsed::want` is full: the item it completes.
    pub fn payload_received(&mut self) -> Result<Item, ProtocolError> {
        if !matches!(self.state, State::Payload { .. }) {
            return Err(ProtocolError("no WRITE payload is being received".into()));
        }
        Ok(self.finish_piece(Payload::Received))
    }

    /// The current WRITE's next piece (or whole payload) is `payload`.
    fn finish_piece(&mut self, payload: Payload) -> Item {
        let State::Payload { head, refusal, done } = &mut self.state else {
            unreachable!("finish_piece is called in the Payload state only");
        };
        let (head, start) = (*head, *done);
        let n = Self::piece(&head, start);
        *done += n;
        let parted = head.length > REQUEST_PART;
        let last = *done == head.length;
        let item = Item {
            head,
            refusal: refusal.clone(),
            offset: head.offset.wrapping_add(u64::from(start)),
            length: n,
            payload,
            piece: parted.then_some(last),
        };
        if last {
            self.state = State::Headers;
        }
        item
    }
}

/// Flags a client may set on `command` for an export advertised with `tflags`.
pub fn allowed_flags(command: u16, tflags: u16, structured: bool) -> u16 {
    let mut allowed = if tflags & TFLAG_SEND_FUA != 0 { FLAG_FUA } else { 0 };
    if command == CMD_READ && structured {
        allowed |= FLAG_DF;
    } else if command == CMD_WRITE_ZEROES {
        allowed |= FLAG_NO_HOLE;
        if tflags & TFLAG_SEND_FAST_ZERO != 0 {
            allowed |= FLAG_FAST_ZERO;
        }
    }
    allowed
}
