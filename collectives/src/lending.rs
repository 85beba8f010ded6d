//! A collective's buffer, ranges of which can be lent to the transport as `Bytes`.
//!
//! A send normally goes out as a *snapshot*: the segment copied into a message of its own,
//! because the transport keeps a sent frame until the peer acknowledges it (to send it again
//! after a failover) and later rounds may rewrite the buffer meanwhile. A segment that nothing
//! writes after its send (an all-gather's own block; see `Executor::lendable_sends`) can go out
//! as the buffer's own bytes instead: [`LendingBuffer::lend`] hands the range to the transport
//! as a `Bytes` that points into the buffer, with no copy.
//!
//! The buffer then belongs to the lent ranges as much as to the executor, so the executor can
//! give it back to its caller only once every lent range has been returned — the transport has
//! dropped its last handle, which it does when the frames are acknowledged (or the peer is
//! given up). [`LendingBuffer::returned`] says when; [`LendingBuffer::into_vec`] before that
//! copies the bytes out (always correct, never blocking).
//!
//! A range that a later receive writes again (a ring reduce-scatter's partial sums, which the
//! gathering half overwrites) is lent *until it comes back* ([`LendingBuffer::lend_until_back`]):
//! it is not written, or posted, while any handle of that loan lives
//! ([`LendingBuffer::is_out`]), and is the executor's again after.
//!
//! Ranges can also be *posted* for a receive ([`LendingBuffer::post`], see
//! `phalanx_proto::posting`): the transport reads a message's data straight into them. A
//! posted range is the transport's until [`LendingBuffer::settle`] takes it back; if the
//! transport filled it, it is lent from then on (the message's `Bytes` point into it).
//!
//! `bytes` cannot express a buffer that is lent in parts and written elsewhere meanwhile (the
//! parts of a `BytesMut` are not unique while their siblings live), so this holds the buffer
//! behind a pointer, as the transport's `message_buf` does: the executor writes only ranges it
//! has neither lent nor posted ([`LendingBuffer::range_mut`] checks), lent ranges are only
//! read, and posted ones are not touched at all until settled ([`LendingBuffer::range`]
//! checks).

use std::ops::Range;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use phalanx_proto::Posting;

/// The buffer once a range of it has been lent.
struct Shared {
    /// Start of the buffer's `len` bytes, taken once from `owner`, whose heap allocation does
    /// not move while it lives (the `Vec` itself is never touched until it is taken back).
    ptr: *mut u8,
    len: usize,
    owner: Vec<u8>,
}

// SAFETY: the bytes are written only through `LendingBuffer::range_mut` (one `LendingBuffer`
// per buffer, `&mut self`), never in a lent or posted range, or by the claimant of a posted
// range (`phalanx_proto::Posting`'s rules); read through `&self` outside posted ranges, or
// through `Lent` handles of lent ranges only; `Vec<u8>` is `Send` and `Sync`.
unsafe impl Send for Shared {}
// SAFETY: as above: shared access is to lent ranges, which no one writes, through `&self`, or
// to a posted range by its one claimant, which nothing else touches until it is settled.
unsafe impl Sync for Shared {}

/// Who to wake when a lent range comes back.
type WakeSlot = Arc<Mutex<Option<Waker>>>;

/// A lent range, as the owner of a `Bytes`.
struct Lent {
    /// `None` only while dropping (released before the waker is woken).
    buf: Option<Arc<Shared>>,
    range: Range<usize>,
    wake: WakeSlot,
    /// For a loan that comes back ([`LendingBuffer::lend_until_back`]): the token whose last
    /// holder's drop frees the range for writing again.
    token: Option<Arc<()>>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        let buf = self.buf.as_ref().expect("alive until dropped");
        // SAFETY: `range` lies within the buffer (checked by `lend`), and no one writes a lent
        // range while any handle of it lives (`range_mut` refuses).
        unsafe { std::slice::from_raw_parts(buf.ptr.add(self.range.start), self.range.len()) }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        // Release the buffer and the range first, so that whoever is woken sees them released.
        drop(self.buf.take());
        drop(self.token.take());
        if let Some(w) = self.wake.lock().unwrap_or_else(|e| e.into_inner()).take() {
            w.wake();
        }
    }
}

enum State {
    /// Nothing lent yet: a plain vector.
    Owned(Vec<u8>),
    /// Ranges lent (some may have come back).
    Shared(Arc<Shared>),
}

