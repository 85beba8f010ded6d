//! The sans-IO executor: runs any [`Schedule`] on a real buffer, pipelined.
//!
//! Call order: [`Executor::poll_send`] until it returns `None` (messages to hand to the
//! transport, each addressed to a rank), feed every message that arrives for this collective to
//! [`Executor::handle_chunks`], repeat until [`Executor::is_done`]. A message that cannot belong
//! to this collective is refused with an error naming the sender, and changes nothing.
//!
//! **Pipelining.** Every range of blocks a round sends is cut into segments of at most
//! [`SEGMENT_BYTES`] (counted from the range's first element; a segment may span blocks), each
//! its own message. The executor runs on dataflow rather than in
//! lock-step rounds: a segment is sent as soon as its part of the block holds what the schedule
//! says it holds at the start of that round (every receive into that part from earlier rounds is
//! applied), and an arriving segment is combined as soon as the receives before it into that part
//! are applied and the sends that must read the part first have been encoded. So a ring step
//! forwards the first megabyte of a block while the rest of it is still arriving, and reduction
//! overlaps the transfer. The result is the same as running the rounds in lock-step: each part
//! of each block sees the same operations in the same order.
//!
//! Wire format of one message: `op_seq u64 | round u32 | first block u32 | segment u32 | bytes`
//! (little endian; the first block names the range). `op_seq` numbers the collectives of a
//! communicator (and their attempts) so that a late message from an earlier one is never
//! mistaken for this one's. The executor hands each message over with its CRC32C, computed in
//! the pass that copies the segment, while the bytes are in cache (see
//! `phalanx_proto::Payload::push_checked`; only from 256 KiB, where the transport uses it): the
//! transport does not read them again to checksum the frame. A segment forwarded as received
//! carries the checksum its transport verified ([`Executor::handle_payload_sized`]); with
//! [`Layout::lend`], a segment nothing rewrites goes out as the buffer's own bytes
//! ([`crate::lending`]), and [`Executor::lent`] says when the transport has let go of them; one
//! that only a later copying receive rewrites is lent until it comes back, and that receive waits
//! for it ([`Executor::poll_loans`]).
//! Received copies that nothing reads again go into large buffers with streaming stores
//! ([`crate::streaming_copy`]). With [`Layout::post`], a received segment that nothing writes
//! afterwards is *posted*: its range of the buffer is offered to the transport
//! ([`Executor::poll_posting`]), which reads the message's data straight into it, and the
//! executor finds it in place — no copy at all (see `phalanx_proto::posting`). A large segment's
//! message goes out as two parts, its header and its data, so that the data arrives as a frame
//! of its own.
//!
//! **Phantom payloads.** An executor made with [`Executor::phantom`] runs the same schedule,
//! dataflow and checks on a buffer that has a length but no bytes (the simulator uses it at
//! scale): each message is the header alone plus a *phantom* length, the bytes it stands for,
//! which drivers account as if they were sent ([`Executor::poll_send_sized`],
//! [`Executor::handle_chunks_sized`]).

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use phalanx_proto::checksum::{crc32c, crc32c_combine, Crc32c};
use phalanx_proto::frame::PRECOMPUTED_CRC_MIN;
use phalanx_proto::{Payload, Posting};

use crate::lending::{LendingBuffer, Returned};
use crate::reduce::{divide, reduce_into, DType, ReduceOp};
use crate::schedule::{block_range, Combine, Schedule};
use crate::streaming_copy::{self, STREAMING_MIN};

/// Bytes of the per-message header.
pub const MESSAGE_HEADER: usize = 20;

/// Largest segment of a block sent as one message (the unit of pipelining): just under 1 MiB,
/// so that a segment's data is one frame of the transport's default 1 MiB chunk (a large
/// segment's header goes as a part, hence a frame, of its own), and the checksum [`Executor`]
/// takes while it copies the segment is the frame's.
pub const SEGMENT_BYTES: usize = (1 << 20) - 64;

/// Why a message was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ExecError {
    /// Shorter than the header.
    #[error("message from rank {from} is {len} bytes, shorter than the {need}-byte header")]
    Truncated {
        /// Sender.
        from: usize,
        /// Its length.
        len: usize,
        /// The header's length.
        need: usize,
    },
    /// From another collective (an earlier or later `op_seq`).
    #[error("message from rank {from} belongs to collective #{found}, this is #{expected}")]
    OtherCollective {
        /// Sender.
        from: usize,
        /// Its sequence number.
        found: u64,
        /// Ours.
        expected: u64,
    },
    /// The schedule expects no such message (wrong round, block, segment, sender, or a
    /// duplicate).
    #[error("unexpected message from rank {from}: round {round}, block {block}")]
    Unexpected {
        /// Sender.
        from: usize,
        /// Round it claims.
        round: u32,
        /// Block it claims.
        block: u32,
    },
    /// The segment has the wrong size (or is real where phantom was expected, or the reverse:
    /// then `len` counts the bytes of the wrong kind).
    #[error("block {block} from rank {from} has {len} bytes, expected {expected}")]
    WrongLength {
        /// Sender.
        from: usize,
        /// Block.
        block: u32,
        /// Its length.
        len: usize,
        /// The segment's size.
        expected: usize,
    },
}

/// How a buffer is cut for an [`Executor`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// `(space, map)`: for a schedule over a subset of a larger group, the buffer is split
    /// into `space` blocks (as [`block_range`] splits it) and schedule block `b` is the
    /// buffer's block `map[b]`. Reduce-scatter and all-gather over the survivors of a group use
    /// it, so each survivor still owns its own block of the caller's buffer. `None`: the
    /// schedule's blocks split the whole buffer.
    pub block_map: Option<(usize, Vec<usize>)>,
    /// Largest segment sent as one message, rounded down to whole elements (at least one).
    pub segment_bytes: usize,
    /// Send segments that nothing writes afterwards — or only a later copying receive, which
    /// then waits for the transport to let go of them ([`Executor::poll_loans`]) — as the
    /// buffer's own bytes, lent to the transport instead of copied (see [`crate::lending`] and
    /// [`Executor::lent`]): for a driver that waits for the transport to return them before it
    /// takes the result back (else [`Executor::into_buffer`] copies), and calls
    /// [`Executor::poll_loans`] when a loan may have come back. Only large buffers and not for
    /// `Avg`.
    pub lend: bool,
    /// Post receive segments that nothing writes afterwards, for the transport to read their
    /// data straight into the buffer ([`Executor::poll_posting`]): for a driver that files the
    /// postings with its transport. Only large buffers (8 MiB or more) and not for `Avg`
    /// (whose division rewrites the buffer), where segments of
    /// 256 KiB or more are then sent as a header part and a data part, so that the data
    /// arrives as a frame of its own. Every rank of a collective should set it alike: a
    /// receiver takes either form, but only a split one lands in a posting.
    pub post: bool,
}

impl Default for Layout {
    fn default() -> Self {
        Layout { block_map: None, segment_bytes: SEGMENT_BYTES, lend: false, post: false }
    }
}

/// A receive segment posted in the buffer (see [`Layout::post`]): the data of the message from
/// rank `from` (an index of the schedule's world) whose first part is `head` may be read
/// straight into `posting`.
#[derive(Debug)]
pub struct PostedRecv {
    /// The sender.
    pub from: usize,
    /// The message's header, as the sender sends it: the message's first part.
    pub head: [u8; MESSAGE_HEADER],
    /// The segment's range of the buffer.
    pub posting: Arc<Posting>,
}

