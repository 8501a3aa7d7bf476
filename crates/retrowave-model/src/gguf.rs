//! GGUF files: a reader that validates everything it reads, a small writer, and row
//! dequantization.
//!
//! [`GgufFile::open`] memory-maps a file (or [`GgufFile::from_bytes`] takes a buffer), parses the
//! header, the metadata and the tensor infos, and checks every count, length, type id, shape,
//! alignment and data range before anything is allocated or sliced, so a corrupt or hostile file
//! yields a [`GgufError`] that names the problem and never a panic, an out-of-bounds read or a
//! huge allocation. After a successful open, [`GgufFile::tensor_data`] is infallible.
//!
//! GGUF versions 2 and 3 (little-endian) are read; version 1 is rejected.
//!
//! [`dequantize_row`] (in this module) turns one stored row of any [`TensorType`] into `f32`; the
//! CPU backend and the Hugging Face exporter use it. [`GgufWriter`] writes GGUF files (used by
//! tests to build small models).

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use retrowave_core::TensorType;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of tensor data when the file does not set `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most tensors a file may declare.
pub const MAX_TENSORS: u64 = 1 << 20;
/// Most metadata key/value pairs a file may declare.
pub const MAX_KV: u64 = 1 << 20;
/// Most elements one metadata array may hold.
pub const MAX_ARRAY_LEN: u64 = 1 << 24;
/// Most array elements all the metadata together may hold (bounds memory use).
pub const MAX_METADATA_VALUES: u64 = 1 << 25;
/// Longest string (key, value, tensor name) in bytes.
pub const MAX_STRING_LEN: u64 = 1 << 28;
/// Deepest nesting of arrays inside arrays (1 = a plain array).
pub const MAX_ARRAY_DEPTH: usize = 4;
/// Most dimensions of a tensor.
pub const MAX_DIMS: u32 = 4;

/// Errors reading a GGUF file or its metadata. `file` is the path, or a note that the data came
/// from memory.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("{file}: cannot read GGUF file: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error(
        "{file}: not a GGUF file: expected magic bytes \"GGUF\", found {}",
        show_bytes(found)
    )]
    BadMagic { file: String, found: [u8; 4] },
    /// A version other than 2 or 3.
    #[error("{file}: unsupported GGUF version {version} ({hint})")]
    UnsupportedVersion {
        file: String,
        version: u32,
        hint: &'static str,
    },
    /// The file ends before something it declares.
    #[error(
        "{file}: file is truncated: {what} at byte offset {offset} needs {needed} bytes but only {available} remain"
    )]
    Truncated {
        file: String,
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    /// A count or length beyond any sane limit (a corrupt file).
    #[error("{file}: {what} at byte offset {offset} is {count}, more than the limit of {limit}")]
    CountTooLarge {
        file: String,
        what: String,
        offset: u64,
        count: u64,
        limit: u64,
    },
    /// A key, string value or tensor name that is not UTF-8.
    #[error("{file}: {what} at byte offset {offset} is not valid UTF-8")]
    InvalidUtf8 {
        file: String,
        what: String,
        offset: u64,
    },
    /// A metadata value type id that GGUF does not define.
    #[error("{file}: metadata key {key:?} has unknown value type id {type_id}")]
    UnknownValueType {
        file: String,
        key: String,
        type_id: u32,
    },
    /// Arrays nested deeper than [`MAX_ARRAY_DEPTH`].
    #[error("{file}: metadata key {key:?} nests arrays deeper than {max} levels")]
    ArrayTooDeep {
        file: String,
        key: String,
        max: usize,
    },
    /// A boolean byte other than 0 or 1.
    #[error("{file}: metadata key {key:?} holds boolean byte {value}, expected 0 or 1")]
    InvalidBool {
        file: String,
        key: String,
        value: u8,
    },
    /// The same metadata key twice.
    #[error("{file}: metadata key {key:?} appears more than once")]
    DuplicateKey { file: String, key: String },
    /// The same tensor name twice.
    #[error("{file}: tensor {name:?} appears more than once")]
    DuplicateTensor { file: String, name: String },
    /// A tensor with 0 or more than [`MAX_DIMS`] dimensions.
    #[error("{file}: tensor {tensor:?} has {n_dims} dimensions, expected 1 to {MAX_DIMS}")]
    BadDimCount {
        file: String,
        tensor: String,
        n_dims: u32,
    },
    /// A tensor with a zero dimension.
    #[error("{file}: tensor {tensor:?} has a zero dimension in {dims:?}")]
    ZeroDim {
        file: String,
        tensor: String,
        dims: Vec<u64>,
    },
    /// A tensor whose element count or byte size does not fit 63 bits.
    #[error("{file}: tensor {tensor:?} with dimensions {dims:?} has too many elements")]
    ElementCountOverflow {
        file: String,
        tensor: String,
        dims: Vec<u64>,
    },
    /// A GGML type id retrowave does not know.
    #[error("{file}: tensor {tensor:?} has unknown GGML type id {type_id}")]
    UnknownTensorType {
        file: String,
        tensor: String,
        type_id: u32,
    },
    /// A row length that is not a whole number of quantization blocks.
    #[error(
        "{file}: tensor {tensor:?} of type {dtype} has row length {row_len}, not a multiple of the block size {block_size}"
    )]
    RowNotBlockMultiple {
        file: String,
        tensor: String,
        dtype: TensorType,
        row_len: u64,
        block_size: usize,
    },
    /// `general.alignment` is zero or not a power of two.
    #[error("{file}: general.alignment is {alignment}, expected a nonzero power of two")]
    BadAlignment { file: String, alignment: u64 },
    /// A tensor offset that is not a multiple of the alignment.
    #[error(
        "{file}: tensor {tensor:?} starts at data offset {offset}, not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        file: String,
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    /// Tensor data that extends past the end of the file.
    #[error(
        "{file}: tensor {tensor:?} data at byte offset {offset} with size {size} extends past the end of the file ({file_len} bytes)"
    )]
    TensorOutOfBounds {
        file: String,
        tensor: String,
        offset: u64,
        size: u64,
        file_len: u64,
    },
    /// Two tensors whose data overlap.
    #[error(
        "{file}: tensors {first:?} (bytes {first_start}..{first_end}) and {second:?} (starting at byte {second_start}) overlap"
    )]
    TensorOverlap {
        file: String,
        first: String,
        first_start: u64,
        first_end: u64,
        second: String,
        second_start: u64,
    },
    /// A metadata key that is absent.
    #[error("{file}: metadata key {key:?} is missing")]
    MissingKey { file: String, key: String },
    /// A metadata value of another type than the caller needs.
    #[error("{file}: metadata key {key:?} should be {expected}, found {found}")]
    WrongType {
        file: String,
        key: String,
        expected: &'static str,
        found: String,
    },
    /// A numeric metadata value that does not fit the type the caller needs.
    #[error("{file}: metadata key {key:?} holds {value}, which does not fit {expected}")]
    OutOfRange {
        file: String,
        key: String,
        value: String,
        expected: &'static str,
    },
}

fn show_bytes(b: &[u8]) -> String {
    let text: String = b
        .iter()
        .flat_map(|&c| std::ascii::escape_default(c))
        .map(char::from)
        .collect();
    let hex: Vec<String> = b.iter().map(|c| format!("{c:02x}")).collect();
    format!("\"{text}\" (hex {})", hex.join(" "))
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float32`.
    F32(f32),
    /// `float64`.
    F64(f64),
    /// `bool` (stored as one byte, 0 or 1).
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array (elements of one type).
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, for any integer type whose value is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, for any integer type whose value fits `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, for any numeric type (integers converted).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            GgufValue::U64(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The string, for a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The boolean, for a boolean value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, for an array value.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The type's name (`u32`, `string`, `array`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F32(_) => "f32",
            GgufValue::F64(_) => "f64",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
        }
    }

    /// A short description for error messages: the type, and for arrays the element type.
    pub fn describe(&self) -> String {
        match self {
            GgufValue::Array(a) => match a.first() {
                Some(first) => format!("array of {}", first.type_name()),
                None => "empty array".to_string(),
            },
            other => other.type_name().to_string(),
        }
    }

    /// The GGUF value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }
}

impl fmt::Display for GgufValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgufValue::U8(v) => write!(f, "{v}"),
            GgufValue::I8(v) => write!(f, "{v}"),
            GgufValue::U16(v) => write!(f, "{v}"),
            GgufValue::I16(v) => write!(f, "{v}"),
            GgufValue::U32(v) => write!(f, "{v}"),
            GgufValue::I32(v) => write!(f, "{v}"),
            GgufValue::U64(v) => write!(f, "{v}"),
            GgufValue::I64(v) => write!(f, "{v}"),
            GgufValue::F32(v) => write!(f, "{v}"),
            GgufValue::F64(v) => write!(f, "{v}"),
            GgufValue::Bool(v) => write!(f, "{v}"),
            GgufValue::String(v) => write!(f, "{v:?}"),
            GgufValue::Array(a) => write!(f, "[{} elements]", a.len()),
        }
    }
}

/// Where one tensor lives in the file and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in GGML order: `dims[0]` is the contiguous row length.
    pub dims: Vec<u64>,
    /// Storage type.
    pub dtype: TensorType,
    /// Absolute file offset of the data.
    pub offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements (validated at open not to overflow).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d))
    }

    /// Row length (`dims[0]`).
    pub fn cols(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Number of rows: the product of every dimension after the first (1 for vectors).
    pub fn rows(&self) -> u64 {
        self.dims
            .iter()
            .skip(1)
            .fold(1u64, |a, &d| a.saturating_mul(d))
    }
}

enum Backing {
    Mmap(memmap2::Mmap),
    Bytes(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Bytes(b) => b,
        }
    }
}

/// A parsed and validated GGUF file (memory-mapped, or held in memory).
pub struct GgufFile {
    backing: Backing,
    path: Option<PathBuf>,
    version: u32,
    alignment: u64,
    data_start: u64,
    metadata: Vec<(String, GgufValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("len", &self.len())
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps `path`, then parses and validates it.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let file_label = path.display().to_string();
        let io_err = |source| GgufError::Io {
            file: file_label.clone(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        // SAFETY: the map is read-only and private to this process. As with every mmap-based
        // loader, another process truncating or rewriting the file while it is mapped is outside
        // what we can guard against; the model files are written once by the registry.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err)?;
        Self::parse(Backing::Mmap(mmap), Some(path.to_path_buf()))
    }

    /// Parses and validates a GGUF file held in memory (same checks as [`GgufFile::open`]).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(Backing::Bytes(bytes), None)
    }

    fn parse(backing: Backing, path: Option<PathBuf>) -> Result<Self, GgufError> {
        let label = match &path {
            Some(p) => p.display().to_string(),
            None => "GGUF data in memory".to_string(),
        };
        let parsed = Parser::new(backing.bytes(), &label).parse()?;
        Ok(Self {
            backing,
            path,
            version: parsed.version,
            alignment: parsed.alignment,
            data_start: parsed.data_start,
            key_index: parsed
                .metadata
                .iter()
                .enumerate()
                .map(|(i, (k, _))| (k.clone(), i))
                .collect(),
            metadata: parsed.metadata,
            tensor_index: parsed
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect(),
            tensors: parsed.tensors,
        })
    }

    fn label(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => "GGUF data in memory".to_string(),
        }
    }

    /// The path the file was opened from (`None` for [`GgufFile::from_bytes`]).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// File length in bytes.
    pub fn len(&self) -> u64 {
        self.backing.bytes().len() as u64
    }

    /// Whether the file is empty (never true for a parsed file).
    pub fn is_empty(&self) -> bool {
        self.backing.bytes().is_empty()
    }

    /// The alignment of tensor data (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset where the tensor data section starts.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    /// The value of a metadata key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        let &i = self.key_index.get(key)?;
        self.metadata.get(i).map(|(_, v)| v)
    }

    fn require(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            file: self.label(),
            key: key.to_string(),
        })
    }

    fn wrong_type(&self, key: &str, expected: &'static str, v: &GgufValue) -> GgufError {
        GgufError::WrongType {
            file: self.label(),
            key: key.to_string(),
            expected,
            found: v.describe(),
        }
    }

    fn out_of_range(&self, key: &str, expected: &'static str, v: &GgufValue) -> GgufError {
        GgufError::OutOfRange {
            file: self.label(),
            key: key.to_string(),
            value: v.to_string(),
            expected,
        }
    }

    fn get_unsigned(
        &self,
        key: &str,
        expected: &'static str,
    ) -> Result<(u64, &GgufValue), GgufError> {
        let v = self.require(key)?;
        match v.as_u64() {
            Some(n) => Ok((n, v)),
            None if v.as_i64().is_some() => Err(self.out_of_range(key, expected, v)),
            None => Err(self.wrong_type(key, "an integer", v)),
        }
    }

    /// An integer key (any integer type) whose value fits `u32`.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        let (n, v) = self.get_unsigned(key, "u32")?;
        u32::try_from(n).map_err(|_| self.out_of_range(key, "u32", v))
    }

    /// An integer key (any integer type) whose value fits `u64`.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get_unsigned(key, "u64").map(|(n, _)| n)
    }

    /// A float key (`f32`, or `f64` converted).
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let v = self.require(key)?;
        match *v {
            GgufValue::F32(x) => Ok(x),
            GgufValue::F64(x) => Ok(x as f32),
            _ => Err(self.wrong_type(key, "a float", v)),
        }
    }

    /// A boolean key.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| self.wrong_type(key, "a bool", v))
    }

    /// A string key.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str()
            .ok_or_else(|| self.wrong_type(key, "a string", v))
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let v = self.require(key)?;
        let arr = v
            .as_array()
            .ok_or_else(|| self.wrong_type(key, "an array of strings", v))?;
        arr.iter()
            .map(|e| {
                e.as_str()
                    .ok_or_else(|| self.wrong_type(key, "an array of strings", v))
            })
            .collect()
    }

    /// An array of integers (any integer type) whose values fit `i32`.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        let v = self.require(key)?;
        let arr = v
            .as_array()
            .ok_or_else(|| self.wrong_type(key, "an array of integers", v))?;
        arr.iter()
            .map(|e| match e.as_i64() {
                Some(n) => i32::try_from(n).map_err(|_| self.out_of_range(key, "i32", e)),
                None if matches!(e, GgufValue::U64(_)) => Err(self.out_of_range(key, "i32", e)),
                None => Err(self.wrong_type(key, "an array of integers", v)),
            })
            .collect()
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of a tensor by name.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        let &i = self.tensor_index.get(name)?;
        self.tensors.get(i)
    }

    /// The stored bytes of a tensor of this file. Bounds were validated at open; an info that does
    /// not come from this file and does not fit it yields an empty slice.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let bytes = self.backing.bytes();
        let Some(end) = info.offset.checked_add(info.n_bytes) else {
            return &[];
        };
        match (usize::try_from(info.offset), usize::try_from(end)) {
            (Ok(s), Ok(e)) => bytes.get(s..e).unwrap_or(&[]),
            _ => &[],
        }
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.backing.bytes()
    }
}

struct Parsed {
    version: u32,
    alignment: u64,
    data_start: u64,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<TensorInfo>,
}

/// A cursor over the file bytes that turns every short read into [`GgufError::Truncated`].
struct Parser<'a> {
    buf: &'a [u8],
    pos: usize,
    file: &'a str,
    /// Array elements that may still be allocated (see [`MAX_METADATA_VALUES`]).
    value_budget: u64,
}

/// Value type ids of GGUF metadata.
mod vt {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// Smallest encoded size of one value of a type, `None` for unknown types.
fn min_value_size(type_id: u32) -> Option<u64> {
    Some(match type_id {
        vt::U8 | vt::I8 | vt::BOOL => 1,
        vt::U16 | vt::I16 => 2,
        vt::U32 | vt::I32 | vt::F32 => 4,
        vt::U64 | vt::I64 | vt::F64 | vt::STRING => 8,
        vt::ARRAY => 12,
        _ => return None,
    })
}

impl<'a> Parser<'a> {
    fn new(buf: &'a [u8], file: &'a str) -> Self {
        Self {
            buf,
            pos: 0,
            file,
            value_budget: MAX_METADATA_VALUES,
        }
    }

    fn remaining(&self) -> u64 {
        (self.buf.len().saturating_sub(self.pos)) as u64
    }

    fn truncated(&self, what: String, needed: u64) -> GgufError {
        GgufError::Truncated {
            file: self.file.to_string(),
            what,
            offset: self.pos as u64,
            needed,
            available: self.remaining(),
        }
    }

    fn too_large(&self, what: String, count: u64, limit: u64) -> GgufError {
        GgufError::CountTooLarge {
            file: self.file.to_string(),
            what,
            offset: self.pos as u64,
            count,
            limit,
        }
    }

    /// Takes `n` bytes; `what` describes them for the error (built only on failure).
    fn take(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.truncated(what(), n));
        }
        // n <= remaining <= usize::MAX, and pos + n <= len.
        let n = n as usize;
        let out = self.buf.get(self.pos..self.pos + n).unwrap_or(&[]);
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(
        &mut self,
        what: impl FnOnce() -> String,
    ) -> Result<[u8; N], GgufError> {
        let b = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, GgufError> {
        self.array::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, GgufError> {
        self.array::<8>(what).map(u64::from_le_bytes)
    }

    /// A length-prefixed UTF-8 string.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(|| format!("length of {}", what()))?;
        if len > MAX_STRING_LEN {
            return Err(self.too_large(format!("length of {}", what()), len, MAX_STRING_LEN));
        }
        let start = self.pos as u64;
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(GgufError::InvalidUtf8 {
                file: self.file.to_string(),
                what: what(),
                offset: start,
            }),
        }
    }

    fn parse(mut self) -> Result<Parsed, GgufError> {
        let magic = self.array::<4>(|| "magic bytes".to_string())?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic {
                file: self.file.to_string(),
                found: magic,
            });
        }
        let version = self.u32(|| "version".to_string())?;
        if version != 2 && version != 3 {
            let hint = if version == 1 {
                "version 1 files are obsolete; convert them again with a current llama.cpp"
            } else if matches!(version.swap_bytes(), 2 | 3) {
                "this looks like a big-endian file; only little-endian GGUF is supported"
            } else {
                "only versions 2 and 3 are supported"
            };
            return Err(GgufError::UnsupportedVersion {
                file: self.file.to_string(),
                version,
                hint,
            });
        }
        let tensor_count = self.u64(|| "tensor count".to_string())?;
        if tensor_count > MAX_TENSORS {
            return Err(self.too_large("tensor count".into(), tensor_count, MAX_TENSORS));
        }
        let kv_count = self.u64(|| "metadata key/value count".to_string())?;
        if kv_count > MAX_KV {
            return Err(self.too_large("metadata key/value count".into(), kv_count, MAX_KV));
        }
        // Each key/value needs at least 8 (key length) + 4 (type) + 1 bytes, each tensor info at
        // least 8 (name length) + 4 (n_dims) + 8 (one dim) + 4 (type) + 8 (offset) bytes.
        let min_needed = kv_count * 13 + tensor_count * 32;
        if min_needed > self.remaining() {
            return Err(self.truncated(
                format!("{kv_count} metadata entries and {tensor_count} tensor infos"),
                min_needed,
            ));
        }

        let mut metadata = Vec::with_capacity(kv_count as usize);
        let mut seen_keys: HashMap<String, ()> = HashMap::with_capacity(kv_count as usize);
        for i in 0..kv_count {
            let key = self.string(&|| format!("key of metadata entry {i}"))?;
            if key.len() > u16::MAX as usize {
                return Err(self.too_large(
                    format!("length of key of metadata entry {i}"),
                    key.len() as u64,
                    u16::MAX.into(),
                ));
            }
            if seen_keys.insert(key.clone(), ()).is_some() {
                return Err(GgufError::DuplicateKey {
                    file: self.file.to_string(),
                    key,
                });
            }
            let type_id = self.u32(|| format!("value type of metadata key {key:?}"))?;
            let value = self.value(type_id, &key, 0)?;
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a != 0 && a.is_power_of_two() && a <= u32::MAX as u64 => a,
                Some(a) => {
                    return Err(GgufError::BadAlignment {
                        file: self.file.to_string(),
                        alignment: a,
                    });
                }
                None => {
                    return Err(GgufError::WrongType {
                        file: self.file.to_string(),
                        key: "general.alignment".to_string(),
                        expected: "an unsigned integer",
                        found: v.describe(),
                    });
                }
            },
        };

        let mut tensors = Vec::with_capacity(tensor_count as usize);
        let mut seen_tensors: HashMap<String, ()> = HashMap::with_capacity(tensor_count as usize);
        let mut relative_offsets = Vec::with_capacity(tensor_count as usize);
        for i in 0..tensor_count {
            let name = self.string(&|| format!("name of tensor {i}"))?;
            if seen_tensors.insert(name.clone(), ()).is_some() {
                return Err(GgufError::DuplicateTensor {
                    file: self.file.to_string(),
                    name,
                });
            }
            let info = self.tensor_info(name)?;
            relative_offsets.push(info.1);
            tensors.push(info.0);
        }

        let data_start =
            align_up(self.pos as u64, alignment).ok_or_else(|| GgufError::TensorOutOfBounds {
                file: self.file.to_string(),
                tensor: "(data section)".to_string(),
                offset: self.pos as u64,
                size: 0,
                file_len: self.buf.len() as u64,
            })?;
        let file_len = self.buf.len() as u64;
        for (t, &rel) in tensors.iter_mut().zip(&relative_offsets) {
            if !rel.is_multiple_of(alignment) {
                return Err(GgufError::MisalignedTensor {
                    file: self.file.to_string(),
                    tensor: t.name.clone(),
                    offset: rel,
                    alignment,
                });
            }
            let abs = data_start.checked_add(rel);
            let end = abs.and_then(|a| a.checked_add(t.n_bytes));
            match (abs, end) {
                (Some(abs), Some(end)) if end <= file_len => t.offset = abs,
                _ => {
                    return Err(GgufError::TensorOutOfBounds {
                        file: self.file.to_string(),
                        tensor: t.name.clone(),
                        offset: abs.unwrap_or(u64::MAX),
                        size: t.n_bytes,
                        file_len,
                    });
                }
            }
        }
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&i| tensors.get(i).map_or(0, |t| t.offset));
        for pair in order.windows(2) {
            if let (Some(a), Some(b)) = (tensors.get(pair[0]), tensors.get(pair[1]))
                && a.offset + a.n_bytes > b.offset
            {
                return Err(GgufError::TensorOverlap {
                    file: self.file.to_string(),
                    first: a.name.clone(),
                    first_start: a.offset,
                    first_end: a.offset + a.n_bytes,
                    second: b.name.clone(),
                    second_start: b.offset,
                });
            }
        }

        Ok(Parsed {
            version,
            alignment,
            data_start,
            metadata,
            tensors,
        })
    }

    /// Reads one tensor info after its name; returns it with its offset relative to the data
    /// section (the absolute offset is filled in later).
    fn tensor_info(&mut self, name: String) -> Result<(TensorInfo, u64), GgufError> {
        let n_dims = self.u32(|| format!("dimension count of tensor {name:?}"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::BadDimCount {
                file: self.file.to_string(),
                tensor: name,
                n_dims,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(self.u64(|| format!("dimension {d} of tensor {name:?}"))?);
        }
        let type_id = self.u32(|| format!("type of tensor {name:?}"))?;
        let rel = self.u64(|| format!("data offset of tensor {name:?}"))?;

        if dims.contains(&0) {
            return Err(GgufError::ZeroDim {
                file: self.file.to_string(),
                tensor: name,
                dims,
            });
        }
        let n_elements = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64);
        let Some(_) = n_elements else {
            return Err(GgufError::ElementCountOverflow {
                file: self.file.to_string(),
                tensor: name,
                dims,
            });
        };
        let Some(dtype) = TensorType::from_ggml_id(type_id) else {
            return Err(GgufError::UnknownTensorType {
                file: self.file.to_string(),
                tensor: name,
                type_id,
            });
        };
        let row_len = dims[0];
        let Some(row_bytes) = dtype.row_bytes(row_len) else {
            return Err(GgufError::RowNotBlockMultiple {
                file: self.file.to_string(),
                tensor: name,
                dtype,
                row_len,
                block_size: dtype.block_size(),
            });
        };
        let n_bytes = dims[1..]
            .iter()
            .try_fold(row_bytes, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64);
        let Some(n_bytes) = n_bytes else {
            return Err(GgufError::ElementCountOverflow {
                file: self.file.to_string(),
                tensor: name,
                dims,
            });
        };
        Ok((
            TensorInfo {
                name,
                dims,
                dtype,
                offset: 0,
                n_bytes,
            },
            rel,
        ))
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<GgufValue, GgufError> {
        let what = || format!("value of metadata key {key:?}");
        Ok(match type_id {
            vt::U8 => GgufValue::U8(self.array::<1>(what)?[0]),
            vt::I8 => GgufValue::I8(i8::from_le_bytes(self.array::<1>(what)?)),
            vt::U16 => GgufValue::U16(u16::from_le_bytes(self.array::<2>(what)?)),
            vt::I16 => GgufValue::I16(i16::from_le_bytes(self.array::<2>(what)?)),
            vt::U32 => GgufValue::U32(u32::from_le_bytes(self.array::<4>(what)?)),
            vt::I32 => GgufValue::I32(i32::from_le_bytes(self.array::<4>(what)?)),
            vt::U64 => GgufValue::U64(u64::from_le_bytes(self.array::<8>(what)?)),
            vt::I64 => GgufValue::I64(i64::from_le_bytes(self.array::<8>(what)?)),
            vt::F32 => GgufValue::F32(f32::from_le_bytes(self.array::<4>(what)?)),
            vt::F64 => GgufValue::F64(f64::from_le_bytes(self.array::<8>(what)?)),
            vt::BOOL => {
                let b = self.array::<1>(what)?[0];
                match b {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    value => {
                        return Err(GgufError::InvalidBool {
                            file: self.file.to_string(),
                            key: key.to_string(),
                            value,
                        });
                    }
                }
            }
            vt::STRING => GgufValue::String(self.string(&what)?),
            vt::ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::ArrayTooDeep {
                        file: self.file.to_string(),
                        key: key.to_string(),
                        max: MAX_ARRAY_DEPTH,
                    });
                }
                let elem_type = self.u32(|| format!("element type of array {key:?}"))?;
                let Some(min_size) = min_value_size(elem_type) else {
                    return Err(GgufError::UnknownValueType {
                        file: self.file.to_string(),
                        key: key.to_string(),
                        type_id: elem_type,
                    });
                };
                let len = self.u64(|| format!("length of array {key:?}"))?;
                if len > MAX_ARRAY_LEN {
                    return Err(self.too_large(
                        format!("length of array {key:?}"),
                        len,
                        MAX_ARRAY_LEN,
                    ));
                }
                if len > self.value_budget {
                    return Err(self.too_large(
                        format!("length of array {key:?} (with the arrays before it)"),
                        len,
                        self.value_budget,
                    ));
                }
                // len <= 2^24 and min_size <= 12: no overflow.
                if len * min_size > self.remaining() {
                    return Err(
                        self.truncated(format!("array {key:?} of {len} elements"), len * min_size)
                    );
                }
                self.value_budget -= len;
                let mut items = Vec::with_capacity(len as usize);
                if elem_type == vt::STRING {
                    for j in 0..len {
                        items.push(GgufValue::String(
                            self.string(&|| format!("element {j} of array {key:?}"))?,
                        ));
                    }
                } else {
                    for _ in 0..len {
                        items.push(self.value(elem_type, key, depth + 1)?);
                    }
                }
                GgufValue::Array(items)
            }
            other => {
                return Err(GgufError::UnknownValueType {
                    file: self.file.to_string(),
                    key: key.to_string(),
                    type_id: other,
                });
            }
        })
    }
}

fn align_up(x: u64, alignment: u64) -> Option<u64> {
    let rem = x % alignment;
    if rem == 0 {
        Some(x)
    } else {
        x.checked_add(alignment - rem)
    }
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

/// Writes GGUF v3 files (little-endian). Used by tests to build small models, and by tools.
///
/// The writer does not validate: tensor data is written as given, so it can also build files that
/// [`GgufFile`] rejects. Tensor data is laid out in insertion order at the alignment given by a
/// `general.alignment` metadata entry (default 32).
#[derive(Debug, Clone, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<(String, Vec<u64>, TensorType, Vec<u8>)>,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata entry.
    pub fn metadata(&mut self, key: &str, value: GgufValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds a tensor with dims in GGML order (`dims[0]` = row length) and its stored bytes.
    pub fn tensor(
        &mut self,
        name: &str,
        dims: &[u64],
        dtype: TensorType,
        data: Vec<u8>,
    ) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), dtype, data));
        self
    }

    fn alignment(&self) -> u64 {
        self.metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .filter(|a| a.is_power_of_two())
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// The encoded file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            write_str(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            write_value(&mut out, v);
        }
        let alignment = self.alignment();
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for (name, dims, dtype, data) in &self.tensors {
            write_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&dtype.ggml_id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = align_up(offset + data.len() as u64, alignment).unwrap_or(u64::MAX);
        }
        let data_start = align_up(out.len() as u64, alignment).unwrap_or(u64::MAX);
        out.resize(data_start as usize, 0);
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize((data_start + off) as usize, 0);
            out.extend_from_slice(data);
        }
        out
    }

    /// Writes the file to `path`.
    pub fn write_to(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_bytes())
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => write_str(out, s),
        GgufValue::Array(items) => {
            let elem = items.first().map_or(vt::U8, GgufValue::type_id);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, item);
            }
        }
    }
}

pub use retrowave_core::quant::{DequantError, dequantize_row};

/// Path of a real model in the cache, for tests (`$RETROWAVE_HOME/models/<name>.gguf`).
#[cfg(test)]
pub(crate) fn test_model_path(name: &str) -> PathBuf {
    crate::registry::ensure_model(name).unwrap_or_else(|e| panic!("cannot get model {name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_file() -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.metadata("general.architecture", GgufValue::String("llama".into()))
            .metadata("a.u8", GgufValue::U8(7))
            .metadata("a.i32", GgufValue::I32(-3))
            .metadata("a.u64", GgufValue::U64(1 << 40))
            .metadata("a.f64", GgufValue::F64(0.5))
            .metadata("a.flag", GgufValue::Bool(true))
            .metadata(
                "a.strs",
                GgufValue::Array(vec![
                    GgufValue::String("x".into()),
                    GgufValue::String("yz".into()),
                ]),
            )
            .metadata(
                "a.ints",
                GgufValue::Array(vec![GgufValue::U8(1), GgufValue::U8(200)]),
            )
            .metadata(
                "a.nested",
                GgufValue::Array(vec![GgufValue::Array(vec![GgufValue::I16(-1)])]),
            )
            .tensor(
                "v",
                &[4],
                TensorType::F32,
                [1.0f32, 2.0, 3.0, -4.0]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            )
            .tensor("m", &[32, 2], TensorType::Q8_0, vec![0u8; 68]);
        w.to_bytes()
    }

    #[test]
    fn round_trip_and_getters() {
        let g = GgufFile::from_bytes(small_file()).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.architecture().unwrap(), "llama");
        assert_eq!(g.get_u32("a.u8").unwrap(), 7);
        assert_eq!(g.get_u64("a.u64").unwrap(), 1 << 40);
        assert!(matches!(
            g.get_u32("a.u64"),
            Err(GgufError::OutOfRange { .. })
        ));
        assert!(matches!(
            g.get_u32("a.i32"),
            Err(GgufError::OutOfRange { .. })
        ));
        assert_eq!(g.get_f32("a.f64").unwrap(), 0.5);
        assert!(g.get_bool("a.flag").unwrap());
        assert_eq!(g.get_str_array("a.strs").unwrap(), vec!["x", "yz"]);
        assert_eq!(g.get_i32_array("a.ints").unwrap(), vec![1, 200]);
        assert_eq!(
            g.get("a.nested").unwrap().as_array().unwrap()[0].describe(),
            "array of i16"
        );
        let e = g.get_str("a.u8").unwrap_err();
        assert!(
            matches!(&e, GgufError::WrongType { key, expected: "a string", found, .. } if key == "a.u8" && found == "u8")
        );
        assert!(matches!(
            g.get_str("nope"),
            Err(GgufError::MissingKey { .. })
        ));
        assert!(matches!(
            g.get_str_array("a.ints"),
            Err(GgufError::WrongType { .. })
        ));
        assert_eq!(g.metadata()[1].0, "a.u8");

        let v = g.tensor_info("v").unwrap();
        assert_eq!(
            (v.offset % 32, v.n_bytes, v.rows(), v.cols()),
            (0, 16, 1, 4)
        );
        let mut out = [0f32; 4];
        dequantize_row(v.dtype, g.tensor_data(v), &mut out).unwrap();
        assert_eq!(out, [1.0, 2.0, 3.0, -4.0]);
        let m = g.tensor_info("m").unwrap();
        assert_eq!((m.rows(), m.cols(), m.n_bytes), (2, 32, 68));
        assert!(m.offset >= v.offset + 32);
    }

    #[test]
    fn dequantize_checks_lengths_and_handles_misaligned_input() {
        let mut out = [0f32; 32];
        assert!(matches!(
            dequantize_row(TensorType::Q8_0, &[0u8; 33], &mut out),
            Err(DequantError::WrongLength {
                expected: 34,
                found: 33,
                ..
            })
        ));
        let mut out31 = [0f32; 31];
        assert!(matches!(
            dequantize_row(TensorType::Q8_0, &[0u8; 34], &mut out31),
            Err(DequantError::PartialBlock { n: 31, .. })
        ));
        // Q8_0 block: f16 scale 0.5 then 32 int8 values; decode from an odd address too.
        let mut block = [0u8; 35];
        block[1..3].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        for i in 0..32 {
            block[3 + i] = (i as i8 - 16) as u8;
        }
        for start in [0usize, 1] {
            let mut buf = [0u8; 36];
            buf[start..start + 34].copy_from_slice(&block[1..35]);
            dequantize_row(TensorType::Q8_0, &buf[start..start + 34], &mut out).unwrap();
            for (i, &x) in out.iter().enumerate() {
                assert_eq!(x, (i as f32 - 16.0) * 0.5);
            }
        }
    }

    /// Rows of the real models against `tests/fixtures/dequant_reference.json`, written by the
    /// `gguf` Python package (an independent implementation; see the script next to it).
    #[test]
    fn dequantize_matches_python_gguf_reference_on_real_rows() {
        use sha2::Digest;
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dequant_reference.json");
        let fixture: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let rows = fixture["rows"].as_array().unwrap();
        let mut files: HashMap<String, GgufFile> = HashMap::new();
        let mut types_seen = std::collections::BTreeSet::new();
        for r in rows {
            let model = r["model"].as_str().unwrap();
            let g = files
                .entry(model.to_string())
                .or_insert_with(|| GgufFile::open(&test_model_path(model)).unwrap());
            let info = g.tensor_info(r["tensor"].as_str().unwrap()).unwrap();
            assert_eq!(info.dtype.name(), r["type"].as_str().unwrap());
            types_seen.insert(info.dtype.name());
            let n = r["n"].as_u64().unwrap() as usize;
            assert_eq!(info.cols(), n as u64);
            let row = r["row"].as_u64().unwrap() as usize;
            let rb = info.dtype.row_bytes(n as u64).unwrap() as usize;
            let bytes = &g.tensor_data(info)[row * rb..(row + 1) * rb];
            let mut out = vec![0f32; n];
            dequantize_row(info.dtype, bytes, &mut out).unwrap();
            let what = format!("{model} {} row {row}", info.name);
            for (i, (got, want)) in out.iter().zip(r["first"].as_array().unwrap()).enumerate() {
                let want = want.as_f64().unwrap();
                let tol = 1e-6 * want.abs().max(f64::from(got.abs()));
                assert!(
                    (f64::from(*got) - want).abs() <= tol,
                    "{what}[{i}]: {got} vs {want}"
                );
            }
            let sum: f64 = out.iter().map(|&x| f64::from(x)).sum();
            let sum_abs: f64 = out.iter().map(|&x| f64::from(x).abs()).sum();
            let want_sum_abs = r["sum_abs"].as_f64().unwrap();
            assert!(
                (sum_abs - want_sum_abs).abs() <= 1e-6 * want_sum_abs,
                "{what}: sum_abs {sum_abs} vs {want_sum_abs}"
            );
            assert!(
                (sum - r["sum"].as_f64().unwrap()).abs() <= 1e-6 * want_sum_abs,
                "{what}: sum {sum}"
            );
            let le: Vec<u8> = out.iter().flat_map(|x| x.to_le_bytes()).collect();
            let hash: String = sha2::Sha256::digest(&le)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            // Same f32 operations as GGML: the whole row is bit-identical to the reference.
            assert_eq!(
                hash,
                r["sha256_f32le"].as_str().unwrap(),
                "{what}: whole-row hash"
            );
        }
        assert_eq!(
            types_seen.into_iter().collect::<Vec<_>>(),
            ["F32", "Q4_1", "Q4_K", "Q5_0", "Q6_K", "Q8_0"]
        );
    }
}
