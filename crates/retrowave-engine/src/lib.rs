//! The retrowave engine: admits requests, plans each step ([`scheduler`]), runs the model forward
//! on a tensor-parallel group of workers ([`group`], [`worker`], [`shard`]) and turns logits into
//! tokens and text ([`engine`]).
//!
//! The forward is written once against [`retrowave_core::Backend`]; the engine is generic over it.

pub mod engine;
pub mod group;
pub mod scheduler;
pub mod shard;
pub mod worker;

pub use engine::{Engine, EngineConfig, EngineStats, Event, FinishReason, RequestOptions, Usage};
pub use group::WorkerGroup;
pub use scheduler::{AdmissionConfig, SchedulerConfig, SeqId, StepPlan};
pub use worker::{LmHead, Overlap};

use retrowave_core::BackendError;
use retrowave_model::arch::ArchError;
use retrowave_model::sampling::SamplingError;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Model(#[from] ArchError),
    #[error("invalid sampling parameters: {0}")]
    Sampling(#[from] SamplingError),
    #[error("invalid engine configuration: {0}")]
    Config(String),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {tokens} tokens; this engine accepts at most {max}")]
    PromptTooLong { tokens: usize, max: usize },
    #[error(
        "the request needs {tokens} KV tokens (prompt + max_tokens), more than the whole KV budget of {budget} tokens"
    )]
    ExceedsKvBudget { tokens: usize, budget: usize },
    #[error("token id {token} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("no KV cache slot {0} on a worker")]
    UnknownSlot(usize),
    #[error("a worker thread stopped")]
    WorkerLost,
    /// A worker's step panicked (a bug); the step failed on every worker and the group was
    /// rebuilt.
    #[error("a worker panicked: {0}")]
    WorkerPanicked(String),
    /// The failure a test asked a worker to raise ([`WorkerGroup::fail_next_step`]).
    #[error("injected failure at layer {layer}")]
    InjectedFailure { layer: usize },
    /// A step failed; its sequences were ended (their final events are attached), the others go on.
    #[error("step failed: {source}")]
    StepFailed {
        source: Box<EngineError>,
        events: Vec<Event>,
    },
}
