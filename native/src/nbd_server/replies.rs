//! Reply framing: the header (and for errors, the whole body) of one reply, as
//! negotiated: simple replies, or structured ones, where a READ's data goes in one
//! OFFSET_DATA chunk that ends the reply and an error in one ERROR chunk with its message.

use crate::nbd_wire::{
    ChunkHeader, SimpleReply, CHUNK_ERROR, CHUNK_NONE, CHUNK_OFFSET_DATA, MAX_STRING, REPLY_FLAG_DONE,
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
        let text = cut_text(message);
        let body = 6 + text.len() as u32;
        chunk(out, CHUNK_ERROR, cookie, body);
        out.extend_from_slice(&error.to_be_bytes());
        out.extend_from_slice(&(text.len() as u16).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
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
