//! The wire format: a fixed 52-byte header followed by a payload.
//!
//! ```text
//! offset size field
//!  0     4    magic        b"PHLX"
//!  4     1    version      1
//!  5     1    kind         FrameKind
//!  6     2    flags        FrameFlags bits
//!  8     8    epoch        sender's membership epoch
//! 16     4    src          originating rank
//! 20     4    dst          final destination rank (differs from the link's peer when relayed)
//! 24     4    channel      logical channel / tag
//! 28     8    seq          Data: session sequence number; Ack: cumulative ack (next expected)
//! 36     8    aux          Data: total message length; Ack: seq below which the ack is
//!                           complete; Heartbeat(Ack): timestamp
//! 44     4    payload_len  bytes that follow the header
//! 48     4    crc32c       CRC32C of bytes 0..48 followed by the payload
//! ```
//!
//! All integers are little-endian. The decoder is incremental and sans-IO: feed it a
//! [`BytesMut`] that the driver fills from a socket and it splits complete frames off the front
//! without copying their payloads.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::checksum::Crc32c;
use crate::ids::{ChannelId, Epoch, RankId};

/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 52;
/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"PHLX";
/// The only wire version this build speaks.
pub const VERSION: u8 = 1;

/// What a frame is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// A chunk of an application message, sequenced and acknowledged end to end.
    Data = 1,
    /// Acknowledges data: cumulative in `seq`, selective ranges in the payload.
    Ack = 2,
    /// Link liveness probe; payload lists the ranks the sender reaches directly.
    Heartbeat = 3,
    /// Echo of a heartbeat's timestamp, for RTT.
    HeartbeatAck = 4,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<FrameKind> {
        match v {
            1 => Some(FrameKind::Data),
            2 => Some(FrameKind::Ack),
            3 => Some(FrameKind::Heartbeat),
            4 => Some(FrameKind::HeartbeatAck),
            _ => None,
        }
    }
}

/// Bit flags of a frame header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FrameFlags(pub u16);

impl FrameFlags {
    /// First chunk of a message.
    pub const FIRST: FrameFlags = FrameFlags(1);
    /// Last chunk of a message.
    pub const LAST: FrameFlags = FrameFlags(1 << 1);
    /// Forwarded by a relay rank; a relay never forwards a frame that has this set.
    pub const RELAYED: FrameFlags = FrameFlags(1 << 2);
    /// On an ack: a frame arrived corrupted on the link this ack travels on. Links are FIFO,
    /// so the sender's oldest unacknowledged frame on that link is the one lost.
    pub const LOSS_HINT: FrameFlags = FrameFlags(1 << 3);
    /// Every flag this version knows; others are rejected by the decoder.
    pub const KNOWN: u16 = 0b1111;

    /// Whether all bits of `other` are set.
    pub fn contains(self, other: FrameFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// `self` with the bits of `other` set.
    pub fn with(self, other: FrameFlags) -> FrameFlags {
        FrameFlags(self.0 | other.0)
    }
}

/// The decoded header fields (magic, version, length and checksum are implied).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    /// What the frame is for.
    pub kind: FrameKind,
    /// Flag bits.
    pub flags: FrameFlags,
    /// Sender's epoch.
    pub epoch: Epoch,
    /// Originating rank.
    pub src: RankId,
    /// Final destination rank.
    pub dst: RankId,
    /// Logical channel.
    pub channel: ChannelId,
    /// Sequence number (Data) or cumulative ack (Ack).
    pub seq: u64,
    /// Kind-specific value (message length, timestamp).
    pub aux: u64,
}

/// Payloads from this size on are checksummed with [`Frame::payload_crc`] when it is given.
/// Below it a sender's payload is still in cache when it is framed, and reading it again costs
/// about what the sender's checksum did (a combine costs ~0.05 µs since 2026-12-01; with
/// `crc-fast`'s 5-8 µs it had made 4 KiB frames slower); a megabyte the cache has lost costs
/// ~90 µs to read again.
pub const PRECOMPUTED_CRC_MIN: usize = 256 << 10;

