//! `retrowave serve`: the configuration (file, then environment and flags on top) and the model
//! loader that runs on the server's engine thread.

use std::path::PathBuf;

use anyhow::{Context, Result};
use retrowave_cuda::DeviceRequest;
use retrowave_model::registry;
use retrowave_server::{EngineHost, LoadError, ServeConfig};

use crate::load;

/// Flags of `retrowave serve`; each one given overrides the configuration file.
#[derive(clap::Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML configuration file (see configs/README.md); without one, the defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Registry name or path to a .gguf file or Hugging Face folder [default: smollm2-135m].
    #[arg(long, short, env = "RETROWAVE_MODEL")]
    pub model: Option<String>,
    /// Where the model runs: auto (the first GPU if there is one, else the CPU), cpu, cuda or
    /// cuda:N [default: auto].
    #[arg(long, env = "RETROWAVE_DEVICE")]
    pub device: Option<String>,
    /// Tensor-parallel degree [default: 1].
    #[arg(long)]
    pub tp: Option<usize>,
    /// Context limit in tokens (0 = the model's).
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Decode attention: full, wave or wave:published.
    #[arg(long)]
    pub attention: Option<String>,
    /// TOML file of wave-index parameters (replaces [attention.wave]).
    #[arg(long)]
    pub wave_config: Option<PathBuf>,
    /// Address to bind [default: 127.0.0.1].
    #[arg(long)]
    pub host: Option<String>,
    /// TCP port; 0 picks a free one [default: 8000].
    #[arg(long)]
    pub port: Option<u16>,
    /// Accepted Bearer API key (repeatable; replaces the file's keys).
    #[arg(long, env = "RETROWAVE_API_KEY", hide_env_values = true)]
    pub api_key: Vec<String>,
    /// Most sequences running at once.
    #[arg(long)]
    pub max_seqs: Option<usize>,
    /// KV budget of the running sequences in tokens (0 = no limit).
    #[arg(long)]
    pub kv_cache_tokens: Option<usize>,
    /// Seconds before a request ends with finish reason `timeout` (0 = never).
    #[arg(long)]
    pub request_timeout: Option<u64>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// The effective configuration: the file (or the defaults), then the flags.
pub fn effective_config(args: &ServeArgs) -> Result<ServeConfig> {
    let mut cfg = match &args.config {
        Some(path) => ServeConfig::from_file(path)?,
        None => ServeConfig::default(),
    };
    if let Some(m) = &args.model {
        cfg.model.name = m.clone();
    }
    if let Some(d) = &args.device {
        cfg.device.name = d.clone();
    }
    if let Some(tp) = args.tp {
        cfg.device.tp = tp;
    }
    if let Some(c) = args.max_context {
        cfg.model.max_context = c;
    }
    if let Some(a) = &args.attention {
        cfg.attention.set_from_name(a)?;
    }
    if let Some(path) = &args.wave_config
        && let retrowave_core::AttentionMode::Wave(w) = load::attention_mode("wave", Some(path))?
    {
        cfg.attention.wave = w;
    }
    if let Some(h) = &args.host {
        cfg.server.host = h.clone();
    }
    if let Some(p) = args.port {
        cfg.server.port = p;
    }
    if !args.api_key.is_empty() {
        cfg.server.api_keys = args.api_key.clone();
    }
    if let Some(n) = args.max_seqs {
        cfg.scheduler.max_seqs = n;
    }
    if let Some(n) = args.kv_cache_tokens {
        cfg.scheduler.kv_cache_tokens = n;
    }
    if let Some(t) = args.request_timeout {
        cfg.server.request_timeout_seconds = t;
    }
    cfg.validate()?;
    cfg.device
        .name
        .parse::<DeviceRequest>()
        .with_context(|| format!("invalid device.name '{}'", cfg.device.name))?;
    Ok(cfg)
}

/// Runs `retrowave serve`.
pub fn run(args: ServeArgs) -> Result<()> {
    let cfg = effective_config(&args)?;
    if args.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    // Fail before binding on a model name that is neither in the registry nor a path.
    registry::resolve(&cfg.model.name)?;
    retrowave_server::serve(cfg, load_engine)?;
    Ok(())
}

/// Opens the configured model, builds the engine on the configured device and serves it (on
/// the server's engine thread).
fn load_engine(host: EngineHost) -> Result<(), LoadError> {
    let cfg = host.config().clone();
    let model = load::open(&cfg.model.name).map_err(boxed)?;
    let opts = load::EngineOptions {
        attention: cfg.attention.mode(),
        tp: cfg.device.tp,
        max_context: cfg.model.max_context,
        prefill_chunk: cfg.scheduler.prefill_chunk,
        store: None,
    };
    match load::cuda_backends(&cfg.device.name, cfg.device.tp).map_err(boxed)? {
        None => {
            let opts = load::EngineOptions {
                store: load::cpu_store(&cfg.store).map_err(boxed)?,
                ..opts
            };
            host.run(load::engine(&model, opts).map_err(boxed)?)
        }
        Some(gpus) => {
            if !cfg.store.dirs.is_empty() {
                tracing::warn!(
                    "store.dirs is set, but GPU workers keep their KV in GPU and pinned host \
                     memory: the disk tier serves CPU workers only"
                );
            }
            host.run(load::engine_on(&model, opts, gpus).map_err(boxed)?)
        }
    }
    Ok(())
}

/// An error with its whole chain of causes in the message.
fn boxed(e: anyhow::Error) -> LoadError {
    format!("{e:#}").into()
}
