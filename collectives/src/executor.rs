//! The sans-IO executor: runs any [`Schedule`] on a real buffer, pipelined.
//!
//! Call order: [`Executor::poll_send`] until it returns `None` (messages to hand to the
//! transport, each addressed to a rank), feed every message that arrives for this collective to
//! [`Executor::handle_chunks`], repeat until [`Executor::is_done`]. A message that cannot belong
//! to this collective is refused with an error naming the sender, and changes nothing.
//!
//! **Pipelining.** Every block a round sends is cut into segments of at most
//! [`SEGMENT_BYTES`], each its own message. The executor runs on dataflow rather than in
//! lock-step rounds: a segment is sent as soon as its part of the block holds what the schedule
//! says it holds at the start of that round (every receive into that part from earlier rounds is
//! applied), and an arriving segment is combined as soon as the receives before it into that part
//! are applied and the sends that must read the part first have been encoded. So a ring step
//! forwards the first megabyte of a block while the rest of it is still arriving, and reduction
//! overlaps the transfer. The result is the same as running the rounds in lock-step: each part
//! of each block sees the same operations in the same order.
//!
//! Wire format of one message: `op_seq u64 | round u32 | block u32 | segment u32 | bytes`
//! (little endian). `op_seq` numbers the collectives of a communicator (and their attempts) so
//! that a late message from an earlier one is never mistaken for this one's.
//!
//! **Phantom payloads.** An executor made with [`Executor::phantom`] runs the same schedule,
//! dataflow and checks on a buffer that has a length but no bytes (the simulator uses it at
//! scale): each message is the header alone plus a *phantom* length, the bytes it stands for,
//! which drivers account as if they were sent ([`Executor::poll_send_sized`],
//! [`Executor::handle_chunks_sized`]).

use std::collections::{BTreeMap, VecDeque};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::reduce::{divide, reduce_into, DType, ReduceOp};
use crate::schedule::{block_range, Combine, Schedule};

/// Bytes of the per-message header.
pub const MESSAGE_HEADER: usize = 20;

/// Largest segment of a block sent as one message (the unit of pipelining).
pub const SEGMENT_BYTES: usize = 1 << 20;

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
}

impl Default for Layout {
    fn default() -> Self {
        Layout { block_map: None, segment_bytes: SEGMENT_BYTES }
    }
}

/// A send of the schedule, flattened: one block (cut into segments), or a *span* of
/// consecutive one-segment blocks sent as one message.
struct SendOp {
    round: usize,
    to: usize,
    blocks: std::ops::Range<usize>,
}

/// A receive of the schedule, flattened (one block, or a span, as [`SendOp`]).
struct RecvOp {
    round: usize,
    from: usize,
    blocks: std::ops::Range<usize>,
    /// Per block of the span.
    combine: Vec<Combine>,
    /// Segments applied.
    applied: Vec<bool>,
    left: usize,
}

/// A segment of a send or receive that waits for units of the buffer to reach a version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiter {
    Send(u32, u32),
    Recv(u32, u32),
}