/// A frame: header plus payload. Cloning is cheap (the payload is reference counted).
/// Equality compares header and payload (not `payload_crc` or `message`, which only save work).
#[derive(Clone, Debug)]
pub struct Frame {
    /// Header fields.
    pub header: Header,
    /// Payload bytes.
    pub payload: Bytes,
    /// CRC32C of `payload` if the sender already has it (see [`crate::Payload::push_checked`]):
    /// [`Frame::encode_header`] then checksums the header alone and combines the two (for
    /// payloads of at least [`PRECOMPUTED_CRC_MIN`]). A receiving link sets it for the large
    /// frames it verified piece by piece ([`FrameVerifier::finish`]), and the session hands it
    /// on with the message ([`crate::Payload::chunk_crc`]); frames decoded whole
    /// ([`FrameDecoder::decode`]) have `None`. Whoever changes `payload` must reset it.
    pub payload_crc: Option<u32>,
    /// On the last data frame of a message: the whole message in one buffer, when the receiving
    /// link read every frame of it, in order, into that buffer (`payload` and the payloads of the
    /// message's earlier frames are then slices of it). The session delivers it instead of the
    /// frames' list only if the frames it assembled are exactly those slices (see
    /// [`crate::Payload::is_laid_out_in`]); it is never trusted for content. Senders set `None`.
    pub message: Option<Bytes>,
}

impl PartialEq for Frame {
    fn eq(&self, other: &Frame) -> bool {
        self.header == other.header && self.payload == other.payload
    }
}

impl Eq for Frame {}

impl Frame {
    /// Bytes this frame occupies on the wire.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Encodes the header for `payload`, checksum included. The payload itself is written
    /// separately (or appended by [`Frame::encode_to`]), so large payloads are never copied here.
    pub fn encode_header(&self) -> [u8; HEADER_LEN] {
        let h = &self.header;
        let mut out = [0u8; HEADER_LEN];
        let mut w = &mut out[..];
        w.put_slice(&MAGIC);
        w.put_u8(VERSION);
        w.put_u8(h.kind as u8);
        w.put_u16_le(h.flags.0);
        w.put_u64_le(h.epoch.0);
        w.put_u32_le(h.src.0);
        w.put_u32_le(h.dst.0);
        w.put_u32_le(h.channel.0);
        w.put_u64_le(h.seq);
        w.put_u64_le(h.aux);
        let len = u32::try_from(self.payload.len()).expect("payload length checked by sender");
        w.put_u32_le(len);
        let crc = match self.payload_crc {
            Some(payload) if self.payload.len() >= PRECOMPUTED_CRC_MIN => crate::checksum::crc32c_combine(
                crate::checksum::crc32c(&out[..HEADER_LEN - 4]),
                payload,
                self.payload.len(),
            ),
            _ => {
                let mut crc = Crc32c::new();
                crc.update(&out[..HEADER_LEN - 4]);
                crc.update(&self.payload);
                crc.finish()
            }
        };
        out[HEADER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Appends the whole encoded frame to `dst` (header and a copy of the payload).
    pub fn encode_to(&self, dst: &mut BytesMut) {
        dst.reserve(self.wire_len());
        dst.put_slice(&self.encode_header());
        dst.put_slice(&self.payload);
    }

    /// The encoded frame as one buffer (copies the payload; for tests and small frames).
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.wire_len());
        self.encode_to(&mut b);
        b.freeze()
    }
}

/// Why bytes could not be decoded into a frame.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The stream does not start with `PHLX`: it is not ours or lost framing. Fatal for the link.
    #[error("bad magic {found:02x?}: not a Phalanx frame or the stream lost framing")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// A peer speaks another wire version. Fatal for the link.
    #[error("unsupported wire version {found} (this build speaks {VERSION})")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// Unknown frame kind. Fatal for the link.
    #[error("unknown frame kind {found}")]
    UnknownKind {
        /// The kind byte found.
        found: u8,
    },
    /// Unknown flag bits. Fatal for the link.
    #[error("unknown flag bits {found:#06x}")]
    UnknownFlags {
        /// The flag word found.
        found: u16,
    },
    /// The declared payload is larger than the configured maximum. Fatal for the link; nothing
    /// is allocated for it.
    #[error("declared payload of {len} bytes exceeds the maximum of {max}")]
    Oversized {
        /// Declared payload length.
        len: u32,
        /// Configured maximum.
        max: u32,
    },
    /// The frame arrived whole but its checksum does not match: the frame is dropped, framing
    /// is kept, and the link is charged with a checksum failure. Recoverable.
    #[error("checksum mismatch (expected {expected:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Checksum carried by the frame.
        expected: u32,
        /// Checksum of the bytes received.
        computed: u32,
    },
}

