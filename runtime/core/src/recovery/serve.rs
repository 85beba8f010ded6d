//! The source side: a healthy rank answering manifest and chunk requests from its registered
//! buffers.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;
use tracing::debug;

use super::wire::{
    self, decode_ref, ChunkRequest, Manifest, MessageRef, Refused, CHUNK_HEADER_BYTES, MAX_CHUNK, MAX_NAME_BYTES,
};

/// Why a set of buffers cannot be served.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ServeError {
    /// A buffer name is longer than the manifest can carry.
    #[error("buffer {index}: name of {len} bytes exceeds the maximum of {MAX_NAME_BYTES}")]
    NameTooLong {
        /// Index of the buffer.
        index: usize,
        /// Length of its name.
        len: usize,
    },
    /// Two buffers share a name.
    #[error("buffers {first} and {second} are both named {name:?}")]
    DuplicateName {
        /// The name.
        name: String,
        /// The first buffer with it.
        first: usize,
        /// The second.
        second: usize,
    },
    /// More buffers than a chunk can address.
    #[error("{0} buffers exceed the maximum of 2^32")]
    TooManyBuffers(usize),
}

/// What a server has answered so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServeCounters {
    /// Manifests sent.
    pub manifests: u64,
    /// Chunks sent.
    pub chunks: u64,
    /// Data bytes sent in chunks.
    pub bytes: u64,
    /// Chunk requests refused (out of range, another step).
    pub refused: u64,
    /// Messages that were not requests, or not decodable (nothing was sent back).
    pub ignored: u64,
}

/// The state a healthy rank offers to recovering ranks: a training step and the buffers the
/// trainer registered (parameters, optimizer state, …), shared, not copied.
///
/// Under faults: it holds no per-requester state, so a requester that dies or retries costs
/// nothing; every chunk carries the CRC32C of its position and bytes computed here
/// ([`wire::chunk_crc`]), so corruption anywhere
/// after this point is detected by the receiver; a request for another step or outside a
/// buffer is answered with [`Refused`], never with wrong bytes.
#[derive(Clone, Debug)]
pub struct StateServer {
    step: u64,
    buffers: Vec<(String, Bytes)>,
    counters: ServeCounters,
}

impl StateServer {
    /// A server of `buffers` (name, bytes) at training step `step`. Buffer `i` of the list is
    /// buffer `i` of the manifest. Names must be unique and at most [`MAX_NAME_BYTES`] long.
    pub fn new(step: u64, buffers: Vec<(String, Bytes)>) -> Result<StateServer, ServeError> {
        if buffers.len() > u32::MAX as usize {
            return Err(ServeError::TooManyBuffers(buffers.len()));
        }
        for (index, (name, _)) in buffers.iter().enumerate() {
            if name.len() > MAX_NAME_BYTES {
                return Err(ServeError::NameTooLong { index, len: name.len() });
            }
            if let Some(first) = buffers[..index].iter().position(|(n, _)| n == name) {
                return Err(ServeError::DuplicateName { name: name.clone(), first, second: index });
            }
        }
        Ok(StateServer { step, buffers, counters: ServeCounters::default() })
    }

    /// The training step served.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The manifest of the served state, answering request `request`.
    pub fn manifest(&self, request: u64) -> Manifest {
        Manifest {
            request,
            step: self.step,
            buffers: self.buffers.iter().map(|(n, b)| (n.clone(), b.len() as u64)).collect(),
        }
    }

    /// What has been answered so far.
    pub fn counters(&self) -> ServeCounters {
        self.counters
    }

    /// The answer to the message `bytes` from rank `from`: a manifest, a chunk, a refusal, or
    /// nothing for bytes that are not a request (undecodable, or a reply kind). Never panics.
    pub fn handle(&mut self, from: u64, bytes: &[u8]) -> Option<Bytes> {
        match decode_ref(bytes) {
            Ok(MessageRef::ManifestRequest(r)) => {
                self.counters.manifests += 1;
                Some(self.manifest(r.request).encode())
            }
            Ok(MessageRef::ChunkRequest(r)) => Some(self.chunk(from, r)),
            Ok(other) => {
                debug!(from, message = ?kind_of(&other), "not a recovery request; ignored");
                self.counters.ignored += 1;
                None
            }
            Err(e) => {
                debug!(from, error = %e, "undecodable recovery request; ignored");
                self.counters.ignored += 1;
                None
            }
        }
    }

