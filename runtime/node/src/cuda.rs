//! GPU buffers (cargo feature `cuda`): collectives on device memory, staged through pinned
//! (page-locked) host memory: device → pinned host (DMA), the collective on the host, pinned
//! host → device. The CUDA driver is loaded at run time; without one (or without a GPU)
//! [`Gpu::open`] returns [`GpuError::NoDriver`] or [`GpuError::Driver`] — it never panics.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use phalanx_collectives::reduce::{DType, ReduceOp};
use thiserror::Error;

use crate::communicator::{AllReduceAlgorithm, CommError, Communicator};

/// Why a GPU could not be used.
#[derive(Debug, Error)]
pub enum GpuError {
    /// No CUDA driver library on this machine.
    #[error("no CUDA driver (libcuda) on this machine")]
    NoDriver,
    /// The driver refused (no such device, out of memory, …).
    #[error("CUDA: {0}")]
    Driver(String),
}

impl From<cudarc::driver::DriverError> for GpuError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        GpuError::Driver(e.to_string())
    }
}

/// Element types a device buffer may hold, with their collective data type.
pub trait DeviceElement: DeviceRepr + ValidAsZeroBits + Copy + Default + Unpin {
    /// The matching [`DType`].
    const DTYPE: DType;
}

impl DeviceElement for f32 {
    const DTYPE: DType = DType::F32;
}
impl DeviceElement for f64 {
    const DTYPE: DType = DType::F64;
}
impl DeviceElement for i32 {
    const DTYPE: DType = DType::I32;
}
impl DeviceElement for i64 {
    const DTYPE: DType = DType::I64;
}
impl DeviceElement for u8 {
    const DTYPE: DType = DType::U8;
}

/// One GPU and the stream its copies run on.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl Gpu {
    /// Opens device `ordinal`; an error, not a panic, where there is no driver or device.
    pub fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        // SAFETY: only probes whether the driver library can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::NoDriver);
        }
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.default_stream();
        Ok(Gpu { ctx, stream })
    }

    /// Copies `host` to a new device buffer.
    pub fn upload<T: DeviceElement>(&self, host: &[T]) -> Result<CudaSlice<T>, GpuError> {
        Ok(self.stream.clone_htod(host)?)
    }

    /// Copies a device buffer back to the host.
    pub fn download<T: DeviceElement>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>, GpuError> {
        Ok(self.stream.clone_dtoh(dev)?)
    }

    /// Device → pinned host → bytes.
    fn stage_out<T: DeviceElement>(&self, dev: &CudaSlice<T>) -> Result<Vec<u8>, GpuError> {
        // SAFETY: the pinned buffer is fully written by the copy before it is read.
        let mut pinned = unsafe { self.ctx.alloc_pinned::<T>(dev.len()) }?;
        self.stream.memcpy_dtoh(dev, &mut pinned)?;
        self.stream.synchronize()?;
        let host = pinned.as_slice()?;
        Ok(to_bytes(host))
    }

    /// Bytes → pinned host → device.
    fn stage_in<T: DeviceElement>(&self, bytes: &[u8], dev: &mut CudaSlice<T>) -> Result<(), GpuError> {
        // SAFETY: every element is written below before the copy reads it.
        let mut pinned = unsafe { self.ctx.alloc_pinned::<T>(dev.len()) }?;
        let dst = pinned.as_mut_slice()?;
        let size = std::mem::size_of::<T>();
        for (d, chunk) in dst.iter_mut().zip(bytes.chunks_exact(size)) {
            // SAFETY: `T` is a plain numeric type (see `DeviceElement`) of `size` bytes;
            // `read_unaligned` copes with the byte buffer's alignment.
            *d = unsafe { std::ptr::read_unaligned(chunk.as_ptr() as *const T) };
        }
        self.stream.memcpy_htod(&pinned, dev)?;
        self.stream.synchronize()?;
        Ok(())
    }
}

fn to_bytes<T: DeviceElement>(v: &[T]) -> Vec<u8> {
    let size = std::mem::size_of::<T>();
    let mut out = vec![0u8; std::mem::size_of_val(v)];
    for (i, x) in v.iter().enumerate() {
        // SAFETY: `T` is a plain numeric type of `size` bytes; the destination has room.
        unsafe { std::ptr::write_unaligned(out[i * size..].as_mut_ptr() as *mut T, *x) };
    }
    out
}

impl Communicator {
    /// All-reduce of a device buffer in place (every rank ends with the same bits), staged
    /// through pinned host memory. Faults as [`Communicator::all_reduce`].
    pub async fn all_reduce_device<T: DeviceElement>(
        &mut self,
        gpu: &Gpu,
        buf: &mut CudaSlice<T>,
        op: ReduceOp,
        algorithm: AllReduceAlgorithm,
        deadline: Duration,
    ) -> Result<(), CommError> {
        let host = gpu.stage_out(buf).map_err(|e| CommError::Gpu(e.to_string()))?;
        let out = self.all_reduce(host, T::DTYPE, op, algorithm, deadline).await?;
        gpu.stage_in(&out, buf).map_err(|e| CommError::Gpu(e.to_string()))
    }
}
