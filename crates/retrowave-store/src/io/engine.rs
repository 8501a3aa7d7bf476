//! The engine that executes batches of ops through io_uring or `pread`/`pwrite`.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use io_uring::{IoUring, Probe, opcode, squeue, types};

use super::{
    IoChoice, IoError, IoOp, IoOptions, IoPath, IoStats, OpKind, Progress, Step, precheck,
};

/// Largest queue depth an engine accepts.
const MAX_QUEUE_DEPTH: u32 = 4096;

/// How many new ops one `io_uring_enter` submits on a ring of `queue_depth`.
///
/// Small batches keep the device fed: submitting a whole queue at once spends hundreds of
/// microseconds in the kernel issuing requests while completed slots stay empty. On a
/// virtio disk, 8 KiB random reads at depth 64 went from ~59k IOPS (batch 64) to ~64k (batch 4;
/// fio: ~67k).
fn submit_batch(queue_depth: u32) -> u32 {
    (queue_depth / 16).clamp(1, 8)
}

/// Largest fixed buffer io_uring registers (1 GiB).
const MAX_FIXED_LEN: usize = 1 << 30;

/// Most fixed buffers io_uring registers.
const MAX_FIXED_COUNT: usize = 1 << 14;

/// Executes batches of [`IoOp`]s through io_uring or `pread`/`pwrite`.
///
/// `Send + Sync`: several threads may call [`IoEngine::submit`]; on the io_uring path the ring is
/// behind a mutex and calls are serialised, on the `pread` path they run in parallel.
#[derive(Debug)]
pub struct IoEngine {
    backend: Backend,
    queue_depth: u32,
    fallback: Option<String>,
    counters: Counters,
}

#[derive(Debug)]
enum Backend {
    Uring(Box<Mutex<Ring>>),
    Pread,
}

struct Ring {
    ring: IoUring,
    /// Registered fixed buffers, sorted by start address.
    regions: Vec<Region>,
    /// Set after an unrecoverable `io_uring_enter` failure; every later op fails with it.
    broken: Option<String>,
    /// Ops issued with READ_FIXED/WRITE_FIXED (for tests).
    fixed_ops: u64,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("entries", &self.ring.params().sq_entries())
            .field("regions", &self.regions.len())
            .field("broken", &self.broken)
            .finish()
    }
}

#[derive(Debug, Clone, Copy)]
struct Region {
    start: usize,
    end: usize,
    index: u16,
}

#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    max_in_flight: AtomicU32,
}

impl IoEngine {
    /// Creates an engine for `opts.choice`.
    ///
    /// [`IoChoice::Auto`] sets up a ring and checks (opcode probe and a no-op round trip) that
    /// the operations used are supported; if anything fails (no io_uring in the kernel, the
    /// `kernel.io_uring_disabled` sysctl, seccomp, missing opcodes) it falls back to
    /// `pread`/`pwrite`, logs a warning and keeps the reason ([`IoEngine::fallback_reason`]).
    /// [`IoChoice::Uring`] fails with [`IoError::Unavailable`] instead.
    pub fn new(opts: &IoOptions) -> Result<IoEngine, IoError> {
        let queue_depth = opts.queue_depth.clamp(1, MAX_QUEUE_DEPTH);
        let (backend, fallback) = match opts.choice {
            IoChoice::Pread => (Backend::Pread, None),
            IoChoice::Uring => {
                let ring =
                    setup_ring(queue_depth).map_err(|reason| IoError::Unavailable { reason })?;
                (Backend::Uring(Box::new(Mutex::new(ring))), None)
            }
            IoChoice::Auto => match setup_ring(queue_depth) {
                Ok(ring) => (Backend::Uring(Box::new(Mutex::new(ring))), None),
                Err(reason) => {
                    tracing::warn!(%reason, "io_uring unavailable; disk tier falls back to pread/pwrite");
                    (Backend::Pread, Some(reason))
                }
            },
        };
        let engine = IoEngine {
            backend,
            queue_depth,
            fallback,
            counters: Counters::default(),
        };
        tracing::debug!(path = %engine.path(), queue_depth, "disk tier I/O engine ready");
        Ok(engine)
    }

