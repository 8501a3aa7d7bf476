//! The host arena: one region of host memory, handed out in 512-byte units.
//!
//! The region comes from a [`PageAllocator`] so that a GPU backend can supply page-locked memory
//! (cudaHostAlloc) that its copy engines read directly; the default [`MmapAllocator`] reserves
//! anonymous memory that the OS backs lazily, so a large capacity costs nothing until used.
//! The arena itself is plain bookkeeping without locks: the store serialises allocation and
//! guarantees that nobody reads a range while it is written or after it is freed.

use crate::ranges::{Extent, RangeAllocator};

/// Allocation unit of the arena in bytes (every page size the store uses is a multiple of it).
pub const ARENA_UNIT: usize = 512;

/// A region of host memory owned by whoever allocated it; dropping it frees it.
pub trait HostMemory: Send + Sync {
    /// Start of the region, aligned to at least 4096 bytes.
    fn as_ptr(&self) -> *mut u8;
    /// Bytes in the region.
    fn len(&self) -> usize;
    /// Whether the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Supplies the arena's memory.
pub trait PageAllocator: Send + Sync {
    /// A region of at least `bytes` bytes.
    fn allocate(&self, bytes: usize) -> Result<Box<dyn HostMemory>, ArenaError>;
    /// What kind of memory this is, for logs and metrics ("mmap", "cuda-pinned").
    fn name(&self) -> &'static str;
}

/// Errors of the arena.
#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    /// The allocator could not provide the region.
    #[error(
        "cannot allocate {bytes} bytes of host memory for the KV store ({allocator}): {reason}"
    )]
    Allocation {
        /// Bytes asked for.
        bytes: usize,
        /// The allocator's name.
        allocator: &'static str,
        /// What the system said.
        reason: String,
    },
}

/// Anonymous private memory from `mmap`, reserved without swap accounting, backed on first
/// touch, with transparent huge pages where the system allows them.
#[derive(Debug, Default, Clone, Copy)]
pub struct MmapAllocator;

struct MmapRegion {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the region is plain memory owned by this value; access is synchronised by its users.
unsafe impl Send for MmapRegion {}
// SAFETY: as above.
unsafe impl Sync for MmapRegion {}

impl HostMemory for MmapRegion {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: ptr/len came from a successful mmap and are unmapped once.
            unsafe {
                libc::munmap(self.ptr.cast(), self.len);
            }
        }
    }
}

impl PageAllocator for MmapAllocator {
    fn allocate(&self, bytes: usize) -> Result<Box<dyn HostMemory>, ArenaError> {
        let len = bytes.div_ceil(4096) * 4096;
        if len == 0 {
            return Ok(Box::new(MmapRegion {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len: 0,
            }));
        }
        // SAFETY: anonymous private mapping with no address hint; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(ArenaError::Allocation {
                bytes,
                allocator: self.name(),
                reason: std::io::Error::last_os_error().to_string(),
            });
        }
        // Records are gathered from random places of a large arena: huge pages spare most of
        // the TLB misses. Advice only; failure changes nothing.
        // SAFETY: the range is the mapping just created.
        unsafe {
            libc::madvise(ptr, len, libc::MADV_HUGEPAGE);
        }
        Ok(Box::new(MmapRegion {
            ptr: ptr.cast(),
            len,
        }))
    }

    fn name(&self) -> &'static str {
        "mmap"
    }
}

/// Host memory handed out in [`ARENA_UNIT`] units.
pub struct HostArena {
    mem: Box<dyn HostMemory>,
    ranges: RangeAllocator,
    allocator: &'static str,
}

impl HostArena {
    /// An arena of `capacity_bytes` (rounded down to whole units) from `allocator`.
    pub fn new(allocator: &dyn PageAllocator, capacity_bytes: u64) -> Result<Self, ArenaError> {
        let units = capacity_bytes / ARENA_UNIT as u64;
        let bytes =
            usize::try_from(units * ARENA_UNIT as u64).map_err(|_| ArenaError::Allocation {
                bytes: usize::MAX,
                allocator: allocator.name(),
                reason: "capacity exceeds the address space".into(),
            })?;
        let mem = allocator.allocate(bytes)?;
        Ok(HostArena {
            mem,
            ranges: RangeAllocator::new(units),
            allocator: allocator.name(),
        })
    }

    /// Units covering `bytes`.
    pub fn units_for(bytes: usize) -> u64 {
        bytes.div_ceil(ARENA_UNIT) as u64
    }

    /// A contiguous range for `bytes` bytes, or `None` when none is free.
    pub fn alloc(&mut self, bytes: usize) -> Option<Extent> {
        self.ranges.alloc(Self::units_for(bytes))
    }

    /// Frees a range from [`alloc`](Self::alloc).
    pub fn dealloc(&mut self, extent: Extent) {
        self.ranges.dealloc(extent);
    }

    /// Bytes handed out.
    pub fn used_bytes(&self) -> u64 {
        self.ranges.used() * ARENA_UNIT as u64
    }

    /// Bytes in the arena.
    pub fn capacity_bytes(&self) -> u64 {
        self.ranges.limit() * ARENA_UNIT as u64
    }

    /// The allocator's name.
    pub fn allocator(&self) -> &'static str {
        self.allocator
    }

    /// Start of the arena's memory (for registering it with io_uring or a GPU driver).
    pub fn base(&self) -> (*mut u8, usize) {
        (self.mem.as_ptr(), self.mem.len())
    }

    /// Pointer to the first byte of `extent`.
    pub fn ptr(&self, extent: Extent) -> *mut u8 {
        debug_assert!(extent.end() <= self.ranges.limit());
        // SAFETY: extents handed out lie inside the region.
        unsafe { self.mem.as_ptr().add(extent.start as usize * ARENA_UNIT) }
    }
}
