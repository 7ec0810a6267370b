//! The native NBD client and server cores against each other (a property test).
//!
//! Each round makes a random stream of requests with the client core (any command, flags,
//! offsets inside and past the export, payloads small and large) and feeds it, cut at
//! random points, to the server's `Framer` as the shell does. Every request must arrive as
//! sent, refused exactly when the `Checker` says. The server answers each one against an
//! in-memory disk with the reply framers the shell uses: whole replies, READs in parts
//! (as for a READ over 32 MiB), failing parts (ERROR_OFFSET), refusals and errors with
//! long multi-byte texts; structured chunks of different replies interleave. That stream,
//! cut at random points, goes to the client core: every request must complete once, with
//! the data, error and text the server meant, and the connection must never break.
//! The hand-written replies of each core's own tests cannot show that the two agree.

use crate::nbd_client::ClientCore;
use crate::nbd_server::tests::feed_items;
use crate::nbd_server::{frame_read_error, frame_read_part, frame_reply, Checker, Framer, Item};
use crate::nbd_wire::{
    CMD_CACHE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, ERR_EINVAL, ERR_EIO, ERR_ENOSPC, ERR_EPERM,
    FLAG_DF, FLAG_FAST_ZERO, FLAG_FUA, FLAG_NO_HOLE, MAX_STRING, TFLAG_SEND_CACHE, TFLAG_SEND_FAST_ZERO,
    TFLAG_SEND_FLUSH, TFLAG_SEND_FUA, TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES,
};

const DISK: u64 = 1 << 20;
const TFLAGS: u16 = 1
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_SEND_CACHE
    | TFLAG_SEND_FAST_ZERO;

/// xorshift64: reproducible noise without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// Cut points splitting `len` bytes into pieces of random sizes (tiny to large).
    fn pieces(&mut self, len: usize) -> Vec<usize> {
        let mut cuts = vec![0];
        while *cuts.last().expect("not empty") < len {
            let step = [1, 7, 28, 500, 4096, 70_000][self.below(6) as usize];
            let at = *cuts.last().expect("not empty") + 1 + self.below(step) as usize;
            cuts.push(at.min(len));
        }
        cuts
    }
}

#[derive(Debug)]
struct Sent {
    typ: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    length: u32,
    payload: Vec<u8>,
}

/// What the client must report for one request.
#[derive(Debug, PartialEq)]
struct Outcome {
    error: u32,
    message: String,
    data: Option<Vec<u8>>, // a successful READ's
}

fn text(rng: &mut Rng) -> String {
    let unit = ["disk on fire", "é", "€", "\u{1F525}", "x"][rng.below(5) as usize];
    let most = if rng.chance(30) { 3000 } else { 20 };
    unit.repeat(1 + rng.below(most) as usize)
}

