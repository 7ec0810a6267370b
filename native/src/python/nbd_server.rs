//! `NbdServerSession`: the server's transmission phase (`crate::nbd_server`) for the
//! asyncio shell `trustvbd.nbd.connection`, one per connection once the handshake is done.
//!
//! Crossings are per batch, not per request: `parse` turns every complete request in the
//! receive buffer into a list of tuples, and `frame` turns a loop iteration's replies into
//! the few buffers one writev sends.

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use std::collections::HashMap;

use super::foreign;
use super::nbd_client::NbdClientEngine;
use super::read_plane::{self, Begun, Finished, ReadPlane};
use super::write_plane::WritePlane;
use crate::nbd_server::{self, Checker, Framer, Item, Payload, Refusal};
use crate::nbd_wire::{CMD_READ, CMD_WRITE, FLAG_FUA};

/// Read data up to this size is copied in among the reply headers (one buffer for the
/// batch); larger data goes as a buffer of its own, uncopied.
const COPY_MAX: usize = 16 * 1024;

/// NbdServerSession(export_size, transmission_flags, structured, meta_context=0)
///
/// meta_context: the id of the negotiated base:allocation context (0: none, and
/// BLOCK_STATUS is refused).
///
/// parse(buf, start, end) -> (new start, items, want): items are tuples
/// (type, flags, cookie, offset, length, data, refusal, piece), refusal None or
/// (nbd error, message), piece None or, for a piece of a WRITE over 32 MiB, whether it
/// is the last. ValueError for what must drop the connection (bad magic).
///
/// parse_native(buf, start, end, owner, plane, slots, now, max_reads, max_bytes, writes)
///     -> (new start, items, want, reads started, their bytes, [reads per link], answered,
///         [sent per link])
/// As parse, but READs the ReadPlane `plane` (or None) can serve natively are started
/// there instead of returned (see read_plane.rs), up to `max_reads` of at most
/// `max_bytes` together (a READ of blocks never written is answered at once, zeros: it
/// counts as started, and its reply is in the output), and WRITEs the WritePlane `writes`
/// (or None) takes are done there (see write_plane.rs), their replies framed into the
/// output; `answered`: the requests whose replies are in the output. WRITEs only until
/// the first request handed to Python, READs until the first one handed to Python that
/// is not a READ: what may overlap keeps its order (reads commute). `owner` is told of the
/// reads' replies (`_native_replied`, then take_output) and failures; the caller
/// collects the writes (WritePlane.take) before it sends the output. The reads started on a
/// link are sent before it returns, where the link's socket takes them (`sent`: nothing more
/// to do; else the caller has them sent, as any request).
#[pyclass(module = "trustvbd._native", name = "NbdServerSession")]
pub(crate) struct PyNbdServerSession {
    framer: Framer,
    structured: bool,
    meta_context: u32,
    /// Replies of native reads, framed, not yet taken (take_output): a run of bytes, and
    /// before it the parts already cut off by a big read's data (sent as its own buffer).
    out: Vec<u8>,
    parts: Vec<Py<PyAny>>,
    /// Small native reads' data, not copied into `out` yet: each goes in at its position
    /// in `out` (after its header) when the output is cut (`cut`), so it is copied once,
    /// straight into the bytes sent.
    spliced: Vec<Spliced>,
    /// Small reads' buffers given back once their data was cut into the output, for the
    /// next reads of this connection (`spare_buffer`): no allocation per read.
    spare: Vec<Vec<u8>>,
    ended: usize,     // native reads whose replies are in `out`
    ended_bytes: u64, // their guest lengths
    /// Native reads running: seq -> their connection's engine and its request's cookie.
    running: HashMap<u64, (Py<NbdClientEngine>, u64)>,
    next_seq: u64,
    /// `(call_soon, settle)` (`set_settle`): a native read's reply in the output has the
    /// loop call `settle` once, after this turn's ready sockets, for all the replies of the
    /// turn: no Python per batch of replies a replica's connection received.
    settle: Option<(Py<PyAny>, Py<PyAny>)>,
    settle_queued: bool, // settle is in the loop's queue, or the output was taken since
}

