//! A virtual-time harness that wires endpoints together with in-memory links, for tests of the
//! sans-IO core (in the spirit of quinn-proto's `Pair`). Links have a latency and a bandwidth
//! and are FIFO; faults are applied by editing what is in flight.
//!
//! Deterministic: no clock, no threads, no randomness; ties are broken by insertion order.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::Duration;

use bytes::Bytes;

use crate::config::TransportConfig;
use crate::endpoint::{Endpoint, Event};
use crate::frame::{DecodeError, Frame};
use crate::ids::{ChannelId, Epoch, LinkId, RankId};
use crate::session::Message;
use crate::time::Instant;

/// A reproducible payload of `len` bytes that differs per `seed` (xorshift), cheap enough to
/// make hundreds of megabytes of test and benchmark data.
pub fn pattern(len: usize, seed: u64) -> Bytes {
    let mut v = vec![0u8; len];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    Bytes::from(v)
}

/// Fault state of one simulated link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkFault {
    /// Silently drop everything in both directions (a dead cable: nobody is told).
    pub cut: bool,
    /// Deliver this many upcoming data frames as checksum failures.
    pub corrupt_next_data: u32,
    /// Silently drop this many upcoming data frames.
    pub drop_next_data: u32,
    /// Silently drop everything travelling toward this rank (a one-way failure: the other
    /// direction still delivers).
    pub cut_toward: Option<RankId>,
}

struct SimLink {
    a: RankId,
    b: RankId,
    latency: Duration,
    bytes_per_sec: u64,
    busy_until: [Instant; 2],
    fault: LinkFault,
    closed: bool,
}

enum Delivery {
    Frame(Frame),
    Corrupt,
}

/// In-flight deliveries ordered by (time, insertion order).
struct Pending {
    at: Instant,
    order: u64,
    to: RankId,
    link: LinkId,
    what: Delivery,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.order) == (o.at, o.order)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(o.at, o.order))
    }
}

/// A set of endpoints joined by simulated links.
pub struct Harness {
    /// The endpoints, by rank.
    pub endpoints: BTreeMap<RankId, Endpoint>,
    links: BTreeMap<LinkId, SimLink>,
    pending: BinaryHeap<Reverse<Pending>>,
    order: u64,
    next_link: u64,
    /// Current virtual time.
    pub now: Instant,
    /// Messages delivered, per receiving rank, in delivery order.
    pub delivered: BTreeMap<RankId, Vec<Message>>,
    /// Every non-message event, with the rank that emitted it and when.
    pub events: Vec<(Instant, RankId, Event)>,
}

impl Harness {
    /// `n` endpoints (ranks 0..n) with the given config and no links.
    pub fn new(n: u32, config: TransportConfig) -> Harness {
        let endpoints =
            (0..n).map(|r| (RankId(r), Endpoint::new(RankId(r), 1000 + r as u64, Epoch(1), config.clone()))).collect();
        Harness {
            endpoints,
            links: BTreeMap::new(),
            pending: BinaryHeap::new(),
            order: 0,
            next_link: 1,
            now: Instant::ZERO,
            delivered: BTreeMap::new(),
            events: Vec::new(),
        }
    }

    /// Joins `a` and `b` with a new link and tells both endpoints it is up.
    pub fn connect(&mut self, a: RankId, b: RankId, latency: Duration, bytes_per_sec: u64) -> LinkId {
        let id = LinkId(self.next_link);
        self.next_link += 1;
        self.links.insert(
            id,
            SimLink {
                a,
                b,
                latency,
                bytes_per_sec,
                busy_until: [self.now; 2],
                fault: LinkFault::default(),
                closed: false,
            },
        );
        let ida = self.endpoints[&a].identity();
        let idb = self.endpoints[&b].identity();
        let now = self.now;
        self.endpoints.get_mut(&a).expect("rank a").handle_link_up(now, id, idb);
        self.endpoints.get_mut(&b).expect("rank b").handle_link_up(now, id, ida);
        id
    }

    /// Edits a link's faults.
    pub fn fault(&mut self, link: LinkId) -> &mut LinkFault {
        &mut self.links.get_mut(&link).expect("known link").fault
    }

    /// Closes a link: both endpoints are told (like a connection reset).
    pub fn close(&mut self, link: LinkId) {
        let now = self.now;
        if let Some(l) = self.links.get_mut(&link) {
            l.closed = true;
            let (a, b) = (l.a, l.b);
            for r in [a, b] {
                self.endpoints.get_mut(&r).expect("rank").handle_link_closed(now, link);
            }
        }
    }

