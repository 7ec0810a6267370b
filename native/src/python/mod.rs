//! The extension module `trustvbd._native`: the block codec for Python.
//!
//! `seal` and `open` return new `bytes` objects filled while the GIL is released:
//! nobody else can reach an object under construction, so no Python buffer is
//! touched without the GIL. Their inputs are copied once, with the GIL held, into
//! that output (the codec works in place). `open_in_place` saves that copy: it
//! decrypts the caller's own writable buffer, holding the GIL (`foreign`, the one
//! module with `unsafe`).

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::block_codec::{self, CodecError};

mod file_serve;
mod foreign;
mod leaf_table;
mod log_sync;
mod nbd_client;
mod nbd_server;
mod read_plane;
mod spin;
mod write_plane;

fn value_error(err: CodecError) -> PyErr {
    PyValueError::new_err(err.0)
}

/// AES-256-GCM for the 4 KiB blocks of one disk (docs/format.md, section "blocks").
///
/// BlockCodec(data_key: 32 bytes, disk_id: 16 bytes, key_id: int) seals under key_id
/// and opens blocks of any key id. Both calls release the GIL while they work.
#[pyclass(frozen, module = "trustvbd._native", name = "BlockCodec")]
pub(crate) struct PyBlockCodec(pub(crate) block_codec::BlockCodec);

#[pymethods]
impl PyBlockCodec {
    #[new]
    fn new(data_key: &[u8], disk_id: &[u8], key_id: u64) -> PyResult<Self> {
        block_codec::BlockCodec::new(data_key, disk_id, key_id)
            .map(Self)
            .map_err(value_error)
    }

    #[getter]
    fn key_id(&self) -> u64 {
        self.0.key_id()
    }

    /// seal(first_block, first_version, plain) -> (ciphertext, leaves)
    ///
    /// Seals n = len(plain)/4096 whole blocks under versions first_version.. .
    fn seal<'py>(
        &self,
        py: Python<'py>,
        first_block: u64,
        first_version: u64,
        plain: PyBuffer<u8>,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let len = plain.item_count();
        let leaves_len = len / block_codec::BLOCK_SIZE * block_codec::LEAF_SIZE;
        // The plaintext copied into the new object (no zero fill first), sealed there.
        // (`plain` is released once copied: the caller may resize its buffer while we work.)
        let (ciphertext, leaves) = foreign::bytes_copied_then(py, plain, |data| {
            PyBytes::new_with(py, leaves_len, |leaves| {
                py.detach(|| self.0.seal_in_place(first_block, first_version, data, leaves))
                    .map_err(value_error)
            })
        })?;
        Ok((ciphertext, leaves?))
    }

    /// open(first_block, ciphertext, leaves) -> (plaintext, bad block indices)
    ///
    /// Opens n = len(ciphertext)/4096 blocks against n leaves; failed blocks read as zeros.
    fn open<'py>(
        &self,
        py: Python<'py>,
        first_block: u64,
        ciphertext: PyBuffer<u8>,
        leaves: PyBuffer<u8>,
    ) -> PyResult<(Bound<'py, PyBytes>, Vec<u32>)> {
        let leaf_bytes = leaves.to_vec(py)?;
        drop(leaves);
        let mut bad = Vec::new();
        let plain = PyBytes::new_with(py, ciphertext.item_count(), |data| {
            ciphertext.copy_to_slice(py, data)?;
            drop(ciphertext); // the caller may resize its buffer while we work
            bad = py
                .detach(|| self.0.open_in_place(first_block, data, &leaf_bytes))
                .map_err(value_error)?;
            Ok(())
        })?;
        Ok((plain, bad))
    }

    /// open_in_place(first_block, data, leaves) -> bad block indices
    ///
    /// As `open`, but decrypts `data` (a writable, contiguous buffer of n whole blocks
    /// of ciphertext) where it is, holding the GIL. Failed blocks are left as zeros,
    /// never partly decrypted; on a refused request (sizes) `data` is untouched.
    fn open_in_place(
        &self,
        py: Python<'_>,
        first_block: u64,
        data: PyBuffer<u8>,
        leaves: PyBuffer<u8>,
    ) -> PyResult<Vec<u32>> {
        // Copied first: `leaves` may even be a view of `data`, which is borrowed mutably below.
        let leaf_bytes = leaves.to_vec(py)?;
        drop(leaves);
        foreign::with_bytes_mut(py, &data, |bytes| self.0.open_in_place(first_block, bytes, &leaf_bytes))?
            .map_err(value_error)
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyBlockCodec>()?;
    m.add("BLOCK_SIZE", block_codec::BLOCK_SIZE)?;
    m.add("LEAF_SIZE", block_codec::LEAF_SIZE)?;
    leaf_table::register(m)?;
    log_sync::register(m)?;
    nbd_client::register(m)?;
    nbd_server::register(m)?;
    m.add_function(pyo3::wrap_pyfunction!(file_serve::serve_file, m)?)?;
    read_plane::register(m)?;
    write_plane::register(m)?;
    spin::register(m)?;
    Ok(())
}
