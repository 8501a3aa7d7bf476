//! Hugging Face model folders: `config.json` plus one or more `*.safetensors` files (and a
//! `tokenizer.json`, read by [`crate::tokenizer`], not here).
//!
//! [`HfModel::open`] reads the configuration (`model_type` `llama` or `qwen2`), memory-maps every
//! safetensors file, maps Hugging Face tensor names onto GGUF names (`model.layers.0.self_attn.
//! q_proj.weight` becomes `blk.0.attn_q.weight`, see [`hf_to_gguf_name`]) so the rest of the
//! system sees one naming, and validates every tensor's dtype (F32, F16, BF16), shape and data
//! range. Hugging Face checkpoints keep Q/K rows in their natural order, so they use
//! [`RopeStyle::NeoX`] for both architectures.
//!
//! [`export_hf_folder`] writes a GGUF model out as such a folder (weights dequantized, GGUF
//! llama's Q/K row permutation undone), which tests use to exercise this loader on real weights.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use retrowave_core::{TensorType, WeightView};
use serde_json::{Value, json};

use crate::arch::{
    ArchError, Architecture, ModelConfig, OUTPUT, OUTPUT_NORM, RopeStyle, TOKEN_EMBD, WeightSource,
    expected_tensors, validate_tensors,
};
use crate::gguf::{GgufFile, dequantize_row};

/// Errors reading or writing a Hugging Face model folder.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    /// A file could not be read, written or mapped.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A configuration key that is missing or has an unusable value.
    #[error("{}: key {key:?}: {reason}", path.display())]
    ConfigKey {
        path: PathBuf,
        key: String,
        reason: String,
    },
    /// A feature of the checkpoint that retrowave does not implement.
    #[error("{}: unsupported: {what}", path.display())]
    Unsupported { path: PathBuf, what: String },
    /// No `*.safetensors` file in the folder.
    #[error("{}: no *.safetensors weight files in the folder", dir.display())]
    NoWeights { dir: PathBuf },
    /// A safetensors file that the safetensors reader refuses.
    #[error("{}: invalid safetensors file: {source}", path.display())]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// A tensor of a dtype retrowave cannot load.
    #[error("{}: tensor {tensor} has dtype {dtype}, expected F32, F16 or BF16", path.display())]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    /// A tensor that is not a vector or a matrix.
    #[error("{}: tensor {tensor} has shape {shape:?}, expected a vector or a matrix", path.display())]
    BadShape {
        path: PathBuf,
        tensor: String,
        shape: Vec<usize>,
    },
    /// A tensor whose data range lies outside its file.
    #[error("{}: tensor {tensor} data {start}..{end} lies outside the file of {len} bytes", path.display())]
    OutOfBounds {
        path: PathBuf,
        tensor: String,
        start: usize,
        end: usize,
        len: usize,
    },
    /// The same tensor in two files (or two names mapping to one).
    #[error("tensor {tensor} appears in both {} and {}", first.display(), second.display())]
    DuplicateTensor {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },
    /// A GGUF tensor the exporter has no Hugging Face name for.
    #[error("cannot export tensor {tensor}: {reason}")]
    Export { tensor: String, reason: String },
}

/// Maps a Hugging Face tensor name to the GGUF name; `None` for names retrowave does not use.
pub fn hf_to_gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some(TOKEN_EMBD.to_string()),
        "model.norm.weight" => return Some(OUTPUT_NORM.to_string()),
        "lm_head.weight" => return Some(OUTPUT.to_string()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if layer.to_string() != layer_str(rest) {
        return None; // reject "01", "+1"
    }
    let (module, kind) = suffix.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let g = LAYER_NAMES.iter().find(|(h, _)| *h == module)?.1;
    let with_bias = matches!(g, "attn_q" | "attn_k" | "attn_v");
    if kind == "bias" && !with_bias {
        return None;
    }
    Some(format!("blk.{layer}.{g}.{kind}"))
}

fn layer_str(rest: &str) -> &str {
    rest.split('.').next().unwrap_or("")
}

