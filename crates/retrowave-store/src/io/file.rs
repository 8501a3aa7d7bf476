//! Files of the disk tier.

use std::fs::{File, OpenOptions, Permissions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::IoError;

/// An open file of the disk tier, readable and writable, with `O_DIRECT` where the filesystem
/// supports it.
#[derive(Debug)]
pub struct IoFile {
    file: File,
    path: PathBuf,
    direct: bool,
}

impl IoFile {
    /// Creates (or truncates) the file at `path` with mode 0600 (also applied to an existing
    /// file), open for reading and writing.
    ///
    /// With `direct`, the file is opened with `O_DIRECT`; if the filesystem refuses that
    /// (`EINVAL`, as some filesystems do) it is opened buffered instead and a warning is logged;
    /// [`IoFile::is_direct`] tells which.
    pub fn create(path: &Path, direct: bool) -> Result<IoFile, IoError> {
        Self::open_with(path, direct, true)
    }

    /// Opens the existing file at `path` for reading and writing, with the same `O_DIRECT`
    /// fallback as [`IoFile::create`].
    pub fn open(path: &Path, direct: bool) -> Result<IoFile, IoError> {
        Self::open_with(path, direct, false)
    }

    fn open_with(path: &Path, direct: bool, create: bool) -> Result<IoFile, IoError> {
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if create {
            options.create(true).truncate(true).mode(0o600);
        }
        let op = if create { "create" } else { "open" };
        let os = |source| IoError::Os {
            path: path.to_path_buf(),
            offset: 0,
            len: 0,
            op,
            source,
        };
        let finish = |file: File, direct: bool| {
            if create {
                // `mode` only applies to a new file; an existing one is truncated and restricted
                // too, since spilled KV pages hold user data.
                file.set_permissions(Permissions::from_mode(0o600))
                    .map_err(|source| IoError::Os {
                        path: path.to_path_buf(),
                        offset: 0,
                        len: 0,
                        op: "chmod",
                        source,
                    })?;
            }
            Ok(IoFile {
                file,
                path: path.to_path_buf(),
                direct,
            })
        };
        if direct {
            match options.clone().custom_flags(libc::O_DIRECT).open(path) {
                Ok(file) => return finish(file, true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(
                        path = %path.display(),
                        "the filesystem does not support O_DIRECT; using buffered I/O for this file"
                    );
                }
                Err(e) => return Err(os(e)),
            }
        }
        let file = options.open(path).map_err(os)?;
        finish(file, false)
    }

    /// Whether the file is open with `O_DIRECT` (ops on it must then be aligned to
    /// [`IO_ALIGN`](super::IO_ALIGN)).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The path the file was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Current size of the file in bytes.
    pub fn len(&self) -> Result<u64, IoError> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|source| IoError::Os {
                path: self.path.clone(),
                offset: 0,
                len: 0,
                op: "stat",
                source,
            })
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> Result<bool, IoError> {
        self.len().map(|n| n == 0)
    }
}

impl AsRawFd for IoFile {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for IoFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has_o_direct(f: &IoFile) -> bool {
        // SAFETY: F_GETFL on an open descriptor.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert!(flags >= 0);
        flags & libc::O_DIRECT != 0
    }

    #[test]
    fn create_truncates_with_mode_0600_and_reports_direct_truthfully() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages.bin");
        std::fs::write(&path, b"old contents").unwrap();
        let f = IoFile::create(&path, true).unwrap();
        assert_eq!(f.len().unwrap(), 0);
        assert!(f.is_empty().unwrap());
        assert_eq!(f.path(), path);
        assert_eq!(f.is_direct(), has_o_direct(&f));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "mode {mode:o}");

        let g = IoFile::open(&path, false).unwrap();
        assert!(!g.is_direct() && !has_o_direct(&g));
    }

    #[test]
    fn open_of_a_missing_file_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.bin");
        let e = IoFile::open(&path, true).unwrap_err();
        assert!(
            matches!(&e, IoError::Os { op: "open", source, .. } if source.kind() == std::io::ErrorKind::NotFound)
        );
        assert!(e.to_string().contains("missing.bin"), "{e}");
    }
}