/// A small native read's data: `buf[skip..skip + length]` goes at `at` in the output.
struct Spliced {
    at: usize,
    buf: Vec<u8>,
    skip: usize,
    length: usize,
}

/// Spare small-read buffers a session keeps (one batch's worth of 4 KiB reads).
const SPARE_KEPT: usize = 64;

impl PyNbdServerSession {
    /// A buffer of `size` bytes for a small native read (a spare one of that size, else
    /// a new one). Its bytes are whatever the last read left: a read's reply is sent only
    /// once the driver's reply filled all of it.
    pub(crate) fn spare_buffer(&mut self, size: usize) -> Vec<u8> {
        match self.spare.iter().rposition(|b| b.len() == size) {
            Some(i) => self.spare.swap_remove(i),
            None => vec![0u8; size],
        }
    }

    /// A small native read's successful reply: its header framed into the output, its
    /// data (`buf[skip..skip + length]`) copied in when the output is cut.
    pub(crate) fn push_read_owned(&mut self, cookie: u64, offset: u64, buf: Vec<u8>, skip: usize, length: usize) {
        let length32 = u32::try_from(length).expect("native reads are at most 32 MiB");
        nbd_server::frame_reply(&mut self.out, self.structured, cookie, 0, "", Some((offset, length32)));
        self.spliced.push(Spliced {
            at: self.out.len(),
            buf,
            skip,
            length,
        });
        self.ended += 1;
        self.ended_bytes += length as u64;
    }

    /// The output framed so far as one bytes object (`out` with the spliced data in
    /// place), `out` emptied and the spliced reads' buffers kept as spares.
    fn cut<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        if self.spliced.is_empty() {
            let bytes = PyBytes::new(py, &self.out);
            self.out.clear();
            return bytes;
        }
        let total = self.out.len() + self.spliced.iter().map(|s| s.length).sum::<usize>();
        let (out, spliced) = (&self.out, &self.spliced);
        let bytes = PyBytes::new_with(py, total, |dst| {
            let (mut from, mut to) = (0usize, 0usize);
            for s in spliced {
                let run = s.at - from;
                dst[to..to + run].copy_from_slice(&out[from..s.at]);
                to += run;
                dst[to..to + s.length].copy_from_slice(&s.buf[s.skip..s.skip + s.length]);
                to += s.length;
                from = s.at;
            }
            dst[to..].copy_from_slice(&out[from..]);
            Ok(())
        })
        .expect("a bytes object of the output's size");
        self.out.clear();
        for s in self.spliced.drain(..) {
            if self.spare.len() < SPARE_KEPT {
                self.spare.push(s.buf);
            }
        }
        bytes
    }

    /// A native read's successful reply, framed into the output.
    pub(crate) fn push_read_reply(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        let length = u32::try_from(data.len()).expect("native reads are at most 32 MiB");
        nbd_server::frame_reply(&mut self.out, self.structured, cookie, 0, "", Some((offset, length)));
        self.out.extend_from_slice(data);
        self.ended += 1;
        self.ended_bytes += u64::from(length);
    }

    /// A native read's successful reply whose `length` bytes of data are `data` (a buffer
    /// sent as it is, after the header).
    pub(crate) fn push_read_object(
        &mut self,
        py: Python<'_>,
        cookie: u64,
        offset: u64,
        length: usize,
        data: Py<PyAny>,
    ) {
        let length32 = u32::try_from(length).expect("native reads are at most 32 MiB");
        nbd_server::frame_reply(&mut self.out, self.structured, cookie, 0, "", Some((offset, length32)));
        let head = self.cut(py);
        self.parts.push(head.into_any().unbind());
        self.parts.push(data);
        self.ended += 1;
        self.ended_bytes += length as u64;
    }

    /// Native read `seq` ended (replied, failed or given up).
    pub(crate) fn read_ended(&mut self, seq: u64) {
        self.running.remove(&seq);
    }

    /// A native read's reply is in the output: the loop is to call `settle` (once per turn).
    /// False if there is no `settle` (or the loop refused it): the caller has its owner
    /// told (`_native_replied`).
    pub(crate) fn replied(&mut self, py: Python<'_>) -> bool {
        let Some((call_soon, settle)) = &self.settle else {
            return false;
        };
        if !self.settle_queued {
            if call_soon.bind(py).call1((settle.bind(py),)).is_err() {
                return false; // a closed loop: the owner is told now, as without settle
            }
            self.settle_queued = true;
        }
        true
    }
}

