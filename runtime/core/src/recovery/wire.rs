//! What a recovering rank and its sources say to each other.
//!
//! Every message is `version u8 | kind u8 | body`, integers little endian, strings as
//! `len u16 | UTF-8 bytes`:
//!
//! | kind | message | body |
//! |---|---|---|
//! | 1 | [`ManifestRequest`] | `request u64` |
//! | 2 | [`Manifest`] | `request u64 \| step u64 \| count u32 \| count × (name str \| len u64)` |
//! | 3 | [`ChunkRequest`] | `step u64 \| buffer u32 \| offset u64 \| len u32` |
//! | 4 | [`Chunk`] | `step u64 \| buffer u32 \| offset u64 \| crc32c u32 \| len u32 \| data` |
//! | 5 | [`Refused`] | `buffer u32 \| offset u64 \| reason str` |
//!
//! Chunk requests and chunks carry the training step of the manifest they were planned from,
//! so a source whose state has moved on (or was never at that step) refuses instead of mixing
//! bytes of two steps into one recovered state.
//!
//! Decoding is total: any bytes give a message or a [`WireError`], never a panic, and never an
//! allocation larger than the input (a chunk's data is borrowed by [`decode_ref`], copied once
//! by [`Message::decode`]).

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Codec version, the first byte of every message.
pub const VERSION: u8 = 1;
/// Largest chunk a request may ask for and a chunk may carry (16 MiB).
pub const MAX_CHUNK: u32 = 16 << 20;
/// Longest buffer name a manifest carries, in bytes.
pub const MAX_NAME_BYTES: usize = 1024;
/// Longest refusal reason, in bytes (longer reasons are cut at a character boundary).
pub const MAX_REASON_BYTES: usize = 1024;
/// Bytes of a chunk's header: everything before its data.
pub const CHUNK_HEADER_BYTES: usize = 1 + 1 + 8 + 4 + 8 + 4 + 4;

const KIND_MANIFEST_REQUEST: u8 = 1;
const KIND_MANIFEST: u8 = 2;
const KIND_CHUNK_REQUEST: u8 = 3;
const KIND_CHUNK: u8 = 4;
const KIND_REFUSED: u8 = 5;

/// Why bytes are not a recovery message.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum WireError {
    /// The bytes end inside a field.
    #[error("recovery message ends inside {0}")]
    Truncated(&'static str),
    /// Written by a codec version this one does not read.
    #[error("recovery message version {0} is not supported (this codec reads version {VERSION})")]
    Version(u8),
    /// Unknown message kind.
    #[error("unknown recovery message kind {0}")]
    Kind(u8),
    /// A field exceeds its bound.
    #[error("{what} of {len} exceeds the maximum of {max}")]
    TooLong {
        /// The field.
        what: &'static str,
        /// Its length.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// A string is not UTF-8.
    #[error("{0} is not UTF-8")]
    Utf8(&'static str),
    /// Bytes left after the message.
    #[error("{0} bytes after the recovery message")]
    Trailing(usize),
}

/// "Which buffers make up your state, at which step?" `request` is echoed in the answer so a
/// late answer to an earlier try can be told apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManifestRequest {
    /// The asker's request number.
    pub request: u64,
}

/// A source's state: its training step and its registered buffers, by name and length, in
/// registration order (a chunk names its buffer by index into this list).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    /// The request answered.
    pub request: u64,
    /// The training step the buffers hold.
    pub step: u64,
    /// Each buffer's name and length in bytes.
    pub buffers: Vec<(String, u64)>,
}

/// "Send me `len` bytes of buffer `buffer` from `offset`, as of step `step`."
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRequest {
    /// The step of the manifest the request was planned from.
    pub step: u64,
    /// Index of the buffer in the manifest.
    pub buffer: u32,
    /// First byte.
    pub offset: u64,
    /// Bytes wanted (at most [`MAX_CHUNK`]).
    pub len: u32,
}

/// A piece of a buffer with the checksum ([`chunk_crc`]) the source computed over it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// The step the bytes belong to.
    pub step: u64,
    /// Index of the buffer in the manifest.
    pub buffer: u32,
    /// Offset of the first byte.
    pub offset: u64,
    /// [`chunk_crc`] of the position and `data`, computed by the source.
    pub crc32c: u32,
    /// The bytes (at most [`MAX_CHUNK`]).
    pub data: Bytes,
}

