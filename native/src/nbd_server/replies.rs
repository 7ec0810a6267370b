//! Reply framing: the header (and for errors, the whole body) of one reply, as
//! negotiated: simple replies, or structured ones, where a READ's data goes in one
//! OFFSET_DATA chunk that ends the reply and an error in one ERROR chunk with its message.
//! A BLOCK_STATUS reply is one BLOCK_STATUS chunk for the one context we offer
//! (base:allocation): its id, then (length, flags) descriptors.

use crate::nbd_wire::{
    ChunkHeader, SimpleReply, CHUNK_BLOCK_STATUS, CHUNK_ERROR, CHUNK_ERROR_OFFSET, CHUNK_NONE, CHUNK_OFFSET_DATA,
    MAX_STRING, REPLY_FLAG_DONE,
};

/// Appends to `out` the reply to request `cookie`, all but a READ's data, which the
/// caller sends right after: `read` is Some((offset, data length)) for a successful READ.
/// `error` non-zero is an error reply, whose `message` a structured reply carries.
pub fn frame_reply(
    out: &mut Vec<u8>,
    structured: bool,
    cookie: u64,
    error: u32,
    message: &str,
    read: Option<(u64, u32)>,
) {
    if error != 0 {
        if !structured {
            out.extend_from_slice(&SimpleReply { error, cookie }.encode());
            return;
        }
        error_chunk(out, cookie, error, message, None);
        return;
    }
    match read {
        Some((offset, length)) if structured => {
            if length == 0 {
                chunk(out, CHUNK_NONE, cookie, 0);
            } else {
                chunk(out, CHUNK_OFFSET_DATA, cookie, 8 + length);
                out.extend_from_slice(&offset.to_be_bytes());
            }
        }
        _ => out.extend_from_slice(&SimpleReply { error: 0, cookie }.encode()),
    }
}

/// Appends to `out` what goes before the data of one part of a READ reply sent part by
/// part (a READ longer than the 32 MiB the server holds at once): `offset` and `length`
/// are the part's. Structured: an OFFSET_DATA chunk, which ends the reply if `last`.
/// Simple: the reply's header before the `first` part; later parts' data just continue it.
pub fn frame_read_part(
    out: &mut Vec<u8>,
    structured: bool,
    cookie: u64,
    offset: u64,
    length: u32,
    first: bool,
    last: bool,
) {
    if structured {
        let flags = if last { REPLY_FLAG_DONE } else { 0 };
        out.extend_from_slice(
            &ChunkHeader {
                flags,
                typ: CHUNK_OFFSET_DATA,
                cookie,
                length: 8 + length,
            }
            .encode(),
        );
        out.extend_from_slice(&offset.to_be_bytes());
    } else if first {
        out.extend_from_slice(&SimpleReply { error: 0, cookie }.encode());
    }
}

/// Appends to `out` the end of a READ reply sent part by part whose part at `offset`
/// failed with `error`: structured, an ERROR_OFFSET chunk naming that offset; simple,
/// an error reply, which only the `first` part can be (after data went out, the
/// connection must be dropped instead): Err then.
pub fn frame_read_error(
    out: &mut Vec<u8>,
    structured: bool,
    cookie: u64,
    error: u32,
    message: &str,
    offset: u64,
    first: bool,
) -> Result<(), &'static str> {
    if !structured {
        if !first {
            return Err("a simple reply cannot carry an error once its data began: drop the connection");
        }
        out.extend_from_slice(&SimpleReply { error, cookie }.encode());
        return Ok(());
    }
    error_chunk(out, cookie, error, message, Some(offset));
    Ok(())
}

/// An ERROR chunk (ERROR_OFFSET with `offset`) that ends a structured reply.
fn error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str, offset: Option<u64>) {
    let text = cut_text(message);
    let (typ, tail) = match offset {
        Some(_) => (CHUNK_ERROR_OFFSET, 8),
        None => (CHUNK_ERROR, 0),
    };
    chunk(out, typ, cookie, 6 + text.len() as u32 + tail);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(text.len() as u16).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    if let Some(offset) = offset {
        out.extend_from_slice(&offset.to_be_bytes());
    }
}

/// The most descriptors one reply carries; the client asks again for the rest (the
/// spec lets a server describe less than the range asked for).
pub const MAX_DESCRIPTORS: usize = 16 * 1024;

/// Appends to `out` the BLOCK_STATUS reply to request `cookie` (`length` bytes asked,
/// `req_one` if the client set NBD_CMD_FLAG_REQ_ONE) from the backend's `extents`,
/// (length, flags) in order from the request's offset. The descriptors are made as the
/// spec wants them whatever the backend said: none of length 0, neighbours with equal
/// flags merged, none past the range asked for, at most one with REQ_ONE.
/// Err if no descriptor is left (the backend described nothing): send an error instead.
pub fn frame_block_status(
    out: &mut Vec<u8>,
    cookie: u64,
    context: u32,
    length: u32,
    req_one: bool,
    extents: &[(u64, u32)],
) -> Result<(), String> {
    let limit = if req_one { 1 } else { MAX_DESCRIPTORS };
    let mut descriptors: Vec<(u32, u32)> = Vec::new();
    let mut left = u64::from(length);
    for &(n, flags) in extents {
        let n = n.min(left);
        if n == 0 {
            continue;
        }
        left -= n;
        let count = descriptors.len();
        match descriptors.last_mut() {
            // n <= left before, so the sum stays within the u32 request length.
            Some(last) if last.1 == flags => last.0 += n as u32,
            _ if count == limit => break,
            _ => descriptors.push((n as u32, flags)),
        }
        if left == 0 {
            break;
        }
    }
    if descriptors.is_empty() {
        return Err("the backend described no part of the range".into());
    }
    chunk(out, CHUNK_BLOCK_STATUS, cookie, 4 + 8 * descriptors.len() as u32);
    out.extend_from_slice(&context.to_be_bytes());
    for (n, flags) in descriptors {
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
    Ok(())
}

/// Appends the header of the chunk that ends a structured reply.
fn chunk(out: &mut Vec<u8>, typ: u16, cookie: u64, length: u32) {
    out.extend_from_slice(
        &ChunkHeader {
            flags: REPLY_FLAG_DONE,
            typ,
            cookie,
            length,
        }
        .encode(),
    );
}

/// `text` cut to the protocol's 4096-byte string limit, at a character boundary.
fn cut_text(text: &str) -> &str {
    if text.len() <= MAX_STRING {
        return text;
    }
    let mut end = MAX_STRING;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
