//! Integration tests of the disk tier I/O engine on real files: both system call paths, direct
//! and buffered files, batches deeper than the queue, fixed buffers, truncated and unlinked
//! files, a full filesystem, misaligned ops and concurrent submitters.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};
use retrowave_store::io::{
    AlignedBuf, IO_ALIGN, IoChoice, IoEngine, IoError, IoFile, IoOp, IoOptions, IoPath, OpKind,
};

/// A deterministic generator for test data and layouts.
fn seeded(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

fn engine(choice: IoChoice, queue_depth: u32) -> Option<IoEngine> {
    let opts = IoOptions {
        choice,
        queue_depth,
        direct: true,
    };
    match IoEngine::new(&opts) {
        Ok(e) => Some(e),
        Err(IoError::Unavailable { reason }) => {
            eprintln!("note: io_uring unavailable ({reason}); skipping the io_uring variant");
            None
        }
        Err(e) => panic!("engine: {e}"),
    }
}

/// One io_uring engine (where the kernel allows it) and one pread engine.
fn engines(queue_depth: u32) -> Vec<IoEngine> {
    let mut v: Vec<IoEngine> = engine(IoChoice::Uring, queue_depth).into_iter().collect();
    v.extend(engine(IoChoice::Pread, queue_depth));
    v
}

/// Whether the descriptor really has O_DIRECT set.
fn fd_is_direct(f: &IoFile) -> bool {
    // SAFETY: F_GETFL on an open descriptor.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    assert!(flags >= 0, "fcntl failed");
    flags & libc::O_DIRECT != 0
}

/// A record of the file: `len` bytes at file offset `offset`, kept at `mem` in the arena.
#[derive(Debug, Clone, Copy)]
struct Record {
    offset: u64,
    len: usize,
    mem: usize,
}

/// `count` records of random length (`min..=max`, aligned when `aligned`) at random
/// non-overlapping offsets, laid out back to back in memory; returned in random order.
fn random_records(
    rng: &mut StdRng,
    count: usize,
    aligned: bool,
    min: usize,
    max: usize,
) -> (Vec<Record>, usize) {
    let mut lens: Vec<usize> = (0..count)
        .map(|_| {
            let len = min + rng.random_range(0..(max - min + 1) as u64) as usize;
            if aligned {
                len / IO_ALIGN * IO_ALIGN
            } else {
                len
            }
        })
        .collect();
    lens.shuffle(rng);
    let mut records = Vec::with_capacity(count);
    let (mut offset, mut mem) = (0u64, 0usize);
    for len in lens {
        let gap = rng.random_range(0..4) * IO_ALIGN as u64
            + if aligned { 0 } else { rng.random_range(0..300) };
        offset += gap;
        records.push(Record { offset, len, mem });
        offset += len as u64;
        mem += len.next_multiple_of(IO_ALIGN);
    }
    records.shuffle(rng);
    (records, mem)
}

fn ops<'f>(
    file: &'f IoFile,
    records: &[Record],
    arena: &mut AlignedBuf,
    kind: OpKind,
) -> Vec<IoOp<'f>> {
    let base = arena.as_mut_ptr();
    records
        .iter()
        .map(|r| IoOp {
            file,
            offset: r.offset,
            buf: base.wrapping_add(r.mem),
            len: r.len,
            kind,
        })
        .collect()
}

fn assert_all_ok(results: &[Result<usize, IoError>], records: &[Record]) {
    for (r, rec) in results.iter().zip(records) {
        match r {
            Ok(n) => assert_eq!(*n, rec.len),
            Err(e) => panic!("{rec:?}: {e}"),
        }
    }
}

fn same_records(a: &AlignedBuf, b: &AlignedBuf, records: &[Record]) -> bool {
    records
        .iter()
        .all(|r| a[r.mem..r.mem + r.len] == b[r.mem..r.mem + r.len])
}

