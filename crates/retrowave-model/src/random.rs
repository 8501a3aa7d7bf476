//! Random weights of real model shapes, for benchmarking where the real weights cannot be had
//! (Llama-3-8B and -70B here).
//!
//! A shape is a small TOML file (`configs/models/*.toml`) holding the fields of [`ModelConfig`];
//! [`load_shape`] reads and validates it. [`RandomWeights`] then serves every tensor that
//! [`expected_tensors`] lists for that shape through [`WeightSource`]:
//!
//! - matrices are BF16 views into one shared host buffer of random values, each starting at its
//!   own 64-byte-aligned offset (derived from a hash of the tensor name), so tensors differ while
//!   the buffer is only about as large as the largest tensor (the 2.1 GB embedding of
//!   Llama-3-70B) instead of the whole model (141 GB);
//! - norm weights are F32 ones and Q/K/V biases F32 zeros.
//!
//! Values are uniform in `[-b, b]` with `b = sqrt(3 / hidden)`, a standard deviation of
//! `1 / sqrt(hidden)`: a projection of a unit-RMS input (what the RMS norms hand every matrix but
//! `ffn_down`) gives unit-RMS outputs, so activations stay bounded through the layers. Decode
//! speed does not depend on weight values; results made with these weights must say so.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use retrowave_core::{RopeStyle, TensorType, WeightView};
use serde::Deserialize;

use crate::arch::{ArchError, Architecture, ModelConfig, WeightSource, expected_tensors};

/// Errors reading a model shape or building random weights.
#[derive(Debug, thiserror::Error)]
pub enum RandomError {
    /// The shape file cannot be read.
    #[error("{}: cannot read the model shape: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The shape file is not valid TOML, has an unknown or missing key, or a value of the wrong
    /// type. `key` is the offending key where it could be told.
    #[error("{}: {location}{message}", path.display())]
    Parse {
        path: PathBuf,
        key: Option<String>,
        /// "line N, key `k`: " (the parts that are known), for the message.
        location: String,
        message: String,
    },
    /// A key whose value is not one of those accepted.
    #[error("{}: key `{key}`: unknown value {value:?} (expected one of: {expected})", path.display())]
    BadValue {
        path: PathBuf,
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    /// Hyper-parameters that do not fit together (checked by [`ModelConfig::validate`]).
    #[error(transparent)]
    Arch(#[from] ArchError),
    /// The host buffer for the largest tensor cannot be allocated.
    #[error(
        "random weights for {model}: cannot allocate the {bytes}-byte buffer for the largest tensor ({tensor})"
    )]
    TooLarge {
        model: String,
        tensor: String,
        bytes: u128,
    },
}

/// A model shape as written in a `configs/models/*.toml` file: the fields of [`ModelConfig`].
///
/// `arch` is `llama` or `qwen2`; `rope_style` (`interleaved` or `neox`) defaults to the
/// architecture's GGUF layout ([`Architecture::gguf_rope_style`]); `rope_dim` defaults to
/// `head_dim`; `name` defaults to the file stem. Unknown keys are refused.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    /// Model name (without the "(random weights)" suffix).
    pub name: Option<String>,
    /// Architecture family name.
    pub arch: String,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Model width.
    pub hidden: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// FFN inner width.
    pub ffn_hidden: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RoPE frequency base.
    pub rope_theta: f32,
    /// Rotated dimensions per head.
    pub rope_dim: Option<usize>,
    /// `interleaved` or `neox`.
    pub rope_style: Option<String>,
    /// RMS norm epsilon.
    pub rms_eps: f32,
    /// Context length.
    pub context_length: usize,
    /// Whether Q/K/V have biases.
    pub qkv_bias: bool,
    /// Whether the output projection reuses the embedding.
    pub tied_embeddings: bool,
}

impl ModelShape {
    /// Parses the TOML `text` of the shape file `path` (used in errors only).
    pub fn parse(text: &str, path: &Path) -> Result<Self, RandomError> {
        toml::from_str(text).map_err(|e| parse_error(text, path, &e))
    }

