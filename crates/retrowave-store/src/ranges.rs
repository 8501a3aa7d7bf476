//! A best-fit allocator of contiguous unit ranges (pages of the host arena, blocks of a disk file).
//!
//! Pure bookkeeping: it hands out `[start, start + len)` ranges of units below a limit, coalesces
//! freed neighbours, and never touches memory or files itself.

use std::collections::{BTreeMap, BTreeSet};

/// A contiguous range of units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// First unit.
    pub start: u64,
    /// Number of units.
    pub len: u64,
}

impl Extent {
    /// One past the last unit.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Best-fit range allocator over `[0, limit)`.
#[derive(Debug, Clone)]
pub struct RangeAllocator {
    limit: u64,
    /// Everything at or above `high` has never been handed out.
    high: u64,
    /// Free ranges below `high`, by start.
    by_start: BTreeMap<u64, u64>,
    /// The same ranges by (len, start), for best fit.
    by_len: BTreeSet<(u64, u64)>,
    used: u64,
}

impl RangeAllocator {
    /// An allocator of `limit` units, all free.
    pub fn new(limit: u64) -> Self {
        RangeAllocator {
            limit,
            high: 0,
            by_start: BTreeMap::new(),
            by_len: BTreeSet::new(),
            used: 0,
        }
    }

    /// Total units.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Units handed out and not freed.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Units free (possibly fragmented).
    pub fn free(&self) -> u64 {
        self.limit - self.used
    }

    /// The highest unit ever handed out, plus one (the size a backing file has grown to).
    pub fn high_water(&self) -> u64 {
        self.high
    }

    /// A free range of `len` units (`len > 0`), or `None` when no contiguous range is free.
    pub fn alloc(&mut self, len: u64) -> Option<Extent> {
        if len == 0 {
            return None;
        }
        if let Some(&(flen, start)) = self.by_len.range((len, 0)..).next() {
            self.by_len.remove(&(flen, start));
            self.by_start.remove(&start);
            if flen > len {
                self.insert_free(start + len, flen - len);
            }
            self.used += len;
            return Some(Extent { start, len });
        }
        if self.limit - self.high >= len {
            let start = self.high;
            self.high += len;
            self.used += len;
            return Some(Extent { start, len });
        }
        // The tail below `high` may be free and join the untouched space.
        if let Some((&start, &flen)) = self.by_start.iter().next_back()
            && start + flen == self.high
            && self.limit - start >= len
        {
            self.by_start.remove(&start);
            self.by_len.remove(&(flen, start));
            self.high = start + len;
            self.used += len;
            return Some(Extent { start, len });
        }
        None
    }

    /// Returns a range handed out by [`alloc`](Self::alloc).
    ///
    /// # Panics
    /// In debug builds, when the range overlaps free space (a double free).
    pub fn dealloc(&mut self, extent: Extent) {
        if extent.len == 0 {
            return;
        }
        debug_assert!(
            extent.end() <= self.high,
            "extent beyond the high-water mark"
        );
        debug_assert!(
            self.by_start
                .range(..extent.end())
                .next_back()
                .is_none_or(|(&s, &l)| s + l <= extent.start),
            "double free of {extent:?}"
        );
        self.used -= extent.len;
        let (mut start, mut len) = (extent.start, extent.len);
        if let Some((&ps, &pl)) = self.by_start.range(..start).next_back()
            && ps + pl == start
        {
            self.by_start.remove(&ps);
            self.by_len.remove(&(pl, ps));
            start = ps;
            len += pl;
        }
        if let Some(&nl) = self.by_start.get(&(start + len)) {
            self.by_start.remove(&(start + len));
            self.by_len.remove(&(nl, start + len));
            len += nl;
        }
        if start + len == self.high {
            self.high = start;
        } else {
            self.insert_free(start, len);
        }
    }

    fn insert_free(&mut self, start: u64, len: u64) {
        self.by_start.insert(start, len);
        self.by_len.insert((len, start));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fills_frees_and_coalesces() {
        let mut a = RangeAllocator::new(10);
        let x = a.alloc(4).unwrap();
        let y = a.alloc(4).unwrap();
        assert_eq!((x.start, y.start), (0, 4));
        assert!(a.alloc(3).is_none());
        let z = a.alloc(2).unwrap();
        assert_eq!(a.free(), 0);
        a.dealloc(x);
        a.dealloc(y);
        // x and y coalesce into one range of 8.
        assert_eq!(a.alloc(8), Some(Extent { start: 0, len: 8 }));
        a.dealloc(Extent { start: 0, len: 8 });
        a.dealloc(z);
        assert_eq!(a.high_water(), 0);
        assert_eq!(a.alloc(10), Some(Extent { start: 0, len: 10 }));
    }

    #[test]
    fn best_fit_prefers_the_smallest_hole() {
        let mut a = RangeAllocator::new(100);
        let e: Vec<_> = (0..6).map(|_| a.alloc(5).unwrap()).collect();
        a.dealloc(e[1]); // hole of 5 at 5
        a.dealloc(e[3]);
        a.dealloc(e[4]); // hole of 10 at 15
        assert_eq!(a.alloc(4).unwrap().start, 5);
        assert_eq!(a.alloc(8).unwrap().start, 15);
    }

    proptest! {
        /// Allocations never overlap, stay below the limit, and freeing everything restores an
        /// allocator that can hand out the whole range in one piece.
        #[test]
        fn never_overlaps(limit in 1u64..200, ops in proptest::collection::vec((any::<bool>(), 1u64..20, any::<u16>()), 1..200)) {
            let mut a = RangeAllocator::new(limit);
            let mut live: Vec<Extent> = Vec::new();
            for (do_alloc, len, pick) in ops {
                if do_alloc || live.is_empty() {
                    let free_units: u64 = limit - live.iter().map(|e| e.len).sum::<u64>();
                    match a.alloc(len) {
                        Some(e) => {
                            prop_assert!(e.end() <= limit);
                            prop_assert_eq!(e.len, len);
                            for o in &live {
                                prop_assert!(e.end() <= o.start || o.end() <= e.start, "{:?} overlaps {:?}", e, o);
                            }
                            live.push(e);
                        }
                        None => {
                            // No contiguous hole of `len` exists.
                            let mut ends: Vec<(u64, u64)> = live.iter().map(|e| (e.start, e.end())).collect();
                            ends.sort();
                            let mut cursor = 0;
                            for (s, en) in ends {
                                prop_assert!(s - cursor < len, "hole [{}, {}) fits {}", cursor, s, len);
                                cursor = en;
                            }
                            prop_assert!(limit - cursor < len);
                            prop_assert!(free_units >= a.free());
                        }
                    }
                } else {
                    let e = live.swap_remove(pick as usize % live.len());
                    a.dealloc(e);
                }
                prop_assert_eq!(a.used(), live.iter().map(|e| e.len).sum::<u64>());
            }
            for e in live.drain(..) {
                a.dealloc(e);
            }
            prop_assert_eq!(a.used(), 0);
            prop_assert_eq!(a.alloc(limit), Some(Extent { start: 0, len: limit }));
        }
    }
}
