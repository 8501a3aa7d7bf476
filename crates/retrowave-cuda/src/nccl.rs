//! The tensor-parallel group's device collective: one NCCL communicator per GPU, all created by
//! one `ncclCommInitAll` (one process, one worker thread per GPU).
//!
//! NCCL is loaded at run time like the rest of CUDA; where it is missing, or the ranks do not sit
//! on distinct GPUs, [`join`] says why and the workers sum through host memory instead. The
//! all-reduce runs on the backend's stream, so that a captured decode step records it as a graph
//! node (NCCL supports stream capture) and every rank replays its own graph.

use cudarc::nccl::{result, sys as nccl_sys};

use crate::CudaBackend;
use crate::CudaError;

/// One rank's communicator. NCCL allows a communicator to be used from any thread as long as
/// calls on it do not overlap; each one belongs to the backend of one worker, whose thread is
/// the only one that issues its collectives.
pub(crate) struct Comm {
    comm: nccl_sys::ncclComm_t,
    rank: usize,
    world: usize,
    /// `RETROWAVE_TP_SKIP_ALL_REDUCE=1`: the all-reduces are not issued, so that a benchmark can
    /// time a step without its collectives (the outputs are then wrong).
    skip: bool,
}

// SAFETY: see the type's comment: the handle is only used by the owning worker's thread, one
// call at a time, and destroyed once, on drop.
unsafe impl Send for Comm {}
// SAFETY: as above; `&Comm` is only used to issue calls from the owning worker's thread.
unsafe impl Sync for Comm {}

impl Drop for Comm {
    fn drop(&mut self) {
        // SAFETY: created by ncclCommInitAll, destroyed once.
        let _ = unsafe { result::comm_destroy(self.comm) };
    }
}

impl Comm {
    /// `(rank, world)` of this communicator.
    pub(crate) fn place(&self) -> (usize, usize) {
        (self.rank, self.world)
    }

    /// Whether this group's decode all-reduces are skipped (see `skip`).
    pub(crate) fn skips(&self) -> bool {
        self.skip
    }
}

/// Whether NCCL can be loaded on this machine.
pub fn available() -> bool {
    // SAFETY: only looks for the library file.
    unsafe { nccl_sys::is_culib_present() }
}

/// Makes `backends` one NCCL group (rank = position). `Ok(false)` with a warning where NCCL is
/// not available or two ranks share a GPU; an error if a backend is already in a group or NCCL
/// fails to start.
pub(crate) fn join(backends: &[CudaBackend]) -> Result<bool, CudaError> {
    if backends.len() < 2 {
        return Ok(false);
    }
    let ordinals: Vec<i32> = backends.iter().map(|b| b.info().ordinal as i32).collect();
    let mut distinct = ordinals.clone();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() != ordinals.len() {
        tracing::warn!(
            ?ordinals,
            "tensor-parallel ranks share a GPU: NCCL needs one rank per GPU; summing through host memory"
        );
        return Ok(false);
    }
    if !available() {
        tracing::warn!(
            "NCCL (libnccl.so.2) is not installed: tensor-parallel workers sum through host memory, \
             without CUDA graphs"
        );
        return Ok(false);
    }
    if backends.iter().any(|b| b.comm().is_some()) {
        return Err(CudaError::Unsupported(
            "a CUDA backend is already in a tensor-parallel group".into(),
        ));
    }
    // NVLink multicast (NVLS) must stay off on the machines this runs on; and the channels are
    // connected at init rather than at the first collective, which may be inside a graph
    // capture (where NCCL cannot set them up). Values the user set win.
    for (var, value) in [("NCCL_NVLS_ENABLE", "0"), ("NCCL_RUNTIME_CONNECT", "0")] {
        if std::env::var_os(var).is_none() {
            // SAFETY: set while the group is being built, before its worker threads exist;
            // nothing else in this process reads the environment concurrently at that point.
            unsafe { std::env::set_var(var, value) };
        }
    }
    for b in backends {
        b.synchronize()?;
    }
    let mut comms = vec![std::ptr::null_mut(); backends.len()];
    // SAFETY: `comms` has one slot per device in `ordinals`.
    unsafe { result::comm_init_all(comms.as_mut_ptr(), ordinals.len() as i32, ordinals.as_ptr()) }
        .map_err(|e| {
            CudaError::Unsupported(format!(
                "ncclCommInitAll over GPUs {ordinals:?}: {}",
                describe(e, None)
            ))
        })?;
    let (world, skip) = (backends.len(), skipping());
    for (rank, (b, comm)) in backends.iter().zip(comms).enumerate() {
        b.set_comm(Comm {
            comm,
            rank,
            world,
            skip,
        })?;
    }
    warm_up(backends)?;
    if skip {
        tracing::warn!(
            "RETROWAVE_TP_SKIP_ALL_REDUCE is set: the tensor-parallel all-reduces are skipped; \
             outputs are WRONG (for timing a step without its collectives only)"
        );
    }
    tracing::info!(?ordinals, "NCCL group ready");
    Ok(true)
}

