//! Shared helpers of the engine's integration tests: real models from the registry and the
//! golden reference outputs in ../shared/golden.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use retrowave_core::AttentionMode;
use retrowave_cpu::CpuBackend;
use retrowave_engine::{Engine, EngineConfig, SchedulerConfig, WorkerGroup};
use retrowave_model::arch::{self, ModelConfig, ModelSource};
use retrowave_model::registry;
use retrowave_model::tokenizer::Tokenizer;
use serde_json::Value;

pub struct Model {
    pub source: ModelSource,
    pub config: ModelConfig,
    pub tokenizer: Arc<Tokenizer>,
}

/// Opens a registry model (fetching it on first use).
pub fn open(name: &str) -> Model {
    let path = registry::ensure_model(name).unwrap_or_else(|e| panic!("cannot get {name}: {e}"));
    open_path(&path)
}

/// Opens a model file or folder.
pub fn open_path(path: &std::path::Path) -> Model {
    let path = path.to_path_buf();
    let source = arch::open_model(&path).unwrap();
    let config = source.config().unwrap();
    arch::validate_tensors(&config, &source).unwrap();
    let tokenizer = match &source {
        ModelSource::Gguf(g) => Tokenizer::from_gguf(g).unwrap(),
        ModelSource::HfFolder(_) => Tokenizer::from_hf_folder(&path).unwrap(),
    };
    Model {
        source,
        config,
        tokenizer: Arc::new(tokenizer),
    }
}

pub fn group(m: &Model, tp: usize) -> WorkerGroup<CpuBackend> {
    WorkerGroup::load(
        &m.config,
        &m.source,
        (0..tp).map(|_| CpuBackend::new()).collect(),
    )
    .unwrap()
}

pub fn engine(m: &Model, tp: usize, max_context: usize) -> Engine<CpuBackend> {
    engine_with(m, tp, max_context, AttentionMode::Full)
}

pub fn engine_with(
    m: &Model,
    tp: usize,
    max_context: usize,
    attention: AttentionMode,
) -> Engine<CpuBackend> {
    let cfg = EngineConfig {
        scheduler: SchedulerConfig {
            max_batch_tokens: 256,
            prefill_chunk: 256,
            max_seqs: 16,
        },
        max_context,
        attention,
    };
    Engine::new(group(m, tp), m.tokenizer.clone(), cfg)
}

/// The golden file of a model (../shared/golden/<name>.json beside the checkout).
pub fn golden(name: &str) -> Value {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden");
    let path = root.join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The float32 reference logits of bench/reference/<name>-f32.json, if recorded.
pub fn f32_reference(name: &str) -> Option<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../../bench/reference/{name}-f32.json"));
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Logits after one teacher-forced pass over `prompt + forced`: the rows that predict each
/// forced token (`[forced.len(), vocab]`).
pub fn teacher_forced(
    group: &mut WorkerGroup<CpuBackend>,
    prompt: &[u32],
    forced: &[u32],
) -> Vec<f32> {
    let tokens: Vec<u32> = prompt.iter().chain(forced.iter()).copied().collect();
    let n = tokens.len();
    group.open_slot(0, n + 1).unwrap();
    let batch = retrowave_core::BatchLayout {
        seqs: vec![retrowave_core::SeqRows {
            slot: 0,
            row: 0,
            start_pos: 0,
            n_tokens: n,
        }],
    };
    let rows: Vec<usize> = (prompt.len() - 1..n - 1).collect();
    let logits = group.forward(&tokens, &batch, &rows).unwrap();
    group.close_slot(0);
    logits
}

/// SmolLM2 exported to a float32 Hugging Face folder (kept alive by the returned directory).
pub fn smollm2_f32_export() -> (tempfile::TempDir, Model) {
    use retrowave_model::hf::{ExportDtype, export_hf_folder};
    let gm = open("smollm2-135m");
    let dir = tempfile::tempdir().unwrap();
    let ModelSource::Gguf(g) = &gm.source else {
        unreachable!("registry models are GGUF")
    };
    let tj = gm.tokenizer.to_tokenizer_json().unwrap();
    export_hf_folder(g, dir.path(), ExportDtype::F32, Some(&tj)).unwrap();
    let m = open_path(dir.path());
    (dir, m)
}
