//! `serve_file`: one NBD connection to a file export (the driver's FileBackend), in
//! transmission, served on the calling thread with the GIL released: no Python and no
//! event loop per request or per receive (#11: a driver's CPU per GiB counts once per
//! replica). Python does the handshake, then calls this on a thread of its own
//! (trustvbd/nbd/file_serve.py), and hears back how the connection ended.
//!
//! Blocking I/O on a socket of our own (a duplicate): a receive takes every request
//! waiting (up to RECEIVE bytes), a WRITE's payload is pwritten where it was received,
//! piece by piece as it arrives (memory stays at RECEIVE bytes per connection whatever
//! length a peer claims) in pwrites within PIECE-aligned spans of the file; replies are
//! gathered and written once nothing more is waiting to be parsed. A big READ is one
//! sendfile. Requests are served in order, each done before the next starts, so a FLUSH
//! (fdatasync) covers every WRITE replied before it. TRIM, WRITE_ZEROES, CACHE and
//! BLOCK_STATUS, rare from a driver's clients, go to `handler.other` with the GIL;
//! refusals are told to `handler.refused` (logged).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use pyo3::prelude::*;
use pyo3::types::PyList;

use super::foreign;
use crate::nbd_server::{frame_block_status, frame_read_part, frame_reply, Checker, REFUSED_DRAIN_MAX, REQUEST_PART};
use crate::nbd_wire::{
    be_u64, RequestHeader, CMD_BLOCK_STATUS, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_RING_WRITE, CMD_WRITE, ERR_EINVAL,
    ERR_EIO, FLAG_FUA, FLAG_REQ_ONE, REQUEST_SIZE, RING_DESCRIPTOR,
};

/// Bytes one receive may take: many requests, or a good part of one big WRITE.
const RECEIVE: usize = 512 * 1024;
/// Replies gathered before they are written even if more requests wait.
const OUT_MAX: usize = 1 << 20;
/// The longest pwrite of a WRITE's payload, aligned in the file (see write_in_pieces).
const PIECE: u64 = 32 * 1024;
/// READs of at least this many bytes are sent by sendfile; smaller ones are copied in
/// among the other replies (for them the system call costs more than the copy).
const SENDFILE_MIN: usize = 64 * 1024;

/// How a connection ended.
enum End {
    /// NBD_CMD_DISC.
    Disconnect,
    /// The peer closed its side (or shut it down); `truncated` bytes of a message were left.
    Eof(usize),
    /// The socket failed (reset, or a reply could not be written).
    Broken(io::Error),
    /// What cannot be answered with an error reply: the connection must be dropped.
    Protocol(String),
    /// A file read failed once its reply had begun: dropped too, the error logged.
    ReadFailed(String),
}

impl From<io::Error> for End {
    fn from(err: io::Error) -> Self {
        End::Broken(err)
    }
}

/// The NBD error for a failed file operation (as trustvbd.nbd.protocol.errno_to_nbd).
fn nbd_error(err: &io::Error) -> u32 {
    match err.raw_os_error() {
        Some(libc::EPERM | libc::EACCES | libc::EROFS) => 1,
        Some(libc::ENOMEM) => 12,
        Some(libc::EINVAL | libc::ENOTSUP) => 22,
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => 28,
        Some(libc::EOVERFLOW) => 75,
        Some(libc::ESHUTDOWN) => 108,
        _ => ERR_EIO,
    }
}

/// What `handler.other` answered.
enum Answer {
    Done,
    Extents(Vec<(u64, u32)>),
    Failed(u32, String),
}

struct Served {
    sock: File,
    file: File,
    checker: Checker,
    structured: bool,
    meta_context: u32,
    handler: Py<PyAny>,
    path: String,
    /// The ring agreed in the handshake (docs/driver-ring.md), mapped read-only.
    ring: Option<foreign::RingMap>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    out: Vec<u8>,
}