fn protocol_error(err: nbd_server::ProtocolError) -> PyErr {
    PyValueError::new_err(err.0)
}

fn refusal_tuple<'py>(py: Python<'py>, refusal: &Option<Refusal>) -> PyResult<Bound<'py, PyAny>> {
    Ok(match refusal {
        None => py.None().into_bound(py),
        Some(r) => (r.error, r.message.as_str()).into_pyobject(py)?.into_any(),
    })
}

/// A parsed request's payload for Python: None, or its bytes copied out of the received
/// buffer (`start`: where the parsed bytes begin in it).
fn payload<'py>(py: Python<'py>, buf: &PyBuffer<u8>, start: usize, item: &Item) -> PyResult<Bound<'py, PyAny>> {
    Ok(match &item.payload {
        Payload::None => py.None().into_bound(py),
        Payload::Inline(range) => {
            let (from, to) = (start + range.start, start + range.end);
            PyBytes::new_with(py, to - from, |out| {
                foreign::with_bytes(py, buf, |bytes| out.copy_from_slice(&bytes[from..to]))
            })?
            .into_any()
        }
        Payload::Received => unreachable!("parse hands out no received payload"),
    })
}

fn item_tuple<'py>(py: Python<'py>, item: &Item, data: Bound<'py, PyAny>) -> PyResult<Bound<'py, PyTuple>> {
    let h = &item.head;
    let piece = match item.piece {
        None => py.None().into_bound(py),
        Some(last) => pyo3::types::PyBool::new(py, last).to_owned().into_any(),
    };
    PyTuple::new(
        py,
        [
            h.typ.into_pyobject(py)?.into_any(),
            h.flags.into_pyobject(py)?.into_any(),
            h.cookie.into_pyobject(py)?.into_any(),
            item.offset.into_pyobject(py)?.into_any(),
            item.length.into_pyobject(py)?.into_any(),
            data,
            refusal_tuple(py, &item.refusal)?,
            piece,
        ],
    )
}

#[pymethods]
impl PyNbdServerSession {
    #[new]
    #[pyo3(signature = (export_size, transmission_flags, structured, meta_context=0))]
    fn new(export_size: u64, transmission_flags: u16, structured: bool, meta_context: u32) -> Self {
        let mut checker = Checker::new(export_size, transmission_flags, structured);
        if meta_context != 0 && structured {
            checker = checker.with_block_status();
        }
        Self {
            framer: Framer::new(checker),
            structured,
            meta_context,
            out: Vec::new(),
            parts: Vec::new(),
            spliced: Vec::new(),
            spare: Vec::new(),
            ended: 0,
            ended_bytes: 0,
            running: HashMap::new(),
            next_seq: 0,
            settle: None,
            settle_queued: false,
        }
    }

    /// set_settle(call_soon=None, settle=None): once a native read's reply is in the output,
    /// `call_soon(settle)` (once until take_output), rather than the reply's owner being told
    /// per batch of replies (`_native_replied`). None, None: told again (no cycle left).
    #[pyo3(signature = (call_soon=None, settle=None))]
    fn set_settle(&mut self, call_soon: Option<Py<PyAny>>, settle: Option<Py<PyAny>>) {
        self.settle = call_soon.zip(settle);
        self.settle_queued = false;
    }

