//! `LeafTable` and `RangeTable`: the leaf table's pages and the range lock
//! (`crate::leaf_table`) for `trustvbd.blocks.leaf_pages` and `trustvbd.blocks.ranges`,
//! which load pages, check them and wait for holds in Python.
//!
//! Holds are ints. Errors: KeyError for a page not in memory or a hold not held (the
//! caller's bug), ValueError for sizes.

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::leaf_table::{self, Ranges, TableError, LEAF_SIZE};

fn table_error(err: TableError) -> PyErr {
    match err {
        TableError::NotResident(p) => PyKeyError::new_err(format!(
            "leaf page {p} is not in memory; hold its blocks (LeafPages.hold) before using them"
        )),
        TableError::Size(what) => PyValueError::new_err(what),
        TableError::NoHold(id) => PyKeyError::new_err(format!("no range lock hold {id} is held")),
    }
}

fn check_range(start: u64, end: u64) -> PyResult<()> {
    if end < start {
        return Err(PyValueError::new_err(format!(
            "block range [{start}, {end}) ends before it starts"
        )));
    }
    Ok(())
}

/// RangeTable(): the range lock alone (ReplicaSet without an encryption layer).
///
/// conflict(start, end, exclusive) -> the hold to wait for, or None; hold(...) -> a new
/// hold (after no conflict); try_hold(...) -> a hold or None; release(hold).
#[pyclass(module = "trustvbd._native", name = "RangeTable")]
struct PyRangeTable(Ranges);

#[pymethods]
impl PyRangeTable {
    #[new]
    fn new() -> Self {
        Self(Ranges::new())
    }

    fn __len__(&self) -> usize {
        self.0.len()
    }

    #[getter]
    fn reads_held(&self) -> usize {
        self.0.reads()
    }

    fn conflict(&self, start: u64, end: u64, exclusive: bool) -> PyResult<Option<u64>> {
        check_range(start, end)?;
        Ok(self.0.conflict(start, end, exclusive))
    }

    fn hold(&mut self, start: u64, end: u64, exclusive: bool) -> PyResult<u64> {
        check_range(start, end)?;
        Ok(self.0.hold(start, end, exclusive))
    }

    fn try_hold(&mut self, start: u64, end: u64, exclusive: bool) -> PyResult<Option<u64>> {
        check_range(start, end)?;
        Ok(match self.0.conflict(start, end, exclusive) {
            Some(_) => None,
            None => Some(self.0.hold(start, end, exclusive)),
        })
    }

    fn release(&mut self, hold: u64) -> PyResult<()> {
        self.0
            .release(hold)
            .map(|_| ())
            .ok_or_else(|| table_error(TableError::NoHold(hold)))
    }

    /// release_all(holds): `release` of each (writes behind that ended together); every
    /// hold held is released, then the first not held is the error.
    fn release_all(&mut self, holds: Vec<u64>) -> PyResult<()> {
        let mut missing = None;
        for hold in holds {
            if self.0.release(hold).is_none() {
                missing = missing.or(Some(hold));
            }
        }
        missing.map_or(Ok(()), |hold| Err(table_error(TableError::NoHold(hold))))
    }

    /// watch(hold): a waiter waits for its release (see LeafTable.watch).
    fn watch(&mut self, hold: u64) -> PyResult<()> {
        if self.0.watch(hold) {
            Ok(())
        } else {
            Err(table_error(TableError::NoHold(hold)))
        }
    }
}

/// LeafTable(capacity): resident leaf pages (4096 bytes each) and the range lock whose
/// holds pin them. As RangeTable, except that try_hold also needs the range's pages
/// resident and pins them, and release unpins a hold's pages (try_hold's, or after
/// mark_pinned). try_read(b0, b1) -> (hold, leaves) or None: a shared try_hold and get
/// in one call, None (nothing held) also when every leaf is zero.
#[pyclass(module = "trustvbd._native", name = "LeafTable")]
pub(crate) struct PyLeafTable(pub(crate) leaf_table::LeafTable);

fn leaf_bytes<'py>(py: Python<'py>, t: &leaf_table::LeafTable, b0: u64, b1: u64) -> PyResult<Bound<'py, PyBytes>> {
    check_range(b0, b1)?;
    PyBytes::new_with(py, ((b1 - b0) as usize) * LEAF_SIZE, |out| {
        t.get_into(b0, b1, out).map_err(table_error)
    })
}

#[pymethods]
impl PyLeafTable {
    #[new]
    fn new(capacity: usize) -> Self {
        Self(leaf_table::LeafTable::new(capacity))
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.0.capacity()
    }

    #[getter]
    fn resident(&self) -> usize {
        self.0.resident()
    }

    #[getter]
    fn dirty_count(&self) -> usize {
        self.0.dirty_count()
    }

    #[getter]
    fn evictions(&self) -> u64 {
        self.0.evictions
    }

    #[getter]
    fn holds(&self) -> usize {
        self.0.locks.len()
    }

