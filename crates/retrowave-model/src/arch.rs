//! Model architectures: hyper-parameters ([`ModelConfig`]), the tensor names and shapes each
//! layer needs ([`tensor_names`], [`expected_tensors`], [`validate_tensors`]), and uniform access
//! to weights whatever the file format ([`WeightSource`], [`ModelSource`], [`open_model`]).
//!
//! Every format is seen through GGUF tensor naming (`blk.{i}.attn_q.weight`, ...): the Hugging
//! Face loader in [`crate::hf`] maps its names onto these. Weight shapes are given as
//! [`WeightView`]s: `rows` output features of `cols` contiguous input features.

use std::path::{Path, PathBuf};

use retrowave_core::weights::WeightViewError;
use retrowave_core::{TensorType, WeightView};

use crate::gguf::{GgufError, GgufFile};
use crate::hf::{HfError, HfModel};

pub use retrowave_core::RopeStyle;

/// Architectures retrowave runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// Llama family (SmolLM2, Llama 2/3): RMSNorm, SwiGLU, no QKV bias.
    Llama,
    /// Qwen2 family (Qwen2, Qwen2.5): like Llama with QKV bias and NeoX RoPE.
    Qwen2,
}

impl Architecture {
    /// The names accepted, for error messages.
    pub const SUPPORTED: &'static str = "llama, qwen2";

    /// Parses a GGUF `general.architecture` or Hugging Face `model_type` name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }

    /// The GGUF / Hugging Face name (`llama`, `qwen2`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }

    /// The RoPE pairing of GGUF files of this architecture (GGUF llama's Q/K rows are permuted
    /// for interleaved pairs; Hugging Face checkpoints are always [`RopeStyle::NeoX`]).
    pub fn gguf_rope_style(self) -> RopeStyle {
        match self {
            Self::Llama => RopeStyle::Interleaved,
            Self::Qwen2 => RopeStyle::NeoX,
        }
    }
}

/// Errors about a model's architecture, configuration or tensors.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// The GGUF file is invalid or lacks a key.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The Hugging Face folder is invalid.
    #[error(transparent)]
    Hf(#[from] HfError),
    /// An architecture retrowave does not run.
    #[error("{model}: unsupported architecture {arch:?} (supported: {supported})")]
    Unsupported {
        model: String,
        arch: String,
        supported: &'static str,
    },
    /// A hyper-parameter with an impossible value.
    #[error("{model}: invalid configuration: {key} = {value}: {reason}")]
    InvalidConfig {
        model: String,
        key: String,
        value: String,
        reason: String,
    },
    /// A required tensor is absent.
    #[error("{model}: tensor {name} is missing")]
    MissingTensor { model: String, name: String },
    /// A tensor with the wrong shape.
    #[error("{model}: tensor {name} has shape {found}, expected {expected}")]
    TensorShape {
        model: String,
        name: String,
        expected: String,
        found: String,
    },
    /// A tensor stored in a type retrowave cannot use there.
    #[error("{model}: tensor {name} has type {dtype}, expected {expected}")]
    TensorType {
        model: String,
        name: String,
        dtype: TensorType,
        expected: &'static str,
    },
    /// Tensor bytes that do not match its shape.
    #[error(transparent)]
    View(#[from] WeightViewError),
    /// A path that is neither a GGUF file nor a Hugging Face folder.
    #[error("{}: not a model: {reason}", path.display())]
    NotAModel { path: PathBuf, reason: String },
}

/// Hyper-parameters of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The architecture family.
    pub arch: Architecture,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Model width (embedding length).
    pub hidden: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (GQA); divides `n_heads`.
    pub n_kv_heads: usize,
    /// Dimension of one attention head.
    pub head_dim: usize,
    /// FFN inner width.
    pub ffn_hidden: usize,
    /// Rows of the token embedding.
    pub vocab_size: usize,
    /// RoPE frequency base.
    pub rope_theta: f32,
    /// Leading dimensions of each head that RoPE rotates (usually `head_dim`).
    pub rope_dim: usize,
    /// How RoPE pairs dimensions, which depends on how Q/K rows are stored.
    pub rope_style: RopeStyle,
    /// Epsilon of the RMS norms.
    pub rms_eps: f32,
    /// Training context length.
    pub context_length: usize,
    /// Whether Q/K/V projections have biases.
    pub qkv_bias: bool,
    /// Whether the output projection reuses the token embedding.
    pub tied_embeddings: bool,
    /// Human-readable model name.
    pub name: String,
}

