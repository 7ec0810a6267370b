//! AES-256-GCM over 4 KiB blocks in the on-replica format of docs/format.md.
//!
//! A block is sealed under (disk, block number, version): nonce = version u64 BE
//! || 00000000, AAD = disk id (16) || block u64 BE || version u64 BE. Its *leaf*
//! (32 bytes) = version u64 BE || GCM tag (16) || key id u64 BE is what the leaf
//! table keeps; the replica holds the ciphertext alone. Version 0 is a block never
//! written (reads as zeros), version u64::MAX a block whose leaf was lost (reads
//! fail). The key of key id k is HKDF-SHA-256(data key, info = context || disk id
//! || k BE) with no salt; key id 0 is the data key itself (disks from before key ids).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use ring::hkdf;

pub const BLOCK_SIZE: usize = 4096;
pub const TAG_SIZE: usize = 16;
pub const LEAF_SIZE: usize = 32;
pub const POISON_VERSION: u64 = u64::MAX;
const KEY_CONTEXT: &[u8] = b"trustvbd-block-key-v1\x00";
/// Keys of past opens kept for reading their blocks; beyond this the cache starts over.
const MAX_CACHED_KEYS: usize = 256;

/// A request the codec refuses: its message says what was wrong (sizes, versions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError(pub String);

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CodecError {}

fn refuse<T>(msg: String) -> Result<T, CodecError> {
    Err(CodecError(msg))
}

/// The AES-256 key of blocks written under `key_id`.
pub fn block_key(data_key: &[u8; 32], disk_id: &[u8; 16], key_id: u64) -> [u8; 32] {
    if key_id == 0 {
        return *data_key;
    }
    let id = key_id.to_be_bytes();
    let info: [&[u8]; 3] = [KEY_CONTEXT, disk_id, &id];
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(data_key);
    let mut key = [0u8; 32];
    prk.expand(&info, hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut key))
        .expect("32 bytes is a valid HKDF-SHA-256 output length");
    key
}

fn aead_key(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("AES-256 takes a 32-byte key"))
}

