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
    /// The segment has the wrong size.
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

/// A send of the schedule, flattened.
struct SendOp {
    round: usize,
    to: usize,
    block: usize,
    /// Receives into `block` in earlier rounds (what the block must have seen first).
    need: u32,
    /// The next segment to encode.
    next: usize,
}

/// A receive of the schedule, flattened.
struct RecvOp {
    round: usize,
    from: usize,
    block: usize,
    combine: Combine,
    /// Receives into `block` in earlier rounds.
    need: u32,
    /// Sends of `block` in this round or earlier (they must read the block first).
    sends_before: u32,
    /// Segments applied.
    applied: Vec<bool>,
    left: usize,
}

/// Runs one rank's schedule of one collective on its buffer.
pub struct Executor {
    op_seq: u64,
    dtype: DType,
    op: ReduceOp,
    count: usize,
    blocks: usize,
    world: usize,
    buf: Vec<u8>,
    /// `(blocks of the whole buffer, the real block of each schedule block)`, when the schedule
    /// runs over a subset of the ranks (see [`Layout::block_map`]).
    block_map: Option<(usize, Vec<usize>)>,
    /// Elements per segment.
    seg_elems: usize,
    sends: Vec<SendOp>,
    recvs: Vec<RecvOp>,
    /// `(round, from, block)` → index into `recvs`.
    recv_index: BTreeMap<(usize, usize, usize), usize>,
    /// Per `(block, segment)`: receives applied, and sends encoded.
    version: Vec<Vec<u32>>,
    encoded: Vec<Vec<u32>>,
    /// Segments that arrived before they could be applied: `(recv, segment)` → data.
    early: BTreeMap<(usize, usize), Vec<Bytes>>,
    outbox: VecDeque<(usize, Bytes)>,
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
        let Layout { block_map, segment_bytes } = layout;
        if let Some((space, map)) = &block_map {
            assert_eq!(map.len(), schedule.blocks, "one buffer block per schedule block");
            assert!(map.iter().all(|b| b < space), "blocks within the buffer's {space}");
        }
        assert_eq!(buf.len() % dtype.size(), 0, "buffer is not whole elements");
        let count = buf.len() / dtype.size();
        let blocks = schedule.blocks;
        let mut e = Executor {
            op_seq,
            dtype,
            op,
            count,
            blocks,
            world,
            buf,
            block_map,
            seg_elems: (segment_bytes / dtype.size()).max(1),
            sends: Vec::new(),
            recvs: Vec::new(),
            recv_index: BTreeMap::new(),
            version: Vec::new(),
            encoded: Vec::new(),
            early: BTreeMap::new(),
            outbox: VecDeque::new(),
            sends_left: 0,
            recvs_left: 0,
            finished: false,
        };
        let segs: Vec<usize> = (0..blocks).map(|b| e.segments(b)).collect();
        e.version = segs.iter().map(|n| vec![0; *n]).collect();
        e.encoded = segs.iter().map(|n| vec![0; *n]).collect();
        // Receives into each block before each round, and sends of it up to each round.
        let mut recvs_into = vec![0u32; blocks];
        let mut sends_of = vec![0u32; blocks];
        for (r, round) in schedule.rounds.iter().enumerate() {
            for s in &round.sends {
                e.sends.push(SendOp { round: r, to: s.to, block: s.block, need: recvs_into[s.block], next: 0 });
                sends_of[s.block] += 1;
            }
            for v in &round.recvs {
                let n = segs[v.block];
                e.recv_index.insert((r, v.from, v.block), e.recvs.len());
                e.recvs.push(RecvOp {
                    round: r,
                    from: v.from,
                    block: v.block,
                    combine: v.combine,
                    need: recvs_into[v.block],
                    sends_before: sends_of[v.block],
                    applied: vec![false; n],
                    left: n,
                });
            }
            for v in &round.recvs {
                recvs_into[v.block] += 1;
            }
        }
        e.sends_left = e.sends.iter().map(|s| segs[s.block]).sum();
        e.recvs_left = e.recvs.iter().map(|r| r.left).sum();
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

