//! The GGUF reader against corrupt files: small files built byte by byte (each corruption checked
//! for its specific error), cuts of the real SmolLM2 file, and random byte mutations (never a
//! panic). A counting allocator checks that absurd counts never drive a large allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;

use proptest::prelude::*;
use retrowave_model::gguf::{GgufError, GgufFile, MAX_TENSORS};

// ---- allocation tracking (per thread, so parallel tests do not disturb each other) ----

struct CountingAlloc;

thread_local! {
    static LARGEST_ALLOC: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST_ALLOC.try_with(|m| m.set(m.get().max(size)));
}

// SAFETY: forwards to the system allocator; only records sizes.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Parses `bytes` and returns the result with the largest single allocation made meanwhile.
fn parse_tracking(bytes: Vec<u8>) -> (Result<GgufFile, GgufError>, usize) {
    LARGEST_ALLOC.with(|m| m.set(0));
    let r = GgufFile::from_bytes(bytes);
    (r, LARGEST_ALLOC.with(Cell::get))
}

// ---- a raw GGUF builder that can write anything, valid or not ----

fn s(text: &[u8]) -> Vec<u8> {
    let mut v = (text.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(text);
    v
}

fn kv(key: &str, type_id: u32, value: &[u8]) -> Vec<u8> {
    let mut v = s(key.as_bytes());
    v.extend_from_slice(&type_id.to_le_bytes());
    v.extend_from_slice(value);
    v
}

fn kv_u32(key: &str, x: u32) -> Vec<u8> {
    kv(key, 4, &x.to_le_bytes())
}

fn kv_str(key: &str, text: &str) -> Vec<u8> {
    kv(key, 8, &s(text.as_bytes()))
}

fn str_array(items: &[&str]) -> Vec<u8> {
    let mut v = 8u32.to_le_bytes().to_vec();
    v.extend_from_slice(&(items.len() as u64).to_le_bytes());
    for i in items {
        v.extend(s(i.as_bytes()));
    }
    v
}

fn tensor(name: &str, dims: &[u64], type_id: u32, offset: u64) -> Vec<u8> {
    let mut v = s(name.as_bytes());
    v.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        v.extend_from_slice(&d.to_le_bytes());
    }
    v.extend_from_slice(&type_id.to_le_bytes());
    v.extend_from_slice(&offset.to_le_bytes());
    v
}

struct Raw {
    magic: [u8; 4],
    version: u32,
    tensor_count: Option<u64>,
    kv_count: Option<u64>,
    kvs: Vec<Vec<u8>>,
    tensors: Vec<Vec<u8>>,
    alignment: usize,
    data: Vec<u8>,
}

impl Raw {
    fn new() -> Self {
        Self {
            magic: *b"GGUF",
            version: 3,
            tensor_count: None,
            kv_count: None,
            kvs: Vec::new(),
            tensors: Vec::new(),
            alignment: 32,
            data: Vec::new(),
        }
    }

    /// Bytes, and the offset where the tensor infos end.
    fn build_with_infos_end(&self) -> (Vec<u8>, usize) {
        let mut out = self.magic.to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        let tc = self.tensor_count.unwrap_or(self.tensors.len() as u64);
        out.extend_from_slice(&tc.to_le_bytes());
        let kc = self.kv_count.unwrap_or(self.kvs.len() as u64);
        out.extend_from_slice(&kc.to_le_bytes());
        for k in &self.kvs {
            out.extend_from_slice(k);
        }
        for t in &self.tensors {
            out.extend_from_slice(t);
        }
        let infos_end = out.len();
        if !self.data.is_empty() {
            out.resize(infos_end.next_multiple_of(self.alignment), 0);
            out.extend_from_slice(&self.data);
        }
        (out, infos_end)
    }

    fn build(&self) -> Vec<u8> {
        self.build_with_infos_end().0
    }
}