/// Largest value accepted for any size hyper-parameter (guards against corrupt files).
const MAX_DIM: u64 = 1 << 24;

impl ModelConfig {
    /// Reads the hyper-parameters of a GGUF file (`{arch}.block_count`, ...); the vocabulary size
    /// comes from the `token_embd.weight` tensor. The result is [validated](Self::validate).
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ArchError> {
        let model = source_label(g.path(), "GGUF data in memory");
        let arch_name = g.architecture()?;
        let arch = Architecture::from_name(arch_name).ok_or_else(|| ArchError::Unsupported {
            model: model.clone(),
            arch: arch_name.to_string(),
            supported: Architecture::SUPPORTED,
        })?;
        let a = arch.name();
        let size = |key: &str| -> Result<usize, ArchError> {
            let v = g.get_u64(key)?;
            check_size(&model, key, v)
        };
        let size_or = |key: &str, default: usize| -> Result<usize, ArchError> {
            if g.get(key).is_some() {
                size(key)
            } else {
                Ok(default)
            }
        };
        let hidden = size(&format!("{a}.embedding_length"))?;
        let n_heads = size(&format!("{a}.attention.head_count"))?;
        let n_kv_heads = size_or(&format!("{a}.attention.head_count_kv"), n_heads)?;
        let head_dim = size_or(
            &format!("{a}.attention.key_length"),
            hidden / n_heads.max(1),
        )?;
        let value_len_key = format!("{a}.attention.value_length");
        if g.get(&value_len_key).is_some() {
            let v = size(&value_len_key)?;
            if v != head_dim {
                return Err(invalid(
                    &model,
                    &value_len_key,
                    v,
                    format!("differs from the key length {head_dim}; retrowave needs them equal"),
                ));
            }
        }
        let rope_theta_key = format!("{a}.rope.freq_base");
        let rope_theta = if g.get(&rope_theta_key).is_some() {
            g.get_f32(&rope_theta_key)?
        } else {
            10000.0
        };
        let embd = g
            .tensor_info(TOKEN_EMBD)
            .ok_or_else(|| ArchError::MissingTensor {
                model: model.clone(),
                name: TOKEN_EMBD.to_string(),
            })?;
        if embd.dims.len() != 2 {
            return Err(ArchError::TensorShape {
                model: model.clone(),
                name: TOKEN_EMBD.to_string(),
                expected: "a matrix".to_string(),
                found: format!("GGML dims {:?}", embd.dims),
            });
        }
        let vocab_size = check_size(&model, "token_embd.weight rows", embd.rows())?;
        let vocab_key = format!("{a}.vocab_size");
        if g.get(&vocab_key).is_some() {
            let v = size(&vocab_key)?;
            if v != vocab_size {
                return Err(invalid(
                    &model,
                    &vocab_key,
                    v,
                    format!("differs from the {vocab_size} rows of token_embd.weight"),
                ));
            }
        }
        let cfg = ModelConfig {
            arch,
            n_layers: size(&format!("{a}.block_count"))?,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_hidden: size(&format!("{a}.feed_forward_length"))?,
            vocab_size,
            rope_theta,
            rope_dim: size_or(&format!("{a}.rope.dimension_count"), head_dim)?,
            rope_style: arch.gguf_rope_style(),
            rms_eps: g.get_f32(&format!("{a}.attention.layer_norm_rms_epsilon"))?,
            context_length: size(&format!("{a}.context_length"))?,
            qkv_bias: g.tensor_info("blk.0.attn_q.bias").is_some(),
            tied_embeddings: g.tensor_info(OUTPUT).is_none(),
            name: match g.get("general.name").and_then(|v| v.as_str()) {
                Some(n) if !n.is_empty() => n.to_string(),
                _ => g
                    .path()
                    .and_then(|p| p.file_stem())
                    .map_or_else(|| a.to_string(), |s| s.to_string_lossy().into_owned()),
            },
        };
        cfg.validate(&model)?;
        Ok(cfg)
    }