/// A collective's buffer; see the module documentation.
pub struct LendingBuffer {
    state: State,
    /// Byte ranges lent so far (sorted, disjoint: overlapping loans merged).
    lent: Vec<Range<usize>>,
    /// Ranges posted for receives and not yet settled (disjoint, in posting order).
    posted: Vec<(Range<usize>, Arc<Posting>)>,
    /// Ranges lent until they come back ([`LendingBuffer::lend_until_back`]), each with its
    /// loan's token (dead once every handle of the loan has dropped; pruned as they are found).
    until_back: Vec<(Range<usize>, Weak<()>)>,
    /// Loans lent until back found back so far.
    came_back: u64,
    wake: WakeSlot,
}

impl Drop for LendingBuffer {
    fn drop(&mut self) {
        // No transport writes into a buffer its owner has let go of.
        for (_, p) in self.posted.drain(..) {
            p.revoke();
        }
    }
}

impl LendingBuffer {
    /// The buffer `buf`, nothing lent.
    pub fn new(buf: Vec<u8>) -> LendingBuffer {
        LendingBuffer {
            state: State::Owned(buf),
            lent: Vec::new(),
            posted: Vec::new(),
            until_back: Vec::new(),
            came_back: 0,
            wake: Arc::default(),
        }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        match &self.state {
            State::Owned(v) => v.len(),
            State::Shared(s) => s.len,
        }
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All of its bytes. Panics while a range is posted (the transport may be writing it).
    pub fn bytes(&self) -> &[u8] {
        assert!(self.posted.is_empty(), "reading a buffer with {} ranges posted", self.posted.len());
        match &self.state {
            State::Owned(v) => v,
            // SAFETY: the whole buffer, read only: lent ranges are only ever read, none is
            // posted (checked above), and the rest is written only through `&mut self`, which
            // this borrow excludes.
            State::Shared(s) => unsafe { std::slice::from_raw_parts(s.ptr, s.len) },
        }
    }

    /// The bytes `range`, to read. Panics if it is out of bounds or overlaps a posted range.
    pub fn range(&self, range: Range<usize>) -> &[u8] {
        assert!(range.start <= range.end && range.end <= self.len(), "{range:?} outside {} bytes", self.len());
        self.check_not_posted(&range);
        match &self.state {
            State::Owned(v) => &v[range],
            // SAFETY: within the buffer, read only: lent ranges are only ever read, posted ones
            // are not in it (checked above), and the rest is written only through `&mut self`,
            // which this borrow excludes.
            State::Shared(s) => unsafe { std::slice::from_raw_parts(s.ptr.add(range.start), range.len()) },
        }
    }

    fn check_not_posted(&self, range: &Range<usize>) {
        if let Some((p, _)) = self.posted.iter().find(|(p, _)| p.start < range.end && range.start < p.end) {
            panic!("touching {range:?}, which overlaps the posted {p:?}");
        }
    }

    /// The bytes `range`, to write. Panics if it is out of bounds or overlaps a range ever lent
    /// by this buffer (the executor never writes what it has lent: its bug, caught here, before
    /// the transport could send bytes other than those it checksummed), one posted, or one lent
    /// until it comes back that has not yet.
    pub fn range_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        assert!(range.start <= range.end && range.end <= self.len(), "{range:?} outside {} bytes", self.len());
        if !range.is_empty() {
            self.check_not_posted(&range);
            assert!(!self.is_out(&range), "writing {range:?}, which is still lent");
        }
        let at = self.lent.partition_point(|l| l.end <= range.start);
        assert!(
            self.lent.get(at).is_none_or(|l| l.start >= range.end || range.is_empty()),
            "writing {range:?}, which overlaps the lent {:?}",
            self.lent[at]
        );
        match &mut self.state {
            State::Owned(v) => &mut v[range],
            // SAFETY: within the buffer, overlapping no lent or posted range (checked above), and
            // `&mut self` makes this the only reference into the rest.
            State::Shared(s) => unsafe { std::slice::from_raw_parts_mut(s.ptr.add(range.start), range.len()) },
        }
    }

    /// The bytes `range` as a `Bytes` that shares the buffer (no copy). From now on the range
    /// is never written again ([`LendingBuffer::range_mut`] refuses). A range may be lent more
    /// than once (a broadcast's root sends one block to several children). Panics if it is out
    /// of bounds or overlaps a posted range.
    pub fn lend(&mut self, range: Range<usize>) -> Bytes {
        assert!(range.start <= range.end && range.end <= self.len(), "{range:?} outside {} bytes", self.len());
        self.check_not_posted(&range);
        self.mark_lent(range.clone());
        Bytes::from_owner(Lent { buf: Some(self.share()), range, wake: Arc::clone(&self.wake), token: None })
    }