impl DecodeError {
    /// Whether decoding can continue on the same stream after this error.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, DecodeError::Checksum { .. })
    }
}

/// Incremental frame decoder. Holds no buffer of its own: the driver owns the [`BytesMut`].
///
/// Promise: for any input, [`FrameDecoder::decode`] returns a frame, `None` (needs more bytes)
/// or a typed error, never panics, and never asks for more than `HEADER_LEN + max_payload`
/// bytes ([`FrameDecoder::bytes_needed`]).
#[derive(Clone, Copy, Debug)]
pub struct FrameDecoder {
    max_payload: u32,
}

impl FrameDecoder {
    /// A decoder that rejects payloads larger than `max_payload` bytes.
    pub fn new(max_payload: u32) -> FrameDecoder {
        FrameDecoder { max_payload }
    }

    /// Largest payload accepted.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// How many bytes `buf` must hold before the next frame can be decoded (at least one more
    /// than now when it is incomplete). Bounded by `HEADER_LEN + max_payload`.
    pub fn bytes_needed(&self, buf: &[u8]) -> usize {
        if buf.len() < HEADER_LEN {
            return HEADER_LEN;
        }
        let len = u32::from_le_bytes([buf[44], buf[45], buf[46], buf[47]]).min(self.max_payload);
        HEADER_LEN + len as usize
    }

    /// Parses and checks a frame header (the first [`HEADER_LEN`] bytes of `header`).
    /// Returns the header, the payload length and the checksum it carries. Fatal errors only:
    /// the checksum is checked by [`FrameDecoder::verify`] once the payload is there (or by a
    /// [`FrameVerifier`] fed as it arrives).
    pub fn decode_header(&self, header: &[u8]) -> Result<(Header, u32, u32), DecodeError> {
        assert!(header.len() >= HEADER_LEN, "decode_header needs a whole header");
        let mut h = &header[..HEADER_LEN];
        let mut magic = [0u8; 4];
        h.copy_to_slice(&mut magic);
        if magic != MAGIC {
            return Err(DecodeError::BadMagic { found: magic });
        }
        let version = h.get_u8();
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion { found: version });
        }
        let kind_byte = h.get_u8();
        let kind = FrameKind::from_u8(kind_byte).ok_or(DecodeError::UnknownKind { found: kind_byte })?;
        let flags = h.get_u16_le();
        if flags & !FrameFlags::KNOWN != 0 {
            return Err(DecodeError::UnknownFlags { found: flags });
        }
        let header_fields = Header {
            kind,
            flags: FrameFlags(flags),
            epoch: Epoch(h.get_u64_le()),
            src: RankId(h.get_u32_le()),
            dst: RankId(h.get_u32_le()),
            channel: ChannelId(h.get_u32_le()),
            seq: h.get_u64_le(),
            aux: h.get_u64_le(),
        };
        let len = h.get_u32_le();
        let crc = h.get_u32_le();
        if len > self.max_payload {
            return Err(DecodeError::Oversized { len, max: self.max_payload });
        }
        Ok((header_fields, len, crc))
    }

    /// Checks a frame's checksum over its header bytes and payload (recoverable error).
    /// One pass over both, as a frame decoded whole is (see [`FrameVerifier`] for a payload
    /// that arrives in pieces).
    pub fn verify(header: &[u8], payload: &[u8], expected: u32) -> Result<(), DecodeError> {
        let mut crc = Crc32c::new();
        crc.update(&header[..HEADER_LEN - 4]);
        crc.update(payload);
        let computed = crc.finish();
        if computed != expected {
            return Err(DecodeError::Checksum { expected, computed });
        }
        Ok(())
    }

    /// Splits one complete frame off the front of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` holds only part of a frame. On a recoverable error the bad
    /// frame has been consumed; on a fatal error `buf` is left as it was.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        if buf.len() < HEADER_LEN {
            // Reject garbage as early as possible, before waiting for a whole header.
            let n = buf.len().min(4);
            if buf[..n] != MAGIC[..n] {
                let mut found = [0u8; 4];
                found[..n].copy_from_slice(&buf[..n]);
                return Err(DecodeError::BadMagic { found });
            }
            return Ok(None);
        }
        let (header, len, expected) = self.decode_header(buf)?;
        let total = HEADER_LEN + len as usize;
        if buf.len() < total {
            return Ok(None);
        }
        let mut whole = buf.split_to(total);
        Self::verify(&whole[..HEADER_LEN], &whole[HEADER_LEN..], expected)?;
        let payload = whole.split_off(HEADER_LEN).freeze();
        Ok(Some(Frame { header, payload, payload_crc: None, message: None }))
    }
}

