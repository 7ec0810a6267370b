//! The client core in memory: honest servers' replies cut at every byte, and hostile ones.

use super::*;
use crate::nbd_wire::{ChunkHeader, SimpleReply};

type Core = ClientCore<Vec<u8>>;
/// (cookie, error, message, target) of one completion.
type Outcome = (u64, u32, String, Option<Vec<u8>>);
/// Sets up requests on a core and returns the bytes a hostile server answers with.
type Setup = Box<dyn FnOnce(&mut Core) -> Vec<u8>>;

fn simple(cookie: u64, error: u32, data: &[u8]) -> Vec<u8> {
    let mut out = SimpleReply { error, cookie }.encode().to_vec();
    out.extend_from_slice(data);
    out
}

fn chunk(cookie: u64, typ: u16, done: bool, body: &[u8]) -> Vec<u8> {
    let flags = if done { wire::REPLY_FLAG_DONE } else { 0 };
    let mut out = ChunkHeader {
        flags,
        typ,
        cookie,
        length: body.len() as u32,
    }
    .encode()
    .to_vec();
    out.extend_from_slice(body);
    out
}

fn data_chunk(cookie: u64, offset: u64, data: &[u8], done: bool) -> Vec<u8> {
    let mut body = offset.to_be_bytes().to_vec();
    body.extend_from_slice(data);
    chunk(cookie, wire::CHUNK_OFFSET_DATA, done, &body)
}

fn hole_chunk(cookie: u64, offset: u64, length: u32, done: bool) -> Vec<u8> {
    let mut body = offset.to_be_bytes().to_vec();
    body.extend_from_slice(&length.to_be_bytes());
    chunk(cookie, wire::CHUNK_OFFSET_HOLE, done, &body)
}

fn error_chunk(cookie: u64, error: u32, text: &str, offset: Option<u64>, done: bool) -> Vec<u8> {
    let mut body = error.to_be_bytes().to_vec();
    body.extend_from_slice(&(text.len() as u16).to_be_bytes());
    body.extend_from_slice(text.as_bytes());
    let typ = match offset {
        Some(at) => {
            body.extend_from_slice(&at.to_be_bytes());
            wire::CHUNK_ERROR_OFFSET
        }
        None => wire::CHUNK_ERROR,
    };
    chunk(cookie, typ, done, &body)
}

fn read(core: &mut Core, offset: u64, length: u32) -> u64 {
    core.request(
        wire::CMD_READ,
        0,
        offset,
        length,
        None,
        Some(vec![0xAA; length as usize]),
    )
    .unwrap()
    .0
}

