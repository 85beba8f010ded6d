//! The endpoint: one rank's view of the transport. Owns the paths (links) to every peer, one
//! [`PeerSession`] per peer, routing (direct, striped, or relayed through a third rank),
//! heartbeats, epoch fencing and the timers of all of it.
//!
//! # Call order (as in `quinn-proto`)
//! Inputs are `handle_*(now, …)`; commands are [`Endpoint::send`] and friends; outputs are
//! drained with [`Endpoint::poll_transmit`] (frames to write on a link) and
//! [`Endpoint::poll_event`] (messages and faults for the application), and
//! [`Endpoint::poll_timeout`] says when to call [`Endpoint::handle_timeout`] next. After any
//! input or command, drain transmits and events before waiting again. `now` never goes back.
//!
//! # Promises under faults
//! - A message is delivered once, intact, and in order per (sender, channel), whatever paths
//!   die, as long as some route remains.
//! - A link that delivers nothing for `link_timeout` is declared dead; its unacknowledged
//!   frames move to other paths, or through a relay rank when no direct path is left.
//! - A peer with no route for `unreachable_after` (or whose acknowledgements stop for that long
//!   while data is outstanding) is reported once as [`Event::PeerUnreachable`]; its queued data
//!   is kept (it is delivered if a route returns) until [`Endpoint::abandon_peer`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::config::TransportConfig;
use crate::counters::{EndpointCounters, LinkCounters};
use crate::frame::{self, DecodeError, Frame, FrameFlags, FrameKind, Header};
use crate::handshake::LinkIdentity;
use crate::ids::{ChannelId, Epoch, LinkId, RankId};
use crate::path::{InFlight, PathState};
use crate::payload::Payload;
use crate::session::{Incoming, Message, PeerSession};
use crate::time::Instant;

/// Largest message the endpoint will assemble (a bound on what a peer can make us allocate).
pub const MAX_MESSAGE_BYTES: u64 = 1 << 34;
/// Most ranks listed in one heartbeat's reachability list.
const MAX_ADVERTISED: usize = 4096;

/// The last frame of a message of at least this many bytes is acknowledged at once, not with
/// the next batch or after the ack delay: a sender that sent a large buffer uncopied (a
/// collective's own block, `phalanx_collectives::lending`) gets it back as soon as the peer
/// has it — before the peer's application, done with the message, may be too busy to let its
/// endpoint send the delayed ack. One small frame per such message, next to at least 256 KiB.
pub const PROMPT_ACK_MESSAGE: u64 = 256 << 10;
/// A data frame of at most this many payload bytes to a peer whose received frames have waited
/// for a delayed acknowledgement for half the ack delay or more takes that acknowledgement
/// along: the ack is queued right behind it on the same link, where a link writer sends both
/// in one write (a frame this small goes through the writer's buffer), instead of as a write
/// of its own when the ack timer fires — which on loopback also costs the peer a wake-up and a
/// read. (Not sooner: an ack behind every small frame of a steady exchange is work of its own.)
/// Larger frames are written straight from their buffer, so an ack behind them would be a
/// write of its own anyway.
pub const ACK_ALONG_MAX_PAYLOAD: usize = 64 << 10;

/// A frame to write on a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The link to write on.
    pub link: LinkId,
    /// The frame.
    pub frame: Frame,
}

/// Why a link was declared dead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkFailure {
    /// Nothing arrived on it for this long.
    Silent(Duration),
    /// The driver reported it closed (socket error, EOF, connection lost).
    Closed,
    /// The peer sent bytes that cannot be framed.
    Protocol(DecodeError),
    /// The peer's handshake announced an epoch below the fence: a zombie, or an endpoint of an
    /// earlier epoch still listening at the address. Refused before it could touch the
    /// session (so it is not mistaken for a restart of the peer).
    StaleEpoch {
        /// The epoch it announced.
        epoch: Epoch,
        /// The fence in force.
        fence: Epoch,
    },
}