/// A small valid file: a few keys of several types and two tensors (F32 [8], Q8_0 [32 x 2]).
fn small_valid() -> Raw {
    let mut r = Raw::new();
    r.kvs = vec![
        kv_str("general.architecture", "llama"),
        kv_u32("llama.block_count", 1),
        kv("general.flag", 7, &[1]),
        kv("tokenizer.ggml.tokens", 9, &str_array(&["a", "bc", "<s>"])),
        kv("some.float", 6, &1.5f32.to_le_bytes()),
    ];
    r.tensors = vec![
        tensor("norm.weight", &[8], 0, 0),
        tensor("m.weight", &[32, 2], 8, 32),
    ];
    r.data = vec![0u8; 32 + 68];
    r
}

fn err(r: &Raw) -> GgufError {
    match GgufFile::from_bytes(r.build()) {
        Ok(_) => panic!("a corrupt file was accepted"),
        Err(e) => e,
    }
}

fn model_path(name: &str) -> PathBuf {
    retrowave_model::registry::ensure_model(name)
        .unwrap_or_else(|e| panic!("cannot get model {name}: {e}"))
}

#[test]
fn small_valid_file_parses() {
    let g = GgufFile::from_bytes(small_valid().build()).unwrap();
    assert_eq!(g.tensors().len(), 2);
    assert_eq!(
        g.get_str_array("tokenizer.ggml.tokens").unwrap(),
        ["a", "bc", "<s>"]
    );
    assert_eq!(g.tensor_info("m.weight").unwrap().n_bytes, 68);
}

#[test]
fn every_cut_of_a_small_file_is_rejected() {
    let (bytes, infos_end) = small_valid().build_with_infos_end();
    let data_start = infos_end.next_multiple_of(32);
    for cut in 0..bytes.len() {
        let e = GgufFile::from_bytes(bytes[..cut].to_vec()).err();
        match e {
            Some(GgufError::Truncated {
                offset,
                needed,
                available,
                ..
            }) => {
                assert!(
                    cut < infos_end,
                    "cut {cut}: truncation reported after the infos"
                );
                assert!(offset <= cut as u64 && available < needed, "cut {cut}");
            }
            Some(GgufError::TensorOutOfBounds {
                tensor, file_len, ..
            }) => {
                assert!(
                    cut >= infos_end,
                    "cut {cut}: out-of-bounds reported inside the header"
                );
                assert_eq!(file_len, cut as u64);
                // norm.weight holds the first 32 data bytes, m.weight the rest.
                let expected = if cut < data_start + 32 {
                    "norm.weight"
                } else {
                    "m.weight"
                };
                assert_eq!(tensor, expected, "cut {cut}");
            }
            other => panic!("cut {cut}: unexpected {other:?}"),
        }
    }
}

#[test]
fn real_file_cut_in_tensor_data_or_metadata() {
    let bytes = std::fs::read(model_path("smollm2-135m")).unwrap();
    let full = GgufFile::from_bytes(bytes.clone()).unwrap();
    let last = full
        .tensors()
        .iter()
        .max_by_key(|t| t.offset)
        .unwrap()
        .clone();
    let data_start = full.data_start() as usize;
    drop(full);

    let cut = bytes.len() - 1000;
    match GgufFile::from_bytes(bytes[..cut].to_vec()) {
        Err(GgufError::TensorOutOfBounds {
            tensor,
            offset,
            size,
            file_len,
            ..
        }) => {
            assert_eq!(
                (tensor, offset, size),
                (last.name, last.offset, last.n_bytes)
            );
            assert_eq!(file_len, cut as u64);
        }
        other => panic!("unexpected {other:?}"),
    }
    // Inside the metadata (the vocabulary arrays span most of the first megabyte).
    for cut in [20, 1000, 700_000, data_start - 40] {
        let e = GgufFile::from_bytes(bytes[..cut].to_vec()).unwrap_err();
        assert!(matches!(e, GgufError::Truncated { .. }), "cut {cut}: {e}");
    }
}

