//! `ReadPlane`: a guest READ served natively from request to reply (issue #13's data plane
//! for reads), for `trustvbd.blocks.crypt_read` and `trustvbd.nbd.connection`.
//!
//! In the common case (the leaf pages resident, the range free, a current replica's
//! connection that can take a request) a READ parsed by the guest's `NbdServerSession`
//! (`parse_reads`) takes a shared hold and its leaves from the disk's `LeafTable`, is
//! queued on the chosen replica's `NbdClientEngine` with a `NativeRead` as its target,
//! and when the driver's reply is in, the engine opens the ciphertext in place against
//! the leaves, releases the hold and frames the guest's reply into the session's output:
//! no Python in between. Anything else goes up to Python, which serves it the general
//! way (`Why`): a read the plane does not take is an ordinary parsed request; one
//! that fails after it was sent (an error reply, a block that fails verification, a
//! broken or lagging connection) is handed back with why, its hold released.

use std::collections::VecDeque;

use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyByteArrayMethods, PyList, PyTuple};

use super::foreign::{self, LentBuffer};
use super::leaf_table::PyLeafTable;
use super::nbd_client::NbdClientEngine;
use super::nbd_server::PyNbdServerSession;
use super::PyBlockCodec;
use crate::block_codec::BLOCK_SIZE;
use crate::leaf_table::ReadStart;
use crate::nbd_client::ReadTarget;
use crate::read_route::{self, Span};

/// A guest READ in flight on a replica's connection: the engine's read target.
pub(crate) struct NativeRead {
    plane: Py<ReadPlane>,
    session: Py<PyNbdServerSession>,
    owner: Py<PyAny>, // the guest's connection (Python): told of replies and failures
    seq: u64,         // the session's name for it (cancel_reads)
    cookie: u64,
    offset: u64,
    length: u32,
    skip: usize,
    b0: u64,
    hold: u64,
    leaves: Vec<u8>,
    buf: ReadBuf,
    /// Handed to Python already (lagging, or its guest went away): its hold is released,
    /// its reply dropped when it comes.
    pub(crate) taken: bool,
}

/// Where a native read's ciphertext is received and opened. A big one (more than
/// COPY_MAX) goes in a bytearray from the plane's pool, which becomes the guest's reply
/// data as it is: no copy. A small one is copied in among the reply headers anyway.
enum ReadBuf {
    Owned(Vec<u8>),
    Shared(LentBuffer, Py<PyByteArray>),
}

/// Reads longer than this are received into a pooled bytearray (as the server's `frame`
/// sends data longer than its COPY_MAX as a buffer of its own).
const COPY_MAX: usize = 16 * 1024;
/// Bytes of big reads' bytearrays the plane keeps for reuse (as crypt_layer's _REUSE_KEPT).
const POOL_KEPT: usize = 32 * 1024 * 1024;
/// Pooled buffers looked at per read (as ReadBuffers.LOOK_AT).
const LOOK_AT: usize = 32;

impl NativeRead {
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.buf {
            ReadBuf::Owned(bytes) => bytes,
            ReadBuf::Shared(lent, _) => lent.bytes_mut(),
        }
    }

    fn buf_len(&self) -> usize {
        match &self.buf {
            ReadBuf::Owned(bytes) => bytes.len(),
            ReadBuf::Shared(lent, _) => lent.bytes().len(),
        }
    }

    /// The guest's length.
    pub(crate) fn length(&self) -> u32 {
        self.length
    }
}

/// Why a native read goes up to Python.
pub(crate) enum Why {
    /// The driver answered with an NBD error (code, its text).
    Error(u32, String),
    /// These blocks (indices from the first) failed verification.
    Bad(Vec<u32>),
    /// The connection broke before the reply.
    Broken,
    /// No reply for the replica set's `lag` (sent at this loop time): hedged in Python.
    Lagging(f64),
}

/// A native read that goes up to Python, with what Python needs to serve it.
struct Failed {
    owner: Py<PyAny>,
    cookie: u64,
    offset: u64,
    length: u32,
    why: Why,
    replica_offset: u64,
    replica_length: u64,
}

/// What finishing some native reads leaves for Python: the guest connections with
/// replies to write, the reads that failed, and the holds someone waits for.
#[derive(Default)]
pub(crate) struct Finished {
    pub(crate) slots: usize, // requests answered or dropped: their connection slots are free
    owners: Vec<Py<PyAny>>,
    failed: Vec<Failed>,
    wake: Vec<(Py<PyAny>, u64)>,
}

