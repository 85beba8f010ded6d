//! The receiving side: a recovering rank pulling a manifest's buffers from several sources at
//! once.
//!
//! The buffers are cut into fixed pieces of `chunk_bytes` (the last of each buffer shorter).
//! Pieces are handed out round-robin over the live sources, each source holding at most
//! `window_per_source` requests at a time, so a faster source (one that frees its window
//! sooner) gets more of them. A piece is accepted once: from a live source that was asked for
//! it, at the manifest's step, with exactly the planned length and a checksum that matches
//! its position and bytes ([`super::wire::chunk_crc`]). Everything else is counted and
//! dropped. A late answer from a source that was asked earlier (before a timeout moved the
//! piece elsewhere) is accepted if it is the first good copy.
//!
//! Faults, and what happens:
//!
//! - **a source dies or restarts** ([`StateFetch::source_lost`], called by the driver on the
//!   transport's report): its outstanding pieces go back to the queue and are fetched from the
//!   others; nothing it sends afterwards is accepted.
//! - **a source goes silent**: a request expires when its source has delivered nothing for
//!   `chunk_timeout_ns` since the request was sent ([`StateFetch::handle_timeout`]); the
//!   piece is asked of another source if there is one.
//! - **a chunk is corrupted**: the checksum mismatch is counted and the piece is asked of
//!   another source if there is one (of the same one otherwise).
//! - **a source refuses** (another step, other buffer sizes): it is dropped.
//! - a source with [`MAX_STRIKES`] failures in a row (expiries — all requests that expire at
//!   one call count as one — or checksum mismatches, without a good chunk in between) is
//!   dropped.
//! - **no live source is left** with bytes missing: [`FetchError::NoSourcesLeft`]; the fetch
//!   stops asking (a clean error, never a partial state presented as whole).

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use thiserror::Error;
use tracing::{debug, warn};

use super::wire::{
    chunk_crc_parts, decode_chunk_parts, decode_ref, ChunkParts, ChunkRequest, Manifest, MessageRef, WireError,
    MAX_CHUNK,
};

/// Failures in a row (timeouts, checksum mismatches) after which a source is dropped.
pub const MAX_STRIKES: u32 = 3;

/// What went wrong while fetching. Only [`FetchError::is_terminal`] errors end the fetch; the
/// others report a message that was dealt with (dropped, re-requested) and the fetch goes on.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum FetchError {
    /// Every source is gone (lost, refused, or silent too often) and bytes are still missing.
    #[error("no source left to fetch from: {missing_bytes} bytes of the state are still missing")]
    NoSourcesLeft {
        /// Bytes not yet received.
        missing_bytes: u64,
    },
    /// A buffer of the manifest cannot be held in this process's memory.
    #[error("buffer {buffer} ({name:?}) of {len} bytes cannot be held in memory")]
    TooLarge {
        /// Index of the buffer.
        buffer: u32,
        /// Its name.
        name: String,
        /// Its length.
        len: u64,
    },
    /// A source sent bytes that are not a recovery message (ignored).
    #[error("source {rank} sent an undecodable recovery message: {error}")]
    Malformed {
        /// The source.
        rank: u64,
        /// Why it does not decode.
        error: WireError,
    },
    /// A chunk's bytes do not match its checksum (the piece is fetched again).
    #[error(
        "source {rank}: chunk of buffer {buffer} at offset {offset} fails its checksum \
         (carried {expected:#010x}, computed {actual:#010x}); fetched again"
    )]
    Checksum {
        /// The source.
        rank: u64,
        /// The buffer.
        buffer: u32,
        /// The chunk's offset.
        offset: u64,
        /// The CRC32C the chunk carried.
        expected: u32,
        /// The CRC32C of the bytes received.
        actual: u32,
    },
    /// A source refused a request: its state is not the manifest's (it is dropped).
    #[error("source {rank} refused buffer {buffer} at offset {offset}: {reason}; source dropped")]
    Refused {
        /// The source.
        rank: u64,
        /// The buffer asked for.
        buffer: u32,
        /// The offset asked for.
        offset: u64,
        /// Its reason.
        reason: String,
    },
}

impl FetchError {
    /// Whether the fetch cannot complete (as opposed to one message having been dropped).
    pub fn is_terminal(&self) -> bool {
        matches!(self, FetchError::NoSourcesLeft { .. } | FetchError::TooLarge { .. })
    }
}

/// What a fetch has done so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchCounters {
    /// Bytes accepted from each source (source, bytes), in the order the sources were given.
    pub bytes_per_source: Vec<(u64, u64)>,
    /// Chunk requests sent (first requests and re-requests).
    pub requests: u64,
    /// Pieces asked for again after a loss, a timeout, a checksum mismatch or a refusal.
    pub re_requests: u64,
    /// Chunks whose bytes did not match their checksum.
    pub checksum_failures: u64,
    /// Requests that expired.
    pub timeouts: u64,
    /// Valid chunks for pieces already received.
    pub duplicates: u64,
    /// Messages dropped: from ranks that are not (or no longer) sources, of the wrong kind or
    /// step, not matching a piece, or never asked of that source.
    pub ignored: u64,
    /// Sources dropped, in the order they were dropped.
    pub sources_lost: Vec<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PieceState {
    Pending,
    /// Asked of this source (index) and not yet answered.
    Outstanding(usize),
    Done,
}

