//! The tiered store on real files: round trips through both tiers, spill and reload under
//! pressure, concurrent readers and writers, corruption, truncation, full disks, prefetch,
//! cleanup and metrics.

use retrowave_store::{
    ClusterRef, HeadRef, IoChoice, IoPath, SeqId, StoreConfig, StoreError, Tier, TieredStore,
};
use std::path::{Path, PathBuf};

const HEAD_DIM: u32 = 64;

/// Deterministic, distinct bytes for every (head, token, dim).
fn vectors(head: HeadRef, first_token: u64, tokens: u64, salt: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity((tokens * HEAD_DIM as u64 * 2) as usize);
    for t in first_token..first_token + tokens {
        let mut x =
            (head.seq.0 * 1_000_003 + head.layer as u64 * 7919 + head.kv_head as u64 * 104_729)
                ^ (t * 2_654_435_761)
                ^ salt as u64;
        for _ in 0..HEAD_DIM * 2 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.push(x as u8);
        }
    }
    out
}

/// Cluster sizes 1..=40, deterministic per head.
fn sizes(head: HeadRef, n: usize) -> Vec<u32> {
    let mut x = head.seq.0 * 31 + head.layer as u64 * 17 + head.kv_head as u64 + 1;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((x >> 33) % 40 + 1) as u32
        })
        .collect()
}

struct Appended {
    head: HeadRef,
    sizes: Vec<u32>,
    keys: Vec<u8>,
    values: Vec<u8>,
}

impl Appended {
    fn cluster(&self, c: usize) -> (&[u8], &[u8]) {
        let vb = HEAD_DIM as usize * 2;
        let from: usize = self.sizes[..c].iter().map(|&s| s as usize * vb).sum();
        let n = self.sizes[c] as usize * vb;
        (&self.keys[from..from + n], &self.values[from..from + n])
    }
}

fn append(store: &TieredStore, head: HeadRef, n: usize) -> Result<Appended, StoreError> {
    let sizes = sizes(head, n);
    let tokens: u64 = sizes.iter().map(|&s| s as u64).sum();
    let keys = vectors(head, 0, tokens, 1);
    let values = vectors(head, 0, tokens, 2);
    let ids = store.append(head, HEAD_DIM, &keys, &values, &sizes)?;
    assert_eq!(ids, 0..n as u32);
    Ok(Appended {
        head,
        sizes,
        keys,
        values,
    })
}

fn check_cluster(store: &TieredStore, a: &Appended, c: usize) -> Result<(), StoreError> {
    let (mut k, mut v) = (Vec::new(), Vec::new());
    let tokens = store.read_cluster(
        ClusterRef {
            head: a.head,
            cluster: c as u32,
        },
        &mut k,
        &mut v,
    )?;
    let (wk, wv) = a.cluster(c);
    assert_eq!(tokens, a.sizes[c]);
    assert!(k == wk && v == wv, "cluster {c} of {:?} differs", a.head);
    Ok(())
}

fn head(seq: u64, layer: u32, kv_head: u32) -> HeadRef {
    HeadRef {
        seq: SeqId(seq),
        layer,
        kv_head,
    }
}

fn config(dirs: Vec<PathBuf>, host: u64, io: IoChoice) -> StoreConfig {
    StoreConfig {
        host_capacity_bytes: host,
        dirs,
        io,
        queue_depth: 16,
        staging_bytes: 256 << 10,
        ..StoreConfig::default()
    }
}

fn disk_file(store: &TieredStore) -> PathBuf {
    store.disk_dirs()[0].join("pages.kv")
}

