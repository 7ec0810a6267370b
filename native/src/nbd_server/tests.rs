use super::*;
use crate::nbd_wire::{
    ChunkHeader, SimpleReply, CHUNK_ERROR, CHUNK_ERROR_OFFSET, CHUNK_NONE, CHUNK_OFFSET_DATA, CMD_FLUSH, CMD_TRIM,
    ERR_EINVAL, ERR_EIO, ERR_ENOSPC, ERR_EPERM, REPLY_FLAG_DONE, SIMPLE_REPLY_SIZE, TFLAG_READ_ONLY, TFLAG_SEND_CACHE,
    TFLAG_SEND_FAST_ZERO, TFLAG_SEND_FLUSH, TFLAG_SEND_FUA, TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES,
};

const SIZE: u64 = 1 << 20;
const ALL: u16 = TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_SEND_CACHE
    | TFLAG_SEND_FAST_ZERO;

fn framer() -> Framer {
    Framer::new(Checker::new(SIZE, ALL | 1, true))
}

fn request(typ: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let head = RequestHeader {
        flags: 0,
        typ,
        cookie,
        offset,
        length,
    };
    head.encode().to_vec()
}

fn write(cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut bytes = request(CMD_WRITE, cookie, offset, data.len() as u32);
    bytes.extend_from_slice(data);
    bytes
}