impl Served {
    fn write_out(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.sock.write_all(&self.out)?;
            self.out.clear();
        }
        Ok(())
    }

    /// Writes the replies gathered, then receives more: the count (0: end of input).
    fn fill(&mut self) -> io::Result<usize> {
        self.write_out()?;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 {
            // Only a partial header is ever kept (payloads are taken as they come).
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        // Sleep in poll, not in read: a thread asleep in a Unix socket's read is woken
        // also when the peer takes our last reply (unix_write_space wakes every sleeper on
        // the socket) and sleeps again, a second wake-up per request paid by the peer as
        // it receives the reply. poll's wake-ups are filtered by the events it waits for.
        foreign::wait_readable(self.sock.as_raw_fd())?;
        loop {
            match self.sock.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            }
        }
    }

    fn reply(&mut self, cookie: u64, error: u32, message: &str) {
        frame_reply(&mut self.out, self.structured, cookie, error, message, None);
    }

    fn run(&mut self) -> End {
        loop {
            if self.end - self.start < REQUEST_SIZE {
                match self.fill() {
                    Ok(0) => return End::Eof(self.end - self.start),
                    Ok(_) => continue,
                    Err(err) => return End::Broken(err),
                }
            }
            let head = match RequestHeader::decode(&self.buf[self.start..self.end]) {
                Ok(head) => head,
                Err(magic) => return End::Protocol(format!("bad request magic {magic:#010x}")),
            };
            self.start += REQUEST_SIZE;
            if let Err(end) = self.serve(&head) {
                return end;
            }
            if self.out.len() >= OUT_MAX {
                if let Err(err) = self.write_out() {
                    return End::Broken(err);
                }
            }
        }
    }

    fn serve(&mut self, head: &RequestHeader) -> Result<(), End> {
        if head.typ == CMD_RING_WRITE {
            return self.write_ring(head);
        }
        let refusal = self.checker.check(head);
        if head.typ == CMD_WRITE {
            return self.write(head, refusal.is_none());
        }
        if let Some(refusal) = refusal {
            self.tell("refused", head.typ, &refusal.message);
            self.reply(head.cookie, refusal.error, &refusal.message);
            return Ok(());
        }
        match head.typ {
            CMD_DISC => {
                self.write_out()?;
                Err(End::Disconnect)
            }
            CMD_READ => self.read(head),
            CMD_FLUSH => {
                match self.file.sync_data() {
                    Ok(()) => self.reply(head.cookie, 0, ""),
                    Err(err) => self.reply(head.cookie, nbd_error(&err), &format!("flush on {}: {err}", self.path)),
                }
                Ok(())
            }
            _ => {
                self.other(head);
                Ok(())
            }
        }
    }

    /// A WRITE's payload, pwritten as it arrives (all of it read even when refused or
    /// failed: the next request follows it).
    fn write(&mut self, head: &RequestHeader, allowed: bool) -> Result<(), End> {
        if !allowed && head.length > REFUSED_DRAIN_MAX {
            // Too long to drain (up to 4 GiB, refused anyway): answer and close.
            let refusal = self.checker.check(head).expect("refused");
            self.tell("refused", head.typ, &refusal.message);
            self.reply(head.cookie, refusal.error, &refusal.message);
            self.write_out()?;
            return Err(End::Disconnect);
        }
        let length = head.length as usize;
        let mut done = 0usize;
        let mut failed: Option<io::Error> = None;
        while done < length {
            if self.start == self.end && self.fill()? == 0 {
                return Err(End::Eof(REQUEST_SIZE + done));
            }
            let n = (length - done).min(self.end - self.start);
            if allowed && failed.is_none() {
                let at = head.offset + done as u64;
                if let Err(err) = write_in_pieces(&self.file, &self.buf[self.start..self.start + n], at) {
                    failed = Some(err);
                }
            }
            self.start += n;
            done += n;
        }
        if !allowed {
            let refusal = self.checker.check(head).expect("refused before");
            self.tell("refused", head.typ, &refusal.message);
            self.reply(head.cookie, refusal.error, &refusal.message);
            return Ok(());
        }
        if failed.is_none() && head.flags & FLAG_FUA != 0 {
            failed = self.file.sync_data().err();
        }
        match failed {
            None => self.reply(head.cookie, 0, ""),
            Some(err) => self.reply(head.cookie, nbd_error(&err), &format!("write on {}: {err}", self.path)),
        }
        Ok(())
    }

    /// A ring WRITE (docs/driver-ring.md): its 16-byte descriptor read, checked as a
    /// WRITE of the header's length, against the ring (inside it, the same length), and
    /// pwritten from the mapping. Refused where no ring was agreed; its descriptor is
    /// read all the same, so the next request follows.
    fn write_ring(&mut self, head: &RequestHeader) -> Result<(), End> {
        while self.end - self.start < RING_DESCRIPTOR {
            if self.fill()? == 0 {
                return Err(End::Eof(REQUEST_SIZE + self.end - self.start));
            }
        }
        let at = be_u64(&self.buf[self.start..], 0);
        let len = be_u64(&self.buf[self.start..], 8);
        self.start += RING_DESCRIPTOR;
        let as_write = RequestHeader {
            typ: CMD_WRITE,
            ..*head
        };
        let refusal = match (&self.ring, self.checker.check(&as_write)) {
            (None, _) => Some((ERR_EINVAL, "RING_WRITE on a connection that agreed no ring".to_string())),
            (Some(_), Some(refusal)) => Some((refusal.error, refusal.message)),
            (Some(_), None) if len != u64::from(head.length) => Some((
                ERR_EINVAL,
                format!("RING_WRITE descriptor of {len} bytes for a request of {}", head.length),
            )),
            (Some(ring), None) if at.checked_add(len).is_none_or(|end| end > ring.len() as u64) => Some((
                ERR_EINVAL,
                format!(
                    "RING_WRITE descriptor [{at}, +{len}) is outside the ring of {} bytes",
                    ring.len()
                ),
            )),
            _ => None,
        };
        if let Some((error, message)) = refusal {
            self.tell("refused", head.typ, &message);
            self.reply(head.cookie, error, &message);
            return Ok(());
        }
        let ring = self.ring.as_ref().expect("checked above");
        let (file, offset) = (&self.file, head.offset);
        let mut failed = ring
            .with_slot(at as usize, len as usize, |bytes| write_in_pieces(file, bytes, offset))
            .err();
        if failed.is_none() && head.flags & FLAG_FUA != 0 {
            failed = self.file.sync_data().err();
        }
        match failed {
            None => self.reply(head.cookie, 0, ""),
            Some(err) => self.reply(head.cookie, nbd_error(&err), &format!("write on {}: {err}", self.path)),
        }
        Ok(())
    }

    /// A READ: small ones copied among the replies, big ones sent by sendfile in parts
    /// of at most REQUEST_PART (structured: a chunk each).
    fn read(&mut self, head: &RequestHeader) -> Result<(), End> {
        let length = head.length as usize;
        if length < SENDFILE_MIN {
            let at = self.out.len();
            frame_reply(
                &mut self.out,
                self.structured,
                head.cookie,
                0,
                "",
                Some((head.offset, head.length)),
            );
            let data = self.out.len();
            self.out.resize(data + length, 0);
            if let Err(err) = read_padded(&self.file, &mut self.out[data..], head.offset) {
                self.out.truncate(at);
                self.reply(head.cookie, nbd_error(&err), &format!("read on {}: {err}", self.path));
            }
            return Ok(());
        }
        let mut done = 0usize;
        while done < length {
            let part = (length - done).min(REQUEST_PART as usize);
            let offset = head.offset + done as u64;
            let (first, last) = (done == 0, done + part == length);
            frame_read_part(
                &mut self.out,
                self.structured,
                head.cookie,
                offset,
                part as u32,
                first,
                last,
            );
            self.write_out()?;
            self.send_part(offset, part)?;
            done += part;
        }
        Ok(())
    }

    /// `length` bytes of the file at `offset` to the socket, their header sent: by
    /// sendfile, the rest of a shrunk file as zeros; what sendfile fails on is preaded.
    fn send_part(&mut self, offset: u64, length: usize) -> Result<(), End> {
        let mut sent = 0usize;
        while sent < length {
            match foreign::sendfile(&self.sock, &self.file, offset + sent as u64, length - sent) {
                Ok(0) => break,
                Ok(n) => sent += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break, // a broken socket fails the write below; a bad file the pread
            }
        }
        if sent == length {
            return Ok(());
        }
        let mut rest = vec![0u8; length - sent];
        if let Err(err) = read_padded(&self.file, &mut rest, offset + sent as u64) {
            return Err(End::ReadFailed(format!("read on {}: {err}", self.path)));
        }
        self.sock.write_all(&rest)?;
        Ok(())
    }

    /// TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS: done by `handler.other(type, flags,
    /// offset, length)`, which returns None (done), (nbd error, message) or, for
    /// BLOCK_STATUS, the [(length, flags), ...] extents.
    fn other(&mut self, head: &RequestHeader) {
        let answer = Python::attach(|py| {
            let internal = |err: PyErr| Answer::Failed(ERR_EIO, format!("internal server error: {err}"));
            let result = match self
                .handler
                .bind(py)
                .call_method1("other", (head.typ, head.flags, head.offset, head.length))
            {
                Ok(result) => result,
                Err(err) => return internal(err),
            };
            if result.is_none() {
                Answer::Done
            } else if result.is_instance_of::<PyList>() {
                result.extract().map_or_else(internal, Answer::Extents)
            } else {
                result
                    .extract()
                    .map_or_else(internal, |(error, message)| Answer::Failed(error, message))
            }
        });
        match answer {
            Answer::Extents(extents) if head.typ == CMD_BLOCK_STATUS => {
                let req_one = head.flags & FLAG_REQ_ONE != 0;
                let at = self.out.len();
                if let Err(why) = frame_block_status(
                    &mut self.out,
                    head.cookie,
                    self.meta_context,
                    head.length,
                    req_one,
                    &extents,
                ) {
                    self.out.truncate(at);
                    let message = format!(
                        "block status of [{}, {}) failed: {why}",
                        head.offset,
                        head.offset + u64::from(head.length)
                    );
                    self.reply(head.cookie, ERR_EIO, &message);
                }
            }
            Answer::Done | Answer::Extents(_) => self.reply(head.cookie, 0, ""),
            Answer::Failed(error, message) => self.reply(head.cookie, error, &message),
        }
    }

    /// Tells the handler (`refused(type, message)`), with the GIL; its failure is ignored.
    fn tell(&self, what: &str, typ: u16, message: &str) {
        Python::attach(|py| {
            if let Err(err) = self.handler.bind(py).call_method1(what, (typ, message)) {
                err.print(py);
            }
        });
    }
}

