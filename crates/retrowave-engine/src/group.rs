//! The tensor-parallel worker group: one worker per device (or per thread on the CPU), all running
//! the same step on their shard, joined by collectives.
//!
//! With one worker the group calls it directly on the caller's thread. With several, each worker
//! lives on its own thread and receives the step through a channel; the row-parallel projections
//! are summed on the devices where the backend has a collective (NCCL on GPUs,
//! [`Backend::join_group`]), else by [`HostGroup`], an in-process all-reduce over host memory.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

use retrowave_core::{
    Backend, BatchLayout, FidelitySample, HostGroup, RowSampling, WaveConfig, WaveStats,
};
use retrowave_model::arch::{ModelConfig, WeightSource};

use crate::EngineError;
use crate::shard;
use crate::worker::{Overlap, Reduce, Worker};

enum Cmd {
    Forward {
        tokens: Arc<Vec<u32>>,
        batch: Arc<BatchLayout>,
        logits_rows: Arc<Vec<usize>>,
        sampling: Option<Arc<Vec<RowSampling>>>,
    },
    Open {
        slot: usize,
        max_tokens: usize,
    },
    Close {
        slot: usize,
    },
    Truncate {
        slot: usize,
        len: usize,
    },
    BuildIndex {
        slot: usize,
        cfg: WaveConfig,
    },
    FillSynthetic {
        slot: usize,
        len: usize,
        seed: u64,
    },
    FillSyntheticIndexed {
        slot: usize,
        len: usize,
        room: usize,
        seed: u64,
        cfg: WaveConfig,
    },
    Fork {
        src: usize,
        dst: usize,
    },
    WaveStats {
        slot: usize,
    },
    SetProbe {
        slot: usize,
        on: bool,
    },
    TakeProbe {
        slot: usize,
    },
    SetOverlap(Overlap),
    SetReduce(Reduce),
    FailNextStep {
        layer: usize,
        panic: bool,
    },
}

/// What a worker sends back.
enum Data {
    None,
    Logits(Vec<f32>),
    Tokens(Vec<u32>),
    Stats(Option<WaveStats>),
    Probe(Vec<FidelitySample>),
}

type Reply = Result<Data, EngineError>;

struct Remote {
    tx: Sender<Cmd>,
    handle: Option<JoinHandle<()>>,
}

/// The replies to one command, in rank order.
struct Collected {
    replies: Vec<Reply>,
    /// Whether the group's collectives were aborted while waiting for them.
    aborted: bool,
    /// The rank whose failure arrived first.
    first_failed: Option<usize>,
}

/// How long the group waits for the other workers' replies once one worker's step failed,
/// before it aborts the group's collectives: a rank that fails in the middle of a step never
/// joins its next collective, so the others would wait in it forever.
const STEP_FAILURE_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

/// A group of workers that together hold the whole model.
pub struct WorkerGroup<B: Backend + 'static> {
    device_sampling: bool,
    local: Option<Worker<B>>,
    remotes: Vec<Remote>,
    /// Every worker's replies, tagged with its rank.
    replies: Receiver<(usize, Reply)>,
    /// The workers' backends (shared handles), to abort and rebuild their group.
    backends: Vec<B>,
    /// The host-memory group the workers sum through when the backend has no collective.
    host_group: Option<Arc<HostGroup>>,
    /// Times the group's collectives were aborted and rebuilt after a failed step.
    rebuilds: u64,
    vocab: usize,
}

