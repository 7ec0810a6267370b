//! `NbdClientEngine`: the I/O shell of `nbd_client` for `trustvbd.nbd.client`.
//!
//! It owns a connected socket (taken over with `socket.detach()`), sends queued
//! requests with non-blocking writev, and, when the asyncio loop says the socket is
//! readable, receives with readv straight into read targets and the scratch buffer,
//! returning the completions for Python to resolve its futures with. Without a socket
//! (a TLS stream) Python feeds received bytes in (`feed`) and writes out what
//! `take_output` gives it: the same core either way. The GIL is held throughout;
//! every call is short (a bounded number of system calls).

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{ErrorKind, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::AsRawFd;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyMemoryView, PyTuple};

use super::foreign::{detach_socket, LentBuffer};
use super::read_plane::{Finished, NativeRead, Why};
use crate::nbd_client::{ClientCore, Completion, ReadTarget};
use crate::nbd_wire::{CMD_READ, CMD_RING_WRITE, CMD_WRITE, REQUEST_SIZE, RING_DESCRIPTOR};

/// Reads per `ready()` call at most: the loop serves other sockets in between.
const READS_PER_CALL: usize = 16;
/// Buffers per writev (Linux's IOV_MAX is 1024).
const IOVECS_PER_WRITE: usize = 256;

/// A WRITE's payload: the caller's buffer until the socket first refuses bytes, then
/// a copy. A caller may reuse its buffer as soon as its request is cancelled (after
/// the turn it was queued in, when `send` has run): what waits past that is ours.
/// A `bytes` object (or a view of one) is never copied (`Frozen`): no one can change
/// it, and holding it keeps it. Ciphertext is `bytes` (seal, the write plane), so the
/// replica links of a mirror, each backed up behind its driver, do not each copy it.
enum Payload {
    Lent(LentBuffer, Py<PyAny>),
    Frozen(LentBuffer, Py<PyAny>),
    Owned(Vec<u8>),
}

impl Payload {
    fn new(data: &Bound<'_, PyAny>) -> PyResult<Self> {
        let buf = LentBuffer::new(data, false)?;
        let obj = data.clone().unbind();
        Ok(if Self::immutable(data)? {
            Payload::Frozen(buf, obj)
        } else {
            Payload::Lent(buf, obj)
        })
    }

    /// A `bytes` object, or a memoryview of one (which keeps it, and cannot be released
    /// while we hold its buffer).
    fn immutable(data: &Bound<'_, PyAny>) -> PyResult<bool> {
        if data.is_exact_instance_of::<PyBytes>() {
            return Ok(true);
        }
        if !data.is_exact_instance_of::<PyMemoryView>() {
            return Ok(false);
        }
        Ok(data
            .getattr(intern!(data.py(), "obj"))?
            .is_exact_instance_of::<PyBytes>())
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Lent(buf, _) | Payload::Frozen(buf, _) => buf.bytes(),
            Payload::Owned(bytes) => bytes,
        }
    }
}

/// A READ's target: a buffer Python lent (`request`), or a guest read the read plane
/// serves natively (`read_plane`), finished here when its reply is in.
pub(crate) enum Target {
    Lent(LentBuffer),
    Native(Box<NativeRead>),
}

impl ReadTarget for Target {
    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Target::Lent(buf) => buf.bytes_mut(),
            Target::Native(read) => read.bytes_mut(),
        }
    }
}

/// A batch of WRITEs queued together (`request_writes`): their replies paired and counted
/// here, and the batch handed to Python once, when its last WRITE is answered, not one
/// completion per WRITE.
struct WriteGroup {
    sent: f64,
    /// (offset, length) of each WRITE, in cookie order.
    writes: Vec<(u64, u32)>,
    answered: Vec<bool>,
    left: usize,
    errors: Vec<ErrorReply>,
}

/// A WRITE's error reply: (index in its group, NBD error, message).
type ErrorReply = (usize, u32, String);

