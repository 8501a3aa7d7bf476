//! Block I/O engine of the disk tier.
//!
//! Spilled KV pages live in files on local disks. This module moves them: [`IoFile`] is one such
//! file (opened with `O_DIRECT` where the filesystem allows it), [`AlignedBuf`] is a heap buffer
//! that `O_DIRECT` accepts, and [`IoEngine`] runs batches of [`IoOp`]s either through io_uring
//! (keeping up to `queue_depth` operations in flight, optionally with registered fixed buffers)
//! or, where io_uring cannot be used, through plain `pread`/`pwrite` on the calling thread.
//!
//! Both paths give the same results for the same ops: one `Result` per op in op order, short
//! transfers retried or reported as [`IoError::Short`] the same way, `ENOSPC`/`EDQUOT`/`EFBIG`
//! reported as [`IoError::NoSpace`], misaligned ops on `O_DIRECT` files refused up front with
//! [`IoError::Misaligned`].

use std::fmt;
use std::io;
use std::path::PathBuf;

mod buf;
mod engine;
mod file;

pub use buf::AlignedBuf;
pub use engine::IoEngine;
pub use file::IoFile;

/// Alignment, in bytes, of buffers, file offsets and lengths for `O_DIRECT` I/O.
pub const IO_ALIGN: usize = 4096;

/// Largest number of bytes one system call or one io_uring request moves; bigger ops are split
/// into consecutive chunks of this size (Linux caps a single transfer just below 2 GiB).
const MAX_CHUNK: usize = 1 << 30;

/// How many times one op is reissued after `EINTR`/`EAGAIN` before it is reported as failed.
const MAX_AGAIN: u32 = 100;

/// Which system call path an [`IoEngine`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoPath {
    /// Batches go through an io_uring submission/completion ring.
    Uring,
    /// Ops run one after another with `pread(2)`/`pwrite(2)` on the calling thread.
    Pread,
}

impl IoPath {
    /// The name used in logs and metrics labels: `"io_uring"` or `"pread"`.
    pub fn as_str(self) -> &'static str {
        match self {
            IoPath::Uring => "io_uring",
            IoPath::Pread => "pread",
        }
    }
}

impl fmt::Display for IoPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which I/O path the configuration asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoChoice {
    /// io_uring when the kernel allows it, `pread`/`pwrite` otherwise (the reason is kept in
    /// [`IoEngine::fallback_reason`]).
    #[default]
    Auto,
    /// io_uring only; [`IoEngine::new`] fails with [`IoError::Unavailable`] if it cannot be used.
    Uring,
    /// `pread`/`pwrite` only.
    Pread,
}

/// Options of an [`IoEngine`] and of the files it serves.
#[derive(Debug, Clone)]
pub struct IoOptions {
    /// Which I/O path to use.
    pub choice: IoChoice,
    /// Most ops in flight at once on the io_uring path (clamped to 1..=4096). Default 64.
    pub queue_depth: u32,
    /// Open disk tier files with `O_DIRECT` (bypassing the page cache) where the filesystem
    /// supports it. Default `true`.
    pub direct: bool,
}

impl Default for IoOptions {
    fn default() -> Self {
        IoOptions {
            choice: IoChoice::Auto,
            queue_depth: 64,
            direct: true,
        }
    }
}