impl<B: Backend + 'static> WorkerGroup<B> {
    /// Loads the model over `backends.len()` workers (the tensor-parallel degree).
    pub fn load(
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        backends: Vec<B>,
    ) -> Result<Self, EngineError> {
        let world = backends.len();
        let shards = shard::plan(cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden, world)?;
        if world == 1 {
            let backend = backends
                .into_iter()
                .next()
                .ok_or_else(|| EngineError::Config("no backend".into()))?;
            let shard = shards
                .into_iter()
                .next()
                .ok_or_else(|| EngineError::Config("no shard".into()))?;
            let w = Worker::load(backend, cfg, src, shard, Reduce::Alone)?;
            return Ok(WorkerGroup {
                device_sampling: w.samples_on_device(),
                local: Some(w),
                remotes: Vec::new(),
                replies: mpsc::channel().1,
                backends: Vec::new(),
                host_group: None,
                rebuilds: 0,
                vocab: cfg.vocab_size,
            });
        }
        // Partial sums go through the devices' collective (NCCL) where the backend has one,
        // else through host memory.
        let host_group = (!B::join_group(&backends)?).then(|| Arc::new(HostGroup::new(world)));
        let reduce = match &host_group {
            None => Reduce::Device,
            Some(g) => Reduce::Host(g.clone()),
        };
        tracing::info!(
            world,
            collective = if matches!(reduce, Reduce::Device) {
                "the backend's (NCCL on GPUs, in process on the CPU)"
            } else {
                "host memory"
            },
            "tensor-parallel group"
        );
        let device_sampling = backends.iter().all(|b| b.samples_on_device());
        let handles = backends.clone();
        let mut remotes = Vec::with_capacity(world);
        let (reply_tx, replies) = mpsc::channel::<(usize, Reply)>();
        for (rank, (backend, shard)) in backends.into_iter().zip(shards).enumerate() {
            // Weights are loaded here (the source borrows the model file), then moved to the thread.
            let w = Worker::load(backend, cfg, src, shard, reduce.clone())?;
            let (tx, crx) = mpsc::channel::<Cmd>();
            let ctx = reply_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("retrowave-worker-{rank}"))
                .spawn(move || serve(w, rank, crx, ctx))
                .map_err(|e| EngineError::Config(format!("cannot start worker thread: {e}")))?;
            remotes.push(Remote {
                tx,
                handle: Some(handle),
            });
        }
        Ok(WorkerGroup {
            device_sampling,
            local: None,
            remotes,
            replies,
            backends: handles,
            host_group,
            rebuilds: 0,
            vocab: cfg.vocab_size,
        })
    }

    /// Tensor-parallel degree.
    pub fn world(&self) -> usize {
        if self.local.is_some() {
            1
        } else {
            self.remotes.len()
        }
    }

    /// Vocabulary size (columns of the logits).
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Name of the backend(s).
    pub fn backend_name(&self) -> String {
        match &self.local {
            Some(w) => w.backend().name(),
            None => format!("{} workers", self.remotes.len()),
        }
    }

    /// Sends a command to every worker and collects the replies in rank order.
    fn broadcast(&mut self, make: impl Fn() -> Cmd) -> Result<Vec<Data>, EngineError> {
        self.send_all(make)?;
        first_error(self.collect(false)?.replies)
    }

    fn send_all(&self, make: impl Fn() -> Cmd) -> Result<(), EngineError> {
        for r in &self.remotes {
            r.tx.send(make()).map_err(|_| EngineError::WorkerLost)?;
        }
        Ok(())
    }

    /// Every worker's reply to the command just sent, in rank order, and whether the group's
    /// collectives were aborted. With `abort_on_failure` (steps), once a reply is an error the
    /// others get [`STEP_FAILURE_GRACE`] to arrive; then the collectives are aborted, so that
    /// workers waiting in one for the failed rank return (with an error) instead of never.
    fn collect(&mut self, abort_on_failure: bool) -> Result<Collected, EngineError> {
        let n = self.remotes.len();
        let mut got: Vec<Option<Reply>> = (0..n).map(|_| None).collect();
        let (mut left, mut failed_at, mut aborted, mut first_failed) = (n, None, false, None);
        while left > 0 {
            let next = match failed_at {
                Some(t) if !aborted => {
                    let wait = STEP_FAILURE_GRACE.saturating_sub(std::time::Instant::elapsed(&t));
                    match self.replies.recv_timeout(wait) {
                        Ok(r) => Some(r),
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            aborted = self.abort_collectives();
                            if aborted {
                                tracing::warn!(
                                    waiting = left,
                                    "a worker's step failed while others wait in a \
                                     collective: the tensor-parallel group was aborted"
                                );
                            } else {
                                tracing::error!(
                                    waiting = left,
                                    "a worker's step failed and others have not finished it; \
                                     this backend cannot abort its group: waiting for them"
                                );
                                failed_at = None;
                            }
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => None,
                    }
                }
                _ => self.replies.recv().ok(),
            };
            let (rank, reply) = next.ok_or(EngineError::WorkerLost)?;
            if reply.is_err() && first_failed.is_none() {
                first_failed = Some(rank);
                if abort_on_failure {
                    failed_at = Some(std::time::Instant::now());
                }
            }
            if let Some(slot) = got.get_mut(rank) {
                *slot = Some(reply);
                left -= 1;
            }
        }
        Ok(Collected {
            replies: got.into_iter().flatten().collect(),
            aborted,
            first_failed,
        })
    }

    /// Aborts the collectives the workers sum through (the host group, or the backends'); whether
    /// that could be done.
    fn abort_collectives(&self) -> bool {
        match &self.host_group {
            Some(g) => {
                g.abort();
                true
            }
            None => B::abort_group(&self.backends),
        }
    }

    /// Runs a step command on every worker. When it fails on any, the step's sequences are
    /// rewound on every worker (ranks that finished it keep no token of it), and if the
    /// group's collectives had to be aborted they are rebuilt: the group goes on with the other
    /// sequences, and the first failure is returned.
    fn step(
        &mut self,
        make: impl Fn() -> Cmd,
        batch: &BatchLayout,
    ) -> Result<Vec<Data>, EngineError> {
        self.send_all(make)?;
        let Collected {
            replies,
            aborted,
            first_failed,
        } = self.collect(true)?;
        let Some(first) = first_failed else {
            return first_error(replies);
        };
        // The failure that came first is the cause; the others may be its consequences.
        let cause = replies
            .into_iter()
            .nth(first)
            .and_then(|r| r.err())
            .unwrap_or(EngineError::WorkerLost);
        for s in &batch.seqs {
            let (slot, len) = (s.slot, s.start_pos);
            self.broadcast(|| Cmd::Truncate { slot, len })?;
        }
        if aborted {
            self.rebuild()?;
        }
        Err(cause)
    }

    /// A new group for the workers after their collectives were aborted.
    fn rebuild(&mut self) -> Result<(), EngineError> {
        let world = self.remotes.len();
        if self.host_group.is_some() {
            let g = Arc::new(HostGroup::new(world));
            self.host_group = Some(g.clone());
            self.broadcast(|| Cmd::SetReduce(Reduce::Host(g.clone())))?;
        } else {
            tracing::info!(world, "rebuilding the tensor-parallel group");
            if !B::join_group(&self.backends)? {
                return Err(EngineError::Config(
                    "the tensor-parallel group could not be rebuilt after an abort".into(),
                ));
            }
        }
        self.rebuilds += 1;
        tracing::warn!(
            world,
            rebuilds = self.rebuilds,
            "tensor-parallel group rebuilt"
        );
        Ok(())
    }

    /// Times the group's collectives were aborted and rebuilt after a failed step.
    pub fn rebuilds(&self) -> u64 {
        self.rebuilds
    }

    /// Makes the next step fail on worker `rank` at the attention of `layer`, as a rank-local
    /// failure in the middle of a step would, or with `panic` panic there, as a bug would (tests
    /// and `bench tp-recover`).
    #[doc(hidden)]
    pub fn fail_next_step(
        &mut self,
        rank: usize,
        layer: usize,
        panic: bool,
    ) -> Result<(), EngineError> {
        match (&mut self.local, self.remotes.get(rank)) {
            (Some(w), _) if rank == 0 => {
                w.fail_next_step(layer, panic);
                Ok(())
            }
            (None, Some(r)) => {
                r.tx.send(Cmd::FailNextStep { layer, panic })
                    .map_err(|_| EngineError::WorkerLost)?;
                let (got, reply) = self.replies.recv().map_err(|_| EngineError::WorkerLost)?;
                debug_assert_eq!(got, rank);
                reply.map(|_| ())
            }
            _ => Err(EngineError::Config(format!("no worker of rank {rank}"))),
        }
    }

    /// Builds the wave index of `slot` on every worker (each over its own KV heads).
    pub fn build_index(&mut self, slot: usize, cfg: &WaveConfig) -> Result<(), EngineError> {
        match &mut self.local {
            Some(w) => w.build_index(slot, cfg),
            None => self
                .broadcast(|| Cmd::BuildIndex {
                    slot,
                    cfg: cfg.clone(),
                })
                .map(|_| ()),
        }
    }

    /// Fills the cache of `slot` with `len` synthetic tokens and indexes them on every worker,
    /// with room for `room` more (benchmarks of contexts beyond GPU memory with a host tier).
    pub fn fill_synthetic_indexed(
        &mut self,
        slot: usize,
        len: usize,
        room: usize,
        seed: u64,
        cfg: &WaveConfig,
    ) -> Result<(), EngineError> {
        match &mut self.local {
            Some(w) => w.fill_synthetic_indexed(slot, len, room, seed, cfg),
            None => self
                .broadcast(|| Cmd::FillSyntheticIndexed {
                    slot,
                    len,
                    room,
                    seed,
                    cfg: cfg.clone(),
                })
                .map(|_| ()),
        }
    }

    /// Fills the cache of `slot` with `len` synthetic tokens on every worker (benchmarks of long
    /// contexts without a prefill; results from it must say so).
    pub fn fill_synthetic(
        &mut self,
        slot: usize,
        len: usize,
        seed: u64,
    ) -> Result<(), EngineError> {
        match &mut self.local {
            Some(w) => w.fill_synthetic(slot, len, seed),
            None => self
                .broadcast(|| Cmd::FillSynthetic { slot, len, seed })
                .map(|_| ()),
        }
    }

    /// Copies the cache of `src` into `dst` on every worker (a fork after a shared prefix).
    pub fn fork_slot(&mut self, src: usize, dst: usize) -> Result<(), EngineError> {
        match &mut self.local {
            Some(w) => w.fork_slot(src, dst),
            None => self.broadcast(|| Cmd::Fork { src, dst }).map(|_| ()),
        }
    }

    /// Wave counters of `slot`, summed over the workers (`None` without an index).
    pub fn wave_stats(&mut self, slot: usize) -> Result<Option<WaveStats>, EngineError> {
        let parts = match &mut self.local {
            Some(w) => vec![w.wave_stats(slot)],
            None => self
                .broadcast(|| Cmd::WaveStats { slot })?
                .into_iter()
                .map(|d| match d {
                    Data::Stats(s) => s,
                    _ => None,
                })
                .collect(),
        };
        let mut total: Option<WaveStats> = None;
        for p in parts.into_iter().flatten() {
            match &mut total {
                None => total = Some(p),
                Some(t) => {
                    t.add_counters(&p);
                    t.build_seconds = t.build_seconds.max(p.build_seconds);
                }
            }
        }
        Ok(total)
    }

    /// Turns the fidelity probe of `slot` on or off on every worker.
    pub fn set_probe(&mut self, slot: usize, on: bool) -> Result<(), EngineError> {
        match &mut self.local {
            Some(w) => w.set_probe(slot, on),
            None => self.broadcast(|| Cmd::SetProbe { slot, on }).map(|_| ()),
        }
    }

    /// Sets when the workers cut a step in two to overlap collectives ([`Overlap`]).
    pub fn set_overlap(&mut self, overlap: Overlap) -> Result<(), EngineError> {
        match &mut self.local {
            Some(w) => {
                w.set_overlap(overlap);
                Ok(())
            }
            None => self.broadcast(|| Cmd::SetOverlap(overlap)).map(|_| ()),
        }
    }

    /// Takes the fidelity samples of `slot` from every worker.
    pub fn take_probe(&mut self, slot: usize) -> Result<Vec<FidelitySample>, EngineError> {
        match &mut self.local {
            Some(w) => w.take_probe(slot),
            None => Ok(self
                .broadcast(|| Cmd::TakeProbe { slot })?
                .into_iter()
                .flat_map(|d| match d {
                    Data::Probe(p) => p,
                    _ => Vec::new(),
                })
                .collect()),
        }
    }

    /// Creates the cache of `slot` on every worker.
    pub fn open_slot(&mut self, slot: usize, max_tokens: usize) -> Result<(), EngineError> {
        match &mut self.local {
            Some(w) => w.open_slot(slot, max_tokens),
            None => self
                .broadcast(|| Cmd::Open { slot, max_tokens })
                .map(|_| ()),
        }
    }

    /// Frees the cache of `slot` on every worker.
    pub fn close_slot(&mut self, slot: usize) {
        match &mut self.local {
            Some(w) => w.close_slot(slot),
            None => {
                let _ = self.broadcast(|| Cmd::Close { slot });
            }
        }
    }

    /// Rewinds the cache of `slot` on every worker.
    pub fn truncate_slot(&mut self, slot: usize, len: usize) {
        match &mut self.local {
            Some(w) => w.truncate_slot(slot, len),
            None => {
                let _ = self.broadcast(|| Cmd::Truncate { slot, len });
            }
        }
    }

    /// Whether the workers pick tokens on the device ([`WorkerGroup::forward_sample`]).
    pub fn samples_on_device(&mut self) -> bool {
        self.device_sampling
    }

    /// Runs one forward step on every worker and picks one token per logits row on the device
    /// (`sampling[i]` for `logits_rows[i]`).
    pub fn forward_sample(
        &mut self,
        tokens: &[u32],
        batch: &BatchLayout,
        logits_rows: &[usize],
        sampling: &[RowSampling],
    ) -> Result<Vec<u32>, EngineError> {
        let out = match &mut self.local {
            Some(w) => w.forward_sample(tokens, batch, logits_rows, sampling)?,
            None => {
                let (t, b, l, s) = (
                    Arc::new(tokens.to_vec()),
                    Arc::new(batch.clone()),
                    Arc::new(logits_rows.to_vec()),
                    Arc::new(sampling.to_vec()),
                );
                self.step(
                    || Cmd::Forward {
                        tokens: t.clone(),
                        batch: b.clone(),
                        logits_rows: l.clone(),
                        sampling: Some(s.clone()),
                    },
                    batch,
                )?
                .into_iter()
                .find_map(|d| match d {
                    Data::Tokens(t) => Some(t),
                    _ => None,
                })
            }
        };
        Ok(out.unwrap_or_default())
    }

    /// Runs one forward step on every worker; returns the logits of `logits_rows`.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        batch: &BatchLayout,
        logits_rows: &[usize],
    ) -> Result<Vec<f32>, EngineError> {
        let out = match &mut self.local {
            Some(w) => w.forward(tokens, batch, logits_rows)?,
            None => {
                let (t, b, l) = (
                    Arc::new(tokens.to_vec()),
                    Arc::new(batch.clone()),
                    Arc::new(logits_rows.to_vec()),
                );
                self.step(
                    || Cmd::Forward {
                        tokens: t.clone(),
                        batch: b.clone(),
                        logits_rows: l.clone(),
                        sampling: None,
                    },
                    batch,
                )?
                .into_iter()
                .find_map(|d| match d {
                    Data::Logits(l) => Some(l),
                    _ => None,
                })
            }
        };
        Ok(out.unwrap_or_default())
    }
}

