//! [`CudaBackend`]: the model operations of [`Backend`] on one GPU.
//!
//! Everything runs in order on one non-blocking stream; host code only waits where it reads
//! results back (`acts_to_host`). Operations that the trait declares infallible record the first
//! failure (a launch error, GPU memory exhausted) and turn later operations into no-ops; the
//! worker reads it through [`Backend::check`] at the end of the step, so a failure becomes an
//! error of that step rather than a panic.

use std::collections::HashMap;
use std::ffi::c_void;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{CudaBlas, sys as cublas_sys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, sys,
};
use half::bf16;
use retrowave_core::quant::dequantize_row;
use retrowave_core::{
    Backend, BackendError, BatchLayout, HeadLayout, RopeParams, RopeStyle, RowSampling, TensorType,
    WaveConfig, WaveStats, WeightView,
};

use crate::CudaError;
use crate::compile::{self, ModuleReport};
use crate::device::{self, DeviceInfo};

/// Rows of queries per prefill attention CTA (from `kernels/common.cuh`).
pub fn prefill_block_m() -> usize {
    static BLOCK_M: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BLOCK_M.get_or_init(|| compile::header_define("PREFILL_BLOCK_M").unwrap_or(64) as usize)
}

/// Most activation rows the skinny GEMM kernel takes (`GEMV_MAX_M` in `kernels/gemv.cu`).
pub const GEMV_MAX_ROWS: usize = 8;

/// Activation rows up to which [`CudaBackend::gemm_bf16_f32`] uses the skinny GEMM kernel rather
/// than cuBLAS: `RETROWAVE_GEMV=N` (0 turns it off), by default 1. Measured on an H200 with a
/// random-weight Llama-3-8B (README, issue 5): a batch-1 step 4.92 -> 4.85 ms; from 4 rows on the
/// kernel's CUDA-core FMAs, not its loads, set the pace and cuBLAS is faster (batch 6: 5.17 ->
/// 6.97 ms).
fn gemv_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| rows_from_env("RETROWAVE_GEMV", 1))
}

/// Activation rows up to which [`CudaBackend::gemm_bf16_f32`] uses the tensor-core skinny GEMM
/// (`gemv_tc_bf16`): `RETROWAVE_GEMV_TC=N`, by default 0 (off: still 8% slower than cuBLAS).
fn gemv_tc_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| rows_from_env("RETROWAVE_GEMV_TC", 0))
}

/// The skinny GEMM kernels ([`CudaBackend::gemv`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gemv {
    /// `gemv_bf16`: FMAs on the CUDA cores, the activations' K tile in shared memory.
    CudaCores,
    /// `gemv_tc_bf16`: `mma.sync` on the tensor cores (`k` a multiple of 32).
    TensorCores,
}

/// A row count from the environment variable `name` (`default` when unset or not a number), at
/// most [`GEMV_MAX_ROWS`].
fn rows_from_env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .min(GEMV_MAX_ROWS)
}

const KERNELS: &[&str] = &[
    "embed_bf16",
    "rms_norm",
    "split_cols",
    "gemv_bf16",
    "gemv_tc_bf16",
    "cast_f32_bf16",
    "rope",
    "silu_mul",
    "add_inplace",
    "add_bias",
    "kv_append",
    "fill_uniform_bf16",
    "select_rows",
    "argmax_rows",
    "sample_rows",
    "attn_decode_partial_hd64",
    "attn_decode_partial_hd128",
    "attn_decode_merge",
    "dequant_q4_0_bf16",
    "dequant_q4_1_bf16",
    "dequant_q5_0_bf16",
    "dequant_q8_0_bf16",
    "dequant_q4_k_bf16",
    "dequant_q6_k_bf16",
    "dequant_f16_bf16",
    "dequant_f32_bf16",
    "attn_decode_fused_hd64",
    "attn_decode_fused_hd128",
    "attn_prefill_hd64",
    "attn_prefill_hd128",
    "wave_logits_hd64",
    "wave_logits_hd128",
    "wave_select",
    "wave_estimate_partial_hd64",
    "wave_estimate_partial_hd128",
    "wave_estimate_merge",
    "wave_tokens",
    "wave_cache_fill",
    "wave_tier_restore",
    "attn_wave_fused_hd64",
    "attn_wave_fused_hd128",
    "wave_build_mean",
    "wave_build_init",
    "wave_build_assign_hd64",
    "wave_build_assign_hd128",
    "wave_build_count",
    "wave_build_scan",
    "wave_build_scatter",
    "wave_build_update",
    "wave_build_summary",
    "wave_build_gather",
];

/// A weight matrix on the GPU: bf16, `[rows = out features, cols = in features]`, row-major.
pub struct DevMatrix {
    pub data: CudaSlice<bf16>,
    pub rows: usize,
    pub cols: usize,
}

/// A 1-D f32 parameter on the GPU.
pub struct DevVector {
    pub data: CudaSlice<f32>,
    pub len: usize,
}

/// Activations on the GPU: f32 `[rows, cols]`, row-major.
pub struct DevActs {
    pub data: CudaSlice<f32>,
    pub rows: usize,
    pub cols: usize,
    /// The same values as bf16, when the kernel that wrote them also wrote this copy (the norms
    /// and `silu_mul`, whose outputs feed a GEMM): [`Backend::linear`] then needs no cast.
    /// Operations that change `data` in place drop it.
    pub bf16: Option<CudaSlice<bf16>>,
}

/// One sequence's KV cache on the GPU: bf16 `[layers][kv heads][cap][head_dim]` for K and for V.
pub struct DevKv {
    pub k: CudaSlice<bf16>,
    pub v: CudaSlice<bf16>,
    pub n_layers: usize,
    pub n_kv: usize,
    pub head_dim: usize,
    pub cap: usize,
    pub len: usize,
    /// The wave index over the cached tokens, once built (see [`crate::wave_step`]).
    pub wave: Option<Box<crate::wave_step::DevWave>>,
    /// Positions `(start, len)` whose K and V are not in `k` / `v` but in the wave index's host
    /// tier ([`crate::wave_tier`]); `cap` counts the slots that remain. `(0, 0)`: none.
    pub hole: (usize, usize),
}

impl DevKv {
    /// Positions the cache can hold: its slots plus the positions moved to the host tier.
    pub fn positions(&self) -> usize {
        self.cap + self.hole.1
    }
}

/// Per-sequence descriptor of a step, laid out like `struct SeqDesc` in `kernels/common.cuh`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqDesc {
    pub k_base: u64,
    pub v_base: u64,
    pub cap: i32,
    pub start_pos: i32,
    pub n_tokens: i32,
    pub row: i32,
    /// Positions `[hole_start, hole_start + hole_len)` are not in the cache (a wave index moved
    /// them to host memory: [`DevKv::hole`]); later positions sit `hole_len` slots earlier.
    pub hole_start: i32,
    pub hole_len: i32,
}

// SAFETY: plain old data with the C layout the kernels expect.
unsafe impl DeviceRepr for SeqDesc {}

/// Threads of one flash-decoding CTA (4 warps, each owning 16 keys of every 64-key tile).
pub const DECODE_THREADS: u32 = 128;
/// Dynamic shared memory of one flash-decoding CTA (`DEC_SMEM`: [`compile::decode_stages`]
/// stages of 16 KB K + 16 KB V tiles; 96 KB at the default 3).
pub fn decode_smem() -> usize {
    crate::compile::decode_stages() * 32768
}

/// The device tables of one step; see [`CudaBackend::step_tables`].
pub struct StepTables {
    pub descs: Vec<SeqDesc>,
    pub row_seq: Vec<i32>,
    pub decode_rows: Vec<i32>,
    pub tile_seq: Vec<i32>,
    pub tile_row0: Vec<i32>,
    /// Keys per flash-decoding split, and splits of the longest decode row.
    pub split: usize,
    pub max_splits: usize,
    /// KV heads the merge counters are sized for (`[decode rows, n_kv]`).
    n_kv: usize,
    d_descs: sys::CUdeviceptr,
    d_row_seq: sys::CUdeviceptr,
    d_decode_rows: sys::CUdeviceptr,
    d_tile_seq: sys::CUdeviceptr,
    d_tile_row0: sys::CUdeviceptr,
    /// Zeroed `[decode rows, n_kv]` counters of the fused flash-decoding merge.
    d_counters: sys::CUdeviceptr,
    /// The buffers behind the pointers, when these tables own them (the graph inputs own theirs).
    _owned: Option<(CudaSlice<SeqDesc>, [CudaSlice<i32>; 5])>,
}

impl StepTables {
    /// Device address of the sequence descriptors.
    pub fn descs_ptr(&self) -> sys::CUdeviceptr {
        self.d_descs
    }
    /// Device address of the row -> sequence map.
    pub fn row_seq_ptr(&self) -> sys::CUdeviceptr {
        self.d_row_seq
    }
    /// Device address of the decode rows.
    pub fn decode_rows_ptr(&self) -> sys::CUdeviceptr {
        self.d_decode_rows
    }
    /// Device address of the zeroed `[decode rows, n_kv]` merge counters.
    pub fn counters_ptr(&self) -> sys::CUdeviceptr {
        self.d_counters
    }
}

// SAFETY: the raw pointers are device addresses owned by `_owned` or by the backend's graph
// inputs; they are only passed to kernels.
unsafe impl Send for StepTables {}
// SAFETY: as above.
unsafe impl Sync for StepTables {}

/// The host side of a step's tables.
struct HostTables {
    descs: Vec<SeqDesc>,
    row_seq: Vec<i32>,
    decode_rows: Vec<i32>,
    tile_seq: Vec<i32>,
    tile_row0: Vec<i32>,
    split: usize,
    max_splits: usize,
}

/// Persistent device inputs of captured decode steps: a graph reads its step's tokens,
/// positions, tables and sampling parameters from these fixed addresses, rewritten before each
/// replay.
struct GraphInputs {
    cap_rows: usize,
    tokens: CudaSlice<i32>,
    positions: CudaSlice<i32>,
    select: CudaSlice<i32>,
    descs: CudaSlice<SeqDesc>,
    row_seq: CudaSlice<i32>,
    decode_rows: CudaSlice<i32>,
    temperature: CudaSlice<f32>,
    top_k: CudaSlice<i32>,
    top_p: CudaSlice<f32>,
    uniform: CudaSlice<f32>,
    out: CudaSlice<i32>,
    /// Fused-merge counters, `cap_rows * n_kv` zeros (each launch leaves them at zero).
    counters: CudaSlice<i32>,
    n_kv: usize,
}

/// What identifies a captured decode step: rows, flash-decoding split and splits, and whether
/// every row is greedy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct GraphKey {
    rows: usize,
    split: usize,
    max_splits: usize,
    greedy: bool,
    /// Wave steps: the units' address and the wave kernels' shapes.
    wave: Option<(u64, usize, usize, usize)>,
}

/// The inputs armed for the step being run or captured.
struct Armed {
    rows: usize,
    tables: Arc<StepTables>,
    greedy: bool,
}

/// An instantiated graph. CUDA graph handles may be used from any thread of the context (the
/// backend serialises their use behind its graph-state lock).
struct SendGraph(cudarc::driver::CudaGraph);

// SAFETY: see above; the handles are only launched or destroyed under the lock.
unsafe impl Send for SendGraph {}

/// Whether decode steps may run as CUDA graphs (`RETROWAVE_CUDA_GRAPHS=0` turns them off).
fn graphs_enabled() -> bool {
    std::env::var("RETROWAVE_CUDA_GRAPHS").map_or(true, |v| v != "0")
}

/// CTAs per multiprocessor that the flash-decoding split aims at, when `RETROWAVE_DECODE_WAVES`
/// sets it (an experiment: otherwise the measured rule of [`CudaBackend::decode_split`]).
fn decode_waves() -> Option<usize> {
    static W: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *W.get_or_init(|| {
        std::env::var("RETROWAVE_DECODE_WAVES")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map(|w| w.clamp(1, 16))
    })
}

/// Makes `waiter` wait for everything issued so far on `first`, through `event` (recorded
/// again at each call: graph capture turns this into an edge between the two streams' nodes).
fn order_streams(
    first: &CudaStream,
    event: &cudarc::driver::CudaEvent,
    waiter: &CudaStream,
) -> Result<(), CudaError> {
    event
        .record(first)
        .map_err(CudaError::driver("cuEventRecord"))?;
    waiter
        .wait(event)
        .map_err(CudaError::driver("cuStreamWaitEvent"))
}