/// What `completions` found of the write groups: slots freed (WRITEs answered) and the
/// groups ended, (first cookie, error replies or None).
#[derive(Default)]
struct WritesAnswered {
    freed: usize,
    ended: Vec<(u64, Option<Vec<ErrorReply>>)>,
}

struct Outgoing {
    head: [u8; REQUEST_SIZE],
    payload: Option<Payload>,
}

impl Outgoing {
    fn len(&self) -> usize {
        REQUEST_SIZE + self.payload.as_ref().map_or(0, |p| p.bytes().len())
    }
}

/// The transmission phase of one NBD client connection (after the handshake).
///
/// NbdClientEngine(sock, structured, max_payload): `sock` a connected, non-blocking
/// socket.socket (taken over: detached, closed by `close()`), or None for a stream Python
/// carries (TLS): then received bytes go in through `feed` and `take_output` says what to
/// send. `max_payload`: the driver's advertised maximum; no native read is longer.
#[pyclass(module = "trustvbd._native", name = "NbdClientEngine")]
pub(crate) struct NbdClientEngine {
    core: ClientCore<Target>,
    sock: Option<File>,
    fed: bool,
    closed: bool,
    /// Native reads in flight, not handed to Python: cookie -> (loop time sent, offset).
    native: BTreeMap<u64, (f64, u64)>,
    /// Native reads handed to Python while in flight (lagging, or their guest went away):
    /// cookie -> (loop time sent, offset). Still timed: a driver that never answers them
    /// is still a connection to drop.
    taken: BTreeMap<u64, (f64, u64)>,
    /// Write groups not fully answered, by first cookie (in the order sent).
    groups: BTreeMap<u64, WriteGroup>,
    out: VecDeque<Outgoing>,
    sent: usize, // bytes of out's front already sent
    queued: usize,
    /// Payload bytes copied so far because the socket refused them (keep_payloads).
    copied: usize,
    /// The last send left bytes queued: the socket refused them.
    backed_up: bool,
    /// The longest native read this driver takes: the maximum payload it advertised (a
    /// server may fail longer requests, as nbdkit's blocksize-policy filter does).
    max_read: usize,
}

type Batch<'py> = (
    Bound<'py, PyList>,
    Option<String>,
    bool,
    Option<Bound<'py, PyTuple>>,
    Option<Bound<'py, PyTuple>>,
);

impl NbdClientEngine {
    /// Requests sent and not yet answered (the read plane's measure of busy).
    pub(crate) fn pending_requests(&self) -> usize {
        self.core.pending()
    }

    /// Whether a native read of `length` bytes may be queued now: the connection is
    /// open and sound, at most `high_water` bytes wait to be sent, and the driver takes
    /// a read that long.
    pub(crate) fn takes_native(&self, high_water: usize, length: usize) -> bool {
        !self.closed
            && (self.sock.is_some() || self.fed)
            && self.queued <= high_water
            && length <= self.max_read
            && u32::try_from(length).is_ok_and(|n| self.core.takes_read(n))
    }

    /// Sends what is queued now, if that leaves nothing for Python to do: true if it is all
    /// out, or if the socket is backed up (Python watches it for room already: `send` runs
    /// again then). False for a fed engine, a socket that refused some of it now (Python
    /// watches it from now on) or a failed send (Python's send meets the error again).
    pub(crate) fn send_now(&mut self) -> bool {
        if self.sock.is_none() || self.closed {
            return false;
        }
        self.backed_up || matches!(self.send(), Ok(true))
    }

    /// Queues a native read of its buffer's length at `offset`, sent at loop time `now`.
    /// Err (the read given back) if the connection does not take it.
    pub(crate) fn queue_native(
        &mut self,
        offset: u64,
        mut read: Box<NativeRead>,
        now: f64,
    ) -> Result<u64, Box<NativeRead>> {
        let len = read.bytes_mut().len();
        let Some(length) = u32::try_from(len)
            .ok()
            .filter(|&n| self.takes_native(usize::MAX, n as usize))
        else {
            return Err(read);
        };
        let (cookie, head) = self
            .core
            .request(CMD_READ, 0, offset, length, None, Some(Target::Native(read)))
            .map_err(|_| ())
            .expect("takes_read checked what request refuses");
        self.native.insert(cookie, (now, offset));
        self.queued += REQUEST_SIZE;
        self.out.push_back(Outgoing { head, payload: None });
        Ok(cookie)
    }