/// Maps a GGUF tensor name to the Hugging Face name; `None` for names without one.
pub fn gguf_to_hf_name(gguf: &str) -> Option<String> {
    match gguf {
        TOKEN_EMBD => return Some("model.embed_tokens.weight".to_string()),
        OUTPUT_NORM => return Some("model.norm.weight".to_string()),
        OUTPUT => return Some("lm_head.weight".to_string()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if layer.to_string() != layer_str(rest) {
        return None;
    }
    let (module, kind) = suffix.rsplit_once('.')?;
    let h = LAYER_NAMES.iter().find(|(_, g)| *g == module)?.0;
    let name = format!("model.layers.{layer}.{h}.{kind}");
    // Round-trip to reject kinds the forward mapping refuses.
    (hf_to_gguf_name(&name).as_deref() == Some(gguf)).then_some(name)
}

/// (Hugging Face module, GGUF module) of one layer.
const LAYER_NAMES: [(&str, &str); 9] = [
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

struct Shard {
    path: PathBuf,
    mmap: memmap2::Mmap,
}

#[derive(Debug, Clone)]
struct HfTensor {
    hf_name: String,
    shard: usize,
    dtype: TensorType,
    rows: usize,
    cols: usize,
    start: usize,
    end: usize,
}

/// A Hugging Face model folder, memory-mapped and validated.
pub struct HfModel {
    dir: PathBuf,
    config: ModelConfig,
    raw_config: Value,
    shards: Vec<Shard>,
    /// Keyed by GGUF name.
    tensors: HashMap<String, HfTensor>,
}

impl fmt::Debug for HfModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HfModel")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .field(
                "shards",
                &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl HfModel {
    /// Opens and validates a folder (see the module documentation).
    pub fn open(dir: &Path) -> Result<Self, ArchError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| HfError::Io {
            path: config_path.clone(),
            source,
        })?;
        let raw_config: Value = serde_json::from_str(&text).map_err(|source| HfError::Json {
            path: config_path.clone(),
            source,
        })?;

        let shards = map_shards(dir)?;
        let mut tensors: HashMap<String, HfTensor> = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for t in shard_tensors(i, shard)? {
                let Some(gguf_name) = hf_to_gguf_name(&t.hf_name) else {
                    tracing::debug!(tensor = %t.hf_name, file = %shard.path.display(), "ignoring tensor retrowave does not use");
                    continue;
                };
                if let Some(prev) = tensors.get(&gguf_name) {
                    return Err(HfError::DuplicateTensor {
                        tensor: t.hf_name,
                        first: shards
                            .get(prev.shard)
                            .map(|s| s.path.clone())
                            .unwrap_or_default(),
                        second: shard.path.clone(),
                    }
                    .into());
                }
                tensors.insert(gguf_name, t);
            }
        }

        let config = parse_config(&config_path, &raw_config, dir, &tensors)?;
        let model = Self {
            dir: dir.to_path_buf(),
            config,
            raw_config,
            shards,
            tensors,
        };
        validate_tensors(&model.config, &model).map_err(|e| with_hf_names(e, &model.tensors))?;
        Ok(model)
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The model's hyper-parameters (RoPE style NeoX).
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The parsed `config.json`.
    pub fn raw_config(&self) -> &Value {
        &self.raw_config
    }

    /// GGUF names of the tensors retrowave uses, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The Hugging Face name of a tensor given by GGUF name.
    pub fn hf_name(&self, gguf_name: &str) -> Option<&str> {
        self.tensors.get(gguf_name).map(|t| t.hf_name.as_str())
    }
}

impl WeightSource for HfModel {
    fn weight(&self, name: &str) -> Result<WeightView<'_>, ArchError> {
        let (key, t) =
            self.tensors
                .get_key_value(name)
                .ok_or_else(|| ArchError::MissingTensor {
                    model: self.source_name(),
                    name: name.to_string(),
                })?;
        let shard = self.shards.get(t.shard);
        let data = shard.and_then(|s| s.mmap.get(t.start..t.end));
        let Some(data) = data else {
            // Ranges were checked at open; this is unreachable for a model built by `open`.
            return Err(HfError::OutOfBounds {
                path: shard.map(|s| s.path.clone()).unwrap_or_default(),
                tensor: t.hf_name.clone(),
                start: t.start,
                end: t.end,
                len: shard.map_or(0, |s| s.mmap.len()),
            }
            .into());
        };
        Ok(WeightView::new(key, t.dtype, t.rows, t.cols, data)?)
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn source_name(&self) -> String {
        self.dir.display().to_string()
    }
}

/// Adds the Hugging Face name to tensor errors, which speak GGUF names.
fn with_hf_names(e: ArchError, tensors: &HashMap<String, HfTensor>) -> ArchError {
    let rename = |name: String| -> String {
        let hf = tensors
            .get(&name)
            .map(|t| t.hf_name.clone())
            .or_else(|| gguf_to_hf_name(&name));
        match hf {
            Some(hf) => format!("{hf} ({name})"),
            None => name,
        }
    };
    match e {
        ArchError::MissingTensor { model, name } => ArchError::MissingTensor {
            model,
            name: rename(name),
        },
        ArchError::TensorShape {
            model,
            name,
            expected,
            found,
        } => ArchError::TensorShape {
            model,
            name: rename(name),
            expected,
            found,
        },
        ArchError::TensorType {
            model,
            name,
            dtype,
            expected,
        } => ArchError::TensorType {
            model,
            name: rename(name),
            dtype,
            expected,
        },
        other => other,
    }
}

fn map_shards(dir: &Path) -> Result<Vec<Shard>, ArchError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| HfError::Io { path, source }
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    if paths.is_empty() {
        return Err(HfError::NoWeights {
            dir: dir.to_path_buf(),
        }
        .into());
    }
    paths.sort();
    let mut shards = Vec::with_capacity(paths.len());
    for path in paths {
        let file = File::open(&path).map_err(io(&path))?;
        // SAFETY: read-only private map; concurrent truncation of the file by another process
        // is outside what any mmap-based loader can guard against.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io(&path))?;
        shards.push(Shard { path, mmap });
    }
    Ok(shards)
}