    /// The validated configuration of this shape, named "`name` (random weights)".
    pub fn into_config(self, path: &Path) -> Result<ModelConfig, RandomError> {
        let arch = Architecture::from_name(&self.arch).ok_or_else(|| RandomError::BadValue {
            path: path.to_path_buf(),
            key: "arch",
            value: self.arch.clone(),
            expected: Architecture::SUPPORTED,
        })?;
        let rope_style = match self.rope_style.as_deref() {
            None => arch.gguf_rope_style(),
            Some("interleaved") => RopeStyle::Interleaved,
            Some("neox") => RopeStyle::NeoX,
            Some(other) => {
                return Err(RandomError::BadValue {
                    path: path.to_path_buf(),
                    key: "rope_style",
                    value: other.to_string(),
                    expected: "interleaved, neox",
                });
            }
        };
        let name = match self.name {
            Some(n) if !n.trim().is_empty() => n,
            _ => path
                .file_stem()
                .map_or_else(|| "model".to_string(), |s| s.to_string_lossy().into_owned()),
        };
        let cfg = ModelConfig {
            arch,
            n_layers: self.n_layers,
            hidden: self.hidden,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            ffn_hidden: self.ffn_hidden,
            vocab_size: self.vocab_size,
            rope_theta: self.rope_theta,
            rope_dim: self.rope_dim.unwrap_or(self.head_dim),
            rope_style,
            rms_eps: self.rms_eps,
            context_length: self.context_length,
            qkv_bias: self.qkv_bias,
            tied_embeddings: self.tied_embeddings,
            name: format!("{name} (random weights)"),
        };
        cfg.validate(&path.display().to_string())?;
        Ok(cfg)
    }
}

/// Reads the model shape file `path` (TOML, see [`ModelShape`]) into a validated
/// [`ModelConfig`] whose name says the weights are random ("llama-3-8b (random weights)").
pub fn load_shape(path: &Path) -> Result<ModelConfig, RandomError> {
    let text = std::fs::read_to_string(path).map_err(|source| RandomError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    ModelShape::parse(&text, path)?.into_config(path)
}

/// Turns a TOML error into one naming the file, the line and the key where they can be told.
fn parse_error(text: &str, path: &Path, e: &toml::de::Error) -> RandomError {
    let message = e.message().trim().to_string();
    let mut line_no = None;
    // A missing key has no line of its own (its span is the whole table).
    let mut key = backticked_after(&message, "missing field `");
    if key.is_none()
        && let Some(start) = e.span().map(|s| s.start)
        && let Some(before) = text.get(..start)
    {
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        line_no = Some(before.matches('\n').count() + 1);
        let line = text
            .get(line_start..)
            .and_then(|rest| rest.lines().next())
            .unwrap_or("");
        key = key_of_line(line);
    }
    let mut location = String::new();
    if let Some(n) = line_no {
        location.push_str(&format!("line {n}, "));
    }
    if let Some(k) = &key {
        location.push_str(&format!("key `{k}`, "));
    }
    if location.ends_with(", ") {
        location.truncate(location.len() - 2);
        location.push_str(": ");
    }
    RandomError::Parse {
        path: path.to_path_buf(),
        key,
        location,
        message,
    }
}

/// The text between `prefix` and the next backtick in `message`.
fn backticked_after(message: &str, prefix: &str) -> Option<String> {
    let rest = &message[message.find(prefix)? + prefix.len()..];
    Some(rest[..rest.find('`')?].to_string())
}

/// The key of a TOML line `key = value` (or the table of a `[table]` line).
fn key_of_line(line: &str) -> Option<String> {
    let line = line.trim();
    let key = if let Some(table) = line.strip_prefix('[') {
        table.trim_end_matches(']').trim()
    } else {
        line.split_once('=')?.0.trim()
    };
    let key = key.trim_matches(|c| c == '"' || c == '\'');
    (!key.is_empty()).then(|| key.to_string())
}

/// Alignment of every matrix in the shared buffer, in bytes.
const ALIGN: usize = 64;
/// Minimum bytes past the largest tensor, so that tensors of the largest size start at different
/// offsets.
const MIN_SLACK: usize = 1 << 20;
/// Fractional part of the golden ratio, the SplitMix64 stream increment.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// What serves one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// BF16 bytes at this offset of the random buffer.
    Random { offset: usize },
    /// F32 ones (norm weights).
    Ones,
    /// F32 zeros (biases).
    Zeros,
}

/// One tensor's shape and where its bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    rows: usize,
    cols: usize,
    placement: Placement,
}