/// `data` pwritten at `at` in pieces that each stay within one PIECE-aligned span of the
/// file, so the page cache's folios it makes stay small: the kernel sizes a folio by the
/// write that makes it, and a later 4 KiB write into a large one costs a walk over all its
/// buffer heads (ext4), several times what a write into a small one costs; reads from
/// small folios cost a little more (measured: bench/README.md).
fn write_in_pieces(file: &File, data: &[u8], at: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < data.len() {
        let here = at + done as u64;
        let n = piece_len(here, data.len() - done);
        file.write_all_at(&data[done..done + n], here)?;
        done += n;
    }
    Ok(())
}

/// How much of `left` bytes written at `at` fit before the next PIECE boundary.
fn piece_len(at: u64, left: usize) -> usize {
    let room = PIECE - at % PIECE;
    usize::try_from(room).map_or(left, |room| room.min(left))
}

/// Fills `out` from the file at `offset`; past the end of a file someone shrank: zeros.
fn read_padded(file: &File, out: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < out.len() {
        match file.read_at(&mut out[done..], offset + done as u64) {
            Ok(0) => {
                out[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// serve_file(sock_fd, file_fd, received, export_size, transmission_flags, structured,
///            meta_context, handler, path, ring_fd=-1, ring_size=0) -> (how, truncated, message)
///
/// Serves the connection on `sock_fd` (a blocking socket: this thread waits in it) until
/// it ends, `received` the bytes already received after the handshake. Both descriptors
/// are duplicated: the caller's stay its own (shut the socket down to stop this). `how`
/// is "disconnect" (NBD_CMD_DISC), "eof" (`truncated` bytes of a message were left),
/// "broken", "protocol" or "read-failed" (a file read failed after its reply began:
/// `message` says why). `ring_fd` (not -1): the ring this connection agreed, `ring_size`
/// bytes, mapped read-only for this connection alone (ValueError if it is not open
/// read-only, sealed against resizing and that long); the caller keeps its descriptor.
#[pyfunction]
#[pyo3(signature = (sock_fd, file_fd, received, export_size, transmission_flags, structured, meta_context, handler, path, ring_fd=-1, ring_size=0))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn serve_file(
    py: Python<'_>,
    sock_fd: i32,
    file_fd: i32,
    received: &[u8],
    export_size: u64,
    transmission_flags: u16,
    structured: bool,
    meta_context: u32,
    handler: Py<PyAny>,
    path: String,
    ring_fd: i32,
    ring_size: usize,
) -> PyResult<(&'static str, usize, String)> {
    let ring = if ring_fd >= 0 {
        Some(foreign::RingMap::new(py, ring_fd, ring_size)?)
    } else {
        None
    };
    let mut checker = Checker::new(export_size, transmission_flags, structured);
    if meta_context != 0 && structured {
        checker = checker.with_block_status();
    }
    let mut buf = vec![0u8; RECEIVE.max(received.len())];
    buf[..received.len()].copy_from_slice(received);
    let mut served = Served {
        sock: foreign::dup_file(py, sock_fd)?,
        file: foreign::dup_file(py, file_fd)?,
        checker,
        structured,
        meta_context,
        handler,
        path,
        ring,
        buf,
        start: 0,
        end: received.len(),
        out: Vec::new(),
    };
    let end = py.detach(|| served.run());
    Ok(match end {
        End::Disconnect => ("disconnect", 0, String::new()),
        End::Eof(truncated) => ("eof", truncated, String::new()),
        End::Broken(err) => ("broken", 0, err.to_string()),
        End::Protocol(message) => ("protocol", 0, message),
        End::ReadFailed(message) => ("read-failed", 0, message),
    })
}

#[cfg(test)]
mod tests {
    use super::{piece_len, write_in_pieces, PIECE};
    use std::os::unix::fs::FileExt;

    #[test]
    fn pieces_end_at_piece_boundaries() {
        let piece = PIECE as usize;
        assert_eq!(piece_len(0, 4096), 4096);
        assert_eq!(piece_len(0, 3 * piece), piece);
        assert_eq!(piece_len(PIECE - 512, 4096), 512);
        assert_eq!(piece_len(5 * PIECE + 4096, piece), piece - 4096);
        assert_eq!(
            piece_len(u64::MAX - 10, 100),
            100usize.min((PIECE - (u64::MAX - 10) % PIECE) as usize)
        );
    }

    #[test]
    fn a_write_in_pieces_writes_every_byte_where_asked() {
        let file = tempfile_in_tmp();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        write_in_pieces(&file, &data, 12_345).unwrap();
        let mut back = vec![0u8; data.len()];
        file.read_exact_at(&mut back, 12_345).unwrap();
        assert_eq!(back, data);
        assert_eq!(file.metadata().unwrap().len(), 12_345 + data.len() as u64);
    }

    fn tempfile_in_tmp() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("file_serve_test_{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}
