//! The server's configuration: one TOML file (see `configs/` and `configs/README.md`) with a
//! section each for the model, the device, the attention mode (with every wave-index parameter),
//! the KV store, the scheduler and the HTTP server. Every key has a default; an unknown key or a
//! value of the wrong type is an error that names it, and [`ServeConfig::validate`] rejects values
//! that make no sense.

use std::path::{Path, PathBuf};

use retrowave_core::{AttentionMode, WaveConfig};
use retrowave_store::{IoChoice, StoreConfig};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

/// Errors reading or checking a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (the message names the key).
    #[error("invalid config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    /// A value out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration of `retrowave serve`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    pub model: ModelSection,
    pub device: DeviceSection,
    pub attention: AttentionSection,
    #[serde(serialize_with = "serialize_store")]
    pub store: StoreConfig,
    pub scheduler: SchedulerSection,
    pub server: ServerSection,
}

/// `[model]`: what is served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// A registry name (fetched on first use) or the path of a .gguf file or Hugging Face folder.
    pub name: String,
    /// The name clients use in `"model"` and see in `/v1/models` (default: `name`, or the file
    /// stem of a path).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_name: Option<String>,
    /// Context limit in tokens (prompt + generated); 0 = the model's.
    pub max_context: usize,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            name: retrowave_model::registry::DEFAULT_MODEL.to_string(),
            served_name: None,
            max_context: 0,
        }
    }
}

impl ModelSection {
    /// The name clients use for the model.
    pub fn served_name(&self) -> String {
        if let Some(n) = &self.served_name {
            return n.clone();
        }
        let path = Path::new(&self.name);
        if (self.name.contains(std::path::MAIN_SEPARATOR) || path.extension().is_some())
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            return stem.to_string();
        }
        self.name.clone()
    }
}

/// `[device]`: where the model runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceSection {
    /// `auto` (the first GPU if there is one, else the CPU), `cpu`, `cuda` or `cuda:N`.
    pub name: String,
    /// Tensor-parallel degree: workers (on GPUs, consecutive devices from `name`'s).
    pub tp: usize,
}

impl Default for DeviceSection {
    fn default() -> Self {
        DeviceSection {
            name: "auto".into(),
            tp: 1,
        }
    }
}

/// How decode steps attend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKind {
    /// Exact attention over every cached token.
    #[default]
    Full,
    /// The wave index, built after each prefill (parameters in `[attention.wave]`).
    Wave,
}

/// `[attention]`: the attention mode and, under `[attention.wave]`, every wave-index parameter
/// (any subset; the others keep retrowave's defaults).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttentionSection {
    pub mode: AttentionKind,
    pub wave: WaveConfig,
}

impl AttentionSection {
    /// The engine's attention mode.
    pub fn mode(&self) -> AttentionMode {
        match self.mode {
            AttentionKind::Full => AttentionMode::Full,
            AttentionKind::Wave => AttentionMode::Wave(self.wave.clone()),
        }
    }

    /// Sets the mode from a command-line name: `full`, `wave` or `wave:PRESET` (a preset replaces
    /// the `[attention.wave]` parameters).
    pub fn set_from_name(&mut self, name: &str) -> Result<(), ConfigError> {
        match AttentionMode::parse(name).map_err(ConfigError::Invalid)? {
            AttentionMode::Full => self.mode = AttentionKind::Full,
            AttentionMode::Wave(preset) => {
                self.mode = AttentionKind::Wave;
                if name.contains(':') {
                    self.wave = preset;
                }
            }
        }
        Ok(())
    }
}

/// `[scheduler]`: step and admission limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSection {
    /// Most tokens (decode tokens + prompt chunks) in one step.
    pub max_batch_tokens: usize,
    /// Most prompt tokens of one sequence in one step.
    pub prefill_chunk: usize,
    /// Most sequences running at once (and in one step).
    pub max_seqs: usize,
    /// KV budget of the dense cache in tokens: the running sequences' prompt + `max_tokens`
    /// together stay within it, the other requests wait in arrival order. 0 = no limit.
    pub kv_cache_tokens: usize,
    /// Most requests waiting; more are refused with 503.
    pub max_waiting: usize,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        // Sized for the default model on a CPU: a 128-token step takes a few hundred ms on two
        // cores, so prompt chunks never hold the running streams up for long (512-token chunks
        // gave an inter-token p99 of 1.9 s in `bench serve`, these 0.54 s at the same
        // throughput). GPUs take larger steps: see configs/long-context.toml.
        SchedulerSection {
            max_batch_tokens: 128,
            prefill_chunk: 96,
            max_seqs: 32,
            kv_cache_tokens: 65536,
            max_waiting: 1024,
        }
    }
}

/// `[server]`: the HTTP listener, API keys and request limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// Address to bind; 127.0.0.1 keeps the server local to the machine.
    pub host: String,
    /// TCP port; 0 picks a free one (printed at start).
    pub port: u16,
    /// Accepted Bearer keys; empty = no authentication. `--print-config` hides them.
    #[serde(serialize_with = "serialize_keys")]
    pub api_keys: Vec<String>,
    /// Largest request body in bytes (413 above).
    pub max_body_bytes: usize,
    /// A request still waiting or generating after this many seconds ends with finish reason
    /// `timeout`; 0 = never.
    pub request_timeout_seconds: u64,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            host: "127.0.0.1".into(),
            port: 8000,
            api_keys: Vec::new(),
            max_body_bytes: 16 << 20,
            request_timeout_seconds: 600,
        }
    }
}

