//! trustvbd's native data plane (issue #13), first stage: the block codec.
//!
//! `block_codec` is plain Rust with no Python in it (tested by `cargo test`);
//! `python` binds it as the extension module `trustvbd._native`, whose only
//! caller is the Python package `trustvbd.crypt`. `unsafe` is denied everywhere
//! but in `python::foreign`, which says why each use is sound.
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod block_codec;
pub mod nbd_client;
pub mod nbd_wire;
#[cfg(feature = "python")]
mod python;