#[test]
fn host_round_trip_and_gather_layout() {
    let store = TieredStore::new(config(vec![], 16 << 20, IoChoice::Auto)).unwrap();
    assert_eq!(store.io_path(), None);
    let heads: Vec<_> = (0..4)
        .map(|h| append(&store, head(1, h / 2, h % 2), 50).unwrap())
        .collect();
    for a in &heads {
        for c in 0..50 {
            check_cluster(&store, a, c).unwrap();
        }
    }
    // gather hands out whole pages in the layout of PageLayout, in the order asked.
    let a = &heads[2];
    let layout = store.layout(HEAD_DIM);
    let mut out = Vec::new();
    let spans = store.gather(a.head, &[7, 3, 7, 49], &mut out).unwrap();
    assert_eq!(
        spans.iter().map(|s| s.cluster).collect::<Vec<_>>(),
        [7, 3, 7, 49]
    );
    for s in &spans {
        assert_eq!(s.tier, Tier::Host);
        let (mut k, mut v) = (Vec::new(), Vec::new());
        layout.unpack(&out[s.offset..s.offset + s.bytes], s.tokens, &mut k, &mut v);
        let (wk, wv) = a.cluster(s.cluster as usize);
        assert_eq!((k.as_slice(), v.as_slice()), (wk, wv));
    }
    // gather_into fills a caller's buffer with the same bytes; a short buffer is an error.
    let mut buf = vec![0xEEu8; out.len() + 100];
    let spans2 = store.gather_into(a.head, &[7, 3, 7, 49], &mut buf).unwrap();
    assert_eq!(spans2, spans);
    assert_eq!(&buf[..out.len()], &out[..]);
    assert!(buf[out.len()..].iter().all(|&b| b == 0xEE));
    assert!(matches!(
        store.gather_into(a.head, &[7, 3], &mut buf[..100]),
        Err(StoreError::Shape(_))
    ));
    // gather appends after what the Vec holds.
    let mut tail = vec![1u8, 2, 3];
    let spans3 = store.gather(a.head, &[49], &mut tail).unwrap();
    assert_eq!(spans3[0].offset, 3);
    assert_eq!(
        &tail[3..],
        &out[spans[3].offset..spans[3].offset + spans[3].bytes]
    );
    let st = store.stats();
    assert_eq!(st.clusters, 200);
    assert_eq!(st.disk_bytes, 0);
    // Unknown heads and clusters are typed errors.
    assert!(matches!(
        store.gather(head(9, 0, 0), &[0], &mut out),
        Err(StoreError::UnknownHead { seq: 9, .. })
    ));
    assert!(matches!(
        store.gather(a.head, &[50], &mut out),
        Err(StoreError::UnknownCluster {
            cluster: 50,
            stored: 50,
            ..
        })
    ));
    // A bad append changes nothing.
    assert!(matches!(
        store.append(a.head, HEAD_DIM, &[0; 10], &[0; 10], &[1]),
        Err(StoreError::Shape(_))
    ));
    assert_eq!(store.clusters(a.head).unwrap(), 50);
    // Ending the sequence frees everything.
    store.free_sequence(SeqId(1));
    let st = store.stats();
    assert_eq!((st.clusters, st.host_bytes, st.arena_used_bytes), (0, 0, 0));
}

#[test]
fn host_full_without_disk_tier_is_a_typed_error_and_keeps_data() {
    let store = TieredStore::new(config(vec![], 256 << 10, IoChoice::Auto)).unwrap();
    let a = append(&store, head(1, 0, 0), 20).unwrap();
    let mut err = None;
    for l in 1..100 {
        if let Err(e) = append(&store, head(1, l, 0), 20) {
            err = Some(e);
            break;
        }
    }
    let err = err.expect("256 KiB must fill up");
    assert!(matches!(err, StoreError::HostFull { .. }), "{err}");
    assert!(err.to_string().contains("store.dirs"), "{err}");
    for c in 0..20 {
        check_cluster(&store, &a, c).unwrap();
    }
}

