//! The reliable, ordered byte-message session with one peer: sequence numbers, selective
//! acknowledgements, retransmission, duplicate suppression, reordering and reassembly.
//!
//! A session knows nothing of paths; the endpoint decides which path carries each frame.
//! Sequence numbers are per direction and per peer incarnation, assigned when a chunk is framed,
//! so the chunks of one message are consecutive and delivery in sequence order is delivery in
//! order per channel.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use crate::payload::Payload;

use crate::frame::{Frame, FrameFlags, FrameKind, Header};
use crate::ids::{ChannelId, Epoch, LinkId, RankId};
use crate::time::Instant;

/// An application message delivered by the transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Sending rank.
    pub from: RankId,
    /// Channel it was sent on.
    pub channel: ChannelId,
    /// The bytes, exactly as sent, as the frames' own buffers (no reassembly copy).
    pub payload: Payload,
}

/// A message being cut into frames. Its parts are sent as they are (a frame never spans two
/// parts, so a small header part and a large data part go out without being joined).
#[derive(Debug)]
struct Outgoing {
    channel: ChannelId,
    payload: Payload,
    /// Bytes framed so far, and where that is: part `part`, byte `in_part`.
    offset: usize,
    part: usize,
    in_part: usize,
}

impl Outgoing {
    /// The next frame's bytes: at most `chunk` from the current part (empty for an empty
    /// message).
    fn next_len(&self, chunk: usize) -> usize {
        self.payload.chunks().get(self.part).map_or(0, |p| (p.len() - self.in_part).min(chunk))
    }

    /// Takes the next frame's bytes (see [`Outgoing::next_len`]) without copying, with their
    /// CRC32C when they are a whole part whose checksum the sender gave.
    fn take(&mut self, chunk: usize) -> (Bytes, Option<u32>) {
        let Some(p) = self.payload.chunks().get(self.part) else { return (Bytes::new(), None) };
        let end = (self.in_part + chunk).min(p.len());
        let piece = p.slice(self.in_part..end);
        let crc = if self.in_part == 0 && end == p.len() { self.payload.chunk_crc(self.part) } else { None };
        self.offset += piece.len();
        if end == p.len() {
            (self.part, self.in_part) = (self.part + 1, 0);
        } else {
            self.in_part = end;
        }
        (piece, crc)
    }
}

/// A data frame sent and not yet acknowledged.
#[derive(Debug)]
pub(crate) struct Sent {
    pub frame: Frame,
    pub last_tx: u64,
}

#[derive(Debug)]
struct Assembly {
    channel: ChannelId,
    total: usize,
    buf: Payload,
    /// CRC32C of `buf`'s bytes so far, while every frame's is known ([`known_crc`]).
    crc: Option<u32>,
}

/// A message's first or last frame up to this size whose checksum the link did not hand on
/// is checksummed as it joins the message (it is in cache, and the message's checksum needs
/// every part's): the small header part of a message sent as a header part and a data part,
/// and the short remainder of one cut into chunks. Small frames in between are not (a small
/// chunk size would checksum every frame twice).
const SMALL_PART: usize = 4096;

/// The CRC32C of a data frame's payload: the one the link verified, or, for a small first or
/// last frame, computed now.
fn known_crc(frame: &Frame) -> Option<u32> {
    let end = frame.header.flags.contains(FrameFlags::FIRST) || frame.header.flags.contains(FrameFlags::LAST);
    frame
        .payload_crc
        .or_else(|| (end && frame.payload.len() <= SMALL_PART).then(|| crate::checksum::crc32c(&frame.payload)))
}

/// What went wrong with the peer's data stream. The frame is dropped; the stream goes on.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StreamViolation {
    /// A chunk did not continue the message being assembled, or lengths disagree.
    BadChunk,
    /// Declared message length beyond the configured maximum.
    MessageTooLarge,
}