    /// Gives up native read `cookie` (its guest went away): its hold released into
    /// `finished`, its reply dropped when it comes. The guest's length, if it was waiting.
    pub(crate) fn abandon_native(&mut self, py: Python<'_>, cookie: u64, finished: &mut Finished) -> Option<u32> {
        let sent = self.native.remove(&cookie)?;
        let Some(Target::Native(read)) = self.core.target_mut(cookie) else {
            return None;
        };
        read.taken = true;
        finished.release(py, read);
        self.taken.insert(cookie, sent);
        Some(read.length())
    }

    /// Pairs a WRITE's reply with its group, counted into `writes` (a group whose last
    /// WRITE this is goes there whole); false if it is not a group's.
    fn group_answered(&mut self, c: &Completion<Target>, writes: &mut WritesAnswered) -> bool {
        let Some((&first, group)) = self.groups.range_mut(..=c.cookie).next_back() else {
            return false;
        };
        let i = (c.cookie - first) as usize;
        if i >= group.writes.len() || group.answered[i] {
            return false;
        }
        group.answered[i] = true;
        group.left -= 1;
        writes.freed += 1;
        if c.error != 0 {
            group.errors.push((i, c.error, c.message.clone()));
        }
        if group.left == 0 {
            let errors = self.groups.remove(&first).map(|g| g.errors).filter(|e| !e.is_empty());
            writes.ended.push((first, errors));
        }
        true
    }

    /// The completions for Python, native reads finished into `finished`, write groups
    /// counted into `writes`.
    fn completions<'py>(
        &mut self,
        py: Python<'py>,
        finished: &mut Finished,
        writes: &mut WritesAnswered,
    ) -> PyResult<Bound<'py, PyList>> {
        let done: Vec<Completion<Target>> = self.core.take_completions();
        let list = PyList::empty(py);
        for c in done {
            if c.target.is_none() && !self.groups.is_empty() && self.group_answered(&c, writes) {
                continue;
            }
            if let Some(Target::Native(read)) = c.target {
                let (_, offset) = match self.native.remove(&c.cookie) {
                    Some(sent) => sent,
                    None => self.taken.remove(&c.cookie).unwrap_or((0.0, 0)),
                };
                finished.reply(py, read, c.error, c.message, offset);
                continue;
            }
            let item: Bound<'py, PyTuple> = if c.message.is_empty() {
                (c.cookie, c.error, "").into_pyobject(py)?
            } else {
                (c.cookie, c.error, c.message).into_pyobject(py)?
            };
            list.append(item)?;
        }
        Ok(list)
    }

    /// Copies every payload still queued: its caller may reuse its buffer from now on.
    fn keep_payloads(&mut self) {
        self.backed_up = true;
        for item in &mut self.out {
            if let Some(payload) = item.payload.take() {
                item.payload = Some(Self::kept(&mut self.copied, payload));
            }
        }
    }

    /// `payload` as it may wait: a lent buffer copied (its caller may reuse it once
    /// its request is cancelled), anything else as it is.
    fn kept(copied: &mut usize, payload: Payload) -> Payload {
        match payload {
            Payload::Lent(buf, _) => {
                let copy = buf.bytes().to_vec();
                *copied += copy.len();
                Payload::Owned(copy)
            }
            other => other,
        }
    }

    /// Queues a request. While the socket is backed up no send may come before its
    /// caller can be cancelled (the loop only waits for the socket to drain): its
    /// payload is kept now, not at the next refusal.
    fn push(&mut self, mut item: Outgoing) {
        if self.backed_up {
            item.payload = item.payload.map(|p| Self::kept(&mut self.copied, p));
        }
        self.queued += item.len();
        self.out.push_back(item);
    }

    fn broken_reason(&self) -> Option<String> {
        self.core.broken().map(|b| format!("broke the protocol: {b}"))
    }

    fn writes_batch<'py>(py: Python<'py>, writes: WritesAnswered) -> PyResult<Option<Bound<'py, PyTuple>>> {
        if writes.freed == 0 {
            return Ok(None);
        }
        Ok(Some((writes.freed, writes.ended).into_pyobject(py)?))
    }

    /// Receives what the socket has (a bounded number of reads): why the connection is
    /// unusable (a protocol violation or a failed read; None: it is not), and whether the
    /// server closed its end.
    fn receive(&mut self) -> PyResult<(Option<String>, bool)> {
        let Some(sock) = self.sock.as_mut() else {
            return Err(PyValueError::new_err("no socket: this engine is fed (feed)"));
        };
        let mut eof = false;
        let mut lost = None;
        for _ in 0..READS_PER_CALL {
            if self.core.broken().is_some() {
                break;
            }
            let (direct, scratch) = self.core.recv_space();
            let room = direct.len() + scratch.len();
            let result = sock.read_vectored(&mut [IoSliceMut::new(direct), IoSliceMut::new(scratch)]);
            match result {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    if self.core.received(n).is_err() || n < room {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    lost = Some(format!("connection lost ({e})"));
                    break;
                }
            }
        }
        Ok((self.broken_reason().or(lost), eof))
    }

    fn native_batch<'py>(py: Python<'py>, finished: Finished) -> PyResult<Option<Bound<'py, PyTuple>>> {
        if finished.is_empty() {
            return Ok(None);
        }
        finished.into_py(py).map(Some)
    }
}