/// A send or receive of the schedule: a range of blocks, cut into segments.
struct Transfer {
    round: usize,
    /// Destination (send) or source (receive).
    peer: usize,
    blocks: Range<usize>,
    /// Its elements, in schedule order (see [`Executor::position`]).
    elems: Range<usize>,
    /// Its segments: entries `first_seg..first_seg + segs` of the per-segment tables.
    first_seg: usize,
    segs: usize,
}

/// A receive: its transfer, how it combines, and its segments still to apply.
struct RecvOp {
    t: Transfer,
    combine: Combine,
    left: usize,
}

/// A segment of a send or receive that waits for units of the buffer to reach a version:
/// `(transfer index, segment)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiter {
    Send(u32, u32),
    Recv(u32, u32),
}

/// What touched a unit of the buffer, in schedule order: a send segment read it, or a receive
/// segment wrote it (global segment indices).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Touch {
    Read(u32),
    Write(u32, Combine),
}

/// What touched a unit before `touch`, and after it (`touches` is the unit's list, which holds
/// `touch`: each segment touches the units it covers).
fn around(touches: &[Touch], touch: Touch) -> (&[Touch], &[Touch]) {
    let p = touches.iter().position(|x| *x == touch).expect("a segment touches the units it covers");
    (&touches[..p], &touches[p + 1..])
}

/// For every unit of the buffer, the segments waiting on its count of receives applied (or of
/// sends encoded), sorted by the count they need; stored flat (one list for all units, with
/// offsets).
#[derive(Default)]
struct Waiters {
    /// Units' entries: `list[offsets[u]..offsets[u + 1]]`.
    offsets: Vec<u32>,
    list: Vec<(u32, Waiter)>,
    /// Per unit: entries released so far.
    released: Vec<u32>,
}

impl Waiters {
    /// From `(unit, need, waiter)` entries of `units` units (ties keep their order).
    fn new(units: usize, mut entries: Vec<(u32, u32, Waiter)>) -> Waiters {
        entries.sort_by_key(|(u, need, _)| (*u, *need));
        let mut offsets = vec![0u32; units + 1];
        for (u, ..) in &entries {
            offsets[*u as usize + 1] += 1;
        }
        for u in 0..units {
            offsets[u + 1] += offsets[u];
        }
        let list = entries.into_iter().map(|(_, need, w)| (need, w)).collect();
        Waiters { released: offsets[..units].to_vec(), offsets, list }
    }

    /// The next waiter of unit `u` whose need is at most `value`, marked released.
    fn next(&mut self, u: usize, value: u32) -> Option<Waiter> {
        let at = self.released[u];
        if at == self.offsets[u + 1] {
            return None;
        }
        let (need, w) = self.list[at as usize];
        if need > value {
            return None;
        }
        self.released[u] = at + 1;
        Some(w)
    }
}

/// Runs one rank's schedule of one collective on its buffer.
///
/// **Units.** Dependencies are tracked per *unit*: the buffer cut at every boundary of every
/// segment of the schedule (its common refinement), so each segment covers whole units. A
/// schedule of block ranges (recursive halving over `n` ranks: `log₂ n` ranges) has few units
/// however many blocks it has, and the executor's state and build time follow the number of
/// segments, not of blocks.
pub struct Executor {
    op_seq: u64,
    dtype: DType,
    op: ReduceOp,
    count: usize,
    blocks: usize,
    world: usize,
    /// The buffer (empty for a phantom one).
    buf: LendingBuffer,
    /// Phantom: the buffer is a length only; messages carry no data bytes.
    phantom: bool,
    /// With a block map (see [`Layout::block_map`]): the buffer's block of each schedule block,
    /// the number of buffer blocks, and where each schedule block starts in schedule order
    /// (`blocks + 1` entries).
    mapped: Option<Mapped>,
    /// Elements per segment.
    seg_elems: usize,
    sends: Vec<Transfer>,
    recvs: Vec<RecvOp>,
    /// `(round, from, first block)` → index into `recvs`.
    recv_index: BTreeMap<(usize, usize, usize), usize>,
    /// Unit boundaries, in schedule order: unit `u` is `bounds[u]..bounds[u + 1]`.
    bounds: Vec<usize>,
    /// Per unit: receives applied, and sends encoded.
    version: Vec<u32>,
    encoded: Vec<u32>,
    version_waiters: Waiters,
    encoded_waiters: Waiters,
    /// Per segment of every send and receive: units not yet where they must be.
    send_wait: Vec<u32>,
    recv_wait: Vec<u32>,
    /// Per segment of every receive: applied.
    applied: Vec<bool>,
    /// Segments free to go (sends) or to be applied (receives whose data is here), in the
    /// order they became so.
    ready: VecDeque<Waiter>,
    /// Segments that arrived and wait to be applied: `(recv, segment)` → what arrived.
    early: BTreeMap<(usize, usize), Arrived>,
    /// Per receive segment: the send segment (`(send, segment)`) that forwards its data
    /// unchanged (see [`Executor::forwarding_sends`]); empty for a phantom buffer.
    sent_on: Vec<Option<(u32, u32)>>,
    /// Per receive segment: copied into the buffer with streaming stores (empty: none; see
    /// [`Executor::streamed_receives`]).
    streamed: Vec<bool>,
    /// Per send segment: sent as the buffer's own bytes, lent, and how (empty: none; see
    /// [`Executor::lendable_sends`]).
    lendable: Vec<Loan>,
    /// Receive segments ready to be posted, or whose data is here, while part of their range
    /// is still lent until it comes back: retried by [`Executor::poll_loans`].
    deferred_posts: Vec<(usize, usize)>,
    blocked: Vec<(usize, usize)>,
    /// [`LendingBuffer::loans_back`] when they were last looked at.
    loans_back: u64,
    /// Per receive segment: may be posted (empty: none; see [`Executor::postable_receives`]).
    /// Where any may, large segments are also sent as a header part and a data part, for
    /// receivers that post (every rank of a collective has the same layout and, but for a
    /// caller's error, buffer length).
    postable: Vec<bool>,
    /// Postings for the driver to file ([`Executor::poll_posting`]).
    postings: VecDeque<PostedRecv>,
    /// Received segments found in place (posted and filled).
    in_place: u64,
    /// Per send segment: its message, made when the receive it sends on was applied (only when
    /// that data arrived as one buffer; otherwise the send takes a snapshot as usual).
    prepared: Vec<Option<Payload>>,
    /// `(destination, message, phantom bytes)`.
    outbox: VecDeque<(usize, Payload, usize)>,
    sends_left: usize,
    recvs_left: usize,
    finished: bool,
}

/// How a send segment goes out as the buffer's own bytes ([`Layout::lend`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loan {
    /// Copied (a snapshot).
    No,
    /// Lent for good: nothing writes its range afterwards.
    ForGood,
    /// Lent until it comes back: a later receive copies into its range (a ring reduce-scatter's
    /// partial sums, overwritten by the gathering half), and waits for the loan to end.
    UntilBack,
}

/// A receive segment's message, waiting to be applied.
struct Arrived {
    /// Its data, as the transport's chunks.
    data: Vec<Bytes>,
    /// The data's checksum, when a send forwards it and the transport gave one (one chunk only).
    crc: Option<u32>,
    /// The transport read the data into its place in the buffer already (a posted segment).
    in_place: bool,
}