/// Whether flash-decoding is launched with programmatic stream serialization (PDL), so that its
/// CTAs start, read the step tables and hint their first tiles into L2 while the previous kernel
/// of the stream finishes: on (`RETROWAVE_PDL=0` turns it off; read once). Measured on an H200:
/// random-weight Llama-3-8B decode at 32K 150.4-150.9 -> 154.2-154.5 tokens/s.
pub fn pdl_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RETROWAVE_PDL").map_or(true, |v| v != "0"))
}

#[derive(Default)]
struct GraphState {
    disabled: bool,
    inputs: Option<GraphInputs>,
    armed: Option<Armed>,
    capturing: Option<GraphKey>,
    graphs: HashMap<GraphKey, SendGraph>,
    captures: usize,
    replays: usize,
}

/// The last positions uploaded: host copy and device buffer.
type CachedPositions = (Vec<i32>, Arc<CudaSlice<i32>>);

/// The two most recently used entries of a cache, the newest first.
struct Recent<T>(Vec<T>);

impl<T: Clone> Recent<T> {
    const fn new() -> Self {
        Recent(Vec::new())
    }

    /// The first entry that `hit` accepts, made the newest.
    fn find(&mut self, hit: impl Fn(&T) -> bool) -> Option<T> {
        let i = self.0.iter().position(hit)?;
        let t = self.0.remove(i);
        self.0.insert(0, t.clone());
        Some(t)
    }

    /// Adds `t` as the newest entry, dropping the oldest beyond two.
    fn put(&mut self, t: T) {
        self.0.insert(0, t);
        self.0.truncate(2);
    }
}

struct Inner {
    /// `RETROWAVE_CUDA_GRAPHS` as read when the backend started.
    graphs_enabled: bool,
    /// The last two steps' positions and tables: a step split in two for overlap (see
    /// `Backend::all_reduce_begin`) alternates between its halves' at every layer.
    positions: Mutex<Recent<CachedPositions>>,
    poison: std::sync::atomic::AtomicBool,
    tables: Mutex<Recent<Arc<StepTables>>>,
    graph: Mutex<GraphState>,
    _blas_workspace: CudaSlice<u8>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// A second stream for work of a step that does not depend on the main stream's next
    /// kernels (the wave token lists beside the estimation), forked from and joined back into
    /// `stream` through the two events, so that graph capture records parallel branches.
    side: Arc<CudaStream>,
    fork_event: cudarc::driver::CudaEvent,
    join_event: cudarc::driver::CudaEvent,
    /// The stream of collectives begun with `all_reduce_begin`, the event that orders them
    /// after the main stream's work, and one completion event per tag.
    comm_stream: Arc<CudaStream>,
    comm_fork: cudarc::driver::CudaEvent,
    comm_done: [cudarc::driver::CudaEvent; 2],
    blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
    info: DeviceInfo,
    reports: Vec<ModuleReport>,
    _modules: Vec<Arc<CudaModule>>,
    failure: Mutex<Option<String>>,
    /// One `i32` on the device: token lists cut by `wave_tokens` (allocated on first use).
    wave_overflow: Mutex<Option<CudaSlice<i32>>>,
    /// The units of the current wave decode step (see `wave_step`).
    wave_units: Mutex<Option<Arc<crate::wave_step::WaveStepUnits>>>,
    /// This rank's NCCL communicator, once the backend joined a tensor-parallel group.
    comm: std::sync::OnceLock<crate::nccl::Comm>,
    /// The node's host-tier budget and this backend's rank in it (its group's, or its own).
    host_budget: Mutex<Option<(Arc<crate::host_budget::HostBudget>, usize)>>,
}

/// The CUDA backend of one GPU. Cloning shares the context, stream and kernels.
#[derive(Clone)]
pub struct CudaBackend {
    inner: Arc<Inner>,
}

fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b.max(1))
}