#[pymethods]
impl NbdClientEngine {
    #[new]
    #[pyo3(signature = (sock, structured, max_payload=crate::nbd_wire::MAX_PAYLOAD))]
    fn new(sock: Option<&Bound<'_, PyAny>>, structured: bool, max_payload: u32) -> PyResult<Self> {
        let (sock, fed) = match sock {
            Some(s) => (Some(detach_socket(s)?), false),
            None => (None, true),
        };
        Ok(Self {
            core: ClientCore::new(structured),
            sock,
            fed,
            closed: false,
            native: BTreeMap::new(),
            taken: BTreeMap::new(),
            groups: BTreeMap::new(),
            out: VecDeque::new(),
            sent: 0,
            queued: 0,
            copied: 0,
            backed_up: false,
            max_read: max_payload as usize,
        })
    }

    /// The socket's descriptor (for add_reader/add_writer); -1 when fed or closed.
    fn fileno(&self) -> i32 {
        self.sock.as_ref().map_or(-1, |s| s.as_raw_fd())
    }

    /// Requests sent and not yet answered.
    #[getter]
    fn pending(&self) -> usize {
        self.core.pending()
    }

    /// Bytes queued and not yet written to the socket (or taken by take_output).
    #[getter]
    fn queued(&self) -> usize {
        self.queued
    }

    /// Payload bytes copied so far, held while the socket would not take them: a
    /// caller's buffer it may reuse (never a `bytes` object).
    #[getter]
    fn copied(&self) -> usize {
        self.copied
    }

    /// request(type, flags, offset, length, data=None, into=None) -> cookie
    ///
    /// Queues one request (send() or take_output() puts it on the wire). A WRITE
    /// carries `data` (exactly `length` bytes, held until sent); a READ is received
    /// into `into` (writable, exactly `length` bytes, written until it completes or
    /// the connection fails). ValueError for a request that must not be sent.
    #[pyo3(signature = (typ, flags, offset, length, data=None, into=None))]
    fn request(
        &mut self,
        typ: u16,
        flags: u16,
        offset: u64,
        length: u32,
        data: Option<&Bound<'_, PyAny>>,
        into: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        let payload = data.map(Payload::new).transpose()?;
        let target = into.map(|t| LentBuffer::new(t, true).map(Target::Lent)).transpose()?;
        let payload_len = payload.as_ref().map(|p| p.bytes().len());
        let (cookie, head) = self
            .core
            .request(typ, flags, offset, length, payload_len, target)
            .map_err(|refused| PyValueError::new_err(refused.0))?;
        self.push(Outgoing { head, payload });
        Ok(cookie)
    }