/// The text a structured error chunk carries: cut to 4096 bytes at a character boundary.
fn cut(text: &str) -> String {
    let mut end = text.len().min(MAX_STRING);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// `stream` cut at `cuts`, fed to the server's framer as the shell does.
fn parse_all(framer: &mut Framer, stream: &[u8], cuts: &[usize]) -> Vec<(Item, Vec<u8>)> {
    let pieces: Vec<&[u8]> = cuts.windows(2).map(|w| &stream[w[0]..w[1]]).collect();
    feed_items(framer, &pieces)
}

/// A random request the client core accepts: (typ, flags, offset, length).
fn random_request(rng: &mut Rng) -> (u16, u16, u64, u32) {
    let typ = [
        CMD_READ,
        CMD_READ,
        CMD_WRITE,
        CMD_WRITE,
        CMD_FLUSH,
        CMD_TRIM,
        CMD_WRITE_ZEROES,
        CMD_CACHE,
    ][rng.below(8) as usize];
    let mut length = match rng.below(4) {
        0 => rng.below(16) as u32,
        1 => rng.below(9000) as u32,
        2 => 4096 * (1 + rng.below(16) as u32),
        _ => 60_000 + rng.below(140_000) as u32, // above the direct-receive threshold
    };
    if typ == CMD_FLUSH {
        length = 0;
    }
    let offset = if rng.chance(8) {
        DISK - rng.below(u64::from(length) + 2) + 1 // runs past the end: refused
    } else {
        rng.below(DISK - u64::from(length) + 1)
    };
    // Mostly flags the command may carry; sometimes one it may not (refused with EINVAL).
    let flags = [0, 0, FLAG_FUA, FLAG_NO_HOLE, FLAG_FAST_ZERO, FLAG_DF][rng.below(6) as usize];
    (typ, flags, offset, length)
}

/// The server's answer to one parsed request: the chunks (in their order; structured
/// replies of different requests may interleave them) and what the client must see.
fn serve(rng: &mut Rng, structured: bool, disk: &mut [u8], item: &Item, payload: &[u8]) -> (Vec<Vec<u8>>, Outcome) {
    let (cookie, offset, length) = (item.head.cookie, item.offset, item.length);
    let said = |error: u32, message: &str| Outcome {
        error,
        message: if structured { cut(message) } else { String::new() },
        data: None,
    };
    if let Some(refusal) = &item.refusal {
        let mut out = Vec::new();
        frame_reply(&mut out, structured, cookie, refusal.error, &refusal.message, None);
        return (vec![out], said(refusal.error, &refusal.message));
    }
    let range = offset as usize..offset as usize + length as usize;
    let error = [ERR_EIO, ERR_ENOSPC, ERR_EPERM, ERR_EINVAL][rng.below(4) as usize];
    if item.head.typ != CMD_READ {
        if rng.chance(15) {
            let message = text(rng);
            let mut out = Vec::new();
            frame_reply(&mut out, structured, cookie, error, &message, None);
            return (vec![out], said(error, &message));
        }
        match item.head.typ {
            CMD_WRITE => disk[range].copy_from_slice(payload),
            CMD_TRIM | CMD_WRITE_ZEROES => disk[range].fill(0),
            _ => {}
        }
        let mut out = Vec::new();
        frame_reply(&mut out, structured, cookie, 0, "", None);
        return (vec![out], said(0, ""));
    }
    let data = disk[range].to_vec();
    if length == 0 || rng.chance(40) {
        let mut out = Vec::new();
        frame_reply(&mut out, structured, cookie, 0, "", Some((offset, length)));
        out.extend_from_slice(&data);
        let outcome = Outcome {
            error: 0,
            message: String::new(),
            data: Some(data),
        };
        return (vec![out], outcome);
    }
    // In parts, as a READ over 32 MiB is sent; perhaps one part fails.
    let mut cuts = vec![0usize];
    for _ in 0..rng.below(4) {
        cuts.push(rng.below(u64::from(length)) as usize);
    }
    cuts.push(length as usize);
    cuts.sort_unstable();
    cuts.dedup();
    let parts: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
    let fails = if rng.chance(25) {
        Some(if structured {
            rng.below(parts.len() as u64) as usize
        } else {
            0
        })
    } else {
        None
    };
    let mut chunks = Vec::new();
    for (i, &(start, end)) in parts.iter().enumerate() {
        let mut out = Vec::new();
        let at = offset + start as u64;
        if fails == Some(i) {
            let message = text(rng);
            frame_read_error(&mut out, structured, cookie, error, &message, at, i == 0).expect("allowed here");
            chunks.push(out);
            return (chunks, said(error, &message));
        }
        let last = i + 1 == parts.len();
        frame_read_part(&mut out, structured, cookie, at, (end - start) as u32, i == 0, last);
        out.extend_from_slice(&data[start..end]);
        chunks.push(out);
    }
    let outcome = Outcome {
        error: 0,
        message: String::new(),
        data: Some(data),
    };
    (chunks, outcome)
}

fn round(rng: &mut Rng) {
    let structured = rng.chance(50);
    let mut client: ClientCore<Vec<u8>> = ClientCore::new(structured);
    let mut framer = Framer::new(Checker::new(DISK, TFLAGS, structured));
    let reference = Checker::new(DISK, TFLAGS, structured);
    let salt = rng.next();
    let mut disk: Vec<u8> = (0..DISK).map(|i| (i.wrapping_mul(0x9E37) ^ salt) as u8).collect();

    let mut stream = Vec::new();
    let mut sent = Vec::new();
    for _ in 0..1 + rng.below(12) {
        let (typ, flags, offset, length) = random_request(rng);
        let payload = if typ == CMD_WRITE {
            rng.bytes(length as usize)
        } else {
            Vec::new()
        };
        let target = (typ == CMD_READ).then(|| vec![0xEE; length as usize]);
        let (cookie, head) = client
            .request(
                typ,
                flags,
                offset,
                length,
                (typ == CMD_WRITE).then_some(payload.len()),
                target,
            )
            .expect("the client core takes it");
        stream.extend_from_slice(&head);
        stream.extend_from_slice(&payload);
        sent.push(Sent {
            typ,
            flags,
            cookie,
            offset,
            length,
            payload,
        });
    }
    let cuts = rng.pieces(stream.len());
    let items = parse_all(&mut framer, &stream, &cuts);
    assert_eq!(items.len(), sent.len(), "every request arrives, once");

    let mut replies: Vec<(Vec<Vec<u8>>, u64)> = Vec::new();
    let mut expected = Vec::new();
    for ((item, payload), s) in items.iter().zip(&sent) {
        let h = &item.head;
        assert_eq!(
            (h.typ, h.flags, h.cookie, h.offset, h.length),
            (s.typ, s.flags, s.cookie, s.offset, s.length)
        );
        assert_eq!((item.offset, item.length, item.piece), (s.offset, s.length, None));
        assert_eq!(payload, &s.payload, "a WRITE's payload arrives as sent");
        assert_eq!(item.refusal, reference.check(h), "refused as the checks say");
        let (chunks, outcome) = serve(rng, structured, &mut disk, item, payload);
        replies.push((chunks, s.cookie));
        expected.push((s.cookie, outcome));
    }

    // Replies leave in any order; structured ones interleave chunk by chunk.
    let mut wire = Vec::new();
    let mut queues: Vec<std::collections::VecDeque<Vec<u8>>> = Vec::new();
    while !replies.is_empty() {
        let (chunks, _) = replies.swap_remove(rng.below(replies.len() as u64) as usize);
        queues.push(chunks.into());
    }
    while !queues.is_empty() {
        let i = if structured {
            rng.below(queues.len() as u64) as usize
        } else {
            0
        };
        wire.extend(queues[i].pop_front().expect("not empty"));
        if queues[i].is_empty() {
            queues.remove(i);
        }
    }
    let cuts = rng.pieces(wire.len());
    for w in cuts.windows(2) {
        if let Err(broken) = client.feed(&wire[w[0]..w[1]]) {
            panic!("the client broke on the server's replies: {broken}");
        }
    }
    assert_eq!(client.pending(), 0);
    assert!(!client.mid_reply());
    let mut done: Vec<(u64, Outcome)> = client
        .take_completions()
        .into_iter()
        .map(|c| {
            let data = if c.error == 0 { c.target } else { None };
            (
                c.cookie,
                Outcome {
                    error: c.error,
                    message: c.message,
                    data,
                },
            )
        })
        .collect();
    done.sort_by_key(|d| d.0);
    assert_eq!(done, expected);
}

#[test]
fn random_request_streams_through_both_cores_arrive_and_complete_as_sent() {
    let seed = std::env::var("NBD_CORES_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x2545_F491_4F6C_DD1D_u64);
    let mut rng = Rng(seed);
    for n in 0..400 {
        let mut round_rng = Rng(rng.next() | 1);
        let at = round_rng.0;
        let outcome = std::panic::catch_unwind(move || round(&mut round_rng));
        assert!(
            outcome.is_ok(),
            "round {n} (state {at:#x}, NBD_CORES_SEED={seed}) failed"
        );
    }
}