fn write(core: &mut Core, offset: u64, length: u32) -> u64 {
    core.request(
        wire::CMD_WRITE,
        wire::FLAG_FUA,
        offset,
        length,
        Some(length as usize),
        None,
    )
    .unwrap()
    .0
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Outcomes by cookie: (error, message, target).
fn outcomes(core: &mut Core) -> Vec<Outcome> {
    let mut out: Vec<_> = core
        .take_completions()
        .into_iter()
        .map(|c| (c.cookie, c.error, c.message, c.target))
        .collect();
    out.sort_by_key(|o| o.0);
    out
}

/// A session: requests, and a stream of replies an honest server could send for them.
fn session(structured: bool) -> (Core, Vec<u8>, Vec<Outcome>) {
    let mut core = Core::new(structured);
    let big = pattern(300 * 1024, 1);
    let small = pattern(4096, 2);
    let r1 = read(&mut core, 4096, small.len() as u32);
    let w = write(&mut core, 0, 512);
    let r2 = read(&mut core, 1 << 20, big.len() as u32);
    let f = core.request(wire::CMD_FLUSH, 0, 0, 0, None, None).unwrap().0;
    let mut wire_bytes = Vec::new();
    let mut expect_big = big.clone();
    if structured {
        // Out of order, in pieces, with a hole, and an error reply with a message.
        wire_bytes.extend(data_chunk(r2, (1 << 20) + 200 * 1024, &big[200 * 1024..], false));
        wire_bytes.extend(simple(w, 0, b""));
        wire_bytes.extend(hole_chunk(r2, (1 << 20) + 4096, 8192, false));
        wire_bytes.extend(data_chunk(r1, 4096, &small, true));
        wire_bytes.extend(data_chunk(r2, 1 << 20, &big[..4096], false));
        wire_bytes.extend(data_chunk(r2, (1 << 20) + 12288, &big[12288..200 * 1024], true));
        wire_bytes.extend(error_chunk(f, 28, "no space \u{1b}[31m", None, true));
        expect_big[4096..12288].fill(0);
        let expected = vec![
            (r1, 0, String::new(), Some(small)),
            (w, 0, String::new(), None),
            (r2, 0, String::new(), Some(expect_big)),
            (f, 28, "no space \u{1b}[31m".to_string(), None),
        ];
        (core, wire_bytes, expected)
    } else {
        wire_bytes.extend(simple(r2, 0, &big));
        wire_bytes.extend(simple(f, 5, b""));
        wire_bytes.extend(simple(r1, 0, &small));
        wire_bytes.extend(simple(w, 0, b""));
        let expected = vec![
            (r1, 0, String::new(), Some(small)),
            (w, 0, String::new(), None),
            (r2, 0, String::new(), Some(big)),
            (f, 5, String::new(), None),
        ];
        (core, wire_bytes, expected)
    }
}

#[test]
fn replies_cut_at_every_byte_give_the_same_completions() {
    for structured in [false, true] {
        let (_, stream, expected) = session(structured);
        // Two pieces cut at every byte of the headers and around the payload edges
        // (every byte of a 300 KiB stream would be quadratic), and byte by byte.
        let mut cuts: Vec<usize> = (0..stream.len()).filter(|i| i % 997 == 0).collect();
        for edge in 0..stream.len().min(256) {
            cuts.push(edge);
            cuts.push(stream.len() - edge);
        }
        for cut in cuts {
            let (mut core, stream, _) = session(structured);
            core.feed(&stream[..cut]).unwrap();
            core.feed(&stream[cut..]).unwrap();
            assert_eq!(outcomes(&mut core), expected, "structured={structured} cut at {cut}");
            assert_eq!(core.pending(), 0);
            assert!(!core.mid_reply());
        }
        let (mut core, stream, _) = session(structured);
        for byte in &stream {
            core.feed(std::slice::from_ref(byte)).unwrap();
        }
        assert_eq!(outcomes(&mut core), expected, "structured={structured} byte by byte");
    }
}

#[test]
fn a_large_payload_goes_in_place_and_one_read_takes_its_end_and_the_next_header() {
    let mut core = Core::new(true);
    let big = pattern(256 * 1024, 9);
    let r = read(&mut core, 0, big.len() as u32);
    let w = write(&mut core, 0, 4096);
    let mut stream = data_chunk(r, 0, &big, true);
    stream.extend(simple(w, 0, b""));
    // The first read takes only the scratch window; the rest of the payload is then
    // handed out as the target's own unfilled part, ahead of the scratch buffer.
    let (direct, scratch) = core.recv_space();
    assert!(direct.is_empty());
    let first = scratch.len();
    assert_eq!(first, RECEIVE_WINDOW);
    scratch.copy_from_slice(&stream[..first]);
    core.received(first).unwrap();
    let (direct, scratch) = core.recv_space();
    assert_eq!(direct.len(), stream.len() - 16 - first, "the payload's rest, in place");
    let n = direct.len();
    direct.copy_from_slice(&stream[first..first + n]);
    scratch[..16].copy_from_slice(&stream[first + n..]);
    core.received(n + 16).unwrap();
    let done = outcomes(&mut core);
    assert_eq!(done.len(), 2);
    assert_eq!(done[0].3.as_deref(), Some(&big[..]));
    assert_eq!((done[1].0, done[1].1), (w, 0));
    // After a payload, the next read is a header's worth, so a next big payload goes in place too.
    assert_eq!(core.recv_space().1.len(), SMALL_WINDOW);
}

fn broken_by(structured: bool, setup: impl FnOnce(&mut Core) -> Vec<u8>) -> String {
    let mut core = Core::new(structured);
    let stream = setup(&mut core);
    let err = core.feed(&stream).expect_err("the stream breaks the protocol");
    assert_eq!(core.broken(), Some(&err));
    // Broken for good: later bytes are refused, and so are new requests.
    assert_eq!(core.feed(&simple(1, 0, b"")), Err(err.clone()));
    assert!(core.request(wire::CMD_FLUSH, 0, 0, 0, None, None).is_err());
    err.0
}

#[test]
fn hostile_replies_break_the_connection_with_what_happened() {
    let cases: Vec<(&str, bool, Setup)> = vec![
        ("bad reply magic 0x00000000", true, Box::new(|_| vec![0; 32])),
        ("reply for unknown cookie 0x63", true, Box::new(|_| simple(99, 0, b""))),
        (
            "reply for unknown cookie 0x5",
            false,
            Box::new(|c| {
                let r = read(c, 0, 512);
                let mut s = simple(r, 0, &[1; 512]);
                s.extend(simple(5, 0, b"")); // also: a second reply to an answered cookie
                s.extend(simple(r, 0, b""));
                s
            }),
        ),
        (
            "structured reply chunk, but none were negotiated",
            false,
            Box::new(|c| {
                let r = read(c, 0, 512);
                data_chunk(r, 0, &[0; 512], true)
            }),
        ),
        (
            "simple reply to a READ after structured",
            true,
            Box::new(|c| {
                let r = read(c, 0, 512);
                simple(r, 0, &[0; 512])
            }),
        ),
        (
            "OFFSET_DATA chunk of 4294967295 bytes for a read of 4096 bytes",
            true,
            Box::new(|c| {
                let r = read(c, 0, 4096);
                let mut s = ChunkHeader {
                    flags: 1,
                    typ: wire::CHUNK_OFFSET_DATA,
                    cookie: r,
                    length: u32::MAX,
                }
                .encode()
                .to_vec();
                s.extend([0; 64]);
                s
            }),
        ),
        (
            "lies outside the request [4096, 8192)",
            true,
            Box::new(|c| {
                let r = read(c, 4096, 4096);
                data_chunk(r, 0, &[0; 512], true)
            }),
        ),
        (
            "lies outside the request [4096, 8192)",
            true,
            Box::new(|c| {
                let r = read(c, 4096, 4096);
                data_chunk(r, 8000, &[0; 512], true)
            }),
        ),
        (
            "lies outside the request",
            true,
            Box::new(|c| {
                let r = read(c, 4096, 4096);
                data_chunk(r, u64::MAX - 3, &[0; 512], true)
            }),
        ),
        (
            "overlaps an earlier chunk",
            true,
            Box::new(|c| {
                let r = read(c, 0, 4096);
                let mut s = data_chunk(r, 0, &[0; 2048], false);
                s.extend(hole_chunk(r, 2000, 100, true));
                s
            }),
        ),
        (
            "covers 2048 of 4096 bytes",
            true,
            Box::new(|c| {
                let r = read(c, 0, 4096);
                data_chunk(r, 0, &[0; 2048], true)
            }),
        ),
        (
            "OFFSET_HOLE chunk of zero bytes",
            true,
            Box::new(|c| {
                let r = read(c, 0, 4096);
                hole_chunk(r, 0, 0, true)
            }),
        ),
        (
            "OFFSET_DATA chunk in reply to WRITE",
            true,
            Box::new(|c| {
                let w = write(c, 0, 512);
                data_chunk(w, 0, &[0; 512], true)
            }),
        ),
        (
            "NONE chunk must be empty and final",
            true,
            Box::new(|c| {
                let w = write(c, 0, 512);
                chunk(w, wire::CHUNK_NONE, false, b"")
            }),
        ),
        (
            "error chunk of 70000 bytes",
            true,
            Box::new(|c| {
                let w = write(c, 0, 512);
                ChunkHeader {
                    flags: 1,
                    typ: wire::CHUNK_ERROR,
                    cookie: w,
                    length: 70000,
                }
                .encode()
                .to_vec()
            }),
        ),
        (
            "error chunk message overruns the chunk",
            true,
            Box::new(|c| {
                let w = write(c, 0, 512);
                let mut body = 5u32.to_be_bytes().to_vec();
                body.extend(200u16.to_be_bytes());
                body.extend(b"short");
                chunk(w, wire::CHUNK_ERROR, true, &body)
            }),
        ),
        (
            "ERROR_OFFSET 0 lies outside the request",
            true,
            Box::new(|c| {
                let r = read(c, 4096, 4096);
                error_chunk(r, 5, "x", Some(0), true)
            }),
        ),
        (
            "unexpected structured chunk type 5",
            true,
            Box::new(|c| {
                let r = read(c, 0, 4096);
                chunk(r, 5, true, &[0; 8])
            }),
        ),
    ];
    for (expect, structured, setup) in cases {
        let reason = broken_by(structured, setup);
        assert!(reason.contains(expect), "{reason:?} should say {expect:?}");
    }
}

#[test]
fn error_chunks_report_the_first_error_and_its_text_and_zero_means_eio() {
    let mut core = Core::new(true);
    let r = read(&mut core, 0, 4096);
    let w = write(&mut core, 0, 4096);
    let mut stream = error_chunk(r, 1, "first", Some(100), false);
    stream.extend(error_chunk(r, 28, "second", None, true));
    stream.extend(error_chunk(w, 0, "", None, true));
    core.feed(&stream).unwrap();
    let done = outcomes(&mut core);
    assert_eq!((done[0].1, done[0].2.as_str()), (1, "first"));
    assert_eq!((done[1].1, done[1].2.as_str()), (wire::ERR_EIO, ""));
}

#[test]
fn a_reply_fragmented_into_too_many_pieces_is_refused() {
    let reason = broken_by(true, |c| {
        let r = read(c, 0, 4 * (MAX_FRAGMENTS as u32 + 1));
        // Every other 2-byte piece: nothing merges, so each is a fragment of its own.
        (0..=MAX_FRAGMENTS as u64)
            .flat_map(|i| data_chunk(r, i * 4, &[7; 2], false))
            .collect()
    });
    assert!(reason.contains("more than 4096 pieces"), "{reason}");
}

#[test]
fn garbage_never_panics_and_either_parses_or_breaks() {
    // xorshift: reproducible noise without a dependency.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..2000 {
        let mut core = Core::new(round % 2 == 0);
        let cookies: Vec<u64> = (0..4).map(|i| read(&mut core, i * 512, 512)).collect();
        let mut stream = Vec::new();
        // Mostly valid headers with random fields, so parsing gets past the magic.
        for _ in 0..(next() % 6) {
            let cookie = if next() % 4 == 0 {
                next()
            } else {
                cookies[(next() % 4) as usize]
            };
            let mut piece = if next() % 2 == 0 {
                simple(cookie, (next() % 3) as u32, b"")
            } else {
                let typ = [0, 1, 2, 5, wire::CHUNK_ERROR, wire::CHUNK_ERROR_OFFSET][(next() % 6) as usize];
                let length = (next() % 600) as u32;
                ChunkHeader {
                    flags: (next() % 2) as u16,
                    typ,
                    cookie,
                    length,
                }
                .encode()
                .to_vec()
            };
            piece.extend((0..next() % 700).map(|_| next() as u8));
            stream.extend(piece);
        }
        let cut = if stream.is_empty() {
            0
        } else {
            (next() as usize) % stream.len()
        };
        let outcome = core.feed(&stream[..cut]).and_then(|()| core.feed(&stream[cut..]));
        for done in core.take_completions() {
            assert!(cookies.contains(&done.cookie));
            assert_eq!(done.target.map(|t| t.len()), Some(512));
        }
        if outcome.is_err() {
            assert!(core.broken().is_some());
        }
    }
}