impl Finished {
    pub(crate) fn is_empty(&self) -> bool {
        self.slots == 0 && self.owners.is_empty() && self.failed.is_empty() && self.wake.is_empty()
    }

    /// Nothing but request slots freed: every reply is in its session's output, which
    /// settles itself (`PyNbdServerSession::replied`), and nothing failed or waits.
    pub(crate) fn only_slots(&self) -> bool {
        self.owners.is_empty() && self.failed.is_empty() && self.wake.is_empty()
    }

    /// Releases `read`'s hold (noting a waiter to wake); the read is no longer its
    /// session's to cancel.
    pub(crate) fn release(&mut self, py: Python<'_>, read: &NativeRead) {
        if let Ok(mut session) = read.session.bind(py).try_borrow_mut() {
            session.read_ended(read.seq); // (cancel_reads, which borrows it, drained them)
        }
        let plane = read.plane.bind(py).borrow();
        let watched = plane.table.bind(py).borrow_mut().0.release(read.hold).unwrap_or(false);
        if watched {
            self.wake.push((plane.wake.clone_ref(py), read.hold));
        }
    }

    /// A read that goes up to Python: its hold released, the reason noted.
    pub(crate) fn fail(&mut self, py: Python<'_>, read: &NativeRead, why: Why, replica_offset: u64) {
        self.release(py, read);
        self.failed.push(Failed {
            owner: read.owner.clone_ref(py),
            cookie: read.cookie,
            offset: read.offset,
            length: read.length,
            why,
            replica_offset,
            replica_length: read.buf_len() as u64,
        });
    }

    /// The driver's reply to `read` is in (`error` 0: its ciphertext fills the buffer).
    pub(crate) fn reply(
        &mut self,
        py: Python<'_>,
        mut read: Box<NativeRead>,
        error: u32,
        message: String,
        replica_offset: u64,
    ) {
        self.slots += 1;
        if read.taken {
            return; // handed to Python when it lagged; the hold went with it
        }
        if error != 0 {
            self.fail(py, &read, Why::Error(error, message), replica_offset);
            return;
        }
        let opened = {
            let plane = read.plane.bind(py).borrow();
            let codec = plane.codec.get();
            let (b0, leaves) = (read.b0, std::mem::take(&mut read.leaves));
            let result = codec.0.open_in_place(b0, read.bytes_mut(), &leaves);
            read.leaves = leaves;
            result
        };
        match opened {
            Ok(bad) if bad.is_empty() => {}
            Ok(bad) => {
                self.fail(py, &read, Why::Bad(bad), replica_offset);
                return;
            }
            Err(err) => {
                // Sizes the plane itself chose: a bug, but the read is served the general way.
                self.fail(py, &read, Why::Error(crate::nbd_wire::ERR_EIO, err.0), replica_offset);
                return;
            }
        }
        self.release(py, &read);
        let (skip, length) = (read.skip, read.length as usize);
        let session = read.session.bind(py);
        let settled = match session.try_borrow_mut() {
            Ok(mut s) => {
                match &mut read.buf {
                    ReadBuf::Shared(lent, whole) if skip == 0 && length == lent.bytes().len() => {
                        s.push_read_object(py, read.cookie, read.offset, length, whole.clone_ref(py).into_any())
                    }
                    ReadBuf::Shared(lent, _) => {
                        s.push_read_reply(read.cookie, read.offset, &lent.bytes()[skip..skip + length])
                    }
                    ReadBuf::Owned(bytes) => {
                        s.push_read_owned(read.cookie, read.offset, std::mem::take(bytes), skip, length)
                    }
                }
                s.replied(py)
            }
            Err(_) => {
                // Not reachable (sessions are not borrowed while engines finish reads):
                // the general path serves it rather than losing the reply.
                self.failed.push(Failed {
                    owner: read.owner.clone_ref(py),
                    cookie: read.cookie,
                    offset: read.offset,
                    length: read.length,
                    why: Why::Broken,
                    replica_offset,
                    replica_length: read.buf_len() as u64,
                });
                return;
            }
        };
        if !settled && !self.owners.iter().any(|o| o.is(&read.owner)) {
            self.owners.push(read.owner.clone_ref(py));
        }
    }

    /// Wakes the waiters of the holds released.
    pub(crate) fn wake(&mut self, py: Python<'_>) -> PyResult<()> {
        for (wake, hold) in std::mem::take(&mut self.wake) {
            wake.bind(py).call1((hold,))?;
        }
        Ok(())
    }