    #[getter]
    fn reads_held(&self) -> usize {
        self.0.locks.reads()
    }

    fn contains(&self, p: u64) -> bool {
        self.0.contains(p)
    }

    fn resident_in(&self, p0: u64, p1: u64) -> Vec<u64> {
        self.0.resident_in(p0, p1)
    }

    /// insert(p, page, dirty) -> False if page p was resident already (kept as it was).
    fn insert(&mut self, py: Python<'_>, p: u64, page: PyBuffer<u8>, dirty: bool) -> PyResult<bool> {
        let data = page.to_vec(py)?;
        self.0.insert(p, &data, dirty).map_err(table_error)
    }

    /// put(p, page, dirty): page p is this now, whatever was resident.
    fn put(&mut self, py: Python<'_>, p: u64, page: PyBuffer<u8>, dirty: bool) -> PyResult<()> {
        let data = page.to_vec(py)?;
        self.0.put(p, &data, dirty).map_err(table_error)
    }

    fn pin(&mut self, p: u64) -> PyResult<()> {
        self.0.pin(p).map_err(table_error)
    }

    fn unpin(&mut self, pages: Vec<u64>) {
        self.0.unpin(pages);
    }

    fn get<'py>(&self, py: Python<'py>, b0: u64, b1: u64) -> PyResult<Bound<'py, PyBytes>> {
        leaf_bytes(py, &self.0, b0, b1)
    }

    fn leaf<'py>(&self, py: Python<'py>, b: u64) -> PyResult<Bound<'py, PyBytes>> {
        leaf_bytes(py, &self.0, b, b + 1)
    }

    fn set(&mut self, py: Python<'_>, b0: u64, leaves: PyBuffer<u8>) -> PyResult<()> {
        let data = leaves.to_vec(py)?;
        self.0.set(b0, &data).map_err(table_error)
    }

    fn all_zero(&self, b0: u64, b1: u64) -> PyResult<bool> {
        check_range(b0, b1)?;
        self.0.all_zero(b0, b1).map_err(table_error)
    }

    fn written(&self, b: u64) -> Option<bool> {
        self.0.written(b)
    }

    fn any_nonzero_in(&self, p0: u64, p1: u64) -> bool {
        self.0.any_nonzero_in(p0, p1)
    }

    fn page<'py>(&self, py: Python<'py>, p: u64) -> PyResult<Bound<'py, PyBytes>> {
        let data = self.0.page_copy(p).map_err(table_error)?;
        Ok(PyBytes::new(py, &data))
    }

    fn dirty_pages(&self) -> Vec<(u64, u64)> {
        self.0.dirty_pages()
    }

    fn committed(&mut self, pages: Vec<(u64, u64)>) {
        self.0.committed(&pages);
    }

    fn conflict(&self, start: u64, end: u64, exclusive: bool) -> PyResult<Option<u64>> {
        check_range(start, end)?;
        Ok(self.0.locks.conflict(start, end, exclusive))
    }

    fn hold(&mut self, start: u64, end: u64, exclusive: bool) -> PyResult<u64> {
        check_range(start, end)?;
        Ok(self.0.locks.hold(start, end, exclusive))
    }

    fn try_hold(&mut self, start: u64, end: u64, exclusive: bool) -> PyResult<Option<u64>> {
        check_range(start, end)?;
        Ok(self.0.try_hold(start, end, exclusive))
    }

    fn try_read<'py>(&mut self, py: Python<'py>, b0: u64, b1: u64) -> PyResult<Option<(u64, Bound<'py, PyBytes>)>> {
        check_range(b0, b1)?;
        Ok(self
            .0
            .try_read(b0, b1)
            .map(|(id, leaves)| (id, PyBytes::new(py, &leaves))))
    }

    fn mark_pinned(&mut self, hold: u64) -> PyResult<()> {
        self.0.mark_pinned(hold).map_err(table_error)
    }

    fn release(&mut self, hold: u64) -> PyResult<()> {
        self.0.release(hold).map(|_| ()).map_err(table_error)
    }

    /// release_all(holds): `release` of each (writes behind that ended together); every
    /// hold held is released, then the first that failed is the error.
    fn release_all(&mut self, holds: Vec<u64>) -> PyResult<()> {
        let mut first = Ok(());
        for hold in holds {
            if let Err(e) = self.0.release(hold) {
                first = first.and(Err(e));
            }
        }
        first.map_err(table_error)
    }

    /// watch(hold): a waiter waits for its release. A release by the native read path
    /// (ReadPlane) then calls the plane's `wake(hold)`, as RangeLock.release does itself.
    fn watch(&mut self, hold: u64) -> PyResult<()> {
        if self.0.locks.watch(hold) {
            Ok(())
        } else {
            Err(table_error(TableError::NoHold(hold)))
        }
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRangeTable>()?;
    m.add_class::<PyLeafTable>()?;
    Ok(())
}