/// A chunk as decoded by [`decode_ref`]: the data borrowed from the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRef<'a> {
    /// The step the bytes belong to.
    pub step: u64,
    /// Index of the buffer in the manifest.
    pub buffer: u32,
    /// Offset of the first byte.
    pub offset: u64,
    /// [`chunk_crc`] of the position and `data`, as the source computed it.
    pub crc32c: u32,
    /// The bytes.
    pub data: &'a [u8],
}

/// A source cannot serve a request (out of range, another step, malformed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The buffer asked for.
    pub buffer: u32,
    /// The offset asked for.
    pub offset: u64,
    /// Why (at most [`MAX_REASON_BYTES`]).
    pub reason: String,
}

/// Any recovery message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Asks for the manifest.
    ManifestRequest(ManifestRequest),
    /// Answers a manifest request.
    Manifest(Manifest),
    /// Asks for a chunk.
    ChunkRequest(ChunkRequest),
    /// Answers a chunk request.
    Chunk(Chunk),
    /// Refuses a chunk request.
    Refused(Refused),
}

/// Any recovery message, a chunk's data borrowed from the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageRef<'a> {
    /// Asks for the manifest.
    ManifestRequest(ManifestRequest),
    /// Answers a manifest request.
    Manifest(Manifest),
    /// Asks for a chunk.
    ChunkRequest(ChunkRequest),
    /// Answers a chunk request (data borrowed).
    Chunk(ChunkRef<'a>),
    /// Refuses a chunk request.
    Refused(Refused),
}

impl ManifestRequest {
    /// The request's bytes.
    pub fn encode(&self) -> Bytes {
        let mut m = BytesMut::with_capacity(10);
        m.put_u8(VERSION);
        m.put_u8(KIND_MANIFEST_REQUEST);
        m.put_u64_le(self.request);
        m.freeze()
    }
}

impl Manifest {
    /// The manifest's bytes. A name longer than [`MAX_NAME_BYTES`] is cut at a character
    /// boundary ([`crate::recovery::StateServer`] refuses to register such names, so a server
    /// never sends one).
    pub fn encode(&self) -> Bytes {
        let mut m = BytesMut::with_capacity(22 + self.buffers.iter().map(|(n, _)| n.len() + 10).sum::<usize>());
        m.put_u8(VERSION);
        m.put_u8(KIND_MANIFEST);
        m.put_u64_le(self.request);
        m.put_u64_le(self.step);
        m.put_u32_le(self.buffers.len().min(u32::MAX as usize) as u32);
        for (name, len) in self.buffers.iter().take(u32::MAX as usize) {
            put_str(&mut m, name, MAX_NAME_BYTES);
            m.put_u64_le(*len);
        }
        m.freeze()
    }

    /// Total bytes of all buffers (saturating).
    pub fn total_bytes(&self) -> u64 {
        self.buffers.iter().fold(0u64, |a, (_, l)| a.saturating_add(*l))
    }
}

impl ChunkRequest {
    /// The request's bytes.
    pub fn encode(&self) -> Bytes {
        let mut m = BytesMut::with_capacity(26);
        m.put_u8(VERSION);
        m.put_u8(KIND_CHUNK_REQUEST);
        m.put_u64_le(self.step);
        m.put_u32_le(self.buffer);
        m.put_u64_le(self.offset);
        m.put_u32_le(self.len);
        m.freeze()
    }
}

/// The checksum a chunk carries: CRC32C (Castagnoli) of `step u64 | buffer u32 | offset u64 |
/// len u32` (little endian) followed by the data. Covering the position as well as the bytes
/// means a corrupted header cannot put good bytes in the wrong place.
pub fn chunk_crc(step: u64, buffer: u32, offset: u64, data: &[u8]) -> u32 {
    chunk_crc_parts(step, buffer, offset, &[data])
}