/// One all-reduce on every rank (one thread drives them all inside an NCCL group), checked, so
/// that a broken group fails here with a clear error and not in the first decode step.
fn warm_up(backends: &[CudaBackend]) -> Result<(), CudaError> {
    let n = 1024;
    let mut bufs = Vec::with_capacity(backends.len());
    for b in backends {
        bufs.push(b.upload(&vec![1.0f32; n])?);
    }
    result::group_start().map_err(|e| CudaError::Unsupported(format!("ncclGroupStart: {e:?}")))?;
    let mut first_err = None;
    for (b, buf) in backends.iter().zip(&bufs) {
        if let Some(comm) = b.comm()
            && let Err(e) = all_reduce_f32(comm, crate::backend::dp(buf), n, b.stream().cu_stream())
        {
            first_err.get_or_insert(e);
        }
    }
    result::group_end().map_err(|e| CudaError::Unsupported(format!("ncclGroupEnd: {e:?}")))?;
    if let Some(e) = first_err {
        return Err(e);
    }
    for (b, buf) in backends.iter().zip(&bufs) {
        let got = b.download(buf, n)?;
        let want = backends.len() as f32;
        if got.iter().any(|&x| x != want) {
            return Err(CudaError::Unsupported(format!(
                "NCCL warm-up all-reduce on GPU {} gave {} instead of {want}",
                b.info().ordinal,
                got[0]
            )));
        }
    }
    Ok(())
}

/// An NCCL result code in words, with the communicator's last error message when there is one.
fn describe(e: result::NcclError, comm: Option<&Comm>) -> String {
    // SAFETY: NCCL returns static strings (or null) for both calls.
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::new()
        } else {
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        }
    };
    let what = text(unsafe { nccl_sys::ncclGetErrorString(e.0) });
    let last = comm.map(|c| text(unsafe { nccl_sys::ncclGetLastError(c.comm) }));
    match last.filter(|l| !l.is_empty()) {
        Some(l) => format!("{e:?} ({what}: {l})"),
        None => format!("{e:?} ({what})"),
    }
}

/// Whether `RETROWAVE_TP_SKIP_ALL_REDUCE=1` asks to skip the collectives (timing only).
pub fn skipping() -> bool {
    std::env::var("RETROWAVE_TP_SKIP_ALL_REDUCE").is_ok_and(|v| v == "1")
}

/// Sums `count` f32 at `ptr` over the group, in place, on `stream`.
pub(crate) fn all_reduce_f32(
    comm: &Comm,
    ptr: u64,
    count: usize,
    stream: cudarc::driver::sys::CUstream,
) -> Result<(), CudaError> {
    // SAFETY: `ptr` holds `count` f32 on this rank's GPU (the caller's activations), the
    // stream belongs to the same context, and every rank issues the same sequence of calls.
    unsafe {
        result::all_reduce(
            ptr as *const std::ffi::c_void,
            ptr as *mut std::ffi::c_void,
            count,
            nccl_sys::ncclDataType_t::ncclFloat32,
            nccl_sys::ncclRedOp_t::ncclSum,
            comm.comm,
            stream as nccl_sys::cudaStream_t,
        )
    }
    .map(|_| ())
    .map_err(|e| CudaError::Unsupported(format!("ncclAllReduce: {}", describe(e, Some(comm)))))
}

/// Gathers `count` f32 from every rank at `send` into `recv` (`world * count`, rank order), on
/// `stream`.
pub(crate) fn all_gather_f32(
    comm: &Comm,
    send: u64,
    recv: u64,
    count: usize,
    stream: cudarc::driver::sys::CUstream,
) -> Result<(), CudaError> {
    // SAFETY: `send` holds `count` f32 and `recv` `world * count` on this rank's GPU, the stream
    // belongs to the same context, and every rank issues the same sequence of calls.
    unsafe {
        result::all_gather(
            send as *const std::ffi::c_void,
            recv as *mut std::ffi::c_void,
            count,
            nccl_sys::ncclDataType_t::ncclFloat32,
            comm.comm,
            stream as nccl_sys::cudaStream_t,
        )
    }
    .map(|_| ())
    .map_err(|e| CudaError::Unsupported(format!("ncclAllGather: {}", describe(e, Some(comm)))))
}