/// A schedule over a subset of the buffer's blocks (see [`Layout::block_map`]).
struct Mapped {
    space: usize,
    map: Vec<usize>,
    /// Start of each schedule block in schedule order, and the total (`blocks + 1` entries).
    starts: Vec<usize>,
}

impl Executor {
    /// An executor for `schedule` over `buf` (`count` elements of `dtype`, reduced with `op`
    /// across `world` ranks), with the default [`Layout`]. Panics if `buf` does not hold
    /// exactly `count` elements.
    pub fn new(schedule: Schedule, op_seq: u64, dtype: DType, op: ReduceOp, world: usize, buf: Vec<u8>) -> Executor {
        Executor::with_layout(schedule, op_seq, dtype, op, world, buf, Layout::default())
    }

    /// Like [`Executor::new`], with the buffer laid out as `layout` says. Every rank of a
    /// collective must use the same segment size. Panics if a block map does not name one
    /// buffer block per schedule block.
    pub fn with_layout(
        schedule: Schedule,
        op_seq: u64,
        dtype: DType,
        op: ReduceOp,
        world: usize,
        buf: Vec<u8>,
        layout: Layout,
    ) -> Executor {
        Executor::build(schedule, op_seq, dtype, op, world, buf, None, layout)
    }

    /// An executor of a *phantom* buffer of `bytes` (whole elements of `dtype`): everything as
    /// for a real one, except that no bytes are held, copied or reduced, and every message is
    /// its header plus a phantom length (see the module documentation).
    pub fn phantom(
        schedule: Schedule,
        op_seq: u64,
        dtype: DType,
        op: ReduceOp,
        world: usize,
        bytes: usize,
        layout: Layout,
    ) -> Executor {
        Executor::build(schedule, op_seq, dtype, op, world, Vec::new(), Some(bytes), layout)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        schedule: Schedule,
        op_seq: u64,
        dtype: DType,
        op: ReduceOp,
        world: usize,
        buf: Vec<u8>,
        phantom: Option<usize>,
        layout: Layout,
    ) -> Executor {
        let Layout { block_map, segment_bytes, lend, post } = layout;
        let len = phantom.unwrap_or(buf.len());
        assert_eq!(len % dtype.size(), 0, "buffer is not whole elements");
        let count = len / dtype.size();
        let blocks = schedule.blocks;
        let mapped = block_map.map(|(space, map)| {
            assert_eq!(map.len(), blocks, "one buffer block per schedule block");
            assert!(map.iter().all(|b| *b < space), "blocks within the buffer's {space}");
            let mut starts = Vec::with_capacity(blocks + 1);
            starts.push(0);
            for b in &map {
                starts.push(starts[starts.len() - 1] + block_range(count, space, *b).len());
            }
            Mapped { space, map, starts }
        });
        let mut e = Executor {
            op_seq,
            dtype,
            op,
            count,
            blocks,
            world,
            buf: LendingBuffer::new(buf),
            phantom: phantom.is_some(),
            mapped,
            seg_elems: (segment_bytes / dtype.size()).max(1),
            sends: Vec::new(),
            recvs: Vec::new(),
            recv_index: BTreeMap::new(),
            bounds: Vec::new(),
            version: Vec::new(),
            encoded: Vec::new(),
            version_waiters: Waiters::default(),
            encoded_waiters: Waiters::default(),
            send_wait: Vec::new(),
            recv_wait: Vec::new(),
            applied: Vec::new(),
            ready: VecDeque::new(),
            early: BTreeMap::new(),
            sent_on: Vec::new(),
            streamed: Vec::new(),
            lendable: Vec::new(),
            deferred_posts: Vec::new(),
            blocked: Vec::new(),
            loans_back: 0,
            postable: Vec::new(),
            postings: VecDeque::new(),
            in_place: 0,
            prepared: Vec::new(),
            outbox: VecDeque::new(),
            sends_left: 0,
            recvs_left: 0,
            finished: false,
        };
        // The transfers, in round order, and the unit boundaries they need.
        let (mut send_segs, mut recv_segs) = (0, 0);
        let mut bounds = vec![0, e.position(blocks)];
        for (r, round) in schedule.rounds.iter().enumerate() {
            for x in &round.sends {
                let t = e.transfer(r, x.to, x.blocks.clone(), &mut send_segs);
                bounds.extend((0..t.segs).map(|s| e.segment(&t, s).start));
                bounds.push(t.elems.end);
                e.sends.push(t);
            }
            for x in &round.recvs {
                let t = e.transfer(r, x.from, x.blocks.clone(), &mut recv_segs);
                bounds.extend((0..t.segs).map(|s| e.segment(&t, s).start));
                bounds.push(t.elems.end);
                e.recv_index.insert((r, x.from, x.blocks.start), e.recvs.len());
                e.recvs.push(RecvOp { left: t.segs, t, combine: x.combine });
            }
        }
        bounds.sort_unstable();
        bounds.dedup();
        e.bounds = bounds;
        let units = e.bounds.len() - 1;
        e.version = vec![0; units];
        e.encoded = vec![0; units];
        e.send_wait = vec![0; send_segs];
        e.recv_wait = vec![0; recv_segs];
        e.applied = vec![false; recv_segs];
        // What each segment waits for: per unit it covers, the receives into the unit from
        // earlier rounds (sends and receives), and the sends of it up to its round (receives).
        let mut version_entries: Vec<(u32, u32, Waiter)> = Vec::new();
        let mut encoded_entries: Vec<(u32, u32, Waiter)> = Vec::new();
        let mut recvs_into = vec![0u32; units];
        let mut sends_of = vec![0u32; units];
        let (mut si, mut ri) = (0, 0);
        for r in 0..schedule.rounds.len() {
            let first_recv = ri;
            while si < e.sends.len() && e.sends[si].round == r {
                let t = &e.sends[si];
                for seg in 0..t.segs {
                    for u in e.units(e.segment(t, seg)) {
                        if recvs_into[u] > 0 {
                            version_entries.push((u as u32, recvs_into[u], Waiter::Send(si as u32, seg as u32)));
                            e.send_wait[t.first_seg + seg] += 1;
                        }
                    }
                }
                for u in e.units(t.elems.clone()) {
                    sends_of[u] += 1;
                }
                si += 1;
            }
            while ri < e.recvs.len() && e.recvs[ri].t.round == r {
                let t = &e.recvs[ri].t;
                for seg in 0..t.segs {
                    let w = Waiter::Recv(ri as u32, seg as u32);
                    for u in e.units(e.segment(t, seg)) {
                        if recvs_into[u] > 0 {
                            version_entries.push((u as u32, recvs_into[u], w));
                            e.recv_wait[t.first_seg + seg] += 1;
                        }
                        if sends_of[u] > 0 {
                            encoded_entries.push((u as u32, sends_of[u], w));
                            e.recv_wait[t.first_seg + seg] += 1;
                        }
                    }
                }
                ri += 1;
            }
            for v in &e.recvs[first_recv..ri] {
                for u in e.units(v.t.elems.clone()) {
                    recvs_into[u] += 1;
                }
            }
        }
        e.version_waiters = Waiters::new(units, version_entries);
        e.encoded_waiters = Waiters::new(units, encoded_entries);
        if !e.phantom {
            let touches = e.touches(schedule.rounds.len());
            e.sent_on = e.forwarding_sends(&touches, recv_segs);
            if e.buf.len() >= STREAMING_MIN {
                e.streamed = e.streamed_receives(&touches, &e.sent_on);
                if lend && op != ReduceOp::Avg {
                    e.lendable = e.lendable_sends(&touches);
                }
                // Not for `Avg`: its division rewrites the whole buffer, filled ranges too.
                if post && op != ReduceOp::Avg {
                    e.postable = e.postable_receives(&touches);
                }
            }
            e.prepared = vec![None; send_segs];
        }
        e.sends_left = send_segs;
        e.recvs_left = recv_segs;
        for (i, t) in e.sends.iter().enumerate() {
            for seg in 0..t.segs {
                if e.send_wait[t.first_seg + seg] == 0 {
                    e.ready.push_back(Waiter::Send(i as u32, seg as u32));
                }
            }
        }
        if !e.postable.is_empty() {
            for j in 0..e.recvs.len() {
                for seg in 0..e.recvs[j].t.segs {
                    if e.recv_wait[e.recvs[j].t.first_seg + seg] == 0 {
                        e.post(j, seg);
                    }
                }
            }
        }
        e.advance();
        e
    }

