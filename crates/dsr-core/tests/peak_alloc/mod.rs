//! A counting global allocator for the bad-file and fuzz tests (of dsr-core and, by path, of
//! dsr-train): it remembers the largest single allocation request of each thread, so that
//! tests running side by side in one binary do not see each other's allocations.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// A global allocator that remembers the largest single allocation request per thread.
pub struct PeakAlloc;

thread_local! {
    // A const-initialised `Cell` needs no allocation and no destructor, so the allocator may
    // touch it at any time; `try_with` covers the thread's own teardown.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

/// The largest single allocation so far on this thread (since the last [`reset_largest`]).
pub fn largest_allocation() -> usize {
    LARGEST.try_with(Cell::get).unwrap_or(0)
}

/// Forgets this thread's largest allocation, so that [`largest_allocation`] measures what
/// follows (one fuzz case, one step).
pub fn reset_largest() {
    let _ = LARGEST.try_with(|l| l.set(0));
}

/// Fails when any allocation of this thread so far was larger than `limit` bytes.
pub fn assert_no_allocation_above(limit: usize) {
    let largest = largest_allocation();
    assert!(
        largest <= limit,
        "an allocation of {largest} bytes happened (limit {limit})"
    );
}
