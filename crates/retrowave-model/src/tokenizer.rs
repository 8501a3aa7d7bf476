//! The tokenizer: byte-level BPE vocabularies read from GGUF metadata or from a Hugging Face
//! `tokenizer.json`, encoded and decoded the way llama.cpp does it.
//!
//! The BPE itself is the `tokenizers` crate. This module builds it from the GGUF keys
//! (`tokenizer.ggml.model`, `.tokens`, `.merges`, `.token_type`, `.pre`, the special token ids and
//! the `add_bos_token` / `add_eos_token` flags) and adds what llama.cpp adds on top:
//!
//! * the pre-tokenizer regexes of llama.cpp's `llm_tokenizer_bpe`, chosen by `tokenizer.ggml.pre`
//!   (`smollm`, `qwen2`, `llama-bpe`/`llama3`, `gpt-2`/`gpt2`, `default`; unknown names are an
//!   error), applied one after the other as isolated splits, then the GPT-2 byte mapping;
//! * control, unknown and user-defined tokens as added tokens. With `parse_special = true` the
//!   text `<|im_start|>` becomes that one token; with `parse_special = false` control tokens are
//!   plain text while user-defined tokens are still matched, as in llama.cpp;
//! * end-of-generation ids: `eos`, `eot`, `eom` and the tokens llama.cpp recognises by their text
//!   (`<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, FIM pad/repo/file-separator tokens, ...),
//!   which, as in llama.cpp, are then treated as control tokens. llama.cpp's list also has `</s>`
//!   (a PaddleOCR workaround); Qwen's vocabulary has `</s>` as an ordinary token, so that entry
//!   would stop generation at an HTML strike-through tag and is left out. It is the one known
//!   difference from llama.cpp: with `parse_special`, Qwen text containing `</s>` tokenizes as
//!   text here;
//! * exact decoding: every token maps to its raw bytes (byte-level decoded for ordinary tokens,
//!   the literal text for control and user-defined ones), so `decode(encode(s)) == s` for any text
//!   whose bytes the vocabulary can spell.
//!
//! A vocabulary that lacks some byte (SmolLM2 has no token for the bytes 0x04, 0x06, 0x13, 0x14,
//! 0x16, 0x1D, 0xF1, 0xF2 among others) drops that byte when encoding, as llama.cpp does (the
//! dropped byte still keeps its neighbours from merging); [`Tokenizer::can_encode_byte`] tells
//! which bytes are affected.
//!
//! Checked against llama.cpp itself (the build that made the golden files) on 26,000 adversarial
//! strings for every pre-tokenizer on both vocabularies; a sample of those is the fixture of the
//! `tokenizer_golden` integration test.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::ModelWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::gguf::{GgufError, GgufFile};

/// GGUF metadata keys read by [`Tokenizer::from_gguf`].
pub mod keys {
    /// Tokenizer family: `"gpt2"` is byte-level BPE (the only one supported).
    pub const MODEL: &str = "tokenizer.ggml.model";
    /// Pre-tokenizer name (llama.cpp's `tokenizer_pre`).
    pub const PRE: &str = "tokenizer.ggml.pre";
    /// Token strings, indexed by id.
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    /// BPE merges, `"left right"`, in rank order.
    pub const MERGES: &str = "tokenizer.ggml.merges";
    /// Token types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    /// Beginning-of-sequence id.
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    /// End-of-sequence id.
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    /// End-of-turn id.
    pub const EOT_ID: &str = "tokenizer.ggml.eot_token_id";
    /// End-of-message id.
    pub const EOM_ID: &str = "tokenizer.ggml.eom_token_id";
    /// Unknown-token id.
    pub const UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
    /// Padding id.
    pub const PAD_ID: &str = "tokenizer.ggml.padding_token_id";
    /// Whether encoding with special tokens prepends BOS.
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    /// Whether encoding with special tokens appends EOS.
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    /// Jinja chat template.
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}

/// Errors building or using a [`Tokenizer`].
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The GGUF metadata could not be read (missing key, wrong type).
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A tokenizer family other than byte-level BPE.
    #[error(
        "{origin}: tokenizer model {model:?} is not supported; only byte-level BPE (GGUF \
         tokenizer.ggml.model = \"gpt2\") is"
    )]
    UnsupportedModel {
        /// Where the tokenizer came from (file path).
        origin: String,
        /// The tokenizer family found.
        model: String,
    },
    /// A pre-tokenizer name this module has no regexes for.
    #[error(
        "{origin}: pre-tokenizer {pre:?} (tokenizer.ggml.pre) is not supported; supported: {}",
        PreTokenizer::SUPPORTED_NAMES.join(", ")
    )]
    UnsupportedPreTokenizer {
        /// Where the tokenizer came from (file path).
        origin: String,
        /// The pre-tokenizer name found.
        pre: String,
    },
    /// Tokenizer data that contradicts itself (duplicate tokens, array lengths, ids).
    #[error("{origin}: invalid tokenizer data: {detail}")]
    Invalid {
        /// Where the tokenizer came from (file path).
        origin: String,
        /// What is wrong.
        detail: String,
    },
    /// A file of a Hugging Face tokenizer folder could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file of a Hugging Face tokenizer folder could not be parsed.
    #[error("{}: cannot parse: {detail}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        detail: String,
    },
    /// The `tokenizers` crate refused to build the tokenizer.
    #[error("{origin}: cannot build the tokenizer: {detail}")]
    Build {
        /// Where the tokenizer came from (file path).
        origin: String,
        /// What the `tokenizers` crate said.
        detail: String,
    },
    /// Encoding failed inside the `tokenizers` crate.
    #[error("encoding {chars} characters of text failed: {detail}")]
    Encode {
        /// Length of the text.
        chars: usize,
        /// What the `tokenizers` crate said.
        detail: String,
    },
    /// A token id that is not in the vocabulary.
    #[error("token id {id} is not in the vocabulary (size {vocab_size})")]
    UnknownTokenId {
        /// The id.
        id: u32,
        /// Number of ids in the vocabulary.
        vocab_size: usize,
    },
    /// Serialising the tokenizer to JSON failed.
    #[error("cannot serialise the tokenizer to JSON: {0}")]
    Serialize(String),
}

/// What kind of vocabulary entry a token is (GGUF `tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// 1: an ordinary BPE token (byte-level encoded text).
    Normal,
    /// 2: the unknown token.
    Unknown,
    /// 3: a control token such as `<|im_start|>`; plain text unless `parse_special`.
    Control,
    /// 4: a user-defined token, always matched as a whole in input text.
    UserDefined,
    /// 5: an unused slot (padding of the embedding matrix).
    Unused,
    /// 6: a byte token (`<0x0A>`).
    Byte,
    /// 0 or any other number.
    Undefined,
}

