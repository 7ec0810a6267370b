//! A leaf record of the intent log (docs/format.md 2.4): its only encoder. The native write
//! plane builds the records of a batch of writes with it, `IntentLog.append` one record
//! (through `trustvbd._native.intent_record`), and the intent log writes them
//! (`IntentLog.append_encoded`); `IntentLog.read` decodes them at open.
//!
//! `"IREC"`, the block count (u32), the first block (u64), the old leaves, the new
//! leaves, then a CRC-32 (zlib's) of all of that, big-endian throughout.

pub const MAGIC: &[u8; 4] = b"IREC";
pub const LEAF_SIZE: usize = 32;

/// zlib's CRC-32 (IEEE 802.3, reflected) of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// Appends the record of a change of blocks first_block.. from `old` to `new` leaves
/// (the same number of whole leaves) to `out`.
pub fn encode(out: &mut Vec<u8>, first_block: u64, old: &[u8], new: &[u8]) {
    debug_assert_eq!(old.len(), new.len());
    debug_assert_eq!(new.len() % LEAF_SIZE, 0);
    let at = out.len();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&((new.len() / LEAF_SIZE) as u32).to_be_bytes());
    out.extend_from_slice(&first_block.to_be_bytes());
    out.extend_from_slice(old);
    out.extend_from_slice(new);
    let crc = crc32(&out[at..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_zlibs() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b"The quick brown fox jumps over the lazy dog"), 0x414F_A339);
    }

    #[test]
    fn crc32_of_long_inputs_is_the_bitwise_one() {
        // Every length and tail up to 300 bytes: the crate's wide path starts at 64.
        let data: Vec<u8> = (0..300u32).map(|i| (i * 151 + 7) as u8).collect();
        for n in 0..=data.len() {
            let mut c = !0u32;
            for &b in &data[..n] {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                }
            }
            assert_eq!(crc32(&data[..n]), !c, "length {n}");
        }
    }

    #[test]
    fn a_record_is_laid_out_as_the_log_reads_it() {
        let (old, new) = ([1u8; 64], [2u8; 64]);
        let mut out = vec![9u8]; // appended after what is there
        encode(&mut out, 0x0102_0304_0506_0708, &old, &new);
        assert_eq!(out[0], 9);
        let rec = &out[1..];
        assert_eq!(rec.len(), 16 + 128 + 4);
        assert_eq!(&rec[..4], b"IREC");
        assert_eq!(&rec[4..8], &2u32.to_be_bytes());
        assert_eq!(&rec[8..16], &0x0102_0304_0506_0708u64.to_be_bytes());
        assert_eq!(&rec[16..80], &old);
        assert_eq!(&rec[80..144], &new);
        assert_eq!(&rec[144..], &crc32(&rec[..144]).to_be_bytes());
    }
}