/// Encodes selective-ack ranges (`[start, end)` pairs) as an ack payload.
pub fn encode_sack(ranges: &[(u64, u64)]) -> Bytes {
    let mut b = BytesMut::with_capacity(ranges.len() * 16);
    for &(s, e) in ranges {
        b.put_u64_le(s);
        b.put_u64_le(e);
    }
    b.freeze()
}

/// Decodes an ack payload into ranges, ignoring a trailing partial range and any range that is
/// empty or inverted (a malformed ack never panics, it just acknowledges less).
pub fn decode_sack(mut payload: &[u8], max_ranges: usize) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    while payload.len() >= 16 && out.len() < max_ranges {
        let s = payload.get_u64_le();
        let e = payload.get_u64_le();
        if s < e {
            out.push((s, e));
        }
    }
    out
}

/// Encodes a list of ranks (heartbeat reachability list).
pub fn encode_ranks(ranks: impl IntoIterator<Item = RankId>) -> Bytes {
    let mut b = BytesMut::new();
    for r in ranks {
        b.put_u32_le(r.0);
    }
    b.freeze()
}

/// Decodes a list of ranks, ignoring a trailing partial entry and keeping at most `max`.
pub fn decode_ranks(mut payload: &[u8], max: usize) -> Vec<RankId> {
    let mut out = Vec::new();
    while payload.len() >= 4 && out.len() < max {
        out.push(RankId(payload.get_u32_le()));
    }
    out
}

/// A frame's checksum taken piece by piece as its payload arrives, so that a reader can check
/// each piece right after the socket wrote it, while it is still in the cache, instead of
/// reading the whole payload again once it is complete (see `phalanx_net`'s link reader).
pub struct FrameVerifier {
    /// CRC32C of the header's covered bytes.
    header: u32,
    /// CRC32C of the payload fed so far, and its length.
    payload: Crc32c,
    len: usize,
}

impl FrameVerifier {
    /// Starts with the frame's encoded header (`HEADER_LEN` bytes; its checksum field is not
    /// covered). Panics if `header` is shorter than `HEADER_LEN - 4` (a caller's bug: readers
    /// pass the header they decoded).
    pub fn new(header: &[u8]) -> FrameVerifier {
        FrameVerifier { header: crate::checksum::crc32c(&header[..HEADER_LEN - 4]), payload: Crc32c::new(), len: 0 }
    }

    /// Feeds the next bytes of the payload.
    pub fn update(&mut self, payload: &[u8]) {
        self.payload.update(payload);
        self.len += payload.len();
    }

