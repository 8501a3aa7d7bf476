//! Heap buffers aligned for `O_DIRECT`.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use super::{IO_ALIGN, round_up};

/// A zeroed heap buffer whose address is aligned to [`IO_ALIGN`] and whose length is a multiple
/// of it, as `O_DIRECT` I/O requires.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: the buffer owns its allocation exclusively, like a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates a zeroed buffer of `len` bytes rounded up to a multiple of [`IO_ALIGN`].
    ///
    /// # Panics
    ///
    /// If the rounded length exceeds `isize::MAX` (like `Vec`); aborts if memory runs out.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let len =
            round_up(len).unwrap_or_else(|| panic!("AlignedBuf of {len} bytes: capacity overflow"));
        // A zero-length buffer still owns one aligned block so that its pointer is real.
        let layout = Layout::from_size_align(len.max(IO_ALIGN), IO_ALIGN)
            .unwrap_or_else(|_| panic!("AlignedBuf of {len} bytes: capacity overflow"));
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, layout }
    }

    /// Start of the buffer.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Start of the buffer, for writing (and for [`IoOp::buf`](super::IoOp::buf)).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes (a multiple of [`IO_ALIGN`]).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `len` zero-initialised bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: `len` initialised bytes owned exclusively by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_buffers_are_aligned_rounded_and_zero() {
        for (ask, want) in [
            (0, 0),
            (1, 4096),
            (4096, 4096),
            (5000, 8192),
            (65_536, 65_536),
        ] {
            let mut b = AlignedBuf::zeroed(ask);
            assert_eq!(b.len(), want);
            assert_eq!(b.is_empty(), want == 0);
            assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
            b.fill(0xAB);
            assert!(b.iter().all(|&x| x == 0xAB));
            assert_eq!(b.as_mut_ptr() as *const u8, b.as_ptr());
        }
    }

    #[test]
    fn aligned_buf_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<AlignedBuf>();
    }
}
