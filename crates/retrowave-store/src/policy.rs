//! Wave-buffer cache policy: which selected clusters stay on the GPU.
//!
//! Each decode step the wave index selects the clusters of one (sequence, layer, KV head) whose
//! exact keys and values must be attended. The *wave buffer* is a GPU block cache of a fixed number
//! of page slots ([`CacheConfig::capacity_pages`]); a cluster occupies [`Wanted::pages`] slots,
//! not necessarily contiguous. [`WaveBufferPolicy::plan`] turns the selection of one step into a
//! [`StepPlan`] and updates its own bookkeeping; it does no I/O, starts no threads and reads no
//! clock, so the same inputs always give the same plans. A backend executes the plan: first the
//! [`StepPlan::evictions`], then the [`StepPlan::admissions`] (copies from the named [`Tier`] into
//! the named slots), and reads the [`StepPlan::bypass`] clusters straight from their tier.
//!
//! Rules of [`WaveBufferPolicy::plan`]:
//!
//! - `wanted` is in priority order, most important first. Entries with `pages == 0` are dropped
//!   first; of the remaining entries only the first occurrence of a cluster id counts.
//! - A wanted cluster that is resident with the same page count is a [`Hit`]. A resident cluster
//!   whose page count differs is stale: it is evicted (it appears in `evictions`) and handled as a
//!   miss. Stale evictions come first in `evictions`.
//! - Clusters wanted in a step are never evicted for space in that step, neither hits nor the
//!   step's admissions.
//! - Misses are considered in `wanted` order. A miss is admitted if its pages fit into the free
//!   pages plus the pages of *evictable* residents (resident and not wanted this step); least
//!   recently used evictable clusters are then evicted until enough slots are free, and the
//!   admission takes the lowest free slot ids. Otherwise (which includes `pages > capacity`) it is
//!   a [`Bypass`] and nothing is evicted for it.
//! - Slots freed by an eviction may be reused by an admission of the same plan.
//! - Recency: after a step, its hits and admissions are the most recently used clusters, ordered
//!   among themselves by `wanted` position (earlier = more recent). Residents not wanted keep their
//!   previous relative order.
//!
//! Cost per step is amortised O(wanted + hit, evicted and admitted pages) plus a scan of at most
//! `capacity_pages / 4096` bitmap summary words: residents live in a hash map; recency is a monotonically increasing stamp per
//! resident plus a queue of (stamp, cluster) records in stamp order, where a hit only pushes a new
//! record and outdated records are skipped when popped (and compacted away once they outnumber the
//! residents); free slots are a two-level bitmap of freed slots below a high-water mark (slots at
//! or above the mark were never used, so creating a policy costs nothing per slot).

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use serde::{Deserialize, Serialize};

/// Size of the wave buffer of one (sequence, layer, KV head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CacheConfig {
    /// Number of page slots in the buffer; slot ids run from 0 to `capacity_pages - 1`.
    pub capacity_pages: u32,
}

/// One page slot of the wave buffer, in `0..capacity_pages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SlotId(pub u32);

/// Where the pages of a cluster that is not in the wave buffer are read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Tier {
    /// The host memory arena (pinned host pages).
    Host,
    /// A spill file on local disk.
    Disk,
}

/// A cluster the wave index selected for the current step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Wanted {
    /// Cluster id, unique within one (sequence, layer, KV head).
    pub cluster: u32,
    /// Number of pages the cluster occupies; `0` means the entry is ignored.
    pub pages: u32,
    /// Where the cluster's pages are read from if they are not cached.
    pub tier: Tier,
}

/// A selected cluster already in the wave buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// Cluster id.
    pub cluster: u32,
    /// The slots holding its pages, in page order.
    pub slots: Vec<SlotId>,
}

/// A missing cluster to copy into the wave buffer this step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// Cluster id.
    pub cluster: u32,
    /// Tier its pages are copied from.
    pub tier: Tier,
    /// Destination slots, one per page, in page order (ascending slot ids).
    pub slots: Vec<SlotId>,
}

/// A missing cluster that does not fit and is read directly from its tier this step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bypass {
    /// Cluster id.
    pub cluster: u32,
    /// Tier its pages are read from.
    pub tier: Tier,
    /// Number of pages read.
    pub pages: u32,
}

/// A cluster removed from the wave buffer; its slots become free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    /// Cluster id.
    pub cluster: u32,
    /// The slots it occupied, in page order.
    pub slots: Vec<SlotId>,
}

