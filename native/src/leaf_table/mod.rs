//! The leaf table of an open disk in memory (docs/format.md 1.1: 32-byte leaves, 128 to
//! a 4 KiB page), with the range lock whose holds keep their pages resident.
//!
//! `trustvbd.blocks.leaf_pages` loads pages from the replicas, checks them against the
//! trusted tree and commits them; this is where they live between: clean pages in LRU
//! order (evicted beyond `capacity` unless pinned), changed ("dirty") pages until a
//! commit has written them. The data path and the control plane read the same pages.

mod ranges;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};

pub use ranges::{Hold, Ranges};

pub const LEAF_SIZE: usize = 32;
pub const PAGE_SIZE: usize = 4096;
pub const LEAVES_PER_PAGE: u64 = (PAGE_SIZE / LEAF_SIZE) as u64;
/// A leaf with this version marks a block whose authentic leaf was lost.
pub const POISON_VERSION: u64 = u64::MAX;

#[derive(Debug, PartialEq, Eq)]
pub enum TableError {
    /// A page the call needs is not in memory (a caller's bug: it holds them first).
    NotResident(u64),
    /// Leaves that are not whole 32-byte leaves, or a page that is not 4096 bytes.
    Size(&'static str),
    /// No hold with this id.
    NoHold(u64),
}

struct Page {
    data: Box<[u8]>,
    dirty: bool,
    stamp: u64, // its place in the LRU order while clean
}

/// Pages of the blocks [b0, b1).
pub fn pages_of(b0: u64, b1: u64) -> std::ops::Range<u64> {
    if b1 <= b0 {
        return b0 / LEAVES_PER_PAGE..b0 / LEAVES_PER_PAGE;
    }
    b0 / LEAVES_PER_PAGE..(b1 - 1) / LEAVES_PER_PAGE + 1
}

/// What a read of a range can do now (`LeafTable::read_start`).
#[derive(Debug, PartialEq, Eq)]
pub enum ReadStart {
    /// A shared hold of the range (its pages pinned) and its leaves: read it from a replica.
    Read(u64, Vec<u8>),
    /// Every leaf is zero (never written, or zeroed): the read is zeros. Nothing is held.
    Zero,
    /// Held exclusively, or a page not resident: not now. Nothing is held.
    Busy,
}

/// Resident leaf pages, their pins, and the range lock over the blocks they describe.
pub struct LeafTable {
    capacity: usize,
    pages: HashMap<u64, Page>,
    lru: BTreeMap<u64, u64>, // stamp -> clean page, oldest first
    next_stamp: u64,
    dirty: usize,
    pins: HashMap<u64, u32>,
    changes: HashMap<u64, u64>, // per dirty page: changes since it was clean
    pub evictions: u64,
    pub locks: Ranges,
}

impl LeafTable {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(2),
            pages: HashMap::new(),
            lru: BTreeMap::new(),
            next_stamp: 0,
            dirty: 0,
            pins: HashMap::new(),
            changes: HashMap::new(),
            evictions: 0,
            locks: Ranges::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn resident(&self) -> usize {
        self.pages.len()
    }

    pub fn dirty_count(&self) -> usize {
        self.dirty
    }

    pub fn contains(&self, p: u64) -> bool {
        self.pages.contains_key(&p)
    }

    /// Resident pages in [p0, p1), in order.
    pub fn resident_in(&self, p0: u64, p1: u64) -> Vec<u64> {
        let mut out: Vec<u64> = self.pages.keys().copied().filter(|p| (p0..p1).contains(p)).collect();
        out.sort_unstable();
        out
    }

    fn stamp(&mut self) -> u64 {
        self.next_stamp += 1;
        self.next_stamp
    }

    /// Moves a clean page to the young end of the LRU order.
    fn touch(&mut self, p: u64) {
        let stamp = self.stamp();
        if let Some(page) = self.pages.get_mut(&p) {
            if !page.dirty {
                self.lru.remove(&page.stamp);
                page.stamp = stamp;
                self.lru.insert(stamp, p);
            }
        }
    }

    fn page(&self, p: u64) -> Result<&[u8], TableError> {
        self.pages
            .get(&p)
            .map(|page| &page.data[..])
            .ok_or(TableError::NotResident(p))
    }

    /// A page read (checked by the caller) or recovered: kept unless one is resident
    /// already (false then). Clean pages may push older ones out.
    pub fn insert(&mut self, p: u64, data: &[u8], dirty: bool) -> Result<bool, TableError> {
        if data.len() != PAGE_SIZE {
            return Err(TableError::Size("a leaf page is 4096 bytes"));
        }
        if self.pages.contains_key(&p) {
            return Ok(false);
        }
        self.put(p, data, dirty)?;
        if !dirty {
            self.evict();
        }
        Ok(true)
    }