/// Where every tensor of a shape lives, before any allocation.
#[derive(Debug)]
struct Layout {
    /// Bytes of the random buffer (a multiple of 8).
    random_len: usize,
    /// Longest vector, in elements.
    max_vector: usize,
    /// The largest matrix and its bytes.
    largest: (String, u128),
    slots: HashMap<String, Slot>,
}

/// The SplitMix64 output function.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable 64-bit hash of a tensor name (FNV-1a, then mixed).
fn name_hash(name: &str, seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h ^ mix64(seed))
}

impl Layout {
    /// Places every tensor of `cfg`: matrices at distinct 64-byte-aligned offsets derived from
    /// their name hash (probing forward on a clash), vectors on the ones / zeros buffer.
    fn plan(cfg: &ModelConfig, seed: u64) -> Result<Self, RandomError> {
        let tensors = expected_tensors(cfg);
        let too_large = |tensor: &str, bytes: u128| RandomError::TooLarge {
            model: cfg.name.clone(),
            tensor: tensor.to_string(),
            bytes,
        };
        let bf16_bytes = |rows: usize, cols: usize| -> u128 { rows as u128 * cols as u128 * 2 };
        let mut largest = (String::new(), 0u128);
        let mut n_matrices = 0usize;
        let mut max_vector = 0usize;
        for t in &tensors {
            if t.is_vector {
                max_vector = max_vector.max(t.cols);
            } else {
                n_matrices += 1;
                let b = bf16_bytes(t.rows, t.cols);
                if b > largest.1 {
                    largest = (t.name.clone(), b);
                }
            }
        }
        // Enough slack that even tensors of the largest size find a free start of their own.
        let slack = MIN_SLACK.max(2 * ALIGN * n_matrices) as u128;
        let random_len = usize::try_from(largest.1 + slack)
            .ok()
            .filter(|&n| n < isize::MAX as usize / 2)
            .ok_or_else(|| too_large(&largest.0, largest.1 + slack))?;
        let mut used = HashSet::with_capacity(n_matrices);
        let mut slots = HashMap::with_capacity(tensors.len());
        for t in tensors {
            let placement = if t.is_vector {
                if t.name.ends_with(".bias") {
                    Placement::Zeros
                } else {
                    Placement::Ones
                }
            } else {
                // Fits: the buffer is at least `largest + slack` bytes.
                let bytes = bf16_bytes(t.rows, t.cols) as usize;
                let positions = (random_len - bytes) / ALIGN + 1;
                let mut start = (name_hash(&t.name, seed) % positions as u64) as usize;
                // At most `n_matrices - 1` starts are taken and every tensor has more than
                // `2 * n_matrices` to choose from, so this ends.
                while !used.insert(start) {
                    start = (start + 1) % positions;
                }
                Placement::Random {
                    offset: start * ALIGN,
                }
            };
            slots.insert(
                t.name,
                Slot {
                    rows: t.rows,
                    cols: t.cols,
                    placement,
                },
            );
        }
        Ok(Self {
            random_len,
            max_vector,
            largest,
            slots,
        })
    }
}

/// Bytes allocated as 8-byte words whose start is 64-byte aligned where the allocator allows.
#[derive(Debug)]
struct AlignedBytes {
    words: Vec<[u8; 8]>,
    /// Words skipped at the front for alignment.
    skew: usize,
    /// Usable bytes.
    len: usize,
}

impl AlignedBytes {
    /// `len` bytes (rounded up to whole words); word `i` of the usable part is `fill(i)`,
    /// computed in parallel. `None` if the memory cannot be had.
    fn new(len: usize, fill: impl Fn(u64) -> [u8; 8] + Sync + Send) -> Option<Self> {
        let n_words = len.div_ceil(8);
        let spare = ALIGN / 8;
        let mut words: Vec<[u8; 8]> = Vec::new();
        words.try_reserve_exact(n_words.checked_add(spare)?).ok()?;
        let addr = words.as_ptr() as usize;
        let skew = if addr.is_multiple_of(8) {
            (ALIGN - addr % ALIGN) % ALIGN / 8
        } else {
            0
        };
        words.extend(std::iter::repeat_n([0u8; 8], skew));
        // Indexed parallel extend writes straight into the reserved memory.
        words.par_extend((0..n_words as u64).into_par_iter().map(fill));
        Some(Self { words, skew, len })
    }

    fn bytes(&self) -> &[u8] {
        let all = self.words.as_flattened();
        all.get(self.skew * 8..self.skew * 8 + self.len)
            .unwrap_or_default()
    }
}