#[test]
fn errors_from_open_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cut.gguf");
    let bytes = small_valid().build();
    std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
    let e = GgufFile::open(&p).unwrap_err();
    assert!(matches!(e, GgufError::TensorOutOfBounds { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("cut.gguf") && msg.contains("m.weight"),
        "{msg}"
    );
    let e = GgufFile::open(&dir.path().join("absent.gguf")).unwrap_err();
    assert!(matches!(e, GgufError::Io { .. }) && e.to_string().contains("absent.gguf"));
}

#[test]
fn bad_magic_and_versions() {
    let mut r = small_valid();
    r.magic = *b"GGML";
    let e = err(&r);
    assert!(matches!(e, GgufError::BadMagic { found, .. } if &found == b"GGML"));
    assert!(e.to_string().contains("GGML"), "{e}");

    for (v, hint) in [
        (1, "version 1"),
        (4, "only versions"),
        (0x0300_0000, "big-endian"),
    ] {
        let mut r = small_valid();
        r.version = v;
        let e = err(&r);
        assert!(matches!(e, GgufError::UnsupportedVersion { version, .. } if version == v));
        assert!(e.to_string().contains(hint), "{e}");
    }
    let mut r = small_valid();
    r.version = 2;
    assert_eq!(GgufFile::from_bytes(r.build()).unwrap().version(), 2);
}

#[test]
fn tensor_offset_past_the_end() {
    let mut r = small_valid();
    r.tensors[1] = tensor("m.weight", &[32, 2], 8, 1 << 20);
    let len = r.build().len() as u64;
    match err(&r) {
        GgufError::TensorOutOfBounds {
            tensor,
            size,
            file_len,
            offset,
            ..
        } => {
            assert_eq!((tensor.as_str(), size, file_len), ("m.weight", 68, len));
            assert!(offset > 1 << 20);
        }
        e => panic!("{e}"),
    }
    // An offset so large that adding the data start overflows.
    let mut r = small_valid();
    r.tensors[1] = tensor("m.weight", &[32, 2], 8, u64::MAX - 31);
    assert!(matches!(err(&r), GgufError::TensorOutOfBounds { .. }));
}

#[test]
fn absurd_counts_fail_without_large_allocations() {
    let cases: Vec<(&str, Raw)> = vec![
        ("tensor count", {
            let mut r = small_valid();
            r.tensor_count = Some(u64::MAX);
            r
        }),
        ("tensor count", {
            let mut r = small_valid();
            r.tensor_count = Some(MAX_TENSORS + 1);
            r
        }),
        ("key/value count", {
            let mut r = small_valid();
            r.kv_count = Some(1 << 40);
            r
        }),
        ("huge.array", {
            let mut r = small_valid();
            let mut arr = 8u32.to_le_bytes().to_vec();
            arr.extend_from_slice(&(1u64 << 60).to_le_bytes());
            r.kvs.push(kv("huge.array", 9, &arr));
            r
        }),
        ("huge.string", {
            let mut r = small_valid();
            let mut v = (1u64 << 62).to_le_bytes().to_vec();
            v.extend_from_slice(b"abc");
            r.kvs.push(kv("huge.string", 8, &v));
            r
        }),
        ("name of tensor", {
            let mut r = small_valid();
            let mut t = (u64::MAX).to_le_bytes().to_vec();
            t.extend_from_slice(b"x");
            r.tensors[0] = t;
            r
        }),
    ];
    for (what, r) in cases {
        let (res, largest) = parse_tracking(r.build());
        match res {
            Err(GgufError::CountTooLarge {
                what: w,
                count,
                limit,
                ..
            }) => {
                assert!(w.contains(what), "{w} should mention {what}");
                assert!(count > limit);
            }
            other => panic!("{what}: unexpected {other:?}"),
        }
        assert!(largest < 64 * 1024, "{what}: allocated {largest} bytes");
    }

    // Control: the tracker does see allocations in proportion to a genuine array.
    let mut r = small_valid();
    let mut arr = 4u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&100_000u64.to_le_bytes());
    arr.extend(std::iter::repeat_n(0u8, 400_000));
    r.kvs.push(kv("real.array", 9, &arr));
    let (res, largest) = parse_tracking(r.build());
    assert_eq!(
        res.unwrap().get_i32_array("real.array").unwrap().len(),
        100_000
    );
    assert!(largest >= 100_000 * 16, "tracker saw only {largest} bytes");

    // Counts under the hard limits but larger than the file can hold: truncation, still no
    // allocation in proportion to the count.
    let mut r = small_valid();
    r.tensor_count = Some(MAX_TENSORS);
    let (res, largest) = parse_tracking(r.build());
    assert!(matches!(res, Err(GgufError::Truncated { .. })), "{res:?}");
    assert!(largest < 64 * 1024, "allocated {largest}");
    let mut r = small_valid();
    let mut arr = 4u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&(1u64 << 23).to_le_bytes());
    r.kvs.push(kv("big.array", 9, &arr));
    let (res, largest) = parse_tracking(r.build());
    assert!(
        matches!(&res, Err(GgufError::Truncated { what, .. }) if what.contains("big.array")),
        "{res:?}"
    );
    assert!(largest < 64 * 1024, "allocated {largest}");
}

