//! The engine thread: one OS thread owns the [`Engine`] and runs its steps; HTTP handlers reach it
//! through a channel of [`Command`]s and get each request's [`Output`]s back on a channel of their
//! own. A request whose receiver is dropped (the client went away) is cancelled at the next step
//! and its KV slot freed.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use retrowave_core::Backend;
use retrowave_engine::{
    AdmissionConfig, Engine, EngineError, Event, FinishReason, RequestOptions, SchedulerConfig,
    SeqId, Usage,
};
use retrowave_model::chat::ChatTemplate;
use retrowave_model::sampling::SamplingParams;
use retrowave_model::tokenizer::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use crate::config::ServeConfig;
use crate::metrics;

/// What the HTTP side knows of the loaded model.
pub struct ModelInfo {
    /// The name clients use.
    pub id: String,
    /// Unix time the model was loaded.
    pub created: u64,
    /// Context limit in tokens (prompt + generated).
    pub max_context: usize,
    pub tokenizer: Arc<Tokenizer>,
    /// The compiled chat template, if the model has a usable one.
    pub chat_template: Option<ChatTemplate>,
    /// The backend's name (for logs and `/v1/models`).
    pub backend: String,
}

/// One generation request.
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// When the request ends with finish reason `timeout`.
    pub deadline: Option<Instant>,
    /// When the server received it (latencies count from here).
    pub arrived: Instant,
    /// Where its outputs go; dropping the receiver cancels the request.
    pub outputs: UnboundedSender<Output>,
}

/// A message to the engine thread.
pub enum Command {
    Generate(GenerateRequest),
    /// Finish the requests in flight, then stop.
    Shutdown,
}

/// Why the engine refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The request is invalid for this engine (400).
    Invalid(String),
    /// Too many requests are waiting (503).
    Overloaded(String),
    /// The engine failed (500).
    Failed(String),
}

/// What a request gets back, in order: `Accepted`, tokens, then one `Done`; or one `Refused`.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Queued by the engine (a stream may start).
    Accepted,
    /// A generated token and its newly printable text (may be empty).
    Token { text: String },
    /// The end: remaining text, why, and the counts.
    Done {
        text: String,
        reason: FinishReason,
        usage: Usage,
    },
    /// Not admitted (nothing else follows).
    Refused(Refusal),
}

/// Handle of the engine thread for the HTTP side.
#[derive(Clone)]
pub struct EngineClient {
    tx: Sender<Command>,
    model: Arc<OnceLock<ModelInfo>>,
}

impl EngineClient {
    /// The model, once loaded (the server is ready).
    pub fn model(&self) -> Option<&ModelInfo> {
        self.model.get()
    }

    /// Sends a request; false if the engine thread is gone.
    pub fn submit(&self, req: GenerateRequest) -> bool {
        self.tx.send(Command::Generate(req)).is_ok()
    }

    /// Asks the engine thread to finish what is in flight and stop.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }
}

/// Given to the model loader on the engine thread: [`EngineHost::run`] takes the loaded engine
/// and serves it until shutdown.
pub struct EngineHost {
    rx: Receiver<Command>,
    model: Arc<OnceLock<ModelInfo>>,
    cfg: ServeConfig,
}

/// A channel pair: the client for the HTTP side and the host for the engine thread.
pub fn channel(cfg: ServeConfig) -> (EngineClient, EngineHost) {
    let (tx, rx) = std::sync::mpsc::channel();
    let model = Arc::new(OnceLock::new());
    (
        EngineClient {
            tx,
            model: model.clone(),
        },
        EngineHost { rx, model, cfg },
    )
}

/// A request in flight.
struct Live {
    outputs: UnboundedSender<Output>,
    arrived: Instant,
    last_token: Option<Instant>,
}

impl EngineHost {
    /// The configuration being served.
    pub fn config(&self) -> &ServeConfig {
        &self.cfg
    }