    /// The system call path in use.
    pub fn path(&self) -> IoPath {
        match self.backend {
            Backend::Uring(_) => IoPath::Uring,
            Backend::Pread => IoPath::Pread,
        }
    }

    /// Why [`IoChoice::Auto`] fell back to `pread`/`pwrite`, if it did.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// Most ops kept in flight on the io_uring path (the configured depth clamped to 1..=4096).
    pub fn queue_depth(&self) -> u32 {
        self.queue_depth
    }

    /// Registers fixed buffers with the ring (io_uring only; a no-op on the `pread` path).
    ///
    /// Ops whose buffer lies entirely inside one registered region then use
    /// `READ_FIXED`/`WRITE_FIXED`, which saves pinning the pages on every op. Registering again
    /// replaces the previous set; an empty `regions` just drops it. At most 16384 regions of at
    /// most 1 GiB each. If registration fails, no region is registered afterwards.
    ///
    /// # Safety
    ///
    /// Every region must be valid memory of that length that stays allocated (and is not
    /// unmapped or remapped) until it is replaced by another call or the engine is dropped: the
    /// kernel keeps the pages pinned and fixed ops go to those pages.
    pub unsafe fn register_buffers(&self, regions: &[(*mut u8, usize)]) -> Result<(), IoError> {
        let Backend::Uring(ring) = &self.backend else {
            return Ok(());
        };
        let mut r = lock(ring);
        let total: usize = regions.iter().map(|&(_, len)| len).sum();
        let fail = |source: io::Error| IoError::Os {
            path: PathBuf::from("<io_uring fixed buffers>"),
            offset: 0,
            len: total,
            op: "register_buffers",
            source,
        };
        if !r.regions.is_empty() {
            r.regions.clear();
            r.ring.submitter().unregister_buffers().map_err(fail)?;
        }
        if regions.is_empty() {
            return Ok(());
        }
        let bad = regions
            .iter()
            .any(|&(p, len)| p.is_null() || len == 0 || len > MAX_FIXED_LEN);
        if regions.len() > MAX_FIXED_COUNT || bad {
            return Err(fail(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} regions given; at most {MAX_FIXED_COUNT} non-empty regions of at most 1 GiB each can be registered",
                    regions.len()
                ),
            )));
        }
        let iovecs: Vec<libc::iovec> = regions
            .iter()
            .map(|&(p, len)| libc::iovec {
                iov_base: p.cast(),
                iov_len: len,
            })
            .collect();
        // SAFETY: the caller guarantees the regions stay valid while registered.
        unsafe { r.ring.submitter().register_buffers(&iovecs) }.map_err(fail)?;
        let mut sorted: Vec<Region> = regions
            .iter()
            .enumerate()
            .map(|(i, &(p, len))| Region {
                start: p as usize,
                end: p as usize + len,
                // At most MAX_FIXED_COUNT regions, so the index fits.
                index: i as u16,
            })
            .collect();
        sorted.sort_by_key(|g| g.start);
        r.regions = sorted;
        Ok(())
    }

    /// Runs every op to completion and returns one result per op, in op order: the number of
    /// bytes transferred (always `op.len`) or the error of that op.
    ///
    /// On the io_uring path up to [`IoEngine::queue_depth`] ops are in flight at once: new ops
    /// are submitted a few per system call (queue depth / 16, 1..=8) so the device never waits
    /// long for work, completions are reaped from the ring as they arrive and their slots
    /// refilled; the engine sleeps in the kernel only when the queue is full or nothing else can
    /// be issued. The `pread` path runs the ops one after
    /// another on the calling thread. On both paths:
    /// - ops on `O_DIRECT` files whose buffer address, offset or length is not a multiple of
    ///   [`IO_ALIGN`](super::IO_ALIGN) fail with [`IoError::Misaligned`] without being issued;
    /// - a short transfer on a buffered file is retried once for the remainder; a short read on
    ///   an `O_DIRECT` file (end of file) is reported as [`IoError::Short`], as is a transfer
    ///   that moves nothing;
    /// - `EINTR`/`EAGAIN` reissue the op; `ENOSPC`/`EDQUOT`/`EFBIG` give [`IoError::NoSpace`];
    /// - a failed op does not stop the others.
    ///
    /// # Safety
    ///
    /// Each op's `buf` must be valid for `len` bytes (writable for reads) and must not be
    /// accessed by anything else (nor belong to another op of the batch, for reads) until
    /// `submit` returns.
    pub unsafe fn submit(&self, ops: &[IoOp<'_>]) -> Vec<Result<usize, IoError>> {
        // SAFETY: forwarded from the caller.
        unsafe { self.submit_with(ops, &mut |_, _| {}) }
    }

    /// [`submit`](Self::submit), calling `on_done(index, result)` as each op finishes (in
    /// completion order, on the calling thread) so that callers can consume finished buffers
    /// while later ops are still in flight.
    ///
    /// # Safety
    ///
    /// As for [`submit`](Self::submit); `on_done` may read the buffer of the op it is called
    /// for, and no other.
    pub unsafe fn submit_with(
        &self,
        ops: &[IoOp<'_>],
        on_done: &mut dyn FnMut(usize, &Result<usize, IoError>),
    ) -> Vec<Result<usize, IoError>> {
        let results = match &self.backend {
            // SAFETY: forwarded from the caller.
            Backend::Uring(ring) => unsafe { self.submit_uring(&mut lock(ring), ops, on_done) },
            Backend::Pread => {
                let results: Vec<_> = ops
                    .iter()
                    .enumerate()
                    .map(|(i, op)| {
                        // SAFETY: forwarded from the caller.
                        let r = unsafe { run_pread(op) };
                        on_done(i, &r);
                        r
                    })
                    .collect();
                if results.iter().any(|r| matches!(r, Ok(n) if *n > 0)) {
                    self.counters.max_in_flight.fetch_max(1, Ordering::Relaxed);
                }
                results
            }
        };
        self.account(ops, &results);
        results
    }

    /// Counters since creation.
    pub fn stats(&self) -> IoStats {
        let c = &self.counters;
        IoStats {
            reads: c.reads.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            max_in_flight: c.max_in_flight.load(Ordering::Relaxed),
        }
    }

    /// Number of ops issued with `READ_FIXED`/`WRITE_FIXED` so far (0 on the `pread` path).
    #[cfg(test)]
    pub(crate) fn fixed_ops(&self) -> u64 {
        match &self.backend {
            Backend::Uring(ring) => lock(ring).fixed_ops,
            Backend::Pread => 0,
        }
    }

    fn account(&self, ops: &[IoOp<'_>], results: &[Result<usize, IoError>]) {
        let (mut reads, mut writes, mut bytes_read, mut bytes_written, mut errors) =
            (0, 0, 0, 0, 0);
        for (op, r) in ops.iter().zip(results) {
            match (r, op.kind) {
                (Ok(n), OpKind::Read) => {
                    reads += 1;
                    bytes_read += *n as u64;
                }
                (Ok(n), OpKind::Write) => {
                    writes += 1;
                    bytes_written += *n as u64;
                }
                (Err(_), _) => errors += 1,
            }
        }
        let c = &self.counters;
        c.reads.fetch_add(reads, Ordering::Relaxed);
        c.writes.fetch_add(writes, Ordering::Relaxed);
        c.bytes_read.fetch_add(bytes_read, Ordering::Relaxed);
        c.bytes_written.fetch_add(bytes_written, Ordering::Relaxed);
        let path = self.path().as_str();
        metrics::counter!("retrowave_store_io_ops_total", "op" => "read", "path" => path)
            .increment(reads);
        metrics::counter!("retrowave_store_io_ops_total", "op" => "write", "path" => path)
            .increment(writes);
        metrics::counter!("retrowave_store_io_bytes_total", "op" => "read", "path" => path)
            .increment(bytes_read);
        metrics::counter!("retrowave_store_io_bytes_total", "op" => "write", "path" => path)
            .increment(bytes_written);
        if errors > 0 {
            metrics::counter!("retrowave_store_io_errors_total", "path" => path).increment(errors);
        }
    }

    /// The io_uring path of [`IoEngine::submit`].
    ///
    /// # Safety
    ///
    /// As for [`IoEngine::submit`].
    unsafe fn submit_uring(
        &self,
        r: &mut Ring,
        ops: &[IoOp<'_>],
        on_done: &mut dyn FnMut(usize, &Result<usize, IoError>),
    ) -> Vec<Result<usize, IoError>> {
        let mut results: Vec<Option<Result<usize, IoError>>> = ops.iter().map(|_| None).collect();
        if let Some(why) = &r.broken {
            return ops.iter().map(|op| Err(broken_error(op, why))).collect();
        }
        let mut progress = vec![Progress::default(); ops.len()];
        let mut fixed: Vec<Option<u16>> = vec![None; ops.len()];
        // Ops to reissue (next chunk, retry after a short transfer or EINTR/EAGAIN).
        let mut reissue: VecDeque<usize> = VecDeque::new();
        let mut next = 0;
        let mut in_flight: u32 = 0;
        let mut max_seen: u32 = 0;
        let batch = submit_batch(self.queue_depth);
        let mut pushed: u32 = 0;
        loop {
            // Queue up to `batch` more ops, never more than the queue depth in flight.
            {
                let mut sq = r.ring.submission();
                while in_flight < self.queue_depth && pushed < batch {
                    let idx = match reissue.pop_front() {
                        Some(i) => i,
                        None => {
                            let mut found = None;
                            while let Some(op) = ops.get(next) {
                                let i = next;
                                next += 1;
                                match precheck(op) {
                                    Some(done) => results[i] = Some(done),
                                    None => {
                                        fixed[i] = find_region(&r.regions, op);
                                        found = Some(i);
                                        break;
                                    }
                                }
                            }
                            match found {
                                Some(i) => i,
                                None => break,
                            }
                        }
                    };
                    let entry =
                        build_entry(&ops[idx], &progress[idx], fixed[idx]).user_data(idx as u64);
                    // SAFETY: the buffer stays valid until the completion is reaped below,
                    // which happens before this function returns.
                    if unsafe { sq.push(&entry) }.is_err() {
                        reissue.push_front(idx);
                        break;
                    }
                    if fixed[idx].is_some() {
                        r.fixed_ops += 1;
                    }
                    in_flight += 1;
                    pushed += 1;
                }
            }
            if in_flight == 0 {
                break;
            }
            max_seen = max_seen.max(in_flight);
            // Submit; wait for a completion only when nothing more can be issued now.
            let more = !reissue.is_empty() || next < ops.len();
            let want = if pushed == 0 || !more || in_flight >= self.queue_depth {
                1
            } else {
                0
            };
            pushed = 0;
            match r.ring.submit_and_wait(want) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR)) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                    std::thread::yield_now();
                }
                Err(e) => {
                    // The ring itself is unusable (EBADF, EFAULT, ...). Nothing more can be
                    // submitted or reaped through it.
                    let why = format!("io_uring_enter failed: {e}");
                    tracing::error!(%why, "disk tier io_uring is broken; failing all further ops");
                    for (i, op) in ops.iter().enumerate() {
                        if results[i].is_none() {
                            results[i] = Some(Err(broken_error(op, &why)));
                        }
                    }
                    r.broken = Some(why);
                    break;
                }
            }
            for cqe in r.ring.completion() {
                let idx = cqe.user_data() as usize;
                in_flight = in_flight.saturating_sub(1);
                let (Some(op), Some(p)) = (ops.get(idx), progress.get_mut(idx)) else {
                    continue;
                };
                let res = cqe.result();
                let res = if res < 0 { Err(-res) } else { Ok(res as usize) };
                match p.advance(op, res) {
                    Step::Done(n) => {
                        let r = Ok(n);
                        on_done(idx, &r);
                        results[idx] = Some(r);
                    }
                    Step::Continue => reissue.push_back(idx),
                    Step::Fail(e) => {
                        let r = Err(e);
                        on_done(idx, &r);
                        results[idx] = Some(r);
                    }
                }
            }
        }
        self.counters
            .max_in_flight
            .fetch_max(max_seen, Ordering::Relaxed);
        results
            .into_iter()
            .zip(ops)
            .map(|(r, op)| r.unwrap_or_else(|| Err(broken_error(op, "op was not executed"))))
            .collect()
    }
}

