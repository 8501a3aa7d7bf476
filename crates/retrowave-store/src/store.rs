//! The tiered store: cluster records in the host arena, spilled to the disk tier when the arena
//! is full, read back on demand or ahead of time.
//!
//! Concurrency: one mutex guards the bookkeeping (which cluster is where); record bytes are
//! copied and disk I/O is done outside it. A record being read by one thread is *pinned* and is
//! neither spilled nor freed until it is unpinned; a record being loaded from disk has one load in
//! flight that every other reader waits for.

use crate::arena::{HostArena, MmapAllocator, PageAllocator};
use crate::disk::{DiskLoc, DiskTier, ReadItem, WriteItem};
use crate::io::{IoOptions, IoPath};
use crate::layout::PageLayout;
use crate::policy::Tier;
use crate::ranges::Extent;
use crate::{StoreConfig, StoreError};
use std::collections::VecDeque;

type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// A sequence (request) whose KV the store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// One (sequence, layer, KV head): the unit that owns a list of clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HeadRef {
    /// Sequence.
    pub seq: SeqId,
    /// Layer.
    pub layer: u32,
    /// KV head.
    pub kv_head: u32,
}

/// One cluster of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterRef {
    /// Its head.
    pub head: HeadRef,
    /// Cluster id within the head (dense, in append order).
    pub cluster: u32,
}

/// Where a gathered record landed in the output buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordSpan {
    /// The cluster.
    pub cluster: u32,
    /// Tokens in the cluster.
    pub tokens: u32,
    /// Byte offset of the record in the output.
    pub offset: usize,
    /// Bytes of the record (whole pages).
    pub bytes: usize,
    /// Tier the record was in when asked for.
    pub tier: Tier,
}

/// A snapshot of the store's state and counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StoreStats {
    /// Record bytes in host memory (whole pages).
    pub host_bytes: u64,
    /// Pages in host memory.
    pub host_pages: u64,
    /// Arena bytes in use (records rounded to arena units).
    pub arena_used_bytes: u64,
    /// Arena capacity.
    pub arena_capacity_bytes: u64,
    /// Record bytes on disk only.
    pub disk_bytes: u64,
    /// Pages on disk only.
    pub disk_pages: u64,
    /// Clusters held.
    pub clusters: u64,
    /// Clusters handed out from host memory.
    pub host_reads: u64,
    /// Clusters that had to come from disk when asked for.
    pub disk_reads: u64,
    /// Records written to disk.
    pub spilled: u64,
    /// Records read from disk (each once, however many callers wanted it).
    pub disk_loads: u64,
    /// Clusters loaded by prefetch before anyone asked for them.
    pub prefetched: u64,
    /// Pages whose checksum failed.
    pub checksum_failures: u64,
    /// Disk writes refused for lack of space.
    pub disk_full: u64,
}

impl StoreStats {
    /// Share of cluster reads served from host memory.
    pub fn host_hit_ratio(&self) -> f64 {
        let all = self.host_reads + self.disk_reads;
        if all == 0 {
            0.0
        } else {
            self.host_reads as f64 / all as f64
        }
    }
}

struct Entry {
    tokens: u32,
    pages: u32,
    /// Record bytes.
    bytes: u32,
    host: Option<Extent>,
    disk: Option<DiskLoc>,
    pins: u32,
    stamp: u64,
}

struct HeadEntry {
    layout: PageLayout,
    clusters: Vec<Entry>,
    /// Pins held on this head's clusters.
    pinned: u32,
    /// The sequence ended while records were pinned: free each record when unpinned.
    dead: bool,
}

#[derive(Default)]
struct LoadSlot {
    done: Mutex<Option<Result<(), StoreError>>>,
    cv: Condvar,
}