    /// Page p is `data` now, replacing what was resident.
    pub fn put(&mut self, p: u64, data: &[u8], dirty: bool) -> Result<(), TableError> {
        if data.len() != PAGE_SIZE {
            return Err(TableError::Size("a leaf page is 4096 bytes"));
        }
        self.remove(p);
        let stamp = self.stamp();
        if dirty {
            self.dirty += 1;
        } else {
            self.lru.insert(stamp, p);
        }
        self.pages.insert(
            p,
            Page {
                data: data.into(),
                dirty,
                stamp,
            },
        );
        Ok(())
    }

    fn remove(&mut self, p: u64) {
        if let Some(old) = self.pages.remove(&p) {
            if old.dirty {
                self.dirty -= 1;
            } else {
                self.lru.remove(&old.stamp);
            }
        }
    }

    /// Pins every page of [b0, b1) if all are resident (true), else pins none.
    pub fn pin_resident(&mut self, b0: u64, b1: u64) -> bool {
        let pages = pages_of(b0, b1);
        if !pages.clone().all(|p| self.pages.contains_key(&p)) {
            return false;
        }
        for p in pages {
            self.touch(p);
            *self.pins.entry(p).or_insert(0) += 1;
        }
        true
    }

    /// Pins page p (resident; the caller loaded it).
    pub fn pin(&mut self, p: u64) -> Result<(), TableError> {
        if !self.pages.contains_key(&p) {
            return Err(TableError::NotResident(p));
        }
        self.touch(p);
        *self.pins.entry(p).or_insert(0) += 1;
        Ok(())
    }

    /// Unpins pages (each once), then evicts what is over capacity.
    pub fn unpin(&mut self, pages: impl IntoIterator<Item = u64>) {
        for p in pages {
            if let Some(n) = self.pins.get_mut(&p) {
                *n -= 1;
                if *n == 0 {
                    self.pins.remove(&p);
                }
            }
        }
        self.evict();
    }

    /// Evicts the oldest unpinned clean pages while more than `capacity` are resident.
    fn evict(&mut self) {
        let mut over = self.pages.len().saturating_sub(self.capacity);
        let mut tries = self.lru.len();
        while over > 0 && tries > 0 {
            tries -= 1;
            let Some((&stamp, &p)) = self.lru.iter().next() else {
                break;
            };
            self.lru.remove(&stamp);
            if self.pins.contains_key(&p) {
                let stamp = self.stamp();
                self.lru.insert(stamp, p);
                if let Some(page) = self.pages.get_mut(&p) {
                    page.stamp = stamp;
                }
                continue;
            }
            self.pages.remove(&p);
            self.evictions += 1;
            over -= 1;
        }
    }

    /// The leaves of blocks [b0, b1), copied into `out` (their pages resident).
    pub fn get_into(&self, b0: u64, b1: u64, out: &mut [u8]) -> Result<(), TableError> {
        let mut b = b0;
        while b < b1 {
            let p = b / LEAVES_PER_PAGE;
            let end = b1.min((p + 1) * LEAVES_PER_PAGE);
            let lo = ((b - p * LEAVES_PER_PAGE) as usize) * LEAF_SIZE;
            let len = ((end - b) as usize) * LEAF_SIZE;
            let at = ((b - b0) as usize) * LEAF_SIZE;
            out[at..at + len].copy_from_slice(&self.page(p)?[lo..lo + len]);
            b = end;
        }
        Ok(())
    }

    pub fn get(&self, b0: u64, b1: u64) -> Result<Vec<u8>, TableError> {
        let mut out = vec![0; (b1.saturating_sub(b0) as usize) * LEAF_SIZE];
        self.get_into(b0, b1, &mut out)?;
        Ok(out)
    }

    /// Changes the leaves from block b0 on; their pages stay in memory until committed.
    pub fn set(&mut self, b0: u64, leaves: &[u8]) -> Result<(), TableError> {
        if !leaves.len().is_multiple_of(LEAF_SIZE) {
            return Err(TableError::Size("leaves come in whole 32-byte leaves"));
        }
        let b1 = b0 + (leaves.len() / LEAF_SIZE) as u64;
        for p in pages_of(b0, b1) {
            self.page(p)?; // all resident, or nothing changes
        }
        let mut b = b0;
        while b < b1 {
            let p = b / LEAVES_PER_PAGE;
            let end = b1.min((p + 1) * LEAVES_PER_PAGE);
            let page = self.pages.get_mut(&p).ok_or(TableError::NotResident(p))?;
            if !page.dirty {
                page.dirty = true;
                self.lru.remove(&page.stamp);
                self.dirty += 1;
            }
            *self.changes.entry(p).or_insert(0) += 1;
            let lo = ((b - p * LEAVES_PER_PAGE) as usize) * LEAF_SIZE;
            let len = ((end - b) as usize) * LEAF_SIZE;
            let at = ((b - b0) as usize) * LEAF_SIZE;
            page.data[lo..lo + len].copy_from_slice(&leaves[at..at + len]);
            b = end;
        }
        Ok(())
    }