#[derive(Debug)]
struct Piece {
    buffer: u32,
    offset: u64,
    len: u32,
    state: PieceState,
    /// Sources (indices) asked for this piece so far: their answers are accepted.
    asked: Vec<usize>,
    /// A source that failed this piece: ask another if one is live.
    avoid: Option<usize>,
}

#[derive(Debug)]
struct Source {
    id: u64,
    live: bool,
    /// Outstanding pieces and when each was asked for.
    outstanding: BTreeMap<usize, u64>,
    strikes: u32,
    bytes: u64,
    /// When it last delivered a good chunk.
    last_progress: u64,
}

/// A fetch of a manifest's state from several sources, sans-IO: the caller sends what
/// [`StateFetch::poll_request`] returns, feeds what arrives to
/// [`StateFetch::handle_message`], reports lost sources and calls
/// [`StateFetch::handle_timeout`]; time is nanoseconds on any clock the caller keeps.
///
/// It promises: when [`StateFetch::is_done`] is true, every byte of every buffer came in a
/// chunk whose CRC32C matched, from a source that was asked for exactly that piece at the
/// manifest's step; bytes are never taken from a dropped source; with a live source left the
/// fetch keeps asking, and with none it ends with [`FetchError::NoSourcesLeft`].
#[derive(Debug)]
pub struct StateFetch {
    step: u64,
    names: Vec<String>,
    buffers: Vec<Vec<u8>>,
    pieces: Vec<Piece>,
    /// Index of each buffer's first piece.
    first_piece: Vec<usize>,
    pending: VecDeque<usize>,
    sources: Vec<Source>,
    cursor: usize,
    chunk_bytes: u32,
    window: usize,
    chunk_timeout_ns: u64,
    done_pieces: usize,
    done_bytes: u64,
    total_bytes: u64,
    counters: FetchCounters,
}

impl StateFetch {
    /// A fetch of `manifest`'s buffers from `sources` (rank ids; duplicates ignored), in
    /// pieces of `chunk_bytes` (clamped to 1..=[`MAX_CHUNK`]), at most `window_per_source`
    /// (at least 1) requests outstanding per source, a request expiring after
    /// `chunk_timeout_ns` without delivery from its source. Allocates the output buffers
    /// (zeroed) at the manifest's sizes; [`FetchError::TooLarge`] if one cannot be addressed.
    pub fn new(
        manifest: &Manifest,
        sources: Vec<u64>,
        chunk_bytes: u32,
        window_per_source: usize,
        chunk_timeout_ns: u64,
    ) -> Result<StateFetch, FetchError> {
        StateFetch::with_buffers(manifest, Vec::new(), sources, chunk_bytes, window_per_source, chunk_timeout_ns)
    }

    /// Like [`StateFetch::new`], writing into the caller's `buffers` (in manifest order) where
    /// it can: a buffer at least as long as the manifest's is reused, cut to its length (no
    /// allocation, and no page faults if its memory was touched before); a missing or
    /// shorter one is replaced by a zeroed allocation. Reused bytes are overwritten only as
    /// pieces arrive: the buffers are whole only once [`StateFetch::is_done`].
    pub fn with_buffers(
        manifest: &Manifest,
        buffers: Vec<Vec<u8>>,
        sources: Vec<u64>,
        chunk_bytes: u32,
        window_per_source: usize,
        chunk_timeout_ns: u64,
    ) -> Result<StateFetch, FetchError> {
        let chunk_bytes = chunk_bytes.clamp(1, MAX_CHUNK);
        if manifest.buffers.len() > u32::MAX as usize {
            return Err(FetchError::TooLarge { buffer: u32::MAX, name: String::new(), len: 0 });
        }
        let mut names = Vec::with_capacity(manifest.buffers.len());
        let mut pieces = Vec::new();
        let mut first_piece = Vec::with_capacity(manifest.buffers.len());
        let mut total_bytes = 0u64;
        for (i, (name, len)) in manifest.buffers.iter().enumerate() {
            let too_large = || FetchError::TooLarge { buffer: i as u32, name: name.clone(), len: *len };
            if usize::try_from(*len).is_err() || *len > isize::MAX as u64 {
                return Err(too_large());
            }
            total_bytes = total_bytes.checked_add(*len).filter(|t| *t <= isize::MAX as u64).ok_or_else(too_large)?;
            names.push(name.clone());
            first_piece.push(pieces.len());
            let mut offset = 0u64;
            while offset < *len {
                let n = (*len - offset).min(u64::from(chunk_bytes)) as u32;
                pieces.push(Piece {
                    buffer: i as u32,
                    offset,
                    len: n,
                    state: PieceState::Pending,
                    asked: Vec::new(),
                    avoid: None,
                });
                offset += u64::from(n);
            }
        }
        // The sizes were checked above. A fresh buffer is a zeroed allocation (its pages are
        // mapped lazily, as pieces land).
        let mut given = buffers.into_iter();
        let buffers = manifest
            .buffers
            .iter()
            .map(|(_, len)| {
                let len = *len as usize;
                match given.next() {
                    Some(mut b) if b.len() >= len => {
                        b.truncate(len);
                        b
                    }
                    _ => vec![0u8; len],
                }
            })
            .collect();
        let mut ids: Vec<u64> = Vec::with_capacity(sources.len());
        for s in sources {
            if !ids.contains(&s) {
                ids.push(s);
            }
        }
        let counters = FetchCounters { bytes_per_source: ids.iter().map(|s| (*s, 0)).collect(), ..Default::default() };
        let sources = ids
            .into_iter()
            .map(|id| Source { id, live: true, outstanding: BTreeMap::new(), strikes: 0, bytes: 0, last_progress: 0 })
            .collect();
        Ok(StateFetch {
            step: manifest.step,
            names,
            buffers,
            pending: (0..pieces.len()).collect(),
            pieces,
            first_piece,
            sources,
            cursor: 0,
            chunk_bytes,
            window: window_per_source.max(1),
            chunk_timeout_ns,
            done_pieces: 0,
            done_bytes: 0,
            total_bytes,
            counters,
        })
    }