/// The BF16 bits of `i as i16 * step` for every 16-bit `i`, rounded to nearest even.
fn bf16_table(step: f32) -> Box<[u16; 65536]> {
    let mut table = Box::new([0u16; 65536]);
    for (i, t) in table.iter_mut().enumerate() {
        let v = f32::from(i as u16 as i16) * step;
        // `v` is finite and far from overflow, so rounding the bits directly is correct.
        let bits = v.to_bits();
        *t = ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    }
    table
}

/// Eight bytes of random BF16 values (four values, little-endian), uniform over the 65536
/// entries of `table` (see [`bf16_table`]): word `index` of the stream `key`.
#[inline]
fn random_bf16_word(key: u64, index: u64, table: &[u16; 65536]) -> [u8; 8] {
    let r = mix64(key.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN)));
    let lane = |shift: u32| u64::from(table[((r >> shift) & 0xffff) as usize]) << shift;
    (lane(0) | lane(16) | lane(32) | lane(48)).to_le_bytes()
}

/// Random weights of a [`ModelConfig`]'s shape, served as a [`WeightSource`] (see the module
/// documentation). Deterministic: the same configuration and seed give the same bytes.
#[derive(Debug)]
pub struct RandomWeights {
    cfg: ModelConfig,
    seed: u64,
    bound: f32,
    random: AlignedBytes,
    /// F32 ones, then F32 zeros, each `max_vector` long.
    vectors: AlignedBytes,
    slots: HashMap<String, Slot>,
}

impl RandomWeights {
    /// Builds the weights of `cfg` (validated first) from `seed`. Allocates one buffer of about
    /// the size of the largest matrix, filled in parallel.
    pub fn new(cfg: &ModelConfig, seed: u64) -> Result<Self, RandomError> {
        cfg.validate(&format!("{} (random weights, seed {seed})", cfg.name))?;
        let layout = Layout::plan(cfg, seed)?;
        let too_large = |bytes: u128| RandomError::TooLarge {
            model: cfg.name.clone(),
            tensor: layout.largest.0.clone(),
            bytes,
        };
        let bound = (3.0 / cfg.hidden as f64).sqrt() as f32;
        let step = bound / 32768.0;
        let key = mix64(seed ^ 0x7261_6e64_6f6d_5f77); // "random_w"
        let table = bf16_table(step);
        let random = AlignedBytes::new(layout.random_len, |i| random_bf16_word(key, i, &table))
            .ok_or_else(|| too_large(layout.random_len as u128))?;
        // Ones then zeros; the ones part is a whole number of words.
        let ones_words = (layout.max_vector * 4).div_ceil(8) as u64;
        let one = 1.0f32.to_le_bytes();
        let ones_word = [
            one[0], one[1], one[2], one[3], one[0], one[1], one[2], one[3],
        ];
        let vectors = AlignedBytes::new((ones_words as usize) * 16, |i| {
            if i < ones_words { ones_word } else { [0u8; 8] }
        })
        .ok_or_else(|| too_large(ones_words as u128 * 16))?;
        Ok(Self {
            cfg: cfg.clone(),
            seed,
            bound,
            random,
            vectors,
            slots: layout.slots,
        })
    }

    /// The configuration the weights were made for.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The largest magnitude of any matrix element, `sqrt(3 / hidden)` (up to BF16 rounding).
    pub fn bound(&self) -> f32 {
        self.bound
    }

    /// The shared buffer of random BF16 values every matrix is a view of. A backend may upload it
    /// once and point every matrix into it at [`matrix_offset`](Self::matrix_offset).
    pub fn matrix_buffer(&self) -> &[u8] {
        self.random.bytes()
    }

    /// Where matrix `name` starts in [`matrix_buffer`](Self::matrix_buffer) (a multiple of 64
    /// bytes); `None` for vectors and unknown names.
    pub fn matrix_offset(&self, name: &str) -> Option<usize> {
        match self.slots.get(name)?.placement {
            Placement::Random { offset } => Some(offset),
            Placement::Ones | Placement::Zeros => None,
        }
    }

    /// Host bytes held by the weights (the shared buffer and the vector buffer).
    pub fn host_bytes(&self) -> usize {
        self.random.words.capacity() * 8 + self.vectors.words.capacity() * 8
    }

    fn missing(&self, name: &str) -> ArchError {
        ArchError::MissingTensor {
            model: self.source_name(),
            name: name.to_string(),
        }
    }
}