impl LoadSlot {
    fn finish(&self, r: Result<(), StoreError>) {
        *lock(&self.done) = Some(r);
        self.cv.notify_all();
    }
    fn wait(&self) -> Result<(), StoreError> {
        let mut g = lock(&self.done);
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct Table {
    arena: HostArena,
    heads: HashMap<HeadRef, HeadEntry>,
    /// Host-resident clusters by last use (lazy: stale stamps are skipped).
    lru: VecDeque<(u64, ClusterRef)>,
    clock: u64,
    loads: HashMap<ClusterRef, Arc<LoadSlot>>,
    tiers: TierCounts,
    clusters: u64,
    stats: StoreStats,
}

/// Record bytes and pages in host memory, and on disk only.
#[derive(Debug, Default, Clone, Copy)]
struct TierCounts {
    host_bytes: u64,
    host_pages: u64,
    disk_only_bytes: u64,
    disk_only_pages: u64,
}

/// Frees both copies of a record that leaves the store, taking it out of the tier counts.
fn release(arena: &mut HostArena, tiers: &mut TierCounts, disk: Option<&DiskTier>, e: &mut Entry) {
    if let Some(x) = e.host.take() {
        arena.dealloc(x);
        tiers.host_bytes -= e.bytes as u64;
        tiers.host_pages -= e.pages as u64;
    } else if e.disk.is_some() {
        tiers.disk_only_bytes -= e.bytes as u64;
        tiers.disk_only_pages -= e.pages as u64;
    }
    if let (Some(d), Some(loc)) = (disk, e.disk.take()) {
        d.free(&loc);
    }
}

/// Drops the host copy of a record that has an intact disk copy.
fn demote(arena: &mut HostArena, tiers: &mut TierCounts, e: &mut Entry) {
    if let Some(x) = e.host.take() {
        arena.dealloc(x);
    }
    tiers.host_bytes -= e.bytes as u64;
    tiers.host_pages -= e.pages as u64;
    tiers.disk_only_bytes += e.bytes as u64;
    tiers.disk_only_pages += e.pages as u64;
}

impl Table {
    fn head(&self, h: HeadRef) -> Result<&HeadEntry, StoreError> {
        match self.heads.get(&h) {
            Some(e) if !e.dead => Ok(e),
            _ => Err(unknown_head(h)),
        }
    }

    fn entry_mut(&mut self, c: ClusterRef) -> Result<&mut Entry, StoreError> {
        let head = match self.heads.get_mut(&c.head) {
            Some(e) if !e.dead => e,
            _ => return Err(unknown_head(c.head)),
        };
        let stored = head.clusters.len();
        head.clusters
            .get_mut(c.cluster as usize)
            .ok_or(StoreError::UnknownCluster {
                seq: c.head.seq.0,
                layer: c.head.layer,
                kv_head: c.head.kv_head,
                cluster: c.cluster,
                stored,
            })
    }

    fn touch(&mut self, c: ClusterRef) {
        self.clock += 1;
        let stamp = self.clock;
        if let Ok(e) = self.entry_mut(c) {
            e.stamp = stamp;
            self.lru.push_back((stamp, c));
        }
        self.compact_lru();
    }

    /// Keeps the lazy LRU queue from growing without bound.
    fn compact_lru(&mut self) {
        if self.lru.len() > 4 * (self.clusters as usize).max(1024) {
            let heads = &self.heads;
            self.lru.retain(|(s, c)| {
                heads
                    .get(&c.head)
                    .and_then(|h| h.clusters.get(c.cluster as usize))
                    .is_some_and(|e| e.stamp == *s && e.host.is_some())
            });
        }
    }

    fn pin(&mut self, c: ClusterRef) {
        if let Some(h) = self.heads.get_mut(&c.head)
            && let Some(e) = h.clusters.get_mut(c.cluster as usize)
        {
            e.pins += 1;
            h.pinned += 1;
        }
    }

    /// Drops one pin; frees the record if its sequence ended meanwhile.
    fn unpin(&mut self, c: ClusterRef, disk: Option<&DiskTier>) {
        let Some(h) = self.heads.get_mut(&c.head) else {
            return;
        };
        let Some(e) = h.clusters.get_mut(c.cluster as usize) else {
            return;
        };
        debug_assert!(e.pins > 0);
        e.pins = e.pins.saturating_sub(1);
        h.pinned = h.pinned.saturating_sub(1);
        if h.dead && e.pins == 0 {
            let (host, dloc) = (e.host.take(), e.disk.take());
            if let Some(x) = host {
                self.arena.dealloc(x);
            }
            if let (Some(d), Some(loc)) = (disk, dloc) {
                d.free(&loc);
            }
            if h.pinned == 0 {
                self.heads.remove(&c.head);
            }
        }
    }

    fn set_host(&mut self, c: ClusterRef, ext: Extent) -> Result<(), StoreError> {
        let e = self.entry_mut(c)?;
        let (bytes, pages, was_disk) = (e.bytes as u64, e.pages as u64, e.disk.is_some());
        e.host = Some(ext);
        self.tiers.host_bytes += bytes;
        self.tiers.host_pages += pages;
        if was_disk {
            self.tiers.disk_only_bytes -= bytes;
            self.tiers.disk_only_pages -= pages;
        }
        Ok(())
    }

    fn publish_metrics(&self) {
        crate::metrics::tiers(
            self.tiers.host_bytes,
            self.tiers.host_pages,
            self.tiers.disk_only_bytes,
            self.tiers.disk_only_pages,
        );
    }
}

fn unknown_head(h: HeadRef) -> StoreError {
    StoreError::UnknownHead {
        seq: h.seq.0,
        layer: h.layer,
        kv_head: h.kv_head,
    }
}

struct Shared {
    cfg: StoreConfig,
    table: Mutex<Table>,
    disk: Option<DiskTier>,
    prefetch: Mutex<PrefetchQueue>,
    prefetch_cv: Condvar,
}

#[derive(Default)]
struct PrefetchQueue {
    queue: VecDeque<ClusterRef>,
    shutdown: bool,
}

struct Owner {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        lock(&self.shared.prefetch).shutdown = true;
        self.shared.prefetch_cv.notify_all();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

/// Names clusters asked for ahead of time; [`TieredStore::wait`] blocks until they are in host
/// memory.
#[derive(Debug, Clone)]
#[must_use = "wait for the ticket, or the prefetch is only a hint"]
pub struct Ticket {
    clusters: Vec<ClusterRef>,
}

/// The tiered KV store of a node. Clones share one store.
#[derive(Clone)]
pub struct TieredStore {
    shared: Arc<Shared>,
    _owner: Arc<Owner>,
}

impl std::fmt::Debug for TieredStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TieredStore")
            .field("stats", &self.stats())
            .field("io_path", &self.io_path())
            .finish()
    }
}

impl TieredStore {
    /// A store with host memory from `mmap`.
    pub fn new(cfg: StoreConfig) -> Result<Self, StoreError> {
        Self::with_allocator(cfg, &MmapAllocator)
    }