    /// The training step of the state being fetched.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The buffers' names, in manifest order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether every byte has arrived (and been verified).
    pub fn is_done(&self) -> bool {
        self.done_pieces == self.pieces.len()
    }

    /// Bytes received and verified, and bytes in all.
    pub fn progress(&self) -> (u64, u64) {
        (self.done_bytes, self.total_bytes)
    }

    /// What the fetch has done so far.
    pub fn counters(&self) -> FetchCounters {
        let mut c = self.counters.clone();
        c.bytes_per_source = self.sources.iter().map(|s| (s.id, s.bytes)).collect();
        c
    }

    /// The sources still in use.
    pub fn live_sources(&self) -> impl Iterator<Item = u64> + '_ {
        self.sources.iter().filter(|s| s.live).map(|s| s.id)
    }

    /// `Err(NoSourcesLeft)` once the fetch cannot complete; `Ok` while it can (or is done).
    pub fn check(&self) -> Result<(), FetchError> {
        if self.is_done() || self.sources.iter().any(|s| s.live) {
            Ok(())
        } else {
            Err(FetchError::NoSourcesLeft { missing_bytes: self.total_bytes - self.done_bytes })
        }
    }

    /// The next request to send: (source, bytes). `None` when every live source's window is
    /// full or nothing is left to ask for; call again after each message, loss or timeout.
    pub fn poll_request(&mut self, now: u64) -> Option<(u64, Bytes)> {
        if self.pending.is_empty() {
            return None;
        }
        let n = self.sources.len();
        let live = self.sources.iter().filter(|s| s.live).count();
        for k in 0..n {
            let si = (self.cursor + k) % n;
            let s = &self.sources[si];
            if !s.live || s.outstanding.len() >= self.window {
                continue;
            }
            // A piece that failed at this source goes elsewhere while another source lives.
            let pieces = &self.pieces;
            let Some(pos) = self.pending.iter().position(|&p| live < 2 || pieces[p].avoid != Some(si)) else {
                continue;
            };
            let Some(p) = self.pending.remove(pos) else {
                continue;
            };
            let piece = &mut self.pieces[p];
            piece.state = PieceState::Outstanding(si);
            if !piece.asked.contains(&si) {
                piece.asked.push(si);
            }
            let req = ChunkRequest { step: self.step, buffer: piece.buffer, offset: piece.offset, len: piece.len };
            let s = &mut self.sources[si];
            s.outstanding.insert(p, now);
            self.cursor = (si + 1) % n;
            self.counters.requests += 1;
            return Some((s.id, req.encode()));
        }
        None
    }

    /// Feeds a message from rank `from` on the recovery channel. `Ok` for a chunk accepted
    /// and for messages silently dropped (counted in [`FetchCounters::ignored`] or
    /// [`FetchCounters::duplicates`]); a non-terminal error for a message that was dealt with
    /// (undecodable, failed checksum, refusal); [`FetchError::NoSourcesLeft`] if that dropped
    /// the last source.
    pub fn handle_message(&mut self, from: u64, bytes: &[u8], now: u64) -> Result<(), FetchError> {
        let Some(si) = self.sources.iter().position(|s| s.id == from && s.live) else {
            self.counters.ignored += 1;
            return Ok(());
        };
        match decode_ref(bytes) {
            Ok(MessageRef::Chunk(c)) => self.on_chunk(
                si,
                ChunkParts { step: c.step, buffer: c.buffer, offset: c.offset, crc32c: c.crc32c, data: vec![c.data] },
                now,
            ),
            Ok(MessageRef::Refused(r)) => {
                warn!(source = from, buffer = r.buffer, offset = r.offset, reason = %r.reason, "source refused a chunk; dropped");
                self.lose(si);
                self.check()?;
                Err(FetchError::Refused { rank: from, buffer: r.buffer, offset: r.offset, reason: r.reason })
            }
            Ok(_) => {
                self.counters.ignored += 1;
                Ok(())
            }
            Err(error) => {
                self.counters.ignored += 1;
                Err(FetchError::Malformed { rank: from, error })
            }
        }
    }

    /// [`StateFetch::handle_message`] of the concatenation of `parts` (a message as the
    /// transport delivered it, one piece per frame), without joining a chunk's pieces: its
    /// data is checksummed and copied into place straight from them.
    pub fn handle_message_parts(&mut self, from: u64, parts: &[&[u8]], now: u64) -> Result<(), FetchError> {
        if let [one] = parts {
            return self.handle_message(from, one, now);
        }
        let Some(si) = self.sources.iter().position(|s| s.id == from && s.live) else {
            self.counters.ignored += 1;
            return Ok(());
        };
        match decode_chunk_parts(parts) {
            Ok(Some(c)) => self.on_chunk(si, c, now),
            Ok(None) => self.handle_message(from, &parts.concat(), now),
            Err(error) => {
                self.counters.ignored += 1;
                Err(FetchError::Malformed { rank: from, error })
            }
        }
    }

    fn piece_at(&self, buffer: u32, offset: u64) -> Option<usize> {
        let first = *self.first_piece.get(buffer as usize)?;
        let len = self.buffers.get(buffer as usize)?.len() as u64;
        if offset >= len || !offset.is_multiple_of(u64::from(self.chunk_bytes)) {
            return None;
        }
        Some(first + (offset / u64::from(self.chunk_bytes)) as usize)
    }

    fn on_chunk(&mut self, si: usize, c: ChunkParts<'_>, now: u64) -> Result<(), FetchError> {
        let id = self.sources[si].id;
        let Some(p) = self.piece_at(c.buffer, c.offset) else {
            debug!(source = id, buffer = c.buffer, offset = c.offset, "chunk matches no piece; ignored");
            self.counters.ignored += 1;
            return Ok(());
        };
        let piece = &self.pieces[p];
        let data_len: usize = c.data.iter().map(|d| d.len()).sum();
        if c.step != self.step || data_len != piece.len as usize || !piece.asked.contains(&si) {
            debug!(source = id, buffer = c.buffer, offset = c.offset, step = c.step, "unexpected chunk; ignored");
            self.counters.ignored += 1;
            return Ok(());
        }
        let was_outstanding_here = self.sources[si].outstanding.remove(&p).is_some();
        if piece.state == PieceState::Done {
            self.counters.duplicates += 1;
            return Ok(());
        }
        let actual = chunk_crc_parts(c.step, c.buffer, c.offset, &c.data);
        if actual != c.crc32c {
            self.counters.checksum_failures += 1;
            warn!(source = id, buffer = c.buffer, offset = c.offset, "chunk failed its checksum; fetching it again");
            if was_outstanding_here {
                self.requeue(p, Some(si));
            }
            self.strike(si);
            self.check()?;
            return Err(FetchError::Checksum {
                rank: id,
                buffer: c.buffer,
                offset: c.offset,
                expected: c.crc32c,
                actual,
            });
        }
        // Accepted: a late answer may beat a re-request; withdraw the piece from wherever it is.
        match piece.state {
            PieceState::Outstanding(other) if other != si => {
                self.sources[other].outstanding.remove(&p);
            }
            PieceState::Pending => self.pending.retain(|&q| q != p),
            _ => {}
        }
        let (b, off, len) = (piece.buffer as usize, piece.offset as usize, piece.len as usize);
        let mut at = off;
        for d in &c.data {
            self.buffers[b][at..at + d.len()].copy_from_slice(d);
            at += d.len();
        }
        debug_assert_eq!(at, off + len);
        self.pieces[p].state = PieceState::Done;
        self.done_pieces += 1;
        self.done_bytes += len as u64;
        let s = &mut self.sources[si];
        s.bytes += len as u64;
        s.strikes = 0;
        s.last_progress = s.last_progress.max(now);
        Ok(())
    }

    /// Puts piece `p` back at the front of the queue, to be asked of a source other than
    /// `avoid` if one is live.
    fn requeue(&mut self, p: usize, avoid: Option<usize>) {
        let piece = &mut self.pieces[p];
        if piece.state == PieceState::Done {
            return;
        }
        piece.state = PieceState::Pending;
        piece.avoid = avoid;
        self.pending.push_front(p);
        self.counters.re_requests += 1;
    }

    fn strike(&mut self, si: usize) {
        let s = &mut self.sources[si];
        s.strikes += 1;
        if s.strikes >= MAX_STRIKES {
            warn!(source = s.id, strikes = s.strikes, "source failed too often in a row; dropped");
            self.lose(si);
        }
    }

    fn lose(&mut self, si: usize) {
        let s = &mut self.sources[si];
        if !s.live {
            return;
        }
        s.live = false;
        let id = s.id;
        let outstanding = std::mem::take(&mut s.outstanding);
        self.counters.sources_lost.push(id);
        for (&p, _) in outstanding.iter().rev() {
            self.requeue(p, Some(si));
        }
    }

    /// Source `source` is gone (unreachable, restarted, killed): its outstanding pieces are
    /// asked of the others, and nothing more is accepted from it. Unknown or already dropped
    /// sources are ignored. [`FetchError::NoSourcesLeft`] if it was the last one.
    pub fn source_lost(&mut self, source: u64) -> Result<(), FetchError> {
        if let Some(si) = self.sources.iter().position(|s| s.id == source) {
            self.lose(si);
        }
        self.check()
    }

    /// When [`StateFetch::handle_timeout`] next has something to do, if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.sources
            .iter()
            .filter(|s| s.live)
            .filter_map(|s| {
                let oldest = s.outstanding.values().min()?;
                Some((*oldest).max(s.last_progress).saturating_add(self.chunk_timeout_ns))
            })
            .min()
    }

    /// Expires requests whose source has delivered nothing for `chunk_timeout_ns` since they
    /// were sent: each piece is asked of another source if there is one, and the source gets
    /// one strike (dropped after [`MAX_STRIKES`] in a row). [`FetchError::NoSourcesLeft`] if
    /// that dropped the last source.
    pub fn handle_timeout(&mut self, now: u64) -> Result<(), FetchError> {
        for si in 0..self.sources.len() {
            let s = &self.sources[si];
            if !s.live {
                continue;
            }
            let since = s.last_progress;
            let expired: Vec<usize> = s
                .outstanding
                .iter()
                .filter(|(_, &sent)| sent.max(since).saturating_add(self.chunk_timeout_ns) <= now)
                .map(|(&p, _)| p)
                .collect();
            if expired.is_empty() {
                continue;
            }
            warn!(source = s.id, requests = expired.len(), "chunk requests timed out; asking elsewhere");
            for &p in expired.iter().rev() {
                self.sources[si].outstanding.remove(&p);
                self.requeue(p, Some(si));
            }
            self.counters.timeouts += expired.len() as u64;
            self.strike(si);
        }
        self.check()
    }

    /// The buffers, in manifest order. Complete only if [`StateFetch::is_done`]; bytes not
    /// yet received are zero.
    pub fn into_buffers(self) -> Vec<Vec<u8>> {
        self.buffers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery::wire::{ManifestRequest, Message};
    use crate::recovery::StateServer;
    use proptest::prelude::*;

    /// Reproducible bytes.
    fn pattern(len: usize, seed: u64) -> Bytes {
        let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<_>>()
            .into()
    }

    /// Sources in memory: each a [`StateServer`] with a FIFO of requests not yet answered.
    struct Cluster {
        state: Vec<(String, Bytes)>,
        servers: Vec<(u64, StateServer)>,
        queues: Vec<VecDeque<Bytes>>,
        dead: Vec<bool>,
    }

    impl Cluster {
        fn new(sizes: &[usize], sources: &[u64]) -> Cluster {
            let state: Vec<(String, Bytes)> =
                sizes.iter().enumerate().map(|(i, &n)| (format!("buf{i}"), pattern(n, i as u64))).collect();
            Cluster {
                servers: sources
                    .iter()
                    .map(|&id| (id, StateServer::new(7, state.clone()).expect("valid state")))
                    .collect(),
                queues: sources.iter().map(|_| VecDeque::new()).collect(),
                dead: sources.iter().map(|_| false).collect(),
                state,
            }
        }

        fn manifest(&mut self) -> Manifest {
            let bytes = self.servers[0].1.handle(99, &ManifestRequest { request: 1 }.encode()).expect("a manifest");
            match Message::decode(&bytes) {
                Ok(Message::Manifest(m)) => m,
                other => panic!("not a manifest: {other:?}"),
            }
        }

        fn index(&self, id: u64) -> usize {
            self.servers.iter().position(|(s, _)| *s == id).expect("a known source")
        }

        /// Queues every request the fetch wants to send; checks no source's window overflows.
        fn send_all(&mut self, fetch: &mut StateFetch, now: u64, window: usize) {
            while let Some((to, req)) = fetch.poll_request(now) {
                let i = self.index(to);
                self.queues[i].push_back(req);
                assert!(self.dead[i] || self.queues[i].len() <= window, "source {to} holds more than its window");
            }
        }

        /// Source `i` answers its oldest request (nothing if dead or idle).
        fn answer(&mut self, i: usize) -> Option<(u64, Bytes)> {
            let req = self.queues[i].pop_front()?;
            if self.dead[i] {
                return None;
            }
            let (id, server) = &mut self.servers[i];
            server.handle(99, &req).map(|r| (*id, r))
        }

        fn kill(&mut self, i: usize) {
            self.dead[i] = true;
            self.queues[i].clear();
        }

        fn check_equal(&self, buffers: &[Vec<u8>]) {
            assert_eq!(buffers.len(), self.state.len());
            for ((name, want), got) in self.state.iter().zip(buffers) {
                assert!(want[..] == got[..], "buffer {name} differs");
            }
        }
    }

    #[test]
    fn pieces_are_striped_over_all_sources() {
        let mut c = Cluster::new(&[10_000, 3_000, 0, 1], &[1, 2, 3]);
        let m = c.manifest();
        let mut f = StateFetch::new(&m, vec![1, 2, 3, 2], 500, 2, 1_000).expect("fits");
        assert_eq!(f.progress(), (0, 13_001));
        let mut now = 0;
        while !f.is_done() {
            c.send_all(&mut f, now, 2);
            for i in 0..3 {
                if let Some((from, reply)) = c.answer(i) {
                    f.handle_message(from, &reply, now).expect("a good chunk");
                }
            }
            now += 1;
        }
        let counters = f.counters();
        assert_eq!(counters.bytes_per_source.len(), 3, "duplicate source ids are merged");
        for (s, b) in &counters.bytes_per_source {
            assert!(*b >= 4_000 && *b <= 5_000, "source {s} served {b} bytes: {counters:?}");
        }
        assert_eq!(counters.re_requests, 0);
        assert_eq!(f.poll_request(now), None);
        c.check_equal(&f.into_buffers());
    }

    #[test]
    fn a_faster_source_gets_more_pieces() {
        let mut c = Cluster::new(&[40_000], &[1, 2, 3]);
        let m = c.manifest();
        let mut f = StateFetch::new(&m, vec![1, 2, 3], 1_000, 2, 1_000).expect("fits");
        let mut now = 0;
        while !f.is_done() {
            // Source 1 answers three requests for every one of the others.
            for i in [0, 0, 0, 1, 2] {
                c.send_all(&mut f, now, 2);
                if let Some((from, reply)) = c.answer(i) {
                    f.handle_message(from, &reply, now).expect("a good chunk");
                }
            }
            now += 1;
        }
        let b = f.counters().bytes_per_source;
        assert!(b[0].1 > 2 * b[1].1 && b[0].1 > 2 * b[2].1, "{b:?}");
        c.check_equal(&f.into_buffers());
    }

    #[test]
    fn a_source_dying_midway_is_replaced_by_the_others() {
        let mut c = Cluster::new(&[100_000, 777], &[1, 2, 3]);
        let m = c.manifest();
        let mut f = StateFetch::new(&m, vec![1, 2, 3], 1_000, 3, 1_000_000).expect("fits");
        let mut now = 0;
        let mut killed = false;
        while !f.is_done() {
            c.send_all(&mut f, now, 3);
            let (done, total) = f.progress();
            if !killed && done * 10 >= total * 3 {
                // Source 2 dies with requests queued; the driver notices.
                assert!(!c.queues[1].is_empty());
                c.kill(1);
                f.source_lost(2).expect("two sources left");
                killed = true;
                continue;
            }
            for i in 0..3 {
                if let Some((from, reply)) = c.answer(i) {
                    f.handle_message(from, &reply, now).expect("a good chunk");
                }
            }
            now += 1;
        }
        let counters = f.counters();
        assert_eq!(counters.sources_lost, vec![2]);
        assert!(counters.re_requests >= 1);
        let b = &counters.bytes_per_source;
        assert!(b[1].1 < b[0].1 && b[1].1 < b[2].1, "{b:?}");
        assert_eq!(f.live_sources().collect::<Vec<_>>(), vec![1, 3]);
        c.check_equal(&f.into_buffers());
    }

    #[test]
    fn a_silent_source_times_out_and_is_dropped_after_three_strikes() {
        let mut c = Cluster::new(&[20_000], &[1, 2]);
        let m = c.manifest();
        let timeout = 1_000;
        let mut f = StateFetch::new(&m, vec![1, 2], 1_000, 1, timeout).expect("fits");
        c.kill(1); // silent: the driver never hears of it
        let mut now = 0;
        let mut strikes_seen = 0;
        while !f.is_done() {
            c.send_all(&mut f, now, 1);
            assert!(f.poll_timeout().is_some_and(|t| t > now), "nothing expires before its time");
            if let Some((from, reply)) = c.answer(0) {
                f.handle_message(from, &reply, now).expect("a good chunk");
            }
            // One answer of source 1 takes 300 ns; the driver's timer runs after each.
            now += 300;
            let before = f.counters().timeouts;
            f.handle_timeout(now).expect("source 1 is alive");
            strikes_seen += (f.counters().timeouts > before) as u32;
        }
        assert_eq!(strikes_seen, MAX_STRIKES);
        let counters = f.counters();
        assert_eq!(counters.sources_lost, vec![2]);
        assert_eq!(counters.timeouts, MAX_STRIKES as u64);
        assert_eq!(counters.bytes_per_source, vec![(1, 20_000), (2, 0)]);
        c.check_equal(&f.into_buffers());
    }

    #[test]
    fn a_corrupted_chunk_is_detected_and_fetched_from_another_source() {
        let mut c = Cluster::new(&[8_000], &[1, 2]);
        let m = c.manifest();
        let mut f = StateFetch::new(&m, vec![1, 2], 1_000, 1, 1_000).expect("fits");
        c.send_all(&mut f, 0, 1);
        // The first answer of source 1 (piece 0) has one bit flipped in its data.
        let (from, reply) = c.answer(0).expect("an answer");
        let mut bad = reply.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 0x10;
        match f.handle_message(from, &bad, 0) {
            Err(e @ FetchError::Checksum { rank: 1, buffer: 0, offset: 0, .. }) => assert!(!e.is_terminal()),
            other => panic!("expected a checksum error, got {other:?}"),
        }
        // The same bytes again (a duplicate of the corrupted message) are not accepted either.
        assert!(f.handle_message(from, &bad, 0).is_err());
        assert_eq!(f.progress().0, 0);
        // Piece 0 now goes to source 2, not back to source 1.
        let mut now = 1;
        let mut first_from_2 = None;
        while !f.is_done() {
            while let Some((to, req)) = f.poll_request(now) {
                if let Ok(Message::ChunkRequest(r)) = Message::decode(&req) {
                    if r.offset == 0 {
                        first_from_2.get_or_insert(to);
                    }
                }
                let i = c.index(to);
                c.queues[i].push_back(req);
            }
            for i in 0..2 {
                if let Some((from, reply)) = c.answer(i) {
                    f.handle_message(from, &reply, now).expect("a good chunk");
                }
            }
            now += 1;
        }
        assert_eq!(first_from_2, Some(2), "the corrupted piece is asked of the other source");
        let counters = f.counters();
        assert_eq!(counters.checksum_failures, 2);
        assert!(counters.re_requests >= 1);
        c.check_equal(&f.into_buffers());
    }

    #[test]
    fn losing_every_source_is_a_clean_error_naming_the_missing_bytes() {
        let mut c = Cluster::new(&[5_000], &[1, 2]);
        let m = c.manifest();
        let mut f = StateFetch::new(&m, vec![1, 2], 1_000, 1, 1_000).expect("fits");
        c.send_all(&mut f, 0, 1);
        let (from, reply) = c.answer(0).expect("an answer");
        f.handle_message(from, &reply, 0).expect("a good chunk");
        assert_eq!(f.source_lost(1), Ok(()));
        assert_eq!(f.source_lost(77), Ok(()), "unknown sources are ignored");
        let e = f.source_lost(2).expect_err("no source left");
        assert_eq!(e, FetchError::NoSourcesLeft { missing_bytes: 4_000 });
        assert!(e.is_terminal());
        assert_eq!(f.check(), Err(e));
        assert_eq!(f.poll_request(1), None);
        // A late chunk from a dropped source is not taken.
        c.send_all(&mut f, 1, 1);
        assert_eq!(f.progress().0, 1_000);
    }

    #[test]
    fn a_source_at_another_step_refuses_and_is_dropped() {
        let mut c = Cluster::new(&[4_000], &[1, 2]);
        let m = c.manifest();
        c.servers[1].1 = StateServer::new(8, c.state.clone()).expect("valid state");
        let mut f = StateFetch::new(&m, vec![1, 2], 1_000, 1, 1_000).expect("fits");
        let mut refusals = 0;
        let mut now = 0;
        while !f.is_done() {
            c.send_all(&mut f, now, 1);
            for i in 0..2 {
                if let Some((from, reply)) = c.answer(i) {
                    match f.handle_message(from, &reply, now) {
                        Ok(()) => {}
                        Err(FetchError::Refused { rank: 2, .. }) => refusals += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            now += 1;
        }
        assert_eq!(refusals, 1);
        assert_eq!(f.counters().sources_lost, vec![2]);
        assert_eq!(f.counters().bytes_per_source[1], (2, 0));
        c.check_equal(&f.into_buffers());
    }

    #[test]
    fn garbage_and_strangers_are_ignored() {
        let mut c = Cluster::new(&[3_000], &[1]);
        let m = c.manifest();
        let mut f = StateFetch::new(&m, vec![1], 1_000, 1, 1_000).expect("fits");
        c.send_all(&mut f, 0, 1);
        let (_, reply) = c.answer(0).expect("an answer");
        // The right bytes from a rank that is not a source.
        assert_eq!(f.handle_message(5, &reply, 0), Ok(()));
        assert!(matches!(f.handle_message(1, b"\x01", 0), Err(FetchError::Malformed { rank: 1, .. })));
        // A valid chunk for a piece never asked of this source.
        let other = c.servers[0].1.handle(1, &ChunkRequest { step: 7, buffer: 0, offset: 2_000, len: 1_000 }.encode());
        assert_eq!(f.handle_message(1, &other.expect("a chunk"), 0), Ok(()));
        // A chunk at an offset that is no piece's.
        let odd = c.servers[0].1.handle(1, &ChunkRequest { step: 7, buffer: 0, offset: 10, len: 1_000 }.encode());
        assert_eq!(f.handle_message(1, &odd.expect("a chunk"), 0), Ok(()));
        assert_eq!(f.progress().0, 0);
        assert_eq!(f.counters().ignored, 4);
        f.handle_message(1, &reply, 0).expect("the real answer");
        assert_eq!(f.progress().0, 1_000);
        f.handle_message(1, &reply, 0).expect("a duplicate");
        assert_eq!(f.counters().duplicates, 1);
        assert_eq!(f.progress().0, 1_000);
    }

    #[test]
    fn chunks_in_pieces_are_taken_without_joining_and_checked_the_same() {
        let mut c = Cluster::new(&[10_000], &[1]);
        let m = c.manifest();
        let mut f = StateFetch::new(&m, vec![1], 1_000, 10, 1_000).expect("fits");
        c.send_all(&mut f, 0, 10);
        let mut k = 0;
        while let Some((from, reply)) = c.answer(0) {
            k += 1;
            let mut reply = reply.to_vec();
            if k == 3 {
                let last = reply.len() - 1;
                reply[last] ^= 1;
            }
            // Header whole in the first piece (k even), or cut inside it (k odd).
            let cut = if k % 2 == 0 { 100 } else { 7 };
            let (a, b) = reply.split_at(cut);
            let (b, d) = b.split_at(500);
            let r = f.handle_message_parts(from, &[a, b, d], 0);
            assert_eq!(r.is_err(), k == 3, "piece {k}: {r:?}");
        }
        assert_eq!(f.counters().checksum_failures, 1);
        c.send_all(&mut f, 1, 10);
        let (from, reply) = c.answer(0).expect("the corrupted piece again");
        f.handle_message_parts(from, &[&reply], 1).expect("a good chunk");
        assert!(f.is_done());
        c.check_equal(&f.into_buffers());
    }

    #[test]
    fn the_callers_buffers_are_reused_when_long_enough() {
        let mut c = Cluster::new(&[3_000, 2_000, 100], &[1]);
        let m = c.manifest();
        let long = vec![0xAA; 5_000];
        let long_ptr = long.as_ptr();
        let mut f = StateFetch::with_buffers(&m, vec![long, vec![0xBB; 10]], vec![1], 1_000, 8, 1_000).expect("fits");
        while !f.is_done() {
            c.send_all(&mut f, 0, 8);
            while let Some((from, reply)) = c.answer(0) {
                f.handle_message(from, &reply, 0).expect("a good chunk");
            }
        }
        let got = f.into_buffers();
        assert_eq!(got[0].as_ptr(), long_ptr, "the long buffer was written in place");
        c.check_equal(&got);
    }

    #[test]
    fn absurd_manifests_are_refused_before_allocating() {
        let m = Manifest { request: 0, step: 0, buffers: vec![("huge".into(), u64::MAX)] };
        assert!(matches!(StateFetch::new(&m, vec![1], 1, 1, 1), Err(FetchError::TooLarge { buffer: 0, .. })));
        let empty = Manifest::default();
        let f = StateFetch::new(&empty, vec![], 0, 0, 0).expect("nothing to fetch");
        assert!(f.is_done());
        assert_eq!(f.check(), Ok(()));
    }

    /// A tiny deterministic generator for the schedule of a property-test case.
    struct Dice(u64);

    impl Dice {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.next() % 100 < percent
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Whatever the sizes, chunking, windows, deaths (reported or silent), corruption and
        /// lost replies: the fetch ends, with the sources' exact bytes or `NoSourcesLeft`.
        #[test]
        fn the_result_is_the_sources_bytes_or_a_clean_error(
            sizes in proptest::collection::vec(0usize..3_000, 0..4),
            nsources in 1usize..4,
            chunk in 1u32..800,
            window in 1usize..4,
            kills in proptest::collection::vec((0u64..60, 0usize..3, any::<bool>()), 0..3),
            corrupt_percent in 0u64..15,
            drop_percent in 0u64..10,
            seed in any::<u64>(),
        ) {
            let ids: Vec<u64> = (1..=nsources as u64).collect();
            let mut c = Cluster::new(&sizes, &ids);
            let m = c.manifest();
            let timeout = 100;
            let mut f = StateFetch::new(&m, ids.clone(), chunk, window, timeout).expect("fits");
            let mut dice = Dice(seed);
            let mut now = 0u64;
            let mut rounds = 0u64;
            let outcome = loop {
                rounds += 1;
                prop_assert!(rounds < 200_000, "the fetch does not end");
                if f.is_done() {
                    break Ok(());
                }
                if let Err(e) = f.check() {
                    break Err(e);
                }
                for &(at, who, reported) in &kills {
                    if at == rounds && who < nsources && !c.dead[who] {
                        c.kill(who);
                        if reported {
                            let _ = f.source_lost(ids[who]);
                        }
                    }
                }
                c.send_all(&mut f, now, window);
                let busy: Vec<usize> = (0..nsources).filter(|&i| !c.queues[i].is_empty()).collect();
                if busy.is_empty() {
                    if f.check().is_err() {
                        continue;
                    }
                    // Nothing in flight anywhere: the next thing that happens is a timeout.
                    let at = f.poll_timeout();
                    prop_assert!(at.is_some(), "nothing outstanding, nothing to time out, not done");
                    now = now.max(at.unwrap_or(now));
                    let _ = f.handle_timeout(now);
                    continue;
                }
                let i = busy[(dice.next() % busy.len() as u64) as usize];
                now += 1 + dice.next() % 5;
                let Some((from, reply)) = c.answer(i) else { continue };
                if dice.chance(drop_percent) {
                    continue;
                }
                let mut reply = reply.to_vec();
                if dice.chance(corrupt_percent) {
                    let at = (dice.next() % reply.len() as u64) as usize;
                    reply[at] ^= 1 << (dice.next() % 8);
                }
                // Delivered as the transport does: in pieces (up to three cuts, anywhere).
                let mut cuts: Vec<usize> = (0..dice.next() % 4).map(|_| (dice.next() % (reply.len() as u64 + 1)) as usize).collect();
                cuts.sort_unstable();
                let mut parts: Vec<&[u8]> = Vec::new();
                let mut start = 0;
                for c in cuts.into_iter().chain([reply.len()]) {
                    parts.push(&reply[start..c]);
                    start = c;
                }
                let _ = f.handle_message_parts(from, &parts, now);
            };
            match outcome {
                Ok(()) => {
                    prop_assert_eq!(f.progress().0, f.progress().1);
                    let got = f.into_buffers();
                    prop_assert_eq!(got.len(), c.state.len());
                    for ((_, want), got) in c.state.iter().zip(&got) {
                        prop_assert!(want[..] == got[..]);
                    }
                }
                Err(FetchError::NoSourcesLeft { missing_bytes }) => {
                    prop_assert_eq!(f.live_sources().count(), 0);
                    prop_assert_eq!(missing_bytes, f.progress().1 - f.progress().0);
                    prop_assert!(missing_bytes > 0);
                }
                Err(e) => prop_assert!(false, "unexpected terminal error {}", e),
            }
        }
    }
}