/// Feeds `chunks` to `framer` the way the shell does (unconsumed bytes kept, large
/// payloads received into buffers of their own): each item with its payload. Also the
/// cores' agreement test (nbd_cores_agree.rs) feeds the server this way.
pub(crate) fn feed_items(framer: &mut Framer, chunks: &[&[u8]]) -> Vec<(Item, Vec<u8>)> {
    let mut kept: Vec<u8> = Vec::new();
    let mut direct: Option<(Vec<u8>, usize)> = None; // (buffer, bytes wanted)
    let mut got = Vec::new();
    for chunk in chunks {
        let mut rest: &[u8] = chunk;
        while !rest.is_empty() {
            if let Some((buf, want)) = &mut direct {
                let n = (*want - buf.len()).min(rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                if buf.len() == *want {
                    let item = framer.payload_received().expect("a payload was wanted");
                    got.push((item, std::mem::take(buf)));
                    direct = None;
                }
                continue;
            }
            kept.extend_from_slice(rest);
            rest = &[];
            let mut items = Vec::new();
            let parsed = framer.parse(&kept, &mut items).expect("valid request headers");
            for item in items {
                let data = match &item.payload {
                    Payload::None => Vec::new(),
                    Payload::Inline(range) => kept[range.clone()].to_vec(),
                    Payload::Received => unreachable!("parse hands out no received payload"),
                };
                got.push((item, data));
            }
            let early = kept.split_off(parsed.consumed);
            kept.clear();
            if parsed.want != 0 {
                assert!(early.len() < parsed.want);
                direct = Some((early, parsed.want));
            } else {
                kept = early;
            }
        }
    }
    assert!(direct.is_none() && kept.is_empty(), "bytes left over");
    got
}

/// `feed_items` as (cookie, offset, data, refusal) per item, each payload of its length.
fn feed(framer: &mut Framer, chunks: &[&[u8]]) -> Vec<(u64, u64, Vec<u8>, Option<Refusal>)> {
    feed_items(framer, chunks)
        .into_iter()
        .map(|(item, data)| {
            let want = if item.payload == Payload::None {
                0
            } else {
                item.length as usize
            };
            assert_eq!(data.len(), want);
            (item.head.cookie, item.offset, data, item.refusal)
        })
        .collect()
}

#[test]
fn requests_split_at_every_byte_parse_exactly() {
    let mut stream = request(CMD_READ, 1, 4096, 4096);
    stream.extend(write(2, 0, &[7; 100]));
    stream.extend(write(3, 8192, &vec![9; 200_000])); // received in place
    stream.extend(request(CMD_FLUSH, 4, 0, 0));
    let whole = feed(&mut framer(), &[&stream]);
    assert_eq!(whole.len(), 4);
    assert_eq!(whole[2].2, vec![9; 200_000]);
    // Every cut among the headers and the small payload, and every 997th in the large one.
    let cuts = (0..250)
        .chain((250..stream.len()).step_by(997))
        .chain(stream.len() - 80..stream.len());
    for cut in cuts {
        let got = feed(&mut framer(), &[&stream[..cut], &stream[cut..]]);
        assert_eq!(got, whole, "cut at {cut}");
    }
    let bytes: Vec<&[u8]> = stream.chunks(1).collect(); // one byte per read, all through
    assert_eq!(feed(&mut framer(), &bytes), whole);
}

#[test]
fn a_large_write_is_received_in_its_own_buffer_with_the_header_only_consumed() {
    let mut f = framer();
    let mut stream = write(5, 0, &vec![1; 100_000]);
    stream.truncate(REQUEST_SIZE + 10);
    let mut items = Vec::new();
    let parsed = f.parse(&stream, &mut items).unwrap();
    assert_eq!(
        parsed,
        Parsed {
            consumed: REQUEST_SIZE,
            want: 100_000
        }
    );
    assert!(items.is_empty());
    let item = f.payload_received().unwrap();
    assert_eq!(
        (item.head.cookie, item.length, item.payload, item.piece),
        (5, 100_000, Payload::Received, None)
    );
    assert_eq!(
        f.payload_received(),
        Err(ProtocolError("no WRITE payload is being received".into()))
    );
}

#[test]
fn a_small_write_waits_among_the_received_bytes() {
    let mut f = framer();
    let stream = write(5, 0, &[1; 4096]);
    let mut items = Vec::new();
    assert_eq!(
        f.parse(&stream[..100], &mut items).unwrap(),
        Parsed { consumed: 0, want: 0 }
    );
    assert_eq!(
        f.parse(&stream, &mut items).unwrap(),
        Parsed {
            consumed: stream.len(),
            want: 0
        }
    );
    assert_eq!(items[0].payload, Payload::Inline(REQUEST_SIZE..stream.len()));
}

#[test]
fn a_4_gib_write_holds_one_piece_at_a_time() {
    let mut f = Framer::new(Checker::new(8 << 30, ALL | 1, true));
    let mut items = Vec::new();
    let head = request(CMD_WRITE, 9, 0, u32::MAX);
    let parsed = f.parse(&head, &mut items).unwrap();
    assert_eq!(
        parsed,
        Parsed {
            consumed: REQUEST_SIZE,
            want: REQUEST_PART as usize
        }
    );
    let first = f.payload_received().unwrap();
    assert_eq!((first.piece, first.refusal.clone()), (Some(false), None));
    let mut offsets = vec![first.offset];
    loop {
        let parsed = f.parse(&[], &mut items).unwrap();
        assert!(parsed.want <= REQUEST_PART as usize && parsed.want > 0);
        let item = f.payload_received().unwrap();
        assert_eq!(item.refusal, None);
        offsets.push(item.offset);
        if item.piece == Some(true) {
            assert_eq!(u64::from(item.length), u64::from(u32::MAX) % u64::from(REQUEST_PART));
            break;
        }
    }
    assert_eq!(offsets.len(), 128);
    assert!(offsets.windows(2).all(|w| w[1] - w[0] == u64::from(REQUEST_PART)));
    // back to headers
    assert_eq!(
        f.parse(&request(CMD_FLUSH, 1, 0, 0), &mut items).unwrap().consumed,
        REQUEST_SIZE
    );
}

#[test]
fn a_refused_write_longer_than_the_drain_bound_ends_the_parse() {
    // Up to REFUSED_DRAIN_MAX, a refused WRITE's payload is read (in pieces) and the
    // stream stays in sync; beyond it, the refusal comes out at once, without payload,
    // and nothing more is parsed (the shell answers and closes).
    let mut f = framer();
    let mut items = Vec::new();
    let parsed = f
        .parse(&request(CMD_WRITE, 3, 0, REFUSED_DRAIN_MAX), &mut items)
        .unwrap();
    assert_eq!(parsed.want, REQUEST_PART as usize);
    let first = f.payload_received().unwrap();
    assert_eq!(first.refusal.map(|r| r.error), Some(ERR_ENOSPC));
    assert!(!f.disconnected());

    let mut f = framer();
    let mut bytes = request(CMD_WRITE, 9, 0, u32::MAX);
    bytes.extend([0xAB; 4096]);
    bytes.extend(request(CMD_READ, 10, 0, 512));
    let parsed = f.parse(&bytes, &mut items).unwrap();
    assert_eq!(
        parsed,
        Parsed {
            consumed: bytes.len(),
            want: 0
        }
    );
    let item = items.pop().unwrap();
    assert!(items.is_empty(), "nothing after the refused WRITE is parsed");
    assert_eq!((item.head.cookie, item.payload, item.piece), (9, Payload::None, None));
    let refusal = item.refusal.expect("beyond the export");
    assert_eq!(refusal.error, ERR_ENOSPC);
    assert_eq!(
        refusal.message,
        format!("WRITE [0, {}) is beyond the export size {SIZE}", u32::MAX)
    );
    assert!(f.disconnected());
}

#[test]
fn bad_magic_and_garbage_are_protocol_errors() {
    let mut f = framer();
    let mut bytes = request(CMD_READ, 1, 0, 1);
    bytes[0] ^= 0xFF;
    let mut items = Vec::new();
    assert_eq!(
        f.parse(&bytes, &mut items),
        Err(ProtocolError("bad request magic 0xda609513".into()))
    );
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    assert!(framer().parse(&garbage, &mut items).is_err());
    assert_eq!(
        framer().parse(&garbage[..27], &mut items).unwrap(),
        Parsed { consumed: 0, want: 0 }
    );
}

#[test]
fn nothing_after_disc_is_parsed() {
    let mut f = framer();
    let mut bytes = request(CMD_DISC, 1, 0, 0);
    bytes.extend(request(CMD_READ, 2, 0, 1));
    bytes.extend([0xFF; 50]);
    let mut items = Vec::new();
    assert_eq!(
        f.parse(&bytes, &mut items).unwrap(),
        Parsed {
            consumed: bytes.len(),
            want: 0
        }
    );
    assert_eq!(items.len(), 1);
    assert_eq!((items[0].head.typ, items[0].refusal.clone()), (CMD_DISC, None));
    assert!(f.disconnected());
}

fn refusal_of(checker: &Checker, typ: u16, flags: u16, offset: u64, length: u32) -> Option<(u32, String)> {
    let head = RequestHeader {
        flags,
        typ,
        cookie: 1,
        offset,
        length,
    };
    checker.check(&head).map(|r| (r.error, r.message))
}

#[test]
fn checks_follow_the_spec_with_precise_messages() {
    let all = Checker::new(SIZE, ALL, true);
    assert_eq!(refusal_of(&all, CMD_READ, 0, SIZE - 1, 1), None);
    assert_eq!(
        refusal_of(&all, CMD_READ, 0, SIZE, 1),
        Some((
            ERR_EINVAL,
            format!("READ [{SIZE}, {}) is beyond the export size {SIZE}", SIZE + 1)
        ))
    );
    assert_eq!(refusal_of(&all, CMD_WRITE_ZEROES, 0, SIZE, 1).unwrap().0, ERR_ENOSPC);
    let far = refusal_of(&all, CMD_READ, 0, u64::MAX, u32::MAX).unwrap().1;
    assert_eq!(
        far,
        format!(
            "READ [{}, {}) is beyond the export size {SIZE}",
            u64::MAX,
            u128::from(u64::MAX) + u128::from(u32::MAX)
        )
    );
    assert_eq!(
        refusal_of(&all, 7, 0, 0, 0).unwrap().1,
        "BLOCK_STATUS needs a metadata context; none was negotiated"
    );
    assert_eq!(
        refusal_of(&all, 99, 0, 0, 0),
        Some((ERR_EINVAL, "unknown command 99".into()))
    );
    assert_eq!(refusal_of(&all, CMD_READ, FLAG_DF, 0, 1), None);
    assert_eq!(
        refusal_of(&all, CMD_WRITE, FLAG_DF | 0x100, 0, 1).unwrap().1,
        "command flags 0x104 are not valid for WRITE here"
    );
    assert_eq!(
        refusal_of(&all, CMD_FLUSH, 0, 1, 0).unwrap().1,
        "FLUSH must have offset and length 0"
    );
    assert_eq!(refusal_of(&all, CMD_DISC, 0xFFFF, 5, 5), None);
    let simple = Checker::new(SIZE, 0, false);
    assert_eq!(
        refusal_of(&simple, CMD_READ, FLAG_DF, 0, 1).unwrap().1,
        "command flags 0x4 are not valid for READ here"
    );
    assert_eq!(
        refusal_of(&simple, CMD_READ, FLAG_FUA, 0, 1).unwrap().1,
        "command flags 0x1 are not valid for READ here"
    );
    assert_eq!(
        refusal_of(&simple, CMD_TRIM, 0, 0, 1),
        Some((ERR_EINVAL, "TRIM is not supported by this export".into()))
    );
    let read_only = Checker::new(SIZE, ALL | TFLAG_READ_ONLY, false);
    assert_eq!(
        refusal_of(&read_only, CMD_WRITE, 0, 0, 1),
        Some((ERR_EPERM, "WRITE on a read-only export".into()))
    );
    assert_eq!(refusal_of(&read_only, CMD_READ, 0, 0, 1), None);
}

#[test]
fn replies_are_framed_as_negotiated() {
    let mut out = Vec::new();
    frame_reply(&mut out, false, 7, 0, "", Some((4096, 512)));
    assert_eq!(
        out,
        [&0x6744_6698u32.to_be_bytes()[..], &[0; 4], &7u64.to_be_bytes()].concat()
    );
    out.clear();
    frame_reply(&mut out, true, 7, 0, "", Some((4096, 512)));
    let head = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        typ: CHUNK_OFFSET_DATA,
        cookie: 7,
        length: 520,
    };
    let want = [&head.encode()[..], &4096u64.to_be_bytes()].concat();
    assert_eq!(out, want);
    out.clear();
    frame_reply(&mut out, true, 7, 0, "", None);
    assert_eq!(
        out.len(),
        SIMPLE_REPLY_SIZE,
        "a structured server still answers writes simply"
    );
    out.clear();
    frame_reply(&mut out, true, 7, 0, "", Some((0, 0)));
    assert_eq!(&out[6..8], &CHUNK_NONE.to_be_bytes());
    out.clear();
    frame_reply(&mut out, false, 7, 5, "ignored", None);
    assert_eq!(&out[4..8], &5u32.to_be_bytes());
    out.clear();
    let long = "é".repeat(3000); // 6000 bytes: cut at a character boundary
    frame_reply(&mut out, true, 7, ERR_EINVAL, &long, None);
    assert_eq!(&out[6..8], &CHUNK_ERROR.to_be_bytes());
    let text_len = u16::from_be_bytes([out[24], out[25]]) as usize;
    assert_eq!(text_len, 4096);
    assert_eq!(
        u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize,
        6 + text_len
    );
    assert!(std::str::from_utf8(&out[26..]).is_ok());
}

