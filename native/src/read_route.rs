//! The pure parts of a guest READ served natively (`python::read_plane`): which data
//! blocks a guest's byte range covers, and which replica's connection asks for them.

/// The blocks a guest read of `[offset, offset + length)` covers: `n` blocks from `b0`,
/// the guest's bytes starting `skip` bytes into the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub b0: u64,
    pub n: u64,
    pub skip: usize,
}

/// The span of a read of `length` bytes (more than 0) at `offset`, in blocks of `block`.
pub fn span(offset: u64, length: u32, block: u64) -> Span {
    let b0 = offset / block;
    let end = offset + u64::from(length);
    let b1 = end.div_ceil(block);
    Span {
        b0,
        n: b1 - b0,
        skip: (offset - b0 * block) as usize,
    }
}

/// The connection a read goes to: the one with the fewest requests in flight among those
/// that can take one (`free`), looked at in turn from `turn % k`, so equals share the
/// reads. None when none can take it.
pub fn choose(pending: &[usize], free: &[bool], turn: usize) -> Option<usize> {
    let k = pending.len().min(free.len());
    if k == 0 {
        return None;
    }
    let mut best: Option<usize> = None;
    for step in 0..k {
        let i = (turn + step) % k;
        if free[i] && best.is_none_or(|b| pending[i] < pending[b]) {
            best = Some(i);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_covers_exactly_the_blocks_touched() {
        assert_eq!(span(0, 4096, 4096), Span { b0: 0, n: 1, skip: 0 });
        assert_eq!(span(4096, 8192, 4096), Span { b0: 1, n: 2, skip: 0 });
        assert_eq!(
            span(4095, 2, 4096),
            Span {
                b0: 0,
                n: 2,
                skip: 4095
            }
        );
        assert_eq!(span(10, 1, 4096), Span { b0: 0, n: 1, skip: 10 });
        assert_eq!(span(8192 + 512, 4096, 4096), Span { b0: 2, n: 2, skip: 512 });
    }

    #[test]
    fn the_least_busy_free_connection_is_chosen_in_turn_among_equals() {
        assert_eq!(choose(&[], &[], 0), None);
        assert_eq!(choose(&[0, 0], &[true, true], 0), Some(0));
        assert_eq!(choose(&[0, 0], &[true, true], 1), Some(1));
        assert_eq!(choose(&[3, 1], &[true, true], 0), Some(1));
        assert_eq!(choose(&[3, 1], &[true, false], 1), Some(0));
        assert_eq!(choose(&[0, 0, 0], &[false, false, false], 2), None);
        assert_eq!(choose(&[2, 1, 1], &[true, true, true], 0), Some(1));
        assert_eq!(choose(&[2, 1, 1], &[true, true, true], 2), Some(2));
    }
}
