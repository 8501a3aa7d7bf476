//! retrowave's HTTP server: an OpenAI-compatible API (`/v1/completions`, `/v1/chat/completions`,
//! `/v1/models`, streaming over SSE) with Bearer API keys, health and readiness probes, and
//! Prometheus metrics on `/metrics`, over one engine that a dedicated thread owns and steps
//! (continuous batching: every request in flight shares each step).
//!
//! [`serve`] binds the listener first (so `/health` answers while the model loads), runs the
//! caller's loader on the engine thread (it builds an engine for whatever backend it chose and
//! hands it to [`EngineHost::run`]), and on SIGTERM or Ctrl-C stops accepting connections, lets
//! the requests in flight finish, stops the engine and returns.

pub mod config;
pub mod driver;
pub mod http;
pub mod metrics;
pub mod openai;

pub use config::{ConfigError, ServeConfig};
pub use driver::{EngineClient, EngineHost, ModelInfo};

use std::net::SocketAddr;

/// An error of the loader, from the binary.
pub type LoadError = Box<dyn std::error::Error + Send + Sync>;

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot install the Prometheus recorder: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("cannot start the engine thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot load the model: {0}")]
    Load(LoadError),
    #[error("the engine thread panicked")]
    EnginePanicked,
}

/// Serves `cfg` until SIGTERM or Ctrl-C. `load` runs on the engine thread: it opens the model
/// named by `host.config()`, builds an engine and calls [`EngineHost::run`] with it.
pub fn serve<F>(cfg: ServeConfig, load: F) -> Result<(), ServeError>
where
    F: FnOnce(EngineHost) -> Result<(), LoadError> + Send + 'static,
{
    cfg.validate()?;
    let prometheus = metrics::install()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("retrowave-http")
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    let addr = format!("{}:{}", cfg.server.host, cfg.server.port);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(&addr))
        .map_err(|source| ServeError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let local: SocketAddr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: addr.clone(),
        source,
    })?;
    let (client, host) = driver::channel(cfg.clone());
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel::<()>();
    let engine = std::thread::Builder::new()
        .name("retrowave-engine".into())
        .spawn(move || {
            let r = load(host);
            let _ = ended_tx.send(());
            r
        })
        .map_err(ServeError::Thread)?;
    eprintln!("retrowave: listening on http://{local}");
    if cfg.server.api_keys.is_empty() && !local.ip().is_loopback() {
        tracing::warn!(%local, "listening beyond this machine without API keys");
    }
    let app = http::router(&cfg, client.clone(), prometheus);
    let served = rt.block_on(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                tokio::select! {
                    _ = http::shutdown_signal() => eprintln!("retrowave: shutting down; finishing the requests in flight"),
                    _ = ended_rx => tracing::warn!("the engine stopped; shutting down"),
                }
            })
            .await
    });
    client.shutdown();
    drop(client);
    let loaded = engine.join().map_err(|_| ServeError::EnginePanicked)?;
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    loaded.map_err(ServeError::Load)?;
    served.map_err(ServeError::Http)?;
    eprintln!("retrowave: stopped");
    Ok(())
}