    /// A store whose host arena comes from `allocator` (for example page-locked memory of a GPU
    /// driver).
    pub fn with_allocator(
        cfg: StoreConfig,
        allocator: &dyn PageAllocator,
    ) -> Result<Self, StoreError> {
        cfg.validate().map_err(StoreError::Config)?;
        let arena = HostArena::new(allocator, cfg.host_capacity_bytes)
            .map_err(|e| StoreError::Arena(Arc::new(e)))?;
        let disk = if cfg.dirs.is_empty() {
            None
        } else {
            let io = IoOptions {
                choice: cfg.io,
                queue_depth: cfg.queue_depth,
                direct: cfg.direct,
            };
            let d = DiskTier::open(
                &cfg.dirs,
                cfg.max_disk_bytes_per_dir,
                &io,
                cfg.staging_bytes,
            )?;
            crate::metrics::io_path(d.io_path());
            Some(d)
        };
        let shared = Arc::new(Shared {
            cfg,
            table: Mutex::new(Table {
                arena,
                heads: HashMap::default(),
                lru: VecDeque::new(),
                clock: 0,
                loads: HashMap::default(),
                tiers: TierCounts::default(),
                clusters: 0,
                stats: StoreStats::default(),
            }),
            disk,
            prefetch: Mutex::new(PrefetchQueue::default()),
            prefetch_cv: Condvar::new(),
        });
        let thread = if shared.disk.is_some() {
            let s = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("retrowave-prefetch".into())
                    .spawn(move || prefetch_loop(&s))
                    .map_err(|e| {
                        StoreError::Internal(format!("cannot start the prefetch thread: {e}"))
                    })?,
            )
        } else {
            None
        };
        let owner = Arc::new(Owner {
            shared: shared.clone(),
            thread: Mutex::new(thread),
        });
        Ok(TieredStore {
            shared,
            _owner: owner,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.shared.cfg
    }

    /// The disk tier's I/O path (`None` without a disk tier).
    pub fn io_path(&self) -> Option<IoPath> {
        self.shared.disk.as_ref().map(|d| d.io_path())
    }

    /// The private directories of the disk tier.
    pub fn disk_dirs(&self) -> Vec<std::path::PathBuf> {
        self.shared
            .disk
            .as_ref()
            .map(|d| d.dirs().map(|p| p.to_path_buf()).collect())
            .unwrap_or_default()
    }

    /// The page layout of f16/bf16 vectors of `head_dim` under this store's page size.
    pub fn layout(&self, head_dim: u32) -> PageLayout {
        PageLayout::half(head_dim, self.shared.cfg.page_tokens)
    }

    /// Appends clusters to a head (creating it on first use): `keys` and `values` are
    /// `[sum(sizes), head_dim]` arrays of 2-byte elements, the members of each cluster in turn.
    /// Returns the ids of the new clusters. On error nothing is appended.
    pub fn append(
        &self,
        head: HeadRef,
        head_dim: u32,
        keys: &[u8],
        values: &[u8],
        sizes: &[u32],
    ) -> Result<std::ops::Range<u32>, StoreError> {
        let layout = self.layout(head_dim);
        let vb = layout.vector_bytes();
        let tokens: u64 = sizes.iter().map(|&s| s as u64).sum();
        if keys.len() as u64 != tokens * vb as u64 || values.len() != keys.len() {
            return Err(StoreError::Shape(format!(
                "appending {} clusters of {tokens} tokens x {head_dim} dims needs {} key and value bytes, got {} and {}",
                sizes.len(),
                tokens * vb as u64,
                keys.len(),
                values.len()
            )));
        }
        if let Some(i) = sizes.iter().position(|&s| s == 0) {
            return Err(StoreError::Shape(format!(
                "cluster {i} of the append is empty"
            )));
        }
        {
            let t = self.table();
            if let Some(h) = t.heads.get(&head)
                && (h.dead || h.layout != layout)
            {
                return Err(StoreError::Shape(format!(
                    "sequence {}, layer {}, KV head {} holds {}-dim vectors, not {head_dim}",
                    head.seq.0, head.layer, head.kv_head, h.layout.head_dim
                )));
            }
        }
        // Records are filled and published in chunks, so that earlier chunks can spill while
        // later ones are written; an error rolls the whole append back.
        let chunk_limit = (self.shared.cfg.host_capacity_bytes as usize / 8).max(1);
        let mut first: Option<u32> = None;
        let mut end = 0u32;
        let mut from = 0usize;
        let mut i = 0usize;
        while i < sizes.len() {
            let mut extents = Vec::new();
            let mut chunk_bytes = 0usize;
            while i < sizes.len() && (extents.is_empty() || chunk_bytes < chunk_limit) {
                let s = sizes[i];
                let bytes = layout.record_bytes(s);
                let ext = match alloc_host(&self.shared, bytes) {
                    Ok(e) => e,
                    Err(e) => {
                        let mut t = self.table();
                        for (x, _) in extents {
                            t.arena.dealloc(x);
                        }
                        drop(t);
                        if let Some(f) = first {
                            self.rollback(head, f);
                        }
                        return Err(e);
                    }
                };
                let n = s as usize * vb;
                let dst = self.arena_slice_mut(ext, bytes);
                layout.pack(&keys[from..from + n], &values[from..from + n], s, dst);
                from += n;
                chunk_bytes += bytes;
                extents.push((ext, s));
                i += 1;
            }
            match self.publish(head, layout, extents) {
                Ok(ids) => {
                    first.get_or_insert(ids.start);
                    end = ids.end;
                }
                Err(e) => {
                    if let Some(f) = first {
                        self.rollback(head, f);
                    }
                    return Err(e);
                }
            }
        }
        let first = first.unwrap_or_else(|| self.clusters(head).unwrap_or(0));
        Ok(first..end.max(first))
    }

    /// Makes filled records visible as the next clusters of `head`.
    fn publish(
        &self,
        head: HeadRef,
        layout: PageLayout,
        extents: Vec<(Extent, u32)>,
    ) -> Result<std::ops::Range<u32>, StoreError> {
        let mut t = self.table();
        let t = &mut *t;
        let h = t.heads.entry(head).or_insert_with(|| HeadEntry {
            layout,
            clusters: Vec::new(),
            pinned: 0,
            dead: false,
        });
        if h.dead {
            // The sequence ended while we copied.
            for (x, _) in extents {
                t.arena.dealloc(x);
            }
            return Err(unknown_head(head));
        }
        let first = h.clusters.len() as u32;
        for (ext, s) in extents {
            t.clock += 1;
            let pages = layout.pages_for(s);
            let bytes = layout.record_bytes(s);
            h.clusters.push(Entry {
                tokens: s,
                pages,
                bytes: bytes as u32,
                host: Some(ext),
                disk: None,
                pins: 0,
                stamp: t.clock,
            });
            t.tiers.host_bytes += bytes as u64;
            t.tiers.host_pages += pages as u64;
            t.lru.push_back((
                t.clock,
                ClusterRef {
                    head,
                    cluster: h.clusters.len() as u32 - 1,
                },
            ));
        }
        let end = h.clusters.len() as u32;
        t.clusters += (end - first) as u64;
        t.publish_metrics();
        Ok(first..end)
    }

    /// Removes the clusters `first..` of a head (an append that failed part way).
    fn rollback(&self, head: HeadRef, first: u32) {
        let mut t = self.table();
        let t = &mut *t;
        let Some(h) = t.heads.get_mut(&head) else {
            return;
        };
        for mut e in h.clusters.drain(first as usize..) {
            t.clusters -= 1;
            if e.pins > 0 {
                // Nobody knows these ids yet; a reader guessing them keeps the record alive
                // until the sequence ends.
                continue;
            }
            release(
                &mut t.arena,
                &mut t.tiers,
                self.shared.disk.as_ref(),
                &mut e,
            );
        }
        if h.clusters.is_empty() && h.pinned == 0 {
            t.heads.remove(&head);
        }
        t.publish_metrics();
    }

    /// Number of clusters of a head.
    pub fn clusters(&self, head: HeadRef) -> Result<u32, StoreError> {
        Ok(self.table().head(head)?.clusters.len() as u32)
    }

    /// Tokens of a cluster.
    pub fn cluster_tokens(&self, c: ClusterRef) -> Result<u32, StoreError> {
        Ok(self.table().entry_mut(c)?.tokens)
    }

    /// Where a cluster is now: host memory (possibly with a disk copy) or disk only.
    pub fn tier_of(&self, c: ClusterRef) -> Result<Tier, StoreError> {
        let mut t = self.table();
        let e = t.entry_mut(c)?;
        Ok(if e.host.is_some() {
            Tier::Host
        } else {
            Tier::Disk
        })
    }

    /// Copies the records of `clusters` of one head into `out` (appended, one record after the
    /// other, in page layout), loading those on disk first. Returns where each landed.
    pub fn gather(
        &self,
        head: HeadRef,
        clusters: &[u32],
        out: &mut Vec<u8>,
    ) -> Result<Vec<RecordSpan>, StoreError> {
        let start = out.len();
        let spans = self.gather_with(head, clusters, |bytes| {
            out.resize(start + bytes, 0);
            Ok(&mut out[start..])
        })?;
        Ok(spans
            .into_iter()
            .map(|s| RecordSpan {
                offset: s.offset + start,
                ..s
            })
            .collect())
    }

    /// Copies the records of `clusters` of one head into `out` from its start (for example a
    /// page-locked staging buffer), loading those on disk first. Returns where each landed; an
    /// `out` shorter than the records is an error and nothing is copied.
    pub fn gather_into(
        &self,
        head: HeadRef,
        clusters: &[u32],
        out: &mut [u8],
    ) -> Result<Vec<RecordSpan>, StoreError> {
        let have = out.len();
        self.gather_with(head, clusters, |bytes| {
            if bytes > have {
                return Err(StoreError::Shape(format!(
                    "gathering {} clusters needs {bytes} bytes, the buffer has {have}",
                    clusters.len()
                )));
            }
            Ok(out)
        })
    }

    fn gather_with<'o>(
        &self,
        head: HeadRef,
        clusters: &[u32],
        out: impl FnOnce(usize) -> Result<&'o mut [u8], StoreError>,
    ) -> Result<Vec<RecordSpan>, StoreError> {
        let refs: Vec<ClusterRef> = clusters
            .iter()
            .map(|&cluster| ClusterRef { head, cluster })
            .collect();
        let pinned = self.pin_resident(&refs)?;
        let total: usize = pinned.iter().map(|p| p.bytes).sum();
        let out = match out(total) {
            Ok(o) => o,
            Err(e) => {
                self.unpin_all(&pinned);
                return Err(e);
            }
        };
        let mut spans = Vec::with_capacity(refs.len());
        for p in pinned.iter().take(GATHER_PREFETCH_AHEAD) {
            prefetch_record(p.slice());
        }
        let mut offset = 0;
        for (i, p) in pinned.iter().enumerate() {
            // Records sit at random places of the arena: start pulling the next one in while
            // this one is copied.
            if let Some(next) = pinned.get(i + GATHER_PREFETCH_AHEAD) {
                prefetch_record(next.slice());
            }
            spans.push(RecordSpan {
                cluster: p.cluster.cluster,
                tokens: p.tokens,
                offset,
                bytes: p.bytes,
                tier: p.tier,
            });
            out[offset..offset + p.bytes].copy_from_slice(p.slice());
            offset += p.bytes;
        }
        self.unpin_all(&pinned);
        Ok(spans)
    }