fn lock(ring: &Mutex<Ring>) -> MutexGuard<'_, Ring> {
    // A panic while holding the lock cannot leave the ring inconsistent in a way that matters:
    // every submit starts from an empty queue.
    ring.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn broken_error(op: &IoOp<'_>, why: &str) -> IoError {
    IoError::Os {
        path: op.file.path().to_path_buf(),
        offset: op.offset,
        len: op.len,
        op: op.kind.as_str(),
        source: io::Error::other(why.to_string()),
    }
}

/// The registered region that contains the whole buffer of `op`, if any.
fn find_region(regions: &[Region], op: &IoOp<'_>) -> Option<u16> {
    let start = op.buf as usize;
    let end = start.checked_add(op.len)?;
    let pos = regions.partition_point(|g| g.start <= start);
    let g = regions.get(pos.checked_sub(1)?)?;
    (end <= g.end).then_some(g.index)
}

/// The submission entry for the next chunk of `op`.
fn build_entry(op: &IoOp<'_>, p: &Progress, fixed: Option<u16>) -> squeue::Entry {
    let (len, offset) = p.next_chunk(op);
    let fd = types::Fd(op.file.as_raw_fd());
    let buf = op.buf.wrapping_add(p.done);
    // MAX_CHUNK fits in u32.
    let len = len as u32;
    match (op.kind, fixed) {
        (OpKind::Read, None) => opcode::Read::new(fd, buf, len).offset(offset).build(),
        (OpKind::Write, None) => opcode::Write::new(fd, buf, len).offset(offset).build(),
        (OpKind::Read, Some(i)) => opcode::ReadFixed::new(fd, buf, len, i)
            .offset(offset)
            .build(),
        (OpKind::Write, Some(i)) => opcode::WriteFixed::new(fd, buf, len, i)
            .offset(offset)
            .build(),
    }
}