#[test]
fn unknown_and_invalid_types() {
    for id in [4u32, 5, 99] {
        let mut r = small_valid();
        r.tensors[0] = tensor("norm.weight", &[8], id, 0);
        match err(&r) {
            GgufError::UnknownTensorType {
                tensor, type_id, ..
            } => {
                assert_eq!((tensor.as_str(), type_id), ("norm.weight", id));
            }
            e => panic!("{e}"),
        }
    }
    let mut r = small_valid();
    r.kvs.push(kv("odd.value", 13, &[0; 8]));
    assert!(
        matches!(err(&r), GgufError::UnknownValueType { key, type_id: 13, .. } if key == "odd.value")
    );
    let mut r = small_valid();
    let mut arr = 77u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&1u64.to_le_bytes());
    r.kvs.push(kv("odd.array", 9, &arr));
    assert!(matches!(
        err(&r),
        GgufError::UnknownValueType { type_id: 77, .. }
    ));

    let mut r = small_valid();
    r.kvs.push(kv("bad.bool", 7, &[2]));
    assert!(matches!(err(&r), GgufError::InvalidBool { value: 2, .. }));

    let mut r = small_valid();
    r.kvs.push(kv("bad.utf8", 8, &s(&[0x66, 0xff, 0xfe])));
    assert!(matches!(err(&r), GgufError::InvalidUtf8 { what, .. } if what.contains("bad.utf8")));
    let mut r = small_valid();
    let mut bad_key = s(&[0xc3, 0x28]);
    bad_key.extend_from_slice(&4u32.to_le_bytes());
    bad_key.extend_from_slice(&1u32.to_le_bytes());
    r.kvs.push(bad_key);
    assert!(matches!(err(&r), GgufError::InvalidUtf8 { .. }));

    // Arrays nested five deep.
    let mut inner = 4u32.to_le_bytes().to_vec();
    inner.extend_from_slice(&1u64.to_le_bytes());
    inner.extend_from_slice(&5u32.to_le_bytes());
    for _ in 0..4 {
        let mut outer = 9u32.to_le_bytes().to_vec();
        outer.extend_from_slice(&1u64.to_le_bytes());
        outer.extend(inner);
        inner = outer;
    }
    let mut r = small_valid();
    r.kvs.push(kv("deep", 9, &inner));
    assert!(matches!(err(&r), GgufError::ArrayTooDeep { key, .. } if key == "deep"));
}