fn nonce(version: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&version.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// The version and key id fields of one 32-byte leaf.
pub fn leaf_fields(leaf: &[u8]) -> (u64, u64) {
    let word = |at: usize| u64::from_be_bytes(leaf[at..at + 8].try_into().expect("8 bytes"));
    (word(0), word(24))
}

/// Seals and opens the blocks of one disk; seals under one key id (this open's).
pub struct BlockCodec {
    data_key: [u8; 32],
    disk_id: [u8; 16],
    key_id: u64,
    sealing: Arc<LessSafeKey>,
    opening: Mutex<HashMap<u64, Arc<LessSafeKey>>>,
}

impl BlockCodec {
    pub fn new(data_key: &[u8], disk_id: &[u8], key_id: u64) -> Result<Self, CodecError> {
        let (Ok(data_key), Ok(disk_id)) = (<[u8; 32]>::try_from(data_key), <[u8; 16]>::try_from(disk_id)) else {
            return refuse(format!(
                "data key must be 32 bytes and disk id 16 bytes, not {} and {}",
                data_key.len(),
                disk_id.len()
            ));
        };
        let sealing = Arc::new(aead_key(&block_key(&data_key, &disk_id, key_id)));
        let opening = Mutex::new(HashMap::from([(key_id, Arc::clone(&sealing))]));
        Ok(Self {
            data_key,
            disk_id,
            key_id,
            sealing,
            opening,
        })
    }

    pub fn key_id(&self) -> u64 {
        self.key_id
    }

    fn aad(&self, block: u64, version: u64) -> [u8; 32] {
        let mut aad = [0u8; 32];
        aad[..16].copy_from_slice(&self.disk_id);
        aad[16..24].copy_from_slice(&block.to_be_bytes());
        aad[24..].copy_from_slice(&version.to_be_bytes());
        aad
    }

    fn key_for(&self, key_id: u64) -> Arc<LessSafeKey> {
        // A poisoned lock only means another thread panicked while holding it; the map
        // holds finished keys only, so it is still right.
        let mut keys = self.opening.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(key) = keys.get(&key_id) {
            return Arc::clone(key);
        }
        if keys.len() >= MAX_CACHED_KEYS {
            keys.clear();
            keys.insert(self.key_id, Arc::clone(&self.sealing));
        }
        let key = Arc::new(aead_key(&block_key(&self.data_key, &self.disk_id, key_id)));
        keys.insert(key_id, Arc::clone(&key));
        key
    }

    /// Seals `data` (n whole blocks of plaintext) in place under versions
    /// `first_version`.. and writes the n leaves into `leaves`.
    pub fn seal_in_place(
        &self,
        first_block: u64,
        first_version: u64,
        data: &mut [u8],
        leaves: &mut [u8],
    ) -> Result<(), CodecError> {
        let n = check_run(first_block, data.len(), leaves.len())?;
        let last_version = first_version.checked_add(n.saturating_sub(1) as u64);
        if first_version == 0 || last_version.is_none_or(|v| v == POISON_VERSION) {
            return refuse(format!(
                "versions {first_version}..+{n} are outside 1..{POISON_VERSION}: version 0 means \
                 never written and {POISON_VERSION} a lost leaf"
            ));
        }
        let key_id = self.key_id.to_be_bytes();
        for (i, (block, leaf)) in data
            .chunks_exact_mut(BLOCK_SIZE)
            .zip(leaves.chunks_exact_mut(LEAF_SIZE))
            .enumerate()
        {
            let (b, v) = (first_block + i as u64, first_version + i as u64);
            let tag = self
                .sealing
                .seal_in_place_separate_tag(nonce(v), Aad::from(self.aad(b, v)), block)
                .map_err(|_| CodecError(format!("AES-GCM refused to seal block {b}")))?;
            leaf[..8].copy_from_slice(&v.to_be_bytes());
            leaf[8..24].copy_from_slice(tag.as_ref());
            leaf[24..].copy_from_slice(&key_id);
        }
        Ok(())
    }

    /// Opens `data` (n whole blocks of ciphertext) in place, each against its leaf.
    ///
    /// Returns the indices (0-based in the run) of blocks that failed: a wrong tag,
    /// key, block number or version, or a poisoned leaf. Their output is zeros, never
    /// partly decrypted data. A version-0 leaf yields zeros without looking at the
    /// ciphertext (the leaf is authenticated, so a driver can neither forge nor hide it).
    pub fn open_in_place(&self, first_block: u64, data: &mut [u8], leaves: &[u8]) -> Result<Vec<u32>, CodecError> {
        check_run(first_block, data.len(), leaves.len())?;
        let mut bad = Vec::new();
        let mut key = Arc::clone(&self.sealing);
        let mut key_id = self.key_id;
        for (i, (block, leaf)) in data
            .chunks_exact_mut(BLOCK_SIZE)
            .zip(leaves.chunks_exact(LEAF_SIZE))
            .enumerate()
        {
            let (v, kid) = leaf_fields(leaf);
            let ok = match v {
                0 => true,
                POISON_VERSION => false,
                _ => {
                    if kid != key_id {
                        (key, key_id) = (self.key_for(kid), kid);
                    }
                    let b = first_block + i as u64;
                    let tag = Tag::from(<[u8; TAG_SIZE]>::try_from(&leaf[8..24]).expect("16 bytes"));
                    key.open_in_place_separate_tag(nonce(v), Aad::from(self.aad(b, v)), tag, block, 0..)
                        .is_ok()
                }
            };
            if v == 0 || !ok {
                block.fill(0);
            }
            if !ok {
                bad.push(u32::try_from(i).expect("runs are far below 2^32 blocks"));
            }
        }
        Ok(bad)
    }
}

fn whole_blocks(len: usize) -> Result<usize, CodecError> {
    if !len.is_multiple_of(BLOCK_SIZE) {
        return refuse(format!("{len} bytes is not a whole number of {BLOCK_SIZE}-byte blocks"));
    }
    Ok(len / BLOCK_SIZE)
}

/// The number of blocks in a run of `data_len` bytes starting at `first_block`, with
/// `leaves_len` bytes of leaves: whole blocks, one leaf each, block numbers in range.
fn check_run(first_block: u64, data_len: usize, leaves_len: usize) -> Result<usize, CodecError> {
    let n = whole_blocks(data_len)?;
    if leaves_len != n * LEAF_SIZE {
        return refuse(format!(
            "{n} blocks need {} bytes of leaves, not {leaves_len}",
            n * LEAF_SIZE
        ));
    }
    if u32::try_from(n).is_err() || first_block.checked_add(n as u64).is_none() {
        return refuse(format!("blocks {first_block}..+{n} are out of range"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests;