/// Writes random records through `writer`, reads them back through every engine.
fn round_trip(
    writer: &IoEngine,
    readers: &[IoEngine],
    dir: &Path,
    direct: bool,
    aligned: bool,
    seed: u64,
) {
    let mut rng = seeded(seed);
    let (min, max) = if aligned { (4096, 65_536) } else { (1, 65_536) };
    let (records, arena_len) = random_records(&mut rng, 150, aligned, min, max);
    let file = IoFile::create(&dir.join(format!("rt-{seed}.dat")), direct).unwrap();
    assert_eq!(file.is_direct(), fd_is_direct(&file));
    let mut src = AlignedBuf::zeroed(arena_len);
    rng.fill_bytes(&mut src);
    let before = writer.stats();
    let w = ops(&file, &records, &mut src, OpKind::Write);
    // SAFETY: ops cover disjoint parts of `src`, which outlives the call.
    let results = unsafe { writer.submit(&w) };
    assert_all_ok(&results, &records);
    let after = writer.stats();
    let total: usize = records.iter().map(|r| r.len).sum();
    assert_eq!(after.writes - before.writes, records.len() as u64);
    assert_eq!(after.bytes_written - before.bytes_written, total as u64);
    let end = records
        .iter()
        .map(|r| r.offset + r.len as u64)
        .max()
        .unwrap();
    assert_eq!(file.len().unwrap(), end);

    for reader in readers {
        let mut dst = AlignedBuf::zeroed(arena_len);
        let mut order = records.clone();
        order.shuffle(&mut rng);
        let r = ops(&file, &order, &mut dst, OpKind::Read);
        // SAFETY: as above, into `dst`.
        let results = unsafe { reader.submit(&r) };
        assert_all_ok(&results, &order);
        assert!(
            same_records(&src, &dst, &records),
            "{} read back different bytes than {} wrote (direct {direct}, aligned {aligned})",
            reader.path(),
            writer.path()
        );
    }
}

#[test]
fn random_records_round_trip_through_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    let all = engines(16);
    for (i, writer) in all.iter().enumerate() {
        for (j, (direct, aligned)) in [(true, true), (false, true), (false, false)]
            .into_iter()
            .enumerate()
        {
            round_trip(
                writer,
                &all,
                dir.path(),
                direct,
                aligned,
                (i * 10 + j) as u64 + 1,
            );
        }
        let s = writer.stats();
        let expected_depth = match writer.path() {
            IoPath::Uring => 16,
            IoPath::Pread => 1,
        };
        assert_eq!(s.max_in_flight, expected_depth, "{}", writer.path());
        assert!(s.reads >= 3 * 150 && s.bytes_read > 0);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 8, ..Default::default() })]
    #[test]
    fn round_trip_property(seed in proptest::prelude::any::<u64>(), direct in proptest::prelude::any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let all = engines(8);
        for writer in &all {
            round_trip(writer, &all, dir.path(), direct, direct, seed);
        }
    }
}

#[test]
fn batches_deeper_than_the_queue_keep_the_depth_bounded() {
    let dir = tempfile::tempdir().unwrap();
    for e in engines(4) {
        let file =
            IoFile::create(&dir.path().join(format!("deep-{}.dat", e.path())), true).unwrap();
        let records: Vec<Record> = (0..300)
            .map(|i| Record {
                offset: i as u64 * 8192,
                len: 8192,
                mem: i * 8192,
            })
            .collect();
        let mut src = AlignedBuf::zeroed(300 * 8192);
        seeded(7).fill_bytes(&mut src);
        let w = ops(&file, &records, &mut src, OpKind::Write);
        // SAFETY: disjoint parts of `src`.
        assert_all_ok(&unsafe { e.submit(&w) }, &records);
        let mut dst = AlignedBuf::zeroed(300 * 8192);
        let r = ops(&file, &records, &mut dst, OpKind::Read);
        // SAFETY: disjoint parts of `dst`.
        assert_all_ok(&unsafe { e.submit(&r) }, &records);
        assert_eq!(&src[..], &dst[..]);
        let s = e.stats();
        assert_eq!((s.reads, s.writes), (300, 300));
        assert_eq!((s.bytes_read, s.bytes_written), (300 * 8192, 300 * 8192));
        let depth = if e.path() == IoPath::Uring { 4 } else { 1 };
        assert_eq!(s.max_in_flight, depth, "{}", e.path());
    }
}

