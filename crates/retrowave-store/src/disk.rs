//! The disk tier: cluster records in files under private directories, one file per configured
//! directory (several directories stripe records across disks).
//!
//! Transfers go through the [`IoEngine`] (io_uring or pread/pwrite) in batches, via aligned staging
//! buffers registered with io_uring, so O_DIRECT works whatever the record size and the arena's
//! alignment. Every page written carries a CRC32C kept beside its location; a read whose bytes do
//! not match comes back as [`StoreError::Checksum`](crate::StoreError::Checksum), never as data.
//! Files live in `retrowave-kv-<pid>-<n>` directories that are removed when the tier is dropped;
//! directories left behind by a process that no longer runs are removed at start.

use crate::StoreError;
use crate::io::{IO_ALIGN, IoEngine, IoFile, IoOp, IoOptions, IoPath, OpKind};
use crate::ranges::{Extent, RangeAllocator};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

const PRIVATE_PREFIX: &str = "retrowave-kv-";

/// Reads per batch from which checksums are verified on a second thread.
const PARALLEL_VERIFY_MIN: usize = 256;

/// Where a record lives on disk, with the checksum of each of its pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLoc {
    /// Index of the file (directory) holding it.
    pub file: u16,
    /// Blocks of [`IO_ALIGN`] bytes.
    pub blocks: Extent,
    /// Bytes of the record (the rest of the last block is padding).
    pub bytes: u32,
    /// CRC32C of each page.
    pub crcs: Box<[u32]>,
}

impl DiskLoc {
    /// Byte offset in its file.
    pub fn offset(&self) -> u64 {
        self.blocks.start * IO_ALIGN as u64
    }
}

struct TierFile {
    dir: PathBuf,
    file: IoFile,
    blocks: Mutex<RangeAllocator>,
}

/// Aligned staging memory handed out in [`IO_ALIGN`] blocks.
struct Staging {
    buf: crate::io::AlignedBuf,
    blocks: Mutex<RangeAllocator>,
    freed: Condvar,
}

impl Staging {
    fn lock(&self) -> MutexGuard<'_, RangeAllocator> {
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counters of the disk tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskCounters {
    /// Records read and verified.
    pub records_read: u64,
    /// Records written.
    pub records_written: u64,
    /// Pages whose checksum did not match.
    pub checksum_failures: u64,
    /// Reads or writes that failed with an I/O error.
    pub io_errors: u64,
    /// Writes refused because a disk or its quota was full.
    pub full: u64,
}

/// The disk tier of a store.
pub struct DiskTier {
    engine: IoEngine,
    files: Vec<TierFile>,
    staging: Staging,
    next_file: AtomicUsize,
    counters: Mutex<DiskCounters>,
    /// A write failed for lack of space and nothing was freed since.
    full: std::sync::atomic::AtomicBool,
}

/// One record to write: its bytes (whole pages) and the page size.
pub struct WriteItem<'a> {
    /// The record.
    pub record: &'a [u8],
    /// Bytes per page (checksum granularity).
    pub page_bytes: usize,
}

/// One record to read into `dst` (`loc.bytes` long).
pub struct ReadItem<'a> {
    /// Where it is.
    pub loc: &'a DiskLoc,
    /// Where it goes.
    pub dst: *mut u8,
    /// Bytes per page.
    pub page_bytes: usize,
    /// Names the record in errors.
    pub what: String,
}

// SAFETY: `dst` is memory the caller reserved for this item alone; the tier writes it from one
// thread at a time (whichever verifies the completed read).
unsafe impl Send for ReadItem<'_> {}
// SAFETY: as above; shared references only hand the pointer to that one writer.
unsafe impl Sync for ReadItem<'_> {}