    /// Per unit, what touched it, in schedule order (sends of a round read a unit before its
    /// receives write it).
    fn touches(&self, rounds: usize) -> Vec<Vec<Touch>> {
        let mut touches: Vec<Vec<Touch>> = vec![Vec::new(); self.bounds.len() - 1];
        let (mut si, mut ri) = (0, 0);
        for r in 0..rounds {
            while si < self.sends.len() && self.sends[si].round == r {
                let t = &self.sends[si];
                for seg in 0..t.segs {
                    for u in self.units(self.segment(t, seg)) {
                        touches[u].push(Touch::Read((t.first_seg + seg) as u32));
                    }
                }
                si += 1;
            }
            while ri < self.recvs.len() && self.recvs[ri].t.round == r {
                let v = &self.recvs[ri];
                for seg in 0..v.t.segs {
                    for u in self.units(self.segment(&v.t, seg)) {
                        touches[u].push(Touch::Write((v.t.first_seg + seg) as u32, v.combine));
                    }
                }
                ri += 1;
            }
        }
        touches
    }

    /// For each receive segment, whether it may be copied into the buffer with streaming
    /// stores ([`crate::streaming_copy`]): a `Copy` whose elements nothing reads afterwards in
    /// this collective — no later send (except the one that forwards the received buffer
    /// itself, [`Executor::forwarding_sends`]) and no later reduction into them. Data copied so
    /// bypasses the cache, so a later read would have to fetch it from memory.
    fn streamed_receives(&self, touches: &[Vec<Touch>], sent_on: &[Option<(u32, u32)>]) -> Vec<bool> {
        let mut streamed = vec![false; sent_on.len()];
        for v in self.recvs.iter().filter(|v| v.combine == Combine::Copy) {
            for seg in 0..v.t.segs {
                let at = v.t.first_seg + seg;
                let forward = sent_on[at].map(|(i, s)| (self.sends[i as usize].first_seg + s as usize) as u32);
                streamed[at] = self.units(self.segment(&v.t, seg)).all(|u| {
                    let (_, after) = around(&touches[u], Touch::Write(at as u32, Combine::Copy));
                    after.iter().all(|x| match *x {
                        Touch::Read(send) => Some(send) == forward,
                        Touch::Write(_, c) => c == Combine::Copy,
                    })
                });
            }
        }
        streamed
    }

    /// For each send segment, whether it may go out as the buffer's own bytes, lent to the
    /// transport ([`crate::lending`]): its elements are one contiguous range of the buffer,
    /// large enough for the transport to take the checksum given with them
    /// ([`PRECOMPUTED_CRC_MIN`]), and no later receive reduces into them. For good if nothing
    /// writes them afterwards (an all-gather's own block, in a ring all-reduce the reduced
    /// block a rank sends first in the gathering half); until the loan comes back if a later
    /// receive copies into them (a ring reduce-scatter's partial sums): that receive waits for
    /// the transport to let go of them (see [`Executor::poll_loans`]).
    fn lendable_sends(&self, touches: &[Vec<Touch>]) -> Vec<Loan> {
        let mut lendable = vec![Loan::No; self.send_wait.len()];
        for t in &self.sends {
            for seg in 0..t.segs {
                let at = (t.first_seg + seg) as u32;
                let elems = self.segment(t, seg);
                if elems.len() * self.dtype.size() < PRECOMPUTED_CRC_MIN || self.pieces(elems.clone()).count() != 1 {
                    continue;
                }
                let (mut reads_only, mut copies_only) = (true, true);
                for u in self.units(elems) {
                    for x in around(&touches[u], Touch::Read(at)).1 {
                        reads_only &= matches!(x, Touch::Read(_));
                        copies_only &= matches!(x, Touch::Read(_) | Touch::Write(_, Combine::Copy));
                    }
                }
                lendable[at as usize] = match (reads_only, copies_only) {
                    (true, _) => Loan::ForGood,
                    (false, true) => Loan::UntilBack,
                    (false, false) => Loan::No,
                };
            }
        }
        lendable
    }

    /// For each receive segment, whether it may be posted for the transport to fill
    /// ([`Layout::post`]): a `Copy` into one contiguous range of the buffer that nothing writes
    /// afterwards (a filled range stays the message's, as the forwarding send may go out as the
    /// received bytes), of at least [`PRECOMPUTED_CRC_MIN`] bytes (then its message goes out
    /// as a header part and a data part, and the data arrives as a frame of its own).
    fn postable_receives(&self, touches: &[Vec<Touch>]) -> Vec<bool> {
        let mut postable = vec![false; self.recv_wait.len()];
        for v in self.recvs.iter().filter(|v| v.combine == Combine::Copy) {
            for seg in 0..v.t.segs {
                let at = v.t.first_seg + seg;
                let elems = self.segment(&v.t, seg);
                postable[at] = elems.len() * self.dtype.size() >= PRECOMPUTED_CRC_MIN
                    && self.pieces(elems.clone()).count() == 1
                    && self.units(elems).all(|u| {
                        around(&touches[u], Touch::Write(at as u32, Combine::Copy))
                            .1
                            .iter()
                            .all(|x| matches!(x, Touch::Read(_)))
                    });
            }
        }
        postable
    }

    /// Posts receive segment `seg` of receive `j` if it may be, and its data has not arrived:
    /// called once nothing before it in the schedule still touches its range.
    fn post(&mut self, j: usize, seg: usize) {
        let t = &self.recvs[j].t;
        let at = t.first_seg + seg;
        // (Called once per segment, or again only for one deferred, never posted: a second
        // posting of a range would panic in `LendingBuffer::post`.)
        if !self.postable.get(at).copied().unwrap_or(false) || self.early.contains_key(&(j, seg)) {
            return;
        }
        let size = self.dtype.size();
        let piece = self.pieces(self.segment(t, seg)).next().expect("a postable segment is one piece");
        let (from, head) = (t.peer, self.header_bytes(t, seg));
        let range = piece.start * size..piece.end * size;
        if self.buf.is_out(&range) {
            self.deferred_posts.push((j, seg));
            return;
        }
        let posting = self.buf.post(range);
        self.postings.push_back(PostedRecv { from, head, posting });
    }