#[test]
fn registered_buffers_round_trip_inside_straddling_and_outside_the_region() {
    let dir = tempfile::tempdir().unwrap();
    for e in engines(8) {
        let file =
            IoFile::create(&dir.path().join(format!("fixed-{}.dat", e.path())), true).unwrap();
        // 16 records of 4 pages, 6 pages apart in memory, starting one page in.
        let pages = 100;
        let mut src = AlignedBuf::zeroed(pages * 4096);
        seeded(11).fill_bytes(&mut src);
        let mut dst = AlignedBuf::zeroed(pages * 4096);
        let records: Vec<Record> = (0..16)
            .map(|i| Record {
                offset: (15 - i) as u64 * 4 * 4096,
                len: 4 * 4096,
                mem: (i * 6 + 1) * 4096,
            })
            .collect();
        // Register the first 46 pages of each arena: records 0..=6 lie inside, record 7 (pages
        // 43..47) straddles the end, records 8.. lie outside.
        let head = 46 * 4096;
        // SAFETY: both arenas outlive their registration (dropped below).
        unsafe { e.register_buffers(&[(src.as_mut_ptr(), head), (dst.as_mut_ptr(), head)]) }
            .unwrap();
        let w = ops(&file, &records, &mut src, OpKind::Write);
        // SAFETY: disjoint parts of `src`.
        assert_all_ok(&unsafe { e.submit(&w) }, &records);
        let r = ops(&file, &records, &mut dst, OpKind::Read);
        // SAFETY: disjoint parts of `dst`.
        assert_all_ok(&unsafe { e.submit(&r) }, &records);
        assert!(same_records(&src, &dst, &records), "{}", e.path());
        // Unregister before the arenas go.
        unsafe { e.register_buffers(&[]) }.unwrap();
    }
}

/// Truncates the file behind the descriptor of `file` to `len` bytes.
fn truncate(file: &IoFile, len: u64) {
    // SAFETY: ftruncate on an open descriptor.
    assert_eq!(
        unsafe { libc::ftruncate(file.as_raw_fd(), len as libc::off_t) },
        0
    );
}

fn write_pages(e: &IoEngine, file: &IoFile, pages: usize, seed: u64) -> AlignedBuf {
    let mut src = AlignedBuf::zeroed(pages * 4096);
    seeded(seed).fill_bytes(&mut src);
    let op = IoOp {
        file,
        offset: 0,
        buf: src.as_mut_ptr(),
        len: src.len(),
        kind: OpKind::Write,
    };
    // SAFETY: `src` outlives the call.
    let r = unsafe { e.submit(&[op]) };
    assert!(matches!(r[..], [Ok(n)] if n == pages * 4096), "{r:?}");
    src
}

#[test]
fn reads_past_the_end_of_a_truncated_file_are_short_errors() {
    let dir = tempfile::tempdir().unwrap();
    for e in engines(8) {
        for direct in [true, false] {
            let path = dir.path().join(format!("trunc-{}-{direct}.dat", e.path()));
            let file = IoFile::create(&path, direct).unwrap();
            let src = write_pages(&e, &file, 16, 3);
            truncate(&file, 10_000);
            let mut dst = AlignedBuf::zeroed(4 * 8192);
            let p = dst.as_mut_ptr();
            let read = |offset: u64, at: usize| IoOp {
                file: &file,
                offset,
                buf: p.wrapping_add(at),
                len: 8192,
                kind: OpKind::Read,
            };
            let batch = [
                read(0, 0),
                read(8192, 8192),
                read(16_384, 16_384),
                read(65_536, 24_576),
            ];
            // SAFETY: disjoint parts of `dst`.
            let r = unsafe { e.submit(&batch) };
            assert!(matches!(r[0], Ok(8192)), "{:?}", r[0]);
            assert_eq!(dst[..8192], src[..8192]);
            let expect = [(1, 8192, 1808), (2, 16_384, 0), (3, 65_536, 0)];
            for (i, offset, got) in expect {
                match &r[i] {
                    Err(
                        err @ IoError::Short {
                            offset: o,
                            expected: 8192,
                            got: g,
                            write: false,
                            ..
                        },
                    ) => {
                        assert_eq!((*o, *g), (offset, got), "{} direct={direct}", e.path());
                        let msg = err.to_string();
                        assert!(
                            msg.contains(&path.display().to_string())
                                && msg.contains(&offset.to_string()),
                            "{msg}"
                        );
                    }
                    other => panic!(
                        "{} direct={direct} op {i}: expected Short, got {other:?}",
                        e.path()
                    ),
                }
            }
            // The bytes before the end of the file did arrive.
            assert_eq!(dst[8192..8192 + 1808], src[8192..8192 + 1808]);
        }
    }
}