fn grid_1d(n: usize, block: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (ceil_div(n, block).clamp(1, 65535 * 16) as u32, 1, 1),
        block_dim: (block as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal`, compiles (or loads from the cache) the kernels and creates the cuBLAS
    /// handle. Fails with [`CudaError::NoDriver`] / [`CudaError::NoDevice`] where there is no GPU.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        let ctx = device::open(ordinal)?;
        let info = device::info(&ctx)?;
        // One main stream, ordered; the side stream is ordered against it by explicit events
        // (fork / join): cudarc's cross-stream event tracking is not needed.
        // SAFETY: buffers are allocated and freed on `stream`; the side stream only runs kernels
        // between a fork (after the allocations it uses) and a join (before they are freed).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(CudaError::driver("cuStreamCreate"))?;
        let side = ctx
            .new_stream()
            .map_err(CudaError::driver("cuStreamCreate"))?;
        let fork_event = ctx
            .new_event(None)
            .map_err(CudaError::driver("cuEventCreate"))?;
        let join_event = ctx
            .new_event(None)
            .map_err(CudaError::driver("cuEventCreate"))?;
        let comm_stream = ctx
            .new_stream()
            .map_err(CudaError::driver("cuStreamCreate"))?;
        let event = || {
            ctx.new_event(None)
                .map_err(CudaError::driver("cuEventCreate"))
        };
        let (comm_fork, comm_done) = (event()?, [event()?, event()?]);
        keep_pool_memory(&ctx)?;
        let (modules, reports) = compile::load_modules(&ctx)?;
        let mut funcs = HashMap::new();
        for &name in KERNELS {
            let f = modules
                .iter()
                .find_map(|m| m.load_function(name).ok())
                .ok_or_else(|| CudaError::MissingKernel(name.to_string()))?;
            funcs.insert(name, f);
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|source| CudaError::Cublas {
            what: "cublasCreate".into(),
            source,
        })?;
        // A fixed cuBLAS workspace, so that GEMMs captured into graphs allocate nothing.
        let ws_bytes = 32usize << 20;
        // SAFETY: scratch for cuBLAS, never read by us.
        let workspace = unsafe { stream.alloc::<u8>(ws_bytes) }
            .map_err(CudaError::driver("cuMemAllocAsync(cuBLAS workspace)"))?;
        {
            let ws = dp(&workspace);
            // SAFETY: the handle is live; the workspace outlives it (both in `Inner`).
            unsafe {
                cublas_sys::cublasSetWorkspace_v2(*blas.handle(), ws as *mut c_void, ws_bytes)
            }
            .result()
            .map_err(|source| CudaError::Cublas {
                what: "cublasSetWorkspace".into(),
                source,
            })?;
        }
        for r in &reports {
            tracing::debug!(
                file = r.file,
                from_cache = r.from_cache,
                seconds = r.seconds,
                "kernel module"
            );
        }
        let backend = CudaBackend {
            inner: Arc::new(Inner {
                ctx,
                stream,
                side,
                fork_event,
                join_event,
                comm_stream,
                comm_fork,
                comm_done,
                blas,
                funcs,
                info,
                reports,
                _modules: modules,
                failure: Mutex::new(None),
                tables: Mutex::new(Recent::new()),
                graph: Mutex::new(GraphState::default()),
                _blas_workspace: workspace,
                poison: std::sync::atomic::AtomicBool::new(false),
                positions: Mutex::new(Recent::new()),
                graphs_enabled: graphs_enabled(),
                wave_overflow: Mutex::new(None),
                wave_units: Mutex::new(None),
                comm: std::sync::OnceLock::new(),
                host_budget: Mutex::new(None),
            }),
        };
        // Kernels that need more than the default 48 KB of dynamic shared memory.
        for (name, bytes) in [
            ("attn_decode_partial_hd64", decode_smem()),
            ("attn_decode_partial_hd128", decode_smem()),
            ("attn_decode_fused_hd64", decode_smem()),
            ("attn_decode_fused_hd128", decode_smem()),
            ("attn_wave_fused_hd64", decode_smem()),
            ("attn_wave_fused_hd128", decode_smem()),
            ("attn_prefill_hd64", prefill_smem_bytes(64)),
            ("attn_prefill_hd128", prefill_smem_bytes(128)),
            (
                "wave_select",
                crate::wave::WAVE_SELECT_SMEM + crate::wave::UNION_HIST_SMEM,
            ),
            (
                "wave_logits_hd64",
                crate::wave::wave_logits_smem(64, crate::wave::WAVE_MAX_G),
            ),
            (
                "wave_logits_hd128",
                crate::wave::wave_logits_smem(128, crate::wave::WAVE_MAX_G),
            ),
        ] {
            backend.set_max_dynamic_smem(name, bytes)?;
        }
        Ok(backend)
    }

    /// The device.
    pub fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    /// How each kernel module was obtained (compiled or cached, seconds).
    pub fn module_reports(&self) -> &[ModuleReport] {
        &self.inner.reports
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }

    /// The stream every operation runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// A compiled kernel by name.
    pub fn function(&self, name: &str) -> Result<&CudaFunction, CudaError> {
        self.inner
            .funcs
            .get(name)
            .ok_or_else(|| CudaError::MissingKernel(name.to_string()))
    }

    /// Returns the memory cached in the device's stream-ordered pool to the driver (after the
    /// stream is idle), so that `mem_get_info` sees what freed buffers held.
    pub fn trim_pool(&self) -> Result<(), CudaError> {
        self.synchronize()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: out-pointer; the device handle is the context's.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, self.inner.ctx.cu_device()) }
            .result()
            .map_err(CudaError::driver("cuDeviceGetDefaultMemPool"))?;
        // SAFETY: a valid pool; trimming only releases unused memory.
        unsafe { sys::cuMemPoolTrimTo(pool, 0) }
            .result()
            .map_err(CudaError::driver("cuMemPoolTrimTo"))
    }

    /// Waits for the stream and reports the first recorded failure.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.bind()?;
        self.inner
            .stream
            .synchronize()
            .map_err(CudaError::driver("cuStreamSynchronize"))?;
        match self.take_failure() {
            Some(f) => Err(CudaError::Unsupported(f)),
            None => Ok(()),
        }
    }

    /// Copies `height` rows of `width` bytes between device buffers with the given pitches, on
    /// the backend's stream.
    pub(crate) fn copy_rows(
        &self,
        src: u64,
        src_pitch: usize,
        dst: u64,
        dst_pitch: usize,
        width: usize,
        height: usize,
    ) -> Result<(), CudaError> {
        if width == 0 || height == 0 {
            return Ok(());
        }
        let p = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: src,
            srcArray: std::ptr::null_mut(),
            srcPitch: src_pitch,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: dst,
            dstArray: std::ptr::null_mut(),
            dstPitch: dst_pitch,
            WidthInBytes: width,
            Height: height,
        };
        // SAFETY: both regions lie inside live allocations (the callers size them), on our stream.
        unsafe { sys::cuMemcpy2DAsync_v2(&p, self.inner.stream.cu_stream()) }
            .result()
            .map_err(CudaError::driver("cuMemcpy2DAsync"))
    }

    /// Sums `x` over the tensor-parallel group, in place, on `stream` (nothing when
    /// `RETROWAVE_TP_SKIP_ALL_REDUCE` skips the collectives).
    fn sum_over_group(&self, x: &DevActs, stream: sys::CUstream) -> Result<(), CudaError> {
        let comm = self.comm().ok_or_else(|| {
            CudaError::Unsupported("all-reduce on a backend outside a tensor-parallel group".into())
        })?;
        if comm.skips() {
            return Ok(());
        }
        crate::nccl::all_reduce_f32(comm, dp(&x.data), x.rows * x.cols, stream)
    }

    /// This backend's NCCL communicator, when it is in a tensor-parallel group.
    pub(crate) fn comm(&self) -> Option<&crate::nccl::Comm> {
        self.inner.comm.get()
    }

    /// `(rank, world)` in the tensor-parallel group, when the backend is in one.
    pub fn group_place(&self) -> Option<(usize, usize)> {
        self.comm().map(|c| c.place())
    }

    /// The host-tier budget this backend charges its pinned arenas to, and its rank there: the
    /// group's shared one after [`Backend::join_group`], else one of its own over this machine.
    pub fn host_budget(&self) -> (Arc<crate::host_budget::HostBudget>, usize) {
        let mut g = self
            .inner
            .host_budget
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        g.get_or_insert_with(|| (crate::host_budget::HostBudget::for_machine(1), 0))
            .clone()
    }

    pub(crate) fn set_host_budget(&self, b: Arc<crate::host_budget::HostBudget>, rank: usize) {
        *self
            .inner
            .host_budget
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((b, rank));
    }

    pub(crate) fn set_comm(&self, c: crate::nccl::Comm) -> Result<(), CudaError> {
        self.inner
            .comm
            .set(c)
            .map_err(|_| CudaError::Unsupported("backend already in a group".into()))
    }

    fn bind(&self) -> Result<(), CudaError> {
        self.inner
            .ctx
            .bind_to_thread()
            .map_err(CudaError::driver("cuCtxSetCurrent"))
    }

    fn failed(&self) -> bool {
        self.inner
            .failure
            .lock()
            .map(|f| f.is_some())
            .unwrap_or(true)
    }

    fn record(&self, e: impl std::fmt::Display) {
        if let Ok(mut f) = self.inner.failure.lock()
            && f.is_none()
        {
            tracing::error!("CUDA backend: {e}");
            *f = Some(e.to_string());
        }
    }

    fn take_failure(&self) -> Option<String> {
        self.inner.failure.lock().ok().and_then(|mut f| f.take())
    }

    /// Uninitialised device memory for `n` elements (at least one, so that pointers are valid).
    /// With [`Self::set_poison`] on, every byte is 0xFF (NaN in f32 and bf16), so that elements a
    /// kernel fails to write show up in checks.
    pub fn alloc<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>, CudaError> {
        // SAFETY: every caller writes the elements it later reads.
        let s = unsafe { self.inner.stream.alloc::<T>(n.max(1)) }
            .map_err(CudaError::driver(format!("cuMemAllocAsync({n} elements)")))?;
        if self.inner.poison.load(std::sync::atomic::Ordering::Relaxed) {
            // SAFETY: the whole allocation, on its stream.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    dp(&s),
                    0xFF,
                    n.max(1) * std::mem::size_of::<T>(),
                    self.inner.stream.cu_stream(),
                )
            }
            .map_err(CudaError::driver("cuMemsetD8Async"))?;
        }
        Ok(s)
    }

    /// Fills every later allocation with 0xFF bytes (NaN) before use (kernel checks).
    pub fn set_poison(&self, on: bool) {
        self.inner
            .poison
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Copies host data to new device memory.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>, CudaError> {
        if data.is_empty() {
            return self.alloc(1);
        }
        self.inner
            .stream
            .clone_htod(data)
            .map_err(CudaError::driver("cuMemcpyHtoDAsync"))
    }

    /// Copies device data to the host (waits for the stream).
    pub fn download<T: DeviceRepr>(
        &self,
        data: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<T>, CudaError> {
        let view = data.slice(0..n.min(data.len()));
        self.inner
            .stream
            .clone_dtoh(&view)
            .map_err(CudaError::driver("cuMemcpyDtoH"))
    }

    fn empty_acts(&self, cols: usize) -> DevActs {
        match self.alloc::<f32>(1) {
            Ok(data) => DevActs {
                data,
                rows: 0,
                cols,
                bf16: None,
            },
            // Allocation of 4 bytes failed: the process is out of GPU memory; the recorded
            // failure ends the step. A zero-capacity slice from a null allocation keeps types.
            Err(e) => {
                self.record(&e);
                DevActs {
                    data: self.inner.stream.null().expect("null device slice"),
                    rows: 0,
                    cols,
                    bf16: None,
                }
            }
        }
    }

    /// New activations `[rows, cols]` (uninitialised), or empty ones after recording a failure.
    fn new_acts(&self, rows: usize, cols: usize) -> Option<DevActs> {
        if self.failed() {
            return None;
        }
        match self.alloc::<f32>(rows * cols) {
            Ok(data) => Some(DevActs {
                data,
                rows,
                cols,
                bf16: None,
            }),
            Err(e) => {
                self.record(e);
                None
            }
        }
    }

    /// Rotary embeddings in place on `x` (`n_heads` heads) and, in the same launch, on the
    /// rows of `second` (its own number of heads).
    fn rope_rows(
        &self,
        x: &mut DevActs,
        second: Option<(&mut DevActs, usize)>,
        positions: &[u32],
        n_heads: usize,
        head_dim: usize,
        rope: &RopeParams,
    ) {
        x.bf16 = None;
        let (mut x2, n2) = match second {
            Some((k, n)) => {
                k.bf16 = None;
                (dp(&k.data), n)
            }
            None => (0, 0),
        };
        if x.rows == 0 || self.failed() {
            return;
        }
        let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        let armed = self
            .armed(|a, inp| (a.rows == pos.len()).then(|| dp(&inp.positions)))
            .flatten();
        let d = match armed {
            Some(p) => Ok((p, None)),
            None => self.positions(pos).map(|d| (dp(&d), Some(d))),
        };
        let r = d.and_then(|(pp, _keep)| {
            let mut a = dp(&x.data);
            let mut p = pp;
            let (mut rows, mut nh, mut hd, mut rd, mut th, mut neox, mut nh2) = (
                x.rows as i32,
                n_heads as i32,
                head_dim as i32,
                rope.dim as i32,
                rope.theta,
                i32::from(rope.style == RopeStyle::NeoX),
                n2 as i32,
            );
            // As many blocks a row as head groups (the kernel's groups: 256 / (rot_dim / 2)).
            let groups = (256 / (rope.dim / 2).max(1)).max(1);
            self.launch(
                "rope",
                LaunchConfig {
                    grid_dim: (
                        x.rows as u32,
                        (n_heads + n2).div_ceil(groups).max(1) as u32,
                        1,
                    ),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
                &mut [
                    ptr_of(&mut a),
                    ptr_of(&mut p),
                    ptr_of(&mut rows),
                    ptr_of(&mut nh),
                    ptr_of(&mut hd),
                    ptr_of(&mut rd),
                    ptr_of(&mut th),
                    ptr_of(&mut neox),
                    ptr_of(&mut x2),
                    ptr_of(&mut nh2),
                ],
            )
        });
        if let Err(e) = r {
            self.record(e);
        }
    }

    /// RMS normalisation of the rows of `x` scaled by `w`, after `x += residual` when one is
    /// given (written back into `x`); the output also as bf16 (its GEMM's input).
    fn norm_rows(
        &self,
        x: &DevActs,
        residual: Option<&DevActs>,
        w: &DevVector,
        eps: f32,
    ) -> DevActs {
        let Some(mut out) = self.new_acts(x.rows, x.cols) else {
            return self.empty_acts(x.cols);
        };
        if x.rows == 0 || w.len != x.cols {
            if w.len != x.cols {
                self.record(format!(
                    "rms_norm: weight of {} for rows of {}",
                    w.len, x.cols
                ));
            }
            return out;
        }
        let twin = match self.alloc::<bf16>(x.rows * x.cols) {
            Ok(t) => t,
            Err(e) => {
                self.record(e);
                return out;
            }
        };
        let mut a = dp(&x.data);
        let mut y = residual.map_or(0, |y| dp(&y.data));
        let mut b = dp(&w.data);
        let mut o = dp(&out.data);
        let mut ob = dp(&twin);
        let (mut r, mut c, mut e) = (x.rows as i32, x.cols as i32, eps);
        let block = (x.cols / 4).next_power_of_two().clamp(32, 1024);
        match self.launch(
            "rms_norm",
            LaunchConfig {
                grid_dim: (x.rows as u32, 1, 1),
                block_dim: (block as u32, 1, 1),
                shared_mem_bytes: 0,
            },
            &mut [
                ptr_of(&mut a),
                ptr_of(&mut y),
                ptr_of(&mut b),
                ptr_of(&mut o),
                ptr_of(&mut ob),
                ptr_of(&mut r),
                ptr_of(&mut c),
                ptr_of(&mut e),
            ],
        ) {
            Ok(()) => out.bf16 = Some(twin),
            Err(err) => self.record(err),
        }
        out
    }

    pub(crate) fn launch(
        &self,
        name: &str,
        cfg: LaunchConfig,
        args: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        self.launch_on(self.inner.stream.cu_stream(), name, cfg, args)
    }

    /// Makes the side stream wait for everything issued so far on the main stream and returns
    /// it: kernels launched on it ([`Self::launch_on`]) until [`Self::join_side`] run beside the
    /// main stream's.
    pub(crate) fn fork_side(&self) -> Result<sys::CUstream, CudaError> {
        let i = &self.inner;
        order_streams(&i.stream, &i.fork_event, &i.side)?;
        Ok(i.side.cu_stream())
    }

    /// Makes the main stream wait for the side stream's work since [`Self::fork_side`].
    pub(crate) fn join_side(&self) -> Result<(), CudaError> {
        let i = &self.inner;
        order_streams(&i.side, &i.join_event, &i.stream)
    }

    /// [`Self::launch`] on `stream` (the main one, or the side one from [`Self::fork_side`]).
    pub(crate) fn launch_on(
        &self,
        stream: sys::CUstream,
        name: &str,
        cfg: LaunchConfig,
        args: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        let f = self.function(name)?;
        // SAFETY: `args` point at live values whose types match the kernel's parameters (each
        // call site passes them in the order of kernels/README.md).
        unsafe {
            sys::cuLaunchKernel(
                f.cu_function(),
                cfg.grid_dim.0,
                cfg.grid_dim.1,
                cfg.grid_dim.2,
                cfg.block_dim.0,
                cfg.block_dim.1,
                cfg.block_dim.2,
                cfg.shared_mem_bytes,
                stream,
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(CudaError::driver(format!("launch {name}")))
    }

    /// [`Self::launch`] with programmatic stream serialization when `pdl` is set: the kernel may
    /// start before the previous kernel of the stream has finished and must wait for it
    /// (`griddepcontrol.wait`) before it reads anything that kernel writes.
    pub(crate) fn launch_pdl(
        &self,
        name: &str,
        cfg: LaunchConfig,
        args: &mut [*mut c_void],
        pdl: bool,
    ) -> Result<(), CudaError> {
        if !pdl {
            return self.launch(name, cfg, args);
        }
        let f = self.function(name)?;
        // SAFETY: a zeroed attribute is a valid bit pattern (plain C data); id and value are
        // then set for the one attribute used.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.inner.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: as in `launch`; `config` and `attr` outlive the call.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                f.cu_function(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(CudaError::driver(format!("launch {name} (PDL)")))
    }

    /// Raises a kernel's dynamic shared memory limit (needed above 48 KB).
    pub fn set_max_dynamic_smem(&self, name: &str, bytes: usize) -> Result<(), CudaError> {
        let f = self.function(name)?;
        f.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .map_err(CudaError::driver(format!("cuFuncSetAttribute({name})")))
    }

    /// `c[n, m] = a[n, k] @ w[m, k]^T` in bf16 with f32 accumulation and f32 output
    /// (`a`, `w`, `c` raw device pointers).
    pub fn gemm_bf16_f32(
        &self,
        a: sys::CUdeviceptr,
        w: sys::CUdeviceptr,
        c: sys::CUdeviceptr,
        n: usize,
        m: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        if n <= gemv_tc_rows() && self.gemv_fits(a, w, n, m, k) && k.is_multiple_of(32) {
            return self.gemv(Gemv::TensorCores, a, w, c, n, m, k);
        }
        if n <= gemv_rows() && self.gemv_fits(a, w, n, m, k) {
            return self.gemv(Gemv::CudaCores, a, w, c, n, m, k);
        }
        self.gemm_cublas_f32(a, w, c, n, m, k)
    }

    /// [`Self::gemm_bf16_f32`] through cuBLAS, whatever the shape.
    pub fn gemm_cublas_f32(
        &self,
        a: sys::CUdeviceptr,
        w: sys::CUdeviceptr,
        c: sys::CUdeviceptr,
        n: usize,
        m: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        self.gemm_raw(a, w, c, n, m, k, cublas_sys::cudaDataType_t::CUDA_R_32F)
    }

    /// Whether [`Self::gemv`] takes a GEMM of `n` rows: at most [`GEMV_MAX_ROWS`] of them, `k` a
    /// multiple of 8 and both inputs 16-byte aligned.
    pub fn gemv_fits(
        &self,
        a: sys::CUdeviceptr,
        w: sys::CUdeviceptr,
        n: usize,
        m: usize,
        k: usize,
    ) -> bool {
        (1..=GEMV_MAX_ROWS).contains(&n)
            && m > 0
            && k > 0
            && k.is_multiple_of(8)
            && a.is_multiple_of(16)
            && w.is_multiple_of(16)
            && i32::try_from(m.max(k)).is_ok()
    }

    /// `c [n, m] = a [n, k] @ w [m, k]^T` (bf16 in, f32 out) for a few rows `n` by one of the
    /// skinny GEMM kernels of `kernels/gemv.cu` (each weight row streamed once; 256 threads and
    /// 16 weight rows a block); the caller checks [`Self::gemv_fits`] (and `k % 32 == 0` for
    /// the tensor cores).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv(
        &self,
        kernel: Gemv,
        a: sys::CUdeviceptr,
        w: sys::CUdeviceptr,
        c: sys::CUdeviceptr,
        n: usize,
        m: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        let (mut a, mut w, mut c) = (a, w, c);
        let (mut rows, mut outs, mut kk) = (n as i32, m as i32, k as i32);
        let name = match kernel {
            Gemv::CudaCores => "gemv_bf16",
            Gemv::TensorCores => "gemv_tc_bf16",
        };
        self.launch(
            name,
            LaunchConfig {
                grid_dim: (m.div_ceil(16) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &mut [
                ptr_of(&mut a),
                ptr_of(&mut w),
                ptr_of(&mut c),
                ptr_of(&mut rows),
                ptr_of(&mut outs),
                ptr_of(&mut kk),
            ],
        )
    }

    /// As [`Self::gemm_bf16_f32`] with a bf16 output (for measuring the cuBLAS rate).
    pub fn gemm_bf16_bf16(
        &self,
        a: sys::CUdeviceptr,
        w: sys::CUdeviceptr,
        c: sys::CUdeviceptr,
        n: usize,
        m: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        self.gemm_raw(a, w, c, n, m, k, cublas_sys::cudaDataType_t::CUDA_R_16BF)
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_raw(
        &self,
        a: sys::CUdeviceptr,
        w: sys::CUdeviceptr,
        c: sys::CUdeviceptr,
        n: usize,
        m: usize,
        k: usize,
        ctype: cublas_sys::cudaDataType_t,
    ) -> Result<(), CudaError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let int = |v: usize| {
            i32::try_from(v)
                .map_err(|_| CudaError::Unsupported(format!("GEMM dimension {v} too large")))
        };
        // Column-major view: C^T[m, n] = W^T^T[m, k] . A^T[k, n], i.e. op(W) = T, op(A) = N.
        // SAFETY: the pointers are device buffers of the stated sizes on this handle's stream.
        unsafe {
            cublas_sys::cublasGemmEx(
                *self.inner.blas.handle(),
                cublas_sys::cublasOperation_t::CUBLAS_OP_T,
                cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                int(m)?,
                int(n)?,
                int(k)?,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                cublas_sys::cudaDataType_t::CUDA_R_16BF,
                int(k)?,
                a as *const c_void,
                cublas_sys::cudaDataType_t::CUDA_R_16BF,
                int(k)?,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                ctype,
                int(m)?,
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .result()
        .map_err(|source| CudaError::Cublas {
            what: format!("cublasGemmEx {n}x{m}x{k}"),
            source,
        })
    }

    /// Fills `n` bf16 elements at `ptr` with uniform values in `[-scale, scale]` from `seed`.
    pub fn fill_uniform(
        &self,
        ptr: sys::CUdeviceptr,
        n: usize,
        seed: u64,
        scale: f32,
    ) -> Result<(), CudaError> {
        let (mut p, mut nn, mut s, mut sc) = (ptr, n as i64, seed, scale);
        self.launch(
            "fill_uniform_bf16",
            grid_1d(n.div_ceil(8), 256),
            &mut [
                ptr_of(&mut p),
                ptr_of(&mut nn),
                ptr_of(&mut s),
                ptr_of(&mut sc),
            ],
        )
    }

    /// Casts `n` f32 values to bf16 (`x`, `y` device pointers).
    pub fn cast_to_bf16(
        &self,
        x: sys::CUdeviceptr,
        y: sys::CUdeviceptr,
        n: usize,
    ) -> Result<(), CudaError> {
        let (mut x, mut y, mut nn) = (x, y, n as i64);
        self.launch(
            "cast_f32_bf16",
            grid_1d(n.div_ceil(4), 256),
            &mut [ptr_of(&mut x), ptr_of(&mut y), ptr_of(&mut nn)],
        )
    }

    /// The per-sequence table and row map of a step over `caches`.
    pub fn seq_table(
        &self,
        caches: &[&DevKv],
        batch: &BatchLayout,
    ) -> Result<(Vec<SeqDesc>, Vec<i32>), CudaError> {
        let mut descs = Vec::with_capacity(batch.seqs.len());
        let mut row_seq = vec![0i32; batch.n_rows()];
        for (i, (s, kv)) in batch.seqs.iter().zip(caches).enumerate() {
            if s.start_pos + s.n_tokens > kv.positions() {
                return Err(CudaError::Unsupported(format!(
                    "sequence needs {} cached tokens but its cache holds {}",
                    s.start_pos + s.n_tokens,
                    kv.positions()
                )));
            }
            if kv.hole.1 > 0 && (s.start_pos < kv.hole.0 + kv.hole.1 || s.n_tokens > 1) {
                return Err(CudaError::Unsupported(format!(
                    "a step of {} tokens from position {} of a sequence whose positions {}..{} \
                     are in the host tier (only decode after the indexed part is supported)",
                    s.n_tokens,
                    s.start_pos,
                    kv.hole.0,
                    kv.hole.0 + kv.hole.1
                )));
            }
            let kp = dp(&kv.k);
            let vp = dp(&kv.v);
            descs.push(SeqDesc {
                k_base: kp,
                v_base: vp,
                cap: kv.cap as i32,
                start_pos: s.start_pos as i32,
                n_tokens: s.n_tokens as i32,
                row: s.row as i32,
                hole_start: kv.hole.0 as i32,
                hole_len: kv.hole.1 as i32,
            });
            for r in s.row..s.row + s.n_tokens {
                if let Some(x) = row_seq.get_mut(r) {
                    *x = i as i32;
                }
            }
        }
        Ok((descs, row_seq))
    }

    /// Split size (keys per CTA) for flash-decoding: one wave of one or two CTAs per multiprocessor over
    /// the `n_kv * rows` (head, row) pairs, sized by the mean decode length (`lens` = keys each
    /// decode row attends to), in multiples of 64 and at least 256. Returns (split, splits of the
    /// longest row). Measured on an H200 against the alternatives (one to two waves, max-length
    /// sizing): best or tied at every Llama-3-8B shape from 4K to 128K, batch 1 to 16.
    pub fn decode_split(&self, n_kv: usize, lens: &[usize]) -> (usize, usize) {
        let rows = lens.len().max(1);
        let max_len = lens.iter().copied().max().unwrap_or(1).max(1);
        // One CTA per SM for up to 1 GB of bf16 KV at hd 128 (n_kv * keys <= 2^21), two above:
        // measured best with the fused kernel on an H200 (32K b1-b8 and 128K b1-b8).
        let sms = self.inner.info.multiprocessors.max(1) as usize;
        // Two CTAs fit on a multiprocessor only with rings of up to 3 stages.
        let waves = if let Some(w) = decode_waves() {
            w * sms
        } else if n_kv * lens.iter().sum::<usize>() <= 1 << 21
            || crate::compile::decode_stages() > 3
        {
            sms
        } else {
            2 * sms
        };
        let per = (waves / (n_kv * rows).max(1)).max(1);
        let mean = ceil_div(lens.iter().sum::<usize>().max(1), rows);
        let split = (ceil_div(ceil_div(mean, per), 64) * 64).max(256);
        (split, ceil_div(max_len, split).max(1))
    }

    /// The positions of a step on the device: every RoPE call of a step (Q and K of every layer)
    /// asks for the same ones, so the last upload is reused while unchanged.
    fn positions(&self, pos: Vec<i32>) -> Result<Arc<CudaSlice<i32>>, CudaError> {
        let mut cached = self
            .inner
            .positions
            .lock()
            .map_err(|_| CudaError::Unsupported("position cache lock poisoned".into()))?;
        if let Some((_, dev)) = cached.find(|(host, _)| *host == pos) {
            return Ok(dev);
        }
        let dev = Arc::new(self.upload(&pos)?);
        cached.put((pos, dev.clone()));
        Ok(dev)
    }

    fn host_tables(
        &self,
        caches: &[&DevKv],
        batch: &BatchLayout,
        n_kv: usize,
    ) -> Result<HostTables, CudaError> {
        let (descs, row_seq) = self.seq_table(caches, batch)?;
        let decode: Vec<&retrowave_core::SeqRows> =
            batch.seqs.iter().filter(|s| s.n_tokens == 1).collect();
        let decode_rows: Vec<i32> = decode.iter().map(|s| s.row as i32).collect();
        let lens: Vec<usize> = decode.iter().map(|s| s.start_pos + 1).collect();
        let (split, max_splits) = self.decode_split(n_kv, &lens);
        let bm = prefill_block_m();
        let (mut tile_seq, mut tile_row0) = (Vec::new(), Vec::new());
        for (i, s) in batch.seqs.iter().enumerate() {
            if s.n_tokens > 1 {
                for t in (0..s.n_tokens).step_by(bm) {
                    tile_seq.push(i as i32);
                    tile_row0.push((s.row + t) as i32);
                }
            }
        }
        Ok(HostTables {
            descs,
            row_seq,
            decode_rows,
            tile_seq,
            tile_row0,
            split,
            max_splits,
        })
    }

    /// The device tables of a step (sequence descriptors, row map, decode rows, prefill tiles).
    /// Every layer of a step asks for the same tables: the last ones are kept and reused while
    /// their contents are unchanged, so only the first layer uploads.
    pub fn step_tables(
        &self,
        caches: &[&DevKv],
        batch: &BatchLayout,
        n_kv: usize,
    ) -> Result<Arc<StepTables>, CudaError> {
        let HostTables {
            descs,
            row_seq,
            decode_rows,
            tile_seq,
            tile_row0,
            split,
            max_splits,
        } = self.host_tables(caches, batch, n_kv)?;
        let mut cached = self
            .inner
            .tables
            .lock()
            .map_err(|_| CudaError::Unsupported("step table lock poisoned".into()))?;
        // (n_kv too: a freed cache's addresses may come back with another model's shape, whose
        // merge counters would not fit.)
        if let Some(t) = cached.find(|t| {
            t.descs == descs
                && t.row_seq == row_seq
                && t.decode_rows == decode_rows
                && t.tile_row0 == tile_row0
                && t.tile_seq == tile_seq
                && t.split == split
                && t.n_kv == n_kv
        }) {
            return Ok(t);
        }
        let counters = self
            .inner
            .stream
            .alloc_zeros::<i32>((decode_rows.len() * n_kv).max(1))
            .map_err(CudaError::driver("cuMemsetAsync(counters)"))?;
        let owned = (
            self.upload(&descs)?,
            [
                self.upload(&row_seq)?,
                self.upload(&decode_rows)?,
                self.upload(&tile_seq)?,
                self.upload(&tile_row0)?,
                counters,
            ],
        );
        let t = Arc::new(StepTables {
            d_descs: dp(&owned.0),
            d_row_seq: dp(&owned.1[0]),
            d_decode_rows: dp(&owned.1[1]),
            d_tile_seq: dp(&owned.1[2]),
            d_tile_row0: dp(&owned.1[3]),
            d_counters: dp(&owned.1[4]),
            _owned: Some(owned),
            descs,
            row_seq,
            decode_rows,
            tile_seq,
            tile_row0,
            split,
            max_splits,
            n_kv,
        });
        cached.put(t.clone());
        Ok(t)
    }

    /// Writes a step's K/V rows (f32 `[rows, n_kv * hd]` at `k`, `v`) into the caches.
    pub fn append_kv(
        &self,
        t: &StepTables,
        layer: usize,
        k: sys::CUdeviceptr,
        v: sys::CUdeviceptr,
        n_kv: usize,
        hd: usize,
    ) -> Result<(), CudaError> {
        let rows = t.row_seq.len();
        if rows == 0 {
            return Ok(());
        }
        let (mut a, mut b, mut c, mut d) = (k, v, t.d_descs, t.d_row_seq);
        let (mut r, mut l, mut n, mut h) = (rows as i32, layer as i32, n_kv as i32, hd as i32);
        self.launch(
            "kv_append",
            LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            },
            &mut [
                ptr_of(&mut a),
                ptr_of(&mut b),
                ptr_of(&mut c),
                ptr_of(&mut d),
                ptr_of(&mut r),
                ptr_of(&mut l),
                ptr_of(&mut n),
                ptr_of(&mut h),
            ],
        )
    }

    /// Flash-decoding over the step's single-token rows: partial passes over splits of the keys,
    /// then the log-sum-exp merge into `out` (f32 `[rows, n_heads * hd]`).
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention(
        &self,
        t: &StepTables,
        layer: usize,
        q: sys::CUdeviceptr,
        out: sys::CUdeviceptr,
        n_heads: usize,
        n_kv: usize,
        hd: usize,
    ) -> Result<(), CudaError> {
        let n_rows = t.decode_rows.len();
        if n_rows == 0 {
            return Ok(());
        }
        let (split, max_splits) = (t.split, t.max_splits);
        let o_part = self.alloc::<f32>(n_rows * n_heads * max_splits * hd)?;
        let lse_part = self.alloc::<f32>(n_rows * n_heads * max_splits)?;
        let (pop, plp, prl) = (dp(&o_part), dp(&lse_part), t.d_decode_rows);
        // One launch: each split's CTA writes its partial result, and the last CTA of every
        // (row, KV head) merges the splits by log-sum-exp (per-pair counters, left at zero).
        let name = if hd == 64 {
            "attn_decode_fused_hd64"
        } else {
            "attn_decode_fused_hd128"
        };
        let (mut a1, mut a2, mut a3, mut a4) = (q, t.d_descs, t.d_row_seq, prl);
        let (mut l, mut n1, mut n2, mut sp, mut ms, mut sc) = (
            layer as i32,
            n_heads as i32,
            n_kv as i32,
            split as i32,
            max_splits as i32,
            1.0 / (hd as f32).sqrt(),
        );
        let (mut a5, mut a6, mut a7, mut a8, mut a9) = (pop, plp, out, 0u64, t.d_counters);
        self.launch_pdl(
            name,
            LaunchConfig {
                grid_dim: (n_kv as u32, n_rows as u32, max_splits as u32),
                block_dim: (DECODE_THREADS, 1, 1),
                shared_mem_bytes: decode_smem() as u32,
            },
            &mut [
                ptr_of(&mut a1),
                ptr_of(&mut a2),
                ptr_of(&mut a3),
                ptr_of(&mut a4),
                ptr_of(&mut l),
                ptr_of(&mut n1),
                ptr_of(&mut n2),
                ptr_of(&mut sp),
                ptr_of(&mut ms),
                ptr_of(&mut sc),
                ptr_of(&mut a5),
                ptr_of(&mut a6),
                ptr_of(&mut a7),
                ptr_of(&mut a8),
                ptr_of(&mut a9),
            ],
            pdl_enabled(),
        )
    }

    /// Causal flash attention on the tensor cores over the step's prefill tiles (`qb` bf16
    /// `[rows, n_heads, hd]`), into `out` (f32 `[rows, n_heads * hd]`).
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_attention(
        &self,
        t: &StepTables,
        layer: usize,
        qb: sys::CUdeviceptr,
        out: sys::CUdeviceptr,
        n_heads: usize,
        n_kv: usize,
        hd: usize,
    ) -> Result<(), CudaError> {
        if t.tile_seq.is_empty() {
            return Ok(());
        }
        let name = if hd == 64 {
            "attn_prefill_hd64"
        } else {
            "attn_prefill_hd128"
        };
        let (mut a1, mut a2, mut a3, mut a4) = (qb, t.d_descs, t.d_tile_seq, t.d_tile_row0);
        let (mut l, mut n1, mut n2, mut sc) = (
            layer as i32,
            n_heads as i32,
            n_kv as i32,
            1.0 / (hd as f32).sqrt(),
        );
        let (mut a5, mut a6) = (out, 0u64);
        let smem = prefill_smem_bytes(hd);
        self.launch(
            name,
            LaunchConfig {
                grid_dim: (t.tile_seq.len() as u32, n_heads as u32, 1),
                block_dim: (PREFILL_THREADS, 1, 1),
                shared_mem_bytes: smem as u32,
            },
            &mut [
                ptr_of(&mut a1),
                ptr_of(&mut a2),
                ptr_of(&mut a3),
                ptr_of(&mut a4),
                ptr_of(&mut l),
                ptr_of(&mut n1),
                ptr_of(&mut n2),
                ptr_of(&mut sc),
                ptr_of(&mut a5),
                ptr_of(&mut a6),
            ],
        )
    }

    /// Attention of a step: appends K/V, then flash-decoding for single-token sequences and the
    /// tensor-core prefill kernel for the others. Returns `[rows, n_heads * hd]`.
    #[allow(clippy::too_many_arguments)]
    fn attention_impl(
        &self,
        layer: usize,
        q: &DevActs,
        k: &DevActs,
        v: &DevActs,
        caches: &mut [&mut DevKv],
        batch: &BatchLayout,
        heads: HeadLayout,
    ) -> Result<DevActs, CudaError> {
        let hd = heads.head_dim;
        if hd != 64 && hd != 128 {
            return Err(CudaError::Unsupported(format!(
                "head_dim {hd}: the CUDA attention kernels support 64 and 128"
            )));
        }
        let rows = batch.n_rows();
        let (nh, nkv) = (heads.n_heads, heads.n_kv_heads);
        if q.rows != rows || k.rows != rows || v.rows != rows {
            return Err(CudaError::Unsupported(format!(
                "attention: {rows} rows in the batch but q/k/v have {}/{}/{}",
                q.rows, k.rows, v.rows
            )));
        }
        if layer == 0 && self.armed(|_, _| ()).is_none() {
            self.wave_updates(caches, batch)?;
        }
        let t = match self.armed(|a, _| a.tables.clone()) {
            Some(t) => t,
            None => {
                let refs: Vec<&DevKv> = caches.iter().map(|c| &**c).collect();
                self.step_tables(&refs, batch, nkv)?
            }
        };
        self.append_kv(&t, layer, dp(&k.data), dp(&v.data), nkv, hd)?;
        let out = self.alloc::<f32>(rows * nh * hd)?;
        let wave = !t.decode_rows.is_empty() && caches.iter().any(|c| c.wave.is_some());
        if wave {
            let refs: Vec<&DevKv> = caches.iter().map(|c| &**c).collect();
            let ws = self.wave_step_units(&crate::wave_step::HostStep::of(&t), &refs)?;
            self.wave_decode_layer(&t, &ws, layer, dp(&q.data), dp(&out), nh, nkv, hd)?;
            for &row in &t.decode_rows {
                let si = t.row_seq.get(row as usize).copied().unwrap_or(0) as usize;
                if let Some(w) = caches.get_mut(si).and_then(|c| c.wave.as_deref_mut()) {
                    w.head_steps += nkv as u64;
                    w.context_tokens += (nkv * (batch.seqs[si].start_pos + 1)) as u64;
                }
            }
        } else {
            self.decode_attention(&t, layer, dp(&q.data), dp(&out), nh, nkv, hd)?;
        }
        if !t.tile_seq.is_empty() {
            let qb = self.alloc::<bf16>(rows * nh * hd)?;
            self.cast_to_bf16(dp(&q.data), dp(&qb), rows * nh * hd)?;
            self.prefill_attention(&t, layer, dp(&qb), dp(&out), nh, nkv, hd)?;
        }
        for (s, kv) in batch.seqs.iter().zip(caches.iter_mut()) {
            kv.len = kv.len.max(s.start_pos + s.n_tokens);
        }
        Ok(DevActs {
            data: out,
            rows,
            cols: nh * hd,
            bf16: None,
        })
    }

    /// Greedy (`argmax_rows`) or full (`sample_rows`) token choice for `n` rows of logits at
    /// `logits`; `arrays` = temperature, top-k, top-p, uniform (unused when greedy), output.
    fn launch_sampling(
        &self,
        logits: sys::CUdeviceptr,
        n: usize,
        vocab: usize,
        greedy: bool,
        arrays: [sys::CUdeviceptr; 5],
    ) -> Result<(), CudaError> {
        let (mut l, mut r, mut v) = (logits, n as i32, vocab as i32);
        let [mut a, mut b, mut c, mut d, mut o] = arrays;
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        if greedy {
            self.launch(
                "argmax_rows",
                cfg,
                &mut [
                    ptr_of(&mut l),
                    ptr_of(&mut r),
                    ptr_of(&mut v),
                    ptr_of(&mut o),
                ],
            )
        } else {
            self.launch(
                "sample_rows",
                cfg,
                &mut [
                    ptr_of(&mut l),
                    ptr_of(&mut r),
                    ptr_of(&mut v),
                    ptr_of(&mut a),
                    ptr_of(&mut b),
                    ptr_of(&mut c),
                    ptr_of(&mut d),
                    ptr_of(&mut o),
                ],
            )
        }
    }

    /// Runs `f` on the armed step inputs while a decode step is being captured.
    fn armed<R>(&self, f: impl FnOnce(&Armed, &GraphInputs) -> R) -> Option<R> {
        let st = self.inner.graph.lock().ok()?;
        match (&st.armed, &st.inputs) {
            (Some(a), Some(i)) => Some(f(a, i)),
            _ => None,
        }
    }

    /// The slot of the current wave step's units.
    pub(crate) fn wave_units_slot(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, Option<Arc<crate::wave_step::WaveStepUnits>>>, CudaError>
    {
        self.inner
            .wave_units
            .lock()
            .map_err(|_| CudaError::Unsupported("wave units lock poisoned".into()))
    }

    /// Device address of the wave token-list overflow counter (allocated, zeroed, on first use).
    pub(crate) fn wave_overflow_ptr(&self) -> Result<sys::CUdeviceptr, CudaError> {
        let mut slot = self
            .inner
            .wave_overflow
            .lock()
            .map_err(|_| CudaError::Unsupported("wave overflow lock poisoned".into()))?;
        if slot.is_none() {
            *slot = Some(
                self.inner
                    .stream
                    .alloc_zeros::<i32>(1)
                    .map_err(CudaError::driver("cuMemsetAsync(wave overflow)"))?,
            );
        }
        Ok(slot.as_ref().map(dp).unwrap_or(0))
    }

    /// Wave token lists cut short so far (each one a unit whose exact part lost tokens: a host
    /// sizing bug, reported rather than hidden).
    pub fn wave_overflows(&self) -> Result<i32, CudaError> {
        let slot = self
            .inner
            .wave_overflow
            .lock()
            .map_err(|_| CudaError::Unsupported("wave overflow lock poisoned".into()))?;
        match slot.as_ref() {
            Some(s) => Ok(self.download(s, 1)?.first().copied().unwrap_or(0)),
            None => Ok(0),
        }
    }

    /// Decode steps captured and replayed as CUDA graphs so far.
    pub fn graph_counts(&self) -> (usize, usize) {
        self.inner
            .graph
            .lock()
            .map(|g| (g.captures, g.replays))
            .unwrap_or((0, 0))
    }

    fn write<T: DeviceRepr>(&self, dst: &mut CudaSlice<T>, data: &[T]) -> Result<(), CudaError> {
        if data.is_empty() {
            return Ok(());
        }
        let mut view = dst.slice_mut(0..data.len());
        self.inner
            .stream
            .memcpy_htod(data, &mut view)
            .map_err(CudaError::driver("cuMemcpyHtoDAsync"))
    }

    fn graph_begin(
        &self,
        tokens: &[u32],
        batch: &BatchLayout,
        caches: &mut [&mut DevKv],
        logits_rows: &[usize],
        sampling: &[RowSampling],
    ) -> Result<Option<Vec<u32>>, CudaError> {
        let rows = batch.n_rows();
        let eligible = self.inner.graphs_enabled
            && rows > 0
            && !caches.is_empty()
            && caches.len() == batch.seqs.len()
            && batch.seqs.iter().all(|s| s.n_tokens == 1)
            && tokens.len() == rows
            && sampling.len() == rows
            && logits_rows.len() == rows
            && logits_rows.iter().enumerate().all(|(i, &r)| i == r)
            && !self.failed();
        if !eligible {
            return Ok(None);
        }
        self.bind()?;
        self.wave_updates(caches, batch)?;
        let n_kv = caches[0].n_kv;
        let refs: Vec<&DevKv> = caches.iter().map(|c| &**c).collect();
        let h = self.host_tables(&refs, batch, n_kv)?;
        let greedy = sampling.iter().all(|s| s.temperature <= 0.0);
        // Wave steps: the units are uploaded (when changed) before capture or replay, never
        // inside a capture.
        let wave = if refs.iter().any(|c| c.wave.is_some()) {
            let hs = crate::wave_step::HostStep {
                descs: &h.descs,
                row_seq: &h.row_seq,
                decode_rows: &h.decode_rows,
            };
            self.wave_overflow_ptr()?;
            Some(self.wave_step_units(&hs, &refs)?.graph_key())
        } else {
            None
        };
        drop(refs);
        let key = GraphKey {
            rows,
            split: h.split,
            max_splits: h.max_splits,
            greedy,
            wave,
        };
        let mut st = self
            .inner
            .graph
            .lock()
            .map_err(|_| CudaError::Unsupported("graph state lock poisoned".into()))?;
        if st.disabled {
            return Ok(None);
        }
        if st
            .inputs
            .as_ref()
            .is_none_or(|i| i.cap_rows < rows || i.n_kv != n_kv)
        {
            let cap = rows.next_power_of_two().max(8);
            st.graphs.clear();
            st.inputs = Some(GraphInputs {
                cap_rows: cap,
                tokens: self.alloc(cap)?,
                positions: self.alloc(cap)?,
                select: self.alloc(cap)?,
                descs: self.alloc(cap)?,
                row_seq: self.alloc(cap)?,
                decode_rows: self.alloc(cap)?,
                temperature: self.alloc(cap)?,
                top_k: self.alloc(cap)?,
                top_p: self.alloc(cap)?,
                uniform: self.alloc(cap)?,
                out: self.alloc(cap)?,
                counters: self
                    .inner
                    .stream
                    .alloc_zeros::<i32>(cap * n_kv.max(1))
                    .map_err(CudaError::driver("cuMemsetAsync(counters)"))?,
                n_kv,
            });
        }
        let Some(mut inp) = st.inputs.take() else {
            return Ok(None);
        };
        let written = (|| -> Result<(), CudaError> {
            let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
            self.write(&mut inp.tokens, &ids)?;
            let pos: Vec<i32> = batch.positions().iter().map(|&p| p as i32).collect();
            self.write(&mut inp.positions, &pos)?;
            let sel: Vec<i32> = (0..rows as i32).collect();
            self.write(&mut inp.select, &sel)?;
            self.write(&mut inp.descs, &h.descs)?;
            self.write(&mut inp.row_seq, &h.row_seq)?;
            self.write(&mut inp.decode_rows, &h.decode_rows)?;
            let t: Vec<f32> = sampling.iter().map(|s| s.temperature).collect();
            self.write(&mut inp.temperature, &t)?;
            let k: Vec<i32> = sampling
                .iter()
                .map(|s| s.top_k.min(i32::MAX as usize) as i32)
                .collect();
            self.write(&mut inp.top_k, &k)?;
            let p: Vec<f32> = sampling.iter().map(|s| s.top_p).collect();
            self.write(&mut inp.top_p, &p)?;
            let u: Vec<f32> = sampling.iter().map(|s| s.uniform).collect();
            self.write(&mut inp.uniform, &u)
        })();
        let tables = Arc::new(StepTables {
            d_descs: dp(&inp.descs),
            d_row_seq: dp(&inp.row_seq),
            d_decode_rows: dp(&inp.decode_rows),
            d_tile_seq: 0,
            d_tile_row0: 0,
            d_counters: dp(&inp.counters),
            _owned: None,
            descs: h.descs,
            row_seq: h.row_seq,
            decode_rows: h.decode_rows,
            tile_seq: h.tile_seq,
            tile_row0: h.tile_row0,
            split: h.split,
            max_splits: h.max_splits,
            n_kv,
        });
        st.inputs = Some(inp);
        written?;
        if let Some(g) = st.graphs.get(&key) {
            g.0.launch().map_err(CudaError::driver("cuGraphLaunch"))?;
            for (s, kv) in batch.seqs.iter().zip(caches.iter_mut()) {
                kv.len = kv.len.max(s.start_pos + 1);
                let units = (kv.n_layers * kv.n_kv) as u64;
                if let Some(w) = kv.wave.as_deref_mut() {
                    w.head_steps += units;
                    w.context_tokens += units * (s.start_pos + 1) as u64;
                }
            }
            st.replays += 1;
            let out = match st.inputs.as_ref() {
                Some(i) => self.download(&i.out, rows)?,
                None => return Ok(None),
            };
            return Ok(Some(out.into_iter().map(|x| x.max(0) as u32).collect()));
        }
        st.armed = Some(Armed {
            rows,
            tables,
            greedy,
        });
        self.inner
            .stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(CudaError::driver("cuStreamBeginCapture"))?;
        st.capturing = Some(key);
        Ok(None)
    }

    fn graph_end(&self, ok: bool) -> Result<Option<Vec<u32>>, CudaError> {
        let mut st = self
            .inner
            .graph
            .lock()
            .map_err(|_| CudaError::Unsupported("graph state lock poisoned".into()))?;
        let armed = st.armed.take();
        let Some(key) = st.capturing.take() else {
            return Ok(None);
        };
        let graph = self.inner.stream.end_capture(
            sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
        );
        let graph = match (ok, graph) {
            (true, Ok(Some(g))) => g,
            (_, g) => {
                // The ops failed while capturing (or the capture broke): run without graphs from
                // now on; this step reports its error.
                st.disabled = true;
                tracing::error!(?key, result = ?g.err(), "CUDA graph capture failed; graphs disabled");
                return Ok(None);
            }
        };
        graph.launch().map_err(CudaError::driver("cuGraphLaunch"))?;
        st.captures += 1;
        let rows = armed.map(|a| a.rows).unwrap_or(0);
        let out = match st.inputs.as_ref() {
            Some(i) => self.download(&i.out, rows)?,
            None => Vec::new(),
        };
        if st.graphs.len() >= 16 {
            // Shapes come and go with batch sizes and lengths; keep the memory of few graphs.
            st.graphs.clear();
        }
        st.graphs.insert(key, SendGraph(graph));
        Ok(Some(out.into_iter().map(|x| x.max(0) as u32).collect()))
    }

    fn load_matrix_impl(
        &self,
        w: &WeightView<'_>,
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<DevMatrix, BackendError> {
        if rows.end > w.rows || cols.end > w.cols || rows.start > rows.end || cols.start > cols.end
        {
            return Err(BackendError::BadSlice {
                name: w.name.to_string(),
                rows,
                cols,
                shape_rows: w.rows,
                shape_cols: w.cols,
            });
        }
        let (nr, nc) = (rows.len(), cols.len());
        let mut host = vec![bf16::ZERO; nr * nc];
        if w.dtype == TensorType::BF16 && nc == w.cols {
            // Whole rows of bf16: upload the stored bytes as they are.
            let rb = w.row_bytes();
            let bytes = &w.data[rows.start * rb..rows.end * rb];
            let data = if bytes.as_ptr().align_offset(2) == 0 {
                // SAFETY: aligned to 2, a whole number of 2-byte elements; bf16 is plain bits.
                let elems = unsafe {
                    std::slice::from_raw_parts(bytes.as_ptr() as *const bf16, bytes.len() / 2)
                };
                self.bind()?;
                self.upload(elems)?
            } else {
                let elems: Vec<bf16> = bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect();
                self.bind()?;
                self.upload(&elems)?
            };
            return Ok(DevMatrix {
                data,
                rows: nr,
                cols: nc,
            });
        }
        if crate::dequant::dequant_kernel_name(w.dtype).is_some() {
            // Upload the stored blocks and dequantize on the GPU.
            let rb = w.row_bytes();
            let bytes = &w.data[rows.start * rb..rows.end * rb];
            self.bind()?;
            let src = self.upload(bytes)?;
            let data = self.alloc::<bf16>(nr * nc)?;
            crate::dequant::launch_dequant(
                self,
                w.dtype,
                dp(&src),
                dp(&data),
                nr,
                w.cols,
                cols.start,
                nc,
                rb,
            )?;
            return Ok(DevMatrix {
                data,
                rows: nr,
                cols: nc,
            });
        }
        match w.dtype {
            TensorType::BF16 => {
                for (i, r) in rows.clone().enumerate() {
                    let src = w.row(r).unwrap_or(&[]);
                    for (j, c) in cols.clone().enumerate() {
                        host[i * nc + j] =
                            bf16::from_bits(u16::from_le_bytes([src[2 * c], src[2 * c + 1]]));
                    }
                }
            }
            dtype => {
                // Dequantize on the host with the CPU backend's bit-exact block decoders, rows
                // spread over the machine's cores (a 1.5B model loads in about a second).
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
                let per = nr.div_ceil(threads).max(16);
                let failed = std::sync::atomic::AtomicBool::new(false);
                std::thread::scope(|scope| {
                    for (ci, chunk) in host.chunks_mut(per * nc.max(1)).enumerate() {
                        let (cols, failed) = (cols.clone(), &failed);
                        let first = rows.start + ci * per;
                        scope.spawn(move || {
                            let mut row = vec![0f32; w.cols];
                            for (i, out) in chunk.chunks_mut(nc.max(1)).enumerate() {
                                let src = w.row(first + i).unwrap_or(&[]);
                                if dequantize_row(dtype, src, &mut row).is_err() {
                                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                                    return;
                                }
                                for (o, c) in out.iter_mut().zip(cols.clone()) {
                                    *o = bf16::from_f32(row[c]);
                                }
                            }
                        });
                    }
                });
                if failed.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(BackendError::UnsupportedType {
                        name: w.name.to_string(),
                        dtype,
                        backend: "cuda",
                    });
                }
            }
        }
        self.bind()?;
        let data = self.upload(&host)?;
        Ok(DevMatrix {
            data,
            rows: nr,
            cols: nc,
        })
    }
}

/// The raw device address of a buffer (event tracking is off, so the guard does nothing).
pub fn dp<T>(s: &CudaSlice<T>) -> sys::CUdeviceptr {
    let (p, _guard) = s.device_ptr(s.stream());
    p
}

pub(crate) fn ptr_of<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
}

/// Threads of one prefill attention CTA (4 warps, 16 query rows each).
pub const PREFILL_THREADS: u32 = 128;

/// Dynamic shared memory of the prefill kernel: the Q tile and a ring of K/V tiles,
/// `(PREFILL_BLOCK_M + 6 * 64) * hd * 2` bytes (attention_prefill.cu).
pub fn prefill_smem_bytes(hd: usize) -> usize {
    (prefill_block_m() + 6 * 64) * hd * 2
}

/// Keeps freed memory in the device's stream-ordered pool instead of returning it to the driver
/// at every synchronisation, so per-step allocations cost no driver calls.
fn keep_pool_memory(ctx: &Arc<CudaContext>) -> Result<(), CudaError> {
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: out-pointer; the device handle is the context's.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(CudaError::driver("cuDeviceGetDefaultMemPool"))?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the attribute takes a u64.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut c_void,
        )
    }
    .result()
    .map_err(CudaError::driver("cuMemPoolSetAttribute"))
}

impl Backend for CudaBackend {
    type Matrix = DevMatrix;
    type Vector = DevVector;
    type Acts = DevActs;
    type Kv = DevKv;

    fn name(&self) -> String {
        format!(
            "cuda:{} ({})",
            self.inner.info.ordinal, self.inner.info.name
        )
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if let Err(e) = self.bind() {
            self.record(e);
        }
        f()
    }

    fn samples_on_device(&self) -> bool {
        true
    }

    fn join_group(backends: &[Self]) -> Result<bool, BackendError> {
        if backends.len() > 1 {
            // One host-tier budget for the node, split equally over the ranks, whatever sums
            // their activations (NCCL, or host memory without it).
            let budget = crate::host_budget::HostBudget::for_machine(backends.len());
            for (rank, b) in backends.iter().enumerate() {
                b.set_host_budget(budget.clone(), rank);
            }
        }
        Ok(crate::nccl::join(backends)?)
    }

    fn all_gather_cols(&self, part: &DevActs, widths: &[usize]) -> Result<DevActs, BackendError> {
        let comm = self.comm().ok_or_else(|| {
            BackendError::Device(
                "all_gather_cols on a backend outside a tensor-parallel group".into(),
            )
        })?;
        let (rank, world) = comm.place();
        if widths.len() != world || part.cols != widths[rank] {
            return Err(BackendError::Device(format!(
                "all_gather_cols: rank {rank} of {world} has {} columns, widths {widths:?}",
                part.cols
            )));
        }
        let rows = part.rows;
        let pad = widths.iter().copied().max().unwrap_or(0);
        let total: usize = widths.iter().sum();
        let f = std::mem::size_of::<f32>();
        // NCCL gathers equal counts: every rank sends [rows, pad] (its block padded), and the
        // gathered [world][rows][pad] is copied into the [rows, total] output block by block.
        let padded;
        let send = if part.cols == pad {
            dp(&part.data)
        } else {
            padded = self.alloc::<f32>(rows * pad)?;
            self.copy_rows(
                dp(&part.data),
                part.cols * f,
                dp(&padded),
                pad * f,
                part.cols * f,
                rows,
            )?;
            dp(&padded)
        };
        let gathered = self.alloc::<f32>(world * rows * pad)?;
        crate::nccl::all_gather_f32(
            comm,
            send,
            dp(&gathered),
            rows * pad,
            self.inner.stream.cu_stream(),
        )?;
        let out = self.alloc::<f32>(rows * total)?;
        let mut off = 0;
        for (r, &w) in widths.iter().enumerate() {
            self.copy_rows(
                dp(&gathered) + (r * rows * pad * f) as u64,
                pad * f,
                dp(&out) + (off * f) as u64,
                total * f,
                w * f,
                rows,
            )?;
            off += w;
        }
        Ok(DevActs {
            data: out,
            rows,
            cols: total,
            bf16: None,
        })
    }

    fn all_reduce_begin(&self, x: &mut DevActs, tag: usize) {
        x.bf16 = None;
        let i = &self.inner;
        let Some(done) = i.comm_done.get(tag) else {
            self.record(format!("all_reduce_begin: tag {tag} (0 or 1)"));
            return;
        };
        // The collective runs on the comm stream after everything queued so far on the main
        // stream (`x` included); its completion is `done`, which `all_reduce_end` waits for.
        let r = order_streams(&i.stream, &i.comm_fork, &i.comm_stream)
            .and_then(|()| self.sum_over_group(x, i.comm_stream.cu_stream()))
            .and_then(|()| {
                done.record(&i.comm_stream)
                    .map_err(CudaError::driver("cuEventRecord"))
            });
        if let Err(e) = r {
            self.record(e);
        }
    }

    fn all_reduce_end(&self, tag: usize) {
        let i = &self.inner;
        if let Some(done) = i.comm_done.get(tag)
            && let Err(e) = i
                .stream
                .wait(done)
                .map_err(CudaError::driver("cuStreamWaitEvent"))
        {
            self.record(e);
        }
    }

    fn overlaps_collectives(&self) -> bool {
        self.comm().is_some_and(|c| !c.skips())
    }

    fn all_reduce(&self, x: &mut DevActs) {
        x.bf16 = None;
        if let Err(e) = self.sum_over_group(x, self.inner.stream.cu_stream()) {
            self.record(e);
        }
    }

    fn graph_step_begin(
        &self,
        tokens: &[u32],
        batch: &BatchLayout,
        caches: &mut [&mut DevKv],
        logits_rows: &[usize],
        sampling: &[RowSampling],
    ) -> Result<Option<Vec<u32>>, BackendError> {
        Ok(self.graph_begin(tokens, batch, caches, logits_rows, sampling)?)
    }

    fn graph_step_end(&self, ok: bool) -> Result<Option<Vec<u32>>, BackendError> {
        Ok(self.graph_end(ok)?)
    }

    fn sample_rows(
        &self,
        logits: &DevActs,
        rows: &[RowSampling],
    ) -> Result<Vec<u32>, BackendError> {
        let n = rows.len().min(logits.rows);
        if n == 0 {
            return Ok(Vec::new());
        }
        if let Some(f) = self.take_failure() {
            return Err(BackendError::Device(f));
        }
        if let Some((greedy, arrays)) = self
            .armed(|a, inp| {
                (a.rows == n).then(|| {
                    (
                        a.greedy,
                        [
                            dp(&inp.temperature),
                            dp(&inp.top_k),
                            dp(&inp.top_p),
                            dp(&inp.uniform),
                            dp(&inp.out),
                        ],
                    )
                })
            })
            .flatten()
        {
            // Captured step: the tokens land in the graph's output buffer, read after launch.
            self.launch_sampling(dp(&logits.data), n, logits.cols, greedy, arrays)?;
            return Ok(Vec::new());
        }
        let out = self.alloc::<i32>(n)?;
        let greedy = rows.iter().all(|s| s.temperature <= 0.0);
        let mut keep = Vec::new();
        let mut arrays = [0u64, 0, 0, 0, dp(&out)];
        if !greedy {
            let temp: Vec<f32> = rows.iter().map(|s| s.temperature).collect();
            let top_k: Vec<i32> = rows
                .iter()
                .map(|s| s.top_k.min(i32::MAX as usize) as i32)
                .collect();
            let top_p: Vec<f32> = rows.iter().map(|s| s.top_p).collect();
            let uni: Vec<f32> = rows.iter().map(|s| s.uniform).collect();
            let (dt, dk, dpp, du) = (
                self.upload(&temp)?,
                self.upload(&top_k)?,
                self.upload(&top_p)?,
                self.upload(&uni)?,
            );
            arrays[..4].copy_from_slice(&[dp(&dt), dp(&dk), dp(&dpp), dp(&du)]);
            keep.push((dt, dk, dpp, du));
        }
        self.launch_sampling(dp(&logits.data), n, logits.cols, greedy, arrays)?;
        let t = self.download(&out, n)?;
        Ok(t.into_iter().map(|x| x.max(0) as u32).collect())
    }

    fn check(&self) -> Result<(), BackendError> {
        match self.take_failure() {
            Some(f) => Err(BackendError::Device(f)),
            None => Ok(()),
        }
    }

    fn stack_matrices(&self, parts: &[&DevMatrix]) -> Option<DevMatrix> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) || self.bind().is_err() {
            return None;
        }
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        let mut data = self.alloc::<bf16>(rows * cols).ok()?;
        let mut off = 0;
        for p in parts {
            let n = p.rows * cols;
            let mut dst = data.slice_mut(off..off + n);
            self.inner
                .stream
                .memcpy_dtod(&p.data.slice(0..n), &mut dst)
                .ok()?;
            off += n;
        }
        Some(DevMatrix { data, rows, cols })
    }

    fn split_cols(&self, x: &DevActs, widths: &[usize]) -> Vec<DevActs> {
        let parts: Vec<DevActs> = widths
            .iter()
            .map(|&w| {
                self.new_acts(x.rows, w)
                    .unwrap_or_else(|| self.empty_acts(w))
            })
            .collect();
        // Blocks past the input's columns are left unwritten (as are all, after a failure).
        let mut c0 = 0;
        for (chunk, ws) in parts.chunks(4).zip(widths.chunks(4)) {
            if x.rows == 0 || self.failed() {
                break;
            }
            // One launch for up to four blocks (Q/K/V, gate/up: one in all).
            let mut d = [0u64; 4];
            let mut w = [0i32; 4];
            let mut total = 0;
            for (i, (p, &wi)) in chunk.iter().zip(ws).enumerate() {
                if c0 + total + wi > x.cols {
                    break;
                }
                d[i] = dp(&p.data);
                w[i] = wi as i32;
                total += wi;
            }
            if total > 0 {
                let mut src = dp(&x.data) + (c0 * 4) as u64;
                let (mut rows, mut stride) = (x.rows as i32, x.cols as i32);
                let [mut d0, mut d1, mut d2, mut d3] = d;
                let [mut w0, mut w1, mut w2, mut w3] = w;
                if let Err(e) = self.launch(
                    "split_cols",
                    LaunchConfig {
                        grid_dim: (
                            x.rows.min(65535) as u32,
                            total.div_ceil(1024).min(65535) as u32,
                            1,
                        ),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    },
                    &mut [
                        ptr_of(&mut src),
                        ptr_of(&mut rows),
                        ptr_of(&mut stride),
                        ptr_of(&mut d0),
                        ptr_of(&mut w0),
                        ptr_of(&mut d1),
                        ptr_of(&mut w1),
                        ptr_of(&mut d2),
                        ptr_of(&mut w2),
                        ptr_of(&mut d3),
                        ptr_of(&mut w3),
                    ],
                ) {
                    self.record(e);
                }
            }
            c0 += ws.iter().sum::<usize>();
        }
        parts
    }

    fn load_matrix(
        &self,
        w: &WeightView<'_>,
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<DevMatrix, BackendError> {
        self.load_matrix_impl(w, rows, cols)
    }

    fn load_vector(
        &self,
        w: &WeightView<'_>,
        range: Range<usize>,
    ) -> Result<DevVector, BackendError> {
        let all = retrowave_core::vector_f32(w, range, "cuda")?;
        self.bind()?;
        let data = self.upload(&all)?;
        Ok(DevVector {
            data,
            len: all.len(),
        })
    }

    fn acts_from_host(&self, data: &[f32], rows: usize, cols: usize) -> DevActs {
        if let Err(e) = self.bind() {
            self.record(e);
            return self.empty_acts(cols);
        }
        match self.upload(&data[..(rows * cols).min(data.len())]) {
            Ok(d) => DevActs {
                data: d,
                rows,
                cols,
                bf16: None,
            },
            Err(e) => {
                self.record(e);
                self.empty_acts(cols)
            }
        }
    }

    fn acts_to_host(&self, a: &DevActs) -> Vec<f32> {
        if a.rows * a.cols == 0 || self.failed() {
            return vec![0.0; a.rows * a.cols];
        }
        match self.download(&a.data, a.rows * a.cols) {
            Ok(v) => v,
            Err(e) => {
                self.record(e);
                vec![0.0; a.rows * a.cols]
            }
        }
    }

    fn acts_shape(&self, a: &DevActs) -> (usize, usize) {
        (a.rows, a.cols)
    }

    fn concat_rows(&self, parts: &[&DevActs]) -> DevActs {
        let cols = parts.first().map_or(0, |p| p.cols);
        let rows = parts.iter().map(|p| p.rows).sum();
        if parts.iter().any(|p| p.cols != cols) {
            self.record("concat_rows: parts of different widths");
            return self.empty_acts(cols);
        }
        let Some(out) = self.new_acts(rows, cols) else {
            return self.empty_acts(cols);
        };
        let row_bytes = cols * std::mem::size_of::<f32>();
        let mut at = 0;
        for p in parts {
            // Row-major and contiguous: each part is one block of the output.
            let dst = dp(&out.data) + (at * row_bytes) as u64;
            if let Err(e) =
                self.copy_rows(dp(&p.data), row_bytes, dst, row_bytes, row_bytes, p.rows)
            {
                self.record(e);
            }
            at += p.rows;
        }
        out
    }

    fn select_rows(&self, a: &DevActs, rows: &[usize]) -> DevActs {
        let Some(out) = self.new_acts(rows.len(), a.cols) else {
            return self.empty_acts(a.cols);
        };
        if rows.is_empty() {
            return out;
        }
        let idx: Vec<i32> = rows
            .iter()
            .map(|&r| r.min(a.rows.saturating_sub(1)) as i32)
            .collect();
        let in_order = idx.iter().enumerate().all(|(i, &r)| i as i32 == r);
        let armed = self
            .armed(|ar, inp| (in_order && ar.rows == idx.len()).then(|| dp(&inp.select)))
            .flatten();
        let d = match armed {
            Some(p) => Ok((p, None)),
            None => self.upload(&idx).map(|d| (dp(&d), Some(d))),
        };
        let r = d.and_then(|(pi, _keep)| {
            let mut x = dp(&a.data);
            let mut i = pi;
            let mut o = dp(&out.data);
            let (mut n, mut c) = (rows.len() as i32, a.cols as i32);
            self.launch(
                "select_rows",
                LaunchConfig {
                    grid_dim: (rows.len() as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
                &mut [
                    ptr_of(&mut x),
                    ptr_of(&mut i),
                    ptr_of(&mut o),
                    ptr_of(&mut n),
                    ptr_of(&mut c),
                ],
            )
        });
        if let Err(e) = r {
            self.record(e);
        }
        out
    }

    fn embed(&self, table: &DevMatrix, tokens: &[u32]) -> Result<DevActs, BackendError> {
        self.bind()?;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= table.rows) {
            return Err(BackendError::TokenOutOfRange {
                token: t,
                vocab: table.rows,
            });
        }
        let armed = self
            .armed(|a, inp| (a.rows == tokens.len()).then(|| dp(&inp.tokens)))
            .flatten();
        let d = match armed {
            Some(_) => None,
            None => {
                let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
                Some(self.upload(&ids)?)
            }
        };
        let out = self.alloc::<f32>(tokens.len() * table.cols)?;
        {
            let mut t = dp(&table.data);
            let mut i = armed.or(d.as_ref().map(dp)).unwrap_or(0);
            let mut o = dp(&out);
            let (mut r, mut h) = (tokens.len() as i32, table.cols as i32);
            self.launch(
                "embed_bf16",
                LaunchConfig {
                    grid_dim: (tokens.len().max(1) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
                &mut [
                    ptr_of(&mut t),
                    ptr_of(&mut i),
                    ptr_of(&mut o),
                    ptr_of(&mut r),
                    ptr_of(&mut h),
                ],
            )?;
        }
        Ok(DevActs {
            data: out,
            rows: tokens.len(),
            cols: table.cols,
            bf16: None,
        })
    }

    fn rms_norm(&self, x: &DevActs, w: &DevVector, eps: f32) -> DevActs {
        self.norm_rows(x, None, w, eps)
    }

    fn add_rms_norm(&self, x: &mut DevActs, y: &DevActs, w: &DevVector, eps: f32) -> DevActs {
        if (x.rows, x.cols) != (y.rows, y.cols) {
            self.record(format!(
                "add_rms_norm: [{}, {}] += [{}, {}]",
                x.rows, x.cols, y.rows, y.cols
            ));
            return self.empty_acts(x.cols);
        }
        x.bf16 = None;
        self.norm_rows(x, Some(y), w, eps)
    }

    fn linear(&self, x: &DevActs, w: &DevMatrix, bias: Option<&DevVector>) -> DevActs {
        let Some(mut out) = self.new_acts(x.rows, w.rows) else {
            return self.empty_acts(w.rows);
        };
        if x.rows == 0 {
            return out;
        }
        if x.cols != w.cols {
            self.record(format!(
                "linear: input of {} columns for a matrix of {}",
                x.cols, w.cols
            ));
            return out;
        }
        let (pw, po) = (dp(&w.data), dp(&out.data));
        let r = match &x.bf16 {
            // The kernel that wrote `x` also wrote it as bf16.
            Some(xb) => self.gemm_bf16_f32(dp(xb), pw, po, x.rows, w.rows, w.cols),
            None => self.alloc::<bf16>(x.rows * x.cols).and_then(|xb| {
                self.cast_to_bf16(dp(&x.data), dp(&xb), x.rows * x.cols)?;
                self.gemm_bf16_f32(dp(&xb), pw, po, x.rows, w.rows, w.cols)
            }),
        };
        if let Err(e) = r {
            self.record(e);
        }
        if let Some(b) = bias {
            self.add_bias(&mut out, b);
        }
        out
    }

    fn rope(
        &self,
        x: &mut DevActs,
        positions: &[u32],
        n_heads: usize,
        head_dim: usize,
        rope: &RopeParams,
    ) {
        self.rope_rows(x, None, positions, n_heads, head_dim, rope);
    }

    fn rope_qk(
        &self,
        q: &mut DevActs,
        k: &mut DevActs,
        positions: &[u32],
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        rope: &RopeParams,
    ) {
        if q.rows != k.rows {
            self.record(format!(
                "rope_qk: {} query rows, {} key rows",
                q.rows, k.rows
            ));
            return;
        }
        self.rope_rows(q, Some((k, n_kv_heads)), positions, n_heads, head_dim, rope);
    }

    fn silu_mul(&self, gate: &DevActs, up: &DevActs) -> DevActs {
        let Some(mut out) = self.new_acts(gate.rows, gate.cols) else {
            return self.empty_acts(gate.cols);
        };
        let n = gate.rows * gate.cols;
        if n == 0 || (up.rows, up.cols) != (gate.rows, gate.cols) {
            return out;
        }
        // The down projection's input, as bf16 too (no cast before its GEMM).
        let twin = match self.alloc::<bf16>(n) {
            Ok(t) => t,
            Err(e) => {
                self.record(e);
                return out;
            }
        };
        let mut g = dp(&gate.data);
        let mut u = dp(&up.data);
        let mut o = dp(&out.data);
        let mut ob = dp(&twin);
        let mut nn = n as i64;
        match self.launch(
            "silu_mul",
            grid_1d(n.div_ceil(4), 256),
            &mut [
                ptr_of(&mut g),
                ptr_of(&mut u),
                ptr_of(&mut o),
                ptr_of(&mut ob),
                ptr_of(&mut nn),
            ],
        ) {
            Ok(()) => out.bf16 = Some(twin),
            Err(e) => self.record(e),
        }
        out
    }

    fn add_bias(&self, x: &mut DevActs, bias: &DevVector) {
        x.bf16 = None;
        if x.rows == 0 || self.failed() || bias.len != x.cols {
            return;
        }
        let mut a = dp(&x.data);
        let mut b = dp(&bias.data);
        let (mut r, mut c) = (x.rows as i32, x.cols as i32);
        if let Err(e) = self.launch(
            "add_bias",
            grid_1d((x.rows * x.cols).div_ceil(4), 256),
            &mut [
                ptr_of(&mut a),
                ptr_of(&mut b),
                ptr_of(&mut r),
                ptr_of(&mut c),
            ],
        ) {
            self.record(e);
        }
    }

    fn add_assign(&self, x: &mut DevActs, y: &DevActs) {
        x.bf16 = None;
        let n = x.rows * x.cols;
        if n == 0 || self.failed() || (x.rows, x.cols) != (y.rows, y.cols) {
            return;
        }
        let mut a = dp(&x.data);
        let mut b = dp(&y.data);
        let mut nn = n as i64;
        if let Err(e) = self.launch(
            "add_inplace",
            grid_1d(n.div_ceil(4), 256),
            &mut [ptr_of(&mut a), ptr_of(&mut b), ptr_of(&mut nn)],
        ) {
            self.record(e);
        }
    }

    fn new_kv(
        &self,
        n_layers: usize,
        heads: HeadLayout,
        max_tokens: usize,
    ) -> Result<DevKv, BackendError> {
        self.bind()?;
        let n = n_layers * heads.n_kv_heads * max_tokens * heads.head_dim;
        let k = self.alloc::<bf16>(n)?;
        let v = self.alloc::<bf16>(n)?;
        Ok(DevKv {
            k,
            v,
            n_layers,
            n_kv: heads.n_kv_heads,
            head_dim: heads.head_dim,
            cap: max_tokens,
            len: 0,
            wave: None,
            hole: (0, 0),
        })
    }

    fn kv_len(&self, kv: &DevKv) -> usize {
        kv.len
    }

    fn kv_truncate(&self, kv: &mut DevKv, len: usize) {
        // An index that loses tokens is dropped (below); with a host tier its tokens come back
        // into the GPU cache first.
        let drops_index = kv
            .wave
            .as_ref()
            .is_some_and(|w| w.indexed_end > kv.len.min(len));
        if kv.hole.1 > 0 && drops_index {
            let restored = self.bind().and_then(|_| self.restore_from_host(kv));
            if let Err(e) = restored {
                self.record(&e);
                kv.len = kv.len.min(len).min(kv.hole.0);
                kv.wave = None;
                return;
            }
        }
        kv.len = kv.len.min(len);
        // An index over tokens that are gone no longer describes the cache.
        if kv.wave.as_ref().is_some_and(|w| w.indexed_end > kv.len) {
            kv.wave = None;
        }
    }

    fn kv_clone(&self, kv: &DevKv) -> Result<DevKv, BackendError> {
        self.bind()?;
        let n = kv.k.len();
        let mut k = self.alloc::<bf16>(n)?;
        let mut v = self.alloc::<bf16>(n)?;
        let s = &self.inner.stream;
        s.memcpy_dtod(&kv.k, &mut k)
            .and_then(|_| s.memcpy_dtod(&kv.v, &mut v))
            .map_err(|e| {
                BackendError::from(CudaError::Driver {
                    what: "cuMemcpyDtoDAsync".into(),
                    source: e,
                })
            })?;
        let wave = match kv.wave.as_deref() {
            Some(w) => Some(Box::new(self.clone_wave(w)?)),
            None => None,
        };
        Ok(DevKv {
            k,
            v,
            n_layers: kv.n_layers,
            n_kv: kv.n_kv,
            head_dim: kv.head_dim,
            cap: kv.cap,
            len: kv.len,
            wave,
            hole: kv.hole,
        })
    }

    fn kv_build_index(&self, kv: &mut DevKv, cfg: &WaveConfig) -> Result<(), BackendError> {
        self.bind()?;
        if let Some(f) = self.take_failure() {
            return Err(BackendError::Device(f));
        }
        self.restore_from_host(kv)?;
        kv.wave = None;
        kv.wave = Some(Box::new(self.build_wave(kv, cfg)?));
        self.move_to_host(kv)?;
        Ok(())
    }

    fn kv_fill_synthetic_indexed(
        &self,
        kv: &mut DevKv,
        len: usize,
        room: usize,
        seed: u64,
        cfg: &WaveConfig,
    ) -> Result<(), BackendError> {
        self.bind()?;
        if cfg.host_kv {
            return Ok(self.synthetic_host_index(kv, len, room, seed, cfg)?);
        }
        self.kv_fill_synthetic(kv, len, seed)?;
        self.kv_build_index(kv, cfg)
    }

    fn kv_wave_stats(&self, kv: &DevKv) -> Option<WaveStats> {
        let w = kv.wave.as_deref()?;
        // The wave buffers' counters (a failed read leaves them out and is recorded).
        let tc = match w.tier.as_ref().map(|t| self.tier_counters(t)) {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                self.record(&e);
                crate::wave_tier::TierCounters::default()
            }
            None => crate::wave_tier::TierCounters::default(),
        };
        Some(WaveStats {
            indexed_tokens: w.indexed_tokens(),
            clusters: w.n_clusters,
            updates: w.updates,
            build_seconds: w.build_seconds,
            head_steps: w.head_steps,
            context_tokens: w.context_tokens,
            cache_hit_pages: tc.hit_pages,
            cache_miss_pages: tc.miss_pages(),
            cache_cold_pages: tc.cold_pages,
            // K and V of every page that crossed PCIe.
            host_to_device_bytes: w.tier.as_ref().map_or(0, |t| {
                tc.miss_pages() * (2 * t.page * t.head_dim * 2) as u64
            }),
            ..WaveStats::default()
        })
    }

    fn kv_fill_synthetic(&self, kv: &mut DevKv, len: usize, seed: u64) -> Result<(), BackendError> {
        self.bind()?;
        self.restore_from_host(kv)?;
        if len > kv.cap {
            return Err(BackendError::OutOfMemory(format!(
                "synthetic fill of {len} tokens into a cache of {}",
                kv.cap
            )));
        }
        let pk = dp(&kv.k);
        let pv = dp(&kv.v);
        self.fill_uniform(pk, kv.k.len(), seed, 2.0)?;
        self.fill_uniform(pv, kv.v.len(), seed ^ 0x9e37_79b9_7f4a_7c15, 1.0)?;
        kv.len = len;
        kv.wave = None;
        Ok(())
    }

    fn attention(
        &self,
        layer: usize,
        q: &DevActs,
        k: &DevActs,
        v: &DevActs,
        caches: &mut [&mut DevKv],
        batch: &BatchLayout,
        heads: HeadLayout,
    ) -> Result<DevActs, BackendError> {
        if let Some(f) = self.take_failure() {
            return Err(BackendError::Device(f));
        }
        Ok(self.attention_impl(layer, q, k, v, caches, batch, heads)?)
    }
}

#[cfg(test)]
mod tests {
    use super::KERNELS;

    /// Every kernel the backend loads is defined as a kernel entry point in one of the sources
    /// (`CudaBackend::new` would otherwise fail with `MissingKernel`, but only on a GPU).
    #[test]
    fn every_loaded_kernel_is_defined_in_the_sources() {
        let sources: Vec<String> = crate::compile::SOURCES
            .iter()
            .map(|(_, src)| crate::compile::inline_source(src))
            .collect();
        for name in KERNELS {
            // Defined directly (`void name(`) or by a macro taking the name first
            // (`DEQUANT_BLOCK_KERNEL(name, ...)`).
            let (direct, by_macro) = (format!(" {name}("), format!("({name},"));
            assert!(
                sources
                    .iter()
                    .any(|s| s.contains(&direct) || s.contains(&by_macro)),
                "{name} is loaded but no source defines it"
            );
        }
    }
}
