//! Opening a model for the engine: resolve the name or path (fetching registry models on first
//! use), validate the file against its architecture, build the tokenizer and the worker group.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use retrowave_core::Backend;
use retrowave_core::{AttentionMode, WaveConfig};
use retrowave_cpu::CpuBackend;
use retrowave_cuda::{CudaBackend, DeviceRequest};
use retrowave_engine::{Engine, EngineConfig, SchedulerConfig, WorkerGroup};
use retrowave_model::arch::{self, ModelConfig, ModelSource};
use retrowave_model::registry::{self, FetchOptions, ModelSpec};
use retrowave_model::tokenizer::Tokenizer;
use retrowave_store::{StoreConfig, TieredStore};

/// Where the weights and the tokenizer come from, and what they say.
pub struct LoadedModel {
    pub path: PathBuf,
    pub source: ModelSource,
    pub config: ModelConfig,
    pub tokenizer: Arc<Tokenizer>,
}

/// Resolves `spec` (a registry name or a path) to a local file or folder, fetching if needed.
pub fn resolve_path(spec: &str) -> Result<PathBuf> {
    match registry::resolve(spec)? {
        ModelSpec::Registry(entry) => {
            let path = registry::model_path(entry.name)?;
            if path.exists() {
                Ok(registry::ensure_model(entry.name)?)
            } else {
                eprintln!(
                    "fetching {} ({:.0} MB) into {}",
                    entry.name,
                    entry.size as f64 / 1e6,
                    path.display()
                );
                Ok(registry::fetch_model(entry, &FetchOptions::interactive())?)
            }
        }
        ModelSpec::Path(p) => Ok(p),
    }
}

/// Opens and validates a model.
pub fn open(spec: &str) -> Result<LoadedModel> {
    let path = resolve_path(spec)?;
    open_path(&path)
}

/// Opens and validates a model file or folder.
pub fn open_path(path: &Path) -> Result<LoadedModel> {
    let source =
        arch::open_model(path).with_context(|| format!("cannot open model {}", path.display()))?;
    let config = source.config()?;
    arch::validate_tensors(&config, &source)?;
    let tokenizer = match &source {
        ModelSource::Gguf(g) => Tokenizer::from_gguf(g)?,
        ModelSource::HfFolder(_) => Tokenizer::from_hf_folder(path)?,
    };
    Ok(LoadedModel {
        path: path.to_path_buf(),
        source,
        config,
        tokenizer: Arc::new(tokenizer),
    })
}

/// The attention mode named `name` (`full` or `wave`), with wave parameters from a TOML file.
pub fn attention_mode(name: &str, wave_config: Option<&Path>) -> Result<AttentionMode> {
    let mode = AttentionMode::parse(name).map_err(anyhow::Error::msg)?;
    match (mode, wave_config) {
        (AttentionMode::Wave(_), Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read wave config {}", path.display()))?;
            let cfg: WaveConfig = toml::from_str(&text)
                .with_context(|| format!("invalid wave config {}", path.display()))?;
            cfg.validate()
                .with_context(|| format!("invalid wave config {}", path.display()))?;
            Ok(AttentionMode::Wave(cfg))
        }
        (mode, _) => Ok(mode),
    }
}

/// Engine options from the command line.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Exact attention or the wave index.
    pub attention: AttentionMode,
    /// Tensor-parallel degree (workers).
    pub tp: usize,
    /// Context limit; 0 = the model's.
    pub max_context: usize,
    pub prefill_chunk: usize,
    /// The node's tiered KV store ([`cpu_store`]), where CPU workers keep the exact KV of
    /// wave-indexed sequences (one store shared by every worker); `None`: each sequence's in
    /// host memory of its own.
    pub store: Option<TieredStore>,
}

/// [`cpu_store`] with the default store settings but for the disk tier's `dirs` and the host
/// memory (the command-line flags `--store-dir` and `--store-host-bytes`).
pub fn cpu_store_in(dirs: Vec<PathBuf>, host_capacity_bytes: u64) -> Result<Option<TieredStore>> {
    cpu_store(&StoreConfig {
        dirs,
        host_capacity_bytes,
        ..Default::default()
    })
}

/// The tiered store for CPU workers when `cfg` has a disk tier (`dirs`): a host arena of
/// `host_capacity_bytes`, the coldest clusters spilled to disk. Without a disk tier, `None`:
/// sequences keep their wave KV in host memory of their own.
pub fn cpu_store(cfg: &StoreConfig) -> Result<Option<TieredStore>> {
    if cfg.dirs.is_empty() {
        return Ok(None);
    }
    let store = TieredStore::new(cfg.clone()).with_context(|| {
        format!(
            "cannot open the KV store's disk tier in {}",
            cfg.dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    tracing::info!(
        host_capacity_bytes = cfg.host_capacity_bytes,
        dirs = ?store.disk_dirs(),
        io = ?store.io_path(),
        "wave KV in the tiered store"
    );
    Ok(Some(store))
}

/// Loads the weights onto CPU workers and builds an engine.
pub fn engine(model: &LoadedModel, opts: EngineOptions) -> Result<Engine<CpuBackend>> {
    let backends = (0..opts.tp.max(1))
        .map(|_| CpuBackend::new().with_store(opts.store.clone()))
        .collect();
    engine_on(model, opts, backends)
}

/// The GPU backends for `--device` (one per tensor-parallel worker, on consecutive GPUs from the
/// one named), or `None` for the CPU.
pub fn cuda_backends(device: &str, tp: usize) -> Result<Option<Vec<CudaBackend>>> {
    let req: DeviceRequest = device.parse()?;
    let Some(ordinals) = req.resolve_group(tp)? else {
        return Ok(None);
    };
    let t = Instant::now();
    let backends = ordinals
        .into_iter()
        .map(CudaBackend::new)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("cannot start the CUDA backend on {device}"))?;
    for r in backends[0].module_reports() {
        tracing::info!(
            file = r.file,
            cached = r.from_cache,
            seconds = r.seconds,
            "kernels"
        );
    }
    tracing::info!(
        device = %backends[0].info().name,
        seconds = t.elapsed().as_secs_f64(),
        "CUDA backend ready"
    );
    Ok(Some(backends))
}

/// Loads the weights onto the given backends (one per tensor-parallel worker) and builds an
/// engine.
pub fn engine_on<B: Backend + 'static>(
    model: &LoadedModel,
    opts: EngineOptions,
    backends: Vec<B>,
) -> Result<Engine<B>> {
    let t = Instant::now();
    let group = WorkerGroup::load(&model.config, &model.source, backends)?;
    let max_context = if opts.max_context == 0 {
        model.config.context_length
    } else {
        if opts.max_context > model.config.context_length {
            tracing::warn!(
                "context limit {} exceeds the {} tokens {} was trained for; quality may drop past it",
                opts.max_context,
                model.config.context_length,
                model.config.name
            );
        }
        opts.max_context
    };
    tracing::info!(
        model = %model.path.display(),
        backend = %group.backend_name(),
        seconds = t.elapsed().as_secs_f64(),
        "weights loaded"
    );
    let chunk = opts.prefill_chunk.max(1);
    let cfg = EngineConfig {
        scheduler: SchedulerConfig {
            max_batch_tokens: chunk,
            prefill_chunk: chunk,
            max_seqs: 32,
        },
        max_context,
        attention: opts.attention.clone(),
    };
    Ok(Engine::new(group, model.tokenizer.clone(), cfg))
}