/// Reads and checks one file's header: dtypes, ranks and data ranges.
fn shard_tensors(index: usize, shard: &Shard) -> Result<Vec<HfTensor>, ArchError> {
    let (header_len, metadata) =
        safetensors::SafeTensors::read_metadata(&shard.mmap).map_err(|source| {
            HfError::Safetensors {
                path: shard.path.clone(),
                source,
            }
        })?;
    let data_start = 8usize.saturating_add(header_len);
    let mut out = Vec::new();
    for (name, info) in metadata.tensors() {
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => TensorType::F32,
            safetensors::Dtype::F16 => TensorType::F16,
            safetensors::Dtype::BF16 => TensorType::BF16,
            other => {
                if hf_to_gguf_name(&name).is_none() {
                    continue; // an unused tensor may have any dtype
                }
                return Err(HfError::UnsupportedDtype {
                    path: shard.path.clone(),
                    tensor: name,
                    dtype: format!("{other:?}"),
                }
                .into());
            }
        };
        let (rows, cols) = match info.shape.as_slice() {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            shape => {
                if hf_to_gguf_name(&name).is_none() {
                    continue;
                }
                return Err(HfError::BadShape {
                    path: shard.path.clone(),
                    tensor: name,
                    shape: shape.to_vec(),
                }
                .into());
            }
        };
        let (s, e) = info.data_offsets;
        let start = data_start.checked_add(s);
        let end = data_start.checked_add(e);
        match (start, end) {
            (Some(start), Some(end)) if start <= end && end <= shard.mmap.len() => {
                out.push(HfTensor {
                    hf_name: name,
                    shard: index,
                    dtype,
                    rows,
                    cols,
                    start,
                    end,
                })
            }
            _ => {
                return Err(HfError::OutOfBounds {
                    path: shard.path.clone(),
                    tensor: name,
                    start: start.unwrap_or(usize::MAX),
                    end: end.unwrap_or(usize::MAX),
                    len: shard.mmap.len(),
                }
                .into());
            }
        }
    }
    Ok(out)
}

