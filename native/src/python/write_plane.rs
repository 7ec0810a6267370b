//! `WritePlane`: the common guest WRITE done natively (issue #13's data plane for writes),
//! for `trustvbd.blocks.crypt_write` and `trustvbd.nbd.connection`.
//!
//! The write it takes is the one answered before its replicas (write_behind.py): whole
//! blocks, no FUA, fewer than `max_blocks`, inside the disk, the range free and its leaf
//! pages resident, versions left in the window Python reserved, and within the bounds
//! Python armed it with for this batch (`arm`: writes behind left, blocks before a commit
//! is due). For such a write, in one step: an exclusive hold of the range (pinning its
//! pages), the old leaves, versions, the plaintext sealed into new ciphertext, the new
//! leaves into the `LeafTable`, and the intent record appended to the batch's records.
//! Anything else is declined with nothing done, and Python serves it the general way.
//!
//! The guest session (`parse_native`) takes each such WRITE of a batch received, in order,
//! and frames its reply; Python serves one received alone through `write` (the same
//! work). Either way Python then collects the batch in one call (`take`): the records go
//! to the intent log (held until the ciphertext leaves), the versions and writer count to
//! the commits, and the writes to the write-behind layer, which releases each hold when
//! the replicas answered.

use std::collections::HashSet;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use super::foreign;
use super::leaf_table::PyLeafTable;
use super::PyBlockCodec;
use crate::block_codec::{BLOCK_SIZE, LEAF_SIZE};
use crate::intent_record;

/// A write taken: (first block, blocks, old leaves, ciphertext, range-lock hold).
type Taken = (u64, u64, Py<PyBytes>, Py<PyBytes>, u64);

/// WritePlane(table, codec, size, max_blocks, dirty_limit)
///
/// One per open disk: its `LeafTable` and `BlockCodec`, the disk's size, the block count
/// from which a write goes the general way, and the dirty leaf pages at which it does
/// too (a commit is then near: `LeafPages.near_dirty_limit`).
#[pyclass(module = "trustvbd._native", name = "WritePlane")]
pub(crate) struct WritePlane {
    table: Py<PyLeafTable>,
    codec: Py<PyBlockCodec>,
    size: u64,
    max_blocks: u64,
    dirty_limit: usize,
    wanted: HashSet<u64>,
    // The bounds of the current batch (`arm`); nothing is taken once `writes_left` is 0.
    writes_left: usize,
    next_version: u64,
    version_high: u64,
    blocks_left: u64,
    // Taken since the last `take`.
    records: Vec<u8>,
    taken: Vec<Taken>,
    blocks: u64,
    started: u64,
}

impl WritePlane {
    /// Takes a write of `length` bytes at `offset` if it is the common one (module doc):
    /// `fill` puts its plaintext into the buffer sealed in place. Ok(false), with nothing
    /// done, for any other; an error leaves nothing done either.
    pub(crate) fn try_take(
        &mut self,
        py: Python<'_>,
        offset: u64,
        length: usize,
        fill: impl FnOnce(&mut [u8]) -> PyResult<()>,
    ) -> PyResult<bool> {
        let bs = BLOCK_SIZE as u64;
        let len = length as u64;
        if self.writes_left == 0 || len == 0 || !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Ok(false);
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Ok(false); // Python says what is wrong
        }
        let (b0, n) = (offset / bs, len / bs);
        if n >= self.max_blocks
            || n >= self.blocks_left
            || self.next_version.checked_add(n).is_none_or(|v| v > self.version_high)
            || (n == 1 && self.wanted.contains(&b0))
        {
            return Ok(false);
        }
        let table = self.table.bind(py);
        let mut t = table.borrow_mut();
        if t.0.dirty_count() + 2 >= self.dirty_limit {
            return Ok(false);
        }
        let Some(hold) = t.0.try_hold(b0, b0 + n, true) else {
            return Ok(false);
        };
        let version = self.next_version;
        let codec = self.codec.get();
        let mut new = vec![0u8; n as usize * LEAF_SIZE];
        let done =
            t.0.get(b0, b0 + n)
                .map_err(|_| PyValueError::new_err("leaf pages not resident"))
                .and_then(|old| {
                    let ct = PyBytes::new_with(py, length, |data| {
                        fill(data)?;
                        codec
                            .0
                            .seal_in_place(b0, version, data, &mut new)
                            .map_err(|e| PyValueError::new_err(e.0))
                    })?;
                    t.0.set(b0, &new)
                        .map_err(|_| PyValueError::new_err("leaf pages not resident"))?;
                    Ok((old, ct))
                });
        let (old, ct) = match done {
            Ok(done) => done,
            Err(err) => {
                let _ = t.0.release(hold); // held just now: nobody waits for it
                return Err(err);
            }
        };
        drop(t);
        self.next_version += n;
        self.writes_left -= 1;
        self.blocks_left -= n;
        self.blocks += n;
        self.started += 1;
        intent_record::encode(&mut self.records, b0, &old, &new);
        self.taken
            .push((b0, n, PyBytes::new(py, &old).unbind(), ct.unbind(), hold));
        Ok(true)
    }
}