/// What one decode step must do with the wave buffer. Backends execute `evictions` before
/// `admissions`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Selected clusters already cached, in `wanted` order.
    pub hits: Vec<Hit>,
    /// Clusters removed from the buffer: stale ones first, then LRU victims in eviction order.
    pub evictions: Vec<Eviction>,
    /// Misses copied into the buffer, in `wanted` order.
    pub admissions: Vec<Admission>,
    /// Misses read directly from their tier, in `wanted` order.
    pub bypass: Vec<Bypass>,
}

impl StepPlan {
    /// Pages served from the wave buffer.
    pub fn hit_pages(&self) -> u64 {
        self.hits.iter().map(|h| h.slots.len() as u64).sum()
    }

    /// Pages that must be read from a tier: admitted plus bypassed pages.
    pub fn miss_pages(&self) -> u64 {
        let admitted: u64 = self.admissions.iter().map(|a| a.slots.len() as u64).sum();
        let bypassed: u64 = self.bypass.iter().map(|b| u64::from(b.pages)).sum();
        admitted + bypassed
    }
}

/// Cumulative statistics of a [`WaveBufferPolicy`] over all its plans.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheCounters {
    /// Number of [`WaveBufferPolicy::plan`] calls.
    pub steps: u64,
    /// Number of hit clusters.
    pub hit_clusters: u64,
    /// Pages of hit clusters.
    pub hit_pages: u64,
    /// Pages admitted into the buffer.
    pub admitted_pages: u64,
    /// Pages read around the buffer.
    pub bypass_pages: u64,
    /// Pages evicted by plans (stale and LRU evictions; not [`WaveBufferPolicy::forget`] or
    /// [`WaveBufferPolicy::clear`]).
    pub evicted_pages: u64,
}

impl CacheCounters {
    /// Fraction of wanted pages served from the buffer: `hit / (hit + admitted + bypass)` pages,
    /// or `0.0` when no page was wanted yet.
    pub fn hit_ratio(&self) -> f64 {
        let total = self.hit_pages + self.admitted_pages + self.bypass_pages;
        if total == 0 {
            0.0
        } else {
            self.hit_pages as f64 / total as f64
        }
    }
}

/// A resident cluster.
#[derive(Debug, Clone)]
struct Entry {
    slots: Vec<SlotId>,
    /// Recency stamp; larger = more recently used. Unique over the policy's lifetime.
    stamp: u64,
}

/// Hasher for cluster ids: a multiplicative mix of the `u32` key. Cluster ids come from the wave
/// index, not from clients, so no flooding resistance is needed.
#[derive(Debug, Clone, Copy, Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u32(&mut self, v: u32) {
        self.0 = (self.0 ^ u64::from(v)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
}

/// Outdated recency records tolerated beyond twice the residents before the queue is compacted
/// (small in tests so that property tests exercise compaction).
const LRU_SLACK: usize = if cfg!(test) { 4 } else { 1024 };

type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;
type IdSet = HashSet<u32, BuildHasherDefault<IdHasher>>;

/// Free page slots: every slot at or above `mark` (never used since the last clear), plus the
/// slots below `mark` whose bit is set in `words`. `summary` has one bit per word of `words`, set
/// when that word has a free slot; every summary word below `hint` is zero.
#[derive(Debug, Clone, Default)]
struct FreeSlots {
    words: Vec<u64>,
    summary: Vec<u64>,
    hint: usize,
    mark: u64,
}

impl FreeSlots {
    /// Takes the `n` lowest free slots, in ascending order. The caller guarantees that `n` slots
    /// are free.
    fn take(&mut self, n: u32) -> Vec<SlotId> {
        let n = n as usize;
        let mut out = Vec::with_capacity(n);
        // Freed slots below `mark` first: they are all lower than the never-used ones.
        while out.len() < n {
            while self.hint < self.summary.len() && self.summary[self.hint] == 0 {
                self.hint += 1;
            }
            let Some(&sw) = self.summary.get(self.hint) else {
                break;
            };
            let wi = self.hint * 64 + sw.trailing_zeros() as usize;
            let mut word = self.words[wi];
            while word != 0 && out.len() < n {
                let slot = wi as u64 * 64 + u64::from(word.trailing_zeros());
                out.push(SlotId(slot as u32));
                word &= word - 1;
            }
            self.words[wi] = word;
            if word == 0 {
                self.summary[self.hint] &= !(1u64 << (wi % 64));
            }
        }
        let rest = (n - out.len()) as u64;
        out.extend((self.mark..self.mark + rest).map(|s| SlotId(s as u32)));
        self.mark += rest;
        let words = self.mark.div_ceil(64) as usize;
        if self.words.len() < words {
            self.words.resize(words, 0);
            self.summary.resize(words.div_ceil(64), 0);
        }
        out
    }

