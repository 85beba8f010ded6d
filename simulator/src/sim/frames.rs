//! Frame level (`transport.frames = true`): every rank runs its real transport endpoint,
//! `phalanx_proto::Endpoint`, the state machine the tokio driver runs in production. The
//! collectives' messages go through it; its frames — data, acknowledgements, heartbeats,
//! relayed frames — cross the network model one by one on the links between ranks (one per NIC
//! between hosts, one over the host's bus inside a host), each link a FIFO per direction whose
//! frame in flight is a flow of the max-min fair model. Faults act on frames: a dead NIC, WAN
//! link or partition drops what would cross it (nobody is told: the endpoints find out from
//! silence, move their traffic to other paths or relay it through a third rank, and report a
//! peer unreachable after `unreachable_after_ms`), loss drops frames at its rate, corruption
//! delivers them with a failing checksum (the endpoint resends), a crashed rank's endpoint is
//! gone. What the message level models — relaying, the link timeout's delay, resent corrupted
//! chunks, the unreachability verdict — is here the transport's own code.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use phalanx_proto::{ChannelId, DecodeError, Endpoint, Epoch, Event, Frame, Instant, LinkId, RankId, TransportConfig};
use rand::Rng;

use super::{Ev, FlowOwner, Sim, MS};
use crate::fabric::Route;
use crate::fair_share::FlowId;
pub(super) use crate::report::FrameStats;

/// The transport channel of the collectives (the tokio `Communicator` uses the same).
const CHANNEL: ChannelId = ChannelId(1000);

/// The frame-level state of a run.
pub(super) struct Frames {
    /// Per rank: its endpoint (`None` once it crashed).
    endpoints: Vec<Option<Endpoint>>,
    /// Per rank: the endpoint timer armed in the event heap.
    timer_at: Vec<Option<u64>>,
    /// Link `i` is `LinkId(i + 1)`.
    links: Vec<FrameLink>,
    /// Per `(link index, direction)`: direction 0 carries `ends[0] → ends[1]`.
    streams: BTreeMap<(u32, u8), LinkStream>,
}

/// A link between two ranks.
struct FrameLink {
    ends: [u32; 2],
    /// The NIC it uses on both hosts; `None` inside a host.
    nic: Option<usize>,
}

/// One direction of a link: frames in order, one on the wire at a time.
#[derive(Default)]
struct LinkStream {
    queue: VecDeque<Frame>,
    /// The frame on the wire: its flow and route latency.
    active: Option<(FlowId, u64)>,
    last_delivery: u64,
}

impl Frames {
    /// Endpoints for `world` ranks and a link per NIC between every two of them (one inside a
    /// host); `config` from the scenario's transport table.
    pub(super) fn new(world: usize, ranks_per_host: usize, nics: usize, config: &TransportConfig) -> Frames {
        let endpoints =
            (0..world).map(|r| Some(Endpoint::new(RankId(r as u32), 1 + r as u64, Epoch(1), config.clone()))).collect();
        let mut links = Vec::new();
        for a in 0..world {
            for b in a + 1..world {
                let ends = [a as u32, b as u32];
                if a / ranks_per_host == b / ranks_per_host {
                    links.push(FrameLink { ends, nic: None });
                } else {
                    links.extend((0..nics).map(|nic| FrameLink { ends, nic: Some(nic) }));
                }
            }
        }
        Frames { endpoints, timer_at: vec![None; world], links, streams: BTreeMap::new() }
    }
}

fn instant(ns: u64) -> Instant {
    Instant(ns)
}