#[test]
fn bad_shapes() {
    type Check = fn(&GgufError) -> bool;
    let cases: Vec<(Vec<u8>, Check)> = vec![
        (tensor("norm.weight", &[], 0, 0), |e| {
            matches!(e, GgufError::BadDimCount { n_dims: 0, .. })
        }),
        (tensor("norm.weight", &[8, 1, 1, 1, 1], 0, 0), |e| {
            matches!(e, GgufError::BadDimCount { n_dims: 5, .. })
        }),
        (tensor("norm.weight", &[8, 0], 0, 0), |e| {
            matches!(e, GgufError::ZeroDim { .. })
        }),
        (tensor("norm.weight", &[1 << 32, 1 << 32], 0, 0), |e| {
            matches!(e, GgufError::ElementCountOverflow { .. })
        }),
        (tensor("norm.weight", &[1 << 62, 2], 0, 0), |e| {
            matches!(e, GgufError::ElementCountOverflow { .. })
        }),
        (tensor("norm.weight", &[33], 2, 0), |e| {
            matches!(
                e,
                GgufError::RowNotBlockMultiple {
                    row_len: 33,
                    block_size: 32,
                    ..
                }
            )
        }),
    ];
    for (t, check) in cases {
        let mut r = small_valid();
        r.tensors[0] = t;
        let e = err(&r);
        assert!(check(&e), "{e}");
        assert!(e.to_string().contains("norm.weight"), "{e}");
    }
}

#[test]
fn alignment_rules() {
    for a in [0u32, 3, 48] {
        let mut r = small_valid();
        r.kvs.push(kv_u32("general.alignment", a));
        assert!(
            matches!(err(&r), GgufError::BadAlignment { alignment, .. } if alignment == u64::from(a))
        );
    }
    let mut r = small_valid();
    r.kvs.push(kv_str("general.alignment", "32"));
    assert!(matches!(err(&r), GgufError::WrongType { key, .. } if key == "general.alignment"));

    let mut r = small_valid();
    r.tensors[1] = tensor("m.weight", &[32, 2], 8, 16);
    assert!(
        matches!(err(&r), GgufError::MisalignedTensor { tensor, offset: 16, alignment: 32, .. } if tensor == "m.weight")
    );

    // With alignment 16 the same layout is valid, and the data section starts 16-aligned.
    let mut r = small_valid();
    r.kvs.push(kv_u32("general.alignment", 16));
    r.alignment = 16;
    r.tensors[1] = tensor("m.weight", &[32, 2], 8, 32);
    let g = GgufFile::from_bytes(r.build()).unwrap();
    assert_eq!((g.alignment(), g.data_start() % 16), (16, 0));
}

#[test]
fn overlapping_and_duplicate_entries() {
    let mut r = small_valid();
    r.tensors[0] = tensor("norm.weight", &[16], 0, 32); // 64 bytes at 32..96
    r.tensors[1] = tensor("m.weight", &[32, 2], 8, 64); // 68 bytes at 64..132
    r.data = vec![0u8; 160];
    match err(&r) {
        GgufError::TensorOverlap { first, second, .. } => {
            assert_eq!(
                (first.as_str(), second.as_str()),
                ("norm.weight", "m.weight")
            );
        }
        e => panic!("{e}"),
    }
    let mut r = small_valid();
    r.tensors[1] = tensor("m.weight", &[32, 2], 8, 0);
    assert!(matches!(err(&r), GgufError::TensorOverlap { .. }));

    let mut r = small_valid();
    r.kvs.push(kv_u32("llama.block_count", 2));
    assert!(matches!(err(&r), GgufError::DuplicateKey { key, .. } if key == "llama.block_count"));

    let mut r = small_valid();
    r.tensors[1] = tensor("norm.weight", &[32, 2], 8, 32);
    assert!(matches!(err(&r), GgufError::DuplicateTensor { name, .. } if name == "norm.weight"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Random byte changes and cuts never panic; whatever opens can be used fully.
    #[test]
    fn mutated_files_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let mut bytes = small_valid().build();
        for (i, v) in edits {
            let i = i.index(bytes.len());
            bytes[i] = v;
        }
        if do_cut {
            let n = cut.index(bytes.len());
            bytes.truncate(n);
        }
        if let Ok(g) = GgufFile::from_bytes(bytes) {
            for t in g.tensors() {
                prop_assert_eq!(g.tensor_data(t).len() as u64, t.n_bytes);
            }
            for (k, _) in g.metadata() {
                let _ = (g.get_u32(k), g.get_str(k), g.get_str_array(k), g.get_i32_array(k), g.get_f32(k));
            }
        }
    }
}