    /// Marks `slots` (all taken earlier) free again.
    fn give_back(&mut self, slots: &[SlotId]) {
        for s in slots {
            let wi = (s.0 / 64) as usize;
            let si = wi / 64;
            self.words[wi] |= 1u64 << (s.0 % 64);
            self.summary[si] |= 1u64 << (wi % 64);
            self.hint = self.hint.min(si);
        }
    }
}

/// LRU wave-buffer cache policy of one (sequence, layer, KV head); see the [module docs](self).
#[derive(Debug, Clone)]
pub struct WaveBufferPolicy {
    capacity: u32,
    entries: IdMap<Entry>,
    /// (stamp, cluster) records in increasing stamp order, oldest first. A record is live when
    /// `entries[cluster].stamp == stamp`; every resident has exactly one live record, except
    /// during `plan`, where this step's clusters have none until the end.
    lru: VecDeque<(u64, u32)>,
    free: FreeSlots,
    used: u32,
    next_stamp: u64,
    counters: CacheCounters,
}

impl WaveBufferPolicy {
    /// An empty buffer of `cfg.capacity_pages` slots.
    pub fn new(cfg: CacheConfig) -> Self {
        Self {
            capacity: cfg.capacity_pages,
            entries: IdMap::default(),
            lru: VecDeque::new(),
            free: FreeSlots::default(),
            used: 0,
            next_stamp: 0,
            counters: CacheCounters::default(),
        }
    }

    /// Plans one step for the clusters in `wanted` (priority order, most important first) and
    /// applies the plan to the policy's state. See the [module docs](self) for the rules.
    pub fn plan(&mut self, wanted: &[Wanted]) -> StepPlan {
        let mut seen = IdSet::with_capacity_and_hasher(wanted.len(), Default::default());
        let unique: Vec<Wanted> = wanted
            .iter()
            .filter(|w| w.pages > 0 && seen.insert(w.cluster))
            .copied()
            .collect();
        let n = unique.len() as u64;
        // Earlier in `wanted` = more recent = larger stamp.
        let base = self.next_stamp;
        self.next_stamp += n;
        let stamp_of = |i: usize| base + (n - 1 - i as u64);

        let mut plan = StepPlan::default();
        let mut misses = Vec::new();
        // Pages of this step's clusters that are resident (not evictable).
        let mut protected: u64 = 0;

        // Pass 1: hits and stale residents.
        for (i, w) in unique.iter().enumerate() {
            let Some(entry) = self.entries.get_mut(&w.cluster) else {
                misses.push(i);
                continue;
            };
            // Its old record becomes outdated either way.
            if entry.slots.len() == w.pages as usize {
                entry.stamp = stamp_of(i);
                protected += u64::from(w.pages);
                plan.hits.push(Hit {
                    cluster: w.cluster,
                    slots: entry.slots.clone(),
                });
            } else {
                if let Some(ev) = self.remove_entry(w.cluster) {
                    plan.evictions.push(ev);
                }
                misses.push(i);
            }
        }

        // Pass 2: misses in priority order.
        for i in misses {
            let w = unique[i];
            let free = u64::from(self.capacity - self.used);
            let evictable = u64::from(self.used) - protected;
            if u64::from(w.pages) > free + evictable {
                plan.bypass.push(Bypass {
                    cluster: w.cluster,
                    tier: w.tier,
                    pages: w.pages,
                });
                continue;
            }
            while self.capacity - self.used < w.pages {
                // Live records are all older than this step: this step's clusters have none yet.
                let Some((stamp, victim)) = self.lru.pop_front() else {
                    break; // unreachable: evictable pages cover the shortfall
                };
                if self.is_live(stamp, victim)
                    && let Some(ev) = self.remove_entry(victim)
                {
                    plan.evictions.push(ev);
                }
            }
            let slots = self.free.take(w.pages);
            self.used += w.pages;
            protected += u64::from(w.pages);
            self.entries.insert(
                w.cluster,
                Entry {
                    slots: slots.clone(),
                    stamp: stamp_of(i),
                },
            );
            plan.admissions.push(Admission {
                cluster: w.cluster,
                tier: w.tier,
                slots,
            });
        }

        // This step's resident clusters get their records, in increasing stamp order.
        for (i, w) in unique.iter().enumerate().rev() {
            if self.is_live(stamp_of(i), w.cluster) {
                self.lru.push_back((stamp_of(i), w.cluster));
            }
        }
        if self.lru.len() > 2 * self.entries.len() + LRU_SLACK {
            let entries = &self.entries;
            self.lru
                .retain(|&(stamp, c)| entries.get(&c).is_some_and(|e| e.stamp == stamp));
        }

        let c = &mut self.counters;
        c.steps += 1;
        c.hit_clusters += plan.hits.len() as u64;
        c.hit_pages += plan.hit_pages();
        c.admitted_pages += plan
            .admissions
            .iter()
            .map(|a| a.slots.len() as u64)
            .sum::<u64>();
        c.bypass_pages += plan.bypass.iter().map(|b| u64::from(b.pages)).sum::<u64>();
        c.evicted_pages += plan
            .evictions
            .iter()
            .map(|e| e.slots.len() as u64)
            .sum::<u64>();
        tracing::trace!(
            hits = plan.hits.len(),
            admissions = plan.admissions.len(),
            bypass = plan.bypass.len(),
            evictions = plan.evictions.len(),
            used_pages = self.used,
            "wave buffer plan"
        );
        plan
    }

