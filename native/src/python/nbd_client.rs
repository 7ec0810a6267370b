//! `NbdClientEngine`: the I/O shell of `nbd_client` for `trustvbd.nbd.client`.
//!
//! It owns a connected socket (taken over with `socket.detach()`), sends queued
//! requests with non-blocking writev, and, when the asyncio loop says the socket is
//! readable, receives with readv straight into read targets and the scratch buffer,
//! returning the completions for Python to resolve its futures with. Without a socket
//! (a TLS stream) Python feeds received bytes in (`feed`) and writes out what
//! `take_output` gives it: the same core either way. The GIL is held throughout;
//! every call is short (a bounded number of system calls).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::AsRawFd;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use super::foreign::{detach_socket, LentBuffer};
use crate::nbd_client::{ClientCore, Completion};
use crate::nbd_wire::REQUEST_SIZE;

/// Reads per `readable()` call at most: the loop serves other sockets in between.
const READS_PER_CALL: usize = 16;
/// Buffers per writev (Linux's IOV_MAX is 1024).
const IOVECS_PER_WRITE: usize = 256;

/// A WRITE's payload: the caller's buffer until the socket first refuses bytes, then
/// a copy. A caller may reuse its buffer as soon as its request is cancelled (after
/// the turn it was queued in, when `send` has run): what waits past that is ours.
enum Payload {
    Lent(LentBuffer, Py<PyAny>),
    Owned(Vec<u8>),
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Lent(buf, _) => buf.bytes(),
            Payload::Owned(bytes) => bytes,
        }
    }
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
/// NbdClientEngine(sock, structured): `sock` a connected, non-blocking socket.socket
/// (taken over: detached, closed by `close()`), or None for a stream Python carries
/// (TLS): then received bytes go in through `feed` and `take_output` says what to send.
#[pyclass(module = "trustvbd._native", name = "NbdClientEngine")]
pub(crate) struct NbdClientEngine {
    core: ClientCore<LentBuffer>,
    sock: Option<File>,
    fed: bool,
    out: VecDeque<Outgoing>,
    sent: usize, // bytes of out's front already sent
    queued: usize,
}

type Batch<'py> = (Bound<'py, PyList>, Option<String>, bool);

impl NbdClientEngine {
    fn completions<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let done: Vec<Completion<LentBuffer>> = self.core.take_completions();
        let list = PyList::empty(py);
        for c in done {
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
        for item in &mut self.out {
            if let Some(Payload::Lent(buf, _)) = &item.payload {
                item.payload = Some(Payload::Owned(buf.bytes().to_vec()));
            }
        }
    }

    fn broken_reason(&self) -> Option<String> {
        self.core.broken().map(|b| format!("broke the protocol: {b}"))
    }
}

#[pymethods]
impl NbdClientEngine {
    #[new]
    #[pyo3(signature = (sock, structured))]
    fn new(sock: Option<&Bound<'_, PyAny>>, structured: bool) -> PyResult<Self> {
        let (sock, fed) = match sock {
            Some(s) => (Some(detach_socket(s)?), false),
            None => (None, true),
        };
        Ok(Self {
            core: ClientCore::new(structured),
            sock,
            fed,
            out: VecDeque::new(),
            sent: 0,
            queued: 0,
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
        let payload = data
            .map(|d| LentBuffer::new(d, false).map(|b| Payload::Lent(b, d.clone().unbind())))
            .transpose()?;
        let target = into.map(|t| LentBuffer::new(t, true)).transpose()?;
        let payload_len = payload.as_ref().map(|p| p.bytes().len());
        let (cookie, head) = self
            .core
            .request(typ, flags, offset, length, payload_len, target)
            .map_err(|refused| PyValueError::new_err(refused.0))?;
        let item = Outgoing { head, payload };
        self.queued += item.len();
        self.out.push_back(item);
        Ok(cookie)
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
        Ok(true)
    }

    /// What is queued, as buffers to write in order (a fed engine's send).
    fn take_output<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for item in self.out.drain(..) {
            list.append(PyBytes::new(py, &item.head))?;
            match item.payload {
                Some(Payload::Lent(_, obj)) => list.append(obj)?,
                Some(Payload::Owned(bytes)) => list.append(PyBytes::new(py, &bytes))?,
                None => {}
            }
        }
        self.queued = 0;
        self.sent = 0;
        Ok(list)
    }

    /// readable() -> (completions, broken, eof)
    ///
    /// Receives what the socket has (a bounded number of reads) and returns the
    /// requests answered, as (cookie, nbd error, message) tuples; `broken` says why
    /// the connection is unusable (a protocol violation or a failed read), `eof`
    /// that the server closed its end.
    fn readable<'py>(&mut self, py: Python<'py>) -> PyResult<Batch<'py>> {
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
        let reason = self.broken_reason().or(lost);
        Ok((self.completions(py)?, reason, eof))
    }

    /// feed(data) -> (completions, broken, eof=False): bytes a carried stream received.
    fn feed<'py>(&mut self, py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Batch<'py>> {
        if !self.fed {
            return Err(PyValueError::new_err("this engine reads its own socket (readable)"));
        }
        let data = LentBuffer::new(data, false)?;
        let _ = self.core.feed(data.bytes()); // a violation is reported below
        Ok((self.completions(py)?, self.broken_reason(), false))
    }

    /// Closes the socket (if any). Pending requests are given up and what is queued is
    /// dropped: read targets and payloads are let go, no byte is written to them later.
    fn close(&mut self) {
        self.out.clear();
        self.queued = 0;
        self.sent = 0;
        self.core.abandon_all();
        self.sock = None;
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NbdClientEngine>()

}