#[derive(Debug)]
pub(crate) struct PeerSession {
    pub peer: RankId,
    /// The peer's incarnation, once a direct link told us.
    pub incarnation: Option<u64>,
    // Send side.
    next_seq: u64,
    queue: VecDeque<Outgoing>,
    queued_messages: u64,
    pub unacked: BTreeMap<u64, Sent>,
    cum_acked: u64,
    pub retransmit: BTreeSet<u64>,
    // Receive side.
    next_expected: u64,
    reorder: BTreeMap<u64, Frame>,
    assembling: Option<Assembly>,
    pub frames_since_ack: u32,
    /// Payload bytes of the data frames counted in `frames_since_ack`.
    pub bytes_since_ack: u64,
    pub ack_due: Option<Instant>,
    pub ack_link: Option<LinkId>,
    // Route and liveness.
    pub ever_connected: bool,
    /// A peer this endpoint has a path to and waits for: if it never comes up it is reported
    /// unreachable like one that went away.
    pub expected: bool,
    pub no_route_since: Option<Instant>,
    pub unreachable_reported: bool,
    pub last_ack_progress: Instant,
}

impl PeerSession {
    pub fn new(peer: RankId, now: Instant) -> PeerSession {
        PeerSession {
            peer,
            incarnation: None,
            next_seq: 0,
            queue: VecDeque::new(),
            queued_messages: 0,
            unacked: BTreeMap::new(),
            cum_acked: 0,
            retransmit: BTreeSet::new(),
            next_expected: 0,
            reorder: BTreeMap::new(),
            assembling: None,
            frames_since_ack: 0,
            bytes_since_ack: 0,
            ack_due: None,
            ack_link: None,
            ever_connected: false,
            expected: false,
            no_route_since: None,
            unreachable_reported: false,
            last_ack_progress: now,
        }
    }

    /// Messages not yet fully acknowledged (queued or in flight), counting partly sent ones.
    pub fn undelivered_messages(&self) -> u64 {
        let in_flight_msgs =
            self.unacked.values().filter(|s| s.frame.header.flags.contains(FrameFlags::LAST)).count() as u64;
        self.queued_messages + in_flight_msgs
    }

    pub fn enqueue(&mut self, channel: ChannelId, payload: impl Into<Payload>) {
        self.queue.push_back(Outgoing { channel, payload: payload.into(), offset: 0, part: 0, in_part: 0 });
        self.queued_messages += 1;
    }

    /// Whether a new (never sent) frame may be framed now under the session window.
    pub fn can_frame_new(&self, window_frames: u64) -> bool {
        !self.queue.is_empty() && self.next_seq - self.cum_acked < window_frames
    }

    pub fn has_send_work(&self, window_frames: u64) -> bool {
        !self.retransmit.is_empty() || self.can_frame_new(window_frames)
    }

    /// Size of the next frame this session would send (for path window checks).
    pub fn next_frame_len(&self, chunk: usize) -> Option<usize> {
        if let Some(sent) = self.retransmit.iter().find_map(|seq| self.unacked.get(seq)) {
            return Some(sent.frame.wire_len());
        }
        self.queue.front().map(|m| crate::frame::HEADER_LEN + m.next_len(chunk))
    }

    /// Takes the next frame to send: a retransmission first, else a new chunk. Records it as
    /// unacknowledged with transmission id `tx`. Returns the frame and whether it is a
    /// retransmission.
    pub fn take_frame(
        &mut self,
        local: RankId,
        epoch: Epoch,
        chunk: usize,
        window_frames: u64,
        tx: u64,
    ) -> Option<(Frame, bool)> {
        while let Some(seq) = self.retransmit.pop_first() {
            if let Some(sent) = self.unacked.get_mut(&seq) {
                sent.last_tx = tx;
                let mut frame = sent.frame.clone();
                frame.header.epoch = epoch;
                return Some((frame, true));
            }
        }
        if !self.can_frame_new(window_frames) {
            return None;
        }
        let msg = self.queue.front_mut()?;
        let total = msg.payload.len();
        let start = msg.offset;
        let (piece, payload_crc) = msg.take(chunk);
        let end = msg.offset;
        let mut flags = FrameFlags::default();
        if start == 0 {
            flags = flags.with(FrameFlags::FIRST);
        }
        if end == total {
            flags = flags.with(FrameFlags::LAST);
        }
        let frame = Frame {
            header: Header {
                kind: FrameKind::Data,
                flags,
                epoch,
                src: local,
                dst: self.peer,
                channel: msg.channel,
                seq: self.next_seq,
                aux: total as u64,
            },
            payload: piece,
            payload_crc,
            message: None,
        };
        if end == total {
            self.queue.pop_front();
            self.queued_messages -= 1;
        }
        self.unacked.insert(self.next_seq, Sent { frame: frame.clone(), last_tx: tx });
        self.next_seq += 1;
        Some((frame, false))
    }