    /// Whether header and payload fed so far match `expected` (the header's checksum field);
    /// [`DecodeError::Checksum`], a recoverable error, if not. On a match, the CRC32C of the
    /// payload alone, which a receiver may hand on with the payload (see
    /// [`Frame::payload_crc`]) so that whoever sends the bytes on need not read them again.
    pub fn finish(&self, expected: u32) -> Result<u32, DecodeError> {
        let payload = self.payload.finish();
        let computed = crate::checksum::crc32c_combine(self.header, payload, self.len);
        if computed != expected {
            return Err(DecodeError::Checksum { expected, computed });
        }
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(kind: FrameKind, payload: &[u8]) -> Frame {
        Frame {
            header: Header {
                kind,
                flags: FrameFlags::FIRST.with(FrameFlags::LAST),
                epoch: Epoch(7),
                src: RankId(1),
                dst: RankId(2),
                channel: ChannelId(3),
                seq: 42,
                aux: payload.len() as u64,
            },
            payload: Bytes::copy_from_slice(payload),
            payload_crc: None,
            message: None,
        }
    }

    #[test]
    fn header_layout_is_little_endian_at_documented_offsets() {
        let f = sample(FrameKind::Data, b"hello");
        let b = f.to_bytes();
        assert_eq!(&b[0..4], b"PHLX");
        assert_eq!(b[4], 1);
        assert_eq!(b[5], 1);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 7);
        assert_eq!(u64::from_le_bytes(b[28..36].try_into().unwrap()), 42);
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 5);
        // The checksum is CRC32C over the first 48 header bytes and then the payload.
        let mut whole = b[..48].to_vec();
        whole.extend_from_slice(b"hello");
        assert_eq!(u32::from_le_bytes(b[48..52].try_into().unwrap()), crc32c::crc32c(&whole));
        assert_eq!(&b[52..], b"hello");
    }

    #[test]
    fn flipped_payload_bit_is_a_recoverable_checksum_error_and_framing_survives() {
        let mut buf = BytesMut::new();
        sample(FrameKind::Data, b"first").encode_to(&mut buf);
        sample(FrameKind::Data, b"second").encode_to(&mut buf);
        buf[HEADER_LEN + 2] ^= 0x10;
        let d = FrameDecoder::new(1024);
        let err = d.decode(&mut buf).unwrap_err();
        assert!(err.is_recoverable(), "{err}");
        let next = d.decode(&mut buf).unwrap().unwrap();
        assert_eq!(&next.payload[..], b"second");
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_length_is_rejected_before_any_payload_arrives() {
        let f = sample(FrameKind::Data, &[0u8; 100]);
        let mut buf = BytesMut::from(&f.to_bytes()[..HEADER_LEN]);
        let d = FrameDecoder::new(99);
        assert_eq!(d.decode(&mut buf), Err(DecodeError::Oversized { len: 100, max: 99 }));
        assert_eq!(d.bytes_needed(&buf), HEADER_LEN + 99);
    }

    #[test]
    fn garbage_is_rejected_from_its_first_byte() {
        let d = FrameDecoder::new(16);
        let mut buf = BytesMut::from(&b"G"[..]);
        assert!(matches!(d.decode(&mut buf), Err(DecodeError::BadMagic { .. })));
        let mut buf = BytesMut::from(&b"PH"[..]);
        assert_eq!(d.decode(&mut buf), Ok(None));
    }

    #[test]
    fn sack_and_rank_lists_ignore_malformed_tails() {
        let enc = encode_sack(&[(1, 3), (9, 4), (10, 20)]);
        let mut bytes = enc.to_vec();
        bytes.push(0xff);
        assert_eq!(decode_sack(&bytes, 8), vec![(1, 3), (10, 20)]);
        assert_eq!(decode_sack(&bytes, 1), vec![(1, 3)]);
        let ranks = encode_ranks([RankId(4), RankId(9)]);
        assert_eq!(decode_ranks(&ranks[..7], 10), vec![RankId(4)]);
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        (
            1u8..=4,
            0u16..16,
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..2048),
        )
            .prop_map(|(k, flags, epoch, src, dst, ch, seq, aux, payload)| Frame {
                header: Header {
                    kind: FrameKind::from_u8(k).unwrap(),
                    flags: FrameFlags(flags),
                    epoch: Epoch(epoch),
                    src: RankId(src),
                    dst: RankId(dst),
                    channel: ChannelId(ch),
                    seq,
                    aux,
                },
                payload_crc: None,
                message: None,
                payload: Bytes::from(payload),
            })
    }

    #[test]
    fn a_precomputed_payload_checksum_gives_the_same_wire_bytes_and_a_wrong_one_is_caught() {
        for len in [100, PRECOMPUTED_CRC_MIN - 1, PRECOMPUTED_CRC_MIN, 1 << 20] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 13 + i / 7) as u8).collect();
            let plain = sample(FrameKind::Data, &payload);
            let checked = Frame { payload_crc: Some(crate::checksum::crc32c(&payload)), ..plain.clone() };
            assert_eq!(checked.to_bytes(), plain.to_bytes(), "{len} bytes");
            let d = FrameDecoder::new(2 << 20);
            let mut wire = BytesMut::from(&checked.to_bytes()[..]);
            assert_eq!(d.decode(&mut wire).unwrap(), Some(plain.clone()));
            // A wrong checksum is used as given (above the threshold), so the receiver refuses
            // the frame: it never passes corrupt bytes as intact.
            let wrong = Frame { payload_crc: Some(crate::checksum::crc32c(&payload) ^ 1), ..plain };
            let mut wire = BytesMut::from(&wrong.to_bytes()[..]);
            let r = d.decode(&mut wire);
            if len >= PRECOMPUTED_CRC_MIN {
                assert!(matches!(r, Err(DecodeError::Checksum { .. })), "{len} bytes: {r:?}");
            } else {
                assert!(r.is_ok(), "{len} bytes: recomputed below the threshold");
            }
        }
    }

    proptest! {
        #[test]
        fn a_payload_checked_piece_by_piece_passes_and_one_flipped_bit_fails(
            len in 0usize..5000,
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
            flip in any::<prop::sample::Index>(),
        ) {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 + i / 5) as u8).collect();
            let wire = sample(FrameKind::Data, &payload).to_bytes();
            let (head, body) = wire.split_at(HEADER_LEN);
            let expected = u32::from_le_bytes(head[HEADER_LEN - 4..].try_into().expect("4 bytes"));
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(len + 1)).collect();
            at.push(0);
            at.push(len);
            at.sort_unstable();
            let mut v = FrameVerifier::new(head);
            for w in at.windows(2) {
                v.update(&body[w[0]..w[1]]);
            }
            prop_assert_eq!(v.finish(expected), Ok(crate::checksum::crc32c(body)), "the payload's own checksum");
            prop_assert_eq!(FrameDecoder::verify(head, body, expected), Ok(()));
            if len > 0 {
                let mut bad = body.to_vec();
                bad[flip.index(len)] ^= 0x10;
                let mut v = FrameVerifier::new(head);
                v.update(&bad);
                prop_assert!(matches!(v.finish(expected), Err(DecodeError::Checksum { .. })), "corruption caught");
            }
        }

        #[test]
        fn encode_decode_round_trips_across_arbitrary_split_points(
            frames in proptest::collection::vec(arb_frame(), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut wire = BytesMut::new();
            for f in &frames { f.encode_to(&mut wire); }
            let wire = wire.freeze();
            let split = cut.index(wire.len() + 1);
            let d = FrameDecoder::new(4096);
            let mut buf = BytesMut::from(&wire[..split]);
            let mut out = Vec::new();
            while let Some(f) = d.decode(&mut buf).unwrap() { out.push(f); }
            buf.extend_from_slice(&wire[split..]);
            while let Some(f) = d.decode(&mut buf).unwrap() { out.push(f); }
            prop_assert_eq!(out, frames);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn arbitrary_bytes_yield_frames_or_typed_errors_within_bounds(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            max in 0u32..1024,
        ) {
            let d = FrameDecoder::new(max);
            let mut buf = BytesMut::from(&bytes[..]);
            loop {
                prop_assert!(d.bytes_needed(&buf) <= HEADER_LEN + max as usize);
                match d.decode(&mut buf) {
                    Ok(Some(f)) => prop_assert!(f.payload.len() <= max as usize),
                    Ok(None) => break,
                    Err(e) if e.is_recoverable() => continue,
                    Err(_) => break,
                }
            }
        }

        #[test]
        fn arbitrary_bytes_after_a_valid_header_prefix_never_panic(
            f in arb_frame(),
            noise in proptest::collection::vec(any::<u8>(), 0..256),
            at in any::<prop::sample::Index>(),
        ) {
            let mut wire = f.to_bytes().to_vec();
            let i = at.index(wire.len());
            for (k, b) in noise.iter().enumerate() {
                if i + k < wire.len() { wire[i + k] ^= b; }
            }
            let d = FrameDecoder::new(4096);
            let mut buf = BytesMut::from(&wire[..]);
            if let Ok(Some(g)) = d.decode(&mut buf) {
                prop_assert_eq!(g.to_bytes().len(), wire.len());
            }
        }
    }
}