    /// Checks the relations between hyper-parameters: nonzero sizes, heads in whole GQA groups,
    /// an even head dimension, a RoPE dimension that is even and at most `head_dim`, and a
    /// positive finite RoPE base and norm epsilon. `model` names the source in errors.
    pub fn validate(&self, model: &str) -> Result<(), ArchError> {
        let sizes = [
            ("n_layers", self.n_layers),
            ("hidden", self.hidden),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("ffn_hidden", self.ffn_hidden),
            ("vocab_size", self.vocab_size),
            ("rope_dim", self.rope_dim),
            ("context_length", self.context_length),
        ];
        for (key, v) in sizes {
            check_size(model, key, v as u64)?;
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(invalid(
                model,
                "n_kv_heads",
                self.n_kv_heads,
                format!(
                    "does not divide the {} query heads into whole groups",
                    self.n_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(invalid(
                model,
                "head_dim",
                self.head_dim,
                "must be even for RoPE".into(),
            ));
        }
        if !self.rope_dim.is_multiple_of(2) || self.rope_dim > self.head_dim {
            return Err(invalid(
                model,
                "rope_dim",
                self.rope_dim,
                format!("must be even and at most head_dim {}", self.head_dim),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(invalid(
                model,
                "rope_theta",
                self.rope_theta,
                "must be positive".into(),
            ));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0) {
            return Err(invalid(
                model,
                "rms_eps",
                self.rms_eps,
                "must be positive".into(),
            ));
        }
        Ok(())
    }

    /// Width of the concatenated query heads, `n_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads, `n_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Query heads per KV head.
    pub fn gqa_group(&self) -> usize {
        self.n_heads / self.n_kv_heads.max(1)
    }
}

fn check_size(model: &str, key: &str, v: u64) -> Result<usize, ArchError> {
    if v == 0 || v > MAX_DIM {
        return Err(invalid(
            model,
            key,
            v,
            format!("must be between 1 and {MAX_DIM}"),
        ));
    }
    Ok(v as usize)
}

fn invalid(model: &str, key: &str, value: impl std::fmt::Display, reason: String) -> ArchError {
    ArchError::InvalidConfig {
        model: model.to_string(),
        key: key.to_string(),
        value: value.to_string(),
        reason,
    }
}

fn source_label(path: Option<&Path>, fallback: &str) -> String {
    path.map_or_else(|| fallback.to_string(), |p| p.display().to_string())
}

/// Name of the token embedding (`vocab` rows of `hidden`).
pub const TOKEN_EMBD: &str = "token_embd.weight";
/// Name of the final norm weight.
pub const OUTPUT_NORM: &str = "output_norm.weight";
/// Name of the output projection (absent when tied to the embedding).
pub const OUTPUT: &str = "output.weight";

/// GGUF names of one layer's tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerTensorNames {
    /// Pre-attention RMS norm weight.
    pub attn_norm: String,
    /// Query projection.
    pub attn_q: String,
    /// Key projection.
    pub attn_k: String,
    /// Value projection.
    pub attn_v: String,
    /// Biases, present when the config has `qkv_bias`.
    pub attn_q_bias: Option<String>,
    /// Key bias.
    pub attn_k_bias: Option<String>,
    /// Value bias.
    pub attn_v_bias: Option<String>,
    /// Attention output projection.
    pub attn_output: String,
    /// Pre-FFN RMS norm weight.
    pub ffn_norm: String,
    /// FFN gate projection (SwiGLU).
    pub ffn_gate: String,
    /// FFN up projection.
    pub ffn_up: String,
    /// FFN down projection.
    pub ffn_down: String,
}

/// The GGUF names of layer `layer`'s tensors (biases only when `cfg.qkv_bias`).
pub fn tensor_names(cfg: &ModelConfig, layer: usize) -> LayerTensorNames {
    let n = |s: &str| format!("blk.{layer}.{s}");
    let bias = |s: &str| cfg.qkv_bias.then(|| n(s));
    LayerTensorNames {
        attn_norm: n("attn_norm.weight"),
        attn_q: n("attn_q.weight"),
        attn_k: n("attn_k.weight"),
        attn_v: n("attn_v.weight"),
        attn_q_bias: bias("attn_q.bias"),
        attn_k_bias: bias("attn_k.bias"),
        attn_v_bias: bias("attn_v.bias"),
        attn_output: n("attn_output.weight"),
        ffn_norm: n("ffn_norm.weight"),
        ffn_gate: n("ffn_gate.weight"),
        ffn_up: n("ffn_up.weight"),
        ffn_down: n("ffn_down.weight"),
    }
}

/// One tensor a model needs and its shape as a [`WeightView`] (`rows` x `cols`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTensor {
    /// GGUF name.
    pub name: String,
    /// Expected rows (output features; 1 for vectors).
    pub rows: usize,
    /// Expected row length (input features).
    pub cols: usize,
    /// Vectors (norms, biases) must be stored as floats; matrices may be quantized.
    pub is_vector: bool,
}

/// Every tensor the model needs, with its shape: embedding, each layer's tensors, final norm and
/// (unless tied) the output projection.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<ExpectedTensor> {
    let mat = |name: String, rows: usize, cols: usize| ExpectedTensor {
        name,
        rows,
        cols,
        is_vector: false,
    };
    let vec = |name: String, len: usize| ExpectedTensor {
        name,
        rows: 1,
        cols: len,
        is_vector: true,
    };
    let (h, q, kv, f) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.ffn_hidden);
    let mut out = vec![mat(TOKEN_EMBD.into(), cfg.vocab_size, h)];
    for layer in 0..cfg.n_layers {
        let t = tensor_names(cfg, layer);
        out.push(vec(t.attn_norm, h));
        out.push(mat(t.attn_q, q, h));
        out.push(mat(t.attn_k, kv, h));
        out.push(mat(t.attn_v, kv, h));
        if let (Some(qb), Some(kb), Some(vb)) = (t.attn_q_bias, t.attn_k_bias, t.attn_v_bias) {
            out.push(vec(qb, q));
            out.push(vec(kb, kv));
            out.push(vec(vb, kv));
        }
        out.push(mat(t.attn_output, h, q));
        out.push(vec(t.ffn_norm, h));
        out.push(mat(t.ffn_gate, f, h));
        out.push(mat(t.ffn_up, f, h));
        out.push(mat(t.ffn_down, h, f));
    }
    out.push(vec(OUTPUT_NORM.into(), h));
    if !cfg.tied_embeddings {
        out.push(mat(OUTPUT.into(), cfg.vocab_size, h));
    }
    out
}

fn describe_shape(rows: usize, cols: usize, is_vector: bool) -> String {
    if is_vector {
        format!("a vector of {cols}")
    } else {
        format!("{rows} rows (outputs) x {cols} columns (inputs)")
    }
}

/// Checks that `src` has every tensor of [`expected_tensors`] with the expected shape and a
/// usable type (matrices: [`TensorType::is_supported_weight`]; vectors: F32, F16 or BF16), and
/// that the configuration itself is valid. Errors name the tensor, the expected and found shape
/// or type.
pub fn validate_tensors(cfg: &ModelConfig, src: &dyn WeightSource) -> Result<(), ArchError> {
    let model = src.source_name();
    cfg.validate(&model)?;
    for e in expected_tensors(cfg) {
        if !src.has(&e.name) {
            return Err(ArchError::MissingTensor {
                model,
                name: e.name,
            });
        }
        let w = src.weight(&e.name)?;
        if w.rows != e.rows || w.cols != e.cols {
            return Err(ArchError::TensorShape {
                model,
                expected: describe_shape(e.rows, e.cols, e.is_vector),
                found: describe_shape(w.rows, w.cols, w.rows == 1 && e.is_vector),
                name: e.name,
            });
        }
        let ok = if e.is_vector {
            matches!(
                w.dtype,
                TensorType::F32 | TensorType::F16 | TensorType::BF16
            )
        } else {
            w.dtype.is_supported_weight()
        };
        if !ok {
            return Err(ArchError::TensorType {
                model,
                name: e.name,
                dtype: w.dtype,
                expected: if e.is_vector {
                    "F32, F16 or BF16 for a vector"
                } else {
                    "one of F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K"
                },
            });
        }
    }
    Ok(())
}

/// Access to a model's weights by GGUF tensor name, whatever the file format.
pub trait WeightSource: Send + Sync {
    /// The weight `name` (GGUF naming) as stored.
    fn weight(&self, name: &str) -> Result<WeightView<'_>, ArchError>;
    /// Whether the weight exists.
    fn has(&self, name: &str) -> bool;
    /// The file or folder the weights come from, for messages.
    fn source_name(&self) -> String {
        "model".to_string()
    }
}

impl WeightSource for GgufFile {
    /// Views of 1-D tensors have one row; 2-D tensors `dims[1]` rows of `dims[0]`; tensors of
    /// more dimensions are refused.
    fn weight(&self, name: &str) -> Result<WeightView<'_>, ArchError> {
        let model = || source_label(self.path(), "GGUF data in memory");
        let info = self
            .tensor_info(name)
            .ok_or_else(|| ArchError::MissingTensor {
                model: model(),
                name: name.to_string(),
            })?;
        let (cols, rows) = match info.dims.as_slice() {
            [c] => (*c, 1),
            [c, r] => (*c, *r),
            dims => {
                return Err(ArchError::TensorShape {
                    model: model(),
                    name: name.to_string(),
                    expected: "a vector or a matrix".to_string(),
                    found: format!("GGML dims {dims:?}"),
                });
            }
        };
        let to_usize = |v: u64| {
            usize::try_from(v).map_err(|_| ArchError::TensorShape {
                model: model(),
                name: name.to_string(),
                expected: "dimensions that fit in memory".to_string(),
                found: format!("GGML dims {:?}", info.dims),
            })
        };
        let (rows, cols) = (to_usize(rows)?, to_usize(cols)?);
        Ok(WeightView::new(
            &info.name,
            info.dtype,
            rows,
            cols,
            self.tensor_data(info),
        )?)
    }

