//! The range lock: requests on overlapping block ranges are ordered; reads share,
//! writes exclude (`trustvbd.blocks.ranges.RangeLock` waits on it in Python).
//!
//! Holds are named by ids. A conflict names the hold to wait for; the caller waits until
//! that hold is released and asks again. Not fair: a stream of overlapping reads can
//! delay a write (NBD clients do not issue those in practice).

use std::collections::HashMap;

/// Exclusive holds of fewer blocks than this are found by block: writes behind hold
/// dozens of one-block ranges while a file is written block by block.
const INDEXED: u64 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hold {
    pub start: u64,
    pub end: u64,
    pub exclusive: bool,
    /// The hold keeps its range's leaf pages in memory (`LeafTable`).
    pub pinned: bool,
    /// Someone waits for its release (`watch`): whoever releases it must wake them.
    pub watched: bool,
}

impl Hold {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
}

#[derive(Default)]
pub struct Ranges {
    holds: HashMap<u64, Hold>,
    // Reads are kept apart from writes: a read only has to look at the writes held, and
    // a sequential reader keeps hundreds of reads in flight.
    reads: Vec<u64>,
    writes: Vec<u64>,            // exclusive holds of INDEXED blocks or more
    small: Vec<u64>,             // exclusive holds of fewer blocks; these never overlap, so:
    by_block: HashMap<u64, u64>, // block -> the small hold holding it
    next_id: u64,
}

impl Ranges {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.holds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.holds.is_empty()
    }

    /// How many shared holds (reads) are held.
    pub fn reads(&self) -> usize {
        self.reads.len()
    }

    pub fn get(&self, id: u64) -> Option<&Hold> {
        self.holds.get(&id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Hold> {
        self.holds.get_mut(&id)
    }

    /// The id of a held range that [start, end) must wait for, if any.
    pub fn conflict(&self, start: u64, end: u64, exclusive: bool) -> Option<u64> {
        let overlapping = |ids: &[u64]| ids.iter().copied().find(|id| self.holds[id].overlaps(start, end));
        if !self.small.is_empty() {
            let found = if end - start <= self.small.len() as u64 {
                (start..end).find_map(|b| self.by_block.get(&b).copied())
            } else {
                overlapping(&self.small)
            };
            if found.is_some() {
                return found;
            }
        }
        if let Some(id) = overlapping(&self.writes) {
            return Some(id);
        }
        if exclusive {
            return overlapping(&self.reads);
        }
        None
    }

    /// Holds [start, end) (the caller saw no conflict); its id.
    pub fn hold(&mut self, start: u64, end: u64, exclusive: bool) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.holds.insert(
            id,
            Hold {
                start,
                end,
                exclusive,
                pinned: false,
                watched: false,
            },
        );
        if !exclusive {
            self.reads.push(id);
        } else if end - start < INDEXED {
            self.small.push(id);
            for b in start..end {
                self.by_block.insert(b, id);
            }
        } else {
            self.writes.push(id);
        }
        id
    }

    /// Someone waits until hold `id` is released (a Python waiter, woken by whoever
    /// releases it: the native read path hands such releases back). False if no such hold.
    pub fn watch(&mut self, id: u64) -> bool {
        self.holds.get_mut(&id).map(|h| h.watched = true).is_some()
    }

    /// Lets go of hold `id`; what it held, None if no such hold.
    pub fn release(&mut self, id: u64) -> Option<Hold> {
        let hold = self.holds.remove(&id)?;
        let drop_id = |ids: &mut Vec<u64>| {
            if let Some(i) = ids.iter().rposition(|x| *x == id) {
                ids.swap_remove(i);
            }
        };
        if !hold.exclusive {
            drop_id(&mut self.reads);
        } else if hold.end - hold.start < INDEXED {
            drop_id(&mut self.small);
            for b in hold.start..hold.end {
                self.by_block.remove(&b);
            }
        } else {
            drop_id(&mut self.writes);
        }
        Some(hold)
    }
}