    /// Applies an acknowledgement. Returns whether anything new was acknowledged.
    pub fn on_ack(&mut self, cumulative: u64, sack: &[(u64, u64)], now: Instant) -> bool {
        let cumulative = cumulative.min(self.next_seq);
        let before = self.unacked.len();
        if cumulative > self.cum_acked {
            self.cum_acked = cumulative;
            self.unacked = self.unacked.split_off(&cumulative);
        }
        for &(start, end) in sack {
            let end = end.min(self.next_seq);
            if start >= end {
                continue;
            }
            let acked: Vec<u64> = self.unacked.range(start..end).map(|(s, _)| *s).collect();
            for s in acked {
                self.unacked.remove(&s);
            }
        }
        let progressed = self.unacked.len() < before;
        if progressed {
            self.last_ack_progress = now;
            // A frame queued for retransmission may have arrived after all (its link died
            // after delivering it): never resend what is acknowledged.
            let unacked = &self.unacked;
            self.retransmit.retain(|seq| unacked.contains_key(seq));
        }
        progressed
    }

    pub fn is_acked(&self, seq: u64) -> bool {
        !self.unacked.contains_key(&seq)
    }

    /// Whether a data frame with this sequence number is new. Returns `None` for a duplicate,
    /// `Some(in_order)` otherwise (`false` when it is beyond the reorder window: dropped).
    pub fn classify_incoming(&self, seq: u64, window_frames: u64) -> Incoming {
        if seq < self.next_expected || self.reorder.contains_key(&seq) {
            Incoming::Duplicate
        } else if seq >= self.next_expected + window_frames {
            Incoming::BeyondWindow
        } else if seq == self.next_expected {
            Incoming::InOrder
        } else {
            Incoming::OutOfOrder
        }
    }

    /// Stores an accepted data frame and returns the messages it completes, in order.
    pub fn accept(&mut self, frame: Frame, max_message_bytes: u64) -> (Vec<Message>, Vec<StreamViolation>) {
        self.reorder.insert(frame.header.seq, frame);
        let mut delivered = Vec::new();
        let mut violations = Vec::new();
        while let Some(frame) = self.reorder.remove(&self.next_expected) {
            self.next_expected += 1;
            match self.assemble(frame, max_message_bytes) {
                Ok(Some(m)) => delivered.push(m),
                Ok(None) => {}
                Err(v) => violations.push(v),
            }
        }
        (delivered, violations)
    }