    /// request_writes(flags, writes, sent, bounds=None) -> first cookie, or None
    ///
    /// Queues a WRITE for each (offset, data) of `writes`, in order, with consecutive
    /// cookies from the one returned, sent at loop time `sent`: a batch of writes behind
    /// costs one call, not one per request. Their replies are paired and counted here:
    /// `ready` (or `feed`) hands the batch over once, when its last WRITE is answered
    /// (the write batch: slots freed, [(first cookie, None or [(index, NBD error,
    /// message)])]); `abandon_writes` says what a broken connection left unanswered.
    /// With `bounds` (the export's size, minimum block and maximum payload): None, with
    /// nothing queued, if any write is outside the export, over the maximum, or
    /// unaligned (but for a short last block), so the caller can send them the general
    /// way, which says what is wrong. ValueError, with nothing queued, if any of them
    /// must not be sent. With `ring`, each data is a 16-byte ring descriptor (ring
    /// offset, length: u64 big-endian) and each is sent as NBD_CMD_TRUSTVBD_RING_WRITE
    /// of that length (docs/driver-ring.md; only where the handshake agreed the ring).
    #[pyo3(signature = (flags, writes, sent, bounds=None, ring=false))]
    fn request_writes(
        &mut self,
        flags: u16,
        writes: &Bound<'_, PyList>,
        sent: f64,
        bounds: Option<(u64, u64, u64)>,
        ring: bool,
    ) -> PyResult<Option<u64>> {
        let mut items = Vec::with_capacity(writes.len());
        for item in writes.iter() {
            let (offset, data): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item.extract()?;
            let offset: u64 = match offset.extract() {
                Ok(offset) => offset,
                Err(_) if bounds.is_some() => return Ok(None), // negative
                Err(err) => return Err(err),
            };
            let payload = Payload::new(&data)?;
            let data_len = if ring {
                let d = payload.bytes();
                if d.len() != RING_DESCRIPTOR {
                    return Err(PyValueError::new_err("a ring descriptor is 16 bytes"));
                }
                usize::try_from(u64::from_be_bytes(d[8..16].try_into().expect("8 bytes")))
                    .map_err(|_| PyValueError::new_err("a ring descriptor's length is over 32 MiB"))?
            } else {
                payload.bytes().len()
            };
            if let Some((size, align, limit)) = bounds {
                let length = data_len as u64;
                let end = offset.checked_add(length);
                if length > limit
                    || end.is_none_or(|end| end > size)
                    || (align > 1
                        && (!offset.is_multiple_of(align) || (!length.is_multiple_of(align) && end != Some(size))))
                {
                    return Ok(None);
                }
            }
            let length = u32::try_from(data_len)
                .ok()
                .filter(|&n| self.core.takes_read(n)) // a READ's bounds are a WRITE's
                .ok_or_else(|| match self.core.broken() {
                    Some(b) => PyValueError::new_err(format!("the connection failed earlier: {b}")),
                    None => PyValueError::new_err("a WRITE over 32 MiB, or after NBD_CMD_DISC"),
                })?;
            items.push((offset, length, payload));
        }
        if items.is_empty() {
            return Err(PyValueError::new_err("no writes to queue"));
        }
        let mut first = None;
        let mut group = Vec::with_capacity(items.len());
        let command = if ring { CMD_RING_WRITE } else { CMD_WRITE };
        for (offset, length, payload) in items {
            let sent_len = payload.bytes().len();
            let (cookie, head) = self
                .core
                .request(command, flags, offset, length, Some(sent_len), None)
                .map_err(|refused| PyValueError::new_err(refused.0))?; // checked above: never
            first.get_or_insert(cookie);
            group.push((offset, length));
            self.push(Outgoing {
                head,
                payload: Some(payload),
            });
        }
        let first = first.unwrap_or_default(); // (items is not empty)
        let count = group.len();
        self.groups.insert(
            first,
            WriteGroup {
                sent,
                writes: group,
                answered: vec![false; count],
                left: count,
                errors: Vec::new(),
            },
        );
        Ok(Some(first))
    }

