//! A global allocator for tests that looks into every block freed while it
//! is armed: if the block still holds the armed needle (a secret's bytes),
//! the secret was left behind in memory the program no longer owns, where
//! the next allocation, a core dump or a swap file can show it.
//!
//! Install it in a test binary with `#[global_allocator]`, arm it with the
//! bytes to look for, run the code under test, then read [`Watch::hits`].

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

/// Longest needle.
const MAX_NEEDLE: usize = 64;

/// The allocator: the system's, plus a look into freed blocks.
#[derive(Debug)]
pub struct Watch {
    armed: AtomicBool,
    len: AtomicUsize,
    needle: [AtomicU8; MAX_NEEDLE],
    hits: AtomicUsize,
}

impl Watch {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Watch {
            armed: AtomicBool::new(false),
            len: AtomicUsize::new(0),
            needle: [const { AtomicU8::new(0) }; MAX_NEEDLE],
            hits: AtomicUsize::new(0),
        }
    }

    /// Looks for `needle` (at most 64 bytes) in every block freed from now.
    pub fn arm(&self, needle: &[u8]) {
        assert!(!needle.is_empty() && needle.len() <= MAX_NEEDLE);
        self.armed.store(false, Ordering::SeqCst);
        for (slot, b) in self.needle.iter().zip(needle) {
            slot.store(*b, Ordering::SeqCst);
        }
        self.len.store(needle.len(), Ordering::SeqCst);
        self.hits.store(0, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Stops looking; returns how many freed blocks held the needle.
    pub fn disarm(&self) -> usize {
        self.armed.store(false, Ordering::SeqCst);
        self.hits.load(Ordering::SeqCst)
    }

    fn holds_needle(&self, block: &[u8]) -> bool {
        let len = self.len.load(Ordering::SeqCst);
        let mut needle = [0u8; MAX_NEEDLE];
        for (b, slot) in needle.iter_mut().zip(&self.needle).take(len) {
            *b = slot.load(Ordering::SeqCst);
        }
        block.windows(len).any(|w| w == &needle[..len])
    }
}

#[allow(unsafe_code)]
mod alloc_impl {
    use super::*;

    // SAFETY: every call is passed to `System` unchanged; `dealloc` only
    // reads the block it is about to free, which the caller still owns
    // (`ptr` and `layout` are those of a live allocation, per the trait's
    // contract).
    unsafe impl GlobalAlloc for Watch {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: as documented on the impl.
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if self.armed.load(Ordering::SeqCst) {
                // SAFETY: `ptr` points to `layout.size()` bytes this
                // allocation owns until the call below.
                let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
                if self.holds_needle(block) {
                    self.hits.fetch_add(1, Ordering::SeqCst);
                }
            }
            // SAFETY: as documented on the impl.
            unsafe { System.dealloc(ptr, layout) }
        }
    }
}