    /// Whether the record (`stamp`, `cluster`) is the current one of a resident.
    fn is_live(&self, stamp: u64, cluster: u32) -> bool {
        self.entries.get(&cluster).is_some_and(|e| e.stamp == stamp)
    }

    /// Removes `cluster` from `entries` and frees its slots; its record becomes outdated.
    fn remove_entry(&mut self, cluster: u32) -> Option<Eviction> {
        let entry = self.entries.remove(&cluster)?;
        self.free.give_back(&entry.slots);
        // Slot counts always equal page counts, which were added to `used` on admission.
        self.used -= entry.slots.len() as u32;
        Some(Eviction {
            cluster,
            slots: entry.slots,
        })
    }

    /// Whether `cluster` is in the buffer.
    pub fn contains(&self, cluster: u32) -> bool {
        self.entries.contains_key(&cluster)
    }

    /// The slots of `cluster` in page order, if it is in the buffer.
    pub fn slots_of(&self, cluster: u32) -> Option<&[SlotId]> {
        self.entries.get(&cluster).map(|e| e.slots.as_slice())
    }

    /// Pages currently occupied.
    pub fn used_pages(&self) -> u32 {
        self.used
    }

    /// Total page slots of the buffer.
    pub fn capacity_pages(&self) -> u32 {
        self.capacity
    }

    /// Drops `cluster` from the buffer (for instance because its index was rebuilt) and frees its
    /// slots. Returns what the backend must treat as evicted, or `None` if it was not resident.
    /// Not counted in [`CacheCounters::evicted_pages`].
    pub fn forget(&mut self, cluster: u32) -> Option<Eviction> {
        self.remove_entry(cluster)
    }