#[test]
fn requests_that_must_not_be_sent_are_refused() {
    let mut core = Core::new(true);
    let refused = |r: Result<(u64, [u8; 28]), Refused>| r.unwrap_err().0;
    assert!(refused(core.request(wire::CMD_WRITE, 0, 0, 512, Some(511), None)).contains("exactly `length`"));
    assert!(refused(core.request(wire::CMD_FLUSH, 0, 0, 0, Some(0), None)).contains("only WRITE"));
    assert!(refused(core.request(wire::CMD_READ, 0, 0, 512, None, Some(vec![0; 511]))).contains("target"));
    assert!(refused(core.request(wire::CMD_READ, 0, 0, 512, None, None)).contains("target"));
    let huge = wire::MAX_PAYLOAD + 1;
    assert!(refused(core.request(wire::CMD_WRITE, 0, 0, huge, Some(huge as usize), None)).contains("32 MiB"));
    assert_eq!(core.pending(), 0);
    let (cookie, header) = core
        .request(wire::CMD_WRITE_ZEROES, wire::FLAG_NO_HOLE, 7, 9, None, None)
        .unwrap();
    assert_eq!(
        RequestHeader::decode(&header),
        Ok(RequestHeader {
            flags: wire::FLAG_NO_HOLE,
            typ: wire::CMD_WRITE_ZEROES,
            cookie,
            offset: 7,
            length: 9
        })
    );
    let disc = core.disconnect();
    assert_eq!(RequestHeader::decode(&disc).unwrap().typ, wire::CMD_DISC);
    assert!(refused(core.request(wire::CMD_FLUSH, 0, 0, 0, None, None)).contains("disconnected"));
    // Replies to what was pending still arrive after DISC.
    core.feed(&simple(cookie, 0, b"")).unwrap();
    assert_eq!(core.take_completions().len(), 1);
}