impl DiskTier {
    /// Opens the tier: a private directory and file under each of `dirs`, after removing the
    /// private directories of processes that no longer run.
    pub fn open(
        dirs: &[PathBuf],
        max_bytes_per_dir: Option<u64>,
        io: &IoOptions,
        staging_bytes: usize,
    ) -> Result<DiskTier, StoreError> {
        let engine = IoEngine::new(io).map_err(|e| StoreError::io("starting the I/O engine", e))?;
        if let Some(reason) = engine.fallback_reason() {
            tracing::warn!("io_uring is not available ({reason}); the disk tier uses pread/pwrite");
        }
        tracing::info!(path = %engine.path(), "disk tier I/O path");
        let mut files = Vec::with_capacity(dirs.len());
        let limit_blocks =
            max_bytes_per_dir.map_or(u64::MAX / IO_ALIGN as u64, |b| b / IO_ALIGN as u64);
        for dir in dirs {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Dir {
                dir: dir.clone(),
                reason: e.to_string(),
            })?;
            remove_stale(dir);
            let private = create_private(dir)?;
            let file = IoFile::create(&private.join("pages.kv"), io.direct)
                .map_err(|e| StoreError::io("creating the disk tier file", e))?;
            files.push(TierFile {
                dir: private,
                file,
                blocks: Mutex::new(RangeAllocator::new(limit_blocks)),
            });
        }
        let staging_blocks = staging_bytes.div_ceil(IO_ALIGN).max(1);
        let buf = crate::io::AlignedBuf::zeroed(staging_blocks * IO_ALIGN);
        let tier = DiskTier {
            engine,
            files,
            staging: Staging {
                buf,
                blocks: Mutex::new(RangeAllocator::new(staging_blocks as u64)),
                freed: Condvar::new(),
            },
            next_file: AtomicUsize::new(0),
            counters: Mutex::new(DiskCounters::default()),
            full: std::sync::atomic::AtomicBool::new(false),
        };
        let region = (tier.staging.buf.as_ptr().cast_mut(), tier.staging.buf.len());
        // SAFETY: the staging buffer lives as long as the engine (both owned by the tier).
        if let Err(e) = unsafe { tier.engine.register_buffers(&[region]) } {
            tracing::warn!("cannot register the staging buffers with io_uring: {e}");
        }
        Ok(tier)
    }

    /// The active I/O path.
    pub fn io_path(&self) -> IoPath {
        self.engine.path()
    }

    /// Why io_uring is not used, when it is not.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.engine.fallback_reason()
    }

    /// The private directories holding the files.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.dir.as_path())
    }

    /// Bytes of records on disk.
    pub fn used_bytes(&self) -> u64 {
        self.files
            .iter()
            .map(|f| lock(&f.blocks).used() * IO_ALIGN as u64)
            .sum()
    }

    /// Counters since start.
    pub fn counters(&self) -> DiskCounters {
        *lock(&self.counters)
    }

    /// Queue depth of the I/O engine.
    pub fn queue_depth(&self) -> u32 {
        self.engine.queue_depth()
    }

    /// Frees a record's blocks.
    pub fn free(&self, loc: &DiskLoc) {
        if let Some(f) = self.files.get(loc.file as usize) {
            lock(&f.blocks).dealloc(loc.blocks);
            self.full.store(false, Ordering::Relaxed);
        }
    }

    /// Whether a write failed for lack of space since blocks were last freed.
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// Writes records, returning where each went. A record that fails (full disk, I/O error)
    /// holds no blocks afterwards; the others are unaffected.
    pub fn write(&self, items: &[WriteItem<'_>]) -> Vec<Result<DiskLoc, StoreError>> {
        let mut out: Vec<Option<Result<DiskLoc, StoreError>>> =
            (0..items.len()).map(|_| None).collect();
        let mut pending: Vec<usize> = (0..items.len()).collect();
        while !pending.is_empty() {
            let (batch, rest) = self.take_staging(&pending, |i| items[i].record.len());
            pending = rest;
            let mut ops_meta = Vec::with_capacity(batch.len());
            for (i, stage) in batch {
                let item = &items[i];
                let loc = match self.alloc_blocks(item.record.len(), item.page_bytes, item.record) {
                    Ok(loc) => loc,
                    Err(e) => {
                        self.release_all(vec![stage]);
                        out[i] = Some(Err(e));
                        continue;
                    }
                };
                let dst = stage.slice_mut(&self.staging);
                dst[..item.record.len()].copy_from_slice(item.record);
                dst[item.record.len()..].fill(0);
                ops_meta.push((i, loc, stage));
            }
            let ops: Vec<IoOp<'_>> = ops_meta
                .iter()
                .map(|(_, loc, stage)| self.op(loc, stage, OpKind::Write))
                .collect();
            // SAFETY: each op's buffer is a staging range reserved for this op until release.
            let results = unsafe { self.engine.submit(&ops) };
            drop(ops);
            let mut used = Vec::with_capacity(ops_meta.len());
            for ((i, loc, stage), r) in ops_meta.into_iter().zip(results) {
                used.push(stage);
                out[i] = Some(match r {
                    Ok(_) => {
                        lock(&self.counters).records_written += 1;
                        Ok(loc)
                    }
                    Err(e) => {
                        self.free(&loc);
                        let mut c = lock(&self.counters);
                        let err = StoreError::io(
                            format!(
                                "writing {} bytes to {}",
                                loc.bytes,
                                self.files[loc.file as usize].file.path().display()
                            ),
                            e,
                        );
                        if matches!(err, StoreError::DiskFull { .. }) {
                            c.full += 1;
                            self.full.store(true, Ordering::Relaxed);
                        } else {
                            c.io_errors += 1;
                            crate::metrics::io_error();
                        }
                        Err(err)
                    }
                });
            }
            self.release_all(used);
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::Internal("write result missing".into()))))
            .collect()
    }

    /// Reads records into their destinations, verifying every page's checksum. A destination is
    /// written only when the whole record arrived intact.
    pub fn read(&self, items: &[ReadItem<'_>]) -> Vec<Result<(), StoreError>> {
        let mut out: Vec<Option<Result<(), StoreError>>> = (0..items.len()).map(|_| None).collect();
        let mut pending: Vec<usize> = (0..items.len()).collect();
        while !pending.is_empty() {
            let (batch, rest) = self.take_staging(&pending, |i| items[i].loc.bytes as usize);
            pending = rest;
            let ops: Vec<IoOp<'_>> = batch
                .iter()
                .map(|(i, stage)| self.op(items[*i].loc, stage, OpKind::Read))
                .collect();
            let t0 = Instant::now();
            // Records are verified and copied out as their reads complete, while later reads
            // are still in flight: on a second thread for large batches, so that the thread
            // driving the ring only reaps and refills.
            let verify = |k: usize| -> Option<Result<(), StoreError>> {
                let (i, stage) = batch.get(k)?;
                Some(self.verify_and_copy(&items[*i], stage.slice(&self.staging)))
            };
            let (results, verified) = if batch.len() >= PARALLEL_VERIFY_MIN {
                // Completed op indices are published through atomics rather than a channel: a
                // wake-up per completion would cost the ring thread a system call each.
                let n = batch.len();
                let slots: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                let published = AtomicUsize::new(0);
                let finished = std::sync::atomic::AtomicBool::new(false);
                let (slots, published, finished, verify) = (&slots, &published, &finished, &verify);
                std::thread::scope(|s| {
                    let worker = s.spawn(move || {
                        let mut v: Vec<Option<Result<(), StoreError>>> =
                            (0..n).map(|_| None).collect();
                        let mut seen = 0;
                        let mut idle = 0u32;
                        loop {
                            let p = published.load(Ordering::Acquire);
                            if seen < p {
                                idle = 0;
                                while seen < p {
                                    let k = slots[seen].load(Ordering::Relaxed);
                                    if let Some(slot) = v.get_mut(k) {
                                        *slot = verify(k);
                                    }
                                    seen += 1;
                                }
                            } else if finished.load(Ordering::Acquire) {
                                if seen == published.load(Ordering::Acquire) {
                                    break;
                                }
                            } else if idle < 64 {
                                idle += 1;
                                std::hint::spin_loop();
                            } else {
                                std::thread::yield_now();
                            }
                        }
                        v
                    });
                    let mut count = 0usize;
                    let mut on_done = |k: usize, r: &Result<usize, crate::io::IoError>| {
                        if r.is_ok() && count < n {
                            slots[count].store(k, Ordering::Relaxed);
                            count += 1;
                            published.store(count, Ordering::Release);
                        }
                    };
                    // SAFETY: each op's buffer is a staging range reserved for this op until
                    // release; the worker reads only buffers of completed ops.
                    let results = unsafe { self.engine.submit_with(&ops, &mut on_done) };
                    finished.store(true, Ordering::Release);
                    let verified = worker
                        .join()
                        .unwrap_or_else(|_| (0..n).map(|_| None).collect());
                    (results, verified)
                })
            } else {
                let mut verified: Vec<Option<Result<(), StoreError>>> =
                    (0..batch.len()).map(|_| None).collect();
                let mut on_done = |k: usize, r: &Result<usize, crate::io::IoError>| {
                    if r.is_ok()
                        && let Some(slot) = verified.get_mut(k)
                    {
                        *slot = verify(k);
                    }
                };
                // SAFETY: as above; the callback reads only the buffer of the op that completed.
                let results = unsafe { self.engine.submit_with(&ops, &mut on_done) };
                (results, verified)
            };
            crate::metrics::disk_read_batch(t0.elapsed(), ops.len());
            drop(ops);
            let mut used = Vec::with_capacity(batch.len());
            for (((i, stage), r), v) in batch.into_iter().zip(results).zip(verified) {
                let item = &items[i];
                let res = match (r, v) {
                    (Ok(_), Some(v)) => v,
                    (Ok(_), None) => Err(StoreError::Internal(
                        "completed read was not verified".into(),
                    )),
                    (Err(e), _) => {
                        lock(&self.counters).io_errors += 1;
                        crate::metrics::io_error();
                        let path = self.files[item.loc.file as usize]
                            .file
                            .path()
                            .display()
                            .to_string();
                        Err(StoreError::io(
                            format!("reading {} from {path}", item.what),
                            e,
                        ))
                    }
                };
                used.push(stage);
                out[i] = Some(res);
            }
            self.release_all(used);
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::Internal("read result missing".into()))))
            .collect()
    }

    fn verify_and_copy(&self, item: &ReadItem<'_>, data: &[u8]) -> Result<(), StoreError> {
        let bytes = item.loc.bytes as usize;
        for (p, (page, &want)) in data[..bytes]
            .chunks(item.page_bytes)
            .zip(item.loc.crcs.iter())
            .enumerate()
        {
            let got = crc32c::crc32c(page);
            if got != want {
                let mut c = lock(&self.counters);
                c.checksum_failures += 1;
                crate::metrics::checksum_failure();
                return Err(StoreError::Checksum {
                    what: item.what.clone(),
                    page: p as u32,
                    file: self.files[item.loc.file as usize].file.path().to_path_buf(),
                    offset: item.loc.offset() + (p * item.page_bytes) as u64,
                });
            }
        }
        // SAFETY: the caller reserved `dst` for `loc.bytes` bytes and nobody else uses it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), item.dst, bytes) };
        lock(&self.counters).records_read += 1;
        Ok(())
    }

    fn alloc_blocks(
        &self,
        bytes: usize,
        page_bytes: usize,
        record: &[u8],
    ) -> Result<DiskLoc, StoreError> {
        let blocks = bytes.div_ceil(IO_ALIGN) as u64;
        let n = self.files.len();
        if n == 0 {
            return Err(StoreError::NoDiskTier);
        }
        let first = self.next_file.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            let fi = (first + k) % n;
            if let Some(extent) = lock(&self.files[fi].blocks).alloc(blocks) {
                let crcs = record.chunks(page_bytes).map(crc32c::crc32c).collect();
                return Ok(DiskLoc {
                    file: fi as u16,
                    blocks: extent,
                    bytes: bytes as u32,
                    crcs,
                });
            }
        }
        lock(&self.counters).full += 1;
        self.full.store(true, Ordering::Relaxed);
        Err(StoreError::DiskFull {
            dirs: self.files.iter().map(|f| f.dir.clone()).collect(),
            reason: "the configured max_disk_bytes_per_dir is used up".into(),
        })
    }

    /// Reserves staging ranges for as many of `pending` as fit (at least one, waiting for space
    /// if needed); returns them and the rest.
    fn take_staging(
        &self,
        pending: &[usize],
        bytes_of: impl Fn(usize) -> usize,
    ) -> (Vec<(usize, Stage)>, Vec<usize>) {
        let mut taken = Vec::new();
        let mut rest = Vec::new();
        // Enough ops per submission that the queue rarely drains between batches.
        let limit = self.engine.queue_depth().max(1) as usize * 64;
        let mut guard = self.staging.lock();
        for &i in pending {
            let blocks = bytes_of(i).div_ceil(IO_ALIGN).max(1) as u64;
            if taken.len() >= limit {
                rest.push(i);
                continue;
            }
            if blocks > guard.limit() {
                // Larger than all staging memory: a buffer of its own.
                taken.push((
                    i,
                    Stage::Own(crate::io::AlignedBuf::zeroed(blocks as usize * IO_ALIGN)),
                ));
                continue;
            }
            match guard.alloc(blocks) {
                Some(e) => taken.push((i, Stage::Shared(e))),
                None if taken.is_empty() => {
                    // Wait for another batch to release staging memory.
                    loop {
                        guard = self
                            .staging
                            .freed
                            .wait(guard)
                            .unwrap_or_else(|e| e.into_inner());
                        if let Some(e) = guard.alloc(blocks) {
                            taken.push((i, Stage::Shared(e)));
                            break;
                        }
                    }
                }
                None => rest.push(i),
            }
        }
        (taken, rest)
    }

    /// The transfer of one record between its blocks and its staging range.
    fn op(&self, loc: &DiskLoc, stage: &Stage, kind: OpKind) -> IoOp<'_> {
        IoOp {
            file: &self.files[loc.file as usize].file,
            offset: loc.offset(),
            buf: stage.ptr(&self.staging),
            len: stage.len(),
            kind,
        }
    }

    fn release_all(&self, stages: Vec<Stage>) {
        let mut g = self.staging.lock();
        let mut any = false;
        for stage in stages {
            if let Stage::Shared(e) = stage {
                g.dealloc(e);
                any = true;
            }
        }
        drop(g);
        if any {
            self.staging.freed.notify_all();
        }
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        for f in &self.files {
            if let Err(e) = std::fs::remove_dir_all(&f.dir) {
                tracing::warn!("cannot remove {}: {e}", f.dir.display());
            }
        }
    }
}