    /// frame_block_status(cookie, length, req_one, extents) -> bytes: the reply to a
    /// BLOCK_STATUS of `length` bytes from the backend's [(length, flags), ...] extents.
    /// ValueError if they describe nothing.
    fn frame_block_status<'py>(
        &self,
        py: Python<'py>,
        cookie: u64,
        length: u32,
        req_one: bool,
        extents: Vec<(u64, u32)>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        if self.meta_context == 0 {
            return Err(PyValueError::new_err("no metadata context was negotiated"));
        }
        let mut out = Vec::with_capacity(24 + 8 * extents.len().min(nbd_server::MAX_DESCRIPTORS));
        nbd_server::frame_block_status(&mut out, cookie, self.meta_context, length, req_one, &extents)
            .map_err(PyValueError::new_err)?;
        Ok(PyBytes::new(py, &out))
    }

    /// frame_read_part(cookie, offset, data, first, last) -> buffers: one part of a READ
    /// reply sent part by part (a READ longer than 32 MiB), `data` read at `offset`;
    /// `first` and `last` say which parts these are. Structured: an OFFSET_DATA chunk
    /// (the last one ends the reply). Simple: the reply's header before the first
    /// part's data; the data of later parts continues it. `data` goes out uncopied.
    fn frame_read_part<'py>(
        &self,
        py: Python<'py>,
        cookie: u64,
        offset: u64,
        data: Bound<'py, PyAny>,
        first: bool,
        last: bool,
    ) -> PyResult<Bound<'py, PyList>> {
        let len = PyBuffer::<u8>::get(&data)?.item_count();
        let length = u32::try_from(len)
            .ok()
            .filter(|&n| n <= nbd_server::REQUEST_PART)
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "a READ part of {len} bytes is longer than the {} bytes of one part",
                    nbd_server::REQUEST_PART
                ))
            })?;
        let mut head = Vec::with_capacity(32);
        nbd_server::frame_read_part(&mut head, self.structured, cookie, offset, length, first, last);
        let out = PyList::empty(py);
        if !head.is_empty() {
            out.append(PyBytes::new(py, &head))?;
        }
        if len > 0 {
            out.append(data)?;
        }
        Ok(out)
    }

    /// frame_read_error(cookie, error, message, offset, first) -> bytes: the end of a
    /// READ reply sent part by part whose part at `offset` failed. Structured: an
    /// ERROR_OFFSET chunk with the message. Simple: an error reply, which only the first
    /// part can be: ValueError after that (the caller must drop the connection).
    fn frame_read_error<'py>(
        &self,
        py: Python<'py>,
        cookie: u64,
        error: u32,
        message: &str,
        offset: u64,
        first: bool,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let mut out = Vec::with_capacity(32 + message.len().min(crate::nbd_wire::MAX_STRING));
        nbd_server::frame_read_error(&mut out, self.structured, cookie, error, message, offset, first)
            .map_err(PyValueError::new_err)?;
        Ok(PyBytes::new(py, &out))
    }

    /// True once NBD_CMD_DISC arrived: nothing after it is parsed.
    #[getter]
    fn disconnected(&self) -> bool {
        self.framer.disconnected()
    }

    fn parse<'py>(
        &mut self,
        py: Python<'py>,
        buf: PyBuffer<u8>,
        start: usize,
        end: usize,
    ) -> PyResult<(usize, Bound<'py, PyList>, usize)> {
        if start > end || end > buf.item_count() {
            return Err(PyValueError::new_err(format!(
                "bytes [{start}, {end}) lie outside the buffer of {}",
                buf.item_count()
            )));
        }
        let framer = &mut self.framer;
        let mut items = Vec::new();
        let parsed = foreign::with_bytes(py, &buf, |bytes| framer.parse(&bytes[start..end], &mut items))?
            .map_err(protocol_error)?;
        let list = PyList::empty(py);
        for item in &items {
            list.append(item_tuple(py, item, payload(py, &buf, start, item)?)?)?;
        }
        Ok((start + parsed.consumed, list, parsed.want))
    }

    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::type_complexity)]
    fn parse_native<'py>(
        slf: &Bound<'py, Self>,
        buf: PyBuffer<u8>,
        start: usize,
        end: usize,
        owner: Bound<'py, PyAny>,
        plane: Option<&Bound<'py, ReadPlane>>,
        mut slots: Vec<usize>,
        now: f64,
        max_reads: usize,
        max_bytes: u64,
        writes: Option<&Bound<'py, WritePlane>>,
    ) -> PyResult<(
        usize,
        Bound<'py, PyList>,
        usize,
        usize,
        u64,
        Vec<usize>,
        usize,
        Vec<bool>,
    )> {
        let py = slf.py();
        if start > end || end > buf.item_count() {
            return Err(PyValueError::new_err(format!(
                "bytes [{start}, {end}) lie outside the buffer of {}",
                buf.item_count()
            )));
        }
        let mut items = Vec::new();
        let parsed = {
            let mut me = slf.borrow_mut();
            let framer = &mut me.framer;
            foreign::with_bytes(py, &buf, |bytes| framer.parse(&bytes[start..end], &mut items))?
                .map_err(protocol_error)?
        };
        let session = slf.clone().unbind();
        let owner = owner.unbind();
        let mut used = vec![0usize; slots.len()];
        let mut engines: Vec<Option<Py<NbdClientEngine>>> = (0..slots.len()).map(|_| None).collect();
        let (mut started, mut bytes, mut answered) = (0usize, 0u64, 0usize);
        let mut in_order = true; // no request handed to Python yet
        let mut reads_only = true; // none but plain READs handed to Python yet
        let list = PyList::empty(py);
        for item in &items {
            let h = &item.head;
            let plain = item.refusal.is_none() && item.piece.is_none();
            // A READ after READs Python serves may still start here: reads commute. Not
            // after anything else (a WRITE Python serves takes its range later: a READ of
            // it started here first would not see it, where the guest sent it before).
            if let (true, Some(plane)) = (plain && reads_only && h.typ == CMD_READ, plane) {
                if started < max_reads && bytes + u64::from(item.length) <= max_bytes {
                    let seq = {
                        let mut me = slf.borrow_mut();
                        me.next_seq += 1;
                        me.next_seq
                    };
                    let begun = read_plane::start(
                        plane,
                        &session,
                        &owner,
                        seq,
                        h.cookie,
                        item.offset,
                        item.length,
                        &mut slots,
                        now,
                    );
                    let took = match begun {
                        Some(Begun::Sent(i, engine, engine_cookie)) => {
                            if engines[i].is_none() {
                                engines[i] = Some(engine.clone_ref(py));
                            }
                            slf.borrow_mut().running.insert(seq, (engine, engine_cookie));
                            used[i] += 1;
                            true
                        }
                        Some(Begun::Answered) => {
                            answered += 1; // its reply is in the output
                            true
                        }
                        None => false,
                    };
                    if took {
                        started += 1;
                        bytes += u64::from(item.length);
                        continue;
                    }
                }
            }
            if let (true, Some(writes), Payload::Inline(range)) = (
                plain && in_order && h.typ == CMD_WRITE && h.flags & FLAG_FUA == 0,
                writes,
                &item.payload,
            ) {
                let (from, to) = (start + range.start, start + range.end);
                let fill =
                    |out: &mut [u8]| foreign::with_bytes(py, &buf, |bytes| out.copy_from_slice(&bytes[from..to]));
                // An error leaves nothing done: the request goes to Python, which meets it again.
                if let Ok(true) = writes.borrow_mut().try_take(py, item.offset, to - from, fill) {
                    let mut me = slf.borrow_mut();
                    let structured = me.structured;
                    nbd_server::frame_reply(&mut me.out, structured, h.cookie, 0, "", None);
                    answered += 1;
                    continue;
                }
            }
            in_order = false;
            reads_only &= plain && h.typ == CMD_READ;
            list.append(item_tuple(py, item, payload(py, &buf, start, item)?)?)?;
        }
        // The batch's READs on each connection leave now, in one writev: a batch received is
        // all there is to send for it (no Python call to send it at the end of the turn).
        let sent = engines
            .iter()
            .map(|engine| {
                engine
                    .as_ref()
                    .is_some_and(|e| e.bind(py).try_borrow_mut().is_ok_and(|mut e| e.send_now()))
            })
            .collect();
        Ok((
            start + parsed.consumed,
            list,
            parsed.want,
            started,
            bytes,
            used,
            answered,
            sent,
        ))
    }

    /// cancel_reads() -> (reads, their bytes): the native reads still running are given up
    /// (the guest went away): their holds are released now, their replies dropped.
    fn cancel_reads(&mut self, py: Python<'_>) -> PyResult<(usize, u64)> {
        let mut finished = Finished::default();
        let (mut count, mut bytes) = (0usize, 0u64);
        for (_, (engine, cookie)) in std::mem::take(&mut self.running) {
            if let Ok(mut engine) = engine.bind(py).try_borrow_mut() {
                if let Some(length) = engine.abandon_native(py, cookie, &mut finished) {
                    count += 1;
                    bytes += u64::from(length);
                }
            }
        }
        finished.wake(py)?;
        Ok((count, bytes))
    }

    /// take_output() -> (buffers to write, reads ended, their bytes): the framed replies
    /// of native reads since the last call.
    fn take_output<'py>(&mut self, py: Python<'py>) -> PyResult<(Bound<'py, PyList>, usize, u64)> {
        self.settle_queued = false; // a reply from now on needs a settle of its own
        let out = PyList::new(py, self.parts.drain(..))?;
        if !self.out.is_empty() {
            out.append(self.cut(py))?;
        }
        let ended = (self.ended, self.ended_bytes);
        self.ended = 0;
        self.ended_bytes = 0;
        Ok((out, ended.0, ended.1))
    }

    /// payload_received(data) -> item: the buffer asked for by `want` is full; `data` is it.
    fn payload_received<'py>(&mut self, py: Python<'py>, data: Bound<'py, PyAny>) -> PyResult<Bound<'py, PyTuple>> {
        let item = self.framer.payload_received().map_err(protocol_error)?;
        item_tuple(py, &item, data)
    }

    /// frame(replies) -> buffers: replies are (cookie, error, message, offset, data)
    /// tuples, data None but for a successful READ's, or an int for the header of a READ
    /// reply of that many bytes which the caller sends itself; returns the buffers to
    /// write, in order.
    fn frame<'py>(&self, py: Python<'py>, replies: &Bound<'py, PyList>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        let mut run: Vec<u8> = Vec::with_capacity(replies.len() * 32);
        for reply in replies.iter() {
            let (cookie, error, message, offset, data): (u64, u32, Bound<'py, PyAny>, u64, Bound<'py, PyAny>) =
                reply.extract()?;
            let message = if error != 0 && self.structured {
                message.str()?.to_string_lossy().into_owned()
            } else {
                String::new()
            };
            if error != 0 || data.is_none() {
                nbd_server::frame_reply(&mut run, self.structured, cookie, error, &message, None);
                continue;
            }
            if let Ok(len) = data.extract::<u32>() {
                // Data the caller sends itself (a file range): the header only.
                nbd_server::frame_reply(&mut run, self.structured, cookie, 0, "", Some((offset, len)));
                continue;
            }
            let payload = PyBuffer::<u8>::get(&data)?;
            let len = payload.item_count();
            let Ok(length) = u32::try_from(len) else {
                return Err(PyValueError::new_err(format!(
                    "read data of {len} bytes is too long for one reply"
                )));
            };
            nbd_server::frame_reply(&mut run, self.structured, cookie, 0, "", Some((offset, length)));
            if len <= COPY_MAX {
                let at = run.len();
                run.resize(at + len, 0);
                payload.copy_to_slice(py, &mut run[at..])?;
            } else if len > 0 {
                out.append(PyBytes::new(py, &run))?;
                run.clear();
                out.append(data)?;
            }
        }
        if !run.is_empty() {
            out.append(PyBytes::new(py, &run))?;
        }
        Ok(out)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyNbdServerSession>()?;
    Ok(())
}
