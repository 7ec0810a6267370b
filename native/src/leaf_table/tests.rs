use super::*;

fn page(fill: u8) -> Vec<u8> {
    vec![fill; PAGE_SIZE]
}

fn leaf(version: u64) -> Vec<u8> {
    let mut l = vec![0u8; LEAF_SIZE];
    l[..8].copy_from_slice(&version.to_be_bytes());
    l[8] = 0xAB;
    l
}

#[test]
fn reads_share_writes_exclude() {
    let mut r = Ranges::new();
    let a = r.hold(0, 4, false);
    assert_eq!(r.reads(), 1);
    assert_eq!(r.conflict(2, 3, false), None);
    assert_eq!(r.conflict(3, 5, true), Some(a));
    assert_eq!(r.conflict(4, 9, true), None); // half-open
    let w = r.hold(10, 11, true); // small: found by block
    assert_eq!(r.conflict(10, 11, false), Some(w));
    assert_eq!(r.conflict(0, 100, false), Some(w)); // wider than the small holds: scanned
    let big = r.hold(100, 200, true);
    assert_eq!(r.conflict(150, 151, false), Some(big));
    assert_eq!(r.release(w).map(|h| h.exclusive), Some(true));
    assert_eq!(r.conflict(10, 11, true), None);
    assert_eq!(r.release(w), None); // twice: no such hold
    r.release(big);
    r.release(a);
    assert!(r.is_empty());
}

#[test]
fn holds_pin_resident_pages_only() {
    let mut t = LeafTable::new(2);
    assert_eq!(t.try_hold(0, 1, false), None); // page 0 not in memory
    assert!(t.insert(0, &page(0), false).unwrap());
    assert!(!t.insert(0, &page(1), false).unwrap()); // resident already: kept as it is
    let id = t.try_hold(0, 1, false).unwrap();
    // two more clean pages: over capacity, but page 0 is pinned
    t.insert(1, &page(0), false).unwrap();
    t.insert(2, &page(0), false).unwrap();
    assert!(t.contains(0));
    assert_eq!(t.resident(), 2);
    t.release(id).unwrap();
    assert_eq!(t.release(id), Err(TableError::NoHold(id)));
    // page 1 went for page 2; pinned page 0 went to the young end then, so page 2 goes
    t.insert(3, &page(0), false).unwrap();
    assert!(t.contains(0) && !t.contains(1) && !t.contains(2) && t.contains(3));
    assert_eq!(t.evictions, 2);
}

#[test]
fn a_write_conflicts_with_a_read_and_a_read_of_zeros_is_not_held() {
    let mut t = LeafTable::new(8);
    t.insert(0, &page(0), false).unwrap();
    assert_eq!(t.try_read(0, 2), None); // all-zero leaves: nothing held
    assert!(t.locks.is_empty());
    t.set(1, &leaf(7)).unwrap();
    let (id, leaves) = t.try_read(0, 2).unwrap();
    assert_eq!(&leaves[..LEAF_SIZE], &[0u8; LEAF_SIZE]);
    assert_eq!(&leaves[LEAF_SIZE..], &leaf(7)[..]);
    assert_eq!(t.try_hold(1, 2, true), None);
    t.release(id).unwrap();
    assert!(t.try_hold(1, 2, true).is_some());
}

#[test]
fn a_read_start_says_zeros_busy_or_read_and_holds_only_a_read() {
    let mut t = LeafTable::new(8);
    t.insert(0, &page(0), false).unwrap();
    assert_eq!(t.read_start(0, 2), ReadStart::Zero); // never written: zeros, nothing held
    assert!(t.locks.is_empty());
    assert_eq!(t.read_start(127, 129), ReadStart::Busy); // page 1 not resident
    assert!(t.locks.is_empty());
    let w = t.try_hold(0, 1, true).unwrap();
    assert_eq!(t.read_start(0, 2), ReadStart::Busy); // a write holds block 0: not even zeros
    t.release(w).unwrap();
    t.set(1, &leaf(7)).unwrap();
    let ReadStart::Read(id, leaves) = t.read_start(0, 2) else {
        panic!("a read of written blocks")
    };
    assert_eq!(&leaves[LEAF_SIZE..], &leaf(7)[..]);
    assert_eq!(t.try_hold(1, 2, true), None);
    t.release(id).unwrap();
    assert!(t.locks.is_empty());
}

#[test]
fn dirty_pages_stay_until_committed_unless_changed_since() {
    let mut t = LeafTable::new(2);
    t.insert(0, &page(0), false).unwrap();
    t.set(130 - 128, &leaf(1)).unwrap();
    assert_eq!(t.set(128, &leaf(1)), Err(TableError::NotResident(1)));
    assert_eq!(t.dirty_count(), 1);
    let snapshot = t.dirty_pages();
    assert_eq!(snapshot, vec![(0, 1)]);
    for p in 1..5 {
        t.insert(p, &page(0), false).unwrap();
    }
    assert!(t.contains(0), "dirty pages are never evicted");
    t.set(3, &leaf(2)).unwrap(); // changed during the commit
    t.committed(&snapshot);
    assert_eq!(t.dirty_pages(), vec![(0, 2)]);
    t.committed(&t.dirty_pages());
    assert_eq!(t.dirty_count(), 0);
    assert!(t.resident() <= 2);
}

#[test]
fn leaves_across_pages() {
    let mut t = LeafTable::new(4);
    t.insert(0, &page(0), false).unwrap();
    t.insert(1, &page(0), false).unwrap();
    let mut leaves = leaf(5);
    leaves.extend(leaf(POISON_VERSION));
    t.set(127, &leaves).unwrap();
    assert_eq!(t.get(127, 129).unwrap(), leaves);
    assert_eq!(t.written(127), Some(true));
    assert_eq!(t.written(128), Some(false)); // poisoned: no ciphertext to trust
    assert_eq!(t.written(129), Some(false));
    assert_eq!(t.written(1000), None);
    assert!(!t.all_zero(126, 128).unwrap());
    assert!(t.all_zero(129, 256).unwrap());
    assert_eq!(t.all_zero(200, 300), Err(TableError::NotResident(2)));
    assert!(t.any_nonzero_in(0, 1));
    assert!(!t.any_nonzero_in(2, 1 << 40));
    assert_eq!(t.resident_in(1, 9), vec![1]);
    assert_eq!(t.dirty_pages(), vec![(0, 1), (1, 1)]);
}

#[test]
fn sizes_are_checked() {
    let mut t = LeafTable::new(4);
    assert!(matches!(t.insert(0, &[0; 100], false), Err(TableError::Size(_))));
    t.insert(0, &page(0), false).unwrap();
    assert!(matches!(t.set(0, &[1; 33]), Err(TableError::Size(_))));
    assert!(t.all_zero(0, 128).unwrap(), "a refused set changes nothing");
}

#[test]
fn a_release_says_whether_someone_waits_for_the_hold() {
    let mut t = LeafTable::new(8);
    t.insert(0, &page(0), false).unwrap();
    t.set(0, &leaf(3)).unwrap();
    let (quiet, _) = t.try_read(0, 1).unwrap();
    let (waited, _) = t.try_read(0, 1).unwrap();
    assert!(t.locks.watch(waited));
    assert!(!t.locks.watch(999)); // no such hold
    assert_eq!(t.release(quiet), Ok(false));
    assert_eq!(t.release(waited), Ok(true));
}