    /// The bytes `range` as a `Bytes` that shares the buffer (no copy), for a range that will be
    /// written again once the loan has come back — every handle of this `Bytes` dropped
    /// ([`LendingBuffer::is_out`] says when). Until then it is neither written nor posted
    /// ([`LendingBuffer::range_mut`] and [`LendingBuffer::post`] refuse). Panics if it is out
    /// of bounds or overlaps a posted range.
    pub fn lend_until_back(&mut self, range: Range<usize>) -> Bytes {
        assert!(range.start <= range.end && range.end <= self.len(), "{range:?} outside {} bytes", self.len());
        self.check_not_posted(&range);
        let token = Arc::new(());
        self.prune();
        self.until_back.push((range.clone(), Arc::downgrade(&token)));
        Bytes::from_owner(Lent { buf: Some(self.share()), range, wake: Arc::clone(&self.wake), token: Some(token) })
    }

    /// Whether part of `range` is lent until it comes back ([`LendingBuffer::lend_until_back`])
    /// and has not yet.
    pub fn is_out(&self, range: &Range<usize>) -> bool {
        self.until_back.iter().any(|(r, t)| r.start < range.end && range.start < r.end && t.strong_count() > 0)
    }

    /// How many loans lent until back have been found back so far (grows as they come back):
    /// whoever waits for one looks again only when this has grown.
    pub fn loans_back(&mut self) -> u64 {
        self.prune();
        self.came_back
    }

    /// Forgets the loans lent until back that have come back, counting them.
    fn prune(&mut self) {
        let before = self.until_back.len();
        self.until_back.retain(|(_, t)| t.strong_count() > 0);
        self.came_back += (before - self.until_back.len()) as u64;
    }

    /// Records `range` as lent: never written again.
    fn mark_lent(&mut self, range: Range<usize>) {
        // Kept sorted and disjoint: overlapping or touching ranges are merged.
        let first = self.lent.partition_point(|l| l.end < range.start);
        let last = self.lent.partition_point(|l| l.start <= range.end);
        let merged = self.lent[first..last].iter().fold(range, |m, l| m.start.min(l.start)..m.end.max(l.end));
        self.lent.splice(first..last, [merged]);
    }

    /// The buffer, shared from now on.
    fn share(&mut self) -> Arc<Shared> {
        match &mut self.state {
            State::Shared(s) => Arc::clone(s),
            State::Owned(v) => {
                let mut owner = std::mem::take(v);
                let (ptr, len) = (owner.as_mut_ptr(), owner.len());
                let s = Arc::new(Shared { ptr, len, owner });
                self.state = State::Shared(Arc::clone(&s));
                s
            }
        }
    }

    /// Posts `range` for a receive: the transport may read a message's data into it (see
    /// `phalanx_proto::posting`) until [`LendingBuffer::settle`]. Until then the range is
    /// neither read nor written here. Panics if it is out of bounds, empty, or overlaps a range
    /// lent (for good, or until it comes back and it has not yet) or posted.
    pub fn post(&mut self, range: Range<usize>) -> Arc<Posting> {
        assert!(range.start < range.end && range.end <= self.len(), "posting {range:?} of {} bytes", self.len());
        self.check_not_posted(&range);
        assert!(!self.is_out(&range), "posting {range:?}, which is still lent");
        let at = self.lent.partition_point(|l| l.end <= range.start);
        assert!(self.lent.get(at).is_none_or(|l| l.start >= range.end), "posting {range:?}, which overlaps a loan");
        let shared = self.share();
        // SAFETY: `range` lies within the buffer (checked), which the owner (a loan of the range,
        // holding the buffer) keeps alive; this buffer neither reads nor writes a posted range
        // until `settle` has revoked it (`range`/`range_mut`/`bytes` check), and a filled one
        // becomes lent, never written again.
        let posting = unsafe {
            Posting::new(
                shared.ptr.add(range.start),
                range.len(),
                Box::new(Lent {
                    buf: Some(Arc::clone(&shared)),
                    range: range.clone(),
                    wake: Arc::clone(&self.wake),
                    token: None,
                }),
            )
        };
        self.posted.push((range, Arc::clone(&posting)));
        posting
    }

    /// Takes back the posted `range`: `Some(true)` if the transport filled it with the message's
    /// data (from now on it is lent, never written again, as the message's `Bytes` point into
    /// it), `Some(false)` if not (it is this buffer's again), `None` if it was not posted.
    pub fn settle(&mut self, range: Range<usize>) -> Option<bool> {
        let at = self.posted.iter().position(|(r, _)| *r == range)?;
        let (_, posting) = self.posted.swap_remove(at);
        let filled = posting.revoke();
        if filled {
            self.mark_lent(range);
        }
        Some(filled)
    }