#[pymethods]
impl WritePlane {
    #[new]
    fn new(table: Py<PyLeafTable>, codec: Py<PyBlockCodec>, size: u64, max_blocks: u64, dirty_limit: usize) -> Self {
        Self {
            table,
            codec,
            size,
            max_blocks: max_blocks.min(u64::from(crate::nbd_wire::MAX_PAYLOAD) / BLOCK_SIZE as u64),
            dirty_limit,
            wanted: HashSet::new(),
            writes_left: 0,
            next_version: 0,
            version_high: 0,
            blocks_left: 0,
            records: Vec::new(),
            taken: Vec::new(),
            blocks: 0,
            started: 0,
        }
    }

    /// arm(writes, next_version, version_high, blocks): this batch may take up to `writes`
    /// writes, with versions from `next_version` (reserved below `version_high`), of fewer
    /// than `blocks` blocks together. ValueError while writes taken are not collected.
    fn arm(&mut self, writes: usize, next_version: u64, version_high: u64, blocks: u64) -> PyResult<()> {
        if !self.taken.is_empty() {
            return Err(PyValueError::new_err(
                "the writes taken before were not collected (take)",
            ));
        }
        self.writes_left = writes;
        self.next_version = next_version;
        self.version_high = version_high;
        self.blocks_left = blocks;
        Ok(())
    }

    /// set_wanted(blocks): one-block writes to these blocks go the general way (it keeps
    /// their plaintext for a later read-modify-write).
    fn set_wanted(&mut self, blocks: Vec<u64>) {
        self.wanted = blocks.into_iter().collect();
    }

    /// write(offset, data) -> bool: takes this one write if it is the common one.
    fn write(&mut self, py: Python<'_>, offset: u64, data: PyBuffer<u8>) -> PyResult<bool> {
        let length = data.item_count();
        self.try_take(py, offset, length, |out| {
            foreign::with_bytes(py, &data, |bytes| out.copy_from_slice(bytes))
        })
    }

    /// take() -> (records, writes, blocks, next_version): what was taken since the last
    /// call (writes: [(first block, blocks, old leaves, ciphertext, hold)], in order), and the
    /// next version free. Disarms the plane until the next `arm`.
    #[allow(clippy::type_complexity)]
    fn take<'py>(&mut self, py: Python<'py>) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyList>, u64, u64)> {
        let records = PyBytes::new(py, &self.records);
        self.records.clear();
        let writes = PyList::empty(py);
        for (b0, n, old, ct, hold) in self.taken.drain(..) {
            writes.append((b0, n, old, ct, hold))?;
        }
        let blocks = std::mem::take(&mut self.blocks);
        self.writes_left = 0;
        Ok((records, writes, blocks, self.next_version))
    }

    /// Guest WRITEs taken natively so far.
    #[getter]
    fn started(&self) -> u64 {
        self.started
    }
}

/// intent_record(first_block, old, new) -> bytes: the intent log's leaf record of one
/// change of blocks first_block.. from `old` to `new` leaves (as many whole 32-byte leaves
/// each; none for a flush mark), encoded as the write plane encodes its batches
/// (`crate::intent_record`, the one encoder): for `IntentLog.append`.
#[pyfunction(name = "intent_record")]
fn encode_intent_record<'py>(
    py: Python<'py>,
    first_block: u64,
    old: PyBuffer<u8>,
    new: PyBuffer<u8>,
) -> PyResult<Bound<'py, PyBytes>> {
    let (o, n) = (old.item_count(), new.item_count());
    if o != n || !n.is_multiple_of(LEAF_SIZE) || n / LEAF_SIZE > u32::MAX as usize {
        return Err(PyValueError::new_err(format!(
            "an intent record needs as many whole {LEAF_SIZE}-byte leaves before as after; got {o} and {n} bytes"
        )));
    }
    let mut out = Vec::with_capacity(16 + 2 * n + 4);
    let old = old.to_vec(py)?; // one buffer borrowed at a time (foreign::with_bytes)
    foreign::with_bytes(py, &new, |n| intent_record::encode(&mut out, first_block, &old, n))?;
    Ok(PyBytes::new(py, &out))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(pyo3::wrap_pyfunction!(encode_intent_record, m)?)?;
    m.add_class::<WritePlane>()
}