impl WeightSource for RandomWeights {
    /// Matrices as BF16 views of the shared random buffer; norm weights as F32 ones; biases as
    /// F32 zeros.
    fn weight(&self, name: &str) -> Result<WeightView<'_>, ArchError> {
        let (key, slot) = self
            .slots
            .get_key_value(name)
            .ok_or_else(|| self.missing(name))?;
        let (dtype, start, elem) = match slot.placement {
            Placement::Random { offset } => (TensorType::BF16, offset, 2),
            Placement::Ones => (TensorType::F32, 0, 4),
            Placement::Zeros => (TensorType::F32, self.vectors.len / 2, 4),
        };
        let buf = match slot.placement {
            Placement::Random { .. } => self.random.bytes(),
            Placement::Ones | Placement::Zeros => self.vectors.bytes(),
        };
        let len = slot
            .rows
            .checked_mul(slot.cols)
            .and_then(|n| n.checked_mul(elem));
        let data = len
            .and_then(|len| buf.get(start..start.checked_add(len)?))
            .ok_or_else(|| self.missing(name))?;
        Ok(WeightView::new(key, dtype, slot.rows, slot.cols, data)?)
    }

    fn has(&self, name: &str) -> bool {
        self.slots.contains_key(name)
    }

    fn source_name(&self) -> String {
        format!("random weights (seed {})", self.seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{OUTPUT, OUTPUT_NORM, TOKEN_EMBD, validate_tensors};

    fn models_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/models")
    }

    /// A small Llama-like shape: 2 layers, hidden 64, 4 / 2 heads of 16, FFN 96, vocab 200.
    fn tiny(qkv_bias: bool, tied_embeddings: bool) -> ModelConfig {
        ModelConfig {
            arch: Architecture::Llama,
            n_layers: 2,
            hidden: 64,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            ffn_hidden: 96,
            vocab_size: 200,
            rope_theta: 1e4,
            rope_dim: 16,
            rope_style: RopeStyle::Interleaved,
            rms_eps: 1e-5,
            context_length: 256,
            qkv_bias,
            tied_embeddings,
            name: "tiny (random weights)".to_string(),
        }
    }

    fn bf16_values(w: &WeightView<'_>) -> Vec<f32> {
        w.data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()
    }

    fn llama3(
        name: &str,
        n_layers: usize,
        hidden: usize,
        n_heads: usize,
        ffn: usize,
    ) -> ModelConfig {
        ModelConfig {
            arch: Architecture::Llama,
            n_layers,
            hidden,
            n_heads,
            n_kv_heads: 8,
            head_dim: 128,
            ffn_hidden: ffn,
            vocab_size: 128256,
            rope_theta: 500000.0,
            rope_dim: 128,
            rope_style: RopeStyle::Interleaved,
            rms_eps: 1e-5,
            context_length: 131072,
            qkv_bias: false,
            tied_embeddings: false,
            name: format!("{name} (random weights)"),
        }
    }

    #[test]
    fn random_shapes_in_configs_load() {
        let c8 = load_shape(&models_dir().join("llama-3-8b.toml")).unwrap();
        assert_eq!(c8, llama3("llama-3-8b", 32, 4096, 32, 14336));
        assert_eq!((c8.q_dim(), c8.kv_dim(), c8.gqa_group()), (4096, 1024, 4));
        let c70 = load_shape(&models_dir().join("llama-3-70b.toml")).unwrap();
        assert_eq!(c70, llama3("llama-3-70b", 80, 8192, 64, 28672));

        // The 70B layout (planned, not allocated): one buffer of about the embedding's size.
        let layout = Layout::plan(&c70, 1).unwrap();
        let embd = 128256 * 8192 * 2;
        assert_eq!(layout.largest.1, embd as u128);
        assert!(layout.random_len >= embd && layout.random_len <= embd + 2 * MIN_SLACK);
        let offsets: Vec<(usize, usize)> = expected_tensors(&c70)
            .iter()
            .filter_map(|t| match layout.slots[&t.name].placement {
                Placement::Random { offset } => Some((offset, t.rows * t.cols * 2)),
                _ => None,
            })
            .collect();
        assert_eq!(offsets.len(), 1 + 80 * 7 + 1);
        let distinct: HashSet<usize> = offsets.iter().map(|o| o.0).collect();
        assert_eq!(distinct.len(), offsets.len());
        assert!(
            offsets
                .iter()
                .all(|&(o, len)| o % ALIGN == 0 && o + len <= layout.random_len)
        );
    }

    #[test]
    fn random_weights_validate_for_tiny_shapes() {
        for (bias, tied) in [(false, false), (true, true)] {
            let cfg = tiny(bias, tied);
            let w = RandomWeights::new(&cfg, 3).unwrap();
            validate_tensors(&cfg, &w).unwrap();
            assert_eq!(w.source_name(), "random weights (seed 3)");
            assert_eq!(w.has(OUTPUT), !tied);
            assert_eq!(w.has("blk.1.attn_k.bias"), bias);

            let q = w.weight("blk.0.attn_q.weight").unwrap();
            assert_eq!((q.rows, q.cols, q.dtype), (64, 64, TensorType::BF16));
            assert_eq!(q.data.as_ptr() as usize % ALIGN, 0);
            let norm = w.weight(OUTPUT_NORM).unwrap();
            assert_eq!((norm.rows, norm.cols, norm.dtype), (1, 64, TensorType::F32));
            assert!(
                norm.data
                    .chunks_exact(4)
                    .all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) == 1.0)
            );
            if bias {
                let b = w.weight("blk.1.attn_k.bias").unwrap();
                assert_eq!((b.rows, b.cols, b.dtype), (1, 32, TensorType::F32));
                assert!(b.data.iter().all(|&x| x == 0));
            }
            let e = w.weight("blk.2.attn_q.weight").unwrap_err();
            assert!(
                matches!(&e, ArchError::MissingTensor { name, .. } if name == "blk.2.attn_q.weight")
            );
            // Only about the largest tensor (the 200 x 64 embedding) plus slack is allocated.
            assert!(
                w.host_bytes() <= 200 * 64 * 2 + MIN_SLACK + 4096,
                "{}",
                w.host_bytes()
            );
        }
    }

    #[test]
    fn random_tensors_differ_and_seed_fixes_bytes() {
        let cfg = tiny(false, false);
        let a = RandomWeights::new(&cfg, 7).unwrap();
        let b = RandomWeights::new(&cfg, 7).unwrap();
        let c = RandomWeights::new(&cfg, 8).unwrap();
        let names: Vec<String> = expected_tensors(&cfg)
            .into_iter()
            .filter(|t| !t.is_vector)
            .map(|t| t.name)
            .collect();
        for n in &names {
            assert_eq!(a.weight(n).unwrap().data, b.weight(n).unwrap().data, "{n}");
            assert_ne!(a.weight(n).unwrap().data, c.weight(n).unwrap().data, "{n}");
        }
        assert_eq!(a.matrix_buffer(), b.matrix_buffer());
        // Tensors of the same shape hold different values (their first 32 bytes, even).
        let same_shape = [
            "blk.0.ffn_gate.weight",
            "blk.0.ffn_up.weight",
            "blk.1.ffn_gate.weight",
            "blk.1.ffn_up.weight",
        ];
        for (i, x) in same_shape.iter().enumerate() {
            for y in &same_shape[i + 1..] {
                let (wx, wy) = (a.weight(x).unwrap(), a.weight(y).unwrap());
                assert_ne!(wx.data[..32], wy.data[..32], "{x} vs {y}");
            }
        }
        assert_ne!(
            a.weight(TOKEN_EMBD).unwrap().data,
            a.weight(OUTPUT).unwrap().data
        );
        let offsets: HashSet<usize> = names.iter().filter_map(|n| a.matrix_offset(n)).collect();
        assert_eq!(offsets.len(), names.len());
    }

    #[test]
    fn random_values_are_scaled_to_keep_activations_unit() {
        let mut cfg = tiny(false, false);
        cfg.hidden = 256;
        cfg.n_heads = 16;
        cfg.n_kv_heads = 4;
        let w = RandomWeights::new(&cfg, 11).unwrap();
        let bound = (3.0f32 / 256.0).sqrt();
        assert!((w.bound() - bound).abs() < 1e-6);
        let q = w.weight("blk.1.attn_q.weight").unwrap();
        let vals = bf16_values(&q);
        assert!(
            vals.iter()
                .all(|v| v.is_finite() && v.abs() <= bound * 1.01)
        );
        let n = vals.len() as f32;
        let mean = vals.iter().sum::<f32>() / n;
        let std = (vals.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n).sqrt();
        assert!(mean.abs() < 0.05 / 16.0, "mean {mean}");
        assert!((std * 16.0 - 1.0).abs() < 0.05, "std {std} vs 1/16");
        // A unit-RMS input (what RMSNorm hands the projection) gives about unit-RMS outputs.
        let x: Vec<f32> = (0..256)
            .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let y: Vec<f32> = vals
            .chunks_exact(256)
            .map(|row| row.iter().zip(&x).map(|(a, b)| a * b).sum())
            .collect();
        let rms = (y.iter().map(|v| v * v).sum::<f32>() / y.len() as f32).sqrt();
        assert!((0.8..1.25).contains(&rms), "output rms {rms}");
    }

    #[test]
    fn random_shape_errors_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let good = std::fs::read_to_string(models_dir().join("llama-3-8b.toml")).unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };

        let p = write("extra.toml", &format!("{good}n_experts = 8\n"));
        let e = load_shape(&p).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(&e, RandomError::Parse { key: Some(k), .. } if k == "n_experts"),
            "{msg}"
        );
        assert!(
            msg.contains("extra.toml") && msg.contains("n_experts"),
            "{msg}"
        );

        let p = write(
            "badval.toml",
            &good.replace("hidden = 4096", "hidden = \"big\""),
        );
        let e = load_shape(&p).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(&e, RandomError::Parse { key: Some(k), .. } if k == "hidden"),
            "{msg}"
        );
        assert!(
            msg.contains("badval.toml") && msg.contains("line 9"),
            "{msg}"
        );

        let p = write("neg.toml", &good.replace("n_layers = 32", "n_layers = -1"));
        let e = load_shape(&p).unwrap_err();
        assert!(
            matches!(&e, RandomError::Parse { key: Some(k), .. } if k == "n_layers"),
            "{e}"
        );

        let p = write("missing.toml", &good.replace("ffn_hidden = 14336\n", ""));
        let e = load_shape(&p).unwrap_err();
        assert!(
            matches!(&e, RandomError::Parse { key: Some(k), .. } if k == "ffn_hidden"),
            "{e}"
        );
        assert!(e.to_string().contains("missing.toml"), "{e}");

        let p = write(
            "syntax.toml",
            &good.replace("head_dim = 128", "head_dim 128"),
        );
        let e = load_shape(&p).unwrap_err();
        assert!(
            matches!(&e, RandomError::Parse { .. })
                && e.to_string().contains("syntax.toml: line 12"),
            "{e}"
        );

        let p = write(
            "gqa.toml",
            &good.replace("n_kv_heads = 8", "n_kv_heads = 5"),
        );
        let e = load_shape(&p).unwrap_err();
        assert!(
            matches!(&e, RandomError::Arch(ArchError::InvalidConfig { key, .. }) if key == "n_kv_heads"),
            "{e}"
        );
        assert!(e.to_string().contains("gqa.toml"), "{e}");

        let p = write(
            "arch.toml",
            &good.replace("arch = \"llama\"", "arch = \"mamba\""),
        );
        let e = load_shape(&p).unwrap_err();
        assert!(
            matches!(&e, RandomError::BadValue { key: "arch", .. }),
            "{e}"
        );
        assert!(e.to_string().contains("arch.toml") && e.to_string().contains("mamba"));

        let e = load_shape(&dir.path().join("absent.toml")).unwrap_err();
        assert!(matches!(e, RandomError::Read { .. }));
        assert!(e.to_string().contains("absent.toml"), "{e}");
    }

    /// Times the Llama-3-70B build (2.1 GB); run with `--ignored` on a machine with the memory.
    #[test]
    #[ignore = "allocates 2.1 GB; run by hand to time the 70B build"]
    fn random_weights_llama_3_70b_build_time() {
        let cfg = load_shape(&models_dir().join("llama-3-70b.toml")).unwrap();
        let t = std::time::Instant::now();
        let w = RandomWeights::new(&cfg, 0).unwrap();
        let took = t.elapsed();
        validate_tensors(&cfg, &w).unwrap();
        eprintln!("70B random weights: {} bytes in {took:?}", w.host_bytes());
        assert!(took.as_secs_f32() < 5.0, "{took:?}");
        assert!(w.host_bytes() < 128256 * 8192 * 2 + 4 * MIN_SLACK);
    }
}