/// [`chunk_crc`] of data given in pieces (their concatenation is the data).
pub fn chunk_crc_parts(step: u64, buffer: u32, offset: u64, data: &[&[u8]]) -> u32 {
    let len: usize = data.iter().map(|d| d.len()).sum();
    let mut head = [0u8; 24];
    head[0..8].copy_from_slice(&step.to_le_bytes());
    head[8..12].copy_from_slice(&buffer.to_le_bytes());
    head[12..20].copy_from_slice(&offset.to_le_bytes());
    head[20..24].copy_from_slice(&(len as u32).to_le_bytes());
    data.iter().fold(crc32c::crc32c(&head), |crc, d| crc32c::crc32c_append(crc, d))
}

/// The header of a chunk of `len` data bytes: send it followed by exactly those bytes.
pub fn encode_chunk_header(step: u64, buffer: u32, offset: u64, crc32c: u32, len: u32) -> [u8; CHUNK_HEADER_BYTES] {
    let mut h = [0u8; CHUNK_HEADER_BYTES];
    h[0] = VERSION;
    h[1] = KIND_CHUNK;
    h[2..10].copy_from_slice(&step.to_le_bytes());
    h[10..14].copy_from_slice(&buffer.to_le_bytes());
    h[14..22].copy_from_slice(&offset.to_le_bytes());
    h[22..26].copy_from_slice(&crc32c.to_le_bytes());
    h[26..30].copy_from_slice(&len.to_le_bytes());
    h
}

impl Chunk {
    /// The chunk's bytes: header and data in one buffer (one copy of the data). Data longer
    /// than [`MAX_CHUNK`] is cut to it (a receiver would refuse more).
    pub fn encode(&self) -> Bytes {
        let data = &self.data[..self.data.len().min(MAX_CHUNK as usize)];
        let mut m = BytesMut::with_capacity(CHUNK_HEADER_BYTES + data.len());
        m.put_slice(&encode_chunk_header(self.step, self.buffer, self.offset, self.crc32c, data.len() as u32));
        m.put_slice(data);
        m.freeze()
    }
}

impl ChunkRef<'_> {
    /// An owned copy.
    pub fn to_owned(&self) -> Chunk {
        Chunk {
            step: self.step,
            buffer: self.buffer,
            offset: self.offset,
            crc32c: self.crc32c,
            data: Bytes::copy_from_slice(self.data),
        }
    }
}

impl Refused {
    /// The refusal's bytes (the reason cut to [`MAX_REASON_BYTES`] at a character boundary).
    pub fn encode(&self) -> Bytes {
        let mut m = BytesMut::with_capacity(16 + self.reason.len().min(MAX_REASON_BYTES));
        m.put_u8(VERSION);
        m.put_u8(KIND_REFUSED);
        m.put_u32_le(self.buffer);
        m.put_u64_le(self.offset);
        put_str(&mut m, &self.reason, MAX_REASON_BYTES);
        m.freeze()
    }
}

impl Message {
    /// The message's bytes.
    pub fn encode(&self) -> Bytes {
        match self {
            Message::ManifestRequest(m) => m.encode(),
            Message::Manifest(m) => m.encode(),
            Message::ChunkRequest(m) => m.encode(),
            Message::Chunk(m) => m.encode(),
            Message::Refused(m) => m.encode(),
        }
    }

    /// The message in `bytes` (a chunk's data copied out of them).
    pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
        Ok(match decode_ref(bytes)? {
            MessageRef::ManifestRequest(m) => Message::ManifestRequest(m),
            MessageRef::Manifest(m) => Message::Manifest(m),
            MessageRef::ChunkRequest(m) => Message::ChunkRequest(m),
            MessageRef::Chunk(c) => Message::Chunk(c.to_owned()),
            MessageRef::Refused(m) => Message::Refused(m),
        })
    }
}

/// A chunk whose bytes arrived in pieces (a transport's receive buffers), decoded without
/// joining them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkParts<'a> {
    /// The step the bytes belong to.
    pub step: u64,
    /// Index of the buffer in the manifest.
    pub buffer: u32,
    /// Offset of the first byte.
    pub offset: u64,
    /// [`chunk_crc`] of the position and the data, as the source computed it.
    pub crc32c: u32,
    /// The data, in order (empty pieces left out).
    pub data: Vec<&'a [u8]>,
}