/// What the endpoint tells the application and the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A message arrived, whole and in order.
    Message(Message),
    /// A link finished its handshake and carries traffic from now on.
    LinkUp {
        /// The new link.
        link: LinkId,
        /// Its peer.
        peer: RankId,
    },
    /// A link is dead; the driver must close it. Its traffic has moved elsewhere.
    LinkFailed {
        /// The dead link.
        link: LinkId,
        /// Its peer.
        peer: RankId,
        /// Why.
        reason: LinkFailure,
    },
    /// No route to `peer` since `since` (or no acknowledgement progress since then). Reported
    /// once per outage. Data to it stays queued until [`Endpoint::abandon_peer`].
    PeerUnreachable {
        /// The peer.
        peer: RankId,
        /// When the outage began.
        since: Instant,
    },
    /// A route to a peer previously reported unreachable came back.
    PeerReachable {
        /// The peer.
        peer: RankId,
    },
    /// The peer restarted (new incarnation): messages to its old incarnation were dropped.
    PeerRestarted {
        /// The peer.
        peer: RankId,
        /// Messages sent to the old incarnation and not acknowledged.
        undelivered_messages: u64,
    },
    /// A frame from an epoch below the fence was refused (reported once per link).
    StaleEpochRefused {
        /// Sender of the frame.
        from: RankId,
        /// Link it came on.
        link: LinkId,
        /// The frame's epoch.
        epoch: Epoch,
        /// The fence in force.
        fence: Epoch,
    },
}

/// Why a command was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum SendError {
    /// The message is larger than any receiver will assemble.
    #[error("message of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Its length.
        len: u64,
        /// The maximum.
        max: u64,
    },
}

/// One rank's transport state machine. See the module docs for call order and promises.
pub struct Endpoint {
    local: RankId,
    incarnation: u64,
    epoch: Epoch,
    fence: Epoch,
    config: TransportConfig,
    paths: BTreeMap<LinkId, PathState>,
    links_by_peer: BTreeMap<RankId, BTreeSet<LinkId>>,
    sessions: BTreeMap<RankId, PeerSession>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    counters: EndpointCounters,
    next_tx: u64,
    send_cursor: Option<RankId>,
    now: Instant,
}

impl Endpoint {
    /// A new endpoint for rank `local`. `incarnation` must differ across restarts of the rank
    /// (the driver draws it from its RNG); peers use it to tell a restart from a reconnect.
    ///
    /// Panics if `config` is inconsistent (see [`TransportConfig::validate`]).
    pub fn new(local: RankId, incarnation: u64, epoch: Epoch, config: TransportConfig) -> Endpoint {
        if let Err(e) = config.validate() {
            panic!("invalid transport config: {e}");
        }
        Endpoint {
            local,
            incarnation,
            epoch,
            fence: Epoch(0),
            config,
            paths: BTreeMap::new(),
            links_by_peer: BTreeMap::new(),
            sessions: BTreeMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            counters: EndpointCounters::default(),
            next_tx: 0,
            send_cursor: None,
            now: Instant::ZERO,
        }
    }

    /// This rank.
    pub fn local(&self) -> RankId {
        self.local
    }

    /// What this rank says about itself in link handshakes.
    pub fn identity(&self) -> LinkIdentity {
        LinkIdentity { rank: self.local, incarnation: self.incarnation, epoch: self.epoch }
    }

    /// The configuration in force.
    pub fn config(&self) -> &TransportConfig {
        &self.config
    }

    /// Totals since start.
    pub fn counters(&self) -> EndpointCounters {
        self.counters
    }

    /// Counters of a live link.
    pub fn link_counters(&self, link: LinkId) -> Option<LinkCounters> {
        self.paths.get(&link).map(|p| p.counters)
    }