#[test]
fn read_parts_are_framed_as_negotiated() {
    let mut out = Vec::new();
    // Simple: one header before the first part, nothing before the others.
    frame_read_part(&mut out, false, 9, 0, REQUEST_PART, true, false);
    assert_eq!(out, SimpleReply { error: 0, cookie: 9 }.encode());
    out.clear();
    frame_read_part(&mut out, false, 9, u64::from(REQUEST_PART), 512, false, true);
    assert!(out.is_empty());
    // Structured: an OFFSET_DATA chunk per part; only the last one ends the reply.
    for (last, flags) in [(false, 0), (true, REPLY_FLAG_DONE)] {
        out.clear();
        frame_read_part(&mut out, true, 9, 1 << 40, 512, false, last);
        let head = ChunkHeader {
            flags,
            typ: CHUNK_OFFSET_DATA,
            cookie: 9,
            length: 520,
        };
        assert_eq!(out, [&head.encode()[..], &(1u64 << 40).to_be_bytes()].concat());
    }
}

#[test]
fn a_failed_read_part_ends_the_reply_or_is_refused() {
    let mut out = Vec::new();
    assert_eq!(frame_read_error(&mut out, false, 9, ERR_EIO, "gone", 0, true), Ok(()));
    assert_eq!(
        out,
        SimpleReply {
            error: ERR_EIO,
            cookie: 9
        }
        .encode()
    );
    out.clear();
    // Data went out in a simple reply: no error can follow it.
    assert!(frame_read_error(&mut out, false, 9, ERR_EIO, "gone", 4096, false).is_err());
    assert!(out.is_empty());
    let long = "é".repeat(3000);
    assert_eq!(
        frame_read_error(&mut out, true, 9, ERR_EIO, &long, 1 << 33, false),
        Ok(())
    );
    let head = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        typ: CHUNK_ERROR_OFFSET,
        cookie: 9,
        length: 6 + 4096 + 8,
    };
    assert_eq!(&out[..20], &head.encode()[..]);
    assert_eq!(&out[20..24], &ERR_EIO.to_be_bytes());
    assert_eq!(u16::from_be_bytes([out[24], out[25]]), 4096);
    assert!(std::str::from_utf8(&out[26..26 + 4096]).is_ok());
    assert_eq!(&out[26 + 4096..], &(1u64 << 33).to_be_bytes());
}