    /// The oldest WRITE of a group still waiting for its reply: (loop time sent, offset,
    /// length); None when none waits.
    #[getter]
    fn writes_oldest(&self) -> Option<(f64, u64, u32)> {
        let group = self.groups.values().next()?;
        let i = group.answered.iter().position(|a| !a)?;
        let (offset, length) = group.writes[i];
        Some((group.sent, offset, length))
    }

    /// abandon_writes() -> [(first cookie, [(index, NBD error, message)], [index])]: each
    /// write group not fully answered (the connection broke), with the error replies it
    /// had and the WRITEs that had none; forgotten from now on.
    fn abandon_writes(&mut self) -> Vec<(u64, Vec<ErrorReply>, Vec<usize>)> {
        std::mem::take(&mut self.groups)
            .into_iter()
            .map(|(first, g)| {
                let left = g
                    .answered
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| !**a)
                    .map(|(i, _)| i)
                    .collect();
                (first, g.errors, left)
            })
            .collect()
    }

    /// Queues NBD_CMD_DISC: no request may follow it.
    fn disconnect(&mut self) {
        let head = self.core.disconnect();
        self.queued += REQUEST_SIZE;
        self.out.push_back(Outgoing { head, payload: None });
    }

    /// Writes what is queued, without blocking: True if all of it is out, False if
    /// the socket is full (wait until writable and call again). OSError if it fails.
    fn send(&mut self) -> PyResult<bool> {
        let Some(sock) = self.sock.as_mut() else {
            return Err(PyValueError::new_err("no socket: this engine is fed (take_output)"));
        };
        while !self.out.is_empty() {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(IOVECS_PER_WRITE.min(2 * self.out.len()));
            let mut skip = self.sent;
            for item in &self.out {
                let parts = [&item.head[..], item.payload.as_ref().map_or(&[][..], |p| p.bytes())];
                for part in parts {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    slices.push(IoSlice::new(&part[skip..]));
                    skip = 0;
                }
                if slices.len() + 2 > IOVECS_PER_WRITE {
                    break;
                }
            }
            let written = match sock.write_vectored(&slices) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    drop(slices);
                    self.keep_payloads();
                    return Ok(false);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(PyOSError::new_err((e.raw_os_error().unwrap_or(0), e.to_string()))),
            };
            drop(slices);
            self.queued -= written;
            let mut left = self.sent + written;
            while let Some(front) = self.out.front() {
                if left < front.len() {
                    break;
                }
                left -= front.len();
                self.out.pop_front();
            }
            self.sent = left;
        }
        self.backed_up = false;
        Ok(true)
    }

    /// What is queued, as buffers to write in order (a fed engine's send).
    fn take_output<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for item in self.out.drain(..) {
            list.append(PyBytes::new(py, &item.head))?;
            match item.payload {
                Some(Payload::Lent(_, obj) | Payload::Frozen(_, obj)) => list.append(obj)?,
                Some(Payload::Owned(bytes)) => list.append(PyBytes::new(py, &bytes))?,
                None => {}
            }
        }
        self.queued = 0;
        self.sent = 0;
        Ok(list)
    }

    /// ready(client): the loop's reader callback (add_reader(fd, engine.ready, client)),
    /// `client` an EngineOwner (trustvbd/_native.pyi: NbdClient). Receives what the socket
    /// has (a bounded number of reads) and hands `client.resolve` the batch (completions,
    /// broken, eof, native batch, write batch): the requests answered, as (cookie, nbd
    /// error, message) tuples, but for the WRITEs of `request_writes` (the write batch:
    /// None if none was answered); `broken` says why the connection is unusable (a protocol
    /// violation or a failed read), `eof` that the server closed its end. But a batch that
    /// did nothing but answer native reads without fault (their replies in their sessions'
    /// output, which settle once per loop turn) goes to `client.native_answered(slots)`
    /// first, which gives their slots back unless someone may be owed them; only if it
    /// declines does the batch go to `resolve`.
    fn ready(slf: &Bound<'_, Self>, client: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let (done, reason, eof, finished, writes) = {
            let mut me = slf.borrow_mut(); // (let go before Python runs: it may close us)
            let (reason, eof) = me.receive()?;
            let mut finished = Finished::default();
            let mut writes = WritesAnswered::default();
            let done = me.completions(py, &mut finished, &mut writes)?;
            (done, reason, eof, finished, writes)
        };
        if done.is_empty()
            && reason.is_none()
            && !eof
            && writes.freed == 0
            && finished.only_slots()
            && client
                .call_method1(intern!(py, "native_answered"), (finished.slots,))?
                .extract::<bool>()?
        {
            return Ok(());
        }
        let batch = (
            done,
            reason,
            eof,
            Self::native_batch(py, finished)?,
            Self::writes_batch(py, writes)?,
        );
        client.call_method1(intern!(py, "resolve"), (batch,))?;
        Ok(())
    }

    /// feed(data) -> a batch as `ready` hands over (eof False): bytes a carried stream
    /// received.
    fn feed<'py>(&mut self, py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Batch<'py>> {
        if !self.fed {
            return Err(PyValueError::new_err("this engine reads its own socket (ready)"));
        }
        let data = LentBuffer::new(data, false)?;
        let _ = self.core.feed(data.bytes()); // a violation is reported below
        drop(data);
        let mut finished = Finished::default();
        let mut writes = WritesAnswered::default();
        let done = self.completions(py, &mut finished, &mut writes)?;
        Ok((
            done,
            self.broken_reason(),
            false,
            Self::native_batch(py, finished)?,
            Self::writes_batch(py, writes)?,
        ))
    }

    /// The loop time the oldest native read still waiting for its reply was sent (those
    /// handed to Python included); None when none waits.
    #[getter]
    fn native_oldest(&self) -> Option<f64> {
        let first = |m: &BTreeMap<u64, (f64, u64)>| m.values().next().map(|(sent, _)| *sent);
        match (first(&self.native), first(&self.taken)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Native reads in flight (those handed to Python included).
    #[getter]
    fn native_pending(&self) -> usize {
        self.native.len() + self.taken.len()
    }

    /// take_lagging(before) -> the native batch: the native reads sent before loop time
    /// `before` go up to Python (their holds released); their requests stay in flight
    /// and their replies, when they come, are dropped.
    fn take_lagging<'py>(&mut self, py: Python<'py>, before: f64) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let late: Vec<(u64, f64, u64)> = self
            .native
            .iter()
            .take_while(|(_, (sent, _))| *sent < before)
            .map(|(c, (sent, offset))| (*c, *sent, *offset))
            .collect();
        let mut finished = Finished::default();
        for (cookie, sent, offset) in late {
            self.native.remove(&cookie);
            if let Some(Target::Native(read)) = self.core.target_mut(cookie) {
                read.taken = true;
                finished.fail(py, read, Why::Lagging(sent), offset);
                self.taken.insert(cookie, (sent, offset));
            }
        }
        Self::native_batch(py, finished)
    }

    /// Closes the socket (if any). Pending requests are given up and what is queued is
    /// dropped: read targets and payloads are let go, no byte is written to them later.
    /// Returns the native batch of the native reads given up (None if there were none):
    /// they go up to Python as failed on a broken connection. Write groups not answered
    /// stay until `abandon_writes` takes them.
    fn close<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyTuple>>> {
        self.out.clear();
        self.queued = 0;
        self.sent = 0;
        self.closed = true;
        let mut finished = Finished::default();
        for (cookie, target) in self.core.abandon_targets() {
            if let Some(Target::Native(read)) = target {
                finished.slots += 1;
                if let Some((_, offset)) = self.native.remove(&cookie) {
                    finished.fail(py, &read, Why::Broken, offset);
                }
            }
        }
        self.native.clear();
        self.taken.clear();
        self.sock = None;
        Self::native_batch(py, finished)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NbdClientEngine>()
}