    fn assemble(&mut self, frame: Frame, max_message_bytes: u64) -> Result<Option<Message>, StreamViolation> {
        let h = frame.header;
        if h.flags.contains(FrameFlags::FIRST) {
            if self.assembling.take().is_some() {
                return Err(StreamViolation::BadChunk);
            }
            if h.aux > max_message_bytes {
                return Err(StreamViolation::MessageTooLarge);
            }
            let total = h.aux as usize;
            if h.flags.contains(FrameFlags::LAST) {
                if frame.payload.len() != total {
                    return Err(StreamViolation::BadChunk);
                }
                let mut payload = Payload::new();
                payload.push_verified(frame.payload, frame.payload_crc);
                return Ok(Some(Message { from: h.src, channel: h.channel, payload }));
            }
            if frame.payload.len() >= total {
                return Err(StreamViolation::BadChunk);
            }
            let crc = known_crc(&frame);
            let mut buf = Payload::new();
            buf.push_verified(frame.payload, frame.payload_crc);
            self.assembling = Some(Assembly { channel: h.channel, total, buf, crc });
            return Ok(None);
        }
        let Some(asm) = self.assembling.as_mut() else {
            return Err(StreamViolation::BadChunk);
        };
        if asm.channel != h.channel || asm.buf.len() + frame.payload.len() > asm.total {
            self.assembling = None;
            return Err(StreamViolation::BadChunk);
        }
        asm.crc = match (asm.crc, known_crc(&frame)) {
            (Some(a), Some(b)) => Some(crate::checksum::crc32c_combine(a, b, frame.payload.len())),
            _ => None,
        };
        asm.buf.push_verified(frame.payload, frame.payload_crc);
        if h.flags.contains(FrameFlags::LAST) {
            let asm = self.assembling.take().expect("present");
            if asm.buf.len() != asm.total {
                return Err(StreamViolation::BadChunk);
            }
            // The link read the whole message into one buffer: deliver that buffer (the same
            // memory as the frames, so the application need not join them), with the checksum
            // of the whole when every frame's was known.
            let payload = match frame.message {
                Some(whole) if asm.buf.is_laid_out_in(&whole) => {
                    let mut p = Payload::new();
                    p.push_verified(whole, asm.crc);
                    p
                }
                _ => asm.buf,
            };
            return Ok(Some(Message { from: h.src, channel: asm.channel, payload }));
        }
        Ok(None)
    }

    /// The cumulative ack, up to `max` selective ranges of what is held beyond it, and the
    /// sequence number below which the ack is complete (`u64::MAX` unless ranges were cut off).
    pub fn ack_state(&self, max: usize) -> (u64, Vec<(u64, u64)>, u64) {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut complete_below = u64::MAX;
        for &seq in self.reorder.keys() {
            match ranges.last_mut() {
                Some(last) if last.1 == seq => last.1 = seq + 1,
                _ => {
                    if ranges.len() == max {
                        complete_below = ranges.last().map_or(self.next_expected, |r| r.1);
                        break;
                    }
                    ranges.push((seq, seq + 1));
                }
            }
        }
        (self.next_expected, ranges, complete_below)
    }

    /// Drops all send state (the peer is gone or restarted). Returns the undelivered count.
    pub fn reset_send(&mut self) -> u64 {
        let n = self.undelivered_messages();
        self.queue.clear();
        self.queued_messages = 0;
        self.unacked.clear();
        self.retransmit.clear();
        self.next_seq = 0;
        self.cum_acked = 0;
        n
    }

    /// Drops all receive state (the peer restarted and numbers from zero again).
    pub fn reset_receive(&mut self) {
        self.next_expected = 0;
        self.reorder.clear();
        self.assembling = None;
        self.frames_since_ack = 0;
        self.bytes_since_ack = 0;
        self.ack_due = None;
        self.ack_link = None;
    }

    pub fn has_unacked(&self) -> bool {
        !self.unacked.is_empty()
    }

    pub fn check_invariants(&self, window_frames: u64) {
        debug_assert!(
            self.retransmit.iter().all(|s| self.unacked.contains_key(s)),
            "acknowledged frame queued for resend"
        );
        debug_assert!(self.cum_acked <= self.next_seq);
        debug_assert!(self.unacked.keys().all(|&s| s >= self.cum_acked && s < self.next_seq));
        debug_assert!(self.reorder.keys().all(|&s| s > self.next_expected && s < self.next_expected + window_frames));
    }
}

