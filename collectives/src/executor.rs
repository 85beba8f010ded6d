//! The sans-IO executor: runs any [`Schedule`] on a real buffer.
//!
//! Call order: [`Executor::poll_send`] until it returns `None` (messages to hand to the
//! transport, each addressed to a rank), feed every message that arrives for this collective to
//! [`Executor::handle_message`], repeat until [`Executor::is_done`]. Messages may arrive early
//! (for a later round) and are kept until their round; a message that cannot belong to this
//! collective is refused with an error naming the sender, and changes nothing.
//!
//! Wire format of one message: `op_seq u64 | round u32 | block u32 | block bytes` (little
//! endian). `op_seq` numbers the collectives of a communicator so that a late message from an
//! earlier one is never mistaken for this one's.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::reduce::{divide, reduce_into, DType, ReduceOp};
use crate::schedule::{block_range, Combine, Schedule};

/// Bytes of the per-message header.
pub const MESSAGE_HEADER: usize = 16;

/// Why a message was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ExecError {
    /// Shorter than the header.
    #[error("message from rank {from} is {len} bytes, shorter than the {MESSAGE_HEADER}-byte header")]
    Truncated {
        /// Sender.
        from: usize,
        /// Its length.
        len: usize,
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
    /// The schedule expects no such message (wrong round, block, sender, or a duplicate).
    #[error("unexpected message from rank {from}: round {round}, block {block}")]
    Unexpected {
        /// Sender.
        from: usize,
        /// Round it claims.
        round: u32,
        /// Block it claims.
        block: u32,
    },
    /// The block has the wrong size.
    #[error("block {block} from rank {from} has {len} bytes, expected {expected}")]
    WrongLength {
        /// Sender.
        from: usize,
        /// Block.
        block: u32,
        /// Its length.
        len: usize,
        /// The block's size.
        expected: usize,
    },
}

/// Runs one rank's schedule of one collective on its buffer.
pub struct Executor {
    schedule: Schedule,
    op_seq: u64,
    dtype: DType,
    op: ReduceOp,
    count: usize,
    world: usize,
    buf: Vec<u8>,
    /// `(blocks of the whole buffer, the real block of each schedule block)`, when the schedule
    /// runs over a subset of the ranks (see [`Executor::with_block_map`]).
    block_map: Option<(usize, Vec<usize>)>,
    round: usize,
    round_started: bool,
    waiting: BTreeSet<(usize, usize)>,
    early: BTreeMap<(usize, usize, usize), Vec<Bytes>>,
    outbox: VecDeque<(usize, Bytes)>,
    finished: bool,
}

impl Executor {
    /// An executor for `schedule` over `buf` (`count` elements of `dtype`, reduced with `op`
    /// across `world` ranks). Panics if `buf` does not hold exactly `count` elements.
    pub fn new(schedule: Schedule, op_seq: u64, dtype: DType, op: ReduceOp, world: usize, buf: Vec<u8>) -> Executor {
        Executor::build(schedule, op_seq, dtype, op, world, buf, None)
    }

    /// Like [`Executor::new`], for a schedule over a subset of a larger group: the buffer is
    /// split into `space` blocks (as [`block_range`] splits it), and schedule block `b` is the
    /// buffer's block `map[b]`. Reduce-scatter and all-gather over the survivors of a group use
    /// it, so each survivor still owns its own block of the caller's buffer. Panics if `map`
    /// does not name one block of `space` per schedule block.
    #[allow(clippy::too_many_arguments)]
    pub fn with_block_map(
        schedule: Schedule,
        op_seq: u64,
        dtype: DType,
        op: ReduceOp,
        world: usize,
        buf: Vec<u8>,
        space: usize,
        map: Vec<usize>,
    ) -> Executor {
        assert_eq!(map.len(), schedule.blocks, "one buffer block per schedule block");
        assert!(map.iter().all(|b| *b < space), "blocks within the buffer's {space}");
        Executor::build(schedule, op_seq, dtype, op, world, buf, Some((space, map)))
    }