impl TokenKind {
    /// The kind for a GGUF token type number.
    pub fn from_gguf(value: i32) -> Self {
        match value {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }

    /// Whether the token's text is literal (not byte-level encoded) and is matched in input as a
    /// whole (with `parse_special` for control and unknown tokens).
    fn is_added(self) -> bool {
        matches!(self, Self::Control | Self::UserDefined | Self::Unknown)
    }
}

/// The pre-tokenizer families (regex splits before BPE), named as llama.cpp names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PreTokenizer {
    /// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_DEFAULT` (`default`, or no `tokenizer.ggml.pre`).
    Default,
    /// GPT-2 (`gpt-2`, `gpt2`).
    Gpt2,
    /// Llama 3 (`llama3`, `llama-bpe`, `llama-v3`); ignores merges for whole-word tokens.
    Llama3,
    /// Qwen2 (`qwen2`, `deepseek-r1-qwen`): single digits, Llama-3-like words.
    Qwen2,
    /// StarCoder / SmolLM (`smollm`, `starcoder`): single digits, then GPT-2.
    Smollm,
}

/// llama.cpp's GPT-2 regex (its custom splitter also ends with `|\s+`, which the isolated split
/// reproduces: a lone whitespace character before a non-space becomes its own piece either way).
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// llama.cpp's adapted Llama 3 regex (case-insensitive contractions spelled out).
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's adapted Qwen2 regex (Llama 3 with single digits).
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl PreTokenizer {
    /// Every `tokenizer.ggml.pre` value accepted.
    pub const SUPPORTED_NAMES: &'static [&'static str] = &[
        "default",
        "gpt-2",
        "gpt2",
        "llama3",
        "llama-bpe",
        "llama-v3",
        "qwen2",
        "deepseek-r1-qwen",
        "smollm",
        "starcoder",
    ];

    /// The pre-tokenizer for a `tokenizer.ggml.pre` value, `None` if unknown.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "default" => Self::Default,
            "gpt-2" | "gpt2" => Self::Gpt2,
            "llama3" | "llama-bpe" | "llama-v3" => Self::Llama3,
            "qwen2" | "deepseek-r1-qwen" => Self::Qwen2,
            "smollm" | "starcoder" => Self::Smollm,
            _ => return None,
        })
    }

    /// The regexes applied in order (each splits every piece the previous ones left, keeping
    /// both matches and the text between them), exactly as llama.cpp lists them.
    pub fn regexes(self) -> &'static [&'static str] {
        match self {
            Self::Default => &[
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_REGEX,
                r"\p{N}+",
                "[0-9][0-9][0-9]",
            ],
            Self::Gpt2 => &[GPT2_REGEX],
            Self::Llama3 => &[LLAMA3_REGEX],
            Self::Qwen2 => &[QWEN2_REGEX],
            Self::Smollm => &[r"\p{N}", GPT2_REGEX],
        }
    }

    /// Whether a pre-tokenized word that is itself a token skips the merges (llama.cpp's
    /// `ignore_merges`).
    fn ignore_merges(self) -> bool {
        self == Self::Llama3
    }

    /// llama.cpp's default for `add_bos` when the GGUF file does not say.
    fn default_add_bos(self) -> bool {
        self == Self::Llama3
    }
}

/// Vocabulary string of the internal unknown-character marker (a noncharacter, so it cannot
/// collide with a real token).
const UNK_MARKER: &str = "\u{FFFF}retrowave:unknown-byte\u{FFFF}";

/// Token texts llama.cpp treats as end of generation (besides the eos/eot/eom ids).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    // FIM padding, repository and file separators (llama.cpp adds them to the EOG set).
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<reponame>",
    "<|file_sep|>",
];

/// The GPT-2 byte-to-character table: printable Latin-1 bytes map to themselves, the other 68
/// bytes to U+0100.. in byte order.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            b as u32
        } else {
            let c = next;
            next += 1;
            c
        };
        *slot = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    table
}

/// The byte a GPT-2 byte-level character stands for.
fn char_to_byte(c: char, table: &HashMap<char, u8>) -> Option<u8> {
    table.get(&c).copied()
}

/// Decode a byte-level encoded token (`Ġthe` -> ` the`). Characters outside the byte alphabet
/// are kept as their UTF-8 bytes.
fn byte_level_decode(text: &str, table: &HashMap<char, u8>, out: &mut Vec<u8>) {
    for c in text.chars() {
        match char_to_byte(c, table) {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

/// Parse `<0xAB>` byte-token text.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Per-token lookup tables: vocabulary strings, decoded bytes, and which bytes have a token.
#[derive(Clone)]
struct TokenTables {
    texts: String,
    text_offsets: Vec<usize>,
    bytes: Vec<u8>,
    byte_offsets: Vec<usize>,
    encodable_bytes: [bool; 256],
}

impl TokenTables {
    /// Build the tables from `(vocabulary string, kind)` in id order.
    fn build<'a>(tokens: impl ExactSizeIterator<Item = (&'a str, TokenKind)>) -> Self {
        let byte_chars = byte_to_char_table();
        let char_bytes: HashMap<char, u8> =
            (0u8..=255).map(|b| (byte_chars[b as usize], b)).collect();
        let n = tokens.len();
        let mut t = Self {
            texts: String::new(),
            text_offsets: Vec::with_capacity(n + 1),
            bytes: Vec::new(),
            byte_offsets: Vec::with_capacity(n + 1),
            encodable_bytes: [false; 256],
        };
        t.text_offsets.push(0);
        t.byte_offsets.push(0);
        for (text, kind) in tokens {
            t.texts.push_str(text);
            t.text_offsets.push(t.texts.len());
            match kind {
                k if k.is_added() => t.bytes.extend_from_slice(text.as_bytes()),
                TokenKind::Byte => match parse_byte_token(text) {
                    Some(b) => t.bytes.push(b),
                    None => byte_level_decode(text, &char_bytes, &mut t.bytes),
                },
                _ => byte_level_decode(text, &char_bytes, &mut t.bytes),
            }
            t.byte_offsets.push(t.bytes.len());
            let mut chars = text.chars();
            if let (Some(c), None, false) = (chars.next(), chars.next(), kind.is_added())
                && let Some(b) = char_to_byte(c, &char_bytes)
            {
                t.encodable_bytes[b as usize] = true;
            }
        }
        t
    }
}

/// Everything needed to build a [`Tokenizer`], whatever the source.
struct VocabSpec {
    origin: String,
    tokens: Vec<String>,
    kinds: Vec<TokenKind>,
    merges: Vec<(String, String)>,
    pre: PreTokenizer,
    pre_name: String,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    chat_template: Option<String>,
}

/// A byte-level BPE tokenizer with llama.cpp's conventions. Cheap to share (`Send + Sync`).
#[derive(Clone)]
pub struct Tokenizer {
    origin: String,
    /// Matches control and user-defined tokens in text (`parse_special = true`).
    special: tokenizers::Tokenizer,
    /// Treats control tokens as plain text; still matches user-defined tokens.
    plain: tokenizers::Tokenizer,
    /// Vocabulary strings and decoded bytes of every token.
    tables: TokenTables,
    kinds: Vec<TokenKind>,
    /// Ids absent from a Hugging Face vocabulary with gaps.
    missing: Vec<u32>,
    /// Id of the internal unknown-character marker (see [`UNK_MARKER`]), never returned.
    unk_marker: Option<u32>,
    pre_name: String,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    unk: Option<u32>,
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    chat_template: Option<String>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("origin", &self.origin)
            .field("vocab_size", &self.vocab_size())
            .field("pre", &self.pre_name)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("end_of_generation", &self.eog)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish_non_exhaustive()
    }
}