#[test]
fn block_status_is_served_only_once_negotiated() {
    use crate::nbd_wire::{CMD_BLOCK_STATUS, FLAG_FUA, FLAG_REQ_ONE};
    let none = Checker::new(SIZE, ALL, true);
    assert_eq!(
        refusal_of(&none, CMD_BLOCK_STATUS, 0, 0, 4096).unwrap().1,
        "BLOCK_STATUS needs a metadata context; none was negotiated"
    );
    let on = Checker::new(SIZE, ALL, true).with_block_status();
    assert_eq!(refusal_of(&on, CMD_BLOCK_STATUS, 0, 0, 4096), None);
    assert_eq!(refusal_of(&on, CMD_BLOCK_STATUS, FLAG_REQ_ONE, SIZE - 1, 1), None);
    let (error, message) = refusal_of(&on, CMD_BLOCK_STATUS, 0, SIZE - 4096, 8192).unwrap();
    assert_eq!(error, ERR_EINVAL);
    assert!(message.contains("beyond the export size"), "{message}");
    let (error, message) = refusal_of(&on, CMD_BLOCK_STATUS, FLAG_FUA, 0, 4096).unwrap();
    assert_eq!((error, message.contains("flags 0x1")), (ERR_EINVAL, true));
    let (error, message) = refusal_of(&on, CMD_BLOCK_STATUS, 0, 0, 0).unwrap();
    assert_eq!((error, message.contains("length 0")), (ERR_EINVAL, true));
    // A hostile offset near 2^64 does not wrap around.
    assert!(refusal_of(&on, CMD_BLOCK_STATUS, 0, u64::MAX - 10, 4096).is_some());
}