fn parse_config(
    path: &Path,
    raw: &Value,
    dir: &Path,
    tensors: &HashMap<String, HfTensor>,
) -> Result<ModelConfig, ArchError> {
    let key_err = |key: &str, reason: String| HfError::ConfigKey {
        path: path.to_path_buf(),
        key: key.to_string(),
        reason,
    };
    let obj = raw
        .as_object()
        .ok_or_else(|| key_err("(top level)", "config.json must hold a JSON object".into()))?;
    let present = |key: &str| obj.get(key).filter(|v| !v.is_null());
    let usize_key = |key: &str, default: Option<usize>| -> Result<usize, HfError> {
        match present(key) {
            None => default.ok_or_else(|| key_err(key, "is missing".into())),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| key_err(key, format!("expected a non-negative integer, found {v}"))),
        }
    };
    let f32_key = |key: &str, default: f32| -> Result<f32, HfError> {
        match present(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .map(|x| x as f32)
                .ok_or_else(|| key_err(key, format!("expected a number, found {v}"))),
        }
    };

    let model_type = present("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| key_err("model_type", "is missing or not a string".into()))?;
    let arch = Architecture::from_name(model_type).ok_or_else(|| ArchError::Unsupported {
        model: path.display().to_string(),
        arch: model_type.to_string(),
        supported: Architecture::SUPPORTED,
    })?;
    if let Some(scaling) = present("rope_scaling") {
        return Err(HfError::Unsupported {
            path: path.to_path_buf(),
            what: format!("rope_scaling {scaling} (only plain RoPE is implemented)"),
        }
        .into());
    }
    if let Some(act) = present("hidden_act")
        && act.as_str() != Some("silu")
    {
        return Err(HfError::Unsupported {
            path: path.to_path_buf(),
            what: format!("hidden_act {act} (only silu is implemented)"),
        }
        .into());
    }
    let tie = match present("tie_word_embeddings") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| {
            key_err(
                "tie_word_embeddings",
                format!("expected true or false, found {v}"),
            )
        })?,
    };

    let hidden = usize_key("hidden_size", None)?;
    let n_heads = usize_key("num_attention_heads", None)?;
    let head_dim = usize_key("head_dim", Some(hidden / n_heads.max(1)))?;
    let name = match present("_name_or_path").and_then(Value::as_str) {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => dir.file_name().map_or_else(
            || arch.name().to_string(),
            |s| s.to_string_lossy().into_owned(),
        ),
    };
    let cfg = ModelConfig {
        arch,
        n_layers: usize_key("num_hidden_layers", None)?,
        hidden,
        n_heads,
        n_kv_heads: usize_key("num_key_value_heads", Some(n_heads))?,
        head_dim,
        ffn_hidden: usize_key("intermediate_size", None)?,
        vocab_size: usize_key("vocab_size", None)?,
        rope_theta: f32_key("rope_theta", 10000.0)?,
        rope_dim: head_dim,
        rope_style: RopeStyle::NeoX,
        rms_eps: f32_key("rms_norm_eps", 1e-6)?,
        context_length: usize_key("max_position_embeddings", Some(2048))?,
        qkv_bias: tensors.contains_key("blk.0.attn_q.bias"),
        // A checkpoint that ties but still stores lm_head uses the stored copy (same values).
        tied_embeddings: tie && !tensors.contains_key(OUTPUT),
        name,
    };
    cfg.validate(&path.display().to_string())?;
    Ok(cfg)
}

// ---------------------------------------------------------------------------------------------
// Export
// ---------------------------------------------------------------------------------------------

/// Element type of exported matrices (vectors are always written as F32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    /// 32-bit floats.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

impl ExportDtype {
    fn safetensors_name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "F32",
            ExportDtype::F16 => "F16",
            ExportDtype::BF16 => "BF16",
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "float32",
            ExportDtype::F16 => "float16",
            ExportDtype::BF16 => "bfloat16",
        }
    }

    fn size(self) -> usize {
        match self {
            ExportDtype::F32 => 4,
            ExportDtype::F16 | ExportDtype::BF16 => 2,
        }
    }

    fn encode(self, xs: &[f32], out: &mut Vec<u8>) {
        out.clear();
        match self {
            ExportDtype::F32 => xs
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            ExportDtype::F16 => xs
                .iter()
                .for_each(|x| out.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes())),
            ExportDtype::BF16 => xs
                .iter()
                .for_each(|x| out.extend_from_slice(&half::bf16::from_f32(*x).to_le_bytes())),
        }
    }
}