    fn has(&self, name: &str) -> bool {
        self.tensor_info(name).is_some()
    }

    fn source_name(&self) -> String {
        source_label(self.path(), "GGUF data in memory")
    }
}

/// A model opened by [`open_model`]: a GGUF file or a Hugging Face folder.
#[derive(Debug)]
pub enum ModelSource {
    /// A GGUF file.
    Gguf(GgufFile),
    /// A Hugging Face folder.
    HfFolder(HfModel),
}

impl ModelSource {
    /// The model's hyper-parameters.
    pub fn config(&self) -> Result<ModelConfig, ArchError> {
        match self {
            ModelSource::Gguf(g) => ModelConfig::from_gguf(g),
            ModelSource::HfFolder(h) => Ok(h.config().clone()),
        }
    }

    /// The GGUF file, for a GGUF model (tokenizer and chat template live in it).
    pub fn gguf(&self) -> Option<&GgufFile> {
        match self {
            ModelSource::Gguf(g) => Some(g),
            ModelSource::HfFolder(_) => None,
        }
    }

    /// The Hugging Face folder, for a folder model.
    pub fn hf(&self) -> Option<&HfModel> {
        match self {
            ModelSource::Gguf(_) => None,
            ModelSource::HfFolder(h) => Some(h),
        }
    }
}

