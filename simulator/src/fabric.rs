//! The simulated machine room: data centres → hosts → ranks, each host's NICs, the link
//! inside each host, and a WAN link per ordered pair of data centres; their state under faults;
//! and the route a message takes.
//!
//! Model (written up in `docs/simulator.md`): a host's NICs are pooled (the transport stripes
//! over its paths), one resource per direction; the fabric inside a data centre is
//! non-blocking, so two hosts of a data centre are limited only by their NICs; a message
//! between data centres also crosses the WAN link, or, with that link down, is relayed through
//! a third data centre (the transport's one-hop relay). Packet loss of rate `p` leaves `1 − p`
//! of a resource's capacity (first-order: retransmission of what was lost).

use crate::fair_share::{FairShare, ResourceId};
use crate::scenario::TopologySpec;

/// Where a message goes and what it meets.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// Resources crossed.
    pub resources: Vec<ResourceId>,
    /// One-way latency, ns.
    pub latency_ns: u64,
    /// Probability that a frame on this route is corrupted (the largest of its links').
    pub corruption: f64,
    /// Relayed through another data centre.
    pub relayed: bool,
    /// Probability that a packet (a frame, at frame level) on this route is lost (the largest
    /// of its links').
    pub loss: f64,
}

/// Link-level fault state of one resource group (a host's NICs or a WAN link).
#[derive(Clone, Copy, Debug, Default)]
struct LinkState {
    loss: f64,
    extra_latency_ns: u64,
    corruption: f64,
}

/// The network: topology, resource capacities and fault state.
pub struct Fabric {
    /// The bandwidth-sharing model.
    pub share: FairShare,
    dcs: usize,
    hosts_per_dc: usize,
    ranks_per_host: usize,
    nics_per_host: usize,
    nic_bps: f64,
    wan_bps: f64,
    host_latency_ns: u64,
    dc_latency_ns: u64,
    wan_latency_ns: u64,
    host_tx: Vec<ResourceId>,
    host_rx: Vec<ResourceId>,
    host_bus: Vec<ResourceId>,
    /// Directed WAN links, `a * dcs + b`.
    wan: Vec<ResourceId>,
    nic_up: Vec<Vec<bool>>,
    /// Undirected WAN link state, `min * dcs + max`: down counter (overlapping faults).
    wan_down: Vec<u32>,
    host_link: Vec<LinkState>,
    wan_link: Vec<LinkState>,
    /// Active partitions: each gives every host a side; hosts on different sides of any
    /// partition cannot reach each other.
    partitions: Vec<(u64, Vec<u32>)>,
    /// Loss costs capacity (message level: what the transport's retransmissions take); at
    /// frame level the transport's own retransmissions pay for it instead.
    loss_costs_capacity: bool,
}

fn gbit(g: f64) -> f64 {
    g * 1e9 / 8.0
}

impl Fabric {
    /// The network of `t`, everything up.
    pub fn new(t: &TopologySpec) -> Fabric {
        let mut share = FairShare::new();
        let hosts = t.hosts();
        let nic_bps = gbit(t.nic_gbit_s);
        let wan_bps = gbit(t.wan_gbit_s);
        let host_tx = (0..hosts).map(|_| share.add_resource(nic_bps * t.nics_per_host as f64)).collect();
        let host_rx = (0..hosts).map(|_| share.add_resource(nic_bps * t.nics_per_host as f64)).collect();
        let host_bus = (0..hosts).map(|_| share.add_resource(gbit(t.host_gbit_s))).collect();
        let wan = (0..t.dcs * t.dcs).map(|_| share.add_resource(wan_bps)).collect();
        Fabric {
            share,
            dcs: t.dcs,
            hosts_per_dc: t.hosts_per_dc,
            ranks_per_host: t.ranks_per_host,
            nics_per_host: t.nics_per_host,
            nic_bps,
            wan_bps,
            host_latency_ns: (t.host_latency_us * 1e3).round() as u64,
            dc_latency_ns: (t.dc_latency_us * 1e3).round() as u64,
            wan_latency_ns: (t.wan_latency_ms * 1e6).round() as u64,
            host_tx,
            host_rx,
            host_bus,
            wan,
            nic_up: vec![vec![true; t.nics_per_host]; hosts],
            wan_down: vec![0; t.dcs * t.dcs],
            host_link: vec![LinkState::default(); hosts],
            wan_link: vec![LinkState::default(); t.dcs * t.dcs],
            partitions: Vec::new(),
            loss_costs_capacity: true,
        }
    }

    /// Frame level: lost frames are dropped one by one (see [`Route::loss`]) and cost no
    /// capacity up front.
    pub fn set_frame_level(&mut self) {
        self.loss_costs_capacity = false;
    }

    /// Whether NIC `nic` of `host` is up.
    pub fn nic_is_up(&self, host: usize, nic: usize) -> bool {
        self.nic_up[host][nic.min(self.nics_per_host - 1)]
    }