    /// Empties the buffer; every slot becomes free. Counters are kept.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.lru.clear();
        self.free = FreeSlots::default();
        self.used = 0;
    }

    /// Statistics accumulated over all plans.
    pub fn counters(&self) -> CacheCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(cluster: u32, pages: u32) -> Wanted {
        Wanted {
            cluster,
            pages,
            tier: Tier::Host,
        }
    }

    fn policy(capacity_pages: u32) -> WaveBufferPolicy {
        WaveBufferPolicy::new(CacheConfig { capacity_pages })
    }

    fn ids<T>(items: &[T], f: impl Fn(&T) -> u32) -> Vec<u32> {
        items.iter().map(f).collect()
    }

    fn slots(ids: &[u32]) -> Vec<SlotId> {
        ids.iter().map(|&s| SlotId(s)).collect()
    }

    #[test]
    fn admits_then_hits_with_same_slots() {
        let mut p = policy(8);
        let first = p.plan(&[w(1, 2), w(2, 3)]);
        assert!(first.hits.is_empty());
        assert_eq!(first.admissions.len(), 2);
        assert_eq!(first.admissions[0].slots, slots(&[0, 1]));
        assert_eq!(first.admissions[1].slots, slots(&[2, 3, 4]));
        assert_eq!(first.miss_pages(), 5);
        assert_eq!(p.used_pages(), 5);

        let second = p.plan(&[w(2, 3), w(1, 2)]);
        assert_eq!(ids(&second.hits, |h| h.cluster), vec![2, 1]);
        assert_eq!(second.hits[0].slots, slots(&[2, 3, 4]));
        assert_eq!(second.hits[1].slots, slots(&[0, 1]));
        assert!(second.admissions.is_empty() && second.evictions.is_empty());
        assert_eq!(second.hit_pages(), 5);
        assert_eq!(second.miss_pages(), 0);
        assert_eq!(p.slots_of(1), Some(&slots(&[0, 1])[..]));
        assert!(p.contains(2) && !p.contains(3));
    }

    #[test]
    fn evicts_least_recently_selected_first() {
        let mut p = policy(4);
        p.plan(&[w(1, 1), w(2, 1), w(3, 1), w(4, 1)]); // recency: 1 > 2 > 3 > 4
        p.plan(&[w(4, 1)]); // recency: 4 > 1 > 2 > 3
        let plan = p.plan(&[w(5, 2)]);
        assert_eq!(ids(&plan.evictions, |e| e.cluster), vec![3, 2]);
        assert_eq!(plan.admissions[0].slots, slots(&[1, 2]));
        let plan = p.plan(&[w(6, 1)]);
        assert_eq!(ids(&plan.evictions, |e| e.cluster), vec![1]);
        assert_eq!(plan.admissions[0].slots, slots(&[0]));
    }

    #[test]
    fn never_evicts_this_steps_clusters() {
        let mut p = policy(4);
        p.plan(&[w(1, 2), w(2, 2)]);
        // 1 is a hit, 3 needs 3 pages but only 2 (cluster 2) are evictable: bypass, no eviction.
        let plan = p.plan(&[w(1, 2), w(3, 3)]);
        assert_eq!(ids(&plan.hits, |h| h.cluster), vec![1]);
        assert!(plan.evictions.is_empty());
        assert_eq!(ids(&plan.bypass, |b| b.cluster), vec![3]);
        assert!(p.contains(2));
        // 4 evicts 2; 5 cannot evict 1 (hit) nor 4 (admitted this step).
        let plan = p.plan(&[w(1, 2), w(4, 2), w(5, 1)]);
        assert_eq!(ids(&plan.evictions, |e| e.cluster), vec![2]);
        assert_eq!(ids(&plan.admissions, |a| a.cluster), vec![4]);
        assert_eq!(ids(&plan.bypass, |b| b.cluster), vec![5]);
        assert_eq!(plan.admissions[0].slots, slots(&[2, 3]));
    }

    #[test]
    fn bypasses_clusters_larger_than_the_buffer() {
        let mut p = policy(4);
        p.plan(&[w(1, 1)]);
        let plan = p.plan(&[w(2, 5), w(3, 1)]);
        assert_eq!(
            plan.bypass,
            vec![Bypass {
                cluster: 2,
                tier: Tier::Host,
                pages: 5
            }]
        );
        assert!(plan.evictions.is_empty());
        assert_eq!(ids(&plan.admissions, |a| a.cluster), vec![3]);
        assert!(p.contains(1));

        let mut empty = policy(0);
        let plan = empty.plan(&[Wanted {
            cluster: 7,
            pages: 1,
            tier: Tier::Disk,
        }]);
        assert_eq!(plan.bypass[0].tier, Tier::Disk);
        assert_eq!(empty.used_pages(), 0);
    }

    #[test]
    fn stale_page_count_is_evicted_and_missed() {
        let mut p = policy(8);
        p.plan(&[w(1, 2), w(2, 2)]);
        let plan = p.plan(&[w(1, 3)]);
        assert_eq!(
            plan.evictions,
            vec![Eviction {
                cluster: 1,
                slots: slots(&[0, 1])
            }]
        );
        assert!(plan.hits.is_empty());
        assert_eq!(plan.admissions[0].slots, slots(&[0, 1, 4]));
        assert_eq!(p.slots_of(1).map(<[SlotId]>::len), Some(3));

        // Stale and too big for the free space plus evictable residents: evicted and bypassed.
        let mut p = policy(4);
        p.plan(&[w(1, 2), w(2, 2)]);
        let plan = p.plan(&[w(2, 2), w(1, 3)]);
        assert_eq!(ids(&plan.evictions, |e| e.cluster), vec![1]);
        assert_eq!(ids(&plan.bypass, |b| b.cluster), vec![1]);
        assert!(!p.contains(1));
        assert_eq!(p.used_pages(), 2);
    }

    #[test]
    fn duplicates_and_zero_pages_are_ignored() {
        let mut p = policy(8);
        let plan = p.plan(&[w(1, 0), w(2, 1), w(2, 3), w(1, 2)]);
        assert_eq!(ids(&plan.admissions, |a| a.cluster), vec![2, 1]);
        assert_eq!(plan.admissions[0].slots.len(), 1);
        assert_eq!(plan.admissions[1].slots.len(), 2);
        assert_eq!(p.used_pages(), 3);
    }

    #[test]
    fn forget_and_clear_free_slots() {
        let mut p = policy(4);
        p.plan(&[w(1, 2), w(2, 2)]);
        assert_eq!(
            p.forget(1),
            Some(Eviction {
                cluster: 1,
                slots: slots(&[0, 1])
            })
        );
        assert_eq!(p.forget(1), None);
        assert_eq!(p.used_pages(), 2);
        let plan = p.plan(&[w(3, 2)]);
        assert!(plan.evictions.is_empty());
        assert_eq!(plan.admissions[0].slots, slots(&[0, 1]));

        p.clear();
        assert_eq!(p.used_pages(), 0);
        assert!(!p.contains(2) && !p.contains(3));
        let plan = p.plan(&[w(4, 4)]);
        assert!(plan.evictions.is_empty());
        assert_eq!(plan.admissions[0].slots, slots(&[0, 1, 2, 3]));
        assert_eq!(p.counters().steps, 3);
        assert_eq!(p.capacity_pages(), 4);
    }

    #[test]
    fn plans_are_deterministic() {
        // A small LCG over 40 cluster ids: steps overlap, and 12 clusters of 1..=5 pages
        // overflow 30 slots, so plans contain hits, admissions and evictions.
        let mut x = 12345u64;
        let steps: Vec<Vec<Wanted>> = (0..50)
            .map(|_| {
                (0..12)
                    .map(|_| {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let id = ((x >> 33) % 40) as u32;
                        w(id, 1 + id % 5)
                    })
                    .collect()
            })
            .collect();
        let run = || {
            let mut p = policy(30);
            steps.iter().map(|s| p.plan(s)).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        assert!(a.iter().any(|p| !p.evictions.is_empty()));
        assert!(a.iter().any(|p| !p.hits.is_empty()));
    }

    #[test]
    fn counters_accumulate() {
        let mut p = policy(4);
        assert_eq!(p.counters().hit_ratio(), 0.0);
        p.plan(&[w(1, 2), w(2, 2)]); // admit 4
        p.plan(&[w(1, 2), w(3, 2), w(4, 9)]); // hit 2, evict 2, admit 2, bypass 9
        let c = p.counters();
        assert_eq!(
            c,
            CacheCounters {
                steps: 2,
                hit_clusters: 1,
                hit_pages: 2,
                admitted_pages: 6,
                bypass_pages: 9,
                evicted_pages: 2,
            }
        );
        assert!((c.hit_ratio() - 2.0 / 17.0).abs() < 1e-12);
    }

    #[test]
    fn large_buffer_plans_stay_consistent() {
        const CAP: u32 = 1 << 20;
        let mut p = policy(CAP);
        // Slot -> cluster, maintained from the plans alone.
        let mut table = vec![u32::MAX; CAP as usize];
        let (mut hits, mut evictions) = (0usize, 0usize);
        for step in 0..20u32 {
            let wanted: Vec<Wanted> = (0..10_000u32)
                .map(|k| {
                    let id = (k * 7919 + step * 104_729) % 100_000;
                    w(id, 1 + id % 32)
                })
                .collect();
            let plan = p.plan(&wanted);
            assert!(plan.bypass.is_empty());
            assert_eq!(plan.hits.len() + plan.admissions.len(), 10_000);
            hits += plan.hits.len();
            evictions += plan.evictions.len();
            for h in &plan.hits {
                assert!(h.slots.iter().all(|s| table[s.0 as usize] == h.cluster));
            }
            for e in &plan.evictions {
                for s in &e.slots {
                    assert_eq!(table[s.0 as usize], e.cluster);
                    table[s.0 as usize] = u32::MAX;
                }
            }
            for a in &plan.admissions {
                for s in &a.slots {
                    assert_eq!(table[s.0 as usize], u32::MAX, "slot {} taken", s.0);
                    table[s.0 as usize] = a.cluster;
                }
            }
            let used = table.iter().filter(|&&c| c != u32::MAX).count();
            assert_eq!(p.used_pages() as usize, used);
        }
        assert!(
            hits > 0 && evictions > 0,
            "hits {hits} evictions {evictions}"
        );
    }

    // ---- reference model -------------------------------------------------------------------

    /// (cluster, pages) of a resident of the model.
    type Resident = (u32, u32);

    /// Naive model: residents in recency order (most recent first), slots as a flat table.
    struct Model {
        residents: Vec<Resident>,
        table: Vec<Option<u32>>,
    }

    impl Model {
        fn new(capacity: u32) -> Self {
            Self {
                residents: Vec::new(),
                table: vec![None; capacity as usize],
            }
        }

        fn slots_of(&self, cluster: u32) -> Vec<SlotId> {
            (0..self.table.len())
                .filter(|&s| self.table[s] == Some(cluster))
                .map(|s| SlotId(s as u32))
                .collect()
        }

        fn evict(&mut self, cluster: u32) -> Eviction {
            let slots = self.slots_of(cluster);
            for s in &slots {
                self.table[s.0 as usize] = None;
            }
            self.residents.retain(|&(c, _)| c != cluster);
            Eviction { cluster, slots }
        }

        fn plan(&mut self, wanted: &[Wanted]) -> StepPlan {
            let mut unique: Vec<Wanted> = Vec::new();
            for x in wanted {
                if x.pages > 0 && !unique.iter().any(|u| u.cluster == x.cluster) {
                    unique.push(*x);
                }
            }
            let mut plan = StepPlan::default();
            let mut misses = Vec::new();
            for u in &unique {
                match self.residents.iter().find(|r| r.0 == u.cluster) {
                    Some(&(_, pages)) if pages == u.pages => plan.hits.push(Hit {
                        cluster: u.cluster,
                        slots: self.slots_of(u.cluster),
                    }),
                    Some(_) => {
                        plan.evictions.push(self.evict(u.cluster));
                        misses.push(*u);
                    }
                    None => misses.push(*u),
                }
            }
            let is_wanted = |c: u32| unique.iter().any(|u| u.cluster == c);
            for m in misses {
                let free = self.table.iter().filter(|s| s.is_none()).count() as u32;
                let evictable: u32 = self
                    .residents
                    .iter()
                    .filter(|r| !is_wanted(r.0))
                    .map(|r| r.1)
                    .sum();
                if m.pages > free + evictable {
                    plan.bypass.push(Bypass {
                        cluster: m.cluster,
                        tier: m.tier,
                        pages: m.pages,
                    });
                    continue;
                }
                while (self.table.iter().filter(|s| s.is_none()).count() as u32) < m.pages {
                    let victim = self
                        .residents
                        .iter()
                        .rev()
                        .find(|r| !is_wanted(r.0))
                        .map(|r| r.0);
                    let Some(victim) = victim else { break };
                    plan.evictions.push(self.evict(victim));
                }
                let mut got = Vec::new();
                for s in 0..self.table.len() {
                    if got.len() == m.pages as usize {
                        break;
                    }
                    if self.table[s].is_none() {
                        self.table[s] = Some(m.cluster);
                        got.push(SlotId(s as u32));
                    }
                }
                self.residents.push((m.cluster, m.pages));
                plan.admissions.push(Admission {
                    cluster: m.cluster,
                    tier: m.tier,
                    slots: got,
                });
            }
            // This step's residents move to the front in `wanted` order.
            let (mut front, rest): (Vec<Resident>, Vec<Resident>) =
                self.residents.iter().partition(|r| is_wanted(r.0));
            front.sort_by_key(|r| unique.iter().position(|u| u.cluster == r.0));
            front.extend(rest);
            self.residents = front;
            plan
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Plan(Vec<Wanted>),
        Forget(u32),
        Clear,
    }

    fn op(base_pages: Vec<u32>) -> impl Strategy<Value = Op> {
        let n = base_pages.len() as u32;
        let entry = (0..n, 0..10u32, 1..8u32, any::<bool>()).prop_map(move |(c, r, p, disk)| {
            Wanted {
                cluster: c,
                // Mostly the cluster's fixed size; sometimes a changed size or 0.
                pages: match r {
                    0 => p,
                    1 => 0,
                    _ => base_pages[c as usize],
                },
                tier: if disk { Tier::Disk } else { Tier::Host },
            }
        });
        prop_oneof![
            20 => prop::collection::vec(entry, 0..16).prop_map(Op::Plan),
            1 => (0..n).prop_map(Op::Forget),
            1 => Just(Op::Clear),
        ]
    }

    fn scenario() -> impl Strategy<Value = (u32, Vec<Op>)> {
        (0..64u32, prop::collection::vec(1..8u32, 1..24))
            .prop_flat_map(|(cap, base)| (Just(cap), prop::collection::vec(op(base), 1..40)))
    }

    /// Checks the invariants of one plan against the test's own slot table `table`
    /// (slot -> cluster) and `admitted` (cluster -> slots it was admitted into), then applies it.
    fn check_plan(
        p: &WaveBufferPolicy,
        wanted: &[Wanted],
        plan: &StepPlan,
        table: &mut [Option<u32>],
        admitted: &mut HashMap<u32, Vec<SlotId>>,
    ) -> Result<(), TestCaseError> {
        let mut unique: Vec<Wanted> = Vec::new();
        for x in wanted {
            if x.pages > 0 && !unique.iter().any(|u| u.cluster == x.cluster) {
                unique.push(*x);
            }
        }
        // Every unique wanted cluster is exactly one of hit, admission, bypass.
        let mut served: Vec<u32> = ids(&plan.hits, |h| h.cluster);
        served.extend(ids(&plan.admissions, |a| a.cluster));
        served.extend(ids(&plan.bypass, |b| b.cluster));
        served.sort_unstable();
        let mut expect: Vec<u32> = ids(&unique, |u| u.cluster);
        expect.sort_unstable();
        prop_assert_eq!(served, expect);
        let wanted_pages: u64 = unique.iter().map(|u| u64::from(u.pages)).sum();
        prop_assert_eq!(plan.hit_pages() + plan.miss_pages(), wanted_pages);

        for h in &plan.hits {
            prop_assert_eq!(Some(&h.slots), admitted.get(&h.cluster));
        }
        for e in &plan.evictions {
            // A wanted cluster is only evicted when stale, and then it is a miss.
            if let Some(u) = unique.iter().find(|u| u.cluster == e.cluster) {
                prop_assert_ne!(e.slots.len(), u.pages as usize);
                prop_assert!(!plan.hits.iter().any(|h| h.cluster == e.cluster));
            }
            prop_assert_eq!(Some(&e.slots), admitted.get(&e.cluster));
            admitted.remove(&e.cluster);
            for s in &e.slots {
                prop_assert_eq!(table[s.0 as usize], Some(e.cluster));
                table[s.0 as usize] = None;
            }
        }
        for a in &plan.admissions {
            let pages = unique
                .iter()
                .find(|u| u.cluster == a.cluster)
                .map(|u| u.pages);
            prop_assert_eq!(Some(a.slots.len() as u32), pages);
            for s in &a.slots {
                prop_assert!(s.0 < p.capacity_pages());
                prop_assert_eq!(table[s.0 as usize], None, "slot {} not free", s.0);
                table[s.0 as usize] = Some(a.cluster);
            }
            admitted.insert(a.cluster, a.slots.clone());
        }
        Ok(())
    }

    fn check_state(
        p: &WaveBufferPolicy,
        table: &[Option<u32>],
        admitted: &HashMap<u32, Vec<SlotId>>,
    ) -> Result<(), TestCaseError> {
        prop_assert!(p.used_pages() <= p.capacity_pages());
        let used = table.iter().filter(|s| s.is_some()).count() as u32;
        prop_assert_eq!(p.used_pages(), used);
        for (c, s) in admitted {
            prop_assert_eq!(p.slots_of(*c), Some(&s[..]));
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn agrees_with_reference_model((cap, ops) in scenario()) {
            let mut p = policy(cap);
            let mut model = Model::new(cap);
            let mut table: Vec<Option<u32>> = vec![None; cap as usize];
            let mut admitted: HashMap<u32, Vec<SlotId>> = HashMap::new();
            let mut counters = CacheCounters::default();
            for op in ops {
                match op {
                    Op::Plan(wanted) => {
                        let plan = p.plan(&wanted);
                        let expected = model.plan(&wanted);
                        prop_assert_eq!(&plan, &expected);
                        check_plan(&p, &wanted, &plan, &mut table, &mut admitted)?;
                        counters.steps += 1;
                        counters.hit_clusters += plan.hits.len() as u64;
                        counters.hit_pages += plan.hit_pages();
                        counters.admitted_pages +=
                            plan.admissions.iter().map(|a| a.slots.len() as u64).sum::<u64>();
                        counters.bypass_pages +=
                            plan.bypass.iter().map(|b| u64::from(b.pages)).sum::<u64>();
                        counters.evicted_pages +=
                            plan.evictions.iter().map(|e| e.slots.len() as u64).sum::<u64>();
                    }
                    Op::Forget(c) => {
                        let got = p.forget(c);
                        let resident = model.residents.iter().any(|r| r.0 == c);
                        let expected = resident.then(|| model.evict(c));
                        prop_assert_eq!(&got, &expected);
                        if let Some(e) = got {
                            prop_assert_eq!(admitted.remove(&c), Some(e.slots.clone()));
                            for s in &e.slots {
                                table[s.0 as usize] = None;
                            }
                        }
                    }
                    Op::Clear => {
                        p.clear();
                        model = Model::new(cap);
                        table.iter_mut().for_each(|s| *s = None);
                        admitted.clear();
                    }
                }
                check_state(&p, &table, &admitted)?;
                for r in &model.residents {
                    prop_assert!(p.contains(r.0));
                }
                prop_assert_eq!(model.residents.len(), admitted.len());
            }
            prop_assert_eq!(p.counters(), counters);
        }
    }
}