/// For GGUF `llama` Q/K weights: the GGUF row that holds Hugging Face row `hf_row`.
///
/// llama.cpp's converter permutes each head's rows with `w.reshape(n_head, 2, head_dim / 2,
/// cols).swapaxes(1, 2)`: Hugging Face row `h*head_dim + i*(head_dim/2) + j` (`i` in 0..2, `j` in
/// 0..head_dim/2) is stored as GGUF row `h*head_dim + 2*j + i`.
pub fn gguf_row_of_hf_row(hf_row: usize, head_dim: usize) -> usize {
    let half = (head_dim / 2).max(1);
    let (h, r) = (hf_row / head_dim.max(1), hf_row % head_dim.max(1));
    let (i, j) = (r / half, r % half);
    h * head_dim + 2 * j + i
}

/// The inverse of [`gguf_row_of_hf_row`]: the Hugging Face row of GGUF row `gguf_row`.
pub fn hf_row_of_gguf_row(gguf_row: usize, head_dim: usize) -> usize {
    let (h, r) = (gguf_row / head_dim.max(1), gguf_row % head_dim.max(1));
    let (j, i) = (r / 2, r % 2);
    h * head_dim + i * (head_dim / 2) + j
}

struct ExportItem<'a> {
    gguf_name: &'a str,
    hf_name: String,
    dtype: ExportDtype,
    shape: Vec<usize>,
    rows: usize,
    cols: usize,
    /// Undo the llama Q/K permutation (rows come in heads of `head_dim`).
    unpermute: bool,
}

