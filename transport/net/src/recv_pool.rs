//! Receive buffers that are reused instead of freed. Large frame payloads are read straight
//! from the socket into a pooled buffer, handed to the endpoint as a `Bytes` that owns the
//! buffer, and go back to the pool when the application drops the message. Fresh allocations
//! of megabyte buffers cost a page fault and a page clear per 4 KiB; reuse costs nothing.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// A bounded pool of equally sized buffers.
#[derive(Debug)]
pub(crate) struct RecvPool {
    free: Mutex<Vec<Vec<u8>>>,
    max_free: usize,
}

impl RecvPool {
    /// A pool keeping at most `max_free` idle buffers.
    pub fn new(max_free: usize) -> Arc<RecvPool> {
        Arc::new(RecvPool { free: Mutex::new(Vec::new()), max_free })
    }

    /// A buffer of exactly `len` initialised bytes (contents unspecified), reused when one is
    /// idle and large enough.
    pub fn take(self: &Arc<Self>, len: usize) -> PooledBuf {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            free.iter().position(|b| b.len() >= len).map(|i| free.swap_remove(i))
        };
        let buf = reused.unwrap_or_else(|| vec![0u8; len.next_multiple_of(64 << 10)]);
        PooledBuf { buf, len, pool: Arc::clone(self) }
    }

    fn give_back(&self, buf: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.max_free {
            free.push(buf);
        }
    }
}

/// A buffer on loan from a [`RecvPool`]; returns to it on drop.
#[derive(Debug)]
pub(crate) struct PooledBuf {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<RecvPool>,
}

impl PooledBuf {
    /// The bytes to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }

    /// Hands the buffer out as `Bytes`; it returns to the pool when the last clone drops.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_when_the_last_bytes_handle_drops_and_the_pool_stays_bounded() {
        let pool = RecvPool::new(1);
        let mut a = pool.take(100_000);
        a.as_mut_slice()[0] = 7;
        let bytes = a.freeze();
        let clone = bytes.clone();
        drop(bytes);
        assert_eq!(pool.free.lock().unwrap().len(), 0, "still referenced");
        assert_eq!(clone[0], 7);
        assert_eq!(clone.len(), 100_000);
        drop(clone);
        assert_eq!(pool.free.lock().unwrap().len(), 1);
        let b = pool.take(10);
        let c = pool.take(10);
        drop((b, c));
        assert_eq!(pool.free.lock().unwrap().len(), 1, "bounded");
    }
}