/// Decodes the chunk whose bytes are the concatenation of `parts`, borrowing its data from
/// them. `Ok(None)` when the message is not a chunk, or its header does not lie whole in the
/// first part: decode the joined bytes with [`decode_ref`] then. Errors exactly where
/// [`decode_ref`] of the joined bytes would fail for a chunk (truncated, too long, trailing).
pub fn decode_chunk_parts<'a>(parts: &[&'a [u8]]) -> Result<Option<ChunkParts<'a>>, WireError> {
    let Some(first) = parts.first() else {
        return Ok(None);
    };
    if first.len() < CHUNK_HEADER_BYTES || first[0] != VERSION || first[1] != KIND_CHUNK {
        return Ok(None);
    }
    let mut r = Reader(&first[2..CHUNK_HEADER_BYTES]);
    let step = r.u64("step")?;
    let buffer = r.u32("buffer")?;
    let offset = r.u64("offset")?;
    let crc32c = r.u32("crc32c")?;
    let len = r.u32("length")?;
    if len > MAX_CHUNK {
        return Err(WireError::TooLong { what: "chunk", len: len.into(), max: MAX_CHUNK.into() });
    }
    let mut data = Vec::with_capacity(parts.len());
    data.push(&first[CHUNK_HEADER_BYTES..]);
    data.extend_from_slice(&parts[1..]);
    data.retain(|d| !d.is_empty());
    let got: usize = data.iter().map(|d| d.len()).sum();
    match got.cmp(&(len as usize)) {
        std::cmp::Ordering::Less => Err(WireError::Truncated("chunk data")),
        std::cmp::Ordering::Greater => Err(WireError::Trailing(got - len as usize)),
        std::cmp::Ordering::Equal => Ok(Some(ChunkParts { step, buffer, offset, crc32c, data })),
    }
}

/// The message in `bytes`, a chunk's data borrowed from them (no copy).
pub fn decode_ref(bytes: &[u8]) -> Result<MessageRef<'_>, WireError> {
    let mut r = Reader(bytes);
    let version = r.u8("version")?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let msg = match r.u8("kind")? {
        KIND_MANIFEST_REQUEST => MessageRef::ManifestRequest(ManifestRequest { request: r.u64("request")? }),
        KIND_MANIFEST => {
            let request = r.u64("request")?;
            let step = r.u64("step")?;
            let count = r.u32("buffer count")? as usize;
            // Each entry takes at least 10 bytes: never reserve more than the input can hold.
            let mut buffers = Vec::with_capacity(count.min(r.0.len() / 10));
            for _ in 0..count {
                let name = r.str("buffer name", MAX_NAME_BYTES)?;
                let len = r.u64("buffer length")?;
                buffers.push((name, len));
            }
            MessageRef::Manifest(Manifest { request, step, buffers })
        }
        KIND_CHUNK_REQUEST => {
            let step = r.u64("step")?;
            let buffer = r.u32("buffer")?;
            let offset = r.u64("offset")?;
            let len = r.u32("length")?;
            if len > MAX_CHUNK {
                return Err(WireError::TooLong { what: "chunk request", len: len.into(), max: MAX_CHUNK.into() });
            }
            MessageRef::ChunkRequest(ChunkRequest { step, buffer, offset, len })
        }
        KIND_CHUNK => {
            let step = r.u64("step")?;
            let buffer = r.u32("buffer")?;
            let offset = r.u64("offset")?;
            let crc32c = r.u32("crc32c")?;
            let len = r.u32("length")?;
            if len > MAX_CHUNK {
                return Err(WireError::TooLong { what: "chunk", len: len.into(), max: MAX_CHUNK.into() });
            }
            let data = r.take(len as usize, "chunk data")?;
            MessageRef::Chunk(ChunkRef { step, buffer, offset, crc32c, data })
        }
        KIND_REFUSED => {
            let buffer = r.u32("buffer")?;
            let offset = r.u64("offset")?;
            let reason = r.str("reason", MAX_REASON_BYTES)?;
            MessageRef::Refused(Refused { buffer, offset, reason })
        }
        k => return Err(WireError::Kind(k)),
    };
    if !r.0.is_empty() {
        return Err(WireError::Trailing(r.0.len()));
    }
    Ok(msg)
}

fn put_str(m: &mut BytesMut, s: &str, max: usize) {
    let mut end = s.len().min(max).min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    m.put_u16_le(end as u16);
    m.put_slice(&s.as_bytes()[..end]);
}