impl Sim<'_> {
    fn frames(&mut self) -> &mut Frames {
        self.frames.as_mut().expect("frame level")
    }

    /// Every link comes up at time 0 (the handshake is the transport's own tests' business).
    pub(super) fn frames_start(&mut self) {
        let now = instant(self.now);
        let f = self.frames();
        for (i, l) in f.links.iter().enumerate() {
            let [a, b] = l.ends.map(|e| e as usize);
            let (ida, idb) = match (&f.endpoints[a], &f.endpoints[b]) {
                (Some(x), Some(y)) => (x.identity(), y.identity()),
                _ => continue,
            };
            let id = LinkId(i as u64 + 1);
            if let Some(e) = f.endpoints[a].as_mut() {
                e.handle_link_up(now, id, idb);
            }
            if let Some(e) = f.endpoints[b].as_mut() {
                e.handle_link_up(now, id, ida);
            }
        }
        self.stats_frames.links = f.links.len() as u64;
        for r in 0..self.world {
            self.frames_drain(r);
        }
    }

    /// Rank `from`'s group hands a message to its endpoint.
    pub(super) fn frames_send(&mut self, from: usize, to: usize, bytes: Bytes) {
        let now = instant(self.now);
        if let Some(e) = self.frames().endpoints[from].as_mut() {
            // Refused only above `MAX_MESSAGE_BYTES`, far beyond a frame-level run's buffers.
            if let Err(err) = e.send(now, RankId(to as u32), CHANNEL, bytes) {
                tracing::warn!(rank = from, to, error = %err, "message refused by the transport");
            }
        }
    }

    /// Drains rank `r`'s endpoint: frames onto their links, messages and verdicts to its
    /// group, and its next timer into the heap.
    pub(super) fn frames_drain(&mut self, r: usize) {
        let now = instant(self.now);
        let mut transmits = Vec::new();
        let mut events = Vec::new();
        let timeout = {
            let Some(e) = self.frames().endpoints[r].as_mut() else { return };
            while let Some(t) = e.poll_transmit(now) {
                transmits.push(t);
            }
            while let Some(ev) = e.poll_event() {
                events.push(ev);
            }
            e.poll_timeout()
        };
        for t in transmits {
            let i = (t.link.0 - 1) as u32;
            let dir = u8::from(self.frames().links[i as usize].ends[0] as usize != r);
            self.stats_frames.frames += 1;
            let s = self.frames().streams.entry((i, dir)).or_default();
            s.queue.push_back(t.frame);
            if s.active.is_none() && s.queue.len() == 1 {
                self.start_frame((i, dir));
            }
        }
        let mut fed = false;
        for ev in events {
            match ev {
                Event::Message(m) if m.channel == CHANNEL => {
                    if let Some(g) = self.ranks[r].group.as_mut() {
                        g.handle_message_sized(m.from.0 as usize, m.payload.chunks().to_vec(), 0, self.now);
                        fed = true;
                    }
                }
                Event::PeerUnreachable { peer, .. } => {
                    self.stats_frames.peers_unreachable += 1;
                    if let Some(g) = self.ranks[r].group.as_mut() {
                        g.handle_peer_lost(peer.0 as usize, self.now);
                        fed = true;
                    }
                }
                Event::LinkFailed { .. } => self.stats_frames.links_failed += 1,
                _ => {}
            }
        }
        if let Some(Instant(t)) = timeout {
            let (epoch, current) = (self.epoch, self.now);
            let f = self.frames();
            if f.timer_at[r].is_none_or(|at| t < at || at < current) {
                f.timer_at[r] = Some(t);
                self.push(t.max(self.now), Ev::EndpointTimer { rank: r as u32, epoch });
            }
        }
        if fed {
            self.pump(r);
        }
    }

    /// The route a frame of link `i` takes now: `None` when the link's path is dead (a NIC
    /// down at either end, no direct route between the hosts, an end crashed).
    fn link_route(&self, i: u32) -> Option<Route> {
        let f = self.frames.as_ref().expect("frame level");
        let l = &f.links[i as usize];
        let [a, b] = l.ends.map(|e| e as usize);
        if !self.ranks[a].alive || !self.ranks[b].alive {
            return None;
        }
        let (ha, hb) = (self.fabric.host_of(a), self.fabric.host_of(b));
        if let Some(nic) = l.nic {
            if !self.fabric.nic_is_up(ha, nic) || !self.fabric.nic_is_up(hb, nic) {
                return None;
            }
        }
        // The transport relays by itself, through a rank: a route the fabric would relay is
        // no direct path.
        self.fabric.route(ha, hb).filter(|r| !r.relayed)
    }

    /// Puts the head frame of stream `key` on the wire, dropping frames while the link is
    /// dead.
    fn start_frame(&mut self, key: (u32, u8)) {
        loop {
            let route = self.link_route(key.0);
            let f = self.frames.as_mut().expect("frame level");
            let Some(s) = f.streams.get_mut(&key) else { return };
            let Some(frame) = s.queue.front() else { return };
            let Some(route) = route else {
                s.queue.pop_front();
                self.stats_frames.dropped += 1;
                continue;
            };
            let wire = frame.wire_len() as f64;
            self.net.bytes += wire as u64;
            let flow = self.fabric.share.start(self.now, route.resources, wire);
            self.set_owner(flow, FlowOwner::Link(key.0, key.1));
            let s = self.frames().streams.get_mut(&key).expect("just used");
            s.active = Some((flow, route.latency_ns));
            return;
        }
    }

    /// The frame on the wire of stream `key` has left: it arrives one latency later, unless
    /// it is lost; the next one starts.
    pub(super) fn frame_sent(&mut self, key: (u32, u8)) {
        let route = self.link_route(key.0);
        let f = self.frames.as_mut().expect("frame level");
        let Some(s) = f.streams.get_mut(&key) else { return };
        let Some((_, latency)) = s.active.take() else { return };
        let Some(frame) = s.queue.pop_front() else { return };
        let at = (self.now + latency).max(s.last_delivery);
        s.last_delivery = at;
        let more = !s.queue.is_empty();
        let to = f.links[key.0 as usize].ends[1 - key.1 as usize];
        match route {
            Some(r) if !(r.loss > 0.0 && self.rng_net.random_bool(r.loss.min(1.0))) => {
                let corrupt = r.corruption > 0.0 && self.rng_net.random_bool(r.corruption.min(1.0));
                self.stats_frames.corrupted += u64::from(corrupt);
                let epoch = self.epoch;
                self.push(at, Ev::Frame { to, link: key.0, epoch, frame: Box::new(frame), corrupt });
            }
            _ => self.stats_frames.dropped += 1,
        }
        if more {
            self.start_frame(key);
        }
    }

    /// A frame reaches rank `to` on link `i` (dropped if the path died while it travelled).
    pub(super) fn frame_arrived(&mut self, to: usize, i: u32, frame: Frame, corrupt: bool) {
        if self.link_route(i).is_none() {
            self.stats_frames.dropped += 1;
            return;
        }
        let now = instant(self.now);
        let link = LinkId(u64::from(i) + 1);
        let Some(e) = self.frames().endpoints[to].as_mut() else { return };
        if corrupt {
            e.handle_decode_error(now, link, DecodeError::Checksum { expected: 0, computed: 1 });
        } else {
            e.handle_frame(now, link, frame);
        }
        self.frames_drain(to);
    }

    /// Rank `r`'s endpoint timer is due.
    pub(super) fn frames_timer(&mut self, r: usize) {
        let now = instant(self.now);
        let f = self.frames();
        f.timer_at[r] = None;
        let Some(e) = f.endpoints[r].as_mut() else { return };
        e.handle_timeout(now);
        self.frames_drain(r);
    }

    /// Paths changed: frames on links that died are lost; the others are re-routed.
    pub(super) fn frames_topology_changed(&mut self) {
        let keys: Vec<(u32, u8)> =
            self.frames().streams.iter().filter(|(_, s)| s.active.is_some()).map(|(k, _)| *k).collect();
        for key in keys {
            let route = self.link_route(key.0);
            let s = self.frames().streams.get_mut(&key).expect("listed");
            let Some((flow, _)) = s.active else { continue };
            match route {
                Some(r) => self.fabric.share.reroute(self.now, flow, r.resources),
                None => {
                    s.active = None;
                    s.queue.pop_front();
                    self.stats_frames.dropped += 1;
                    self.fabric.share.remove(self.now, flow);
                    self.start_frame(key);
                }
            }
        }
    }

    /// Rank `r` crashed: its endpoint is gone, and so is what it had on the wire.
    pub(super) fn frames_crash(&mut self, r: usize) {
        let f = self.frames();
        f.endpoints[r] = None;
        f.timer_at[r] = None;
        self.frames_topology_changed();
    }

    /// The endpoints' counters, summed, into the report.
    pub(super) fn frames_finish(&mut self) {
        let f = self.frames.as_ref().expect("frame level");
        for e in f.endpoints.iter().flatten() {
            let c = e.counters();
            self.stats_frames.retransmits += c.retransmits;
            self.stats_frames.failovers += c.failovers;
            self.stats_frames.relayed_bytes += c.relayed_bytes;
        }
    }
}

/// The transport configuration of a scenario's `[transport]` table.
pub(super) fn transport_config(t: &crate::scenario::TransportSpec) -> TransportConfig {
    let ms = |v: f64| std::time::Duration::from_nanos((v * MS) as u64);
    TransportConfig {
        link_timeout: ms(t.link_timeout_ms),
        unreachable_after: ms(t.unreachable_after_ms),
        chunk_bytes: t.chunk_bytes.0.min(16 << 20) as usize,
        ..TransportConfig::default()
    }
}