fn descriptors(bytes: &[u8]) -> (ChunkHeader, u32, Vec<(u32, u32)>) {
    let head = ChunkHeader::decode(bytes);
    let body = &bytes[crate::nbd_wire::CHUNK_HEADER_SIZE..];
    assert_eq!(body.len(), head.length as usize);
    let id = u32::from_be_bytes(body[..4].try_into().unwrap());
    let pairs = body[4..]
        .chunks(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..].try_into().unwrap()),
            )
        })
        .collect();
    (head, id, pairs)
}

#[test]
fn block_status_replies_are_framed_as_the_spec_wants() {
    use crate::nbd_wire::CHUNK_BLOCK_STATUS;
    let mut out = Vec::new();
    // Zero lengths dropped, equal neighbours merged, the tail cut to the range asked.
    let extents = [(4096, 0), (0, 3), (8192, 3), (4096, 3), (1 << 40, 0)];
    frame_block_status(&mut out, 9, 1, 20000, false, &extents).unwrap();
    let (head, id, pairs) = descriptors(&out);
    assert_eq!(
        (head.typ, head.flags, head.cookie, id),
        (CHUNK_BLOCK_STATUS, REPLY_FLAG_DONE, 9, 1)
    );
    assert_eq!(pairs, vec![(4096, 0), (12288, 3), (3616, 0)]);
    // REQ_ONE: one descriptor (merged with equal neighbours).
    out.clear();
    frame_block_status(&mut out, 9, 1, 20000, true, &extents).unwrap();
    assert_eq!(descriptors(&out).2, vec![(4096, 0)]);
    out.clear();
    frame_block_status(&mut out, 9, 1, 20000, true, &[(4096, 3), (4096, 3), (8, 0)]).unwrap();
    assert_eq!(descriptors(&out).2, vec![(8192, 3)]);
    // A backend that describes nothing gets no reply framed.
    out.clear();
    assert!(frame_block_status(&mut out, 9, 1, 4096, false, &[(0, 1)]).is_err());
    assert!(out.is_empty());
    // Many alternating extents: at most MAX_DESCRIPTORS, the client asks for the rest.
    let many: Vec<(u64, u32)> = (0..MAX_DESCRIPTORS as u64 + 10).map(|i| (1, (i % 2) as u32)).collect();
    frame_block_status(&mut out, 9, 1, u32::MAX, false, &many).unwrap();
    assert_eq!(descriptors(&out).2.len(), MAX_DESCRIPTORS);
}
