//! Posted receives: a place in the application's own buffer where a link reads a message's
//! bytes straight from the socket, instead of into a buffer of its own that the application
//! then copies from.
//!
//! The application (a collective's executor) *posts* a range it expects a message's data in —
//! a [`Posting`] — and files it in a [`PostingTable`] under the message's first frame (the
//! collective's header, sent as a frame of its own). A link reader that reads that first frame
//! asks the table ([`Placer::place`]) and, when a posting matches, *claims* it
//! ([`PostedWrite`]) and reads the message's data frame into it. Once the frame has passed its
//! checksum the claim is *filled* ([`PostedWrite::finish`]): the frame's payload is a `Bytes`
//! that points into the application's buffer, and the application, when the message reaches it,
//! finds its data already in place.
//!
//! **Under faults.** A posting is claimed at most once. A reader that gives up (its link died,
//! the data frame went by another path, the checksum failed) *abandons* it, and the message's
//! frames — the retransmission too — then arrive as usual, in the transport's own buffers. The
//! owner takes a posting back with [`Posting::revoke`] before it writes the range itself (the
//! message came another way) or hands the buffer back; a reader writes only while it holds the
//! posting in the `WRITING` state, which `revoke` waits out (one socket read, microseconds), so
//! after `revoke` no reader touches the range again. A posting that was filled stays the
//! message's: its bytes are verified data of exactly the frame the application receives (the
//! same sequence number of the same session, whichever path delivered it), and the owner never
//! writes them again while a `Bytes` of them lives.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

use crate::ids::{ChannelId, RankId};

/// Posted, not claimed.
const OPEN: u8 = 0;
/// Claimed by a reader, which is not writing right now.
const CLAIMED: u8 = 1;
/// A reader is writing the range (a socket read, or a copy, and the checksum of what it wrote).
const WRITING: u8 = 2;
/// Written and verified: the range holds the message's data.
const FILLED: u8 = 3;
/// The reader gave up; the range holds nothing useful and is never claimed again.
const ABANDONED: u8 = 4;
/// The owner took the range back.
const REVOKED: u8 = 5;

/// A range of an application's buffer, posted for one message's data; see the module
/// documentation.
pub struct Posting {
    state: AtomicU8,
    ptr: *mut u8,
    len: usize,
    /// Keeps the buffer alive: until revoked (then released, so a claim that lingers on a stalled
    /// link does not hold the application's buffer), or for as long as a filled range's
    /// `Bytes` live.
    owner: Mutex<Option<Box<dyn Send + Sync>>>,
}

// SAFETY: the range is written only by the one claimant, in the `WRITING` state, and read only
// once `FILLED` (through `Filled`); the owner (who made the posting) does neither until `revoke`
// returns. The rest is atomics and a mutex.
unsafe impl Send for Posting {}
// SAFETY: as above.
unsafe impl Sync for Posting {}

impl std::fmt::Debug for Posting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Posting").field("len", &self.len).field("state", &self.state.load(Ordering::Relaxed)).finish()
    }
}

impl Posting {
    /// Posts the `len` bytes at `ptr`, kept alive by `owner`.
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must stay valid for reads and writes while `owner` lives, and no one but
    /// this posting's claimant may read or write it until [`Posting::revoke`] returns; if that
    /// says the range was filled, no one may write it while a `Bytes` of it lives.
    pub unsafe fn new(ptr: *mut u8, len: usize, owner: Box<dyn Send + Sync>) -> Arc<Posting> {
        Arc::new(Posting { state: AtomicU8::new(OPEN), ptr, len, owner: Mutex::new(Some(owner)) })
    }

    /// Bytes posted.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it posts no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Claims it for a reader: `None` if it was claimed before, or revoked.
    pub fn claim(self: &Arc<Self>) -> Option<PostedWrite> {
        self.state
            .compare_exchange(OPEN, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| PostedWrite { posting: Arc::clone(self), finished: false })
    }

    /// Takes the range back for the owner: after this no reader writes it. Returns whether it
    /// was filled (it holds the message's verified data, and stays the message's: see the
    /// module documentation). Waits while a reader is writing (one socket read), yielding the
    /// CPU now and then.
    pub fn revoke(&self) -> bool {
        let mut spins = 0u32;
        loop {
            match self.state.compare_exchange_weak(OPEN, REVOKED, Ordering::Acquire, Ordering::Acquire) {
                Ok(_) => break,
                Err(CLAIMED) => {
                    if self.state.compare_exchange(CLAIMED, REVOKED, Ordering::Acquire, Ordering::Acquire).is_ok() {
                        break;
                    }
                }
                Err(WRITING) | Err(OPEN) => {
                    // A write is one socket read; should its thread have been descheduled
                    // meanwhile, let it have the CPU rather than spin its time slice away.
                    spins += 1;
                    if spins.is_multiple_of(64) {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
                Err(FILLED) => return true,
                Err(_) => break,
            }
        }
        // Not filled: no `Bytes` of it exist, and no reader writes it again.
        drop(self.owner.lock().unwrap_or_else(|e| e.into_inner()).take());
        false
    }
}

/// A reader's claim on a [`Posting`]. Dropped unfinished, the posting is abandoned.
pub struct PostedWrite {
    posting: Arc<Posting>,
    finished: bool,
}

impl std::fmt::Debug for PostedWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostedWrite").field("posting", &self.posting).finish()
    }
}