    /// Pins the records of `clusters` of one head in host memory, loading those on disk first,
    /// for reading in place (no copy): they are neither spilled nor freed until the returned
    /// guard is dropped. A record that finds no room in host memory is read into a buffer of the
    /// guard's own. On error nothing stays pinned.
    pub fn pin(&self, head: HeadRef, clusters: &[u32]) -> Result<PinnedRecords<'_>, StoreError> {
        let layout = self.table().head(head)?.layout;
        let refs: Vec<ClusterRef> = clusters
            .iter()
            .map(|&cluster| ClusterRef { head, cluster })
            .collect();
        let pinned = self.pin_resident(&refs)?;
        Ok(PinnedRecords {
            store: self,
            pinned,
            layout,
        })
    }

    /// Copies one cluster's keys and values (`[tokens, head_dim]` bytes each) into `keys` and
    /// `values` (appended).
    pub fn read_cluster(
        &self,
        c: ClusterRef,
        keys: &mut Vec<u8>,
        values: &mut Vec<u8>,
    ) -> Result<u32, StoreError> {
        let pinned = self.pin_resident(&[c])?;
        let layout = self.table().head(c.head).map(|h| h.layout);
        let r = layout.map(|layout| {
            let p = &pinned[0];
            layout.unpack(p.slice(), p.tokens, keys, values);
            p.tokens
        });
        self.unpin_all(&pinned);
        r
    }