    /// Queues a message.
    pub fn send(&mut self, from: RankId, to: RankId, channel: ChannelId, payload: impl Into<crate::Payload>) {
        let now = self.now;
        self.endpoints.get_mut(&from).expect("rank").send(now, to, channel, payload).expect("send accepted");
    }

    fn flush(&mut self) {
        let now = self.now;
        let ranks: Vec<RankId> = self.endpoints.keys().copied().collect();
        for r in ranks {
            loop {
                let ep = self.endpoints.get_mut(&r).expect("rank");
                let Some(t) = ep.poll_transmit(now) else {
                    break;
                };
                let Some(l) = self.links.get_mut(&t.link) else {
                    continue;
                };
                if l.closed {
                    continue;
                }
                let (dir, to) = if l.a == r { (0, l.b) } else { (1, l.a) };
                let ser = Duration::from_nanos(t.frame.wire_len() as u64 * 1_000_000_000 / l.bytes_per_sec.max(1));
                let start = l.busy_until[dir].max(now);
                l.busy_until[dir] = start + ser;
                let at = start + ser + l.latency;
                let is_data = t.frame.header.kind == crate::frame::FrameKind::Data;
                let what = if l.fault.cut || l.fault.cut_toward == Some(to) {
                    None
                } else if is_data && l.fault.drop_next_data > 0 {
                    l.fault.drop_next_data -= 1;
                    None
                } else if is_data && l.fault.corrupt_next_data > 0 {
                    l.fault.corrupt_next_data -= 1;
                    Some(Delivery::Corrupt)
                } else {
                    Some(Delivery::Frame(t.frame))
                };
                if let Some(what) = what {
                    self.order += 1;
                    self.pending.push(Reverse(Pending { at, order: self.order, to, link: t.link, what }));
                }
            }
            let ep = self.endpoints.get_mut(&r).expect("rank");
            while let Some(ev) = ep.poll_event() {
                match ev {
                    Event::Message(m) => self.delivered.entry(r).or_default().push(m),
                    other => self.events.push((now, r, other)),
                }
            }
        }
    }

    /// Runs until `done` holds or `until` passes; returns whether `done` held. Bounded by
    /// `max_steps` loop iterations so a livelock fails the test instead of hanging it.
    pub fn run_until(&mut self, until: Instant, max_steps: u64, mut done: impl FnMut(&Harness) -> bool) -> bool {
        for _ in 0..max_steps {
            self.flush();
            if done(self) {
                return true;
            }
            let next_delivery = self.pending.peek().map(|p| p.0.at);
            let next_timer = self.endpoints.values().filter_map(|e| e.poll_timeout()).min();
            let next = match (next_delivery, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(t) => t,
                    None => return done(self),
                },
            };
            if next > until {
                self.now = until;
                return done(self);
            }
            self.now = self.now.max(next);
            let now = self.now;
            while self.pending.peek().is_some_and(|p| p.0.at <= now) {
                let Reverse(p) = self.pending.pop().expect("peeked");
                if self.links.get(&p.link).is_some_and(|l| l.closed || l.fault.cut || l.fault.cut_toward == Some(p.to))
                {
                    continue;
                }
                let ep = self.endpoints.get_mut(&p.to).expect("rank");
                match p.what {
                    Delivery::Frame(f) => ep.handle_frame(now, p.link, f),
                    Delivery::Corrupt => {
                        ep.handle_decode_error(now, p.link, DecodeError::Checksum { expected: 0, computed: 1 })
                    }
                }
            }
            for ep in self.endpoints.values_mut() {
                if ep.poll_timeout().is_some_and(|t| t <= now) {
                    ep.handle_timeout(now);
                }
            }
        }
        false
    }

    /// Messages `to` received from `from`, concatenated in delivery order.
    pub fn received_bytes(&self, to: RankId, from: RankId) -> Vec<u8> {
        self.delivered
            .get(&to)
            .into_iter()
            .flatten()
            .filter(|m| m.from == from)
            .flat_map(|m| m.payload.to_bytes().to_vec())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_by_seed_and_are_reproducible() {
        assert_eq!(pattern(1000, 1), pattern(1000, 1));
        assert_ne!(pattern(1000, 1), pattern(1000, 2));
        assert_eq!(pattern(13, 5).len(), 13);
    }
}
