//! Allocator settings for the whole process.
//!
//! glibc hands blocks above its mmap threshold back to the kernel when freed and maps them afresh on the next
//! allocation, so a loop that allocates the same few megabytes per chunk or per training step page-faults and has
//! the kernel zero every page again. That was a third of a small CNN's training step and a sixth of a linear merge.
//! Keeping such blocks in the heap costs no peak memory: they are reused by the next chunk of the same size.

/// Keeps freed buffers of up to 32 MiB in the heap and returns heap memory to the kernel only above 1 GiB free.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_allocator() {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: mallopt only adjusts glibc allocator thresholds; both values are within the documented ranges
    // (the mmap threshold is capped at 32 MiB on 64-bit systems).
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}