    fn chunk(&mut self, from: u64, r: ChunkRequest) -> Bytes {
        let refuse = |counters: &mut ServeCounters, reason: String| {
            debug!(from, buffer = r.buffer, offset = r.offset, %reason, "chunk request refused");
            counters.refused += 1;
            Refused { buffer: r.buffer, offset: r.offset, reason }.encode()
        };
        if r.step != self.step {
            return refuse(
                &mut self.counters,
                format!("state is at step {}, the request is for step {}", self.step, r.step),
            );
        }
        let Some((name, buf)) = self.buffers.get(r.buffer as usize) else {
            return refuse(&mut self.counters, format!("no buffer {} ({} registered)", r.buffer, self.buffers.len()));
        };
        let end = r.offset.checked_add(u64::from(r.len));
        if r.len > MAX_CHUNK || !matches!(end, Some(e) if e <= buf.len() as u64) {
            return refuse(
                &mut self.counters,
                format!(
                    "bytes {}..+{} are outside buffer {} ({name:?}, {} bytes)",
                    r.offset,
                    r.len,
                    r.buffer,
                    buf.len()
                ),
            );
        }
        // In range: offset + len <= buf.len(), which is a usize.
        let start = r.offset as usize;
        let data = &buf[start..start + r.len as usize];
        let crc = wire::chunk_crc(self.step, r.buffer, r.offset, data);
        let mut m = BytesMut::with_capacity(CHUNK_HEADER_BYTES + data.len());
        m.put_slice(&wire::encode_chunk_header(self.step, r.buffer, r.offset, crc, r.len));
        m.put_slice(data);
        self.counters.chunks += 1;
        self.counters.bytes += u64::from(r.len);
        m.freeze()
    }
}

fn kind_of(m: &MessageRef<'_>) -> &'static str {
    match m {
        MessageRef::ManifestRequest(_) => "manifest request",
        MessageRef::Manifest(_) => "manifest",
        MessageRef::ChunkRequest(_) => "chunk request",
        MessageRef::Chunk(_) => "chunk",
        MessageRef::Refused(_) => "refused",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery::wire::{Chunk, ManifestRequest, Message};

    fn server() -> StateServer {
        let a: Bytes = (0..100u8).collect::<Vec<_>>().into();
        StateServer::new(4, vec![("a".into(), a), ("empty".into(), Bytes::new())]).expect("valid buffers")
    }

    #[test]
    fn answers_manifests_and_in_range_chunks_with_their_checksum() {
        let mut s = server();
        let m = s.handle(1, &ManifestRequest { request: 8 }.encode()).expect("an answer");
        assert_eq!(
            Message::decode(&m),
            Ok(Message::Manifest(Manifest {
                request: 8,
                step: 4,
                buffers: vec![("a".into(), 100), ("empty".into(), 0)]
            }))
        );
        let c = s.handle(1, &ChunkRequest { step: 4, buffer: 0, offset: 90, len: 10 }.encode()).expect("an answer");
        let data: Vec<u8> = (90..100).collect();
        assert_eq!(
            Message::decode(&c),
            Ok(Message::Chunk(Chunk {
                step: 4,
                buffer: 0,
                offset: 90,
                crc32c: wire::chunk_crc(4, 0, 90, &data),
                data: data.into()
            }))
        );
        assert_eq!(s.counters().bytes, 10);
    }

    #[test]
    fn out_of_range_or_other_step_requests_are_refused() {
        let mut s = server();
        for (step, buffer, offset, len) in
            [(4, 0, 91, 10), (4, 0, u64::MAX, 2), (4, 2, 0, 1), (4, 1, 0, 1), (3, 0, 0, 1), (5, 0, 0, 1)]
        {
            let r = s.handle(2, &ChunkRequest { step, buffer, offset, len }.encode()).expect("an answer");
            match Message::decode(&r) {
                Ok(Message::Refused(r)) => assert_eq!((r.buffer, r.offset), (buffer, offset)),
                other => panic!("{step} {buffer} {offset} {len}: {other:?}"),
            }
        }
        assert_eq!(s.counters().refused, 6);
        assert_eq!(s.counters().chunks, 0);
    }

    #[test]
    fn garbage_and_replies_get_no_answer() {
        let mut s = server();
        assert_eq!(s.handle(3, b""), None);
        assert_eq!(s.handle(3, &[1, 2, 3]), None);
        assert_eq!(s.handle(3, &s.manifest(0).encode()), None);
        assert_eq!(s.counters().ignored, 3);
    }

    #[test]
    fn bad_registrations_are_refused() {
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(
            StateServer::new(0, vec![(long, Bytes::new())]).err(),
            Some(ServeError::NameTooLong { index: 0, len: MAX_NAME_BYTES + 1 })
        );
        assert!(matches!(
            StateServer::new(0, vec![("p".into(), Bytes::new()), ("p".into(), Bytes::new())]),
            Err(ServeError::DuplicateName { first: 0, second: 1, .. })
        ));
    }
}