    /// Applies the scheduler limits of the configuration to `engine`, marks the server ready and
    /// runs the engine until [`Command::Shutdown`] (or every client handle is dropped) and the
    /// requests in flight are done.
    pub fn run<B: Backend + 'static>(self, mut engine: Engine<B>) {
        let sc = &self.cfg.scheduler;
        engine.set_scheduler(SchedulerConfig {
            max_batch_tokens: sc.max_batch_tokens,
            prefill_chunk: sc.prefill_chunk,
            max_seqs: sc.max_seqs,
        });
        engine.set_admission(AdmissionConfig {
            kv_budget_tokens: sc.kv_cache_tokens,
            max_running: sc.max_seqs,
        });
        let max_waiting = sc.max_waiting;
        let tok = engine.tokenizer().clone();
        let chat_template = match tok.chat_template().map(ChatTemplate::new) {
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "the model's chat template does not compile; /v1/chat/completions is off");
                None
            }
            None => None,
        };
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let info = ModelInfo {
            id: self.cfg.model.served_name(),
            created,
            max_context: engine.config().max_context,
            tokenizer: tok,
            chat_template,
            backend: engine.group().backend_name(),
        };
        tracing::info!(model = %info.id, backend = %info.backend, context = info.max_context, "engine ready");
        let _ = self.model.set(info);
        metrics::set_engine_stats(&engine.stats());

        let mut live: HashMap<SeqId, Live> = HashMap::new();
        let mut open = true;
        loop {
            // Take new commands; wait for one when there is nothing to compute.
            if engine.is_idle() {
                if !open {
                    break;
                }
                match self.rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(cmd) => open &= accept(&mut engine, &mut live, cmd, max_waiting),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => open = false,
                }
            }
            while open {
                match self.rx.try_recv() {
                    Ok(cmd) => open &= accept(&mut engine, &mut live, cmd, max_waiting),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => open = false,
                }
            }
            // Clients that went away.
            let gone: Vec<SeqId> = live
                .iter()
                .filter(|(_, l)| l.outputs.is_closed())
                .map(|(&id, _)| id)
                .collect();
            for id in gone {
                if let Some(ev) = engine.cancel(id) {
                    tracing::info!(seq = id, "client went away; request cancelled");
                    route(&mut live, ev);
                }
            }
            let events = match engine.step() {
                Ok(ev) => ev,
                Err(EngineError::StepFailed { source, events }) => {
                    tracing::error!(error = %source, "engine step failed; its requests end");
                    events
                }
                Err(e) => {
                    tracing::error!(error = %e, "engine step failed; every request ends");
                    let ids: Vec<SeqId> = live.keys().copied().collect();
                    ids.into_iter().filter_map(|id| engine.cancel(id)).collect()
                }
            };
            for ev in events {
                route(&mut live, ev);
            }
            metrics::set_engine_stats(&engine.stats());
        }
        tracing::info!("engine stopped");
    }
}

/// Handles a command; returns false for shutdown.
fn accept<B: Backend + 'static>(
    engine: &mut Engine<B>,
    live: &mut HashMap<SeqId, Live>,
    cmd: Command,
    max_waiting: usize,
) -> bool {
    let req = match cmd {
        Command::Shutdown => return false,
        Command::Generate(r) => r,
    };
    if engine.stats().waiting >= max_waiting {
        let _ = req
            .outputs
            .send(Output::Refused(Refusal::Overloaded(format!(
                "{max_waiting} requests are already waiting; try again later"
            ))));
        return true;
    }
    let options = RequestOptions {
        deadline: req.deadline,
    };
    match engine.submit(req.prompt, req.params, options) {
        Ok(id) => {
            let _ = req.outputs.send(Output::Accepted);
            live.insert(
                id,
                Live {
                    outputs: req.outputs,
                    arrived: req.arrived,
                    last_token: None,
                },
            );
        }
        Err(e) => {
            let refusal = match e {
                EngineError::EmptyPrompt
                | EngineError::PromptTooLong { .. }
                | EngineError::TokenOutOfRange { .. }
                | EngineError::Sampling(_)
                | EngineError::ExceedsKvBudget { .. } => Refusal::Invalid(e.to_string()),
                other => Refusal::Failed(other.to_string()),
            };
            let _ = req.outputs.send(Output::Refused(refusal));
        }
    }
    true
}

/// Sends an event to its request and records its metrics.
fn route(live: &mut HashMap<SeqId, Live>, ev: Event) {
    let now = Instant::now();
    match ev {
        Event::Token { id, text, .. } => {
            if let Some(l) = live.get_mut(&id) {
                match l.last_token {
                    None => metrics::record_first_token((now - l.arrived).as_secs_f64()),
                    Some(t) => metrics::record_inter_token((now - t).as_secs_f64()),
                }
                l.last_token = Some(now);
                let _ = l.outputs.send(Output::Token { text });
            }
        }
        Event::Finished {
            id,
            reason,
            text,
            usage,
        } => {
            if let Some(l) = live.remove(&id) {
                // An end-of-generation first token is sampled but sends no token event.
                if l.last_token.is_none() && usage.completion_tokens > 0 {
                    metrics::record_first_token((now - l.arrived).as_secs_f64());
                }
                let gone = l.outputs.is_closed();
                metrics::record_finished(
                    &usage,
                    metrics::reason_label(reason, gone),
                    (now - l.arrived).as_secs_f64(),
                );
                let _ = l.outputs.send(Output::Done {
                    text,
                    reason,
                    usage,
                });
            }
        }
    }
}