fn serve<B: Backend>(mut w: Worker<B>, rank: usize, rx: Receiver<Cmd>, tx: Sender<(usize, Reply)>) {
    while let Ok(cmd) = rx.recv() {
        // A panic (a bug) fails the command instead of ending the thread silently: the group
        // waits for every worker's reply, and then aborts its collectives for the others.
        let run = std::panic::AssertUnwindSafe(|| handle(&mut w, cmd));
        let reply = std::panic::catch_unwind(run).unwrap_or_else(|p| {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(EngineError::WorkerPanicked(what))
        });
        if tx.send((rank, reply)).is_err() {
            break;
        }
    }
}

/// The replies' data, or the first failure among them.
fn first_error(replies: Vec<Reply>) -> Result<Vec<Data>, EngineError> {
    replies.into_iter().collect()
}

fn handle<B: Backend>(w: &mut Worker<B>, cmd: Cmd) -> Reply {
    match cmd {
        Cmd::Forward {
            tokens,
            batch,
            logits_rows,
            sampling: None,
        } => w
            .forward(&tokens, &batch, &logits_rows)
            .map(|l| l.map_or(Data::None, Data::Logits)),
        Cmd::Forward {
            tokens,
            batch,
            logits_rows,
            sampling: Some(sampling),
        } => w
            .forward_sample(&tokens, &batch, &logits_rows, &sampling)
            .map(|t| t.map_or(Data::None, Data::Tokens)),
        Cmd::Open { slot, max_tokens } => w.open_slot(slot, max_tokens).map(|_| Data::None),
        Cmd::Close { slot } => {
            w.close_slot(slot);
            Ok(Data::None)
        }
        Cmd::Truncate { slot, len } => {
            w.truncate_slot(slot, len);
            Ok(Data::None)
        }
        Cmd::BuildIndex { slot, cfg } => w.build_index(slot, &cfg).map(|_| Data::None),
        Cmd::Fork { src, dst } => w.fork_slot(src, dst).map(|_| Data::None),
        Cmd::FillSynthetic { slot, len, seed } => {
            w.fill_synthetic(slot, len, seed).map(|_| Data::None)
        }
        Cmd::FillSyntheticIndexed {
            slot,
            len,
            room,
            seed,
            cfg,
        } => w
            .fill_synthetic_indexed(slot, len, room, seed, &cfg)
            .map(|_| Data::None),
        Cmd::WaveStats { slot } => Ok(Data::Stats(w.wave_stats(slot))),
        Cmd::SetProbe { slot, on } => w.set_probe(slot, on).map(|_| Data::None),
        Cmd::TakeProbe { slot } => w.take_probe(slot).map(Data::Probe),
        Cmd::SetOverlap(o) => {
            w.set_overlap(o);
            Ok(Data::None)
        }
        Cmd::SetReduce(r) => {
            w.set_reduce(r);
            Ok(Data::None)
        }
        Cmd::FailNextStep { layer, panic } => {
            w.fail_next_step(layer, panic);
            Ok(Data::None)
        }
    }
}

impl<B: Backend + 'static> Drop for WorkerGroup<B> {
    fn drop(&mut self) {
        for r in &mut self.remotes {
            // Closing the command channel ends the worker's loop.
            let (dead, _) = mpsc::channel();
            drop(std::mem::replace(&mut r.tx, dead));
            if let Some(h) = r.handle.take() {
                let _ = h.join();
            }
        }
    }
}
