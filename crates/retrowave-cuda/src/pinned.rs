//! Page-locked host memory: what the GPU's copy engines read and write at full PCIe speed
//! (pageable memory moves at a sixth of it), offered to the tiered KV store as its page allocator.

use std::sync::Arc;

use cudarc::driver::{CudaContext, result, sys};
use retrowave_store::arena::ArenaError;
use retrowave_store::{HostMemory, PageAllocator};

use crate::CudaError;

/// A region of page-locked host memory, mapped for every context (`CU_MEMHOSTALLOC_PORTABLE`),
/// freed on drop. Not write-combined: the CPU reads it too (CPU-side attention, checksums).
pub struct PinnedBuffer {
    ptr: *mut u8,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the region is plain memory owned by this value; synchronisation of its contents is the
// user's concern, as for any raw buffer.
unsafe impl Send for PinnedBuffer {}
// SAFETY: as above.
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    /// Allocates `bytes` bytes (at least one page) of pinned memory.
    pub fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self, CudaError> {
        ctx.bind_to_thread()
            .map_err(CudaError::driver("cuCtxSetCurrent"))?;
        let len = bytes.max(4096);
        // SAFETY: a fresh allocation; freed in Drop with cuMemFreeHost.
        let ptr = unsafe { result::malloc_host(len, sys::CU_MEMHOSTALLOC_PORTABLE) }
            .map_err(CudaError::driver(format!("cuMemHostAlloc({len} bytes)")))?;
        Ok(PinnedBuffer {
            ptr: ptr as *mut u8,
            len,
            ctx: ctx.clone(),
        })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes owned by self, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl HostMemory for PinnedBuffer {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by cuMemHostAlloc in `new`, freed once.
        let _ = unsafe { result::free_host(self.ptr as *mut _) };
    }
}

/// The tiered store's page allocator backed by pinned memory of one GPU's context.
pub struct PinnedAllocator {
    ctx: Arc<CudaContext>,
}

impl PinnedAllocator {
    /// An allocator for `ctx`'s device (the memory is portable to all contexts).
    pub fn new(ctx: Arc<CudaContext>) -> Self {
        PinnedAllocator { ctx }
    }
}

impl PageAllocator for PinnedAllocator {
    fn allocate(&self, bytes: usize) -> Result<Box<dyn HostMemory>, ArenaError> {
        PinnedBuffer::new(&self.ctx, bytes)
            .map(|b| Box::new(b) as Box<dyn HostMemory>)
            .map_err(|e| ArenaError::Allocation {
                bytes,
                allocator: "cuda-pinned",
                reason: e.to_string(),
            })
    }

    fn name(&self) -> &'static str {
        "cuda-pinned"
    }
}