/// Runs one op with `pread`/`pwrite`.
///
/// # Safety
///
/// As for [`IoEngine::submit`].
unsafe fn run_pread(op: &IoOp<'_>) -> Result<usize, IoError> {
    if let Some(done) = precheck(op) {
        return done;
    }
    let fd = op.file.as_raw_fd();
    let mut p = Progress::default();
    loop {
        let (len, offset) = p.next_chunk(op);
        let buf = op.buf.wrapping_add(p.done).cast::<libc::c_void>();
        // precheck guarantees offset + len <= i64::MAX.
        let offset = offset as libc::off_t;
        // SAFETY: the caller guarantees `buf` is valid for the op's length.
        let n = unsafe {
            match op.kind {
                OpKind::Read => libc::pread(fd, buf, len, offset),
                OpKind::Write => libc::pwrite(fd, buf, len, offset),
            }
        };
        let res = if n < 0 {
            Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO))
        } else {
            Ok(n as usize)
        };
        if res == Err(libc::EAGAIN) {
            std::thread::yield_now();
        }
        match p.advance(op, res) {
            Step::Done(n) => return Ok(n),
            Step::Continue => {}
            Step::Fail(e) => return Err(e),
        }
    }
}

/// Sets up a ring of at least `queue_depth` entries and checks that it can run the ops used.
fn setup_ring(queue_depth: u32) -> Result<Ring, String> {
    let entries = queue_depth.next_power_of_two();
    let mut builder = IoUring::builder();
    // SUBMIT_ALL (5.18): keep submitting the batch when one entry fails to prepare.
    // COOP_TASKRUN (5.19): no inter-processor interrupt per completion; we always wait in the
    // kernel for completions, which runs the pending work.
    builder.setup_submit_all().setup_coop_taskrun();
    let ring = match builder.build(entries) {
        Ok(ring) => ring,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            IoUring::new(entries).map_err(|e| describe_setup_error(&e))?
        }
        Err(e) => return Err(describe_setup_error(&e)),
    };
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring opcode probe failed: {e}"))?;
    for (name, code) in [
        ("READ", opcode::Read::CODE),
        ("WRITE", opcode::Write::CODE),
        ("READ_FIXED", opcode::ReadFixed::CODE),
        ("WRITE_FIXED", opcode::WriteFixed::CODE),
    ] {
        if !probe.is_supported(code) {
            return Err(format!(
                "the kernel's io_uring does not support IORING_OP_{name}"
            ));
        }
    }
    let mut ring = Ring {
        ring,
        regions: Vec::new(),
        broken: None,
        fixed_ops: 0,
    };
    nop_round_trip(&mut ring.ring).map_err(|e| format!("io_uring no-op round trip failed: {e}"))?;
    Ok(ring)
}