    /// What Python gets: (slots freed, owners with replies, failures), after waking the
    /// waiters of released holds.
    pub(crate) fn into_py<'py>(mut self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        self.wake(py)?;
        let owners = PyList::new(py, self.owners.iter().map(|o| o.bind(py)))?;
        let failed = PyList::empty(py);
        for f in self.failed {
            let (kind, detail): (u8, Bound<'py, PyAny>) = match f.why {
                Why::Error(code, text) => (0, (code, text).into_pyobject(py)?.into_any()),
                Why::Bad(bad) => (1, bad.into_pyobject(py)?.into_any()),
                Why::Broken => (2, py.None().into_bound(py)),
                Why::Lagging(sent) => (3, sent.into_pyobject(py)?.into_any()),
            };
            let item = (
                f.owner,
                f.cookie,
                f.offset,
                f.length,
                kind,
                detail,
                f.replica_offset,
                f.replica_length,
            );
            failed.append(item.into_pyobject(py)?)?;
        }
        (self.slots, owners, failed).into_pyobject(py)
    }
}

/// ReadPlane(table, codec, wake, data_start, size, max_blocks, high_water)
///
/// One per open disk: its `LeafTable`, its `BlockCodec`, `wake(hold)` (called for a hold
/// a Python waiter waits for, when a native read releases it), where data block 0 starts
/// on a replica, the disk's size, the longest read taken (in blocks), and how many bytes
/// may wait in a connection's output before it takes no more reads.
/// set_links(engines): the connections of the current replicas, in the set's order.
#[pyclass(module = "trustvbd._native", name = "ReadPlane")]
pub(crate) struct ReadPlane {
    table: Py<PyLeafTable>,
    codec: Py<PyBlockCodec>,
    wake: Py<PyAny>,
    data_start: u64,
    size: u64,
    max_blocks: u64,
    high_water: usize,
    links: Vec<Py<NbdClientEngine>>,
    turn: usize,
    started: u64,
    zeros: u64,
    pool: VecDeque<Py<PyByteArray>>,
    pooled: usize, // bytes in `pool`
}

impl ReadPlane {
    /// A bytearray of `size` bytes for a big read: a pooled one that nothing but the pool
    /// refers to any more (its last reply has left), else a new one (pooled while the
    /// pool holds less than POOL_KEPT).
    fn buffer<'py>(&mut self, py: Python<'py>, size: usize) -> Bound<'py, PyByteArray> {
        for _ in 0..self.pool.len().min(LOOK_AT) {
            let Some(buf) = self.pool.pop_front() else { break };
            let free = foreign::refcount(buf.bind(py).as_any()) == 1 && buf.bind(py).len() == size;
            let out = free.then(|| buf.clone_ref(py));
            self.pool.push_back(buf);
            if let Some(out) = out {
                return out.into_bound(py);
            }
        }
        let fresh = PyByteArray::new_with(py, size, |_| Ok(())).expect("a bytearray of a read's size");
        if self.pooled + size <= POOL_KEPT {
            self.pool.push_back(fresh.clone().unbind());
            self.pooled += size;
        }
        fresh
    }
}

#[pymethods]
impl ReadPlane {
    #[new]
    fn new(
        table: Py<PyLeafTable>,
        codec: Py<PyBlockCodec>,
        wake: Py<PyAny>,
        data_start: u64,
        size: u64,
        max_blocks: u64,
        high_water: usize,
    ) -> Self {
        Self {
            table,
            codec,
            wake,
            data_start,
            size,
            max_blocks: max_blocks.min(u64::from(crate::nbd_wire::MAX_PAYLOAD) / BLOCK_SIZE as u64),
            high_water,
            links: Vec::new(),
            turn: 0,
            started: 0,
            zeros: 0,
            pool: VecDeque::new(),
            pooled: 0,
        }
    }

    fn set_links(&mut self, links: Vec<Py<NbdClientEngine>>) {
        self.links = links;
    }

    /// How many connections reads may go to.
    #[getter]
    fn links(&self) -> usize {
        self.links.len()
    }

    /// Guest READs started natively so far.
    #[getter]
    fn started(&self) -> u64 {
        self.started
    }

    /// Guest READs answered natively with zeros (every leaf zero: no replica asked).
    #[getter]
    fn zeros(&self) -> u64 {
        self.zeros
    }

    /// The connection the next read goes to first, among equally busy ones (tests).
    fn set_turn(&mut self, turn: usize) {
        self.turn = turn;
    }
}