enum Stage {
    Shared(Extent),
    Own(crate::io::AlignedBuf),
}

impl Stage {
    fn len(&self) -> usize {
        match self {
            Stage::Shared(e) => e.len as usize * IO_ALIGN,
            Stage::Own(b) => b.len(),
        }
    }
    fn ptr(&self, s: &Staging) -> *mut u8 {
        match self {
            // SAFETY: staging extents lie inside the staging buffer.
            Stage::Shared(e) => unsafe {
                s.buf.as_ptr().cast_mut().add(e.start as usize * IO_ALIGN)
            },
            Stage::Own(b) => b.as_ptr().cast_mut(),
        }
    }
    fn slice<'a>(&'a self, s: &'a Staging) -> &'a [u8] {
        // SAFETY: the range is reserved for this stage; no one else writes it meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr(s), self.len()) }
    }
    #[allow(clippy::mut_from_ref)]
    fn slice_mut<'a>(&'a self, s: &'a Staging) -> &'a mut [u8] {
        // SAFETY: the range is reserved for this stage; no one else reads or writes it meanwhile.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(s), self.len()) }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

static PRIVATE_SEQ: AtomicUsize = AtomicUsize::new(0);

fn create_private(dir: &Path) -> Result<PathBuf, StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    let name = format!(
        "{PRIVATE_PREFIX}{}-{}",
        std::process::id(),
        PRIVATE_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let path = dir.join(name);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&path)
        .map_err(|e| StoreError::Dir {
            dir: path.clone(),
            reason: e.to_string(),
        })?;
    Ok(path)
}

/// Removes `retrowave-kv-<pid>-<n>` directories whose process is gone.
fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(PRIVATE_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => tracing::info!(
                    "removed stale KV files of process {pid}: {}",
                    entry.path().display()
                ),
                Err(e) => tracing::warn!("cannot remove stale {}: {e}", entry.path().display()),
            }
        }
    }
}