/// For every unit of the buffer (a segment of a block), the segments waiting on its count of
/// receives applied (or of sends encoded), sorted by the count they need; stored flat (one
/// list for all units, with offsets), since a rank of a large world has many units.
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
pub struct Executor {
    op_seq: u64,
    dtype: DType,
    op: ReduceOp,
    count: usize,
    blocks: usize,
    world: usize,
    /// The buffer (empty for a phantom one).
    buf: Vec<u8>,
    /// Phantom: the buffer is a length only; messages carry no data bytes.
    phantom: bool,
    /// `(blocks of the whole buffer, the real block of each schedule block)`, when the schedule
    /// runs over a subset of the ranks (see [`Layout::block_map`]).
    block_map: Option<(usize, Vec<usize>)>,
    /// Elements per segment.
    seg_elems: usize,
    sends: Vec<SendOp>,
    recvs: Vec<RecvOp>,
    /// `(round, from, first block)` → index into `recvs`.
    recv_index: BTreeMap<(usize, usize, usize), usize>,
    /// First unit of each block (a unit is one segment of one block).
    unit_base: Vec<usize>,
    /// Per unit: receives applied, and sends encoded.
    version: Vec<u32>,
    encoded: Vec<u32>,
    version_waiters: Waiters,
    encoded_waiters: Waiters,
    /// Per send and receive, per segment: units not yet where they must be.
    send_wait: Vec<Vec<u32>>,
    recv_wait: Vec<Vec<u32>>,
    /// Segments free to go (sends) or to be applied (receives whose data is here), in the
    /// order they became so.
    ready: VecDeque<Waiter>,
    /// Segments that arrived before they could be applied: `(recv, segment)` → data.
    early: BTreeMap<(usize, usize), Vec<Bytes>>,
    /// `(destination, message, phantom bytes)`.
    outbox: VecDeque<(usize, Bytes, usize)>,
    sends_left: usize,
    recvs_left: usize,
    finished: bool,
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
        let Layout { block_map, segment_bytes } = layout;
        if let Some((space, map)) = &block_map {
            assert_eq!(map.len(), schedule.blocks, "one buffer block per schedule block");
            assert!(map.iter().all(|b| b < space), "blocks within the buffer's {space}");
        }
        let len = phantom.unwrap_or(buf.len());
        assert_eq!(len % dtype.size(), 0, "buffer is not whole elements");
        let count = len / dtype.size();
        let blocks = schedule.blocks;
        let mut e = Executor {
            op_seq,
            dtype,
            op,
            count,
            blocks,
            world,
            buf,
            phantom: phantom.is_some(),
            block_map,
            seg_elems: (segment_bytes / dtype.size()).max(1),
            sends: Vec::new(),
            recvs: Vec::new(),
            recv_index: BTreeMap::new(),
            unit_base: Vec::new(),
            version: Vec::new(),
            encoded: Vec::new(),
            version_waiters: Waiters::default(),
            encoded_waiters: Waiters::default(),
            send_wait: Vec::new(),
            recv_wait: Vec::new(),
            ready: VecDeque::new(),
            early: BTreeMap::new(),
            outbox: VecDeque::new(),
            sends_left: 0,
            recvs_left: 0,
            finished: false,
        };
        let segs: Vec<usize> = (0..blocks).map(|b| e.segments(b)).collect();
        let mut next_unit = 0;
        for n in &segs {
            e.unit_base.push(next_unit);
            next_unit += n;
        }
        e.version = vec![0; next_unit];
        e.encoded = vec![0; next_unit];
        let mut version_entries: Vec<(u32, u32, Waiter)> = Vec::new();
        let mut encoded_entries: Vec<(u32, u32, Waiter)> = Vec::new();
        // Receives into each block before each round, and sends of it up to each round.
        let mut recvs_into = vec![0u32; blocks];
        let mut sends_of = vec![0u32; blocks];
        for (r, round) in schedule.rounds.iter().enumerate() {
            let mut sends: Vec<(usize, usize)> = round.sends.iter().map(|s| (s.to, s.block)).collect();
            sends.sort_unstable();
            for (to, span) in e.spans(&sends) {
                let i = e.sends.len();
                let n = e.op_segments(&span);
                let mut wait = vec![0u32; n];
                for (seg, w) in wait.iter_mut().enumerate() {
                    for u in e.op_units(&span, seg) {
                        let need = recvs_into[e.block_of_unit(u)];
                        if need > 0 {
                            version_entries.push((u as u32, need, Waiter::Send(i as u32, seg as u32)));
                            *w += 1;
                        }
                    }
                }
                e.send_wait.push(wait);
                e.sends.push(SendOp { round: r, to, blocks: span.clone() });
                for b in span {
                    sends_of[b] += 1;
                }
            }
            let mut recvs: Vec<(usize, usize)> = round.recvs.iter().map(|v| (v.from, v.block)).collect();
            recvs.sort_unstable();
            let combine_of: BTreeMap<(usize, usize), Combine> =
                round.recvs.iter().map(|v| ((v.from, v.block), v.combine)).collect();
            for (from, span) in e.spans(&recvs) {
                let j = e.recvs.len();
                let n = e.op_segments(&span);
                let mut wait = vec![0u32; n];
                for (seg, w) in wait.iter_mut().enumerate() {
                    for u in e.op_units(&span, seg) {
                        let b = e.block_of_unit(u);
                        if recvs_into[b] > 0 {
                            version_entries.push((u as u32, recvs_into[b], Waiter::Recv(j as u32, seg as u32)));
                            *w += 1;
                        }
                        if sends_of[b] > 0 {
                            encoded_entries.push((u as u32, sends_of[b], Waiter::Recv(j as u32, seg as u32)));
                            *w += 1;
                        }
                    }
                }
                e.recv_wait.push(wait);
                e.recv_index.insert((r, from, span.start), j);
                e.recvs.push(RecvOp {
                    round: r,
                    from,
                    blocks: span.clone(),
                    combine: span.clone().map(|b| combine_of[&(from, b)]).collect(),
                    applied: vec![false; n],
                    left: n,
                });
            }
            for v in &round.recvs {
                recvs_into[v.block] += 1;
            }
        }
        e.version_waiters = Waiters::new(next_unit, version_entries);
        e.encoded_waiters = Waiters::new(next_unit, encoded_entries);
        e.sends_left = e.send_wait.iter().map(|w| w.len()).sum();
        e.recvs_left = e.recvs.iter().map(|r| r.left).sum();
        for (i, wait) in e.send_wait.iter().enumerate() {
            for (seg, w) in wait.iter().enumerate() {
                if *w == 0 {
                    e.ready.push_back(Waiter::Send(i as u32, seg as u32));
                }
            }
        }
        e.advance();
        e
    }

    /// Element range of schedule block `block`.
    fn block_elems(&self, block: usize) -> std::ops::Range<usize> {
        match &self.block_map {
            Some((space, map)) => block_range(self.count, *space, map[block]),
            None => block_range(self.count, self.blocks, block),
        }
    }

    /// Segments of `block` (at least one, so that empty blocks still synchronise).
    fn segments(&self, block: usize) -> usize {
        self.block_elems(block).len().div_ceil(self.seg_elems).max(1)
    }

    /// Segments (messages) of a send or receive of `blocks`.
    fn op_segments(&self, blocks: &std::ops::Range<usize>) -> usize {
        if blocks.len() == 1 {
            self.segments(blocks.start)
        } else {
            1
        }
    }

    /// The units a segment of a send or receive of `blocks` covers: consecutive, since a
    /// span's blocks have one segment (one unit) each. No allocation: this runs per message.
    fn op_units(&self, blocks: &std::ops::Range<usize>, seg: usize) -> std::ops::Range<usize> {
        let first = self.unit_base[blocks.start];
        if blocks.len() == 1 {
            first + seg..first + seg + 1
        } else {
            first..first + blocks.len()
        }
    }

    /// The block unit `u` belongs to.
    fn block_of_unit(&self, u: usize) -> usize {
        self.unit_base.partition_point(|base| *base <= u) - 1
    }

    /// Cuts one round's `(peer, block)` pairs (sorted) into messages: runs of consecutive
    /// blocks to the same peer, each block of one segment, together at most a segment's worth
    /// of elements, go as one span; any other block on its own. Sender and receiver cut alike
    /// (the schedules match pair by pair and every rank has the same layout).
    fn spans(&self, pairs: &[(usize, usize)]) -> Vec<(usize, std::ops::Range<usize>)> {
        let mut out: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        let mut elems = 0usize;
        for &(peer, b) in pairs {
            let len = self.block_elems(b).len();
            let single = self.segments(b) == 1;
            if let Some((p, span)) = out.last_mut() {
                let joinable = *p == peer && span.end == b && single && self.segments(span.start) == 1;
                if joinable && elems + len <= self.seg_elems {
                    span.end = b + 1;
                    elems += len;
                    continue;
                }
            }
            out.push((peer, b..b + 1));
            elems = len;
        }
        out
    }

    /// Byte range of segment `seg` of `block`.
    fn segment_bytes(&self, block: usize, seg: usize) -> std::ops::Range<usize> {
        let r = self.block_elems(block);
        let start = (r.start + seg * self.seg_elems).min(r.end);
        let end = (start + self.seg_elems).min(r.end);
        start * self.dtype.size()..end * self.dtype.size()
    }

    /// Bytes of segment `seg` of a send or receive of `blocks` (a span's blocks, in order).
    fn op_ranges(&self, blocks: &std::ops::Range<usize>, seg: usize) -> Vec<std::ops::Range<usize>> {
        if blocks.len() == 1 {
            vec![self.segment_bytes(blocks.start, seg)]
        } else {
            blocks.clone().map(|b| self.segment_bytes(b, 0)).collect()
        }
    }

    /// The message of segment `seg` of `blocks` in `round`, and its phantom length.
    fn encode(&self, round: usize, blocks: &std::ops::Range<usize>, seg: usize) -> (Bytes, usize) {
        let ranges = self.op_ranges(blocks, seg);
        let len: usize = ranges.iter().map(|r| r.len()).sum();
        let data = if self.phantom { 0 } else { len };
        let mut m = BytesMut::with_capacity(MESSAGE_HEADER + data);
        m.put_u64_le(self.op_seq);
        m.put_u32_le(round as u32);
        m.put_u32_le(blocks.start as u32);
        m.put_u32_le(seg as u32);
        if self.phantom {
            return (m.freeze(), len);
        }
        for r in ranges {
            m.put_slice(&self.buf[r]);
        }
        (m.freeze(), 0)
    }

    /// Combines a received segment, given as consecutive chunks (the transport's frame
    /// buffers, uncopied), into the local one. Chunk boundaries may split an element.
    fn apply(&mut self, block: usize, seg: usize, combine: Combine, data: &[Bytes]) {
        if self.phantom {
            return;
        }
        let range = self.segment_bytes(block, seg);
        let dst = &mut self.buf[range];
        let size = self.dtype.size();
        // Bytes of the segment consumed so far, and the start of an element split across chunks.
        let mut off = 0usize;
        let mut carry: Vec<u8> = Vec::new();
        for chunk in data {
            let mut c = &chunk[..];
            if combine == Combine::Copy {
                dst[off..off + c.len()].copy_from_slice(c);
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
                    reduce_into(self.dtype, self.op, &mut dst[off - size..off], &carry);
                    carry.clear();
                }
            }
            let whole = c.len() / size * size;
            reduce_into(self.dtype, self.op, &mut dst[off..off + whole], &c[..whole]);
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
                    let (i, seg) = (i as usize, seg as usize);
                    self.send_wait[i][seg] -= 1;
                    if self.send_wait[i][seg] == 0 {
                        self.ready.push_back(w);
                    }
                }
                Waiter::Recv(j, seg) => {
                    let (j, seg) = (j as usize, seg as usize);
                    self.recv_wait[j][seg] -= 1;
                    if self.recv_wait[j][seg] == 0 && self.early.contains_key(&(j, seg)) {
                        self.ready.push_back(w);
                    }
                }
            }
        }
    }

    /// Sends and applies whatever is ready, and whatever that frees, until nothing more can
    /// move. Each segment waits on a counter per unit it covers, so the work per message is
    /// proportional to its size, not to the schedule's.
    fn advance(&mut self) {
        while let Some(w) = self.ready.pop_front() {
            match w {
                Waiter::Send(i, seg) => {
                    let (i, seg) = (i as usize, seg as usize);
                    let blocks = self.sends[i].blocks.clone();
                    let (m, phantom) = self.encode(self.sends[i].round, &blocks, seg);
                    self.outbox.push_back((self.sends[i].to, m, phantom));
                    self.sends_left -= 1;
                    for u in self.op_units(&blocks, seg) {
                        self.encoded[u] += 1;
                        self.release(u, self.encoded[u], false);
                    }
                }
                Waiter::Recv(j, seg) => {
                    let (j, seg) = (j as usize, seg as usize);
                    let data = self.early.remove(&(j, seg)).expect("queued with its data");
                    self.apply_recv(j, seg, &data);
                }
            }
        }
        if !self.finished && self.sends_left == 0 && self.recvs_left == 0 {
            if self.op == ReduceOp::Avg && !self.phantom {
                divide(self.dtype, &mut self.buf, self.world);
            }
            self.finished = true;
        }
    }

    fn apply_recv(&mut self, j: usize, seg: usize, data: &[Bytes]) {
        let blocks = self.recvs[j].blocks.clone();
        if blocks.len() == 1 {
            let combine = self.recvs[j].combine[0];
            self.apply(blocks.start, seg, combine, data);
        } else {
            // A span: each block's bytes, in order, cut from the chunks without copying.
            let mut off = 0;
            for (k, b) in blocks.clone().enumerate() {
                let len = self.segment_bytes(b, 0).len();
                let part = slice_chunks(data, off, len);
                off += len;
                let combine = self.recvs[j].combine[k];
                self.apply(b, 0, combine, &part);
            }
        }
        for u in self.op_units(&blocks, seg) {
            self.version[u] += 1;
            self.release(u, self.version[u], true);
        }
        self.recvs[j].applied[seg] = true;
        self.recvs[j].left -= 1;
        self.recvs_left -= 1;
    }

    /// The next message to send: `(destination rank, bytes)` (of a real buffer; a phantom
    /// one's messages need [`Executor::poll_send_sized`]).
    pub fn poll_send(&mut self) -> Option<(usize, Bytes)> {
        self.outbox.pop_front().map(|(to, m, _)| (to, m))
    }

    /// The next message to send: `(destination rank, bytes, phantom bytes)`; the phantom
    /// length is 0 for a real buffer.
    pub fn poll_send_sized(&mut self) -> Option<(usize, Bytes, usize)> {
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
        let len: usize = chunks.iter().map(|c| c.len()).sum();
        if len < MESSAGE_HEADER {
            return Err(ExecError::Truncated { from, len, need: MESSAGE_HEADER });
        }
        // The header may straddle chunks; the data after it is kept as slices of the chunks.
        let mut header = [0u8; MESSAGE_HEADER];
        let mut data = Vec::with_capacity(chunks.len());
        let mut skip = MESSAGE_HEADER;
        for c in chunks {
            let h = skip.min(c.len());
            header[MESSAGE_HEADER - skip..MESSAGE_HEADER - skip + h].copy_from_slice(&c[..h]);
            skip -= h;
            if h < c.len() {
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
        if seg >= self.recvs[j].applied.len() || self.recvs[j].applied[seg] || self.early.contains_key(&(j, seg)) {
            return Err(unexpected);
        }
        let blocks = self.recvs[j].blocks.clone();
        let expected: usize = self.op_ranges(&blocks, seg).iter().map(|r| r.len()).sum();
        let data_len = len - MESSAGE_HEADER;
        let (wrong_kind, right_kind) = if self.phantom { (data_len, phantom) } else { (phantom, data_len) };
        if wrong_kind != 0 || right_kind != expected {
            let len = if wrong_kind != 0 { wrong_kind } else { right_kind };
            return Err(ExecError::WrongLength { from, block, len, expected });
        }
        self.early.insert((j, seg), data);
        if self.recv_wait[j][seg] == 0 {
            self.ready.push_back(Waiter::Recv(j as u32, seg as u32));
            self.advance();
        }
        Ok(())
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
        let Some(round) = self.recvs.iter().filter(|r| r.left > 0).map(|r| r.round).min() else {
            return Vec::new();
        };
        let mut v: Vec<usize> = self
            .recvs
            .iter()
            .filter(|r| r.round == round && r.left > 0 && (0..r.applied.len()).any(|s| !r.applied[s]))
            .map(|r| r.from)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The buffer (the result once [`Executor::is_done`]; empty for a phantom one).
    pub fn buffer(&self) -> &[u8] {
        &self.buf
    }

    /// Consumes the executor, returning the buffer (empty for a phantom one).
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
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