/// Submits one no-op and reaps it: catches seccomp filters that allow ring setup but not
/// `io_uring_enter`.
fn nop_round_trip(ring: &mut IoUring) -> io::Result<()> {
    let entry = opcode::Nop::new().build().user_data(u64::MAX);
    // SAFETY: a no-op references no memory.
    unsafe { ring.submission().push(&entry) }
        .map_err(|_| io::Error::other("submission queue full"))?;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| io::Error::other("no completion for the no-op"))?;
    if cqe.user_data() != u64::MAX || cqe.result() < 0 {
        return Err(io::Error::other(format!(
            "unexpected no-op completion (result {})",
            cqe.result()
        )));
    }
    Ok(())
}

fn describe_setup_error(e: &io::Error) -> String {
    let mut reason = format!("io_uring_setup failed: {e}");
    match e.raw_os_error() {
        Some(libc::ENOSYS) => {
            reason.push_str(" (kernel built without io_uring, or blocked by seccomp)")
        }
        Some(libc::EPERM) => {
            if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
                let v = v.trim();
                if v != "0" {
                    reason.push_str(&format!(" (sysctl kernel.io_uring_disabled = {v})"));
                }
            }
        }
        _ => {}
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::super::{AlignedBuf, IoFile};
    use super::*;

    fn uring_enabled() -> bool {
        std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").is_ok_and(|v| v.trim() == "0")
    }

    fn engine(choice: IoChoice, queue_depth: u32) -> Option<IoEngine> {
        match IoEngine::new(&IoOptions {
            choice,
            queue_depth,
            direct: true,
        }) {
            Ok(e) => Some(e),
            Err(IoError::Unavailable { reason }) => {
                eprintln!("note: io_uring unavailable here ({reason}); skipping");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn engine_paths_and_fallback_reason() {
        let p = engine(IoChoice::Pread, 64).unwrap();
        assert_eq!(p.path(), IoPath::Pread);
        assert_eq!(p.fallback_reason(), None);
        assert_eq!(p.queue_depth(), 64);
        let auto = engine(IoChoice::Auto, 0).unwrap();
        assert_eq!(auto.queue_depth(), 1);
        match auto.path() {
            IoPath::Uring => assert_eq!(auto.fallback_reason(), None),
            IoPath::Pread => assert!(auto.fallback_reason().is_some_and(|r| !r.is_empty())),
        }
        if uring_enabled() {
            // io_uring works on this kernel: Auto must pick it (or say why not).
            assert_eq!(auto.path(), IoPath::Uring, "{:?}", auto.fallback_reason());
        }
        if let Some(u) = engine(IoChoice::Uring, 100_000) {
            assert_eq!(u.path(), IoPath::Uring);
            assert_eq!(u.queue_depth(), MAX_QUEUE_DEPTH);
        }
    }

    #[test]
    fn engine_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<IoEngine>();
    }

    #[test]
    fn find_region_requires_the_whole_buffer_inside() {
        let regions = [
            Region {
                start: 0x1000,
                end: 0x3000,
                index: 1,
            },
            Region {
                start: 0x8000,
                end: 0x9000,
                index: 0,
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        let f = IoFile::create(&dir.path().join("r"), false).unwrap();
        let at = |addr: usize, len: usize| IoOp {
            file: &f,
            offset: 0,
            buf: addr as *mut u8,
            len,
            kind: OpKind::Read,
        };
        assert_eq!(find_region(&regions, &at(0x1000, 0x2000)), Some(1));
        assert_eq!(find_region(&regions, &at(0x2000, 0x1000)), Some(1));
        assert_eq!(find_region(&regions, &at(0x2000, 0x1001)), None);
        assert_eq!(find_region(&regions, &at(0x800, 0x100)), None);
        assert_eq!(find_region(&regions, &at(0x8000, 0x1000)), Some(0));
        assert_eq!(find_region(&regions, &at(0x4000, 0x10)), None);
        assert_eq!(find_region(&regions, &at(usize::MAX, 2)), None);
    }

    /// Writes and reads back through fixed buffers, checks they were used, then replaces the
    /// registration and checks ops in the old region no longer use it.
    #[test]
    fn registered_buffers_are_used_and_replaced() {
        let Some(e) = engine(IoChoice::Uring, 8) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let f = IoFile::create(&dir.path().join("fixed.dat"), true).unwrap();
        let mut arena = AlignedBuf::zeroed(32 * 4096);
        let mut other = AlignedBuf::zeroed(32 * 4096);
        for (i, b) in arena.iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        let base = arena.as_mut_ptr();
        // SAFETY: both buffers outlive the engine's use of them (registration replaced below).
        unsafe { e.register_buffers(&[(base, arena.len())]) }.unwrap();
        let ops: Vec<IoOp<'_>> = (0..32)
            .map(|i| IoOp {
                file: &f,
                offset: (31 - i) as u64 * 4096,
                buf: base.wrapping_add(i * 4096),
                len: 4096,
                kind: OpKind::Write,
            })
            .collect();
        // SAFETY: ops cover disjoint parts of `arena`.
        assert!(
            unsafe { e.submit(&ops) }
                .iter()
                .all(|r| matches!(r, Ok(4096)))
        );
        assert_eq!(e.fixed_ops(), 32);
        let optr = other.as_mut_ptr();
        let reads: Vec<IoOp<'_>> = (0..32)
            .map(|i| IoOp {
                file: &f,
                offset: (31 - i) as u64 * 4096,
                buf: optr.wrapping_add(i * 4096),
                len: 4096,
                kind: OpKind::Read,
            })
            .collect();
        // Not registered: plain READ.
        assert!(
            unsafe { e.submit(&reads) }
                .iter()
                .all(|r| matches!(r, Ok(4096)))
        );
        assert_eq!(e.fixed_ops(), 32);
        assert_eq!(&other[..], &arena[..]);

        // Replace the registration with `other`; reads into it go fixed, the arena no longer.
        other.fill(0);
        unsafe { e.register_buffers(&[(optr, other.len())]) }.unwrap();
        assert!(
            unsafe { e.submit(&reads) }
                .iter()
                .all(|r| matches!(r, Ok(4096)))
        );
        assert_eq!(e.fixed_ops(), 64);
        assert_eq!(&other[..], &arena[..]);
        assert!(
            unsafe { e.submit(&ops) }
                .iter()
                .all(|r| matches!(r, Ok(4096)))
        );
        assert_eq!(e.fixed_ops(), 64);

        // Bad region sets are refused and leave nothing registered.
        let err = unsafe { e.register_buffers(&[(std::ptr::null_mut(), 4096)]) }.unwrap_err();
        assert!(
            matches!(
                err,
                IoError::Os {
                    op: "register_buffers",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            unsafe { e.submit(&reads) }
                .iter()
                .all(|r| matches!(r, Ok(4096)))
        );
        assert_eq!(e.fixed_ops(), 64);
        unsafe { e.register_buffers(&[]) }.unwrap();

        // Pread engines accept and ignore registrations.
        let p = engine(IoChoice::Pread, 8).unwrap();
        unsafe { p.register_buffers(&[(optr, other.len())]) }.unwrap();
        assert_eq!(p.fixed_ops(), 0);
    }

    /// An op larger than MAX_CHUNK is not practical here; check the chunked entry building.
    #[test]
    fn build_entry_continues_where_the_op_left_off() {
        let dir = tempfile::tempdir().unwrap();
        let f = IoFile::create(&dir.path().join("c"), false).unwrap();
        let mut b = AlignedBuf::zeroed(8192);
        let op = IoOp {
            file: &f,
            offset: 100,
            buf: b.as_mut_ptr(),
            len: 8192,
            kind: OpKind::Write,
        };
        let p = Progress {
            done: 4096,
            ..Progress::default()
        };
        let e = build_entry(&op, &p, None);
        assert_eq!(e.get_opcode(), u32::from(opcode::Write::CODE));
        let e = build_entry(&op, &p, Some(3));
        assert_eq!(e.get_opcode(), u32::from(opcode::WriteFixed::CODE));
    }
}