fn spill_and_reload(io: IoChoice) {
    let dir = tempfile::tempdir().unwrap();
    // 512 KiB of host memory for ~5 MiB of records.
    let store = match TieredStore::new(config(vec![dir.path().to_path_buf()], 512 << 10, io)) {
        Err(StoreError::Io { source, .. })
            if matches!(*source, retrowave_store::io::IoError::Unavailable { .. }) =>
        {
            // Containers with io_uring blocked (seccomp, sysctl): the fallback test covers pread.
            eprintln!("io_uring is not available here ({source}); skipping");
            return;
        }
        r => r.unwrap(),
    };
    let want = match io {
        IoChoice::Pread => IoPath::Pread,
        _ => IoPath::Uring,
    };
    assert_eq!(store.io_path(), Some(want));
    let all: Vec<_> = (0..8)
        .map(|h| append(&store, head(3, h, 0), 120).unwrap())
        .collect();
    let st = store.stats();
    assert!(st.arena_used_bytes <= 512 << 10);
    assert!(st.spilled > 0 && st.disk_bytes > 0, "{st:?}");
    assert_eq!(st.clusters, 8 * 120);
    // Early clusters were spilled (least recently used).
    assert_eq!(
        store
            .tier_of(ClusterRef {
                head: all[0].head,
                cluster: 0
            })
            .unwrap(),
        Tier::Disk
    );
    // Everything reads back intact, in a scattered order, many times over.
    let mut x = 12345u64;
    for _ in 0..3000 {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let a = &all[(x >> 40) as usize % all.len()];
        check_cluster(&store, a, (x >> 20) as usize % 120).unwrap();
    }
    let st = store.stats();
    assert!(st.disk_reads > 100 && st.host_reads > 0, "{st:?}");
    assert_eq!(st.checksum_failures, 0);
    // Gathers that mix tiers report where each record was.
    let mut out = Vec::new();
    let ids: Vec<u32> = (0..120).collect();
    let spans = store.gather(all[5].head, &ids, &mut out).unwrap();
    assert_eq!(spans.len(), 120);
    let layout = store.layout(HEAD_DIM);
    for s in &spans {
        let (mut k, mut v) = (Vec::new(), Vec::new());
        layout.unpack(&out[s.offset..s.offset + s.bytes], s.tokens, &mut k, &mut v);
        assert_eq!(
            (k.as_slice(), v.as_slice()),
            all[5].cluster(s.cluster as usize)
        );
    }
    store.free_sequence(SeqId(3));
    let st = store.stats();
    assert_eq!(
        (st.clusters, st.host_bytes, st.disk_bytes),
        (0, 0, 0),
        "{st:?}"
    );
}

#[test]
fn spill_and_reload_through_io_uring() {
    spill_and_reload(IoChoice::Uring);
}

#[test]
fn spill_and_reload_through_the_pread_fallback() {
    spill_and_reload(IoChoice::Pread);
}

#[test]
fn striping_over_two_directories() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = TieredStore::new(config(
        vec![d1.path().to_path_buf(), d2.path().to_path_buf()],
        256 << 10,
        IoChoice::Auto,
    ))
    .unwrap();
    let all: Vec<_> = (0..4)
        .map(|h| append(&store, head(1, h, 0), 100).unwrap())
        .collect();
    let sizes: Vec<u64> = store
        .disk_dirs()
        .iter()
        .map(|d| std::fs::metadata(d.join("pages.kv")).unwrap().len())
        .collect();
    assert!(
        sizes.iter().all(|&s| s > 64 << 10),
        "both disks hold records: {sizes:?}"
    );
    for a in &all {
        for c in 0..100 {
            check_cluster(&store, a, c).unwrap();
        }
    }
}

#[test]
fn concurrent_writers_and_readers() {
    let dir = tempfile::tempdir().unwrap();
    let store = disk_store(dir.path(), 1 << 20);
    let shared = append(&store, head(100, 0, 0), 200).unwrap();
    std::thread::scope(|s| {
        for w in 0..4u64 {
            let store = store.clone();
            let shared = &shared;
            s.spawn(move || {
                let mine: Vec<_> = (0..6)
                    .map(|l| append(&store, head(w, l, 1), 60).unwrap())
                    .collect();
                let mut x = w + 1;
                for i in 0..1500 {
                    x = x
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    if i % 3 == 0 {
                        check_cluster(&store, shared, (x >> 33) as usize % 200).unwrap();
                    } else {
                        let a = &mine[(x >> 40) as usize % mine.len()];
                        check_cluster(&store, a, (x >> 20) as usize % 60).unwrap();
                    }
                }
                store.free_sequence(SeqId(w));
            });
        }
    });
    let st = store.stats();
    assert_eq!(st.clusters, 200);
    assert!(st.spilled > 0 && st.disk_reads > 0, "{st:?}");
    for c in 0..200 {
        check_cluster(&store, &shared, c).unwrap();
    }
}

