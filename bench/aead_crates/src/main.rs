//! Per-4 KiB-block cost of AES-256-GCM seal and open in each candidate crate.
//! Prints one line per crate and operation: `crate op ns_per_block`. Best of REPS runs (the machine is shared: the best run is the least disturbed).

use std::hint::black_box;
use std::time::Instant;

const BLOCK: usize = 4096;
const REPS: usize = 25;

fn best_ns(blocks: usize, mut run: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..REPS {
        let start = Instant::now();
        run();
        best = best.min(start.elapsed().as_nanos() as f64 / blocks as f64);
    }
    best
}

fn nonce_of(i: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&(i + 1).to_be_bytes());
    n
}

fn rustcrypto(blocks: usize, key: &[u8; 32], aad: &[u8; 32]) -> (f64, f64) {
    use aes_gcm::aead::{AeadInOut, KeyInit};
    use aes_gcm::{Aes256Gcm, Nonce, Tag};
    let nonce_of = |i: u64| Nonce::<aes_gcm::aead::consts::U12>::from(nonce_of(i));
    let cipher = Aes256Gcm::new_from_slice(key).unwrap();
    let mut buf = vec![7u8; BLOCK];
    let mut tags = vec![Tag::default(); blocks];
    let seal = best_ns(blocks, || {
        for (i, tag) in tags.iter_mut().enumerate() {
            let nonce = nonce_of(i as u64);
            buf.fill(i as u8);
            *tag = cipher
                .encrypt_inout_detached(&nonce, aad, buf.as_mut_slice().into())
                .unwrap();
            black_box(&buf);
        }
    });
    let mut sealed = Vec::with_capacity(blocks);
    for i in 0..blocks.min(64) {
        let mut b = vec![i as u8; BLOCK];
        let t = cipher
            .encrypt_inout_detached(&nonce_of(i as u64), aad, b.as_mut_slice().into())
            .unwrap();
        sealed.push((b, t));
    }
    let open = best_ns(blocks, || {
        for i in 0..blocks {
            let (ct, tag) = &sealed[i % sealed.len()];
            buf.copy_from_slice(ct);
            cipher
                .decrypt_inout_detached(
                    &nonce_of((i % sealed.len()) as u64),
                    aad,
                    buf.as_mut_slice().into(),
                    tag,
                )
                .unwrap();
            black_box(&buf);
        }
    });
    (seal, open)
}

macro_rules! ring_like {
    ($name:ident, $krate:ident, $open:expr) => {
        fn $name(blocks: usize, key: &[u8; 32], aad: &[u8; 32]) -> (f64, f64) {
            use $krate::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
            let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap());
            let mut buf = vec![7u8; BLOCK];
            let seal = best_ns(blocks, || {
                for i in 0..blocks {
                    buf.fill(i as u8);
                    let tag = k
                        .seal_in_place_separate_tag(
                            Nonce::assume_unique_for_key(nonce_of(i as u64)),
                            Aad::from(aad),
                            &mut buf,
                        )
                        .unwrap();
                    black_box((&buf, tag.as_ref()[0]));
                }
            });
            let mut sealed = Vec::new();
            for i in 0..blocks.min(64) {
                let mut b = vec![i as u8; BLOCK];
                let t = k
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce_of(i as u64)),
                        Aad::from(aad),
                        &mut b,
                    )
                    .unwrap();
                let mut tag = [0u8; 16];
                tag.copy_from_slice(t.as_ref());
                sealed.push((b, tag));
            }
            let open = best_ns(blocks, || {
                for i in 0..blocks {
                    let (ct, tag) = &sealed[i % sealed.len()];
                    buf.copy_from_slice(ct);
                    let nonce = Nonce::assume_unique_for_key(nonce_of((i % sealed.len()) as u64));
                    $open(&k, nonce, Aad::from(aad), tag, &mut buf);
                    black_box(&buf);
                }
            });
            (seal, open)
        }
    };
}

ring_like!(ring_crate, ring, |k: &ring::aead::LessSafeKey, n, a, t: &[u8; 16], b: &mut [u8]| {
    k.open_in_place_separate_tag(n, a, ring::aead::Tag::from(*t), b, 0..).unwrap();
});
ring_like!(aws_lc, aws_lc_rs, |k: &aws_lc_rs::aead::LessSafeKey, n, a, t: &[u8; 16], b: &mut [u8]| {
    k.open_in_place_separate_tag(n, a, t, b).unwrap();
});

fn main() {
    let blocks: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(20_000);
    let key = [0x42u8; 32];
    let aad = [0x17u8; 32];
    for (name, f) in [
        ("aes-gcm", rustcrypto as fn(usize, &[u8; 32], &[u8; 32]) -> (f64, f64)),
        ("ring", ring_crate),
        ("aws-lc-rs", aws_lc),
    ] {
        let (seal, open) = f(blocks, &key, &aad);
        println!("{name} seal {seal:.0}");
        println!("{name} open {open:.0}");
    }
}
