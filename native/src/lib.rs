//! trustvbd's native data plane (issue #13): the block codec, and NBD's transmission
//! phase for the client and the server.
//!
//! `block_codec`, `nbd_client`, `nbd_server` and `nbd_wire` are plain Rust with no
//! Python in them (tested by `cargo test`); `python` binds them as the extension module
//! `trustvbd._native`, called by `trustvbd.crypt` and `trustvbd.nbd`. `unsafe` is
//! denied everywhere but in `python::foreign`, which says why each use is sound.
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod block_codec;
pub mod intent_record;
pub mod leaf_table;
pub mod nbd_client;
#[cfg(test)]
mod nbd_cores_agree;
pub mod nbd_server;
pub mod nbd_wire;
#[cfg(feature = "python")]
mod python;
pub mod read_route;