    /// Whether every leaf of [b0, b1) is all zeros (never written, or zeroed).
    pub fn all_zero(&self, b0: u64, b1: u64) -> Result<bool, TableError> {
        let mut b = b0;
        while b < b1 {
            let p = b / LEAVES_PER_PAGE;
            let end = b1.min((p + 1) * LEAVES_PER_PAGE);
            let lo = ((b - p * LEAVES_PER_PAGE) as usize) * LEAF_SIZE;
            let hi = lo + ((end - b) as usize) * LEAF_SIZE;
            if self.page(p)?[lo..hi].iter().any(|x| *x != 0) {
                return Ok(false);
            }
            b = end;
        }
        Ok(true)
    }

    /// Whether block b has ciphertext (a version neither 0 nor poison); None if its
    /// page is not resident.
    pub fn written(&self, b: u64) -> Option<bool> {
        let p = b / LEAVES_PER_PAGE;
        let page = self.pages.get(&p)?;
        let lo = ((b % LEAVES_PER_PAGE) as usize) * LEAF_SIZE;
        let mut version = [0u8; 8];
        version.copy_from_slice(&page.data[lo..lo + 8]);
        let v = u64::from_be_bytes(version);
        Some(v != 0 && v != POISON_VERSION)
    }

    /// Whether a resident page of [p0, p1) holds a leaf that is not all zeros.
    pub fn any_nonzero_in(&self, p0: u64, p1: u64) -> bool {
        let zero = |page: &Page| page.data.iter().all(|x| *x == 0);
        if p1.saturating_sub(p0) <= self.pages.len() as u64 {
            (p0..p1).any(|p| self.pages.get(&p).is_some_and(|page| !zero(page)))
        } else {
            self.pages.iter().any(|(p, page)| (p0..p1).contains(p) && !zero(page))
        }
    }

    /// A copy of page p.
    pub fn page_copy(&self, p: u64) -> Result<Vec<u8>, TableError> {
        Ok(self.page(p)?.to_vec())
    }

    /// The dirty pages in order, each with its change count (for `committed`).
    pub fn dirty_pages(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = self
            .pages
            .iter()
            .filter(|(_, page)| page.dirty)
            .map(|(p, _)| (*p, self.changes.get(p).copied().unwrap_or(0)))
            .collect();
        out.sort_unstable();
        out
    }

    /// These pages, as `dirty_pages` gave them, are on the replicas and in the tree now:
    /// clean again (evictable), unless changed since; those stay for the next commit.
    pub fn committed(&mut self, pages: &[(u64, u64)]) {
        for &(p, changes) in pages {
            if self.changes.get(&p).copied().unwrap_or(0) != changes {
                continue;
            }
            self.changes.remove(&p);
            let stamp = self.stamp();
            if let Some(page) = self.pages.get_mut(&p) {
                if page.dirty {
                    page.dirty = false;
                    page.stamp = stamp;
                    self.dirty -= 1;
                    self.lru.insert(stamp, p);
                }
            }
        }
        self.evict();
    }

    // ---------------------------------------------------------------- the range lock

    /// Holds [b0, b1) and pins its pages, if nothing conflicts and its pages are resident.
    pub fn try_hold(&mut self, b0: u64, b1: u64, exclusive: bool) -> Option<u64> {
        if self.locks.conflict(b0, b1, exclusive).is_some() || !self.pin_resident(b0, b1) {
            return None;
        }
        let id = self.locks.hold(b0, b1, exclusive);
        if let Some(hold) = self.locks.get_mut(id) {
            hold.pinned = true;
        }
        Some(id)
    }

    /// A read's hold and leaves in one step: None if `try_hold` fails or every leaf is
    /// zero (nothing to read from a replica; nothing stays held then).
    pub fn try_read(&mut self, b0: u64, b1: u64) -> Option<(u64, Vec<u8>)> {
        match self.read_start(b0, b1) {
            ReadStart::Read(id, leaves) => Some((id, leaves)),
            ReadStart::Zero | ReadStart::Busy => None,
        }
    }

    /// What a read of blocks [b0, b1) can do now (`ReadStart`), in one step.
    pub fn read_start(&mut self, b0: u64, b1: u64) -> ReadStart {
        let Some(id) = self.try_hold(b0, b1, false) else {
            return ReadStart::Busy;
        };
        let start = match self.get(b0, b1) {
            Ok(leaves) if leaves.iter().any(|x| *x != 0) => return ReadStart::Read(id, leaves),
            Ok(_) => ReadStart::Zero,
            Err(_) => ReadStart::Busy,
        };
        let _ = self.release(id); // taken just now: nobody waits for it
        start
    }

    /// The hold `id` keeps its pages now (pinned one by one by the caller).
    pub fn mark_pinned(&mut self, id: u64) -> Result<(), TableError> {
        self.locks.get_mut(id).ok_or(TableError::NoHold(id))?.pinned = true;
        Ok(())
    }

    /// Lets go of hold `id` and of its pages' pins; whether someone waits for it (`watch`).
    pub fn release(&mut self, id: u64) -> Result<bool, TableError> {
        let hold = self.locks.release(id).ok_or(TableError::NoHold(id))?;
        if hold.pinned {
            self.unpin(pages_of(hold.start, hold.end));
        }
        Ok(hold.watched)
    }
}