fn serialize_keys<S: Serializer>(keys: &[String], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(keys.iter().map(|_| "<hidden>"))
}

/// `StoreConfig` reads TOML but does not write it; written here for `--print-config`.
fn serialize_store<S: Serializer>(c: &StoreConfig, s: S) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(None)?;
    m.serialize_entry("page_tokens", &c.page_tokens)?;
    m.serialize_entry("host_capacity_bytes", &c.host_capacity_bytes)?;
    m.serialize_entry("dirs", &c.dirs)?;
    if let Some(b) = c.max_disk_bytes_per_dir {
        m.serialize_entry("max_disk_bytes_per_dir", &b)?;
    }
    let io = match c.io {
        IoChoice::Auto => "auto",
        IoChoice::Uring => "uring",
        IoChoice::Pread => "pread",
    };
    m.serialize_entry("io", io)?;
    m.serialize_entry("queue_depth", &c.queue_depth)?;
    m.serialize_entry("direct", &c.direct)?;
    m.serialize_entry("staging_bytes", &c.staging_bytes)?;
    m.end()
}

impl ServeConfig {
    /// Parses TOML text (`path` names the file in errors).
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Checks the values that TOML types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.model.name.is_empty() {
            return bad("model.name must not be empty".into());
        }
        if self.device.tp == 0 {
            return bad("device.tp must be at least 1".into());
        }
        for (key, v) in [
            (
                "scheduler.max_batch_tokens",
                self.scheduler.max_batch_tokens,
            ),
            ("scheduler.prefill_chunk", self.scheduler.prefill_chunk),
            ("scheduler.max_seqs", self.scheduler.max_seqs),
            ("server.max_body_bytes", self.server.max_body_bytes),
        ] {
            if v == 0 {
                return bad(format!("{key} must be at least 1, got 0"));
            }
        }
        if self.server.host.is_empty() {
            return bad("server.host must not be empty".into());
        }
        if let Some(i) = self.server.api_keys.iter().position(|k| k.is_empty()) {
            return bad(format!("server.api_keys[{i}] is empty"));
        }
        self.attention
            .wave
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("attention.wave: {e}")))?;
        self.store.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }

    /// The configuration as TOML (API keys hidden).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Invalid(format!("cannot write TOML: {e}")))
    }

    /// The request timeout, if any.
    pub fn request_timeout(&self) -> Option<std::time::Duration> {
        (self.server.request_timeout_seconds > 0)
            .then(|| std::time::Duration::from_secs(self.server.request_timeout_seconds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServeConfig, ConfigError> {
        ServeConfig::from_toml(text, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_is_the_default() {
        let c = parse("").unwrap();
        assert_eq!(c, ServeConfig::default());
        assert_eq!(c.server.host, "127.0.0.1");
        assert_eq!(c.model.name, retrowave_model::registry::DEFAULT_MODEL);
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = parse("[server]\nprot = 80\n").unwrap_err().to_string();
        assert!(e.contains("prot") && e.contains("test.toml"), "{e}");
        let e = parse("[attention.wave]\nretrieval_frac = 0.1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("retrieval_frac"), "{e}");
        let e = parse("[store]\nhost_capacity = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("host_capacity"), "{e}");
        let e = parse("[scheduler]\nmax_seqs = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_seqs"), "{e}");
        let e = parse("[attention]\nmode = \"sparse\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sparse"), "{e}");
        let e = parse("[sever]\n").unwrap_err().to_string();
        assert!(e.contains("sever"), "{e}");
        let c = parse("[attention.wave]\nretrieval_fraction = 1.5\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("retrieval_fraction"), "{e}");
        let c = parse("[scheduler]\nmax_seqs = 0\n").unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("scheduler.max_seqs")
        );
    }

    #[test]
    fn print_config_round_trips_and_hides_keys() {
        let mut c = parse(
            "[model]\nname = \"qwen2.5-coder-0.5b\"\n[attention]\nmode = \"wave\"\n\
             [attention.wave]\nwindow_tokens = 128\n[store]\ndirs = [\"/tmp/kv\"]\nio = \"pread\"\n\
             [server]\napi_keys = [\"sk-secret\"]\nport = 9000\n",
        )
        .unwrap();
        assert_eq!(c.attention.wave.window_tokens, 128);
        assert_eq!(
            c.attention.wave.sink_tokens,
            WaveConfig::default().sink_tokens
        );
        let text = c.to_toml().unwrap();
        assert!(!text.contains("sk-secret"), "{text}");
        let back = parse(&text).unwrap();
        c.server.api_keys = vec!["<hidden>".into()];
        assert_eq!(back, c);
        assert!(matches!(back.attention.mode(), AttentionMode::Wave(w) if w.window_tokens == 128));
    }

    #[test]
    fn attention_names_and_served_names() {
        let mut a = AttentionSection::default();
        a.wave.window_tokens = 7;
        a.set_from_name("wave").unwrap();
        assert_eq!((a.mode, a.wave.window_tokens), (AttentionKind::Wave, 7));
        a.set_from_name("wave:published").unwrap();
        assert_eq!(a.wave, WaveConfig::published());
        a.set_from_name("full").unwrap();
        assert_eq!(a.mode(), AttentionMode::Full);
        assert!(a.set_from_name("sparse").is_err());
        let mut m = ModelSection::default();
        assert_eq!(m.served_name(), "smollm2-135m");
        m.name = "/models/my-model.gguf".into();
        assert_eq!(m.served_name(), "my-model");
        m.served_name = Some("prod".into());
        assert_eq!(m.served_name(), "prod");
    }
}
