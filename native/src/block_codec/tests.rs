//! Unit tests of the block codec. Known answers come from Python's `cryptography`
//! (an independent AES-GCM and HKDF); the rest are the codec's refusals.

use super::*;
use ring::digest::{digest, SHA256};

const KEY_ID: u64 = 0x0102_0304_0506_0708;

fn data_key() -> [u8; 32] {
    std::array::from_fn(|i| i as u8)
}

fn disk_id() -> [u8; 16] {
    std::array::from_fn(|i| 100 + i as u8)
}

fn plain(n: usize) -> Vec<u8> {
    (0..n * BLOCK_SIZE).map(|i| (i % 251) as u8).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn codec(key_id: u64) -> BlockCodec {
    BlockCodec::new(&data_key(), &disk_id(), key_id).unwrap()
}

fn sealed(c: &BlockCodec, first_block: u64, first_version: u64, n: usize) -> (Vec<u8>, Vec<u8>) {
    let mut data = plain(n);
    let mut leaves = vec![0u8; n * LEAF_SIZE];
    c.seal_in_place(first_block, first_version, &mut data, &mut leaves)
        .unwrap();
    (data, leaves)
}

#[test]
fn block_key_matches_an_independent_hkdf() {
    assert_eq!(
        hex(&block_key(&data_key(), &disk_id(), KEY_ID)),
        "669afd7e0b8ac1b41a9a7dcd6f6d80fc7e5803bb5485738175802ee6b1f4a078"
    );
    assert_eq!(block_key(&data_key(), &disk_id(), 0), data_key());
}

#[test]
fn sealed_block_matches_an_independent_aes_gcm() {
    for (key_id, ct_sha, tag) in [
        (
            KEY_ID,
            "1e33963039f2b7d0222117e6176bc93fa448ba29fa4b952e7523dece1fe8c1a5",
            "beb7a8312b0a959ca4d5bb1907df5ea3",
        ),
        (
            0,
            "caeb2ca26fcdaed51a779b992be8c2a24f885997e23ba204cb555cf1a7577f59",
            "eff378670f53c37a0712ad5169a4de04",
        ),
    ] {
        let (ct, leaf) = sealed(&codec(key_id), 5, 7, 1);
        assert_eq!(hex(digest(&SHA256, &ct).as_ref()), ct_sha);
        assert_eq!(leaf_fields(&leaf), (7, key_id));
        assert_eq!(hex(&leaf[8..24]), tag);
    }
}

#[test]
fn runs_round_trip_with_consecutive_versions() {
    let c = codec(KEY_ID);
    let (mut data, leaves) = sealed(&c, 1000, 40, 9);
    for i in 0..9 {
        assert_eq!(leaf_fields(&leaves[i * LEAF_SIZE..]), (40 + i as u64, KEY_ID));
    }
    assert!(c.open_in_place(1000, &mut data, &leaves).unwrap().is_empty());
    assert_eq!(data, plain(9));
}

#[test]
fn blocks_of_other_opens_are_read_with_their_own_key() {
    let (mut data, mut leaves) = sealed(&codec(0), 3, 1, 2);
    let (data2, leaves2) = sealed(&codec(99), 5, 1, 2);
    data.extend_from_slice(&data2);
    leaves.extend_from_slice(&leaves2);
    // blocks 3..7: two written under key id 0, two under 99, read by an open with key id 7
    assert!(codec(7)
        .open_in_place(3, &mut data[..2 * BLOCK_SIZE], &leaves[..2 * LEAF_SIZE])
        .unwrap()
        .is_empty());
    assert!(codec(7)
        .open_in_place(5, &mut data[2 * BLOCK_SIZE..], &leaves[2 * LEAF_SIZE..])
        .unwrap()
        .is_empty());
    assert_eq!(&data[..2 * BLOCK_SIZE], &plain(2)[..]);
    assert_eq!(&data[2 * BLOCK_SIZE..], &plain(2)[..]);
}

#[test]
fn tampering_fails_exactly_the_touched_blocks_and_yields_zeros() {
    let c = codec(KEY_ID);
    let (mut data, mut leaves) = sealed(&c, 0, 1, 6);
    data[BLOCK_SIZE + 17] ^= 1; // ciphertext of block 1
    leaves[3 * LEAF_SIZE + 8] ^= 0x80; // tag of block 3
    leaves[4 * LEAF_SIZE + 7] ^= 1; // version of block 4 (nonce and AAD change)
    leaves[5 * LEAF_SIZE + 31] ^= 1; // key id of block 5 (another key)
    assert_eq!(c.open_in_place(0, &mut data, &leaves).unwrap(), vec![1, 3, 4, 5]);
    let p = plain(6);
    for i in 0..6 {
        let got = &data[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
        if [1, 3, 4, 5].contains(&i) {
            assert!(got.iter().all(|&b| b == 0), "block {i} must read as zeros");
        } else {
            assert_eq!(got, &p[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]);
        }
    }
}

#[test]
fn a_block_moved_replayed_or_from_another_disk_is_refused() {
    let c = codec(KEY_ID);
    let (data, leaves) = sealed(&c, 10, 5, 1);
    let mut moved = data.clone();
    assert_eq!(c.open_in_place(11, &mut moved, &leaves).unwrap(), vec![0]);
    let other_disk = BlockCodec::new(&data_key(), &[0u8; 16], KEY_ID).unwrap();
    let mut spliced = data.clone();
    assert_eq!(other_disk.open_in_place(10, &mut spliced, &leaves).unwrap(), vec![0]);
    let other_key = BlockCodec::new(&[9u8; 32], &disk_id(), KEY_ID).unwrap();
    let mut wrong_key = data.clone();
    assert_eq!(other_key.open_in_place(10, &mut wrong_key, &leaves).unwrap(), vec![0]);
    // an older version's ciphertext under the newer leaf
    let (old, _) = sealed(&c, 10, 4, 1);
    let mut replayed = old.clone();
    assert_eq!(c.open_in_place(10, &mut replayed, &leaves).unwrap(), vec![0]);
}

#[test]
fn unwritten_blocks_read_as_zeros_and_poisoned_ones_fail() {
    let c = codec(KEY_ID);
    let mut data = vec![0xAAu8; 2 * BLOCK_SIZE];
    let mut leaves = vec![0u8; 2 * LEAF_SIZE];
    leaves[LEAF_SIZE..LEAF_SIZE + 8].copy_from_slice(&POISON_VERSION.to_be_bytes());
    assert_eq!(c.open_in_place(0, &mut data, &leaves).unwrap(), vec![1]);
    assert!(data.iter().all(|&b| b == 0));
}

#[test]
fn bad_sizes_and_versions_are_refused_before_touching_anything() {
    let c = codec(KEY_ID);
    let mut leaves = [0u8; LEAF_SIZE];
    let mut part = vec![1u8; BLOCK_SIZE - 1];
    assert!(c
        .seal_in_place(0, 1, &mut part, &mut leaves)
        .unwrap_err()
        .0
        .contains("whole number"));
    assert!(c.open_in_place(0, &mut part, &leaves).is_err());
    let mut one = vec![1u8; BLOCK_SIZE];
    assert!(c
        .seal_in_place(0, 1, &mut one, &mut [0u8; 31])
        .unwrap_err()
        .0
        .contains("leaves"));
    assert!(c.open_in_place(0, &mut one, &[0u8; 64]).is_err());
    for version in [0, POISON_VERSION, POISON_VERSION - 1] {
        let mut two = vec![1u8; 2 * BLOCK_SIZE];
        let err = c
            .seal_in_place(0, version, &mut two, &mut [0u8; 2 * LEAF_SIZE])
            .unwrap_err();
        assert!(err.0.contains("outside"), "{err}");
        assert!(two.iter().all(|&b| b == 1), "refused seals leave the data as it was");
    }
    assert!(c
        .seal_in_place(u64::MAX, 1, &mut one, &mut leaves)
        .unwrap_err()
        .0
        .contains("out of range"));
    assert!(BlockCodec::new(&[0u8; 31], &disk_id(), 0).is_err());
    assert!(BlockCodec::new(&data_key(), &[0u8; 15], 0).is_err());
    // an empty run is no error and does nothing
    assert!(c.open_in_place(0, &mut [], &[]).unwrap().is_empty());
}

#[test]
fn the_key_cache_stays_bounded_and_still_serves_every_key() {
    let c = codec(KEY_ID);
    for key_id in 1..(MAX_CACHED_KEYS as u64 + 40) {
        let (mut data, leaves) = sealed(&codec(key_id), 0, 1, 1);
        assert!(c.open_in_place(0, &mut data, &leaves).unwrap().is_empty());
        assert!(c.opening.lock().unwrap().len() <= MAX_CACHED_KEYS);
    }
    let (mut data, leaves) = sealed(&c, 0, 1, 1);
    assert!(c.open_in_place(0, &mut data, &leaves).unwrap().is_empty());
}
