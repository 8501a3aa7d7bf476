//! Everything retrowave knows about a model before any backend touches it: file formats (GGUF and
//! Hugging Face folders) with validation, architecture hyper-parameters, the tokenizer and chat
//! templates, sampling, and the registry that fetches and verifies the known models.

pub mod arch;
pub mod chat;
pub mod gguf;
pub mod hf;
pub mod random;
pub mod registry;
pub mod sampling;
pub mod tokenizer;