    /// For each of the `recv_segs` receive segments, the send segment (`(send, segment)`) that
    /// sends its data on unchanged, if any: a send of exactly the elements that receive copied
    /// (`Combine::Copy`), with nothing touching them in between — a ring all-gather's forwarded
    /// blocks. Such a send goes out as the received buffer itself behind a new header, not a
    /// snapshot of the buffer (see [`Executor::apply_recv`]). Found from the order in which the
    /// rounds touch each unit (sends of a round read a unit before its receives write it); at
    /// encode time a send's units hold exactly what the receive before it left there, since the
    /// send waits for every receive into them from earlier rounds and later receives wait for
    /// the send.
    ///
    /// (Writing a ring reduce-scatter's partial sums straight into their messages instead of
    /// the buffer was tried on 2026-12-01 and measured slower: docs/performance.md.)
    fn forwarding_sends(&self, touches: &[Vec<Touch>], recv_segs: usize) -> Vec<Option<(u32, u32)>> {
        let mut sent_on = vec![None; recv_segs];
        for (i, t) in self.sends.iter().enumerate() {
            for seg in 0..t.segs {
                let at = (t.first_seg + seg) as u32;
                let elems = self.segment(t, seg);
                // Per unit: what touched it just before this send.
                let before: Vec<Option<Touch>> =
                    self.units(elems.clone()).map(|u| around(&touches[u], Touch::Read(at)).0.last().copied()).collect();
                let Some(&Some(Touch::Write(src, Combine::Copy))) = before.first() else { continue };
                if before.iter().all(|b| *b == Some(Touch::Write(src, Combine::Copy)))
                    && self.recv_segment_elems(src as usize) == elems
                {
                    sent_on[src as usize] = Some((i as u32, seg as u32));
                }
            }
        }
        sent_on
    }

    /// Elements (schedule order) of receive segment `at` (global index).
    fn recv_segment_elems(&self, at: usize) -> Range<usize> {
        let j = self.recvs.partition_point(|v| v.t.first_seg + v.t.segs <= at);
        let t = &self.recvs[j].t;
        self.segment(t, at - t.first_seg)
    }

    /// Where schedule block `b` starts when the schedule's blocks are laid end to end
    /// (`b == blocks`: the end). Without a block map that is the buffer's own order.
    fn position(&self, b: usize) -> usize {
        match &self.mapped {
            Some(m) => m.starts[b],
            None if b == self.blocks => self.count,
            None => block_range(self.count, self.blocks, b).start,
        }
    }

    /// A transfer of `blocks` in `round`, its segments numbered from `*segs` on.
    fn transfer(&self, round: usize, peer: usize, blocks: Range<usize>, segs: &mut usize) -> Transfer {
        assert!(blocks.start < blocks.end && blocks.end <= self.blocks, "blocks {blocks:?} of {}", self.blocks);
        let elems = self.position(blocks.start)..self.position(blocks.end);
        // At least one segment, so that empty blocks still synchronise.
        let n = elems.len().div_ceil(self.seg_elems).max(1);
        let t = Transfer { round, peer, blocks, elems, first_seg: *segs, segs: n };
        *segs += n;
        t
    }

    /// Elements (in schedule order) of segment `seg` of `t`.
    fn segment(&self, t: &Transfer, seg: usize) -> Range<usize> {
        let start = (t.elems.start + seg * self.seg_elems).min(t.elems.end);
        start..(start + self.seg_elems).min(t.elems.end)
    }

    /// The units `elems` (a union of whole units) covers. No allocation: this runs per message.
    fn units(&self, elems: Range<usize>) -> Range<usize> {
        if elems.is_empty() {
            return 0..0;
        }
        self.bounds.partition_point(|b| *b < elems.start)..self.bounds.partition_point(|b| *b < elems.end)
    }