/// Writes `g` as a Hugging Face folder in `dir` (created if needed): `config.json`,
/// `model.safetensors` (matrices in `dtype`, vectors in F32), and `tokenizer.json` when
/// `tokenizer_json` is given. GGUF llama Q/K rows (weights and biases) are put back in Hugging
/// Face order, so the folder is a genuine Hugging Face checkpoint. Every GGUF tensor must be one
/// retrowave knows (see [`gguf_to_hf_name`]).
pub fn export_hf_folder(
    g: &GgufFile,
    dir: &Path,
    dtype: ExportDtype,
    tokenizer_json: Option<&str>,
) -> Result<(), ArchError> {
    let cfg = ModelConfig::from_gguf(g)?;
    validate_tensors(&cfg, g)?;
    if cfg.rope_dim != cfg.head_dim {
        return Err(HfError::Export {
            tensor: "(config)".into(),
            reason: format!(
                "partial RoPE (rope_dim {} of head_dim {}) cannot be written as a plain checkpoint",
                cfg.rope_dim, cfg.head_dim
            ),
        }
        .into());
    }
    let permuted = cfg.arch == Architecture::Llama;

    let mut items = Vec::with_capacity(g.tensors().len());
    for t in g.tensors() {
        let hf_name = gguf_to_hf_name(&t.name).ok_or_else(|| HfError::Export {
            tensor: t.name.clone(),
            reason: "no Hugging Face name for it".into(),
        })?;
        let w = g.weight(&t.name)?;
        let is_vector = t.dims.len() == 1;
        let unpermute = permuted
            && [
                "attn_q.weight",
                "attn_k.weight",
                "attn_q.bias",
                "attn_k.bias",
            ]
            .iter()
            .any(|s| t.name.ends_with(s));
        let (shape, rows, cols) = if is_vector {
            (vec![w.cols], w.cols, 1)
        } else {
            (vec![w.rows, w.cols], w.rows, w.cols)
        };
        items.push(ExportItem {
            gguf_name: &t.name,
            hf_name,
            dtype: if is_vector { ExportDtype::F32 } else { dtype },
            shape,
            rows,
            cols,
            unpermute,
        });
    }
    // F32 first keeps every tensor aligned to its element size.
    items.sort_by_key(|it| (it.dtype != ExportDtype::F32, it.hf_name.clone()));
    let known: Vec<String> = expected_tensors(&cfg).into_iter().map(|e| e.name).collect();
    if let Some(extra) = items
        .iter()
        .find(|it| !known.iter().any(|k| k == it.gguf_name))
    {
        return Err(HfError::Export {
            tensor: extra.gguf_name.to_string(),
            reason: "the model configuration does not use it".into(),
        }
        .into());
    }

    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| HfError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;

    // config.json
    let mut config = json!({
        "architectures": [match cfg.arch {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }],
        "model_type": cfg.arch.name(),
        "_name_or_path": cfg.name,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "rope_theta": f64::from(cfg.rope_theta),
        "rope_scaling": null,
        "rms_norm_eps": f64::from(cfg.rms_eps),
        "tie_word_embeddings": cfg.tied_embeddings,
        "hidden_act": "silu",
        "torch_dtype": dtype.torch_name(),
    });
    if let Some(obj) = config.as_object_mut() {
        if cfg.arch == Architecture::Llama {
            obj.insert("attention_bias".into(), json!(cfg.qkv_bias));
        }
        for (gguf_key, hf_key) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ] {
            if let Ok(id) = g.get_u32(gguf_key) {
                obj.insert(hf_key.into(), json!(id));
            }
        }
    }
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config).map_err(|source| HfError::Json {
        path: config_path.clone(),
        source,
    })?;
    std::fs::write(&config_path, text).map_err(io(&config_path))?;

    if let Some(tok) = tokenizer_json {
        let p = dir.join("tokenizer.json");
        std::fs::write(&p, tok).map_err(io(&p))?;
    }

    // model.safetensors: header, then each tensor's rows, streamed.
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for it in &items {
        let n = it.rows * it.cols * it.dtype.size();
        header.insert(
            it.hf_name.clone(),
            json!({"dtype": it.dtype.safetensors_name(), "shape": it.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let st_path = dir.join("model.safetensors");
    let mut header_bytes =
        serde_json::to_vec(&Value::Object(header)).map_err(|source| HfError::Json {
            path: st_path.clone(),
            source,
        })?;
    header_bytes.resize(header_bytes.len().next_multiple_of(8), b' ');
    let mut out = BufWriter::with_capacity(1 << 20, File::create(&st_path).map_err(io(&st_path))?);
    out.write_all(&(header_bytes.len() as u64).to_le_bytes())
        .and_then(|()| out.write_all(&header_bytes))
        .map_err(io(&st_path))?;
    let mut values = Vec::new();
    let mut encoded = Vec::new();
    for it in &items {
        let w = g.weight(it.gguf_name)?;
        values.clear();
        values.resize(w.cols, 0.0);
        if it.shape.len() == 1 {
            // A vector: one stored row of `rows` elements, possibly permuted element-wise.
            dequantize_row(w.dtype, w.data, &mut values).map_err(|e| export_err(it, e))?;
            if it.unpermute {
                let permuted: Vec<f32> = (0..it.rows)
                    .map(|r| {
                        values
                            .get(gguf_row_of_hf_row(r, cfg.head_dim))
                            .copied()
                            .unwrap_or(0.0)
                    })
                    .collect();
                it.dtype.encode(&permuted, &mut encoded);
            } else {
                it.dtype.encode(&values, &mut encoded);
            }
            out.write_all(&encoded).map_err(io(&st_path))?;
            continue;
        }
        for r in 0..it.rows {
            let src = if it.unpermute {
                gguf_row_of_hf_row(r, cfg.head_dim)
            } else {
                r
            };
            let bytes = w.row(src).ok_or_else(|| HfError::Export {
                tensor: it.gguf_name.to_string(),
                reason: format!("row {src} is out of range"),
            })?;
            dequantize_row(w.dtype, bytes, &mut values).map_err(|e| export_err(it, e))?;
            it.dtype.encode(&values, &mut encoded);
            out.write_all(&encoded).map_err(io(&st_path))?;
        }
    }
    out.flush().map_err(io(&st_path))?;
    Ok(())
}

fn export_err(it: &ExportItem<'_>, e: crate::gguf::DequantError) -> HfError {
    HfError::Export {
        tensor: it.gguf_name.to_string(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for (hf, g) in [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
            (
                "model.layers.0.input_layernorm.weight",
                "blk.0.attn_norm.weight",
            ),
            (
                "model.layers.12.self_attn.q_proj.bias",
                "blk.12.attn_q.bias",
            ),
            (
                "model.layers.3.self_attn.o_proj.weight",
                "blk.3.attn_output.weight",
            ),
            (
                "model.layers.29.post_attention_layernorm.weight",
                "blk.29.ffn_norm.weight",
            ),
            (
                "model.layers.1.mlp.down_proj.weight",
                "blk.1.ffn_down.weight",
            ),
        ] {
            assert_eq!(hf_to_gguf_name(hf).as_deref(), Some(g), "{hf}");
            assert_eq!(gguf_to_hf_name(g).as_deref(), Some(hf), "{g}");
        }
        for bad in [
            "model.layers.01.mlp.up_proj.weight",
            "model.layers.x.mlp.up_proj.weight",
            "model.layers.0.mlp.up_proj.bias",
            "model.layers.0.self_attn.rotary_emb.inv_freq",
            "model.layers.0.mlp.up_proj.weight.extra",
        ] {
            assert_eq!(hf_to_gguf_name(bad), None, "{bad}");
        }
        assert_eq!(gguf_to_hf_name("rope_freqs.weight"), None);
        assert_eq!(gguf_to_hf_name("blk.0.ffn_up.bias"), None);
    }

    #[test]
    fn permutation_indices_match_the_converter_reshape() {
        // The converter: w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(...). Build the
        // permuted order of HF rows directly from that description.
        let (n_head, hd) = (3usize, 8usize);
        let mut gguf_rows = Vec::new(); // gguf_rows[k] = HF row stored at GGUF row k
        for h in 0..n_head {
            for j in 0..hd / 2 {
                for i in 0..2 {
                    gguf_rows.push(h * hd + i * (hd / 2) + j);
                }
            }
        }
        for (k, &hf) in gguf_rows.iter().enumerate() {
            assert_eq!(gguf_row_of_hf_row(hf, hd), k);
            assert_eq!(hf_row_of_gguf_row(k, hd), hf);
        }
    }

    fn write_folder(
        dir: &Path,
        config: Value,
        tensors: Vec<(&str, safetensors::Dtype, Vec<usize>)>,
    ) {
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let views: Vec<(String, safetensors::tensor::TensorView<'static>)> = tensors
            .into_iter()
            .map(|(n, dt, shape)| {
                let len = shape.iter().product::<usize>() * dt.bitsize() / 8;
                let data: &'static [u8] = Box::leak(vec![0u8; len].into_boxed_slice());
                (
                    n.to_string(),
                    safetensors::tensor::TensorView::new(dt, shape, data).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    }

    fn tiny_config() -> Value {
        json!({"model_type": "qwen2", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
               "num_key_value_heads": 1, "intermediate_size": 16, "vocab_size": 10,
               "tie_word_embeddings": true, "rope_theta": 1000000.0, "max_position_embeddings": 64})
    }

    fn tiny_tensors(dt: safetensors::Dtype) -> Vec<(&'static str, safetensors::Dtype, Vec<usize>)> {
        use safetensors::Dtype::F32;
        vec![
            ("model.embed_tokens.weight", dt, vec![10, 8]),
            ("model.norm.weight", F32, vec![8]),
            ("model.layers.0.input_layernorm.weight", F32, vec![8]),
            (
                "model.layers.0.post_attention_layernorm.weight",
                F32,
                vec![8],
            ),
            ("model.layers.0.self_attn.q_proj.weight", dt, vec![8, 8]),
            ("model.layers.0.self_attn.k_proj.weight", dt, vec![4, 8]),
            ("model.layers.0.self_attn.v_proj.weight", dt, vec![4, 8]),
            ("model.layers.0.self_attn.q_proj.bias", F32, vec![8]),
            ("model.layers.0.self_attn.k_proj.bias", F32, vec![4]),
            ("model.layers.0.self_attn.v_proj.bias", F32, vec![4]),
            ("model.layers.0.self_attn.o_proj.weight", dt, vec![8, 8]),
            ("model.layers.0.mlp.gate_proj.weight", dt, vec![16, 8]),
            ("model.layers.0.mlp.up_proj.weight", dt, vec![16, 8]),
            ("model.layers.0.mlp.down_proj.weight", dt, vec![8, 16]),
            (
                "model.layers.0.self_attn.rotary_emb.inv_freq",
                safetensors::Dtype::I64,
                vec![2],
            ),
        ]
    }

    #[test]
    fn tiny_folder_opens_and_maps_names() {
        let dir = tempfile::tempdir().unwrap();
        write_folder(
            dir.path(),
            tiny_config(),
            tiny_tensors(safetensors::Dtype::BF16),
        );
        let m = HfModel::open(dir.path()).unwrap();
        let c = m.config();
        assert_eq!(
            (c.arch, c.hidden, c.n_heads, c.n_kv_heads, c.head_dim),
            (Architecture::Qwen2, 8, 2, 1, 4)
        );
        assert!(c.qkv_bias && c.tied_embeddings);
        assert_eq!(c.rope_style, RopeStyle::NeoX);
        assert_eq!(c.rms_eps, 1e-6);
        let w = m.weight("blk.0.ffn_down.weight").unwrap();
        assert_eq!(
            (w.rows, w.cols, w.dtype, w.data.len()),
            (8, 16, TensorType::BF16, 256)
        );
        assert_eq!(
            m.hf_name("blk.0.attn_q.bias"),
            Some("model.layers.0.self_attn.q_proj.bias")
        );
        assert!(!m.has("model.layers.0.self_attn.rotary_emb.inv_freq"));
    }

    #[test]
    fn bad_folders_give_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();

        let mut cfg = tiny_config();
        cfg["model_type"] = json!("mistral");
        write_folder(p, cfg, tiny_tensors(safetensors::Dtype::F16));
        assert!(
            matches!(HfModel::open(p), Err(ArchError::Unsupported { arch, .. }) if arch == "mistral")
        );

        let mut cfg = tiny_config();
        cfg.as_object_mut().unwrap().remove("hidden_size");
        write_folder(p, cfg, tiny_tensors(safetensors::Dtype::F16));
        let e = HfModel::open(p).unwrap_err();
        assert!(
            matches!(&e, ArchError::Hf(HfError::ConfigKey { key, .. }) if key == "hidden_size"),
            "{e}"
        );

        let mut t = tiny_tensors(safetensors::Dtype::F16);
        t[5].2 = vec![8, 8]; // k_proj
        write_folder(p, tiny_config(), t);
        let e = HfModel::open(p).unwrap_err();
        assert!(
            matches!(&e, ArchError::TensorShape { name, .. } if name == "model.layers.0.self_attn.k_proj.weight (blk.0.attn_k.weight)"),
            "{e}"
        );

        let mut t = tiny_tensors(safetensors::Dtype::F16);
        t[4].1 = safetensors::Dtype::I8;
        write_folder(p, tiny_config(), t);
        let e = HfModel::open(p).unwrap_err();
        assert!(
            matches!(&e, ArchError::Hf(HfError::UnsupportedDtype { tensor, .. }) if tensor.contains("q_proj")),
            "{e}"
        );

        let mut cfg = tiny_config();
        cfg["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
        write_folder(p, cfg, tiny_tensors(safetensors::Dtype::F16));
        assert!(matches!(
            HfModel::open(p),
            Err(ArchError::Hf(HfError::Unsupported { .. }))
        ));

        // A truncated safetensors file.
        write_folder(p, tiny_config(), tiny_tensors(safetensors::Dtype::F16));
        let st = p.join("model.safetensors");
        let bytes = std::fs::read(&st).unwrap();
        std::fs::write(&st, &bytes[..bytes.len() - 3]).unwrap();
        assert!(matches!(
            HfModel::open(p),
            Err(ArchError::Hf(HfError::Safetensors { .. }))
        ));

        std::fs::remove_file(&st).unwrap();
        assert!(matches!(
            HfModel::open(p),
            Err(ArchError::Hf(HfError::NoWeights { .. }))
        ));
    }
}