    /// Whether some lent range is still held (by the transport).
    pub fn is_lent(&self) -> bool {
        matches!(&self.state, State::Shared(s) if Arc::strong_count(s) > 1)
    }

    /// A handle that says when every range lent so far has come back (for a driver that
    /// waits without holding the buffer).
    pub fn returned(&self) -> Returned {
        Returned { shared: self.shared(), wake: Arc::clone(&self.wake) }
    }

    fn shared(&self) -> Option<std::sync::Weak<Shared>> {
        match &self.state {
            State::Shared(s) => Some(Arc::downgrade(s)),
            State::Owned(_) => None,
        }
    }

    /// The buffer as a vector: itself when nothing is lent any more, else a copy (the lent
    /// ranges stay valid for whoever holds them). Posted ranges are taken back first.
    pub fn into_vec(mut self) -> Vec<u8> {
        for (_, p) in self.posted.drain(..) {
            p.revoke();
        }
        match std::mem::replace(&mut self.state, State::Owned(Vec::new())) {
            State::Owned(v) => v,
            State::Shared(s) => match Arc::try_unwrap(s) {
                Ok(shared) => shared.owner,
                // SAFETY: as in `bytes`.
                Err(s) => unsafe { std::slice::from_raw_parts(s.ptr, s.len) }.to_vec(),
            },
        }
    }
}

/// Says when every range a [`LendingBuffer`] had lent (when this was made) has come back.
#[derive(Clone)]
pub struct Returned {
    shared: Option<std::sync::Weak<Shared>>,
    wake: WakeSlot,
}