/// A guest READ the plane took (`start`).
pub(crate) enum Begun {
    /// Sent: the connection's index, the engine and its request's cookie.
    Sent(usize, Py<NbdClientEngine>, u64),
    /// Answered already: every leaf of its blocks is zero (never written, or zeroed), so
    /// its reply (zeros) is in the session's output, and no replica was asked.
    Answered,
}

/// Zeros for the reply of a small READ of blocks never written.
static ZEROS: [u8; COPY_MAX] = [0; COPY_MAX];

/// Starts a guest READ natively if it can, or None (nothing held or queued: Python
/// serves it). `seq`: the session's name for it. `slots[i]`: requests connection i may
/// still take in this batch (one is used).
#[allow(clippy::too_many_arguments)]
pub(crate) fn start(
    plane: &Bound<'_, ReadPlane>,
    session: &Py<PyNbdServerSession>,
    owner: &Py<PyAny>,
    seq: u64,
    cookie: u64,
    offset: u64,
    length: u32,
    slots: &mut [usize],
    now: f64,
) -> Option<Begun> {
    let py = plane.py();
    let mut me = plane.borrow_mut();
    if length == 0 || offset.checked_add(u64::from(length)).is_none_or(|end| end > me.size) {
        return None;
    }
    let Span { b0, n, skip } = read_route::span(offset, length, BLOCK_SIZE as u64);
    if n > me.max_blocks || me.links.len() != slots.len() {
        return None;
    }
    let (hold, leaves) = match me.table.bind(py).borrow_mut().0.read_start(b0, b0 + n) {
        ReadStart::Read(hold, leaves) => (hold, leaves),
        ReadStart::Busy => return None,
        ReadStart::Zero => {
            // As the general path answers it (crypt_read.read_verified): zeros, no driver.
            let mut s = session.bind(py).try_borrow_mut().ok()?; // (not borrowed here)
            let len = length as usize;
            if len <= COPY_MAX {
                s.push_read_reply(cookie, offset, &ZEROS[..len]);
            } else {
                let zeros = PyByteArray::new_with(py, len, |_| Ok(())).ok()?; // zeroed
                s.push_read_object(py, cookie, offset, len, zeros.into_any().unbind());
            }
            me.zeros += 1;
            return Some(Begun::Answered);
        }
    };
    let mut pending = Vec::with_capacity(slots.len());
    let mut free = Vec::with_capacity(slots.len());
    for (link, &slot) in me.links.iter().zip(slots.iter()) {
        match link.bind(py).try_borrow() {
            Ok(engine) => {
                pending.push(engine.pending_requests());
                free.push(slot > 0 && engine.takes_native(me.high_water, (n as usize) * BLOCK_SIZE));
            }
            Err(_) => {
                pending.push(usize::MAX);
                free.push(false);
            }
        }
    }
    let Some(i) = read_route::choose(&pending, &free, me.turn) else {
        let _ = me.table.bind(py).borrow_mut().0.release(hold); // taken just now: nobody waits
        return None;
    };
    let size = (n as usize) * BLOCK_SIZE;
    let buf = if size > COPY_MAX {
        let array = me.buffer(py, size);
        match LentBuffer::new(array.as_any(), true) {
            Ok(lent) => ReadBuf::Shared(lent, array.unbind()),
            Err(_) => ReadBuf::Owned(vec![0u8; size]), // not reached: a bytearray is writable
        }
    } else {
        match session.bind(py).try_borrow_mut() {
            Ok(mut s) => ReadBuf::Owned(s.spare_buffer(size)),
            Err(_) => ReadBuf::Owned(vec![0u8; size]), // not reached: parse_native lets go of it
        }
    };
    me.turn = me.turn.wrapping_add(1);
    me.started += 1;
    let read = Box::new(NativeRead {
        plane: plane.clone().unbind(),
        session: session.clone_ref(py),
        owner: owner.clone_ref(py),
        seq,
        cookie,
        offset,
        length,
        skip,
        b0,
        hold,
        leaves,
        buf,
        taken: false,
    });
    let replica_offset = me.data_start + b0 * BLOCK_SIZE as u64;
    let link = me.links[i].clone_ref(py);
    let table = me.table.clone_ref(py);
    drop(me);
    let queued = link.bind(py).borrow_mut().queue_native(replica_offset, read, now);
    let Ok(engine_cookie) = queued else {
        // Not reachable (takes_native said it would take it): nothing is left held.
        let _ = table.bind(py).borrow_mut().0.release(hold);
        return None;
    };
    slots[i] -= 1;
    Some(Begun::Sent(i, link, engine_cookie))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ReadPlane>()
}