/// A cursor over the input; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn str(&mut self, what: &'static str, max: usize) -> Result<String, WireError> {
        let n = self.u16(what)? as usize;
        if n > max {
            return Err(WireError::TooLong { what, len: n as u64, max: max as u64 });
        }
        let b = self.take(n, what)?;
        std::str::from_utf8(b).map(str::to_string).map_err(|_| WireError::Utf8(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::ManifestRequest(ManifestRequest { request: 7 }),
            Message::Manifest(Manifest { request: u64::MAX, step: 12, buffers: vec![] }),
            Message::Manifest(Manifest {
                request: 1,
                step: 0,
                buffers: vec![("params".into(), 1 << 30), ("optimizer/état".into(), 0)],
            }),
            Message::ChunkRequest(ChunkRequest { step: 3, buffer: 1, offset: 1 << 40, len: MAX_CHUNK }),
            Message::Chunk(Chunk {
                step: 3,
                buffer: 0,
                offset: 4096,
                crc32c: crc32c::crc32c(b"hello"),
                data: Bytes::from_static(b"hello"),
            }),
            Message::Chunk(Chunk { step: 0, buffer: 9, offset: 0, crc32c: 0, data: Bytes::new() }),
            Message::Refused(Refused { buffer: 2, offset: 99, reason: "out of range".into() }),
        ]
    }

    #[test]
    fn every_kind_round_trips_and_every_truncation_is_an_error() {
        for m in samples() {
            let bytes = m.encode();
            assert_eq!(Message::decode(&bytes), Ok(m.clone()));
            for cut in 0..bytes.len() {
                assert!(Message::decode(&bytes[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            let mut longer = bytes.to_vec();
            longer.push(0);
            assert_eq!(Message::decode(&longer), Err(WireError::Trailing(1)));
        }
    }

    #[test]
    fn chunk_header_then_data_is_a_chunk() {
        let data = b"0123456789";
        let mut bytes = encode_chunk_header(5, 1, 20, crc32c::crc32c(data), data.len() as u32).to_vec();
        bytes.extend_from_slice(data);
        match decode_ref(&bytes) {
            Ok(MessageRef::Chunk(c)) => {
                assert_eq!((c.step, c.buffer, c.offset, c.data), (5, 1, 20, &data[..]));
                assert_eq!(c.crc32c, crc32c::crc32c(data));
            }
            other => panic!("not a chunk: {other:?}"),
        }
    }

    #[test]
    fn bounds_and_versions_are_enforced() {
        let mut req = ChunkRequest { step: 0, buffer: 0, offset: 0, len: MAX_CHUNK }.encode().to_vec();
        req[22..26].copy_from_slice(&(MAX_CHUNK + 1).to_le_bytes());
        assert!(matches!(Message::decode(&req), Err(WireError::TooLong { what: "chunk request", .. })));
        let mut chunk = encode_chunk_header(0, 0, 0, 0, MAX_CHUNK + 1).to_vec();
        chunk.extend_from_slice(&[0; 16]);
        assert!(matches!(Message::decode(&chunk), Err(WireError::TooLong { what: "chunk", .. })));
        let mut v2 = ManifestRequest { request: 1 }.encode().to_vec();
        v2[0] = 2;
        assert_eq!(Message::decode(&v2), Err(WireError::Version(2)));
        assert_eq!(Message::decode(&[VERSION, 77]), Err(WireError::Kind(77)));
        // A manifest claiming four billion buffers in a few bytes is refused without reserving
        // room for them.
        let mut huge = Manifest { request: 0, step: 0, buffers: vec![] }.encode().to_vec();
        huge[18..22].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Message::decode(&huge), Err(WireError::Truncated("buffer name")));
        let bad_utf8 = [VERSION, KIND_REFUSED, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0xff];
        assert_eq!(Message::decode(&bad_utf8), Err(WireError::Utf8("reason")));
    }

    #[test]
    fn long_strings_are_cut_at_a_character_boundary() {
        let reason = "é".repeat(MAX_REASON_BYTES);
        let m = Refused { buffer: 0, offset: 0, reason };
        match Message::decode(&m.encode()) {
            Ok(Message::Refused(r)) => {
                assert!(r.reason.len() <= MAX_REASON_BYTES && r.reason.len() >= MAX_REASON_BYTES - 1);
                assert!(m.reason.starts_with(&r.reason));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_chunk_in_pieces_decodes_like_the_joined_bytes() {
        let data: Vec<u8> = (0..100u8).collect();
        let c =
            Chunk { step: 2, buffer: 1, offset: 300, crc32c: chunk_crc(2, 1, 300, &data), data: data.clone().into() };
        let bytes = c.encode();
        let (a, b) = bytes.split_at(CHUNK_HEADER_BYTES + 10);
        let (b, d) = b.split_at(40);
        let parts = decode_chunk_parts(&[a, b, &[], d]).expect("decodes").expect("a chunk");
        assert_eq!((parts.step, parts.buffer, parts.offset, parts.crc32c), (2, 1, 300, c.crc32c));
        assert_eq!(parts.data.concat(), data);
        assert_eq!(chunk_crc_parts(2, 1, 300, &parts.data), c.crc32c);
        // The header split over two parts, or not a chunk at all: decode the joined bytes.
        assert_eq!(decode_chunk_parts(&[&bytes[..5], &bytes[5..]]), Ok(None));
        assert_eq!(decode_chunk_parts(&[&ManifestRequest { request: 1 }.encode()]), Ok(None));
        assert_eq!(decode_chunk_parts(&[]), Ok(None));
        assert_eq!(decode_chunk_parts(&[a, b]), Err(WireError::Truncated("chunk data")));
        assert_eq!(decode_chunk_parts(&[a, b, d, &[0, 0]]), Err(WireError::Trailing(2)));
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            any::<u64>().prop_map(|request| Message::ManifestRequest(ManifestRequest { request })),
            (any::<u64>(), any::<u64>(), proptest::collection::vec(("\\PC{0,40}", any::<u64>()), 0..6))
                .prop_map(|(request, step, buffers)| Message::Manifest(Manifest { request, step, buffers })),
            (any::<u64>(), any::<u32>(), any::<u64>(), 0..=MAX_CHUNK).prop_map(|(step, buffer, offset, len)| {
                Message::ChunkRequest(ChunkRequest { step, buffer, offset, len })
            }),
            (any::<u64>(), any::<u32>(), any::<u64>(), any::<u32>(), proptest::collection::vec(any::<u8>(), 0..300))
                .prop_map(|(step, buffer, offset, crc32c, data)| {
                    Message::Chunk(Chunk { step, buffer, offset, crc32c, data: data.into() })
                }),
            (any::<u32>(), any::<u64>(), "\\PC{0,80}").prop_map(|(buffer, offset, reason)| Message::Refused(Refused {
                buffer,
                offset,
                reason
            })),
        ]
    }

    proptest! {
        #[test]
        fn messages_round_trip(m in arb_message()) {
            let bytes = m.encode();
            prop_assert_eq!(Message::decode(&bytes), Ok(m));
        }

        #[test]
        fn any_bytes_decode_to_a_message_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(m) = Message::decode(&bytes) {
                // Whatever decodes re-encodes to the same bytes: the codec is canonical.
                prop_assert_eq!(&m.encode()[..], &bytes[..]);
            }
        }

        #[test]
        fn chunk_parts_agree_with_the_joined_decoder(
            m in arb_message(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = m.encode().to_vec();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut parts = Vec::new();
            let mut start = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                parts.push(&bytes[start..c]);
                start = c;
            }
            match (decode_chunk_parts(&parts), decode_ref(&bytes)) {
                (Ok(Some(p)), Ok(MessageRef::Chunk(c))) => {
                    prop_assert_eq!((p.step, p.buffer, p.offset, p.crc32c), (c.step, c.buffer, c.offset, c.crc32c));
                    prop_assert_eq!(p.data.concat(), c.data.to_vec());
                }
                (Ok(Some(p)), other) => prop_assert!(false, "parts gave {:?}, joined {:?}", p, other),
                (Ok(None), _) => {}
                (Err(e), joined) => prop_assert_eq!(Err(e), joined.map(|_| ())),
            }
        }

        #[test]
        fn mutated_messages_never_panic(m in arb_message(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut bytes = m.encode().to_vec();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            let _ = Message::decode(&bytes);
        }
    }
}