impl PostedWrite {
    /// Bytes to write.
    pub fn len(&self) -> usize {
        self.posting.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.posting.len == 0
    }

    /// Runs `f` on the bytes `range` of the posting, which the owner cannot take back meanwhile;
    /// `None` if it already has (the claimant then drops the message's data). Panics if `range`
    /// is outside the posting.
    pub fn write<R>(&mut self, range: Range<usize>, f: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
        let p = &self.posting;
        assert!(range.start <= range.end && range.end <= p.len, "{range:?} outside a posting of {}", p.len);
        p.state.compare_exchange(CLAIMED, WRITING, Ordering::Acquire, Ordering::Relaxed).ok()?;
        // SAFETY: inside the posting (checked above); in the `WRITING` state this claimant is the
        // only one touching the range (the owner's `revoke` waits), and the owner keeps the
        // memory alive until revoked, which cannot happen before we leave `WRITING`.
        let r = f(unsafe { std::slice::from_raw_parts_mut(p.ptr.add(range.start), range.len()) });
        p.state.store(CLAIMED, Ordering::Release);
        Some(r)
    }

    /// Every byte is written and verified: the range as `Bytes` (no copy), or `None` if the
    /// owner took it back first.
    pub fn finish(mut self) -> Option<Bytes> {
        let p = &self.posting;
        p.state.compare_exchange(CLAIMED, FILLED, Ordering::Release, Ordering::Relaxed).ok()?;
        self.finished = true;
        Some(Bytes::from_owner(Filled(Arc::clone(&self.posting))))
    }
}

impl Drop for PostedWrite {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.posting.state.compare_exchange(CLAIMED, ABANDONED, Ordering::Release, Ordering::Relaxed);
        }
    }
}

/// A filled posting's bytes, as the owner of a `Bytes`.
struct Filled(Arc<Posting>);

impl AsRef<[u8]> for Filled {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: filled: written completely before the state became `FILLED` (released by
        // `finish`), never written again while this lives, and kept alive by the owner, which a
        // filled posting keeps until it drops.
        unsafe { std::slice::from_raw_parts(self.0.ptr, self.0.len) }
    }
}

/// Where a link reader may read a message's data instead of into a buffer of its own.
pub trait Placer: Send + Sync {
    /// The first frame of a message from `src` on `channel` was `head`, and its remaining
    /// `rest` bytes follow as one frame: a claimed posting to read them into, if the
    /// application posted one for this message.
    fn place(&self, src: RankId, channel: ChannelId, head: &[u8], rest: usize) -> Option<PostedWrite>;
}

/// Postings filed under the message they expect: sender, channel, and the message's first
/// frame (the application's header, sent as a frame of its own). Holds them weakly: a posting
/// its owner has dropped is gone from the table too (pruned as the table grows).
#[derive(Default)]
pub struct PostingTable {
    /// Per (sender, channel): the message's first frame → its posting. (Two levels, so that a
    /// link reader looks a header up without copying it.)
    map: Mutex<BTreeMap<(RankId, ChannelId), ByHead>>,
}

/// One sender's postings on one channel, by the message's first frame.
type ByHead = BTreeMap<Vec<u8>, Weak<Posting>>;

/// Entries beyond which filing one first drops those whose posting is gone.
const PRUNE_AT: usize = 1024;

impl PostingTable {
    /// An empty table.
    pub fn new() -> PostingTable {
        PostingTable::default()
    }

    /// Files `posting` for the message from `src` on `channel` whose first frame is `head`
    /// (replacing any posting filed under the same key).
    pub fn file(&self, src: RankId, channel: ChannelId, head: Vec<u8>, posting: &Arc<Posting>) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let count: usize = map.values().map(BTreeMap::len).sum();
        if count >= PRUNE_AT {
            for heads in map.values_mut() {
                heads.retain(|_, p| p.strong_count() > 0);
            }
            map.retain(|_, heads| !heads.is_empty());
        }
        map.entry((src, channel)).or_default().insert(head, Arc::downgrade(posting));
    }
}