#[test]
fn unlinked_files_keep_working_and_files_truncated_to_zero_read_short() {
    let dir = tempfile::tempdir().unwrap();
    for e in engines(8) {
        let path = dir.path().join(format!("gone-{}.dat", e.path()));
        let file = IoFile::create(&path, true).unwrap();
        let src = write_pages(&e, &file, 8, 5);
        std::fs::remove_file(&path).unwrap();
        assert!(!path.exists());
        // Unlinked but open: reads and writes still work on Linux.
        let mut dst = AlignedBuf::zeroed(8 * 4096);
        let whole = IoOp {
            file: &file,
            offset: 0,
            buf: dst.as_mut_ptr(),
            len: dst.len(),
            kind: OpKind::Read,
        };
        // SAFETY: `dst` outlives the call.
        assert!(matches!(unsafe { e.submit(&[whole]) }[..], [Ok(32_768)]));
        assert_eq!(&dst[..], &src[..]);
        let again = write_pages(&e, &file, 2, 6);
        assert_eq!(file.len().unwrap(), 8 * 4096);

        truncate(&file, 0);
        assert_eq!(file.len().unwrap(), 0);
        let p = dst.as_mut_ptr();
        let batch: Vec<IoOp<'_>> = (0..8)
            .map(|i| IoOp {
                file: &file,
                offset: i * 4096,
                buf: p.wrapping_add(i as usize * 4096),
                len: 4096,
                kind: OpKind::Read,
            })
            .collect();
        // SAFETY: disjoint parts of `dst`.
        for r in unsafe { e.submit(&batch) } {
            assert!(
                matches!(
                    r,
                    Err(IoError::Short {
                        got: 0,
                        write: false,
                        ..
                    })
                ),
                "{r:?}"
            );
        }
        drop(again);
    }
}

/// A filesystem mounted on a temporary directory, unmounted on drop.
struct TempMount {
    dir: tempfile::TempDir,
    target: CString,
}