    fn build(
        schedule: Schedule,
        op_seq: u64,
        dtype: DType,
        op: ReduceOp,
        world: usize,
        buf: Vec<u8>,
        block_map: Option<(usize, Vec<usize>)>,
    ) -> Executor {
        assert_eq!(buf.len() % dtype.size(), 0, "buffer is not whole elements");
        let count = buf.len() / dtype.size();
        let mut e = Executor {
            schedule,
            op_seq,
            dtype,
            op,
            count,
            world,
            buf,
            block_map,
            round: 0,
            round_started: false,
            waiting: BTreeSet::new(),
            early: BTreeMap::new(),
            outbox: VecDeque::new(),
            finished: false,
        };
        e.advance();
        e
    }

    fn block_bytes(&self, block: usize) -> std::ops::Range<usize> {
        let r = match &self.block_map {
            Some((space, map)) => block_range(self.count, *space, map[block]),
            None => block_range(self.count, self.schedule.blocks, block),
        };
        r.start * self.dtype.size()..r.end * self.dtype.size()
    }

    fn encode(&self, round: usize, block: usize) -> Bytes {
        let range = self.block_bytes(block);
        let mut m = BytesMut::with_capacity(MESSAGE_HEADER + range.len());
        m.put_u64_le(self.op_seq);
        m.put_u32_le(round as u32);
        m.put_u32_le(block as u32);
        m.put_slice(&self.buf[range]);
        m.freeze()
    }

    /// Combines a received block, given as consecutive chunks (the transport's frame buffers,
    /// uncopied), into the local block. Chunk boundaries may split an element.
    fn apply(&mut self, block: usize, combine: Combine, data: &[Bytes]) {
        let range = self.block_bytes(block);
        let dst = &mut self.buf[range];
        let size = self.dtype.size();
        // Bytes of the block consumed so far, and the start of an element split across chunks.
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
        debug_assert!(carry.is_empty(), "block ended inside an element");
    }

    /// Starts rounds whose receives are all in, as far as possible.
    fn advance(&mut self) {
        while !self.finished {
            if self.round == self.schedule.rounds.len() {
                if self.op == ReduceOp::Avg {
                    divide(self.dtype, &mut self.buf, self.world);
                }
                self.finished = true;
                return;
            }
            if !self.round_started {
                self.round_started = true;
                let round = self.schedule.rounds[self.round].clone();
                // Sends carry the blocks as they are at the start of the round.
                for s in &round.sends {
                    let m = self.encode(self.round, s.block);
                    self.outbox.push_back((s.to, m));
                }
                self.waiting = round.recvs.iter().map(|r| (r.from, r.block)).collect();
                for r in &round.recvs {
                    if let Some(data) = self.early.remove(&(self.round, r.from, r.block)) {
                        self.apply(r.block, r.combine, &data);
                        self.waiting.remove(&(r.from, r.block));
                    }
                }
            }
            if !self.waiting.is_empty() {
                return;
            }
            self.round += 1;
            self.round_started = false;
        }
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
            return Err(ExecError::Truncated { from, len });
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
        if op_seq != self.op_seq {
            return Err(ExecError::OtherCollective { from, found: op_seq, expected: self.op_seq });
        }
        let unexpected = ExecError::Unexpected { from, round, block };
        let (r, b) = (round as usize, block as usize);
        let Some(recv) =
            self.schedule.rounds.get(r).and_then(|x| x.recvs.iter().find(|v| v.from == from && v.block == b)).copied()
        else {
            return Err(unexpected);
        };
        let expected = self.block_bytes(b).len();
        let data_len = len - MESSAGE_HEADER;
        if data_len != expected {
            return Err(ExecError::WrongLength { from, block, len: data_len, expected });
        }
        if r == self.round && self.round_started && self.waiting.remove(&(from, b)) {
            self.apply(b, recv.combine, &data);
            self.advance();
            Ok(())
        } else if (r > self.round || (r == self.round && !self.round_started))
            && !self.early.contains_key(&(r, from, b))
        {
            self.early.insert((r, from, b), data);
            Ok(())
        } else {
            Err(unexpected)
        }
    }

    /// Whether messages are still waiting to be handed out by [`Executor::poll_send`] (a
    /// schedule may finish with sends only).
    pub fn has_outgoing(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// Whether every round has completed.
    pub fn is_done(&self) -> bool {
        self.finished
    }

    /// The ranks whose messages the current round still waits for.
    pub fn waiting_on(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.waiting.iter().map(|(from, _)| *from).collect();
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