impl Placer for PostingTable {
    fn place(&self, src: RankId, channel: ChannelId, head: &[u8], rest: usize) -> Option<PostedWrite> {
        let posting = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.get_mut(&(src, channel))?.remove(head)?.upgrade()?
        };
        if posting.len != rest {
            return None;
        }
        posting.claim()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A posting of `len` bytes of a fresh buffer, and the buffer (shared, to look at).
    fn posted(len: usize) -> (Arc<Posting>, Arc<Mutex<Vec<u8>>>) {
        let buf = Arc::new(Mutex::new(vec![0u8; len]));
        let ptr = buf.lock().unwrap().as_mut_ptr();
        // SAFETY: the Vec is kept alive by the owner and not resized; the test reads it only
        // after revoking or once filled.
        let p = unsafe { Posting::new(ptr, len, Box::new(Arc::clone(&buf))) };
        (p, buf)
    }

    #[test]
    fn a_posting_is_claimed_once_filled_in_place_and_stays_the_messages() {
        let (p, buf) = posted(8);
        let mut w = p.claim().expect("open");
        assert!(p.claim().is_none(), "claimed once");
        w.write(0..3, |d| d.copy_from_slice(b"abc")).expect("not revoked");
        w.write(3..8, |d| d.copy_from_slice(b"defgh")).expect("not revoked");
        let bytes = w.finish().expect("not revoked");
        assert_eq!(&bytes[..], b"abcdefgh");
        assert_eq!(bytes.as_ptr(), buf.lock().unwrap().as_ptr(), "in the owner's buffer, no copy");
        assert!(p.revoke(), "filled: the message's");
        assert_eq!(Arc::strong_count(&buf), 2, "a filled posting keeps the buffer");
        drop((p, bytes));
        assert_eq!(Arc::strong_count(&buf), 1, "released with the last handle");
    }

    #[test]
    fn a_revoked_posting_refuses_writes_and_lets_go_of_the_buffer_at_once() {
        let (p, buf) = posted(4);
        let mut w = p.claim().expect("open");
        w.write(0..2, |d| d.fill(1)).expect("claimed");
        assert!(!p.revoke(), "not filled");
        assert_eq!(Arc::strong_count(&buf), 1, "released on revoke, though the claim lingers");
        assert!(w.write(2..4, |d| d.fill(1)).is_none(), "the owner has it back");
        assert!(w.finish().is_none());
        let (q, _b) = posted(4);
        assert!(!q.revoke());
        assert!(q.claim().is_none(), "revoked before any claim");
    }

    #[test]
    fn an_abandoned_posting_is_never_claimed_again() {
        let (p, _buf) = posted(4);
        drop(p.claim().expect("open"));
        assert!(p.claim().is_none());
        assert!(!p.revoke());
    }

    #[test]
    // A second thread stands for the link reader (this crate's code never starts one).
    #[allow(clippy::disallowed_methods)]
    fn revoke_waits_out_a_write_in_progress() {
        let (p, buf) = posted(1 << 16);
        let mut w = p.claim().expect("open");
        let (started_tx, started) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            w.write(0..1 << 16, |d| {
                started_tx.send(()).unwrap();
                // Long enough for the revoke below to find the write in progress.
                for i in 0..200 {
                    d.fill(i as u8);
                    std::hint::black_box(&d);
                }
                d.fill(7);
            })
        });
        started.recv().unwrap();
        assert!(!p.revoke());
        // The write finished before revoke returned: nothing changes the bytes any more.
        let done = writer.join().unwrap();
        assert!(done.is_some(), "the write in progress completed");
        assert!(buf.lock().unwrap().iter().all(|b| *b == 7));
    }

    #[test]
    fn the_table_hands_out_a_posting_once_for_its_key_and_length_only() {
        let t = PostingTable::new();
        let (p, _buf) = posted(10);
        t.file(RankId(1), ChannelId(5), b"head".to_vec(), &p);
        assert!(t.place(RankId(2), ChannelId(5), b"head", 10).is_none(), "other sender");
        assert!(t.place(RankId(1), ChannelId(6), b"head", 10).is_none(), "other channel");
        assert!(t.place(RankId(1), ChannelId(5), b"hea!", 10).is_none(), "other header");
        assert!(t.place(RankId(1), ChannelId(5), b"head", 10).is_some());
        assert!(t.place(RankId(1), ChannelId(5), b"head", 10).is_none(), "once");
        let (q, _b) = posted(10);
        t.file(RankId(1), ChannelId(5), b"x".to_vec(), &q);
        assert!(t.place(RankId(1), ChannelId(5), b"x", 11).is_none(), "another length: not placed");
        assert!(q.claim().is_some(), "and left unclaimed");
        let (r, _c) = posted(3);
        t.file(RankId(1), ChannelId(5), b"gone".to_vec(), &r);
        drop(r);
        assert!(t.place(RankId(1), ChannelId(5), b"gone", 3).is_none(), "dropped by its owner");
    }
}