#[test]
fn abandoning_gives_back_every_pending_cookie_oldest_first() {
    let mut core = Core::new(false);
    let a = read(&mut core, 0, 4096);
    let b = write(&mut core, 0, 512);
    core.feed(&simple(a, 0, &[0; 100])).unwrap(); // a is now being received in place
    assert!(core.mid_reply());
    assert_eq!(core.abandon_all(), vec![a, b]);
    assert_eq!(core.pending(), 0);
    assert!(core.recv_space().0.is_empty());
}

#[test]
fn coverage_accepts_any_partition_in_any_order_and_merges_it() {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..200 {
        let mut pieces = Vec::new();
        let mut at = 0u32;
        for _ in 0..(1 + next() % 40) {
            let size = 1 + (next() % 50) as u32;
            pieces.push((at, size));
            at += size;
        }
        for i in (1..pieces.len()).rev() {
            pieces.swap(i, (next() % (i as u64 + 1)) as usize);
        }
        let mut coverage = Coverage::default();
        for &(start, size) in &pieces {
            assert_eq!(coverage.claim(100, at, 100 + start as u64, size), Ok(start));
        }
        assert_eq!((coverage.covered, coverage.ranges.clone()), (at as u64, vec![(0, at)]));
    }
}

#[test]
fn abandoned_targets_come_back_with_their_cookies_and_a_target_can_be_reached_in_flight() {
    let mut core = Core::new(false);
    let a = read(&mut core, 0, 8);
    let b = write(&mut core, 0, 512);
    assert!(core.takes_read(8) && !core.takes_read(wire::MAX_PAYLOAD + 1));
    core.target_mut(a).expect("a read in flight has its target")[0] = 1;
    assert!(core.target_mut(b).is_none()); // a write has none
    let back = core.abandon_targets();
    assert_eq!(back.iter().map(|(c, _)| *c).collect::<Vec<_>>(), vec![a, b]);
    assert_eq!(
        back[0].1.as_deref(),
        Some(&[1, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA][..])
    );
    assert!(back[1].1.is_none());
    assert!(core.target_mut(a).is_none());
    core.disconnect();
    assert!(!core.takes_read(8)); // nothing may follow DISC
}