    /// NICs per host.
    pub fn nics_per_host(&self) -> usize {
        self.nics_per_host
    }

    /// Host of `rank`.
    pub fn host_of(&self, rank: usize) -> usize {
        rank / self.ranks_per_host
    }

    /// Data centre of `host`.
    pub fn dc_of_host(&self, host: usize) -> usize {
        host / self.hosts_per_dc
    }

    /// The resource of traffic inside `host` (also what processing draws on, with
    /// `rank_work`).
    pub fn host_bus(&self, host: usize) -> ResourceId {
        self.host_bus[host]
    }

    /// Number of hosts.
    pub fn hosts(&self) -> usize {
        self.host_tx.len()
    }

    /// Ranks on `host`.
    pub fn ranks_of_host(&self, host: usize) -> std::ops::Range<usize> {
        host * self.ranks_per_host..(host + 1) * self.ranks_per_host
    }

    fn wan_index(&self, a: usize, b: usize) -> usize {
        a.min(b) * self.dcs + a.max(b)
    }

    fn nics_up(&self, host: usize) -> usize {
        self.nic_up[host].iter().filter(|u| **u).count()
    }

    fn refresh_host(&mut self, host: usize) {
        let kept = if self.loss_costs_capacity { 1.0 - self.host_link[host].loss } else { 1.0 };
        let cap = self.nic_bps * self.nics_up(host) as f64 * kept;
        self.share.set_capacity(self.host_tx[host], cap);
        self.share.set_capacity(self.host_rx[host], cap);
    }

    fn refresh_wan(&mut self, a: usize, b: usize) {
        let i = self.wan_index(a, b);
        let kept = if self.loss_costs_capacity { 1.0 - self.wan_link[i].loss } else { 1.0 };
        let cap = if self.wan_down[i] > 0 { 0.0 } else { self.wan_bps * kept };
        self.share.set_capacity(self.wan[a * self.dcs + b], cap);
        self.share.set_capacity(self.wan[b * self.dcs + a], cap);
    }

    /// NIC `nic` of `host` goes down (`up = false`) or comes back.
    pub fn set_nic(&mut self, host: usize, nic: usize, up: bool) {
        self.nic_up[host][nic.min(self.nics_per_host - 1)] = up;
        self.refresh_host(host);
    }

    /// The WAN link between `a` and `b` goes down (counted: overlapping faults nest) or
    /// comes back.
    pub fn set_wan(&mut self, a: usize, b: usize, up: bool) {
        let i = self.wan_index(a, b);
        if up {
            self.wan_down[i] = self.wan_down[i].saturating_sub(1);
        } else {
            self.wan_down[i] += 1;
        }
        self.refresh_wan(a, b);
    }

    /// Sets loss, extra latency and corruption of a link: `Ok(host)` (its NICs) or
    /// `Err((a, b))` (the WAN link), changing them by `apply`.
    pub fn update_link(
        &mut self,
        target: Result<usize, (usize, usize)>,
        apply: impl FnOnce(&mut f64, &mut u64, &mut f64),
    ) {
        match target {
            Ok(h) => {
                let s = &mut self.host_link[h];
                apply(&mut s.loss, &mut s.extra_latency_ns, &mut s.corruption);
                self.refresh_host(h);
            }
            Err((a, b)) => {
                let i = self.wan_index(a, b);
                let s = &mut self.wan_link[i];
                apply(&mut s.loss, &mut s.extra_latency_ns, &mut s.corruption);
                self.refresh_wan(a, b);
            }
        }
    }

    /// Starts a partition (`id` names it for [`Fabric::heal`]): `side_of_host[h]` gives each
    /// host its side.
    pub fn partition(&mut self, id: u64, side_of_host: Vec<u32>) {
        self.partitions.push((id, side_of_host));
    }

    /// Ends partition `id`.
    pub fn heal(&mut self, id: u64) {
        self.partitions.retain(|(p, _)| *p != id);
    }

    /// Sides of a partition cutting data centres apart (`sides` lists the DCs of each side;
    /// unlisted DCs form one more side).
    pub fn sides_by_dc(&self, sides: &[Vec<usize>]) -> Vec<u32> {
        (0..self.hosts())
            .map(|h| {
                let dc = self.dc_of_host(h);
                sides.iter().position(|s| s.contains(&dc)).unwrap_or(sides.len()) as u32
            })
            .collect()
    }

    fn separated(&self, a: usize, b: usize) -> bool {
        self.partitions.iter().any(|(_, side)| side[a] != side[b])
    }