/// Errors of the disk tier I/O engine.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The filesystem is full, the quota is exhausted or the file would exceed its size limit
    /// (`ENOSPC`, `EDQUOT`, `EFBIG`).
    #[error("no space left on device writing {len} bytes at offset {offset} of {}", .path.display())]
    NoSpace {
        /// The file written.
        path: PathBuf,
        /// File offset of the op.
        offset: u64,
        /// Length of the op in bytes.
        len: usize,
    },
    /// Fewer bytes than asked were transferred: a read reached the end of the file (for example
    /// because the file was truncated underneath) or a write stopped early.
    #[error(
        "short {} of {} at offset {offset}: expected {expected} bytes, transferred {got}{}",
        if *.write { "write" } else { "read" },
        .path.display(),
        if *.write { "" } else { " (end of file; was the file truncated?)" }
    )]
    Short {
        /// The file read or written.
        path: PathBuf,
        /// File offset of the op.
        offset: u64,
        /// Length of the op in bytes.
        expected: usize,
        /// Bytes transferred before the transfer stopped.
        got: usize,
        /// `true` for a write, `false` for a read.
        write: bool,
    },
    /// A system call failed.
    #[error("{op} of {len} bytes at offset {offset} of {} failed: {source}", .path.display())]
    Os {
        /// The file concerned.
        path: PathBuf,
        /// File offset of the op (0 for operations on the whole file).
        offset: u64,
        /// Length of the op in bytes (0 for operations on the whole file).
        len: usize,
        /// What was attempted: `"read"`, `"write"`, `"open"`, `"create"`, `"stat"`, ...
        op: &'static str,
        /// The operating system error.
        #[source]
        source: io::Error,
    },
    /// io_uring was asked for explicitly but cannot be used here.
    #[error("io_uring is not available: {reason}")]
    Unavailable {
        /// Why the ring could not be set up (kernel error, sysctl, missing opcodes).
        reason: String,
    },
    /// A buffer address, offset or length of an op on an `O_DIRECT` file is not a multiple of
    /// [`IO_ALIGN`].
    #[error("misaligned I/O on an O_DIRECT file: {what}")]
    Misaligned {
        /// Which value is misaligned, for which op of which file.
        what: String,
    },
}

/// Direction of an [`IoOp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Read from the file into the buffer.
    Read,
    /// Write the buffer to the file.
    Write,
}

impl OpKind {
    fn as_str(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
        }
    }
}

/// One read or write of `len` bytes at `offset` of `file`.
///
/// The buffer is a raw pointer because ops are batched and executed by the kernel asynchronously;
/// [`IoEngine::submit`] states what it must point to.
#[derive(Debug, Clone, Copy)]
pub struct IoOp<'f> {
    /// The file to read or write.
    pub file: &'f IoFile,
    /// Byte offset in the file.
    pub offset: u64,
    /// Start of the memory read into or written from.
    pub buf: *mut u8,
    /// Number of bytes to transfer.
    pub len: usize,
    /// Read or write.
    pub kind: OpKind,
}

/// Counters of an [`IoEngine`] since its creation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Read ops that completed successfully.
    pub reads: u64,
    /// Write ops that completed successfully.
    pub writes: u64,
    /// Bytes read by successful read ops.
    pub bytes_read: u64,
    /// Bytes written by successful write ops.
    pub bytes_written: u64,
    /// Most ops in flight at once (1 on the `pread` path once an op ran).
    pub max_in_flight: u32,
}

/// Rounds `n` up to a multiple of [`IO_ALIGN`], `None` on overflow.
fn round_up(n: usize) -> Option<usize> {
    n.checked_add(IO_ALIGN - 1).map(|v| v & !(IO_ALIGN - 1))
}

/// Checks what can be refused before an op is issued. `Some(result)` means the op is finished
/// without any system call (empty op, misaligned `O_DIRECT` op, offset out of range).
fn precheck(op: &IoOp<'_>) -> Option<Result<usize, IoError>> {
    if op.len == 0 {
        return Some(Ok(0));
    }
    let end = op.offset.checked_add(op.len as u64);
    if end.is_none_or(|e| e > i64::MAX as u64) {
        return Some(Err(os_error(op, libc::EINVAL)));
    }
    if op.file.is_direct() {
        let align = IO_ALIGN as u64;
        let what = if !(op.buf as usize).is_multiple_of(IO_ALIGN) {
            Some(format!("buffer address {:p}", op.buf))
        } else if !op.offset.is_multiple_of(align) {
            Some(format!("offset {}", op.offset))
        } else if !op.len.is_multiple_of(IO_ALIGN) {
            Some(format!("length {}", op.len))
        } else {
            None
        };
        if let Some(what) = what {
            return Some(Err(IoError::Misaligned {
                what: format!(
                    "{what} of the {} of {} bytes at offset {} of {} is not a multiple of {IO_ALIGN}",
                    op.kind.as_str(),
                    op.len,
                    op.offset,
                    op.file.path().display()
                ),
            }));
        }
    }
    None
}

