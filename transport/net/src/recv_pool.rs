//! Receive buffers that are reused instead of freed. Large frame payloads are read straight
//! from the socket into a pooled buffer, handed to the endpoint as a `Bytes` that owns the
//! buffer, and go back to the pool when the application drops the message. Fresh allocations
//! of megabyte buffers cost a page fault and a page clear per 4 KiB; reuse costs nothing.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// A pool of buffers (frame payloads, and whole messages: see `crate::message_buf`) bounded
/// by the bytes it keeps idle.
#[derive(Debug)]
pub(crate) struct RecvPool {
    free: Mutex<Vec<Vec<u8>>>,
    max_free_bytes: usize,
}

impl RecvPool {
    /// A pool keeping at most `max_free_bytes` in idle buffers.
    pub fn new(max_free_bytes: usize) -> Arc<RecvPool> {
        Arc::new(RecvPool { free: Mutex::new(Vec::new()), max_free_bytes })
    }

    /// A buffer of exactly `len` initialised bytes (contents unspecified): the smallest idle
    /// one that holds `len` and is not more than twice as large (a message buffer is not spent
    /// on a frame), or a fresh one.
    pub fn take(self: &Arc<Self>, len: usize) -> PooledBuf {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let fits = |b: &Vec<u8>| b.len() >= len && b.len() / 2 <= len;
            let best = free.iter().enumerate().filter(|(_, b)| fits(b)).min_by_key(|(_, b)| b.len()).map(|(i, _)| i);
            best.map(|i| free.swap_remove(i))
        };
        let buf = reused.unwrap_or_else(|| vec![0u8; len.next_multiple_of(64 << 10)]);
        PooledBuf { buf, len, pool: Arc::clone(self) }
    }

    fn give_back(&self, buf: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let idle: usize = free.iter().map(Vec::len).sum();
        if idle + buf.len() <= self.max_free_bytes {
            free.push(buf);
        }
    }

    /// Bytes held in idle buffers.
    #[cfg(test)]
    pub fn idle_bytes(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).iter().map(Vec::len).sum()
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
        let pool = RecvPool::new(100_000 + (64 << 10));
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

    #[test]
    fn the_smallest_fitting_buffer_is_reused_and_never_one_more_than_twice_the_size() {
        let pool = RecvPool::new(64 << 20);
        let (big, small) = (pool.take(16 << 20), pool.take(1 << 20));
        drop((big, small));
        assert_eq!(pool.take(900 << 10).buf.len(), 1 << 20, "the 1 MiB one, not the 16 MiB one");
        assert_eq!(pool.take(10 << 20).buf.len(), 16 << 20);
        let idle = pool.idle_bytes();
        let fresh = pool.take(4 << 20);
        assert_eq!(fresh.buf.len(), 4 << 20, "16 MiB is more than twice 4 MiB: a fresh one");
        assert_eq!(pool.idle_bytes(), idle, "nothing taken from the pool");
    }
}