impl TempMount {
    /// Mounts `fstype` with `options`; `None` (with a note) where mounting is not allowed.
    fn new(fstype: &std::ffi::CStr, options: &std::ffi::CStr) -> Option<TempMount> {
        let dir = tempfile::tempdir().ok()?;
        let target = CString::new(dir.path().as_os_str().as_bytes()).ok()?;
        // SAFETY: valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            eprintln!(
                "note: cannot mount {fstype:?} ({}); skipping this test",
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(TempMount { dir, target })
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        // SAFETY: valid NUL-terminated string.
        unsafe { libc::umount2(self.target.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn writing_to_a_full_filesystem_gives_no_space() {
    let Some(mount) = TempMount::new(c"tmpfs", c"size=1M") else {
        return;
    };
    for e in engines(8) {
        let path = mount.path().join(format!("full-{}.dat", e.path()));
        let file = IoFile::create(&path, true).unwrap();
        // tmpfs supports O_DIRECT on recent kernels; either way is_direct must tell the truth.
        assert_eq!(file.is_direct(), fd_is_direct(&file), "{}", e.path());
        let mut src = AlignedBuf::zeroed(32 * 65_536);
        seeded(9).fill_bytes(&mut src);
        let p = src.as_mut_ptr();
        let batch: Vec<IoOp<'_>> = (0..32)
            .map(|i| IoOp {
                file: &file,
                offset: i as u64 * 65_536,
                buf: p.wrapping_add(i * 65_536),
                len: 65_536,
                kind: OpKind::Write,
            })
            .collect();
        // SAFETY: disjoint parts of `src`.
        let results = unsafe { e.submit(&batch) };
        let ok = results.iter().filter(|r| matches!(r, Ok(65_536))).count();
        let full = results
            .iter()
            .filter(|r| matches!(r, Err(IoError::NoSpace { .. })))
            .count();
        assert_eq!(ok + full, 32, "{}: {results:?}", e.path());
        assert!(
            ok > 0 && ok < 16 + 1 && full > 0,
            "{}: {ok} written, {full} full",
            e.path()
        );
        eprintln!(
            "{}: {ok} of 32 writes of 64 KiB fit in the 1 MiB tmpfs",
            e.path()
        );
        let msg = results
            .iter()
            .find_map(|r| r.as_ref().err())
            .unwrap()
            .to_string();
        assert!(
            msg.contains("no space") && msg.contains(&path.display().to_string()),
            "{msg}"
        );
        drop(file);
        std::fs::remove_file(&path).unwrap();

        // One 2 MiB write: the first attempt stops short at the size limit, the retry of the
        // remainder fails with ENOSPC.
        let file = IoFile::create(&path, true).unwrap();
        let big = IoOp {
            file: &file,
            offset: 0,
            buf: p,
            len: src.len(),
            kind: OpKind::Write,
        };
        // SAFETY: `src` outlives the call.
        let r = unsafe { e.submit(&[big]) };
        assert!(
            matches!(
                r[..],
                [Err(IoError::NoSpace {
                    offset: 0,
                    len: 2_097_152,
                    ..
                })]
            ),
            "{}: {r:?}",
            e.path()
        );
        drop(file);
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn misaligned_ops_on_a_direct_file_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    for e in engines(8) {
        let file = IoFile::create(&dir.path().join(format!("mis-{}.dat", e.path())), true).unwrap();
        assert!(
            file.is_direct(),
            "the test directory's filesystem should support O_DIRECT"
        );
        let mut buf = AlignedBuf::zeroed(8 * 4096);
        seeded(1).fill_bytes(&mut buf);
        let p = buf.as_mut_ptr();
        let op = |offset: u64, at: usize, len: usize| IoOp {
            file: &file,
            offset,
            buf: p.wrapping_add(at),
            len,
            kind: OpKind::Write,
        };
        let batch = [
            op(0, 0, 4096),
            op(4096, 512, 4096),        // buffer address
            op(8192 + 512, 8192, 4096), // offset
            op(12_288, 12_288, 1000),   // length
            op(16_384, 16_384, 4096),
            op(20_480, 20_480, 0), // empty: nothing to do
        ];
        // SAFETY: disjoint parts of `buf` (the misaligned ones are never issued).
        let r = unsafe { e.submit(&batch) };
        assert!(
            matches!(r[0], Ok(4096)) && matches!(r[4], Ok(4096)) && matches!(r[5], Ok(0)),
            "{r:?}"
        );
        for (i, what) in [(1, "buffer address"), (2, "offset"), (3, "length")] {
            match &r[i] {
                Err(IoError::Misaligned { what: w }) => {
                    assert!(w.starts_with(what) && w.contains("mis-"), "{w}")
                }
                other => panic!("{}: op {i}: expected Misaligned, got {other:?}", e.path()),
            }
        }
        // The two aligned writes and the empty one succeeded.
        assert_eq!((e.stats().writes, e.stats().bytes_written), (3, 8192));
    }
}

#[test]
fn four_threads_share_one_engine() {
    let dir = tempfile::tempdir().unwrap();
    for e in engines(16) {
        let file = IoFile::create(&dir.path().join(format!("mt-{}.dat", e.path())), true).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (e, file) = (&e, &file);
                s.spawn(move || {
                    let mut rng = seeded(100 + t);
                    for round in 0..5u64 {
                        // Each thread owns slots t, t+4, t+8, ... of 8 KiB.
                        let records: Vec<Record> = (0..40)
                            .map(|i| Record {
                                offset: ((round * 40 + i) * 4 + t) * 8192,
                                len: 8192,
                                mem: i as usize * 8192,
                            })
                            .collect();
                        let mut src = AlignedBuf::zeroed(40 * 8192);
                        rng.fill_bytes(&mut src);
                        let w = ops(file, &records, &mut src, OpKind::Write);
                        // SAFETY: disjoint parts of this thread's `src`.
                        assert_all_ok(&unsafe { e.submit(&w) }, &records);
                        let mut dst = AlignedBuf::zeroed(40 * 8192);
                        let r = ops(file, &records, &mut dst, OpKind::Read);
                        // SAFETY: disjoint parts of this thread's `dst`.
                        assert_all_ok(&unsafe { e.submit(&r) }, &records);
                        assert_eq!(&src[..], &dst[..], "thread {t} round {round}");
                    }
                });
            }
        });
        let s = e.stats();
        assert_eq!((s.reads, s.writes), (800, 800), "{}", e.path());
        assert_eq!(s.bytes_written, 800 * 8192);
        assert_eq!(file.len().unwrap(), 800 * 8192);
    }
}

#[test]
fn o_direct_refused_by_the_filesystem_falls_back_to_buffered() {
    // ramfs has no O_DIRECT support: opening with it fails with EINVAL.
    let Some(mount) = TempMount::new(c"ramfs", c"") else {
        return;
    };
    let all = engines(8);
    let path = mount.path().join("ramfs.dat");
    let file = IoFile::create(&path, true).unwrap();
    assert!(!file.is_direct() && !fd_is_direct(&file));
    drop(file);
    let file = IoFile::open(&path, true).unwrap();
    assert!(!file.is_direct() && !fd_is_direct(&file));
    // Buffered now, so unaligned records are fine.
    for (i, writer) in all.iter().enumerate() {
        round_trip(writer, &all, &mount.path(), true, false, 50 + i as u64);
    }
}