/// Spills everything of `a` to disk.
/// A store with `host` bytes of host memory spilling to one file in `dir`.
fn disk_store(dir: &std::path::Path, host: u64) -> TieredStore {
    TieredStore::new(config(vec![dir.to_path_buf()], host, IoChoice::Auto)).unwrap()
}

fn spill_all(store: &TieredStore) {
    let cap = store.stats().arena_capacity_bytes;
    store.spill(cap).unwrap();
    assert_eq!(store.stats().arena_used_bytes, 0);
}

#[test]
fn a_flipped_byte_on_disk_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let store = disk_store(dir.path(), 1 << 20);
    let a = append(&store, head(1, 0, 0), 40).unwrap();
    spill_all(&store);
    // Flip one byte in the middle of the file, where some record lives.
    let path = disk_file(&store);
    let mut bytes = std::fs::read(&path).unwrap();
    // Offset 100 of any block lies in a record (records start at block boundaries and are whole
    // 2 KiB pages), never in the padding after one.
    let at = bytes.len() / 2 / 4096 * 4096 + 100;
    bytes[at] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let mut bad = 0;
    for c in 0..40 {
        match check_cluster(&store, &a, c) {
            Ok(()) => {}
            Err(StoreError::Checksum { page, ref file, .. }) => {
                assert_eq!(file, &path);
                assert!(page < 5);
                bad += 1;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(bad, 1, "exactly the record holding the flipped byte fails");
    assert_eq!(store.stats().checksum_failures, 1);
    // The store keeps working: new data round-trips.
    let b = append(&store, head(2, 0, 0), 10).unwrap();
    check_cluster(&store, &b, 3).unwrap();
}

#[test]
fn a_truncated_or_removed_file_gives_errors_not_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let store = disk_store(dir.path(), 1 << 20);
    let a = append(&store, head(1, 0, 0), 40).unwrap();
    spill_all(&store);
    let path = disk_file(&store);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (mut ok, mut failed) = (0, 0);
    for c in 0..40 {
        match check_cluster(&store, &a, c) {
            Ok(()) => ok += 1,
            Err(StoreError::Io { .. }) | Err(StoreError::Checksum { .. }) => failed += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(ok > 0 && failed > 0, "ok {ok}, failed {failed}");
    // Removing the file underneath: the open descriptor keeps the data reachable on Linux, so
    // the records that survived the truncation still read back intact.
    std::fs::remove_file(&path).unwrap();
    let c = (0..40).find(|&c| check_cluster(&store, &a, c).is_ok());
    assert!(c.is_some());
    let b = append(&store, head(2, 0, 0), 10).unwrap();
    check_cluster(&store, &b, 9).unwrap();
}

/// Appends heads of 30 clusters until the store refuses one, then checks that the refusal is a
/// full disk (or host memory that cannot spill), that it was counted, and that everything
/// appended before reads back intact.
fn fill_until_full(store: &TieredStore, never: &str) {
    let mut kept = Vec::new();
    let err = loop {
        match append(store, head(1, kept.len() as u32, 0), 30) {
            Ok(a) => kept.push(a),
            Err(e) => break e,
        }
        assert!(kept.len() < 200, "{never}");
    };
    assert!(
        matches!(
            err,
            StoreError::DiskFull { .. } | StoreError::HostFull { .. }
        ),
        "{err}"
    );
    assert!(store.stats().disk_full > 0, "{:?}", store.stats());
    for a in &kept {
        for c in 0..30 {
            check_cluster(store, a, c).unwrap();
        }
    }
}

#[test]
fn a_full_disk_quota_is_a_typed_error_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(vec![dir.path().to_path_buf()], 256 << 10, IoChoice::Auto);
    cfg.max_disk_bytes_per_dir = Some(512 << 10);
    let store = TieredStore::new(cfg).unwrap();
    fill_until_full(&store, "the quota never filled");
    // Ending sequences frees the disk: appends work again.
    store.free_sequence(SeqId(1));
    append(&store, head(2, 0, 0), 30).unwrap();
}

/// A real ENOSPC from a 1 MiB tmpfs (needs root to mount; skipped with a note otherwise).
#[test]
fn a_full_filesystem_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1M", "tmpfs"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("cannot mount a tmpfs here: skipping the ENOSPC part");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(dir.path());
    {
        let store = disk_store(dir.path(), 256 << 10);
        fill_until_full(&store, "1 MiB never filled");
    }
    // The store's files are gone after it is dropped.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn prefetch_loads_ahead_and_shares_reads() {
    let dir = tempfile::tempdir().unwrap();
    let store = disk_store(dir.path(), 4 << 20);
    let a = append(&store, head(1, 0, 0), 100).unwrap();
    spill_all(&store);
    let refs: Vec<ClusterRef> = (0..50)
        .map(|c| ClusterRef {
            head: a.head,
            cluster: c,
        })
        .collect();
    // The same clusters named twice, by two tickets, waited for from two threads.
    let t1 = store.prefetch(&refs);
    let t2 = store.prefetch(&refs[10..40]);
    std::thread::scope(|s| {
        let st = store.clone();
        s.spawn(move || st.wait(t2).unwrap());
        store.wait(t1).unwrap();
    });
    for r in &refs {
        assert_eq!(store.tier_of(*r).unwrap(), Tier::Host);
    }
    assert_eq!(
        store
            .tier_of(ClusterRef {
                head: a.head,
                cluster: 70
            })
            .unwrap(),
        Tier::Disk
    );
    let before = store.stats();
    for c in 0..50 {
        check_cluster(&store, &a, c).unwrap();
    }
    let after = store.stats();
    assert_eq!(
        after.disk_reads, before.disk_reads,
        "prefetched clusters are host hits"
    );
    assert_eq!(after.host_reads - before.host_reads, 50);
    // Each cluster was read from disk once however many asked.
    assert_eq!(store.stats().disk_loads, 50);
}

#[test]
fn private_files_are_removed_at_shutdown_and_stale_ones_at_start() {
    let dir = tempfile::tempdir().unwrap();
    // A directory left by a crashed process (pid far beyond pid_max) and one of a live process.
    let stale = dir.path().join("retrowave-kv-4194999-0");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("pages.kv"), b"old").unwrap();
    let live = dir.path().join("retrowave-kv-1-0");
    std::fs::create_dir(&live).unwrap();
    let unrelated = dir.path().join("keep-me");
    std::fs::write(&unrelated, b"x").unwrap();
    let store = disk_store(dir.path(), 1 << 20);
    assert!(!stale.exists(), "stale files of a dead process are removed");
    assert!(live.exists(), "files of a running process (pid 1) are kept");
    assert!(unrelated.exists());
    let private = store.disk_dirs()[0].clone();
    assert!(private.join("pages.kv").exists());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&private).unwrap().permissions().mode() & 0o777,
        0o700
    );
    drop(store);
    assert!(!private.exists());
}