/// The error of an op that failed with `errno`.
fn os_error(op: &IoOp<'_>, errno: i32) -> IoError {
    match errno {
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => IoError::NoSpace {
            path: op.file.path().to_path_buf(),
            offset: op.offset,
            len: op.len,
        },
        _ => IoError::Os {
            path: op.file.path().to_path_buf(),
            offset: op.offset,
            len: op.len,
            op: op.kind.as_str(),
            source: io::Error::from_raw_os_error(errno),
        },
    }
}

/// Progress of one op through its chunks and retries; shared by both paths so that they treat
/// short transfers and interruptions identically.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    /// Bytes transferred so far.
    done: usize,
    /// Whether the one retry after a short transfer was used.
    retried: bool,
    /// `EINTR`/`EAGAIN` reissues so far.
    again: u32,
}

/// What to do with an op after one transfer attempt.
#[derive(Debug)]
enum Step {
    /// The op is complete; the value is the number of bytes transferred.
    Done(usize),
    /// Issue the next chunk (or the retry) from `progress.done`.
    Continue,
    /// The op failed.
    Fail(IoError),
}

impl Progress {
    /// Length, file offset and buffer offset of the next transfer of `op`.
    fn next_chunk(&self, op: &IoOp<'_>) -> (usize, u64) {
        let len = (op.len - self.done).min(MAX_CHUNK);
        (len, op.offset + self.done as u64)
    }

    /// Accounts for one transfer attempt that returned `res` (bytes or errno).
    fn advance(&mut self, op: &IoOp<'_>, res: Result<usize, i32>) -> Step {
        let n = match res {
            Ok(n) => n,
            Err(libc::EINTR | libc::EAGAIN) if self.again < MAX_AGAIN => {
                self.again += 1;
                return Step::Continue;
            }
            Err(errno) => return Step::Fail(os_error(op, errno)),
        };
        let (requested, _) = self.next_chunk(op);
        let n = n.min(requested);
        self.done += n;
        if self.done == op.len {
            return Step::Done(op.len);
        }
        if n == requested {
            // A full chunk of an op larger than MAX_CHUNK: go on with the next one.
            return Step::Continue;
        }
        let short = || IoError::Short {
            path: op.file.path().to_path_buf(),
            offset: op.offset,
            expected: op.len,
            got: self.done,
            write: op.kind == OpKind::Write,
        };
        // Nothing moved (end of file, or a write that cannot progress), the retry was already
        // spent, or an O_DIRECT read hit the end of the file: report it. An O_DIRECT write may
        // retry only if the remainder is still aligned.
        let direct_stop =
            op.file.is_direct() && (op.kind == OpKind::Read || !self.done.is_multiple_of(IO_ALIGN));
        if n == 0 || self.retried || direct_stop {
            return Step::Fail(short());
        }
        self.retried = true;
        Step::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde::de::IntoDeserializer;
    use serde::de::value::{Error as DeError, StrDeserializer};

    fn choice(s: &str) -> Result<IoChoice, DeError> {
        let de: StrDeserializer<'_, DeError> = s.into_deserializer();
        IoChoice::deserialize(de)
    }

    #[test]
    fn io_choice_deserializes_lowercase_names() {
        assert_eq!(choice("auto").ok(), Some(IoChoice::Auto));
        assert_eq!(choice("uring").ok(), Some(IoChoice::Uring));
        assert_eq!(choice("pread").ok(), Some(IoChoice::Pread));
        assert!(choice("Uring").is_err());
        assert!(choice("io_uring").is_err());
        assert_eq!(IoChoice::default(), IoChoice::Auto);
    }

    #[test]
    fn io_path_display_and_defaults() {
        assert_eq!(IoPath::Uring.to_string(), "io_uring");
        assert_eq!(IoPath::Pread.to_string(), "pread");
        let o = IoOptions::default();
        assert_eq!(
            (o.choice, o.queue_depth, o.direct),
            (IoChoice::Auto, 64, true)
        );
    }

    #[test]
    fn round_up_to_io_align() {
        assert_eq!(round_up(0), Some(0));
        assert_eq!(round_up(1), Some(4096));
        assert_eq!(round_up(4096), Some(4096));
        assert_eq!(round_up(4097), Some(8192));
        assert_eq!(round_up(usize::MAX), None);
    }

    fn temp_file(direct: bool) -> (tempfile::TempDir, IoFile) {
        let dir = tempfile::tempdir().unwrap();
        let f = IoFile::create(&dir.path().join("f.dat"), direct).unwrap();
        (dir, f)
    }

    fn op(file: &IoFile, offset: u64, buf: *mut u8, len: usize, kind: OpKind) -> IoOp<'_> {
        IoOp {
            file,
            offset,
            buf,
            len,
            kind,
        }
    }