/// An id from GGUF metadata, ignored (with a warning) when outside the vocabulary.
fn optional_id(g: &GgufFile, key: &str, n_tokens: usize, origin: &str) -> Option<u32> {
    let value = g.get(key)?;
    match value.as_u64() {
        Some(id) if (id as usize) < n_tokens => u32::try_from(id).ok(),
        _ => {
            tracing::warn!(
                "{origin}: {key} = {value:?} is not a token id of the {n_tokens}-token \
                 vocabulary; ignored"
            );
            None
        }
    }
}

/// Split a GGUF merge `"left right"` at the first space after the first character, as llama.cpp
/// does.
fn split_merge(merge: &str) -> Option<(&str, &str)> {
    let first_len = merge.chars().next()?.len_utf8();
    let pos = merge[first_len..].find(' ')? + first_len;
    Some((&merge[..pos], &merge[pos + 1..]))
}

impl Tokenizer {
    /// Build the tokenizer from a GGUF file's `tokenizer.*` metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, TokenizerError> {
        let origin = g
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "GGUF data in memory".to_string());
        let model = g.get_str(keys::MODEL)?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel {
                origin,
                model: model.to_string(),
            });
        }
        let (pre, pre_name) = match g.get(keys::PRE) {
            None => {
                tracing::warn!(
                    "{origin}: no {} key; using llama.cpp's default pre-tokenizer, which may \
                     not match the model's training",
                    keys::PRE
                );
                (PreTokenizer::Default, "default".to_string())
            }
            Some(_) => {
                let name = g.get_str(keys::PRE)?;
                let pre = PreTokenizer::from_name(name).ok_or_else(|| {
                    TokenizerError::UnsupportedPreTokenizer {
                        origin: origin.clone(),
                        pre: name.to_string(),
                    }
                })?;
                (pre, name.to_string())
            }
        };

        let token_strs = g.get_str_array(keys::TOKENS)?;
        let n = token_strs.len();
        let mut tokens = Vec::with_capacity(n);
        for (i, t) in token_strs.iter().enumerate() {
            if t.is_empty() {
                tracing::warn!("{origin}: token {i} is empty; named [EMPTY_{i}] as llama.cpp does");
                tokens.push(format!("[EMPTY_{i}]"));
            } else {
                tokens.push((*t).to_string());
            }
        }
        let kinds: Vec<TokenKind> = match g.get(keys::TOKEN_TYPE) {
            None => vec![TokenKind::Normal; n],
            Some(_) => {
                let types = g.get_i32_array(keys::TOKEN_TYPE)?;
                if types.len() < n {
                    return Err(TokenizerError::Invalid {
                        origin,
                        detail: format!(
                            "{} has {} entries but {} has {n} tokens",
                            keys::TOKEN_TYPE,
                            types.len(),
                            keys::TOKENS
                        ),
                    });
                }
                types
                    .iter()
                    .take(n)
                    .map(|&t| TokenKind::from_gguf(t))
                    .collect()
            }
        };

        let merge_strs = g.get_str_array(keys::MERGES)?;
        let mut merges = Vec::with_capacity(merge_strs.len());
        for (rank, m) in merge_strs.iter().enumerate() {
            match split_merge(m) {
                Some((a, b)) => merges.push((a.to_string(), b.to_string())),
                None => tracing::warn!("{origin}: merge {rank} ({m:?}) has no space; ignored"),
            }
        }

        let add_bos = match g.get(keys::ADD_BOS) {
            Some(_) => g.get_bool(keys::ADD_BOS)?,
            None => pre.default_add_bos(),
        };
        let add_eos = match g.get(keys::ADD_EOS) {
            Some(_) => g.get_bool(keys::ADD_EOS)?,
            None => false,
        };
        let chat_template = match g.get(keys::CHAT_TEMPLATE) {
            Some(_) => Some(g.get_str(keys::CHAT_TEMPLATE)?.to_string()),
            None => None,
        };
        let spec = VocabSpec {
            bos: optional_id(g, keys::BOS_ID, n, &origin),
            eos: optional_id(g, keys::EOS_ID, n, &origin),
            eot: optional_id(g, keys::EOT_ID, n, &origin),
            eom: optional_id(g, keys::EOM_ID, n, &origin),
            unk: optional_id(g, keys::UNK_ID, n, &origin),
            pad: optional_id(g, keys::PAD_ID, n, &origin),
            origin,
            tokens,
            kinds,
            merges,
            pre,
            pre_name,
            add_bos,
            add_eos,
            chat_template,
        };
        Self::from_spec(spec)
    }

    fn from_spec(mut spec: VocabSpec) -> Result<Self, TokenizerError> {
        let origin = spec.origin.clone();
        let invalid = |detail: String| TokenizerError::Invalid {
            origin: origin.clone(),
            detail,
        };
        let build_err = |detail: String| TokenizerError::Build {
            origin: origin.clone(),
            detail,
        };
        let n = spec.tokens.len();
        if n == 0 {
            return Err(invalid("the vocabulary is empty".to_string()));
        }
        let n_u32 =
            u32::try_from(n).map_err(|_| invalid(format!("{n} tokens is more than u32 ids")))?;

        if spec.add_bos && spec.bos.is_none() {
            return Err(invalid(format!(
                "{} is true but there is no {}",
                keys::ADD_BOS,
                keys::BOS_ID
            )));
        }
        if spec.add_eos && spec.eos.is_none() {
            return Err(invalid(format!(
                "{} is true but there is no {}",
                keys::ADD_EOS,
                keys::EOS_ID
            )));
        }

        let mut vocab: ahash::AHashMap<String, u32> = ahash::AHashMap::with_capacity(n);
        for (id, t) in (0..n_u32).zip(&spec.tokens) {
            if let Some(prev) = vocab.insert(t.clone(), id) {
                return Err(invalid(format!(
                    "token {t:?} appears twice (ids {prev} and {id})"
                )));
            }
        }

        // llama.cpp marks tokens it recognises as end-of-generation as control tokens.
        let mut eog: Vec<u32> = Vec::new();
        for text in EOG_TEXTS {
            if let Some(&id) = vocab.get(*text) {
                let idx = id as usize;
                if let Some(kind) = spec.kinds.get_mut(idx)
                    && *kind != TokenKind::Control
                {
                    tracing::warn!(
                        "{origin}: end-of-generation token {id} {text:?} is not a control \
                         token; treating it as one (as llama.cpp does)"
                    );
                    *kind = TokenKind::Control;
                }
                eog.push(id);
            }
        }
        eog.extend([spec.eos, spec.eot, spec.eom].into_iter().flatten());
        eog.sort_unstable();
        eog.dedup();

        // Merges whose parts or result are not tokens can never produce a token; the BPE
        // builder rejects them, so leave them out.
        let n_merges = spec.merges.len();
        let merges: Vec<(String, String)> = std::mem::take(&mut spec.merges)
            .into_iter()
            .filter(|(a, b)| {
                vocab.contains_key(a)
                    && vocab.contains_key(b)
                    && vocab.contains_key(&format!("{a}{b}"))
            })
            .collect();
        if merges.len() != n_merges {
            tracing::warn!(
                "{origin}: {} of {n_merges} merges name strings that are not tokens; ignored",
                n_merges - merges.len()
            );
        }

        // A byte with no token is dropped, but unlike the `tokenizers` crate (which drops it
        // before merging) llama.cpp keeps it as a symbol that blocks merges across it, then
        // drops it. An unknown-token marker, removed from the output, reproduces that.
        let byte_chars = byte_to_char_table();
        let mut unk_marker = None;
        if byte_chars
            .iter()
            .any(|c| !vocab.contains_key(c.to_string().as_str()))
            && !vocab.contains_key(UNK_MARKER)
        {
            vocab.insert(UNK_MARKER.to_string(), n_u32);
            unk_marker = Some(n_u32);
        }
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(spec.pre.ignore_merges());
        if unk_marker.is_some() {
            builder = builder.unk_token(UNK_MARKER.to_string()).fuse_unk(false);
        }
        let bpe = builder.build().map_err(|e| build_err(e.to_string()))?;
        let mut special = tokenizers::Tokenizer::new(bpe);
        let mut pieces: Vec<PreTokenizerWrapper> = Vec::new();
        for re in spec.pre.regexes() {
            let split = Split::new(
                SplitPattern::Regex((*re).to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| build_err(format!("pre-tokenizer regex {re:?}: {e}")))?;
            pieces.push(split.into());
        }
        pieces.push(ByteLevel::new(false, true, false).into());
        special.with_pre_tokenizer(Some(Sequence::new(pieces)));
        special.with_decoder(Some(ByteLevel::default()));

        let mut specials = Vec::new();
        let mut user_defined = Vec::new();
        for (t, kind) in spec.tokens.iter().zip(&spec.kinds) {
            match kind {
                TokenKind::Control | TokenKind::Unknown => {
                    specials.push(AddedToken::from(t.clone(), true).normalized(false));
                }
                TokenKind::UserDefined => {
                    user_defined.push(AddedToken::from(t.clone(), false).normalized(false));
                }
                _ => {}
            }
        }
        special
            .add_special_tokens(specials)
            .map_err(|e| build_err(format!("adding control tokens: {e}")))?;
        special
            .add_tokens(user_defined)
            .map_err(|e| build_err(format!("adding user-defined tokens: {e}")))?;
        let mut plain = special.clone();
        plain.set_encode_special_tokens(true);

        let tables = TokenTables::build(
            spec.tokens
                .iter()
                .map(String::as_str)
                .zip(spec.kinds.iter().copied()),
        );
        let mut tok = Self {
            origin: spec.origin,
            special,
            plain,
            tables,
            kinds: spec.kinds,
            missing: Vec::new(),
            unk_marker,
            pre_name: spec.pre_name,
            bos: spec.bos,
            eos: spec.eos,
            pad: spec.pad,
            unk: spec.unk,
            eog,
            add_bos: spec.add_bos,
            add_eos: spec.add_eos,
            chat_template: spec.chat_template,
        };
        tok.restore_post_processor()?;
        Ok(tok)
    }

    /// Load a Hugging Face tokenizer folder: `tokenizer.json` (byte-level BPE) and, when present,
    /// `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`, `unk_token`,
    /// `add_bos_token`, `add_eos_token`, `chat_template`) and `generation_config.json` (extra
    /// `eos_token_id`s). Without `add_bos_token`, BOS is added when the `tokenizer.json` post
    /// processor adds it. Only byte-level BPE is supported. Encoding follows the `tokenizers`
    /// crate exactly (its normalizer and pre-tokenizer as written in the file); added tokens
    /// marked `special` are the control tokens that `parse_special` governs.
    pub fn from_hf_folder(dir: &Path) -> Result<Self, TokenizerError> {
        let tok_path = dir.join("tokenizer.json");
        let origin = tok_path.display().to_string();
        let json = std::fs::read_to_string(&tok_path).map_err(|source| TokenizerError::Io {
            path: tok_path.clone(),
            source,
        })?;
        let hf: tokenizers::Tokenizer =
            json.parse()
                .map_err(|e: tokenizers::Error| TokenizerError::Parse {
                    path: tok_path.clone(),
                    detail: e.to_string(),
                })?;
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let generation = read_optional_json(&dir.join("generation_config.json"))?;
        Self::from_hf_parts(hf, &origin, config.as_ref(), generation.as_ref())
    }

    fn from_hf_parts(
        hf: tokenizers::Tokenizer,
        origin: &str,
        config: Option<&serde_json::Value>,
        generation: Option<&serde_json::Value>,
    ) -> Result<Self, TokenizerError> {
        let invalid = |detail: String| TokenizerError::Invalid {
            origin: origin.to_string(),
            detail,
        };
        if !matches!(hf.get_model(), ModelWrapper::BPE(_)) {
            return Err(TokenizerError::UnsupportedModel {
                origin: origin.to_string(),
                model: "a non-BPE model in tokenizer.json".to_string(),
            });
        }
        let byte_level = match hf.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) => true,
            Some(DecoderWrapper::Sequence(seq)) => seq
                .get_decoders()
                .iter()
                .any(|d| matches!(d, DecoderWrapper::ByteLevel(_))),
            _ => false,
        };
        if !byte_level {
            return Err(TokenizerError::UnsupportedModel {
                origin: origin.to_string(),
                model: "BPE without a byte-level decoder".to_string(),
            });
        }
        let added = hf.get_added_tokens_decoder();
        let vocab = hf.get_vocab(true);
        let max_id = vocab.values().copied().max().unwrap_or(0);
        let n = max_id as usize + 1;
        if n > vocab.len().saturating_mul(2) + 1024 {
            return Err(invalid(format!(
                "token ids go up to {max_id} but there are only {} tokens",
                vocab.len()
            )));
        }
        let mut tokens: Vec<Option<String>> = vec![None; n];
        for (t, id) in &vocab {
            if let Some(slot) = tokens.get_mut(*id as usize) {
                *slot = Some(t.clone());
            }
        }
        let mut kinds = vec![TokenKind::Normal; n];
        for (id, tok) in &added {
            if let Some(k) = kinds.get_mut(*id as usize) {
                *k = if tok.special {
                    TokenKind::Control
                } else {
                    TokenKind::UserDefined
                };
            }
        }
        let mut missing = Vec::new();
        for (id, slot) in tokens.iter().enumerate() {
            if slot.is_none() {
                missing.push(id as u32);
                if let Some(k) = kinds.get_mut(id) {
                    *k = TokenKind::Unused;
                }
            }
        }

        let token_of = |key: &str| -> Option<String> {
            match config?.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let id_of = |key: &str| -> Option<u32> {
            let text = token_of(key)?;
            let id = hf.token_to_id(&text);
            if id.is_none() {
                tracing::warn!("{origin}: {key} {text:?} is not in the vocabulary; ignored");
            }
            id
        };
        let bos = id_of("bos_token");
        let eos = id_of("eos_token");
        let pad = id_of("pad_token");
        let unk = id_of("unk_token");
        let flag = |key: &str| config.and_then(|c| c.get(key)).and_then(|v| v.as_bool());
        // Without explicit flags, see what the post-processor adds around a probe text.
        let probe = |with: bool| hf.encode_fast("a", with).map(|e| e.get_ids().to_vec());
        let (probe_with, probe_without) = match (probe(true), probe(false)) {
            (Ok(a), Ok(b)) => (a, b),
            _ => (Vec::new(), Vec::new()),
        };
        // Tokens the post-processor puts before / after the text.
        let (added_first, added_last) = match probe_with
            .windows(probe_without.len().max(1))
            .position(|w| w == probe_without.as_slice())
        {
            Some(at) if !probe_without.is_empty() => (
                probe_with[..at].first().copied(),
                probe_with[at + probe_without.len()..].last().copied(),
            ),
            _ => (None, None),
        };
        let bos = bos.or(added_first);
        let eos = eos.or(added_last);
        let add_bos = flag("add_bos_token").unwrap_or(added_first.is_some() && added_first == bos);
        let add_eos = flag("add_eos_token").unwrap_or(added_last.is_some() && added_last == eos);
        let chat_template = config
            .and_then(|c| c.get("chat_template"))
            .and_then(|t| match t {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(list) => {
                    let named = |name: &str| {
                        list.iter().find_map(|e| {
                            (e.get("name")?.as_str()? == name)
                                .then(|| e.get("template")?.as_str().map(str::to_string))?
                        })
                    };
                    named("default").or_else(|| {
                        list.first()
                            .and_then(|e| e.get("template")?.as_str().map(str::to_string))
                    })
                }
                _ => None,
            });
        let mut extra_eos = Vec::new();
        if let Some(v) = generation.and_then(|g| g.get("eos_token_id")) {
            let ids: Vec<u64> = match v {
                serde_json::Value::Number(x) => x.as_u64().into_iter().collect(),
                serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_u64()).collect(),
                _ => Vec::new(),
            };
            for id in ids {
                match u32::try_from(id) {
                    Ok(id) if (id as usize) < n => extra_eos.push(id),
                    _ => tracing::warn!("{origin}: generation_config eos_token_id {id} ignored"),
                }
            }
        }
        if add_bos && bos.is_none() {
            return Err(invalid(
                "add_bos_token is set but there is no bos_token".into(),
            ));
        }

        // Build our own tables directly from the loaded tokenizer.
        let mut special = hf;
        special.with_post_processor(None::<PostProcessorWrapper>);
        let mut plain = special.clone();
        plain.set_encode_special_tokens(true);

        let tables = TokenTables::build(
            tokens
                .iter()
                .map(|t| t.as_deref().unwrap_or(""))
                .zip(kinds.iter().copied()),
        );
        let mut eog: Vec<u32> = EOG_TEXTS
            .iter()
            .filter_map(|t| special.token_to_id(t))
            .chain(eos)
            .chain(extra_eos)
            .collect();
        eog.sort_unstable();
        eog.dedup();
        let mut tok = Self {
            origin: origin.to_string(),
            special,
            plain,
            tables,
            kinds,
            missing,
            unk_marker: None,
            pre_name: "tokenizer.json".to_string(),
            bos,
            eos,
            pad,
            unk,
            eog,
            add_bos,
            add_eos,
            chat_template,
        };
        tok.restore_post_processor()?;
        Ok(tok)
    }

    /// Put a BOS/EOS post-processor on the exported tokenizer so that Hugging Face users get the
    /// same special tokens as `encode(.., add_special = true, ..)`.
    fn restore_post_processor(&mut self) -> Result<(), TokenizerError> {
        let mut template = Vec::new();
        let mut special_tokens: Vec<SpecialToken> = Vec::new();
        if self.add_bos
            && let Some(bos) = self.bos
            && let Some(text) = self.token_text(bos)
        {
            template.push(text.to_string());
            special_tokens.push((text.to_string(), bos).into());
        }
        template.push("$A".to_string());
        if self.add_eos
            && let Some(eos) = self.eos
            && let Some(text) = self.token_text(eos)
        {
            template.push(text.to_string());
            special_tokens.push((text.to_string(), eos).into());
        }
        if template.len() > 1 {
            let processor = TemplateProcessing::builder()
                .try_single(template)
                .map_err(|e| TokenizerError::Build {
                    origin: self.origin.clone(),
                    detail: format!("BOS/EOS template: {e}"),
                })?
                .special_tokens(special_tokens)
                .build()
                .map_err(|e| TokenizerError::Build {
                    origin: self.origin.clone(),
                    detail: format!("BOS/EOS template: {e}"),
                })?;
            self.special.with_post_processor(Some(processor.clone()));
            self.plain.with_post_processor(Some(processor));
        }
        Ok(())
    }

    /// The `tokenizer.json` of this tokenizer (for exporting a Hugging Face folder): the BPE,
    /// the pre-tokenizer regexes, the byte-level decoder, control tokens as special added tokens,
    /// user-defined tokens as added tokens, and a post-processor adding BOS/EOS when the model
    /// asks for them.
    pub fn to_tokenizer_json(&self) -> Result<String, TokenizerError> {
        let json = self
            .special
            .to_string(true)
            .map_err(|e| TokenizerError::Serialize(e.to_string()))?;
        if self.unk_marker.is_none() {
            return Ok(json);
        }
        // Leave the internal marker out: Hugging Face users get the plain vocabulary.
        let mut value: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| TokenizerError::Serialize(e.to_string()))?;
        if let Some(model) = value.get_mut("model").and_then(|m| m.as_object_mut()) {
            model.insert("unk_token".into(), serde_json::Value::Null);
            if let Some(vocab) = model.get_mut("vocab").and_then(|v| v.as_object_mut()) {
                vocab.remove(UNK_MARKER);
            }
        }
        serde_json::to_string_pretty(&value).map_err(|e| TokenizerError::Serialize(e.to_string()))
    }

    /// A `tokenizer_config.json` to go with [`Tokenizer::to_tokenizer_json`]: special token
    /// strings, the add-BOS/EOS flags and the chat template.
    pub fn to_tokenizer_config_json(&self) -> Result<String, TokenizerError> {
        let text = |id: Option<u32>| {
            id.and_then(|i| self.token_text(i))
                .map(|t| serde_json::Value::String(t.to_string()))
                .unwrap_or(serde_json::Value::Null)
        };
        let mut config = serde_json::Map::new();
        config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        config.insert("add_bos_token".into(), self.add_bos.into());
        config.insert("add_eos_token".into(), self.add_eos.into());
        config.insert("bos_token".into(), text(self.bos));
        config.insert("eos_token".into(), text(self.eos));
        config.insert("pad_token".into(), text(self.pad));
        config.insert("unk_token".into(), text(self.unk));
        config.insert("clean_up_tokenization_spaces".into(), false.into());
        if let Some(t) = &self.chat_template {
            config.insert("chat_template".into(), t.clone().into());
        }
        serde_json::to_string_pretty(&serde_json::Value::Object(config))
            .map_err(|e| TokenizerError::Serialize(e.to_string()))
    }

    /// Encode text to token ids.
    ///
    /// `add_special`: add the tokens the model asks for, like llama.cpp's `add_special`: BOS
    /// first if the model's `add_bos_token` flag is set, EOS last if `add_eos_token` is set.
    /// `parse_special`: match control tokens written in the text (`<|im_start|>`) as single
    /// tokens; when false their text is tokenized as ordinary text. User-defined tokens are
    /// matched either way, as in llama.cpp.
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let hf = if parse_special {
            &self.special
        } else {
            &self.plain
        };
        let encoding = hf
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode {
                chars: text.chars().count(),
                detail: e.to_string(),
            })?;
        let ids = encoding.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 2);
        if add_special
            && self.add_bos
            && let Some(bos) = self.bos
        {
            out.push(bos);
        }
        match self.unk_marker {
            Some(marker) => out.extend(ids.iter().copied().filter(|&id| id != marker)),
            None => out.extend_from_slice(ids),
        }
        if add_special
            && self.add_eos
            && let Some(eos) = self.eos
        {
            out.push(eos);
        }
        Ok(out)
    }

    /// The raw bytes of a sequence of tokens, nothing skipped (control tokens included).
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, TokenizerError> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            out.extend_from_slice(self.bytes_of(id)?);
        }
        Ok(out)
    }

    /// Decode tokens to text, nothing skipped. Exact when the bytes are valid UTF-8 (always for
    /// the output of [`Tokenizer::encode`] on text the vocabulary can spell); invalid sequences,
    /// such as a character cut between two tokens at the end, become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let bytes = self.decode_bytes(ids)?;
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    fn bytes_of(&self, id: u32) -> Result<&[u8], TokenizerError> {
        let i = id as usize;
        match (
            self.tables.byte_offsets.get(i),
            self.tables.byte_offsets.get(i + 1),
        ) {
            (Some(&a), Some(&b)) if self.missing.binary_search(&id).is_err() => self
                .tables
                .bytes
                .get(a..b)
                .ok_or(TokenizerError::UnknownTokenId {
                    id,
                    vocab_size: self.vocab_size(),
                }),
            _ => Err(TokenizerError::UnknownTokenId {
                id,
                vocab_size: self.vocab_size(),
            }),
        }
    }

    /// The raw bytes one token stands for (byte-level decoded; literal text for control and
    /// user-defined tokens). `None` for an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        self.bytes_of(id).ok().map(<[u8]>::to_vec)
    }

    /// The vocabulary string of a token as stored (`Ġthe`, `<|im_end|>`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        let i = id as usize;
        if self.missing.binary_search(&id).is_ok() {
            return None;
        }
        let (&a, &b) = (
            self.tables.text_offsets.get(i)?,
            self.tables.text_offsets.get(i + 1)?,
        );
        self.tables.texts.get(a..b)
    }

    /// The kind of a token.
    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        if self.missing.binary_search(&id).is_ok() {
            return None;
        }
        self.kinds.get(id as usize).copied()
    }

    /// The id of a vocabulary string as stored (`"<|im_end|>"`, `"Ġthe"`).
    pub fn token_id(&self, piece: &str) -> Option<u32> {
        self.special
            .token_to_id(piece)
            .filter(|&id| Some(id) != self.unk_marker)
    }

    /// Number of token ids (the size of the embedding matrix for GGUF models).
    pub fn vocab_size(&self) -> usize {
        self.kinds.len()
    }

    /// The beginning-of-sequence id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence id, if the model has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The padding id, if the model has one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// Every id that ends generation, ascending: eos, eot, eom and the end-of-turn style tokens
    /// llama.cpp recognises by their text (`<|im_end|>`, `<|endoftext|>`, ...).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Whether generating this id ends the generation.
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// Whether `encode(.., add_special = true, ..)` prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Whether `encode(.., add_special = true, ..)` appends EOS.
    pub fn adds_eos(&self) -> bool {
        self.add_eos && self.eos.is_some()
    }

    /// Whether a byte can appear in encoded text; bytes with no single-byte token are dropped
    /// by the encoder (as llama.cpp drops them).
    pub fn can_encode_byte(&self, byte: u8) -> bool {
        self.tables.encodable_bytes[byte as usize]
    }

    /// The pre-tokenizer name (`tokenizer.ggml.pre`, or `tokenizer.json` for HF folders).
    pub fn pre_tokenizer_name(&self) -> &str {
        &self.pre_name
    }

    /// The Jinja chat template stored with the model, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// A decoder that turns generated ids into text as soon as the bytes form whole characters.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            pending: Vec::new(),
        }
    }
}

fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Parse {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
}

/// Incremental detokenizer for streaming: [`StreamDecoder::push`] returns the text completed by
/// each token, holding back the bytes of a character split across tokens until it is whole.
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    pending: Vec<u8>,
}

impl StreamDecoder<'_> {
    /// Add one generated token; returns the newly completed text, if any. Bytes that can never
    /// become valid UTF-8 are emitted as U+FFFD right away.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        let bytes = self.tokenizer.bytes_of(id)?;
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + bad);
                        }
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                    }
                }
            }
        }
        Ok((!out.is_empty()).then_some(out))
    }

    /// Bytes held back waiting for the rest of a character.
    pub fn pending_bytes(&self) -> &[u8] {
        &self.pending
    }

    /// Flush what is held back at the end of generation (an incomplete character becomes
    /// U+FFFD).
    pub fn finish(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            return None;
        }
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        Some(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufValue, GgufWriter};

    fn strings(items: &[String]) -> GgufValue {
        GgufValue::Array(items.iter().map(|s| GgufValue::String(s.clone())).collect())
    }

    /// A small byte-level vocabulary: the 256 byte characters (id = byte value, except that
    /// byte 0x07 is left out to test dropping), then `Ġt`, `he`, `Ġthe`, two control tokens, a
    /// user-defined token and `<|endoftext|>`.
    fn toy_metadata() -> Vec<(String, GgufValue)> {
        let table = byte_to_char_table();
        let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
        tokens[7] = "[UNUSED7]".to_string();
        let mut types = vec![1i32; 256];
        types[7] = 5;
        for (t, ty) in [
            ("Ġt", 1),
            ("he", 1),
            ("Ġthe", 1),
            ("<|im_start|>", 3),
            ("<|im_end|>", 3),
            ("<tool>", 4),
            ("<|endoftext|>", 1),
        ] {
            tokens.push(t.to_string());
            types.push(ty);
        }
        let merges: Vec<String> = ["Ġ t", "h e", "Ġt he"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        vec![
            (keys::MODEL.into(), GgufValue::String("gpt2".into())),
            (keys::PRE.into(), GgufValue::String("qwen2".into())),
            (keys::TOKENS.into(), strings(&tokens)),
            (
                keys::TOKEN_TYPE.into(),
                GgufValue::Array(types.into_iter().map(GgufValue::I32).collect()),
            ),
            (keys::MERGES.into(), strings(&merges)),
            (keys::BOS_ID.into(), GgufValue::U32(259)),
            (keys::EOS_ID.into(), GgufValue::U32(260)),
            (keys::ADD_BOS.into(), GgufValue::Bool(false)),
            (
                keys::CHAT_TEMPLATE.into(),
                GgufValue::String("{{ x }}".into()),
            ),
        ]
    }

    fn build(meta: Vec<(String, GgufValue)>) -> Result<Tokenizer, TokenizerError> {
        let mut w = GgufWriter::new();
        for (k, v) in meta {
            w.metadata(&k, v);
        }
        let g = GgufFile::from_bytes(w.to_bytes()).expect("toy GGUF parses");
        Tokenizer::from_gguf(&g)
    }

    fn with(key: &str, value: Option<GgufValue>) -> Vec<(String, GgufValue)> {
        let mut meta: Vec<(String, GgufValue)> = toy_metadata()
            .into_iter()
            .filter(|(k, _)| k != key)
            .collect();
        if let Some(v) = value {
            meta.push((key.to_string(), v));
        }
        meta
    }

    #[test]
    fn tokenizer_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
    }

    #[test]
    fn byte_table_is_gpt2() {
        let t = byte_to_char_table();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[0], '\u{100}');
        assert_eq!(t[0xAD], '\u{143}');
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn merges_split_after_first_char() {
        assert_eq!(split_merge("Ġ t"), Some(("Ġ", "t")));
        assert_eq!(split_merge("  a"), Some((" ", "a")));
        assert_eq!(split_merge("ab"), None);
        assert_eq!(split_merge(""), None);
    }

    #[test]
    fn byte_tokens_parse() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0xff>"), Some(255));
        assert_eq!(parse_byte_token("<0x0>"), None);
        assert_eq!(parse_byte_token("0x0A"), None);
    }

    #[test]
    fn pre_tokenizer_names() {
        assert_eq!(
            PreTokenizer::from_name("smollm"),
            Some(PreTokenizer::Smollm)
        );
        assert_eq!(PreTokenizer::from_name("qwen2"), Some(PreTokenizer::Qwen2));
        assert_eq!(
            PreTokenizer::from_name("llama-bpe"),
            Some(PreTokenizer::Llama3)
        );
        assert_eq!(PreTokenizer::from_name("gpt2"), Some(PreTokenizer::Gpt2));
        assert_eq!(
            PreTokenizer::from_name("default"),
            Some(PreTokenizer::Default)
        );
        assert_eq!(PreTokenizer::from_name("tekken"), None);
        for name in PreTokenizer::SUPPORTED_NAMES {
            assert!(PreTokenizer::from_name(name).is_some(), "{name}");
        }
    }

    #[test]
    fn toy_vocab_encodes_with_merges_and_special_tokens() {
        let tok = build(toy_metadata()).unwrap();
        assert_eq!(tok.vocab_size(), 263);
        let the = tok.token_id("Ġthe").unwrap();
        assert_eq!(tok.encode(" the", true, false).unwrap(), vec![the]);
        let start = tok.token_id("<|im_start|>").unwrap();
        let end = tok.token_id("<|im_end|>").unwrap();
        let text = "<|im_start|> the<|im_end|>";
        assert_eq!(
            tok.encode(text, false, true).unwrap(),
            vec![start, the, end]
        );
        let plain = tok.encode(text, false, false).unwrap();
        assert!(
            !plain.contains(&start) && !plain.contains(&end),
            "{plain:?}"
        );
        assert_eq!(tok.decode(&plain).unwrap(), text);
        // User-defined tokens are matched whether or not special tokens are parsed.
        let tool = tok.token_id("<tool>").unwrap();
        assert_eq!(tok.encode("<tool>", false, false).unwrap(), vec![tool]);
        assert_eq!(tok.encode("<tool>", false, true).unwrap(), vec![tool]);
        assert_eq!(tok.token_kind(tool), Some(TokenKind::UserDefined));
        assert_eq!(tok.chat_template(), Some("{{ x }}"));
    }

    #[test]
    fn end_of_generation_ids_follow_llama_cpp() {
        let tok = build(toy_metadata()).unwrap();
        let eot = tok.token_id("<|endoftext|>").unwrap();
        let im_end = tok.token_id("<|im_end|>").unwrap();
        assert_eq!(tok.eos_id(), Some(260));
        // eos (260 = <|im_end|>) and <|endoftext|> recognised by its text.
        assert_eq!(tok.eos_ids(), &[im_end, eot]);
        assert!(tok.is_end_of_generation(eot) && !tok.is_end_of_generation(0));
        // A normal-typed end-of-generation token is promoted to control, as in llama.cpp.
        assert_eq!(tok.token_kind(eot), Some(TokenKind::Control));
        assert_eq!(tok.encode("<|endoftext|>", false, true).unwrap(), vec![eot]);
    }

    #[test]
    fn missing_bytes_are_dropped_and_reported() {
        let tok = build(toy_metadata()).unwrap();
        assert!(!tok.can_encode_byte(7) && tok.can_encode_byte(8));
        let ids = tok.encode("a\u{7}b", false, false).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), "ab");
        // As in llama.cpp, the dropped byte still separates what is around it: no merge.
        let h = tok.token_id("h").unwrap();
        let e = tok.token_id("e").unwrap();
        assert_eq!(tok.encode("h\u{7}e", false, false).unwrap(), vec![h, e]);
        assert_eq!(
            tok.encode("he", false, false).unwrap(),
            vec![tok.token_id("he").unwrap()]
        );
        // The internal marker is not a token and is not exported.
        assert_eq!(tok.token_id(UNK_MARKER), None);
        assert!(!tok.to_tokenizer_json().unwrap().contains("unknown-byte"));
    }

    #[test]
    fn bos_and_eos_follow_the_flags() {
        let tok = build(with(keys::ADD_BOS, Some(GgufValue::Bool(true)))).unwrap();
        assert_eq!(tok.encode("a", true, false).unwrap(), vec![259, 97]);
        assert_eq!(tok.encode("a", false, false).unwrap(), vec![97]);
        let meta = with(keys::ADD_EOS, Some(GgufValue::Bool(true)));
        let tok = build(meta).unwrap();
        assert_eq!(tok.encode("a", true, false).unwrap(), vec![97, 260]);
        let mut meta = with(keys::BOS_ID, None);
        meta.retain(|(k, _)| k != keys::ADD_BOS);
        meta.push((keys::ADD_BOS.into(), GgufValue::Bool(true)));
        let err = build(meta).unwrap_err().to_string();
        assert!(
            err.contains(keys::ADD_BOS) && err.contains(keys::BOS_ID),
            "{err}"
        );
        // Missing add_bos_token: llama.cpp's per-pre-tokenizer default (true for llama3).
        let mut meta = with(keys::ADD_BOS, None);
        meta.retain(|(k, _)| k != keys::PRE);
        meta.push((keys::PRE.into(), GgufValue::String("llama-bpe".into())));
        assert!(build(meta).unwrap().adds_bos());
    }

    #[test]
    fn unsupported_inputs_are_clear_errors() {
        let err = build(with(keys::MODEL, Some(GgufValue::String("llama".into())))).unwrap_err();
        assert!(
            matches!(err, TokenizerError::UnsupportedModel { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("\"llama\""), "{err}");
        let err = build(with(keys::PRE, Some(GgufValue::String("tekken".into())))).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("tekken") && msg.contains("smollm"), "{msg}");
        let err = build(with(
            keys::TOKEN_TYPE,
            Some(GgufValue::Array(vec![GgufValue::I32(1)])),
        ))
        .unwrap_err();
        assert!(err.to_string().contains("token_type"), "{err}");
        let mut meta = with(keys::TOKENS, None);
        let mut tokens: Vec<String> = byte_to_char_table().iter().map(|c| c.to_string()).collect();
        tokens.push("a".into());
        meta.push((keys::TOKENS.into(), strings(&tokens)));
        let err = build(meta).unwrap_err().to_string();
        assert!(err.contains("appears twice"), "{err}");
        let err = build(with(keys::MERGES, None)).unwrap_err().to_string();
        assert!(err.contains(keys::MERGES), "{err}");
        // No pre-tokenizer key: llama.cpp's default.
        let tok = build(with(keys::PRE, None)).unwrap();
        assert_eq!(tok.pre_tokenizer_name(), "default");
    }

    #[test]
    fn unknown_ids_are_errors_not_panics() {
        let tok = build(toy_metadata()).unwrap();
        assert!(matches!(
            tok.decode(&[97, 10_000]),
            Err(TokenizerError::UnknownTokenId { id: 10_000, .. })
        ));
        assert_eq!(tok.token_bytes(u32::MAX), None);
        assert_eq!(tok.token_text(263), None);
        let mut dec = tok.stream_decoder();
        assert!(dec.push(263).is_err());
    }

    #[test]
    fn stream_decoder_waits_for_whole_characters() {
        let tok = build(toy_metadata()).unwrap();
        let mut dec = tok.stream_decoder();
        // "é" is C3 A9: two byte tokens.
        assert_eq!(dec.push(0xC3).unwrap(), None);
        assert_eq!(dec.pending_bytes(), &[0xC3]);
        assert_eq!(dec.push(0xA9).unwrap().as_deref(), Some("é"));
        // A byte that can never start a character comes out as U+FFFD at once.
        assert_eq!(dec.push(0xFF).unwrap().as_deref(), Some("\u{FFFD}"));
        assert_eq!(dec.push(0xE2).unwrap(), None);
        assert_eq!(dec.finish().as_deref(), Some("\u{FFFD}"));
        assert_eq!(dec.finish(), None);
    }

    #[test]
    fn hf_export_round_trips() {
        let tok = build(with(keys::ADD_BOS, Some(GgufValue::Bool(true)))).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer.json"),
            tok.to_tokenizer_json().unwrap(),
        )
        .unwrap();
        let back = Tokenizer::from_hf_folder(dir.path()).unwrap();
        // Without tokenizer_config.json, BOS comes from the exported post-processor.
        assert!(back.adds_bos());
        assert_eq!(back.bos_id(), Some(259));
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            tok.to_tokenizer_config_json().unwrap(),
        )
        .unwrap();
        let back = Tokenizer::from_hf_folder(dir.path()).unwrap();
        for text in ["<|im_start|> the<|im_end|>", "<tool> he", "x\u{7}y"] {
            for special in [false, true] {
                assert_eq!(
                    back.encode(text, true, special).unwrap(),
                    tok.encode(text, true, special).unwrap(),
                    "{text:?} parse_special={special}"
                );
            }
        }
        assert_eq!(back.bos_id(), Some(259));
        assert_eq!(back.eos_ids(), tok.eos_ids());
        assert_eq!(back.chat_template(), Some("{{ x }}"));
        assert_eq!(back.vocab_size(), tok.vocab_size());
        assert_eq!(back.token_bytes(0x20), Some(b" ".to_vec()));
    }

    #[test]
    fn hf_folder_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = Tokenizer::from_hf_folder(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
        let err = Tokenizer::from_hf_folder(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot parse"), "{err}");
    }
}
