//! One receive buffer for a whole multi-frame message, filled frame by frame by a link's reader.
//!
//! A large message arrives as many frames (the transport's chunk, 1 MiB by default). Read into
//! a buffer per frame, it reaches the application as a list of buffers that must be joined
//! (copied) wherever one contiguous buffer is needed: an all-to-all's per-source result, a
//! recovery chunk. When a link's frames of a message arrive in order — the common case, one path
//! per peer — the reader instead reads them into consecutive ranges of one buffer the size of
//! the message: each frame is still handed on as its own `Bytes` (a slice of that buffer), and
//! the last one carries the whole buffer, which the session delivers without a copy.
//!
//! `bytes` cannot express this: the slices of a `BytesMut` are not unique while their siblings
//! live, so a frozen part cannot be written next to. [`MessageWriter`] is the one writer of a
//! buffer; it hands out only ranges it has finished writing, and writes only ranges it has not
//! handed out, so no byte is ever read and written at once.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use crate::recv_pool::PooledBuf;

/// The buffer, shared by the writer and every slice handed out.
struct Shared {
    /// Start of the buffer's `len` bytes; taken once from `_owner`, which is never touched again
    /// until it is dropped with the last handle.
    ptr: *mut u8,
    len: usize,
    _owner: PooledBuf,
}

// SAFETY: the bytes are written only through `MessageWriter` (one per buffer, `&mut self`), only
// in ranges not yet handed out as `Piece`s, and read only through `Piece`s; `PooledBuf` itself
// is `Send` and `Sync`.
unsafe impl Send for Shared {}
// SAFETY: as above: shared access is to disjoint, finished ranges only.
unsafe impl Sync for Shared {}

/// A finished range of a buffer, as the owner of a `Bytes`.
struct Piece {
    buf: Arc<Shared>,
    range: Range<usize>,
}

impl AsRef<[u8]> for Piece {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `range` lies within the buffer and was fully written before this piece was
        // made; the writer never writes it again (it only moves forward).
        unsafe { std::slice::from_raw_parts(self.buf.ptr.add(self.range.start), self.range.len()) }
    }
}

/// The writer of one message buffer: fills it front to back and hands out what it has filled.
pub(crate) struct MessageWriter {
    buf: Arc<Shared>,
    /// Bytes handed out so far (`0..written`); everything after is the writer's alone.
    written: usize,
}

impl MessageWriter {
    /// A writer of `owner`'s bytes (all of them: the message's length).
    pub fn new(mut owner: PooledBuf) -> MessageWriter {
        let slice = owner.as_mut_slice();
        let (ptr, len) = (slice.as_mut_ptr(), slice.len());
        MessageWriter { buf: Arc::new(Shared { ptr, len, _owner: owner }), written: 0 }
    }

    /// Bytes not yet handed out.
    pub fn remaining(&self) -> usize {
        self.buf.len - self.written
    }

    /// The next `n` bytes to fill (`n` at most [`MessageWriter::remaining`]). Filling them
    /// hands nothing out; [`MessageWriter::commit`] does.
    pub fn next_mut(&mut self, n: usize) -> &mut [u8] {
        assert!(n <= self.remaining(), "{n} bytes past the message's end");
        // SAFETY: `written..written + n` is inside the buffer and not part of any `Piece`
        // (pieces cover `0..written` only); `&mut self` makes this the only live reference.
        unsafe { std::slice::from_raw_parts_mut(self.buf.ptr.add(self.written), n) }
    }

    /// Hands out the next `n` bytes (filled through [`MessageWriter::next_mut`]) as `Bytes`.
    pub fn commit(&mut self, n: usize) -> Bytes {
        assert!(n <= self.remaining(), "{n} bytes past the message's end");
        let range = self.written..self.written + n;
        self.written += n;
        Bytes::from_owner(Piece { buf: Arc::clone(&self.buf), range })
    }

    /// The whole buffer, once every byte has been handed out.
    pub fn whole(&self) -> Option<Bytes> {
        (self.remaining() == 0).then(|| Bytes::from_owner(Piece { buf: Arc::clone(&self.buf), range: 0..self.buf.len }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recv_pool::RecvPool;

    #[test]
    fn pieces_are_consecutive_slices_of_the_whole_and_the_buffer_returns_to_the_pool_after_the_last() {
        let pool = RecvPool::new(1 << 20);
        let mut w = MessageWriter::new(pool.take(10));
        w.next_mut(4).copy_from_slice(b"abcd");
        let a = w.commit(4);
        assert!(w.whole().is_none(), "not finished");
        w.next_mut(6).copy_from_slice(b"efghij");
        let b = w.commit(6);
        let whole = w.whole().expect("finished");
        assert_eq!(&whole[..], b"abcdefghij");
        assert_eq!((&a[..], &b[..]), (&b"abcd"[..], &b"efghij"[..]));
        assert_eq!(a.as_ptr(), whole.as_ptr());
        assert_eq!(b.as_ptr(), whole[4..].as_ptr());
        drop((w, a, b));
        assert_eq!(pool.idle_bytes(), 0, "still referenced by the whole");
        drop(whole);
        assert!(pool.idle_bytes() >= 10, "back in the pool");
    }

    #[test]
    #[should_panic(expected = "past the message's end")]
    fn writing_past_the_end_is_refused() {
        let pool = RecvPool::new(1 << 20);
        let mut w = MessageWriter::new(pool.take(3));
        w.next_mut(4);
    }
}