    /// Names clusters that will be needed soon; a background thread loads those on disk into
    /// host memory. [`wait`](Self::wait) on the ticket before using them.
    pub fn prefetch(&self, clusters: &[ClusterRef]) -> Ticket {
        if let Some(_d) = &self.shared.disk {
            let mut wanted = Vec::new();
            {
                let mut t = self.table();
                for &c in clusters {
                    if let Ok(e) = t.entry_mut(c)
                        && e.host.is_none()
                    {
                        wanted.push(c);
                    }
                }
            }
            if !wanted.is_empty() {
                crate::metrics::prefetch_requests(wanted.len() as u64);
                lock(&self.shared.prefetch).queue.extend(wanted);
                self.shared.prefetch_cv.notify_one();
            }
        }
        Ticket {
            clusters: clusters.to_vec(),
        }
    }

    /// Blocks until the ticket's clusters are in host memory. Clusters the prefetch thread has not
    /// started yet are read now, ahead of the speculative queue.
    pub fn wait(&self, ticket: Ticket) -> Result<(), StoreError> {
        let results = load(&self.shared, &ticket.clusters, false, true);
        results.into_iter().collect()
    }

    /// Frees everything of a sequence (host pages and disk blocks). Records being read right now
    /// are freed when their readers finish.
    pub fn free_sequence(&self, seq: SeqId) {
        let mut t = self.table();
        let t = &mut *t;
        let heads: Vec<HeadRef> = t.heads.keys().filter(|h| h.seq == seq).copied().collect();
        for h in heads {
            let Some(mut head) = t.heads.remove(&h) else {
                continue;
            };
            for e in head.clusters.iter_mut() {
                t.clusters -= 1;
                if e.pins == 0 {
                    release(&mut t.arena, &mut t.tiers, self.shared.disk.as_ref(), e);
                } else if e.host.is_some() {
                    // Read right now: its memory goes back when the reader unpins it.
                    t.tiers.host_bytes -= e.bytes as u64;
                    t.tiers.host_pages -= e.pages as u64;
                }
            }
            if head.pinned > 0 {
                head.dead = true;
                t.heads.insert(h, head);
            }
        }
        t.publish_metrics();
    }

    /// Writes the coldest host records to disk until `bytes` of host memory are free (for tests
    /// and for making room ahead of a large prefill). Returns the records spilled.
    pub fn spill(&self, bytes: u64) -> Result<usize, StoreError> {
        let mut n = 0;
        loop {
            {
                let t = self.table();
                if t.arena.capacity_bytes() - t.arena.used_bytes() >= bytes {
                    return Ok(n);
                }
            }
            let k = evict_some(&self.shared, bytes as usize)?;
            if k == 0 {
                return Ok(n);
            }
            n += k;
        }
    }

    /// State and counters.
    pub fn stats(&self) -> StoreStats {
        let t = self.table();
        let mut s = t.stats;
        s.host_bytes = t.tiers.host_bytes;
        s.host_pages = t.tiers.host_pages;
        s.arena_used_bytes = t.arena.used_bytes();
        s.arena_capacity_bytes = t.arena.capacity_bytes();
        s.disk_bytes = t.tiers.disk_only_bytes;
        s.disk_pages = t.tiers.disk_only_pages;
        s.clusters = t.clusters;
        if let Some(d) = &self.shared.disk {
            let c = d.counters();
            s.spilled = c.records_written;
            s.disk_loads = c.records_read;
            s.checksum_failures = c.checksum_failures;
            s.disk_full = c.full;
        }
        s
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        lock(&self.shared.table)
    }

    #[allow(clippy::mut_from_ref)]
    fn arena_slice_mut(&self, ext: Extent, bytes: usize) -> &mut [u8] {
        let ptr = self.table().arena.ptr(ext);
        // SAFETY: the extent was just allocated and is not yet published: only the caller sees it.
        unsafe { std::slice::from_raw_parts_mut(ptr, bytes) }
    }