    /// The route from host `a` to host `b`, or `None` if nothing connects them now.
    pub fn route(&self, a: usize, b: usize) -> Option<Route> {
        if a == b {
            return Some(Route {
                resources: vec![self.host_bus[a]],
                latency_ns: self.host_latency_ns,
                corruption: 0.0,
                relayed: false,
                loss: 0.0,
            });
        }
        if self.separated(a, b) || self.nics_up(a) == 0 || self.nics_up(b) == 0 {
            return None;
        }
        let (la, lb) = (&self.host_link[a], &self.host_link[b]);
        let mut latency = self.dc_latency_ns + la.extra_latency_ns + lb.extra_latency_ns;
        let mut corruption = la.corruption.max(lb.corruption);
        let mut loss = la.loss.max(lb.loss);
        let (da, db) = (self.dc_of_host(a), self.dc_of_host(b));
        if da == db {
            return Some(Route {
                resources: vec![self.host_tx[a], self.host_rx[b]],
                latency_ns: latency,
                corruption,
                relayed: false,
                loss,
            });
        }
        let wan_ok = |x: usize, y: usize| self.wan_down[self.wan_index(x, y)] == 0;
        let wan_state = |x: usize, y: usize| self.wan_link[self.wan_index(x, y)];
        if wan_ok(da, db) {
            let w = wan_state(da, db);
            latency += self.wan_latency_ns + w.extra_latency_ns;
            corruption = corruption.max(w.corruption);
            loss = loss.max(w.loss);
            let resources = vec![self.host_tx[a], self.wan[da * self.dcs + db], self.host_rx[b]];
            return Some(Route { resources, latency_ns: latency, corruption, relayed: false, loss });
        }
        // One-hop relay through the lowest data centre that reaches both (a host there
        // forwards; its NICs are not modelled as a bottleneck).
        let relay_host = |dc: usize| dc * self.hosts_per_dc;
        let k = (0..self.dcs).find(|&k| {
            k != da
                && k != db
                && wan_ok(da, k)
                && wan_ok(k, db)
                && !self.separated(a, relay_host(k))
                && !self.separated(relay_host(k), b)
        })?;
        let (w1, w2) = (wan_state(da, k), wan_state(k, db));
        latency += 2 * self.wan_latency_ns + w1.extra_latency_ns + w2.extra_latency_ns;
        corruption = corruption.max(w1.corruption).max(w2.corruption);
        loss = loss.max(w1.loss).max(w2.loss);
        let resources =
            vec![self.host_tx[a], self.wan[da * self.dcs + k], self.wan[k * self.dcs + db], self.host_rx[b]];
        Some(Route { resources, latency_ns: latency, corruption, relayed: true, loss })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(dcs: usize) -> TopologySpec {
        TopologySpec {
            dcs,
            hosts_per_dc: 2,
            ranks_per_host: 2,
            nics_per_host: 2,
            nic_gbit_s: 8.0,
            host_gbit_s: 80.0,
            host_latency_us: 1.0,
            dc_latency_us: 5.0,
            wan_gbit_s: 4.0,
            wan_latency_ms: 10.0,
            rank_gbyte_s: None,
            rank_work: None,
        }
    }

    #[test]
    fn routes_follow_the_topology() {
        let f = Fabric::new(&topo(2));
        assert_eq!(f.route(0, 0).expect("same host").latency_ns, 1_000);
        assert_eq!(f.route(0, 1).expect("same dc").resources.len(), 2);
        let wan = f.route(0, 2).expect("across the WAN");
        assert_eq!((wan.resources.len(), wan.latency_ns), (3, 10_005_000));
    }

    #[test]
    fn a_dead_wan_link_is_relayed_around_when_a_third_dc_reaches_both() {
        let mut f = Fabric::new(&topo(3));
        f.set_wan(0, 1, false);
        let r = f.route(0, 2).expect("relayed");
        assert!(r.relayed && r.resources.len() == 4);
        f.set_wan(0, 2, false);
        assert_eq!(f.route(0, 2), None, "no relay left");
        f.set_wan(0, 1, true);
        assert!(!f.route(0, 2).expect("direct again").relayed);
    }

    #[test]
    fn nics_pool_and_a_host_without_nics_is_cut_off() {
        let mut f = Fabric::new(&topo(1));
        let tx = f.route(0, 1).expect("up").resources[0];
        assert_eq!(f.share.capacity(tx), 2e9);
        f.set_nic(0, 0, false);
        assert_eq!(f.share.capacity(tx), 1e9);
        f.set_nic(0, 1, false);
        assert_eq!(f.route(0, 1), None);
        assert!(f.route(0, 0).is_some(), "ranks on one host still talk");
    }

    #[test]
    fn partitions_cut_between_sides_only() {
        let mut f = Fabric::new(&topo(2));
        let sides = f.sides_by_dc(&[vec![0]]);
        f.partition(7, sides);
        assert!(f.route(0, 1).is_some() && f.route(2, 3).is_some());
        assert_eq!(f.route(1, 2), None);
        f.heal(7);
        assert!(f.route(1, 2).is_some());
    }
}