#[test]
fn metrics_report_tiers_path_and_checksum_failures() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let dir = tempfile::tempdir().unwrap();
    metrics::with_local_recorder(&recorder, || {
        let store = TieredStore::new(config(
            vec![dir.path().to_path_buf()],
            256 << 10,
            IoChoice::Pread,
        ))
        .unwrap();
        let a = append(&store, head(1, 0, 0), 150).unwrap();
        for c in 0..150 {
            check_cluster(&store, &a, c).unwrap();
        }
        spill_all(&store);
        let path = disk_file(&store);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[5000] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let _ = (0..150)
            .filter(|&c| check_cluster(&store, &a, c).is_err())
            .count();
    });
    let snap = snapshotter.snapshot().into_hashmap();
    // Gauges as their value, counters as their count, histograms as their number of samples.
    let find = |name: &str, label: Option<(&str, &str)>| -> Option<f64> {
        snap.iter()
            .find(|(k, _)| {
                k.key().name() == name
                    && label.is_none_or(|(n, v)| {
                        k.key().labels().any(|l| l.key() == n && l.value() == v)
                    })
            })
            .map(|(_, (_, _, v))| match v {
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Counter(n) => *n as f64,
                DebugValue::Histogram(h) => h.len() as f64,
            })
    };
    assert_eq!(
        find("retrowave_store_io_path", Some(("path", "pread"))),
        Some(1.0)
    );
    assert_eq!(
        find("retrowave_store_io_path", Some(("path", "io_uring"))),
        Some(0.0)
    );
    assert_eq!(
        find("retrowave_store_checksum_failures_total", None),
        Some(1.0)
    );
    assert!(find("retrowave_store_bytes", Some(("tier", "disk"))).unwrap() > 0.0);
    assert!(
        find(
            "retrowave_store_cluster_reads_total",
            Some(("tier", "disk"))
        )
        .unwrap()
            > 0.0
    );
    assert!(find("retrowave_store_disk_read_seconds", None).unwrap() > 0.0);
    let ratio = find("retrowave_store_host_hit_ratio", None).unwrap();
    assert!((0.0..=1.0).contains(&ratio), "{ratio}");
}

