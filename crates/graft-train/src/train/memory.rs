//! What training holds, measured where its tensors live: one meter with the same three readings on every device.
//!
//! On the CPU candle's tensors are `Vec`-backed, so the process's counting allocator (`crate::alloc`) sees every
//! storage. On CUDA they are device memory that no host allocator sees; candle allocates it through cudarc with
//! `cuMemAllocAsync` from the device's current memory pool, and the pool keeps the bytes handed out and not yet freed
//! (`CU_MEMPOOL_ATTR_USED_MEM_CURRENT`) and their high-water mark since the last reset (`..._USED_MEM_HIGH`). Those
//! are allocations, not an estimate and not the pool's reserve: the same quantity the CPU counter measures. cuBLAS's
//! own workspace is allocated outside the pool and is not counted (a few MiB per handle, the same for every policy).
//! A device without memory pools has no such counter, and its runs report no training memory.

use candle_core::Device;

/// Reads live bytes and their peak on one device.
pub enum MemoryMeter {
    /// The counting global allocator (CPU tensors).
    Host,
    /// The CUDA device's current memory pool.
    #[cfg(feature = "cuda")]
    CudaPool(cuda::Pool),
    /// No counter on this device.
    Unmeasured,
}

impl MemoryMeter {
    pub fn for_device(device: &Device) -> Self {
        match device {
            Device::Cpu => MemoryMeter::Host,
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => cuda::Pool::of(d).map_or(MemoryMeter::Unmeasured, MemoryMeter::CudaPool),
            #[allow(unreachable_patterns)]
            _ => MemoryMeter::Unmeasured,
        }
    }

    /// Whether this meter measures anything (false: report no training memory rather than a wrong one).
    pub fn measures(&self) -> bool {
        !matches!(self, MemoryMeter::Unmeasured)
    }

    /// Bytes allocated now and not yet freed.
    pub fn live(&self) -> u64 {
        match self {
            MemoryMeter::Host => crate::alloc::live_bytes(),
            #[cfg(feature = "cuda")]
            MemoryMeter::CudaPool(p) => p.used_now(),
            MemoryMeter::Unmeasured => 0,
        }
    }

    /// The most `live` has been since the last `reset_peak`.
    pub fn peak(&self) -> u64 {
        match self {
            MemoryMeter::Host => crate::alloc::peak_bytes(),
            #[cfg(feature = "cuda")]
            MemoryMeter::CudaPool(p) => p.used_high(),
            MemoryMeter::Unmeasured => 0,
        }
    }

    /// Starts a new high-water mark at what is live now.
    pub fn reset_peak(&self) {
        match self {
            MemoryMeter::Host => crate::alloc::reset_peak(),
            #[cfg(feature = "cuda")]
            MemoryMeter::CudaPool(p) => p.reset_high(),
            MemoryMeter::Unmeasured => {}
        }
    }
}

#[cfg(feature = "cuda")]
pub mod cuda {
    //! The CUDA memory pool's used-memory attributes, read through the cudarc candle links.

    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaContext};
    use candle_core::CudaDevice;

    pub struct Pool {
        context: Arc<CudaContext>,
        pool: sys::CUmemoryPool,
    }

    // SAFETY: a CUmemoryPool handle is a process-wide driver object; the driver API is thread-safe once the owning
    // context is bound, which every read below does first.
    unsafe impl Send for Pool {}
    unsafe impl Sync for Pool {}

    impl Pool {
        /// The pool candle's allocations on `device` come from, if the device allocates from pools at all.
        pub fn of(device: &CudaDevice) -> Option<Pool> {
            let stream = device.cuda_stream();
            let context = stream.context().clone();
            if !context.has_async_alloc() || context.bind_to_thread().is_err() {
                return None;
            }
            // SAFETY: the device handle comes from the live context candle created.
            let pool = unsafe { result::device::get_mem_pool(context.cu_device()) }.ok()?;
            Some(Pool { context, pool })
        }

        fn read(&self, attr: sys::CUmemPool_attribute) -> u64 {
            let mut value: u64 = 0;
            let ok = self.context.bind_to_thread().is_ok()
                // SAFETY: both attributes are cuuint64_t, as `value` is; the pool is valid while the context lives.
                && unsafe {
                    result::mem_pool::get_attribute(self.pool, attr, (&mut value as *mut u64).cast())
                }
                .is_ok();
            if ok {
                value
            } else {
                0
            }
        }

        pub fn used_now(&self) -> u64 {
            self.read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
        }

        pub fn used_high(&self) -> u64 {
            // Right after a reset the driver may report 0 until the next allocation: the live bytes are a floor.
            self.read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH).max(self.used_now())
        }

        pub fn reset_high(&self) {
            // The driver only accepts 0 here, which restarts the high-water mark from the bytes in use.
            let mut zero: u64 = 0;
            if self.context.bind_to_thread().is_ok() {
                // SAFETY: as in `read`; the value is a cuuint64_t 0, the one value this attribute accepts.
                let _ = unsafe {
                    result::mem_pool::set_attribute(
                        self.pool,
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                        (&mut zero as *mut u64).cast(),
                    )
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_meter_sees_a_held_buffer() {
        // Other tests allocate concurrently, so only lower bounds hold while the buffer lives.
        let meter = MemoryMeter::for_device(&Device::Cpu);
        assert!(meter.measures());
        meter.reset_peak();
        // black_box: an allocation that never escapes may be optimised away, and then nothing is counted.
        let buffer = std::hint::black_box(vec![1u8; 32 << 20]);
        assert!(meter.live() >= (32 << 20) && meter.peak() >= (32 << 20));
        drop(buffer);
    }
}