    /// Live links and their peers.
    pub fn links(&self) -> impl Iterator<Item = (LinkId, RankId)> + '_ {
        self.paths.iter().map(|(id, p)| (*id, p.peer))
    }

    /// Whether at least one direct link to `peer` is alive.
    pub fn has_direct_path(&self, peer: RankId) -> bool {
        self.links_by_peer.get(&peer).is_some_and(|s| !s.is_empty())
    }

    /// Bytes queued or in flight to `peer` that are not yet acknowledged, in messages.
    pub fn undelivered_messages(&self, peer: RankId) -> u64 {
        self.sessions.get(&peer).map_or(0, |s| s.undelivered_messages())
    }

    /// Sets the epoch stamped on outgoing frames.
    pub fn set_epoch(&mut self, epoch: Epoch) {
        self.epoch = epoch;
    }

    /// Refuses, from now on, every frame whose epoch is below `fence` (stale ranks).
    pub fn set_fence(&mut self, fence: Epoch) {
        self.fence = fence;
        for p in self.paths.values_mut() {
            p.stale_epoch_reported = false;
        }
    }

    fn advance(&mut self, now: Instant) {
        debug_assert!(now >= self.now, "time went back: {now} < {}", self.now);
        self.now = self.now.max(now);
    }

    fn session(&mut self, peer: RankId) -> &mut PeerSession {
        let now = self.now;
        self.sessions.entry(peer).or_insert_with(|| PeerSession::new(peer, now))
    }

    // ----- commands -------------------------------------------------------------------------

    /// Declares that this endpoint has a path to `peer` (it dials it) and waits for it: if no
    /// link to it comes up within `unreachable_after`, it is reported
    /// [`Event::PeerUnreachable`] — a peer that never starts is lost like one that died,
    /// instead of leaving whoever waits for it (a collective's coordinator) waiting forever.
    pub fn expect_peer(&mut self, now: Instant, peer: RankId) {
        self.advance(now);
        if peer == self.local {
            return;
        }
        self.session(peer).expected = true;
        self.refresh_routes(now);
    }

    /// Queues `payload` for `peer` on `channel`. Never blocks; the message is delivered once and
    /// in order, or the peer is reported unreachable. Sending to this rank delivers at once.
    /// A payload of several parts (a [`Payload`]) is sent without joining them: a frame never
    /// spans two parts; the receiver gets the same bytes (chunked by frame, as always).
    pub fn send(
        &mut self,
        now: Instant,
        peer: RankId,
        channel: ChannelId,
        payload: impl Into<Payload>,
    ) -> Result<(), SendError> {
        let payload: Payload = payload.into();
        self.advance(now);
        if payload.len() as u64 > MAX_MESSAGE_BYTES {
            return Err(SendError::TooLarge { len: payload.len() as u64, max: MAX_MESSAGE_BYTES });
        }
        if peer == self.local {
            self.counters.messages_delivered += 1;
            self.counters.payload_bytes_delivered += payload.len() as u64;
            self.events.push_back(Event::Message(Message { from: peer, channel, payload }));
            return Ok(());
        }
        let has_route = self.has_route(peer);
        let s = self.session(peer);
        s.enqueue(channel, payload);
        if !has_route && s.no_route_since.is_none() {
            s.no_route_since = Some(now);
        }
        Ok(())
    }

    /// Drops everything queued for `peer` (the layer above declared it gone). Returns how many
    /// messages were dropped undelivered. The send side numbers from zero again, which a peer
    /// learns only from a new incarnation: call it for a peer that is gone for good or has
    /// restarted, not for one that may come back as it was (its receive side would take the
    /// new messages for duplicates).
    pub fn abandon_peer(&mut self, peer: RankId) -> u64 {
        for p in self.paths.values_mut() {
            p.forget_dst(peer);
        }
        self.sessions.get_mut(&peer).map_or(0, |s| s.reset_send())
    }

    /// Acknowledges at once everything received and not yet acknowledged (instead of waiting
    /// for the delayed-ack timer). Drivers call it before closing, so peers that wait for those
    /// acknowledgements (a flush before exit) are not left waiting.
    pub fn flush_acks(&mut self, now: Instant) {
        self.advance(now);
        let due: Vec<RankId> =
            self.sessions.values().filter(|s| s.ack_due.is_some() || s.frames_since_ack > 0).map(|s| s.peer).collect();
        for peer in due {
            self.send_ack(peer);
        }
    }

    // ----- inputs ---------------------------------------------------------------------------

    /// A link to `peer` finished its handshake and is ready for frames.
    pub fn handle_link_up(&mut self, now: Instant, link: LinkId, peer: LinkIdentity) {
        self.advance(now);
        if peer.epoch < self.fence {
            // Refused before the session sees its incarnation: an endpoint of an older epoch
            // (a zombie, or the previous endpoint still listening at the peer's address) must
            // not make the session believe the peer restarted and drop what is queued for it.
            self.counters.stale_epoch_refused += 1;
            warn!(rank = %self.local, %link, peer = %peer.rank, epoch = %peer.epoch, fence = %self.fence, "link from a stale epoch refused");
            self.events.push_back(Event::StaleEpochRefused {
                from: peer.rank,
                link,
                epoch: peer.epoch,
                fence: self.fence,
            });
            let reason = LinkFailure::StaleEpoch { epoch: peer.epoch, fence: self.fence };
            self.events.push_back(Event::LinkFailed { link, peer: peer.rank, reason });
            return;
        }
        info!(rank = %self.local, %link, peer = %peer.rank, "link up");
        let restarted = {
            let s = self.session(peer.rank);
            let restarted = matches!(s.incarnation, Some(i) if i != peer.incarnation);
            s.incarnation = Some(peer.incarnation);
            s.ever_connected = true;
            restarted
        };
        if restarted {
            let undelivered = self.abandon_peer(peer.rank);
            if let Some(s) = self.sessions.get_mut(&peer.rank) {
                s.reset_receive();
            }
            warn!(rank = %self.local, peer = %peer.rank, undelivered, "peer restarted");
            self.events.push_back(Event::PeerRestarted { peer: peer.rank, undelivered_messages: undelivered });
        }
        self.events.push_back(Event::LinkUp { link, peer: peer.rank });
        self.paths.insert(link, PathState::new(peer.rank, now));
        self.links_by_peer.entry(peer.rank).or_default().insert(link);
        self.refresh_routes(now);
        self.check_invariants();
    }

    /// The driver lost a link (error, EOF, or closed on our request).
    pub fn handle_link_closed(&mut self, now: Instant, link: LinkId) {
        self.advance(now);
        self.fail_link(link, LinkFailure::Closed);
        self.check_invariants();
    }

    /// The driver could not decode bytes on `link`. Checksum errors are counted against the
    /// link, the frame is treated as lost and the sender is told at once (a loss hint on the
    /// same link); other errors kill the link.
    pub fn handle_decode_error(&mut self, now: Instant, link: LinkId, error: DecodeError) {
        self.advance(now);
        if error.is_recoverable() {
            self.counters.checksum_failures += 1;
            if let Some(p) = self.paths.get_mut(&link) {
                p.counters.checksum_failures += 1;
                let peer = p.peer;
                warn!(rank = %self.local, %link, %peer, %error, "checksum failure");
                if self.sessions.contains_key(&peer) {
                    let ack = self.ack_frame(peer, FrameFlags::LOSS_HINT);
                    self.transmits.push_back(Transmit { link, frame: ack });
                }
            }
        } else {
            self.fail_link(link, LinkFailure::Protocol(error));
        }
        self.check_invariants();
    }

    /// A frame arrived on `link`.
    pub fn handle_frame(&mut self, now: Instant, link: LinkId, frame: Frame) {
        self.advance(now);
        let wire = frame.wire_len() as u64;
        let Some(path) = self.paths.get_mut(&link) else {
            return; // late frame from a link already declared dead
        };
        path.last_recv = now;
        path.counters.bytes_received += wire;
        path.counters.frames_received += 1;
        let via = path.peer;
        self.counters.bytes_received += wire;
        self.counters.frames_received += 1;
        let h = frame.header;
        if h.epoch < self.fence {
            self.counters.stale_epoch_refused += 1;
            if !path.stale_epoch_reported {
                path.stale_epoch_reported = true;
                warn!(rank = %self.local, %link, from = %h.src, epoch = %h.epoch, fence = %self.fence, "stale epoch refused");
                self.events.push_back(Event::StaleEpochRefused {
                    from: h.src,
                    link,
                    epoch: h.epoch,
                    fence: self.fence,
                });
            }
            return;
        }
        if h.dst != self.local {
            self.forward(frame);
            return;
        }
        match h.kind {
            FrameKind::Data => self.on_data(now, link, via, frame),
            FrameKind::Ack => self.on_ack(now, link, frame),
            FrameKind::Heartbeat => {
                if let Some(p) = self.paths.get_mut(&link) {
                    let mut adv = frame::decode_ranks(&frame.payload, MAX_ADVERTISED);
                    adv.sort_unstable();
                    adv.dedup();
                    p.advertised = adv;
                }
                let reply = self.control_frame(FrameKind::HeartbeatAck, via, h.aux, Bytes::new());
                self.transmits.push_back(Transmit { link, frame: reply });
                self.refresh_routes(now);
            }
            FrameKind::HeartbeatAck => {
                if let Some(p) = self.paths.get_mut(&link) {
                    if h.aux <= now.as_nanos() {
                        p.on_rtt_sample(now.saturating_since(Instant(h.aux)));
                    }
                }
            }
        }
        self.check_invariants();
    }

    /// Fires every timer due at `now`: heartbeats, link liveness, retransmission timeouts,
    /// delayed acks and unreachability.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        let cfg = self.config.clone();
        // Link liveness first, so heartbeats are not sent on links about to die.
        let silent: Vec<LinkId> =
            self.paths.iter().filter(|(_, p)| now >= p.last_recv + cfg.link_timeout).map(|(id, _)| *id).collect();
        for link in silent {
            let since = now.saturating_since(self.paths[&link].last_recv);
            self.fail_link(link, LinkFailure::Silent(since));
        }
        // Heartbeats carry the list of ranks this rank reaches directly (for relay choice).
        let reachable: Vec<RankId> =
            self.links_by_peer.iter().filter(|(_, l)| !l.is_empty()).map(|(r, _)| *r).take(MAX_ADVERTISED).collect();
        let due: Vec<(LinkId, RankId)> =
            self.paths.iter().filter(|(_, p)| now >= p.next_heartbeat).map(|(id, p)| (*id, p.peer)).collect();
        for (link, peer) in due {
            let payload = frame::encode_ranks(reachable.iter().copied().filter(|r| *r != peer));
            let hb = self.control_frame(FrameKind::Heartbeat, peer, now.as_nanos(), payload);
            self.transmits.push_back(Transmit { link, frame: hb });
            if let Some(p) = self.paths.get_mut(&link) {
                p.next_heartbeat = now + cfg.heartbeat_interval;
            }
        }
        // Retransmission timeouts: the oldest frame on a path waited too long.
        let mut lost: Vec<(LinkId, InFlight)> = Vec::new();
        for (id, p) in self.paths.iter_mut() {
            let rto = p.rto(cfg.min_rto);
            let mut fired = false;
            while let Some(front) = p.inflight.front() {
                if now < front.sent_at + rto {
                    break;
                }
                let e = p.inflight.pop_front().expect("front exists");
                p.inflight_bytes -= e.bytes;
                lost.push((*id, e));
                fired = true;
            }
            if fired {
                p.rto_backoff += 1;
            }
        }
        for (link, e) in lost {
            self.mark_lost(link, e);
        }
        // Delayed acks.
        let acks: Vec<RankId> =
            self.sessions.values().filter(|s| s.ack_due.is_some_and(|t| now >= t)).map(|s| s.peer).collect();
        for peer in acks {
            self.send_ack(peer);
        }
        self.refresh_routes(now);
        self.check_invariants();
    }

    // ----- outputs --------------------------------------------------------------------------

    /// The next frame to write, if any. Control frames (acks, heartbeats, relayed frames) come
    /// first; then data, round-robin over peers, each frame on the path with the most room.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        self.advance(now);
        if let Some(t) = self.transmits.pop_front() {
            self.count_sent(&t);
            return Some(t);
        }
        let t = self.next_data_transmit(now)?;
        self.count_sent(&t);
        Some(t)
    }

    /// The next event for the application or the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Endpoint::handle_timeout`] must be called next (`None`: no timer armed).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let cfg = &self.config;
        let mut t = Instant::FAR_FUTURE;
        for p in self.paths.values() {
            t = t.min(p.next_heartbeat).min(p.last_recv + cfg.link_timeout);
            if let Some(front) = p.inflight.front() {
                t = t.min(front.sent_at + p.rto(cfg.min_rto));
            }
        }
        for s in self.sessions.values() {
            if let Some(a) = s.ack_due {
                t = t.min(a);
            }
            // Mirrors `refresh_routes`: a missing route takes precedence over a stall.
            if !s.unreachable_reported {
                if let Some(since) = s.no_route_since {
                    t = t.min(since + cfg.unreachable_after);
                } else if s.has_unacked() {
                    t = t.min(s.last_ack_progress + cfg.unreachable_after);
                }
            }
        }
        (t != Instant::FAR_FUTURE).then_some(t)
    }

    // ----- internals ------------------------------------------------------------------------

    fn control_frame(&self, kind: FrameKind, dst: RankId, aux: u64, payload: Bytes) -> Frame {
        Frame {
            header: Header {
                kind,
                flags: FrameFlags::default(),
                epoch: self.epoch,
                src: self.local,
                dst,
                channel: ChannelId(0),
                seq: 0,
                aux,
            },
            payload,
            payload_crc: None,
            message: None,
        }
    }

    fn count_sent(&mut self, t: &Transmit) {
        let wire = t.frame.wire_len() as u64;
        self.counters.bytes_sent += wire;
        self.counters.frames_sent += 1;
        if let Some(p) = self.paths.get_mut(&t.link) {
            p.counters.bytes_sent += wire;
            p.counters.frames_sent += 1;
        }
    }

    /// Whether `peer` can be reached now: a direct link, or a live link to a rank that says it
    /// reaches `peer` directly.
    fn has_route(&self, peer: RankId) -> bool {
        self.has_direct_path(peer) || self.paths.values().any(|p| p.peer != peer && p.reaches(peer))
    }

    /// Picks the path for a frame of `len` wire bytes to `dst`: a direct path with room (the
    /// least loaded); if `dst` has no direct path at all, a relay path with room. `None` when
    /// every usable path is full (or none exists). `ignore_window` is for control frames.
    fn pick_path(&self, dst: RankId, len: u64, ignore_window: bool) -> Option<(LinkId, bool)> {
        let window = self.config.path_window_bytes;
        let fits = |p: &PathState| ignore_window || p.inflight_bytes == 0 || p.inflight_bytes + len <= window;
        if let Some(direct) = self.links_by_peer.get(&dst).filter(|s| !s.is_empty()) {
            return direct
                .iter()
                .map(|id| (*id, &self.paths[id]))
                .filter(|(_, p)| fits(p))
                .min_by_key(|(id, p)| (p.inflight_bytes, *id))
                .map(|(id, _)| (id, false));
        }
        self.paths
            .iter()
            .filter(|(_, p)| p.peer != dst && p.reaches(dst) && fits(p))
            .min_by_key(|(id, p)| (p.inflight_bytes, **id))
            .map(|(id, _)| (*id, true))
    }

    fn next_data_transmit(&mut self, now: Instant) -> Option<Transmit> {
        let window_frames = self.config.session_window_frames;
        let chunk = self.config.chunk_bytes;
        let ack_delay = self.config.ack_delay;
        // Round-robin: the peers after the one served last, then the rest from the start.
        let split = self.send_cursor.map_or(RankId(0), |c| RankId(c.0.saturating_add(1)));
        let order: Vec<RankId> = self
            .sessions
            .range(split..)
            .chain(self.sessions.range(..split))
            .filter(|(_, s)| s.has_send_work(window_frames))
            .map(|(r, _)| *r)
            .collect();
        for peer in order {
            let s = &self.sessions[&peer];
            let Some(len) = s.next_frame_len(chunk) else {
                continue;
            };
            let Some((link, relayed)) = self.pick_path(peer, len as u64, false) else {
                continue;
            };
            let tx = self.next_tx;
            let (local, epoch) = (self.local, self.epoch);
            let s = self.sessions.get_mut(&peer).expect("listed above");
            if !s.has_unacked() {
                // Idle time is not a stall: the acknowledgement clock starts with this frame.
                s.last_ack_progress = now;
            }
            let Some((frame, is_retransmit)) = s.take_frame(local, epoch, chunk, window_frames, tx) else {
                continue;
            };
            self.next_tx += 1;
            self.send_cursor = Some(peer);
            let bytes = frame.wire_len() as u64;
            if is_retransmit {
                self.counters.retransmits += 1;
            }
            if relayed {
                self.counters.relayed_out_bytes += frame.payload.len() as u64;
            }
            let half_due = s.ack_due.is_some_and(|due| now + ack_delay / 2 >= due);
            let ack_along = !relayed && frame.payload.len() <= ACK_ALONG_MAX_PAYLOAD && half_due;
            let p = self.paths.get_mut(&link).expect("picked from live paths");
            p.push_inflight(InFlight { dst: peer, seq: frame.header.seq, tx, bytes, sent_at: now });
            if ack_along {
                let ack = self.ack_frame(peer, FrameFlags::default());
                self.transmits.push_back(Transmit { link, frame: ack });
            }
            return Some(Transmit { link, frame });
        }
        None
    }

    fn on_data(&mut self, now: Instant, link: LinkId, via: RankId, frame: Frame) {
        let src = frame.header.src;
        let seq = frame.header.seq;
        let payload_len = frame.payload.len() as u64;
        let ends_large_message =
            frame.header.flags.contains(FrameFlags::LAST) && frame.header.aux >= PROMPT_ACK_MESSAGE;
        let window = self.config.session_window_frames;
        let ack_delay = self.config.ack_delay;
        let config = &self.config;
        let started = self.now;
        let s = self.sessions.entry(src).or_insert_with(|| PeerSession::new(src, started));
        let class = s.classify_incoming(seq, window);
        s.ack_link = (via == src).then_some(link);
        let ack_now = match class {
            Incoming::Duplicate => {
                self.counters.duplicates += 1;
                true
            }
            Incoming::BeyondWindow => true,
            Incoming::InOrder | Incoming::OutOfOrder => {
                let (msgs, violations) = s.accept(frame, MAX_MESSAGE_BYTES);
                s.frames_since_ack += 1;
                s.bytes_since_ack += payload_len;
                let now_due = class == Incoming::OutOfOrder
                    || ends_large_message
                    || config.ack_due(s.frames_since_ack, s.bytes_since_ack);
                if !now_due && s.ack_due.is_none() {
                    s.ack_due = Some(now + ack_delay);
                }
                for v in violations {
                    warn!(rank = %self.local, peer = %src, ?v, "stream violation: chunk dropped");
                }
                for m in msgs {
                    self.counters.messages_delivered += 1;
                    self.counters.payload_bytes_delivered += m.payload.len() as u64;
                    self.events.push_back(Event::Message(m));
                }
                now_due
            }
        };
        if ack_now {
            self.send_ack(src);
        }
    }

    /// An ack of everything received from `peer` (resets the delayed-ack state).
    fn ack_frame(&mut self, peer: RankId, flags: FrameFlags) -> Frame {
        let max = self.config.max_sack_ranges;
        let s = self.session(peer);
        s.frames_since_ack = 0;
        s.bytes_since_ack = 0;
        s.ack_due = None;
        let (cum, ranges, complete_below) = s.ack_state(max);
        let mut ack = self.control_frame(FrameKind::Ack, peer, complete_below, frame::encode_sack(&ranges));
        ack.header.seq = cum;
        ack.header.flags = flags;
        ack
    }

    fn send_ack(&mut self, peer: RankId) {
        let Some(s) = self.sessions.get(&peer) else { return };
        let hint = s.ack_link.filter(|l| self.paths.contains_key(l));
        let ack = self.ack_frame(peer, FrameFlags::default());
        let link = hint.or_else(|| self.pick_path(peer, 0, true).map(|(l, _)| l));
        match link {
            Some(link) => self.transmits.push_back(Transmit { link, frame: ack }),
            None => self.counters.unroutable_dropped += 1,
        }
    }

    fn on_ack(&mut self, now: Instant, link: LinkId, frame: Frame) {
        let peer = frame.header.src;
        let ranges = frame::decode_sack(&frame.payload, self.config.max_sack_ranges);
        let known_below = frame.header.aux;
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        s.on_ack(frame.header.seq, &ranges, now);
        let s = &self.sessions[&peer];
        let mut lost = Vec::new();
        if frame.header.flags.contains(FrameFlags::LOSS_HINT) {
            // The peer saw a corrupted frame on `link`: on a FIFO link that is our oldest
            // transmission to it there that this ack does not cover.
            if let Some(p) = self.paths.get_mut(&link) {
                let oldest = p.inflight.iter().position(|e| e.dst == peer && e.seq < known_below && !s.is_acked(e.seq));
                if let Some(e) = oldest.and_then(|i| p.inflight.remove(i)) {
                    p.inflight_bytes -= e.bytes;
                    lost.push((link, e));
                }
            }
        }
        for (id, p) in self.paths.iter_mut() {
            let (l, any) = p.settle_acks(peer, known_below, |seq| s.is_acked(seq));
            if any {
                p.rto_backoff = 0;
            }
            lost.extend(l.into_iter().map(|e| (*id, e)));
        }
        for (link, e) in lost {
            self.mark_lost(link, e);
        }
    }

    /// A transmission is lost: charge the path and queue the frame again, unless a later
    /// transmission of it is already under way or it was acknowledged.
    fn mark_lost(&mut self, link: LinkId, e: InFlight) {
        let Some(s) = self.sessions.get_mut(&e.dst) else {
            return;
        };
        let Some(sent) = s.unacked.get(&e.seq) else {
            return;
        };
        if sent.last_tx != e.tx {
            return;
        }
        s.retransmit.insert(e.seq);
        if let Some(p) = self.paths.get_mut(&link) {
            p.counters.retransmits += 1;
        }
        debug!(rank = %self.local, %link, dst = %e.dst, seq = e.seq, "frame lost; queued again");
    }

    fn forward(&mut self, mut frame: Frame) {
        let dst = frame.header.dst;
        if frame.header.flags.contains(FrameFlags::RELAYED) {
            self.counters.unroutable_dropped += 1;
            return;
        }
        let link = self
            .links_by_peer
            .get(&dst)
            .and_then(|s| s.iter().min_by_key(|id| (self.paths[*id].inflight_bytes, **id)).copied());
        match link {
            Some(link) => {
                debug!(rank = %self.local, %link, src = %frame.header.src, %dst, seq = frame.header.seq, kind = ?frame.header.kind, "relaying");
                frame.header.flags = frame.header.flags.with(FrameFlags::RELAYED);
                self.counters.relayed_bytes += frame.payload.len() as u64;
                self.transmits.push_back(Transmit { link, frame });
            }
            None => self.counters.unroutable_dropped += 1,
        }
    }

    fn fail_link(&mut self, link: LinkId, reason: LinkFailure) {
        let Some(p) = self.paths.remove(&link) else {
            return;
        };
        warn!(rank = %self.local, %link, peer = %p.peer, ?reason, in_flight = p.inflight.len(), "link failed");
        if let Some(set) = self.links_by_peer.get_mut(&p.peer) {
            set.remove(&link);
        }
        if !p.inflight.is_empty() {
            self.counters.failovers += 1;
        }
        let peer = p.peer;
        for e in p.inflight {
            self.mark_lost_on_dead(link, e);
        }
        self.transmits.retain(|t| t.link != link);
        self.events.push_back(Event::LinkFailed { link, peer, reason });
        let now = self.now;
        self.refresh_routes(now);
    }

    fn mark_lost_on_dead(&mut self, _link: LinkId, e: InFlight) {
        let Some(s) = self.sessions.get_mut(&e.dst) else {
            return;
        };
        if s.unacked.get(&e.seq).is_some_and(|sent| sent.last_tx == e.tx) {
            s.retransmit.insert(e.seq);
        }
    }

    /// Updates each session's route state and reports outages that passed the deadline.
    fn refresh_routes(&mut self, now: Instant) {
        let after = self.config.unreachable_after;
        let peers: Vec<RankId> = self.sessions.keys().copied().collect();
        for peer in peers {
            let route = self.has_route(peer);
            let s = self.sessions.get_mut(&peer).expect("listed");
            let relevant = s.ever_connected || s.expected || s.has_send_work(u64::MAX) || s.has_unacked();
            if route {
                s.no_route_since = None;
            } else if relevant && s.no_route_since.is_none() {
                s.no_route_since = Some(now);
            }
            let stalled_since = s.has_unacked().then_some(s.last_ack_progress).filter(|t| now >= *t + after);
            // With no route the outage began when the last route vanished; with a route that
            // stopped acknowledging, when acknowledgements stopped.
            let outage = match s.no_route_since {
                Some(t) => Some(t).filter(|t| now >= *t + after),
                None => stalled_since,
            };
            match (outage, s.unreachable_reported) {
                (Some(since), false) => {
                    s.unreachable_reported = true;
                    warn!(rank = %self.local, %peer, %since, "peer unreachable");
                    self.events.push_back(Event::PeerUnreachable { peer, since });
                }
                (None, true) if route => {
                    s.unreachable_reported = false;
                    info!(rank = %self.local, %peer, "peer reachable again");
                    self.events.push_back(Event::PeerReachable { peer });
                }
                _ => {}
            }
        }
    }

    /// Asserts the endpoint's invariants (debug builds after every input; always in tests).
    pub fn check_invariants(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        for (id, p) in &self.paths {
            p.check_invariants(*id);
            assert!(self.links_by_peer.get(&p.peer).is_some_and(|s| s.contains(id)));
        }
        for (peer, links) in &self.links_by_peer {
            for l in links {
                assert_eq!(self.paths.get(l).map(|p| p.peer), Some(*peer), "link index out of date");
            }
        }
        for s in self.sessions.values() {
            s.check_invariants(self.config.session_window_frames);
        }
    }
}