#[test]
fn pinned_records_are_read_in_place_and_stay_until_dropped() {
    let dir = tempfile::tempdir().unwrap();
    // 256 KiB of host memory for ~2.5 MiB of records: most clusters live on disk.
    let store = disk_store(dir.path(), 256 << 10);
    let a = append(&store, head(9, 0, 0), 150).unwrap();
    let layout = store.layout(HEAD_DIM);
    let on_disk: Vec<u32> = (0..150u32)
        .filter(|&c| {
            store
                .tier_of(ClusterRef {
                    head: a.head,
                    cluster: c,
                })
                .unwrap()
                == Tier::Disk
        })
        .collect();
    assert!(on_disk.len() > 100, "{} clusters on disk", on_disk.len());
    // Some from disk, some from host memory, in a scattered order.
    let mut want: Vec<u32> = on_disk.iter().copied().step_by(7).take(10).collect();
    want.extend([149, 148, 3]);
    let loads = store.stats().disk_loads;
    let pinned = store.pin(a.head, &want).unwrap();
    assert_eq!(pinned.len(), want.len());
    assert!(store.stats().disk_loads > loads);
    for (i, &c) in want.iter().enumerate() {
        let (rec, tokens) = pinned.record(i);
        assert_eq!(tokens, a.sizes[c as usize]);
        let (mut k, mut v) = (Vec::new(), Vec::new());
        layout.unpack(rec, tokens, &mut k, &mut v);
        let (wk, wv) = a.cluster(c as usize);
        assert!(k == wk && v == wv, "cluster {c}");
    }
    assert_eq!(pinned.tier(0), Tier::Disk);
    // While pinned, nothing of them is spilled, however hard the store is pressed.
    let before: Vec<Vec<u8>> = (0..pinned.len())
        .map(|i| pinned.record(i).0.to_vec())
        .collect();
    let other = append(&store, head(9, 1, 0), 150).unwrap();
    store.spill(256 << 10).unwrap();
    for (i, b) in before.iter().enumerate() {
        assert_eq!(pinned.record(i).0, &b[..], "record {i} moved while pinned");
    }
    drop(pinned);
    // Unpinned, they spill like any other record, and read back intact.
    store.spill(256 << 10).unwrap();
    assert_eq!(
        store
            .tier_of(ClusterRef {
                head: a.head,
                cluster: want[0]
            })
            .unwrap(),
        Tier::Disk
    );
    for c in [want[0] as usize, 149, 0] {
        check_cluster(&store, &a, c).unwrap();
    }
    check_cluster(&store, &other, 7).unwrap();
    // An unknown head or cluster is an error and pins nothing.
    assert!(store.pin(head(10, 0, 0), &[0]).is_err());
    assert!(store.pin(a.head, &[3, 150]).is_err());
    store.spill(256 << 10).unwrap();
    assert_eq!(
        store
            .tier_of(ClusterRef {
                head: a.head,
                cluster: 3
            })
            .unwrap(),
        Tier::Disk
    );
}