    /// The buffer's element ranges holding `elems` (in schedule order), in order.
    fn pieces(&self, elems: Range<usize>) -> impl Iterator<Item = Range<usize>> + '_ {
        // Without a block map the schedule's order is the buffer's: one piece, no lookups.
        let mut b =
            self.mapped.as_ref().map_or(0, |m| m.starts.partition_point(|s| *s <= elems.start).saturating_sub(1));
        let mut at = elems.start;
        std::iter::from_fn(move || {
            if at >= elems.end {
                return None;
            }
            let Some(m) = &self.mapped else {
                at = elems.end;
                return Some(elems.clone());
            };
            loop {
                let real = block_range(self.count, m.space, m.map[b]);
                let (lo, end) = (m.starts[b], m.starts[b + 1].min(elems.end));
                b += 1;
                if end > at {
                    let piece = real.start + (at - lo)..real.start + (end - lo);
                    at = end;
                    return Some(piece);
                }
            }
        })
    }

    /// The wire header of segment `seg` of transfer `t`: a send and the receive it matches
    /// name a segment alike.
    fn header_bytes(&self, t: &Transfer, seg: usize) -> [u8; MESSAGE_HEADER] {
        let mut h = [0u8; MESSAGE_HEADER];
        let mut w = &mut h[..];
        w.put_u64_le(self.op_seq);
        w.put_u32_le(t.round as u32);
        w.put_u32_le(t.blocks.start as u32);
        w.put_u32_le(seg as u32);
        h
    }

    /// The header of segment `seg` of send `i`, in a buffer with room for `data` bytes after it.
    fn header(&self, i: usize, seg: usize, data: usize) -> BytesMut {
        let mut m = BytesMut::with_capacity(MESSAGE_HEADER + data);
        m.put_slice(&self.header_bytes(&self.sends[i], seg));
        m
    }

    /// The message of segment `seg` of send `i`, and its phantom length: the header and a
    /// snapshot of the segment (later rounds may rewrite the buffer before the transport is
    /// done with it), with the CRC32C of both, taken slice by slice right after each slice is
    /// copied, so the transport does not read the bytes again to checksum the frame — or the
    /// message made when the receive it forwards was applied (see
    /// [`Executor::forwarding_sends`]).
    fn encode(&mut self, i: usize, seg: usize) -> (Payload, usize) {
        let t = &self.sends[i];
        if let Some(p) = self.prepared.get_mut(t.first_seg + seg).and_then(Option::take) {
            return (p, 0);
        }
        let elems = self.segment(t, seg);
        let len = elems.len() * self.dtype.size();
        if self.phantom {
            return (Payload::from(self.header(i, seg, 0).freeze()), len);
        }
        let size = self.dtype.size();
        let loan = self.lendable.get(t.first_seg + seg).copied().unwrap_or(Loan::No);
        if loan != Loan::No {
            // Nothing writes these bytes while the transport holds them: they go out as they
            // are, with their checksum (one read; the snapshot's copy is what this saves).
            let piece = self.pieces(elems).next().expect("a lendable segment is one piece");
            let range = piece.start * size..piece.end * size;
            let crc = crc32c(self.buf.range(range.clone()));
            let mut p = Payload::from(self.header(i, seg, 0).freeze());
            let lent = match loan {
                Loan::UntilBack => self.buf.lend_until_back(range),
                _ => self.buf.lend(range),
            };
            p.push_checked(lent, crc);
            return (p, 0);
        }
        // Where the receiver may have posted a place for the data (see `Layout::post`), it goes
        // as a part of its own, after the header.
        let split = !self.postable.is_empty() && len >= PRECOMPUTED_CRC_MIN;
        let mut m = if split { BytesMut::with_capacity(len) } else { self.header(i, seg, len) };
        // Only where the transport will use it (below that, it checksums the frame itself).
        let checked = m.len() + len >= PRECOMPUTED_CRC_MIN;
        let mut crc = Crc32c::new();
        crc.update(&m);
        for r in self.pieces(elems) {
            // In slices that stay in the L1/L2 cache between the copy and the checksum.
            for piece in self.buf.range(r.start * size..r.end * size).chunks(32 << 10) {
                m.put_slice(piece);
                if checked {
                    crc.update(&m[m.len() - piece.len()..]);
                }
            }
        }
        let mut p = Payload::new();
        if split {
            p.push(self.header(i, seg, 0).freeze());
        }
        match checked {
            true => p.push_checked(m.freeze(), crc.finish()),
            false => p.push(m.freeze()),
        }
        (p, 0)
    }

    /// Combines a received segment, given as consecutive chunks (the transport's frame
    /// buffers, uncopied), into the elements `elems` (schedule order).
    fn apply(&mut self, elems: Range<usize>, combine: Combine, data: &[Bytes], streamed: bool) {
        if self.phantom {
            return;
        }
        let size = self.dtype.size();
        if self.mapped.is_none() {
            return self.apply_contiguous(elems.start * size..elems.end * size, combine, data, streamed);
        }
        let pieces: Vec<Range<usize>> = self.pieces(elems).collect();
        let mut off = 0;
        for r in pieces {
            let len = (r.end - r.start) * size;
            let part = slice_chunks(data, off, len);
            off += len;
            self.apply_contiguous(r.start * size..r.end * size, combine, &part, streamed);
        }
    }

    /// Combines `data` (chunks whose boundaries may split an element) into the buffer's bytes
    /// `range`; a `Copy` with streaming stores if `streamed`.
    fn apply_contiguous(&mut self, range: Range<usize>, combine: Combine, data: &[Bytes], streamed: bool) {
        let (dtype, op) = (self.dtype, self.op);
        let size = dtype.size();
        let dst = self.buf.range_mut(range);
        // Bytes of the segment consumed so far, and the start of an element split across chunks.
        let mut off = 0usize;
        let mut carry: Vec<u8> = Vec::new();
        for chunk in data {
            let mut c = &chunk[..];
            if combine == Combine::Copy {
                if streamed {
                    streaming_copy::copy(&mut dst[off..off + c.len()], c);
                } else {
                    dst[off..off + c.len()].copy_from_slice(c);
                }
                off += c.len();
                continue;
            }
            if !carry.is_empty() {
                // Finish the element the previous chunk split: it spans [off - size, off).
                let take = (size - carry.len()).min(c.len());
                carry.extend_from_slice(&c[..take]);
                c = &c[take..];
                off += take;
                if carry.len() == size {
                    reduce_into(dtype, op, &mut dst[off - size..off], &carry);
                    carry.clear();
                }
            }
            let whole = c.len() / size * size;
            reduce_into(dtype, op, &mut dst[off..off + whole], &c[..whole]);
            off += whole;
            carry.extend_from_slice(&c[whole..]);
            off += c.len() - whole;
        }
        debug_assert!(carry.is_empty(), "segment ended inside an element");
    }

    /// Unit `u`'s count in `which` (versions or encodings) rose to `value`: releases the
    /// segments that waited for it.
    fn release(&mut self, u: usize, value: u32, versions: bool) {
        loop {
            let ws = if versions { &mut self.version_waiters } else { &mut self.encoded_waiters };
            let Some(w) = ws.next(u, value) else { return };
            match w {
                Waiter::Send(i, seg) => {
                    let at = self.sends[i as usize].first_seg + seg as usize;
                    self.send_wait[at] -= 1;
                    if self.send_wait[at] == 0 {
                        self.ready.push_back(w);
                    }
                }
                Waiter::Recv(j, seg) => {
                    let at = self.recvs[j as usize].t.first_seg + seg as usize;
                    self.recv_wait[at] -= 1;
                    if self.recv_wait[at] == 0 {
                        if self.early.contains_key(&(j as usize, seg as usize)) {
                            self.ready.push_back(w);
                        } else if !self.postable.is_empty() {
                            self.post(j as usize, seg as usize);
                        }
                    }
                }
            }
        }
    }

    /// Sends and applies whatever is ready, and whatever that frees, until nothing more can
    /// move. Each segment waits on a counter per unit it covers, so the work per message is
    /// proportional to the units it covers, not to the schedule's size.
    fn advance(&mut self) {
        while let Some(w) = self.ready.pop_front() {
            match w {
                Waiter::Send(i, seg) => {
                    let (i, seg) = (i as usize, seg as usize);
                    let (m, phantom) = self.encode(i, seg);
                    self.outbox.push_back((self.sends[i].peer, m, phantom));
                    self.sends_left -= 1;
                    for u in self.units(self.segment(&self.sends[i], seg)) {
                        self.encoded[u] += 1;
                        self.release(u, self.encoded[u], false);
                    }
                }
                Waiter::Recv(j, seg) => {
                    let (j, seg) = (j as usize, seg as usize);
                    let in_place = self.early.get(&(j, seg)).expect("queued with its data").in_place;
                    if !in_place && self.recv_on_loan(j, seg) {
                        // The transport still holds part of the range (sent earlier): wait.
                        self.blocked.push((j, seg));
                        continue;
                    }
                    let a = self.early.remove(&(j, seg)).expect("queued with its data");
                    self.apply_recv(j, seg, &a.data, a.crc, a.in_place);
                }
            }
        }
        if !self.finished && self.sends_left == 0 && self.recvs_left == 0 {
            if self.op == ReduceOp::Avg && !self.phantom {
                let len = self.buf.len();
                divide(self.dtype, self.buf.range_mut(0..len), self.world);
            }
            self.finished = true;
        }
    }

    /// Applies a receive segment's `data`; `crc` is its checksum if the transport gave one
    /// (a single chunk only); `in_place`: the transport read it into its place already.
    fn apply_recv(&mut self, j: usize, seg: usize, data: &[Bytes], crc: Option<u32>, in_place: bool) {
        let elems = self.segment(&self.recvs[j].t, seg);
        let at = self.recvs[j].t.first_seg + seg;
        if in_place {
            self.in_place += 1;
        } else {
            self.apply(elems.clone(), self.recvs[j].combine, data, self.streamed.get(at).copied().unwrap_or(false));
        }
        // A receive that a send forwards makes that send's message now, when its data arrived
        // as one buffer (else the send takes a snapshot, as any other).
        if let (Some((i, s)), [one]) = (self.sent_on.get(at).copied().flatten(), data) {
            let (i, s) = (i as usize, s as usize);
            let mut p = Payload::from(self.header(i, s, 0).freeze());
            match crc {
                Some(crc) => p.push_checked(one.clone(), crc),
                None => p.push(one.clone()),
            }
            self.prepared[self.sends[i].first_seg + s] = Some(p);
        }
        for u in self.units(elems) {
            self.version[u] += 1;
            self.release(u, self.version[u], true);
        }
        self.applied[at] = true;
        self.recvs[j].left -= 1;
        self.recvs_left -= 1;
    }

    /// The next message to send: `(destination rank, its parts)` (of a real buffer; a phantom
    /// one's messages need [`Executor::poll_send_sized`]).
    pub fn poll_send(&mut self) -> Option<(usize, Payload)> {
        self.outbox.pop_front().map(|(to, m, _)| (to, m))
    }

    /// The next message to send: `(destination rank, bytes, phantom bytes)`; the phantom
    /// length is 0 for a real buffer.
    pub fn poll_send_sized(&mut self) -> Option<(usize, Payload, usize)> {
        self.outbox.pop_front()
    }

    /// A message from `from` arrived. Errors leave the executor unchanged.
    pub fn handle_message(&mut self, from: usize, msg: Bytes) -> Result<(), ExecError> {
        self.handle_chunks(from, &[msg])
    }

    /// A message from `from` arrived as consecutive chunks (as the transport delivers large
    /// messages): the data is combined straight from the chunks, without first copying them
    /// into one buffer. Errors leave the executor unchanged.
    pub fn handle_chunks(&mut self, from: usize, chunks: &[Bytes]) -> Result<(), ExecError> {
        self.handle_chunks_sized(from, chunks, 0)
    }

    /// Like [`Executor::handle_chunks`], for a message that stands for `phantom` more bytes
    /// than it holds (0 for a real one). A real executor refuses phantom data and a phantom
    /// one real data, as [`ExecError::WrongLength`].
    pub fn handle_chunks_sized(&mut self, from: usize, chunks: &[Bytes], phantom: usize) -> Result<(), ExecError> {
        self.receive(from, chunks, |_| None, phantom)
    }

    /// Like [`Executor::handle_chunks_sized`] for a message as the transport delivered it,
    /// with the checksums it verified ([`Payload::chunk_crc`]): a segment that a later send
    /// forwards unchanged goes out with its checksum, so the transport does not read it again
    /// to checksum the frame.
    pub fn handle_payload_sized(&mut self, from: usize, payload: &Payload, phantom: usize) -> Result<(), ExecError> {
        self.receive(from, payload.chunks(), |i| payload.chunk_crc(i), phantom)
    }

    fn receive(
        &mut self,
        from: usize,
        chunks: &[Bytes],
        crcs: impl Fn(usize) -> Option<u32>,
        phantom: usize,
    ) -> Result<(), ExecError> {
        let len: usize = chunks.iter().map(|c| c.len()).sum();
        if len < MESSAGE_HEADER {
            return Err(ExecError::Truncated { from, len, need: MESSAGE_HEADER });
        }
        // The header may straddle chunks; the data after it is kept as slices of the chunks.
        let mut header = [0u8; MESSAGE_HEADER];
        let mut data = Vec::with_capacity(chunks.len());
        // The chunk the data starts in, and how many header bytes precede it there.
        let mut first_data = (0, 0);
        let mut skip = MESSAGE_HEADER;
        for (i, c) in chunks.iter().enumerate() {
            let h = skip.min(c.len());
            header[MESSAGE_HEADER - skip..MESSAGE_HEADER - skip + h].copy_from_slice(&c[..h]);
            skip -= h;
            if h < c.len() {
                if data.is_empty() {
                    first_data = (i, h);
                }
                data.push(c.slice(h..));
            }
        }
        let mut hdr = &header[..];
        let op_seq = hdr.get_u64_le();
        let round = hdr.get_u32_le();
        let block = hdr.get_u32_le();
        let seg = hdr.get_u32_le() as usize;
        if op_seq != self.op_seq {
            return Err(ExecError::OtherCollective { from, found: op_seq, expected: self.op_seq });
        }
        let unexpected = ExecError::Unexpected { from, round, block };
        let Some(&j) = self.recv_index.get(&(round as usize, from, block as usize)) else {
            return Err(unexpected);
        };
        let t = &self.recvs[j].t;
        if seg >= t.segs || self.applied[t.first_seg + seg] || self.early.contains_key(&(j, seg)) {
            return Err(unexpected);
        }
        let expected = self.segment(t, seg).len() * self.dtype.size();
        let data_len = len - MESSAGE_HEADER;
        let (wrong_kind, right_kind) = if self.phantom { (data_len, phantom) } else { (phantom, data_len) };
        if wrong_kind != 0 || right_kind != expected {
            let len = if wrong_kind != 0 { wrong_kind } else { right_kind };
            return Err(ExecError::WrongLength { from, block, len, expected });
        }
        // The data's checksum, for a segment a send forwards as received (one chunk, large
        // enough for the transport to use it), derived from its chunk's.
        let forwarded = self.sent_on.get(t.first_seg + seg).is_some_and(Option::is_some);
        let data_crc = match (forwarded, data.as_slice()) {
            (true, [one]) if one.len() >= PRECOMPUTED_CRC_MIN => {
                let (i, h) = first_data;
                crcs(i).map(|crc| suffix_crc(crc, &chunks[i][..h], one.len()))
            }
            _ => None,
        };
        let ready = self.recv_wait[t.first_seg + seg] == 0;
        // A posted segment: taken back from the transport, which may have filled it already
        // (with this message's data, verified: whichever path delivered the message).
        let at = t.first_seg + seg;
        let mut in_place = false;
        if self.postable.get(at).copied().unwrap_or(false) {
            // `None`: not posted (it arrived first, or was deferred behind a loan).
            let size = self.dtype.size();
            let piece =
                self.pieces(self.segment(&self.recvs[j].t, seg)).next().expect("a postable segment is one piece");
            in_place = self.buf.settle(piece.start * size..piece.end * size) == Some(true);
        }
        self.early.insert((j, seg), Arrived { data, crc: data_crc, in_place });
        if ready {
            self.ready.push_back(Waiter::Recv(j as u32, seg as u32));
            self.advance();
        }
        Ok(())
    }

    /// Whether part of receive segment `seg` of receive `j`'s range is still lent until it
    /// comes back.
    fn recv_on_loan(&self, j: usize, seg: usize) -> bool {
        let size = self.dtype.size();
        !self.lendable.is_empty()
            && self
                .pieces(self.segment(&self.recvs[j].t, seg))
                .any(|p| self.buf.is_out(&(p.start * size..p.end * size)))
    }

    /// Moves on what waited for loans to come back (see [`Layout::lend`]): posts the receives
    /// that were ready to be posted, and applies those whose data is here, where the transport
    /// has let go of their range since. A driver calls it when a loan may have come back (the
    /// group does on every event, and asks for a timer while something waits:
    /// [`Executor::waits_for_loans`]).
    pub fn poll_loans(&mut self) {
        if self.deferred_posts.is_empty() && self.blocked.is_empty() {
            return;
        }
        // Only when a loan has come back since the last look.
        let back = self.buf.loans_back();
        if back == self.loans_back {
            return;
        }
        self.loans_back = back;
        for (j, seg) in std::mem::take(&mut self.deferred_posts) {
            if !self.applied[self.recvs[j].t.first_seg + seg] {
                self.post(j, seg);
            }
        }
        for (j, seg) in std::mem::take(&mut self.blocked) {
            self.ready.push_back(Waiter::Recv(j as u32, seg as u32));
        }
        self.advance();
    }

    /// Whether a received segment waits for a loan to come back before it can be applied
    /// ([`Executor::poll_loans`]).
    pub fn waits_for_loans(&self) -> bool {
        !self.blocked.is_empty()
    }

    /// The next receive segment posted in the buffer, for the driver to file with its transport
    /// (see [`Layout::post`]). A posting that is never filed costs nothing: the message then
    /// arrives as any other.
    pub fn poll_posting(&mut self) -> Option<PostedRecv> {
        self.postings.pop_front()
    }

    /// Received segments the transport read straight into the buffer (posted, see
    /// [`Layout::post`]), not copied.
    pub fn received_in_place(&self) -> u64 {
        self.in_place
    }

    /// Whether messages are still waiting to be handed out by [`Executor::poll_send`].
    pub fn has_outgoing(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// Whether every send has been made and every receive applied.
    pub fn is_done(&self) -> bool {
        self.finished
    }

    /// The ranks whose messages the earliest unfinished round still waits for.
    pub fn waiting_on(&self) -> Vec<usize> {
        let Some(round) = self.recvs.iter().filter(|r| r.left > 0).map(|r| r.t.round).min() else {
            return Vec::new();
        };
        let mut v: Vec<usize> =
            self.recvs.iter().filter(|r| r.t.round == round && r.left > 0).map(|r| r.t.peer).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The buffer (the result once [`Executor::is_done`]; empty for a phantom one).
    pub fn buffer(&self) -> &[u8] {
        self.buf.bytes()
    }

    /// While segments sent as the buffer's own bytes are still held by the transport (see
    /// [`Layout::lend`]): a handle that says when they have all come back. A driver that has
    /// a finished executor waits for it before [`Executor::into_buffer`], which otherwise
    /// copies the buffer.
    pub fn lent(&self) -> Option<Returned> {
        self.is_lent().then(|| self.buf.returned())
    }

    /// Whether segments sent as the buffer's own bytes are still held by the transport.
    pub fn is_lent(&self) -> bool {
        self.buf.is_lent()
    }

    /// Consumes the executor, returning the buffer (empty for a phantom one): the caller's
    /// own allocation, or a copy of it if some of it is still lent ([`Executor::lent`]).
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf.into_vec()
    }
}