impl Returned {
    /// Ready once only the buffer itself still holds it; otherwise `cx` is woken when a lent
    /// range comes back.
    pub fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        *self.wake.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        match self.shared.as_ref().map(std::sync::Weak::strong_count) {
            Some(n) if n > 1 => Poll::Pending,
            _ => Poll::Ready(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_lent_range_is_shared_not_copied_and_the_buffer_comes_back_whole_once_it_is_returned() {
        let v: Vec<u8> = (0..100u8).collect();
        let addr = v.as_ptr();
        let mut b = LendingBuffer::new(v);
        let lent = b.lend(10..20);
        assert_eq!(lent.as_ptr(), addr.wrapping_add(10), "no copy");
        assert_eq!(&lent[..], &(10..20u8).collect::<Vec<_>>()[..]);
        // The rest can still be written; the lent range cannot.
        b.range_mut(0..10).fill(7);
        b.range_mut(20..100).fill(9);
        assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.range_mut(15..25).fill(0))).is_err());
        assert_eq!(&lent[..], &(10..20u8).collect::<Vec<_>>()[..], "untouched");
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        let watch = b.returned();
        assert!(b.is_lent());
        assert!(watch.poll(&mut cx).is_pending());
        let copy = lent.clone();
        drop(lent);
        assert!(b.is_lent(), "a clone still holds it");
        drop(copy);
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "woken when the last handle went");
        assert!(watch.poll(&mut cx).is_ready());
        assert!(!b.is_lent());
        let out = b.into_vec();
        assert_eq!(out.as_ptr(), addr, "the same allocation back");
        assert!(out[..10].iter().all(|x| *x == 7) && out[20..].iter().all(|x| *x == 9));
        assert_eq!(&out[10..20], &(10..20u8).collect::<Vec<_>>()[..]);
    }

    #[test]
    fn a_range_lent_twice_or_overlapping_is_merged_and_still_never_written() {
        let mut b = LendingBuffer::new(vec![1u8; 100]);
        let (x, y, z) = (b.lend(10..20), b.lend(10..20), b.lend(15..30));
        let w = b.lend(40..50);
        assert_eq!(b.lent, vec![10..30, 40..50]);
        let _ = b.lend(30..40);
        assert_eq!(b.lent, vec![10..50], "touching ranges merged");
        b.range_mut(0..10).fill(2);
        b.range_mut(50..100).fill(3);
        for bad in [5..11, 29..31, 49..60, 0..100] {
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.range_mut(bad.clone()).fill(0)));
            assert!(caught.is_err(), "{bad:?} overlaps a loan");
        }
        assert!([x, y, z, w].iter().all(|l| l.iter().all(|v| *v == 1)));
    }

    /// Fills a claimed posting with `byte` as a link reader would.
    fn fill(p: &Arc<Posting>, byte: u8) -> Bytes {
        let mut w = p.claim().expect("open");
        w.write(0..p.len(), |d| d.fill(byte)).expect("not taken back");
        w.finish().expect("not taken back")
    }

    #[test]
    fn a_posted_range_is_not_touched_until_settled_and_a_filled_one_is_lent_from_then_on() {
        let v = vec![1u8; 100];
        let addr = v.as_ptr();
        let mut b = LendingBuffer::new(v);
        let (p, q) = (b.post(10..20), b.post(30..40));
        for bad in [5..11, 19..25, 35..36] {
            let mut touch =
                |f: &dyn Fn(&mut LendingBuffer)| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut b)));
            assert!(touch(&|b| b.range_mut(bad.clone()).fill(0)).is_err(), "writing {bad:?}");
            assert!(touch(&|b| drop(b.range(bad.clone()).to_vec())).is_err(), "reading {bad:?}");
            assert!(touch(&|b| drop(b.lend(bad.clone()))).is_err(), "lending {bad:?}");
        }
        assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.bytes().len())).is_err());
        assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.post(15..25))).is_err(), "posted twice");
        b.range_mut(0..10).fill(2);
        let data = fill(&p, 7);
        assert_eq!(data.as_ptr(), addr.wrapping_add(10), "read in place");
        assert_eq!(b.settle(10..20), Some(true));
        assert_eq!(b.settle(10..20), None, "settled once");
        assert!(
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.range_mut(10..20).fill(0))).is_err(),
            "lent now"
        );
        assert_eq!(b.range(10..20), &[7u8; 10][..]);
        // Not filled: the buffer's again, and no reader can write it any more.
        let mut late = q.claim().expect("open");
        assert_eq!(b.settle(30..40), Some(false));
        assert!(late.write(0..10, |d| d.fill(9)).is_none(), "taken back");
        b.range_mut(30..40).fill(3);
        assert!(b.is_lent(), "the filled data is still held");
        drop((data, p, q, late));
        assert!(!b.is_lent());
        let out = b.into_vec();
        assert_eq!(out.as_ptr(), addr, "the same allocation back");
        assert_eq!((&out[..10], &out[10..20], &out[30..40]), (&[2u8; 10][..], &[7u8; 10][..], &[3u8; 10][..]));
    }

    #[test]
    fn a_range_lent_until_back_is_neither_written_nor_posted_until_every_handle_is_gone() {
        let v = vec![1u8; 64];
        let addr = v.as_ptr();
        let mut b = LendingBuffer::new(v);
        let loan = b.lend_until_back(16..32);
        assert_eq!(loan.as_ptr(), addr.wrapping_add(16), "no copy");
        let copy = loan.clone();
        assert!(b.is_out(&(20..40)) && !b.is_out(&(32..40)));
        assert_eq!(b.loans_back(), 0);
        assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.range_mut(30..34).fill(0))).is_err());
        assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.post(0..17))).is_err());
        b.range_mut(32..64).fill(2);
        drop(loan);
        assert!(b.is_out(&(16..32)), "a clone still holds it");
        drop(copy);
        assert!(!b.is_out(&(16..32)));
        assert_eq!(b.loans_back(), 1, "counted back once");
        b.range_mut(16..32).fill(3);
        let p = b.post(16..32);
        assert_eq!(b.settle(16..32), Some(false));
        drop(p);
        let out = b.into_vec();
        assert_eq!(out.as_ptr(), addr, "the same allocation back");
        assert_eq!((&out[..16], &out[16..32], &out[32..]), (&[1u8; 16][..], &[3u8; 16][..], &[2u8; 32][..]));
    }

    #[test]
    fn handing_the_buffer_back_takes_its_postings_back_first() {
        let mut b = LendingBuffer::new(vec![4u8; 64]);
        let p = b.post(0..32);
        let mut w = p.claim().expect("open");
        let out = b.into_vec();
        assert!(w.write(0..32, |d| d.fill(0)).is_none(), "no write after the buffer went back");
        assert_eq!(out, vec![4u8; 64]);
        let mut c = LendingBuffer::new(vec![5u8; 8]);
        let q = c.post(0..8);
        drop(c);
        assert!(q.claim().is_none(), "dropped: revoked");
    }

    #[test]
    fn a_buffer_still_lent_is_copied_out_and_the_lent_bytes_stay_valid() {
        let mut b = LendingBuffer::new(vec![5u8; 64]);
        let lent = b.lend(0..32);
        let out = b.into_vec();
        assert_eq!(out, vec![5u8; 64]);
        assert_eq!(&lent[..], &[5u8; 32][..], "still readable after the buffer was handed back");
    }
}