    /// Pins every cluster in host memory, loading the ones on disk (urgently).
    fn pin_resident(&self, refs: &[ClusterRef]) -> Result<Vec<Pinned>, StoreError> {
        let mut pinned = Vec::with_capacity(refs.len());
        let mut missing = Vec::new();
        let mut failed = None;
        {
            let mut t = self.table();
            let t = &mut *t;
            // Refs of one head come in runs (a gather is one head): look the head up once a run.
            let mut i = 0;
            'runs: while i < refs.len() {
                let head = refs[i].head;
                let run = refs[i..].iter().take_while(|c| c.head == head).count();
                let h = match t.heads.get_mut(&head) {
                    Some(h) if !h.dead => h,
                    _ => {
                        failed = Some(unknown_head(head));
                        break;
                    }
                };
                for &c in &refs[i..i + run] {
                    let stored = h.clusters.len();
                    let Some(e) = h.clusters.get_mut(c.cluster as usize) else {
                        failed = Some(StoreError::UnknownCluster {
                            seq: head.seq.0,
                            layer: head.layer,
                            kv_head: head.kv_head,
                            cluster: c.cluster,
                            stored,
                        });
                        break 'runs;
                    };
                    if let Some(ext) = e.host {
                        e.pins += 1;
                        h.pinned += 1;
                        t.clock += 1;
                        e.stamp = t.clock;
                        t.lru.push_back((t.clock, c));
                        pinned.push(Pinned {
                            cluster: c,
                            owned: None,
                            ptr: t.arena.ptr(ext).cast_const(),
                            bytes: e.bytes as usize,
                            tokens: e.tokens,
                            tier: Tier::Host,
                        });
                    } else {
                        missing.push(c);
                    }
                }
                i += run;
            }
            t.compact_lru();
            t.stats.host_reads += pinned.len() as u64;
            t.stats.disk_reads += missing.len() as u64;
            crate::metrics::cluster_reads(
                pinned.len() as u64,
                missing.len() as u64,
                t.stats.host_reads,
                t.stats.disk_reads,
            );
        }
        if let Some(err) = failed {
            self.unpin_all(&pinned);
            return Err(err);
        }
        if !missing.is_empty() {
            let results = load(&self.shared, &missing, true, true);
            let mut first_err = None;
            let mut t = self.table();
            for (&c, r) in missing.iter().zip(results) {
                let r = match r {
                    Err(StoreError::HostFull { .. } | StoreError::DiskFull { .. }) => {
                        // No room to bring it into host memory: read it straight for the caller.
                        drop(t);
                        let direct = self.read_direct(c);
                        t = self.table();
                        match direct {
                            Ok(p) => {
                                pinned.push(p);
                                continue;
                            }
                            Err(e) => Err(e),
                        }
                    }
                    r => r,
                };
                match r {
                    Ok(()) => {
                        // load() pinned it.
                        if let Ok(e) = t.entry_mut(c)
                            && let Some(ext) = e.host
                        {
                            let (bytes, tokens) = (e.bytes as usize, e.tokens);
                            let ptr = t.arena.ptr(ext).cast_const();
                            pinned.push(Pinned {
                                cluster: c,
                                owned: None,
                                ptr,
                                bytes,
                                tokens,
                                tier: Tier::Disk,
                            });
                        }
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            drop(t);
            if let Some(e) = first_err {
                self.unpin_all(&pinned);
                return Err(e);
            }
            // Keep the caller's order.
            let order: HashMap<ClusterRef, usize> =
                refs.iter().enumerate().map(|(i, &c)| (c, i)).collect();
            pinned.sort_by_key(|p| order.get(&p.cluster).copied().unwrap_or(usize::MAX));
        }
        Ok(pinned)
    }

    /// Reads a disk-only record into a buffer of its own.
    fn read_direct(&self, c: ClusterRef) -> Result<Pinned, StoreError> {
        let disk = self.shared.disk.as_ref().ok_or(StoreError::NoDiskTier)?;
        let (loc, page_bytes, bytes, tokens) = {
            let mut t = self.table();
            let page_bytes = t.head(c.head)?.layout.page_bytes();
            let e = t.entry_mut(c)?;
            let loc = e
                .disk
                .clone()
                .ok_or_else(|| StoreError::Internal(format!("cluster {c:?} has no disk copy")))?;
            (loc, page_bytes, e.bytes as usize, e.tokens)
        };
        let mut buf = vec![0u8; bytes];
        let item = ReadItem {
            loc: &loc,
            dst: buf.as_mut_ptr(),
            page_bytes,
            what: format!(
                "cluster {} of sequence {}, layer {}, KV head {}",
                c.cluster, c.head.seq.0, c.head.layer, c.head.kv_head
            ),
        };
        disk.read(std::slice::from_ref(&item))
            .pop()
            .unwrap_or_else(|| Err(StoreError::Internal("read result missing".into())))?;
        Ok(Pinned {
            cluster: c,
            ptr: std::ptr::null(),
            owned: Some(buf),
            bytes,
            tokens,
            tier: Tier::Disk,
        })
    }

    fn unpin_all(&self, pinned: &[Pinned]) {
        let mut t = self.table();
        let t = &mut *t;
        let disk = self.shared.disk.as_ref();
        let mut i = 0;
        while i < pinned.len() {
            let head = pinned[i].cluster.head;
            let run = pinned[i..]
                .iter()
                .take_while(|p| p.cluster.head == head)
                .count();
            match t.heads.get_mut(&head) {
                Some(h) if !h.dead => {
                    for p in pinned[i..i + run].iter().filter(|p| p.owned.is_none()) {
                        if let Some(e) = h.clusters.get_mut(p.cluster.cluster as usize) {
                            e.pins = e.pins.saturating_sub(1);
                            h.pinned = h.pinned.saturating_sub(1);
                        }
                    }
                }
                _ => {
                    for p in pinned[i..i + run].iter().filter(|p| p.owned.is_none()) {
                        t.unpin(p.cluster, disk);
                    }
                }
            }
            i += run;
        }
    }
}

/// Records pinned in host memory by [`TieredStore::pin`], in the order asked for; unpinned when
/// dropped.
pub struct PinnedRecords<'s> {
    store: &'s TieredStore,
    pinned: Vec<Pinned>,
    layout: PageLayout,
}

impl PinnedRecords<'_> {
    /// Records held.
    pub fn len(&self) -> usize {
        self.pinned.len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.pinned.is_empty()
    }

    /// The `i`-th record asked for, in page layout ([`Self::layout`]), and its tokens.
    pub fn record(&self, i: usize) -> (&[u8], u32) {
        let p = &self.pinned[i];
        (p.slice(), p.tokens)
    }

    /// Where the `i`-th record was when asked for.
    pub fn tier(&self, i: usize) -> Tier {
        self.pinned[i].tier
    }

    /// The page layout of the records.
    pub fn layout(&self) -> PageLayout {
        self.layout
    }
}

impl Drop for PinnedRecords<'_> {
    fn drop(&mut self) {
        self.store.unpin_all(&self.pinned);
    }
}

struct Pinned {
    cluster: ClusterRef,
    /// A copy read from disk without entering host memory (then `ptr` is unused and nothing
    /// is pinned).
    owned: Option<Vec<u8>>,
    ptr: *const u8,
    bytes: usize,
    tokens: u32,
    tier: Tier,
}