/// The CRC32C of the last `len` bytes of a chunk, from the chunk's (`whole`) and its first
/// bytes (`head`): `crc(head ‖ tail) = crc(head)·x^(8·len) ⊕ crc(tail)`, so the tail's is
/// `whole ⊕ crc(head)·x^(8·len)`, which `crc32c_combine` with an empty second part computes.
fn suffix_crc(whole: u32, head: &[u8], len: usize) -> u32 {
    whole ^ crc32c_combine(crc32c(head), 0, len)
}

/// `len` bytes from byte `start` of the concatenation of `chunks`, as slices of them.
fn slice_chunks(chunks: &[Bytes], start: usize, len: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    let (mut skip, mut need) = (start, len);
    for c in chunks {
        if need == 0 {
            break;
        }
        if skip >= c.len() {
            skip -= c.len();
            continue;
        }
        let take = (c.len() - skip).min(need);
        out.push(c.slice(skip..skip + take));
        need -= take;
        skip = 0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{halving_doubling, ring, Collective};

    /// Per receive segment: (its round, how it combines, streamed).
    fn plan(schedule: Schedule, world: usize, bytes: usize) -> Vec<(usize, Combine, bool)> {
        let e = Executor::new(schedule, 1, DType::U8, ReduceOp::Sum, world, vec![0; bytes]);
        let mut out = Vec::new();
        for v in &e.recvs {
            for seg in 0..v.t.segs {
                out.push((v.t.round, v.combine, e.streamed.get(v.t.first_seg + seg).copied().unwrap_or(false)));
            }
        }
        out
    }

    /// Per send segment of `schedule` with lending on: (its round, how it is lent).
    fn loans(schedule: Schedule, op: ReduceOp, world: usize, bytes: usize) -> Vec<(usize, Loan)> {
        let layout = Layout { lend: true, ..Layout::default() };
        let e = Executor::with_layout(schedule, 1, DType::F32, op, world, vec![0; bytes], layout);
        let mut out = Vec::new();
        for t in &e.sends {
            for seg in 0..t.segs {
                out.push((t.round, e.lendable.get(t.first_seg + seg).copied().unwrap_or(Loan::No)));
            }
        }
        out
    }

    /// Per send segment of `schedule` with lending on: (its round, lent at all).
    fn lending(schedule: Schedule, op: ReduceOp, world: usize, bytes: usize) -> Vec<(usize, bool)> {
        loans(schedule, op, world, bytes).into_iter().map(|(r, l)| (r, l != Loan::No)).collect()
    }

    #[test]
    fn sends_are_lent_for_good_if_nothing_writes_them_afterwards_and_until_back_if_a_copy_does() {
        // Blocks of three whole segments, above the streaming threshold.
        let world = 4;
        let big = world * 3 * SEGMENT_BYTES;
        assert!(big >= STREAMING_MIN);
        // Ring all-gather: nothing is written after it is sent (the forwarded blocks go out as
        // the received buffers when they arrived as one, lent only otherwise).
        let p = lending(ring::schedule(Collective::AllGather, 1, world).expect("ring"), ReduceOp::Sum, world, big);
        assert!(p.iter().all(|(_, lent)| *lent), "{p:?}");
        // Ring all-reduce: the reduce-scatter's partial sums (rounds 0..world-1) are
        // overwritten by the gathering half's copies (lent until they come back), whose sends
        // are never written again (lent for good).
        let p = loans(ring::schedule(Collective::AllReduce, 1, world).expect("ring"), ReduceOp::Sum, world, big);
        let want = |r: usize| if r >= world - 1 { Loan::ForGood } else { Loan::UntilBack };
        assert!(p.iter().all(|(r, loan)| *loan == want(*r)), "{p:?}");
        // Recursive doubling reduces into what it has just sent: never lent.
        let p = lending(
            halving_doubling::schedule(Collective::AllReduce, 1, world).expect("hd"),
            ReduceOp::Sum,
            world,
            big,
        );
        assert!(p.iter().all(|(_, lent)| !lent), "{p:?}");
        // Avg divides the whole buffer at the end; small buffers are copied as before.
        let p = lending(ring::schedule(Collective::AllGather, 1, world).expect("ring"), ReduceOp::Avg, world, big);
        assert!(p.iter().all(|(_, lent)| !lent));
        let p = lending(ring::schedule(Collective::AllGather, 1, world).expect("ring"), ReduceOp::Sum, world, 1 << 20);
        assert!(p.iter().all(|(_, lent)| !lent));
        // Segments below the transport's precomputed-checksum size are copied.
        let odd = big + 4 * world;
        let p = lending(ring::schedule(Collective::AllGather, 1, world).expect("ring"), ReduceOp::Sum, world, odd);
        assert_eq!(p.iter().filter(|(_, lent)| !lent).count(), world - 1, "one small tail per block sent: {p:?}");
    }

    #[test]
    fn only_copies_that_nothing_reads_afterwards_are_streamed_and_only_into_large_buffers() {
        let (world, big) = (4, STREAMING_MIN + 4096);
        // Ring all-gather: each receive is forwarded as the received buffer, or never read.
        let p = plan(ring::schedule(Collective::AllGather, 1, world).expect("ring"), world, big);
        assert!(p.len() > world && p.iter().all(|(.., s)| *s), "{p:?}");
        // Ring all-reduce: the reduce-scatter's receives are reductions, the all-gather's copies.
        let p = plan(ring::schedule(Collective::AllReduce, 2, world).expect("ring"), world, big);
        assert!(p.iter().any(|(_, c, _)| *c == Combine::Reduce));
        assert!(p.iter().all(|(_, c, s)| *s == (*c == Combine::Copy)), "{p:?}");
        // Recursive doubling: what a round receives the next one sends as part of a larger
        // range, from the buffer; only the last round's receives are left unread.
        let p = plan(halving_doubling::all_gather(0, world).expect("power of two"), world, big);
        let last = p.iter().map(|(r, ..)| *r).max().expect("receives");
        assert!(p.iter().all(|(r, _, s)| *s == (*r == last)), "{p:?}");
        // A buffer the caches may hold: nothing streamed.
        let p = plan(ring::schedule(Collective::AllGather, 1, world).expect("ring"), world, STREAMING_MIN - 4096);
        assert!(p.iter().all(|(.., s)| !*s));
    }
}