    #[test]
    fn errno_maps_to_no_space_and_os_errors_naming_the_file() {
        let (_d, f) = temp_file(false);
        let o = op(&f, 8192, std::ptr::null_mut(), 4096, OpKind::Write);
        for errno in [libc::ENOSPC, libc::EDQUOT, libc::EFBIG] {
            let e = os_error(&o, errno);
            assert!(
                matches!(
                    e,
                    IoError::NoSpace {
                        offset: 8192,
                        len: 4096,
                        ..
                    }
                ),
                "{e:?}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains("f.dat") && msg.contains("8192") && msg.contains("4096"),
                "{msg}"
            );
        }
        let e = os_error(&o, libc::EIO);
        assert!(matches!(e, IoError::Os { op: "write", .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("f.dat") && msg.contains("offset 8192"),
            "{msg}"
        );
    }

    #[test]
    fn precheck_refuses_misaligned_direct_ops_and_bad_offsets() {
        let (_d, f) = temp_file(true);
        let mut b = AlignedBuf::zeroed(8192);
        let p = b.as_mut_ptr();
        assert!(precheck(&op(&f, 0, p, 0, OpKind::Read)).is_some_and(|r| r.is_ok()));
        let huge = op(&f, u64::MAX - 10, p, 4096, OpKind::Read);
        assert!(matches!(precheck(&huge), Some(Err(IoError::Os { .. }))));
        // u64::MAX would mean "current file position" to io_uring: must be refused.
        let minus_one = op(&f, u64::MAX, p, 4096, OpKind::Read);
        assert!(matches!(
            precheck(&minus_one),
            Some(Err(IoError::Os { .. }))
        ));
        if f.is_direct() {
            let bad = [
                op(&f, 0, p.wrapping_add(512), 4096, OpKind::Read),
                op(&f, 512, p, 4096, OpKind::Write),
                op(&f, 0, p, 1000, OpKind::Read),
            ];
            for o in &bad {
                match precheck(o) {
                    Some(Err(IoError::Misaligned { what })) => {
                        assert!(what.contains("f.dat"), "{what}")
                    }
                    other => panic!("expected Misaligned, got {other:?}"),
                }
            }
            assert!(precheck(&op(&f, 4096, p, 8192, OpKind::Read)).is_none());
        }
        let (_d2, g) = temp_file(false);
        assert!(precheck(&op(&g, 3, p.wrapping_add(1), 1000, OpKind::Read)).is_none());
    }

    #[test]
    fn progress_retries_a_short_buffered_transfer_once() {
        let (_d, f) = temp_file(false);
        let o = op(&f, 0, std::ptr::null_mut(), 10_000, OpKind::Read);
        let mut p = Progress::default();
        assert!(matches!(p.advance(&o, Ok(6000)), Step::Continue));
        assert_eq!(p.next_chunk(&o), (4000, 6000));
        assert!(matches!(p.advance(&o, Ok(4000)), Step::Done(10_000)));

        let mut p = Progress::default();
        assert!(matches!(p.advance(&o, Ok(6000)), Step::Continue));
        match p.advance(&o, Ok(1000)) {
            Step::Fail(IoError::Short {
                expected: 10_000,
                got: 7000,
                write: false,
                ..
            }) => {}
            s => panic!("{s:?}"),
        }

        let mut p = Progress::default();
        match p.advance(&o, Ok(0)) {
            Step::Fail(IoError::Short { got: 0, .. }) => {}
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn progress_reissues_after_eintr_and_eagain_then_gives_up() {
        let (_d, f) = temp_file(false);
        let o = op(&f, 0, std::ptr::null_mut(), 4096, OpKind::Write);
        let mut p = Progress::default();
        assert!(matches!(p.advance(&o, Err(libc::EINTR)), Step::Continue));
        assert!(matches!(p.advance(&o, Err(libc::EAGAIN)), Step::Continue));
        assert!(matches!(p.advance(&o, Ok(4096)), Step::Done(4096)));
        let mut p = Progress::default();
        let mut last = None;
        for _ in 0..=MAX_AGAIN {
            last = Some(p.advance(&o, Err(libc::EAGAIN)));
        }
        assert!(
            matches!(last, Some(Step::Fail(IoError::Os { .. }))),
            "{last:?}"
        );
        let mut p = Progress::default();
        assert!(matches!(
            p.advance(&o, Err(libc::ENOSPC)),
            Step::Fail(IoError::NoSpace { .. })
        ));
    }

    #[test]
    fn progress_splits_huge_ops_into_chunks_without_spending_the_retry() {
        let (_d, f) = temp_file(false);
        let len = 2 * MAX_CHUNK + 4096;
        let o = op(&f, 4096, std::ptr::null_mut(), len, OpKind::Read);
        let mut p = Progress::default();
        assert_eq!(p.next_chunk(&o), (MAX_CHUNK, 4096));
        assert!(matches!(p.advance(&o, Ok(MAX_CHUNK)), Step::Continue));
        assert!(matches!(p.advance(&o, Ok(MAX_CHUNK)), Step::Continue));
        assert!(!p.retried);
        assert_eq!(p.next_chunk(&o), (4096, 4096 + 2 * MAX_CHUNK as u64));
        assert!(matches!(p.advance(&o, Ok(4096)), Step::Done(n) if n == len));
    }

    #[test]
    fn progress_reports_a_short_direct_read_at_once() {
        let (_d, f) = temp_file(true);
        if !f.is_direct() {
            return;
        }
        let r = op(&f, 0, std::ptr::null_mut(), 16_384, OpKind::Read);
        let mut p = Progress::default();
        match p.advance(&r, Ok(8192)) {
            Step::Fail(IoError::Short { got: 8192, .. }) => {}
            s => panic!("{s:?}"),
        }
        // An aligned short write is retried once; an unaligned one is reported.
        let w = op(&f, 0, std::ptr::null_mut(), 16_384, OpKind::Write);
        let mut p = Progress::default();
        assert!(matches!(p.advance(&w, Ok(8192)), Step::Continue));
        let mut p = Progress::default();
        assert!(matches!(
            p.advance(&w, Ok(100)),
            Step::Fail(IoError::Short { write: true, .. })
        ));
    }

    #[test]
    fn short_error_message_names_file_offset_and_lengths() {
        let e = IoError::Short {
            path: PathBuf::from("/d/pages.bin"),
            offset: 4096,
            expected: 8192,
            got: 100,
            write: false,
        };
        assert_eq!(
            e.to_string(),
            "short read of /d/pages.bin at offset 4096: expected 8192 bytes, transferred 100 \
             (end of file; was the file truncated?)"
        );
    }
}