impl Pinned {
    fn slice(&self) -> &[u8] {
        if let Some(v) = &self.owned {
            return v;
        }
        // SAFETY: the record is pinned: it stays allocated and no one writes it until unpinned.
        unsafe { std::slice::from_raw_parts(self.ptr, self.bytes) }
    }
}

/// Records ahead of the one being copied whose start is prefetched.
const GATHER_PREFETCH_AHEAD: usize = 1;

/// Hints the first kilobyte of a record into the cache (the hardware prefetcher follows).
#[inline]
fn prefetch_record(r: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..r.len().min(1024)).step_by(64) {
        // SAFETY: prefetching an address inside a live slice has no effects but on caches.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                r.as_ptr().add(off).cast(),
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn alloc_host(shared: &Shared, bytes: usize) -> Result<Extent, StoreError> {
    loop {
        {
            let mut t = lock(&shared.table);
            if let Some(e) = t.arena.alloc(bytes) {
                return Ok(e);
            }
            if shared.disk.is_none() {
                return Err(StoreError::HostFull {
                    needed: bytes,
                    used: t.arena.used_bytes(),
                    capacity: t.arena.capacity_bytes(),
                    hint: "; configure store.dirs for a disk tier or raise store.host_capacity_bytes",
                });
            }
        }
        if evict_some(shared, bytes)? == 0 {
            let t = lock(&shared.table);
            return Err(StoreError::HostFull {
                needed: bytes,
                used: t.arena.used_bytes(),
                capacity: t.arena.capacity_bytes(),
                hint: "; every record in host memory is in use",
            });
        }
    }
}

/// Moves the least recently used unpinned host records out of host memory (writing those without
/// a disk copy), about `want` bytes or at least 32 records. Returns how many left host memory.
fn evict_some(shared: &Shared, want: usize) -> Result<usize, StoreError> {
    let Some(disk) = &shared.disk else {
        return Ok(0);
    };
    let mut victims: Vec<(ClusterRef, Extent, u32)> = Vec::new();
    let mut evicted = 0usize;
    {
        let mut t = lock(&shared.table);
        let t = &mut *t;
        let mut freed = 0usize;
        let target = want.max(t.arena.capacity_bytes() as usize / 256);
        // With the disk full, only records that already have a disk copy can leave.
        let clean_only = disk.is_full();
        let mut skipped = Vec::new();
        while freed < target || victims.len() + evicted < 32 {
            let Some((stamp, c)) = t.lru.pop_front() else {
                break;
            };
            let Some(h) = t.heads.get_mut(&c.head) else {
                continue;
            };
            if h.dead {
                continue;
            }
            let Some(e) = h.clusters.get_mut(c.cluster as usize) else {
                continue;
            };
            if e.stamp != stamp || e.host.is_none() {
                continue;
            }
            if e.pins > 0 {
                // Being read: it keeps its place, or it could never leave once unpinned.
                skipped.push((stamp, c));
                continue;
            }
            if clean_only && e.disk.is_none() {
                skipped.push((stamp, c));
                continue;
            }
            freed += e.bytes as usize;
            if e.disk.is_some() {
                // Clean: the disk copy is intact; drop the host copy.
                demote(&mut t.arena, &mut t.tiers, e);
                evicted += 1;
            } else {
                e.pins += 1;
                h.pinned += 1;
                victims.push((c, e.host.unwrap_or(Extent { start: 0, len: 0 }), e.bytes));
            }
        }
        for v in skipped.into_iter().rev() {
            t.lru.push_front(v);
        }
        if clean_only && evicted == 0 {
            return Err(StoreError::DiskFull {
                dirs: disk.dirs().map(|d| d.to_path_buf()).collect(),
                reason: "host memory is full and every record in it still needs writing".into(),
            });
        }
    }
    if victims.is_empty() {
        return Ok(evicted);
    }
    let (page_bytes, ptrs): (Vec<usize>, Vec<*const u8>) = {
        let t = lock(&shared.table);
        victims
            .iter()
            .map(|(c, ext, _)| {
                let pb = t.heads.get(&c.head).map_or(4096, |h| h.layout.page_bytes());
                (pb, t.arena.ptr(*ext).cast_const())
            })
            .unzip()
    };
    let items: Vec<WriteItem<'_>> = victims
        .iter()
        .zip(ptrs.iter().zip(&page_bytes))
        .map(|((_, _, bytes), (&ptr, &pb))| WriteItem {
            // SAFETY: the victim is pinned, so its extent stays allocated and unwritten.
            record: unsafe { std::slice::from_raw_parts(ptr, *bytes as usize) },
            page_bytes: pb,
        })
        .collect();
    let results = disk.write(&items);
    drop(items);
    let mut t = lock(&shared.table);
    let t = &mut *t;
    let mut first_err = None;
    let mut written = 0u64;
    for ((c, _, _), r) in victims.iter().zip(results) {
        let mut requeue = None;
        if let Some(h) = t.heads.get_mut(&c.head)
            && let Some(e) = h.clusters.get_mut(c.cluster as usize)
        {
            match r {
                Ok(loc) if !h.dead => {
                    written += 1;
                    e.disk = Some(loc);
                    if e.pins == 1 {
                        demote(&mut t.arena, &mut t.tiers, e);
                        evicted += 1;
                    } else {
                        requeue = Some(e.stamp);
                    }
                }
                Ok(loc) => disk.free(&loc),
                Err(err) => {
                    requeue = Some(e.stamp);
                    first_err.get_or_insert(err);
                }
            }
        }
        if let Some(s) = requeue {
            t.lru.push_front((s, *c));
        }
        t.unpin(*c, Some(disk));
    }
    crate::metrics::spilled(written);
    t.publish_metrics();
    match first_err {
        Some(e) if evicted == 0 => Err(e),
        _ => Ok(evicted),
    }
}

/// Loads disk-only clusters into host memory (one load per cluster however many ask), pinning
/// each for the caller when `pin`. `urgent` is false for the prefetch thread's loads, which are
/// counted as prefetched; every caller reads what is not in flight itself, so a needed-now read
/// never queues behind speculative ones.
fn load(
    shared: &Shared,
    refs: &[ClusterRef],
    pin: bool,
    urgent: bool,
) -> Vec<Result<(), StoreError>> {
    let mut results: Vec<Option<Result<(), StoreError>>> = (0..refs.len()).map(|_| None).collect();
    loop {
        let mut mine: Vec<(usize, ClusterRef, Arc<LoadSlot>, u32, DiskLoc, usize)> = Vec::new();
        let mut theirs: Vec<(usize, Arc<LoadSlot>)> = Vec::new();
        {
            let mut t = lock(&shared.table);
            let t = &mut *t;
            for (i, &c) in refs.iter().enumerate() {
                if results[i].is_some() {
                    continue;
                }
                let page_bytes = t.heads.get(&c.head).map_or(0, |h| h.layout.page_bytes());
                let (resident, disk_loc, bytes) = match t.entry_mut(c) {
                    Ok(e) => (e.host.is_some(), e.disk.clone(), e.bytes),
                    Err(err) => {
                        results[i] = Some(Err(err));
                        continue;
                    }
                };
                if resident {
                    if pin {
                        t.pin(c);
                    }
                    t.touch(c);
                    results[i] = Some(Ok(()));
                    continue;
                }
                if let Some(slot) = t.loads.get(&c) {
                    theirs.push((i, slot.clone()));
                    continue;
                }
                let Some(loc) = disk_loc else {
                    results[i] = Some(Err(StoreError::Internal(format!(
                        "cluster {c:?} is in neither tier"
                    ))));
                    continue;
                };
                let slot = Arc::new(LoadSlot::default());
                t.loads.insert(c, slot.clone());
                mine.push((i, c, slot, bytes, loc, page_bytes));
            }
        }
        if mine.is_empty() && theirs.is_empty() {
            break;
        }
        if !mine.is_empty() {
            // Host space for every record we load.
            let mut exts: Vec<Result<Extent, StoreError>> = Vec::with_capacity(mine.len());
            for m in &mine {
                exts.push(alloc_host(shared, m.3 as usize));
            }
            let (ptrs, whats): (Vec<*mut u8>, Vec<String>) = {
                let t = lock(&shared.table);
                mine.iter()
                    .zip(&exts)
                    .map(|(m, x)| {
                        let ptr = x.as_ref().map_or(std::ptr::null_mut(), |x| t.arena.ptr(*x));
                        let c = m.1;
                        let what = format!(
                            "cluster {} of sequence {}, layer {}, KV head {}",
                            c.cluster, c.head.seq.0, c.head.layer, c.head.kv_head
                        );
                        (ptr, what)
                    })
                    .unzip()
            };
            let idx: Vec<usize> = (0..mine.len()).filter(|&k| exts[k].is_ok()).collect();
            let items: Vec<ReadItem<'_>> = idx
                .iter()
                .map(|&k| ReadItem {
                    loc: &mine[k].4,
                    dst: ptrs[k],
                    page_bytes: mine[k].5,
                    what: whats[k].clone(),
                })
                .collect();
            let disk = shared.disk.as_ref();
            let read = match disk {
                Some(d) => d.read(&items),
                None => items.iter().map(|_| Err(StoreError::NoDiskTier)).collect(),
            };
            drop(items);
            let mut read_res: Vec<Option<Result<(), StoreError>>> =
                (0..mine.len()).map(|_| None).collect();
            for (k, r) in idx.into_iter().zip(read) {
                read_res[k] = Some(r);
            }
            let mut t = lock(&shared.table);
            for (k, (i, c, slot, _, _, _)) in mine.into_iter().enumerate() {
                let r = match (&exts[k], read_res[k].take()) {
                    (Err(e), _) => Err(e.clone()),
                    (Ok(x), Some(Ok(()))) => match t.set_host(c, *x) {
                        Ok(()) => {
                            if pin {
                                t.pin(c);
                            }
                            t.touch(c);
                            if !urgent {
                                t.stats.prefetched += 1;
                            }
                            Ok(())
                        }
                        Err(e) => {
                            t.arena.dealloc(*x);
                            Err(e)
                        }
                    },
                    (Ok(x), r) => {
                        t.arena.dealloc(*x);
                        r.unwrap_or_else(|| Err(StoreError::Internal("read result missing".into())))
                    }
                };
                t.loads.remove(&c);
                slot.finish(r.clone());
                results[i] = Some(r);
            }
            t.publish_metrics();
        }
        for (i, slot) in theirs {
            if let Err(e) = slot.wait() {
                results[i] = Some(Err(e));
            }
            // On success loop again: pin it (or load it again if it was evicted meanwhile).
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(StoreError::Internal("load result missing".into()))))
        .collect()
}

fn prefetch_loop(shared: &Shared) {
    loop {
        let batch: Vec<ClusterRef> = {
            let mut q = lock(&shared.prefetch);
            loop {
                if q.shutdown {
                    return;
                }
                if !q.queue.is_empty() {
                    break;
                }
                q = shared
                    .prefetch_cv
                    .wait(q)
                    .unwrap_or_else(|e| e.into_inner());
            }
            let n = q
                .queue
                .len()
                .min((shared.cfg.queue_depth as usize / 2).max(1));
            q.queue.drain(..n).collect()
        };
        // Skip what is already in host memory or being loaded by someone else.
        let todo: Vec<ClusterRef> = {
            let mut t = lock(&shared.table);
            batch
                .into_iter()
                .filter(|c| {
                    !t.loads.contains_key(c) && t.entry_mut(*c).is_ok_and(|e| e.host.is_none())
                })
                .collect()
        };
        if !todo.is_empty() {
            for r in load(shared, &todo, false, false) {
                if let Err(e) = r {
                    tracing::warn!("prefetch failed: {e}");
                }
            }
        }
    }
}