/// How an arriving data frame relates to what was already received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    InOrder,
    OutOfOrder,
    Duplicate,
    BeyondWindow,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(s: &mut PeerSession, tx: &mut u64) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some((f, _)) = s.take_frame(RankId(0), Epoch(1), 4, 1000, *tx) {
            *tx += 1;
            out.push(f);
        }
        out
    }

    #[test]
    fn chunks_of_one_message_get_consecutive_sequence_numbers_and_reassemble() {
        let mut a = PeerSession::new(RankId(1), Instant(0));
        let mut b = PeerSession::new(RankId(0), Instant(0));
        a.enqueue(ChannelId(5), Bytes::from_static(b"0123456789"));
        a.enqueue(ChannelId(6), Bytes::new());
        let mut tx = 0;
        let frames = drain(&mut a, &mut tx);
        assert_eq!(frames.len(), 4);
        assert_eq!(frames.iter().map(|f| f.header.seq).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        // Deliver out of order: nothing until the gap closes, then both messages in order.
        let mut got = Vec::new();
        for i in [2, 1, 3, 0] {
            assert_ne!(b.classify_incoming(frames[i].header.seq, 8), Incoming::Duplicate);
            got.extend(b.accept(frames[i].clone(), 1 << 20).0);
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].payload, b"0123456789"[..]);
        assert_eq!(got[0].channel, ChannelId(5));
        assert!(got[1].payload.is_empty());
        assert_eq!(b.classify_incoming(1, 8), Incoming::Duplicate);
    }

    #[test]
    fn a_message_of_several_parts_is_framed_part_by_part_and_arrives_as_the_same_bytes() {
        let mut a = PeerSession::new(RankId(1), Instant(0));
        let mut b = PeerSession::new(RankId(0), Instant(0));
        let mut m = Payload::new();
        for part in [&b"hdr"[..], &b"0123456789"[..], &b""[..], &b"xy"[..]] {
            m.push(Bytes::copy_from_slice(part));
        }
        a.enqueue(ChannelId(3), m);
        let mut tx = 0;
        let frames = drain(&mut a, &mut tx);
        // Chunks of 4 bytes (see `drain`), never across a part: "hdr", "0123", "4567", "89", "xy".
        let pieces: Vec<&[u8]> = frames.iter().map(|f| &f.payload[..]).collect();
        assert_eq!(pieces, vec![&b"hdr"[..], b"0123", b"4567", b"89", b"xy"]);
        assert!(frames[0].header.flags.contains(FrameFlags::FIRST));
        assert!(frames[4].header.flags.contains(FrameFlags::LAST));
        assert!(frames.iter().all(|f| f.header.aux == 15), "every frame names the message's length");
        let got: Vec<Message> = frames.into_iter().flat_map(|f| b.accept(f, 1 << 20).0).collect();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].payload, b"hdr0123456789xy"[..]);
    }

    #[test]
    fn a_message_read_into_one_buffer_is_delivered_as_that_buffer_only_if_its_frames_are_its_slices() {
        let mut a = PeerSession::new(RankId(1), Instant(0));
        a.enqueue(ChannelId(3), Bytes::from((0..10u8).collect::<Vec<u8>>()));
        let frames = drain(&mut a, &mut 0);
        assert_eq!(frames.len(), 3, "4 + 4 + 2 bytes");
        // What a link reader does: one buffer, each frame's payload a slice of it, the whole on
        // the last frame.
        let whole = Bytes::from(frames.iter().flat_map(|f| f.payload.to_vec()).collect::<Vec<u8>>());
        let laid_out = |frames: &[Frame], whole: &Bytes| -> Vec<Frame> {
            let mut at = 0;
            let n = frames.len();
            frames
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let mut f = f.clone();
                    f.payload = whole.slice(at..at + f.payload.len());
                    at += f.payload.len();
                    f.message = (i == n - 1).then(|| whole.clone());
                    f
                })
                .collect()
        };
        let mut b = PeerSession::new(RankId(0), Instant(0));
        let got: Vec<Message> = laid_out(&frames, &whole).into_iter().flat_map(|f| b.accept(f, 1 << 20).0).collect();
        assert_eq!(got[0].payload.chunks().len(), 1, "delivered as the one buffer");
        assert_eq!(got[0].payload.chunks()[0].as_ptr(), whole.as_ptr());
        assert_eq!(got[0].payload, (0..10u8).collect::<Vec<u8>>()[..]);
        // A frame that came from elsewhere (a copy on another path): the frames are delivered,
        // and a `message` that claims other bytes is never believed.
        let mut mixed = laid_out(&frames, &whole);
        mixed[1].payload = Bytes::copy_from_slice(&mixed[1].payload);
        let mut liar = laid_out(&frames, &whole);
        liar[2].message = Some(Bytes::from(vec![9u8; 10]));
        for frames in [mixed, liar] {
            let mut b = PeerSession::new(RankId(0), Instant(0));
            let got: Vec<Message> = frames.into_iter().flat_map(|f| b.accept(f, 1 << 20).0).collect();
            assert_eq!(got[0].payload.chunks().len(), 3, "the frames themselves");
            assert_eq!(got[0].payload, (0..10u8).collect::<Vec<u8>>()[..]);
        }
    }

    /// The checksums a link verified go up with the message: per frame, or combined for a
    /// message delivered as one buffer; a large frame without one leaves the whole without.
    #[test]
    fn a_delivered_message_carries_the_checksums_its_link_verified() {
        use crate::checksum::crc32c;
        let body: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + i / 300) as u8).collect();
        let mut a = PeerSession::new(RankId(1), Instant(0));
        a.enqueue(ChannelId(3), Bytes::from(body.clone()));
        a.enqueue(ChannelId(3), Bytes::from_static(b"single"));
        let mut frames = Vec::new();
        let mut tx = 0;
        while let Some((f, _)) = a.take_frame(RankId(0), Epoch(1), 8192, 1000, tx) {
            tx += 1;
            frames.push(f);
        }
        assert_eq!(frames.len(), 4, "8192 + 8192 + 3616 bytes, then one frame");
        let whole = Bytes::from(body.clone());
        // As a link reader leaves them: slices of one buffer, each with its verified checksum
        // (`verified`), or the large ones without (`!verified`).
        for verified in [true, false] {
            let mut at = 0;
            let mut b = PeerSession::new(RankId(0), Instant(0));
            let mut got = Vec::new();
            for (i, f) in frames.iter().enumerate() {
                let mut f = f.clone();
                if i < 3 {
                    f.payload = whole.slice(at..at + f.payload.len());
                    at += f.payload.len();
                    f.message = (i == 2).then(|| whole.clone());
                }
                f.payload_crc = verified.then(|| crc32c(&f.payload));
                got.extend(b.accept(f, 1 << 20).0);
            }
            assert_eq!(got.len(), 2);
            assert_eq!(got[0].payload.chunks().len(), 1, "one buffer");
            assert_eq!(got[0].payload, body[..]);
            assert_eq!(got[0].payload.chunk_crc(0), verified.then(|| crc32c(&body)));
            assert_eq!(got[1].payload.chunk_crc(0), verified.then(|| crc32c(b"single")));
        }
        // A small header part (decoded whole: no checksum from the link) and a large data part
        // read into one buffer: the header part is checksummed as it starts the message.
        let mut a = PeerSession::new(RankId(1), Instant(0));
        let mut parts = Payload::new();
        parts.push(Bytes::from_static(b"a twenty-byte header"));
        parts.push(Bytes::from(body.clone()));
        a.enqueue(ChannelId(3), parts);
        let (head, data) =
            (a.take_frame(RankId(0), Epoch(1), 1 << 20, 1000, 0), a.take_frame(RankId(0), Epoch(1), 1 << 20, 1000, 1));
        let (mut head, mut data) = (head.expect("header part").0, data.expect("data part").0);
        let joined: Vec<u8> = head.payload.iter().chain(data.payload.iter()).copied().collect();
        let joined = Bytes::from(joined);
        head.payload = joined.slice(..20);
        (data.payload, data.message) = (joined.slice(20..), Some(joined.clone()));
        data.payload_crc = Some(crc32c(&data.payload));
        let mut b = PeerSession::new(RankId(0), Instant(0));
        assert!(b.accept(head, 1 << 20).0.is_empty());
        let got = b.accept(data, 1 << 20).0;
        assert_eq!(got[0].payload.chunks().len(), 1);
        assert_eq!(got[0].payload.chunk_crc(0), Some(crc32c(&joined)));
        // Delivered as its frames (not read into one buffer): each keeps its own.
        let mut b = PeerSession::new(RankId(0), Instant(0));
        let got: Vec<Message> = frames
            .iter()
            .map(|f| Frame { payload_crc: Some(crc32c(&f.payload)), ..f.clone() })
            .flat_map(|f| b.accept(f, 1 << 20).0)
            .collect();
        assert_eq!(got[0].payload.chunks().len(), 3);
        for (i, c) in got[0].payload.chunks().iter().enumerate() {
            assert_eq!(got[0].payload.chunk_crc(i), Some(crc32c(c)));
        }
    }

    #[test]
    fn selective_acks_clear_exactly_the_acknowledged_frames() {
        let mut a = PeerSession::new(RankId(1), Instant(0));
        a.enqueue(ChannelId(0), Bytes::from(vec![7u8; 40]));
        let mut tx = 0;
        assert_eq!(drain(&mut a, &mut tx).len(), 10);
        assert!(a.on_ack(2, &[(4, 6), (8, 20)], Instant(5)));
        assert_eq!(a.unacked.keys().copied().collect::<Vec<_>>(), vec![2, 3, 6, 7]);
        assert!(!a.on_ack(1, &[], Instant(6)), "an older cumulative ack changes nothing");
        assert_eq!(a.undelivered_messages(), 0, "the LAST chunk (seq 9) was acknowledged");
    }

    #[test]
    fn a_frame_queued_for_resend_that_is_then_acknowledged_leaves_the_queue() {
        // Its link died after delivering it: the sender queued it again, then the ack came.
        let mut a = PeerSession::new(RankId(1), Instant(0));
        a.enqueue(ChannelId(0), Bytes::from(vec![1u8; 12]));
        let mut tx = 0;
        let frames = drain(&mut a, &mut tx);
        assert_eq!(frames.len(), 3);
        a.retransmit.extend([0, 1]);
        assert!(a.on_ack(1, &[], Instant(9)));
        assert_eq!(a.retransmit.iter().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(a.next_frame_len(4), Some(frames[1].wire_len()));
        let (f, resent) = a.take_frame(RankId(0), Epoch(1), 4, 1000, tx).unwrap();
        assert!(resent);
        assert_eq!(f.header.seq, 1);
    }

    #[test]
    fn ack_state_merges_held_frames_into_ranges() {
        let mut b = PeerSession::new(RankId(0), Instant(0));
        let mut a = PeerSession::new(RankId(1), Instant(0));
        a.enqueue(ChannelId(0), Bytes::from(vec![1u8; 40]));
        let mut tx = 0;
        let frames = drain(&mut a, &mut tx);
        for i in [2usize, 3, 5, 8] {
            b.accept(frames[i].clone(), 1 << 20);
        }
        assert_eq!(b.ack_state(8), (0, vec![(2, 4), (5, 6), (8, 9)], u64::MAX));
        assert_eq!(b.ack_state(1), (0, vec![(2, 4)], 4));
    }

    #[test]
    fn a_chunk_without_a_first_chunk_is_a_violation_not_a_panic() {
        let mut b = PeerSession::new(RankId(0), Instant(0));
        let frame = Frame {
            header: Header {
                kind: FrameKind::Data,
                flags: FrameFlags::LAST,
                epoch: Epoch(0),
                src: RankId(1),
                dst: RankId(0),
                channel: ChannelId(0),
                seq: 0,
                aux: 3,
            },
            payload: Bytes::from_static(b"abc"),
            payload_crc: None,
            message: None,
        };
        let (msgs, violations) = b.accept(frame, 1 << 20);
        assert!(msgs.is_empty());
        assert_eq!(violations, vec![StreamViolation::BadChunk]);
    }
}
