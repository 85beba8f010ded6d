//! A received message's bytes: the frames' own buffers, in order, without a reassembly copy.

use bytes::{Bytes, BytesMut};

/// The bytes of one message as a list of chunks (one per data frame). Nothing is copied on
/// receipt: each chunk is the buffer the frame was read into. [`Payload::to_bytes`] gives one
/// contiguous buffer (free for single-chunk messages, one copy otherwise).
///
/// Equality compares content, not chunking.
#[derive(Clone, Debug, Default)]
pub struct Payload {
    chunks: Vec<Bytes>,
    /// CRC32C of each chunk, where its maker computed it ([`Payload::push_checked`]).
    crcs: Vec<Option<u32>>,
    len: usize,
}

impl Payload {
    /// An empty payload.
    pub fn new() -> Payload {
        Payload::default()
    }

    /// Appends a chunk.
    pub fn push(&mut self, chunk: Bytes) {
        self.push_with(chunk, None);
    }

    /// Appends a chunk whose CRC32C the caller has computed (`crc`), typically in the pass that
    /// wrote it, while the bytes were in cache. A transport that sends the chunk as one frame of
    /// at least [`crate::frame::PRECOMPUTED_CRC_MIN`] bytes uses it for the frame's checksum
    /// instead of reading the bytes again. The checksum is not
    /// trusted beyond that: a wrong one makes the receiver refuse the frame as corrupt (and
    /// debug builds check it here).
    pub fn push_checked(&mut self, chunk: Bytes, crc: u32) {
        debug_assert_eq!(crate::checksum::crc32c(&chunk), crc, "push_checked: the checksum is not the chunk's");
        self.push_with(chunk, Some(crc));
    }

    /// Appends a chunk with the CRC32C the transport verified for it, if any: like
    /// [`Payload::push_checked`] without the debug check (a receiver's checksum was derived
    /// from the frame's, which matched the bytes).
    pub fn push_verified(&mut self, chunk: Bytes, crc: Option<u32>) {
        self.push_with(chunk, crc);
    }

    fn push_with(&mut self, chunk: Bytes, crc: Option<u32>) {
        self.len += chunk.len();
        if !chunk.is_empty() {
            self.chunks.push(chunk);
            self.crcs.push(crc);
        }
    }

    /// The CRC32C of chunk `i` if its maker gave it ([`Payload::push_checked`]) or the
    /// transport that received it verified it ([`Payload::push_verified`]): whoever sends the
    /// chunk on can hand it over instead of reading the bytes again.
    pub fn chunk_crc(&self, i: usize) -> Option<u32> {
        self.crcs.get(i).copied().flatten()
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the chunks are consecutive slices of `whole`'s memory that cover it exactly
    /// (same bytes, no copy needed to make them one buffer: `whole` *is* the content).
    pub fn is_laid_out_in(&self, whole: &Bytes) -> bool {
        if self.len != whole.len() {
            return false;
        }
        let mut at = whole.as_ptr() as usize;
        for c in &self.chunks {
            if c.as_ptr() as usize != at {
                return false;
            }
            at += c.len();
        }
        true
    }

    /// The chunks, in order.
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    /// The bytes as one buffer: no copy when there is at most one chunk.
    pub fn to_bytes(&self) -> Bytes {
        match self.chunks.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => {
                let mut b = BytesMut::with_capacity(self.len);
                for c in many {
                    b.extend_from_slice(c);
                }
                b.freeze()
            }
        }
    }

    /// CRC32C of the content (what an application compares end to end).
    pub fn crc32c(&self) -> u32 {
        let mut crc = crate::checksum::Crc32c::new();
        for c in &self.chunks {
            crc.update(c);
        }
        crc.finish()
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Payload {
        let mut p = Payload::new();
        p.push(b);
        p
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        self.len == other.len
            && self.chunks.iter().flat_map(|c| c.iter()).eq(other.chunks.iter().flat_map(|c| c.iter()))
    }
}

impl Eq for Payload {}

impl PartialEq<[u8]> for Payload {
    fn eq(&self, other: &[u8]) -> bool {
        self.len == other.len() && self.chunks.iter().flat_map(|c| c.iter()).eq(other.iter())
    }
}

impl PartialEq<Bytes> for Payload {
    fn eq(&self, other: &Bytes) -> bool {
        self == &other[..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equality_and_checksums_ignore_how_the_bytes_were_chunked() {
        let mut a = Payload::new();
        a.push(Bytes::from_static(b"hel"));
        a.push(Bytes::new());
        a.push(Bytes::from_static(b"lo"));
        let b = Payload::from(Bytes::from_static(b"hello"));
        assert_eq!(a, b);
        assert_eq!(a.len(), 5);
        assert_eq!(a.crc32c(), crate::checksum::crc32c(b"hello"));
        assert_eq!(a.to_bytes(), Bytes::from_static(b"hello"));
        assert!(a == b"hello"[..]);
        assert_ne!(a, Payload::from(Bytes::from_static(b"hellp")));
    }

    #[test]
    fn a_checked_chunk_keeps_its_checksum_and_others_have_none() {
        let mut p = Payload::new();
        p.push(Bytes::from_static(b"head"));
        p.push(Bytes::new());
        p.push_checked(Bytes::from_static(b"body"), crate::checksum::crc32c(b"body"));
        assert_eq!(p.chunk_crc(0), None);
        assert_eq!(p.chunk_crc(1), Some(crate::checksum::crc32c(b"body")));
        assert_eq!(p.chunk_crc(2), None);
        assert_eq!(p, Payload::from(Bytes::from_static(b"headbody")));
    }
}