    /// Byte range of segment `seg` of `block`.
    fn segment_bytes(&self, block: usize, seg: usize) -> std::ops::Range<usize> {
        let r = self.block_elems(block);
        let start = (r.start + seg * self.seg_elems).min(r.end);
        let end = (start + self.seg_elems).min(r.end);
        start * self.dtype.size()..end * self.dtype.size()
    }

    fn encode(&self, round: usize, block: usize, seg: usize) -> Bytes {
        let range = self.segment_bytes(block, seg);
        let mut m = BytesMut::with_capacity(MESSAGE_HEADER + range.len());
        m.put_u64_le(self.op_seq);
        m.put_u32_le(round as u32);
        m.put_u32_le(block as u32);
        m.put_u32_le(seg as u32);
        m.put_slice(&self.buf[range]);
        m.freeze()
    }

    /// Combines a received segment, given as consecutive chunks (the transport's frame
    /// buffers, uncopied), into the local one. Chunk boundaries may split an element.
    fn apply(&mut self, block: usize, seg: usize, combine: Combine, data: &[Bytes]) {
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

    fn recv_ready(&self, j: usize, seg: usize) -> bool {
        let r = &self.recvs[j];
        self.version[r.block][seg] >= r.need && self.encoded[r.block][seg] >= r.sends_before
    }

    /// Sends and applies whatever the data allows, until nothing more can move.
    fn advance(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.sends.len() {
                loop {
                    let (block, next, need) = (self.sends[i].block, self.sends[i].next, self.sends[i].need);
                    if next == self.version[block].len() || self.version[block][next] < need {
                        break;
                    }
                    let m = self.encode(self.sends[i].round, block, next);
                    self.outbox.push_back((self.sends[i].to, m));
                    self.encoded[block][next] += 1;
                    self.sends[i].next += 1;
                    self.sends_left -= 1;
                    moved = true;
                }
            }
            let ready: Vec<(usize, usize)> =
                self.early.keys().copied().filter(|(j, seg)| self.recv_ready(*j, *seg)).collect();
            for (j, seg) in ready {
                let data = self.early.remove(&(j, seg)).expect("listed above");
                self.apply_recv(j, seg, &data);
                moved = true;
            }
            if !moved {
                break;
            }
        }
        if !self.finished && self.sends_left == 0 && self.recvs_left == 0 {
            if self.op == ReduceOp::Avg {
                divide(self.dtype, &mut self.buf, self.world);
            }
            self.finished = true;
        }
    }

    fn apply_recv(&mut self, j: usize, seg: usize, data: &[Bytes]) {
        let (block, combine) = (self.recvs[j].block, self.recvs[j].combine);
        self.apply(block, seg, combine, data);
        self.version[block][seg] += 1;
        self.recvs[j].applied[seg] = true;
        self.recvs[j].left -= 1;
        self.recvs_left -= 1;
    }

    /// The next message to send: `(destination rank, bytes)`.
    pub fn poll_send(&mut self) -> Option<(usize, Bytes)> {
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
        let b = block as usize;
        if seg >= self.recvs[j].applied.len() || self.recvs[j].applied[seg] || self.early.contains_key(&(j, seg)) {
            return Err(unexpected);
        }
        let expected = self.segment_bytes(b, seg).len();
        let data_len = len - MESSAGE_HEADER;
        if data_len != expected {
            return Err(ExecError::WrongLength { from, block, len: data_len, expected });
        }
        if self.recv_ready(j, seg) {
            self.apply_recv(j, seg, &data);
        } else {
            self.early.insert((j, seg), data);
        }
        self.advance();
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

    /// The buffer (the result once [`Executor::is_done`]).
    pub fn buffer(&self) -> &[u8] {
        &self.buf
    }

    /// Consumes the executor, returning the buffer.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}