impl WeightSource for ModelSource {
    fn weight(&self, name: &str) -> Result<WeightView<'_>, ArchError> {
        match self {
            ModelSource::Gguf(g) => g.weight(name),
            ModelSource::HfFolder(h) => h.weight(name),
        }
    }

    fn has(&self, name: &str) -> bool {
        match self {
            ModelSource::Gguf(g) => g.has(name),
            ModelSource::HfFolder(h) => h.has(name),
        }
    }

    fn source_name(&self) -> String {
        match self {
            ModelSource::Gguf(g) => g.source_name(),
            ModelSource::HfFolder(h) => h.source_name(),
        }
    }
}

/// Opens a model: a `.gguf` file (or any file starting with the GGUF magic), or a folder with a
/// `config.json` and safetensors weights. The configuration and every tensor are validated
/// ([`validate_tensors`]) before the model is returned.
pub fn open_model(path: &Path) -> Result<ModelSource, ArchError> {
    let not_a_model = |reason: String| ArchError::NotAModel {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| not_a_model(format!("cannot read it: {e}")))?;
    if meta.is_dir() {
        if !path.join("config.json").is_file() {
            return Err(not_a_model(
                "the folder has no config.json (expected a Hugging Face model folder)".to_string(),
            ));
        }
        return Ok(ModelSource::HfFolder(HfModel::open(path)?));
    }
    let is_gguf_name = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let has_magic = || -> bool {
        use std::io::Read;
        let mut magic = [0u8; 4];
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok_and(|()| magic == crate::gguf::GGUF_MAGIC)
    };
    if !is_gguf_name && !has_magic() {
        return Err(not_a_model(
            "expected a .gguf file or a Hugging Face folder with config.json".to_string(),
        ));
    }
    let g = GgufFile::open(path)?;
    let cfg = ModelConfig::from_gguf(&g)?;
    validate_tensors(&cfg, &g)?;
    Ok(ModelSource::Gguf(g))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufValue, GgufWriter};

    /// A tiny valid llama model: 2 layers, hidden 64, 4/2 heads of 16, FFN 96, vocab 32.
    fn tiny(mutate: impl FnOnce(&mut Vec<(String, Vec<u64>, TensorType)>)) -> GgufFile {
        let mut w = GgufWriter::new();
        w.metadata("general.architecture", GgufValue::String("llama".into()))
            .metadata("general.name", GgufValue::String("tiny".into()))
            .metadata("llama.block_count", GgufValue::U32(2))
            .metadata("llama.context_length", GgufValue::U32(128))
            .metadata("llama.embedding_length", GgufValue::U32(64))
            .metadata("llama.feed_forward_length", GgufValue::U32(96))
            .metadata("llama.attention.head_count", GgufValue::U32(4))
            .metadata("llama.attention.head_count_kv", GgufValue::U32(2))
            .metadata(
                "llama.attention.layer_norm_rms_epsilon",
                GgufValue::F32(1e-5),
            );
        let mut tensors: Vec<(String, Vec<u64>, TensorType)> = vec![
            ("token_embd.weight".into(), vec![64, 32], TensorType::Q8_0),
            ("output_norm.weight".into(), vec![64], TensorType::F32),
        ];
        for l in 0..2 {
            for (n, d) in [
                ("attn_norm.weight", vec![64]),
                ("attn_q.weight", vec![64, 64]),
                ("attn_k.weight", vec![64, 32]),
                ("attn_v.weight", vec![64, 32]),
                ("attn_output.weight", vec![64, 64]),
                ("ffn_norm.weight", vec![64]),
                ("ffn_gate.weight", vec![64, 96]),
                ("ffn_up.weight", vec![64, 96]),
                ("ffn_down.weight", vec![96, 64]),
            ] {
                let t = if d.len() == 1 {
                    TensorType::F32
                } else {
                    TensorType::Q4_0
                };
                tensors.push((format!("blk.{l}.{n}"), d, t));
            }
        }
        mutate(&mut tensors);
        for (n, d, t) in &tensors {
            let bytes = t.row_bytes(d[0]).unwrap() * d.iter().skip(1).product::<u64>();
            w.tensor(n, d, *t, vec![0u8; bytes as usize]);
        }
        GgufFile::from_bytes(w.to_bytes()).unwrap()
    }

    #[test]
    fn tiny_model_config_and_validation() {
        let g = tiny(|_| {});
        let cfg = ModelConfig::from_gguf(&g).unwrap();
        assert_eq!(cfg.arch, Architecture::Llama);
        assert_eq!(
            (cfg.n_layers, cfg.hidden, cfg.n_heads, cfg.n_kv_heads),
            (2, 64, 4, 2)
        );
        assert_eq!((cfg.head_dim, cfg.ffn_hidden, cfg.vocab_size), (16, 96, 32));
        assert_eq!(
            (cfg.rope_theta, cfg.rope_dim, cfg.rope_style),
            (10000.0, 16, RopeStyle::Interleaved)
        );
        assert!(cfg.tied_embeddings && !cfg.qkv_bias);
        assert_eq!(cfg.name, "tiny");
        validate_tensors(&cfg, &g).unwrap();
        assert_eq!(expected_tensors(&cfg).len(), 1 + 2 * 9 + 1);
    }

    #[test]
    fn wrong_shape_missing_tensor_and_bad_vector_type_are_named() {
        let g = tiny(|t| t[4].1 = vec![64, 48]); // blk.0.attn_k.weight
        let cfg = ModelConfig::from_gguf(&g).unwrap();
        let e = validate_tensors(&cfg, &g).unwrap_err();
        assert!(
            matches!(&e, ArchError::TensorShape { name, .. } if name == "blk.0.attn_k.weight"),
            "{e}"
        );
        assert!(e.to_string().contains("expected 32 rows"), "{e}");

        let g = tiny(|t| {
            t.retain(|x| x.0 != "blk.1.ffn_up.weight");
        });
        let cfg = ModelConfig::from_gguf(&g).unwrap();
        let e = validate_tensors(&cfg, &g).unwrap_err();
        assert!(
            matches!(&e, ArchError::MissingTensor { name, .. } if name == "blk.1.ffn_up.weight")
        );

        let g = tiny(|t| t[2].2 = TensorType::F16); // blk.0.attn_norm.weight as F16 is fine
        let cfg = ModelConfig::from_gguf(&g).unwrap();
        validate_tensors(&cfg, &g).unwrap();
        let g = tiny(|t| {
            t[2].1 = vec![64];
            t[2].2 = TensorType::Q8_0;
        });
        let e = validate_tensors(&ModelConfig::from_gguf(&g).unwrap(), &g).unwrap_err();
        assert!(
            matches!(&e, ArchError::TensorType { name, dtype: TensorType::Q8_0, .. } if name == "blk.0.attn_norm.weight")
        );
    }

    #[test]
    fn config_relations_are_checked() {
        let g = tiny(|_| {});
        let mut cfg = ModelConfig::from_gguf(&g).unwrap();
        cfg.n_kv_heads = 3;
        assert!(
            matches!(cfg.validate("m"), Err(ArchError::InvalidConfig { key, .. }) if key == "n_kv_heads")
        );
        cfg.n_kv_heads = 2;
        cfg.head_dim = 15;
        assert!(
            matches!(cfg.validate("m"), Err(ArchError::InvalidConfig { key, .. }) if key == "head_dim")
        );
        cfg.head_dim = 16;
        cfg.rope_dim = 32;
        assert!(
            matches!(cfg.validate("m"), Err(ArchError::InvalidConfig { key, .. }) if key == "rope_dim")
        );
        cfg.rope_dim = 16;
        cfg.n_layers = 0;
        assert!(
            matches!(cfg.validate("m"), Err(ArchError::InvalidConfig { key, .. }) if key == "n_layers")
        );
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let mut w = GgufWriter::new();
        w.metadata("general.architecture", GgufValue::String("mamba".into()));
        let g = GgufFile::from_bytes(w.to_bytes()).unwrap();
        let e = ModelConfig::from_gguf(&g).unwrap_err();
        assert!(matches!(&e, ArchError::Unsupported { arch, .. } if arch == "mamba"));
        assert!(e.to_string().contains("llama, qwen2"), "{e}");
    }

    #[test]
    fn open_model_refuses_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let e = open_model(dir.path()).unwrap_err();
        assert!(matches!(e, ArchError::NotAModel { .. }));
        assert!(e.to_string().contains("config.json"), "{e}");
        let f = dir.path().join("notes.txt");
        std::fs::write(&f, "hello").unwrap();
        assert!(matches!(open_model(&f), Err(ArchError::NotAModel { .. })));
        assert!(matches!(
            open_model(&dir.path().join("absent.gguf")),
            Err(ArchError::NotAModel { .. })
        ));
    }

    #[test]
    fn real_models_match_models_md_and_validate() {
        use crate::gguf::test_model_path;
        let src = open_model(&test_model_path("smollm2-135m")).unwrap();
        let c = src.config().unwrap();
        let expected = ModelConfig {
            arch: Architecture::Llama,
            n_layers: 30,
            hidden: 576,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            ffn_hidden: 1536,
            vocab_size: 49152,
            rope_theta: 1e5,
            rope_dim: 64,
            rope_style: RopeStyle::Interleaved,
            rms_eps: 1e-5,
            context_length: 8192,
            qkv_bias: false,
            tied_embeddings: true,
            name: "Smollm2 135M 8k Lc100K Mix1 Ep2".to_string(),
        };
        assert_eq!(c, expected);
        let embd = src.weight(TOKEN_EMBD).unwrap();
        assert_eq!(
            (embd.rows, embd.cols, embd.dtype),
            (49152, 576, TensorType::Q8_0)
        );
        let q = src.weight("blk.0.attn_q.weight").unwrap();
        assert_eq!(
            (q.rows, q.cols, q.dtype, q.row_bytes()),
            (576, 576, TensorType::Q4_1, 360)
        );

        let qwen = open_model(&test_model_path("qwen2.5-coder-0.5b")).unwrap();
        let c = qwen.config().unwrap();
        let expected = ModelConfig {
            arch: Architecture::Qwen2,
            n_layers: 24,
            hidden: 896,
            n_heads: 14,
            n_kv_heads: 2,
            head_dim: 64,
            ffn_hidden: 4864,
            vocab_size: 151936,
            rope_theta: 1e6,
            rope_dim: 64,
            rope_style: RopeStyle::NeoX,
            rms_eps: 1e-6,
            context_length: 32768,
            qkv_bias: true,
            // This file stores output.weight (Q8_0) separately from token_embd (Q5_0).
            tied_embeddings: false,
            name: "Qwen2.5 Coder 0.5B Instruct AWQ".to_string(),
        };
        assert_eq!(c, expected);
        let b = qwen.weight("blk.3.attn_k.bias").unwrap();
        assert_eq!((b.rows, b.cols, b.dtype), (1, 128, TensorType::F32));
    }

    #[test]
    fn real_model_with_mismatched_config_names_the_tensor() {
        let g = GgufFile::open(&crate::gguf::test_model_path("smollm2-135m")).unwrap();
        let good = ModelConfig::from_gguf(&g).unwrap();

        let mut cfg = good.clone();
        cfg.ffn_hidden = 1024;
        let e = validate_tensors(&cfg, &g).unwrap_err();
        assert!(
            matches!(&e, ArchError::TensorShape { name, .. } if name == "blk.0.ffn_gate.weight"),
            "{e}"
        );
        assert!(
            e.to_string().contains("expected 1024 rows")
                && e.to_string().contains("has shape 1536 rows"),
            "{e}"
        );

        let mut cfg = good.clone();
        cfg.n_kv_heads = 1;
        cfg.n_heads = 9;
        let e = validate_tensors(&cfg, &g).unwrap_err();
        assert!(
            matches!(&e, ArchError::TensorShape { name, .. } if name == "blk.0.attn_k.weight"),
            "{e}"
        );

        let mut cfg = good.clone();
        cfg.tied_embeddings = false;
        let e = validate_tensors(&cfg, &g).unwrap_err();
        assert!(
            matches!(&e, ArchError::MissingTensor { name, .. } if name == "output.weight"),
            "{e}"
        );
        assert!(e.to_string().contains("smollm2-135m.gguf"), "{e}");

        let mut cfg = good;
        cfg.qkv_bias = true;
        let e = validate_tensors(&cfg, &g).unwrap_err();
        assert!(
            matches!(&e, ArchError::MissingTensor { name, .. } if name == "blk.0.attn_q.bias"),
            "{e}"
        );
    }
}
