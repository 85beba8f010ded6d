//! Flow-level bandwidth sharing: max-min fairness over shared resources (NICs, WAN links),
//! recomputed when flows start or end or a capacity changes.
//!
//! A *flow* moves a number of bytes over a route (a list of resources). At any time every
//! flow has a rate; rates are max-min fair: no flow's rate can grow without shrinking a flow
//! whose rate is no larger (progressive filling: raise all rates together, freeze the flows of
//! each resource as it saturates). Between changes rates are constant, so each flow's finish
//! time is known; a change re-solves only the *connected component* of resources and flows it
//! touches, and only once per instant however many changes that instant brings
//! ([`FairShare::settle`]).
//!
//! Determinism: plain `f64` arithmetic in a fixed order (no hash-map iteration, no fused
//! operations), so the same calls give the same times on any machine.

/// Index of a resource.
pub type ResourceId = usize;
/// Index of a flow (reused after the flow ends).
pub type FlowId = usize;

struct Resource {
    /// Bytes per second.
    capacity: f64,
    /// Flows using it.
    flows: Vec<FlowId>,
}

struct Flow {
    route: Vec<ResourceId>,
    /// Bytes left at `updated`.
    remaining: f64,
    /// Bytes per second since `updated`.
    rate: f64,
    updated: u64,
    /// Set on every re-solve from a counter of the whole network (so a flow id reused after
    /// a flow ends never matches an old flow's finish event): an event carrying another
    /// version is stale.
    version: u64,
}

/// A flow's predicted finish, to be scheduled by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finish {
    /// The flow.
    pub flow: FlowId,
    /// When it ends (ns); `None` while its rate is 0.
    pub at: Option<u64>,
    /// The version the finish event must carry.
    pub version: u64,
}

/// A heap entry of the progressive filling: a resource's fair share when pushed.
struct Share {
    share: f64,
    index: usize,
    changed: u32,
}

impl PartialEq for Share {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == std::cmp::Ordering::Equal
    }
}

impl Eq for Share {}

impl PartialOrd for Share {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for Share {
    /// A max-heap pops the least share first, and of equal shares the lowest index.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.share.total_cmp(&self.share).then(o.index.cmp(&self.index))
    }
}

/// Resources and the flows over them.
#[derive(Default)]
pub struct FairShare {
    resources: Vec<Resource>,
    flows: Vec<Option<Flow>>,
    free: Vec<FlowId>,
    dirty: Vec<ResourceId>,
    /// Stamp per resource and flow for component searches.
    seen_resource: Vec<u64>,
    seen_flow: Vec<u64>,
    stamp: u64,
    /// Per resource: its index in the component being solved (scratch).
    slot: Vec<usize>,
    /// Per flow: the solve that froze its rate (scratch), and that solve's number.
    frozen_in: Vec<u64>,
    solves: u64,
    /// Last version handed out.
    versions: u64,
    /// Flows solved so far (a cost measure).
    pub solved: u64,
}

impl FairShare {
    /// An empty network.
    pub fn new() -> FairShare {
        FairShare::default()
    }

    /// Adds a resource of `capacity` bytes per second.
    pub fn add_resource(&mut self, capacity: f64) -> ResourceId {
        self.resources.push(Resource { capacity: capacity.max(0.0), flows: Vec::new() });
        self.seen_resource.push(0);
        self.slot.push(0);
        self.resources.len() - 1
    }

    /// The capacity of `r`.
    pub fn capacity(&self, r: ResourceId) -> f64 {
        self.resources[r].capacity
    }

    /// Changes the capacity of `r` (0: nothing passes) from `now` on.
    pub fn set_capacity(&mut self, r: ResourceId, capacity: f64) {
        let c = capacity.max(0.0);
        if self.resources[r].capacity != c {
            self.resources[r].capacity = c;
            self.dirty.push(r);
        }
    }

    /// Starts a flow of `bytes` over `route` (not empty) at `now`.
    pub fn start(&mut self, now: u64, route: Vec<ResourceId>, bytes: f64) -> FlowId {
        assert!(!route.is_empty(), "a flow crosses at least one resource");
        let flow = Flow { route, remaining: bytes.max(0.0), rate: 0.0, updated: now, version: 0 };
        let id = match self.free.pop() {
            Some(id) => {
                self.flows[id] = Some(flow);
                id
            }
            None => {
                self.flows.push(Some(flow));
                self.seen_flow.push(0);
                self.frozen_in.push(0);
                self.flows.len() - 1
            }
        };
        self.attach(id);
        id
    }

    fn attach(&mut self, id: FlowId) {
        let route = self.flows[id].as_ref().expect("live flow").route.clone();
        for r in route {
            self.resources[r].flows.push(id);
            self.dirty.push(r);
        }
    }

    fn detach(&mut self, id: FlowId) {
        let route = self.flows[id].as_ref().expect("live flow").route.clone();
        for r in route {
            let fl = &mut self.resources[r].flows;
            if let Some(i) = fl.iter().position(|f| *f == id) {
                fl.swap_remove(i);
            }
            self.dirty.push(r);
        }
    }

    /// Brings `id`'s remaining bytes up to `now`.
    fn advance(&mut self, id: FlowId, now: u64) {
        let f = self.flows[id].as_mut().expect("live flow");
        if now > f.updated {
            f.remaining = (f.remaining - f.rate * (now - f.updated) as f64 * 1e-9).max(0.0);
            f.updated = now;
        }
    }

    /// Ends flow `id` (finished or cancelled) at `now`; returns the bytes it had left.
    pub fn remove(&mut self, now: u64, id: FlowId) -> f64 {
        self.advance(id, now);
        self.detach(id);
        let f = self.flows[id].take().expect("live flow");
        self.free.push(id);
        f.remaining
    }

    /// Moves flow `id` to another route at `now`, keeping the bytes it has left.
    pub fn reroute(&mut self, now: u64, id: FlowId, route: Vec<ResourceId>) {
        assert!(!route.is_empty(), "a flow crosses at least one resource");
        self.advance(id, now);
        self.detach(id);
        self.flows[id].as_mut().expect("live flow").route = route;
        self.attach(id);
    }

    /// The version a finish event of `id` must carry to be current (`None`: no such flow).
    pub fn version(&self, id: FlowId) -> Option<u64> {
        self.flows.get(id).and_then(|f| f.as_ref()).map(|f| f.version)
    }

    /// The current rate of `id` in bytes per second.
    pub fn rate(&self, id: FlowId) -> f64 {
        self.flows[id].as_ref().map_or(0.0, |f| f.rate)
    }

    /// Re-solves the rates of every component touched since the last call, at `now`; returns,
    /// per component re-solved, the flows that finish first and when (earlier finish events of
    /// every flow re-solved are stale; the others get theirs when their component is re-solved
    /// at that finish).
    pub fn settle(&mut self, now: u64) -> Vec<Finish> {
        let mut out = Vec::new();
        let dirty = std::mem::take(&mut self.dirty);
        for r in dirty {
            if self.seen_resource[r] == self.stamp + 1 {
                continue;
            }
            let (res, flows) = self.component(r);
            self.solve(now, &res, &flows, &mut out);
        }
        self.stamp += 1;
        out
    }

    /// The resources and flows connected to `start` (stamped `self.stamp + 1`).
    fn component(&mut self, start: ResourceId) -> (Vec<ResourceId>, Vec<FlowId>) {
        let mark = self.stamp + 1;
        let mut res = vec![start];
        let mut flows = Vec::new();
        self.seen_resource[start] = mark;
        let mut i = 0;
        while i < res.len() {
            let r = res[i];
            i += 1;
            for k in 0..self.resources[r].flows.len() {
                let f = self.resources[r].flows[k];
                if self.seen_flow[f] == mark {
                    continue;
                }
                self.seen_flow[f] = mark;
                flows.push(f);
                for &r2 in &self.flows[f].as_ref().expect("live flow").route {
                    if self.seen_resource[r2] != mark {
                        self.seen_resource[r2] = mark;
                        res.push(r2);
                    }
                }
            }
        }
        (res, flows)
    }

    /// Progressive filling over one component.
    fn solve(&mut self, now: u64, res: &[ResourceId], flows: &[FlowId], out: &mut Vec<Finish>) {
        self.solved += flows.len() as u64;
        for &f in flows {
            self.advance(f, now);
        }
        // Per resource of the component: capacity left and flows not yet frozen.
        let mut left: Vec<f64> = res.iter().map(|r| self.resources[*r].capacity).collect();
        let mut count: Vec<usize> = res.iter().map(|r| self.resources[*r].flows.len()).collect();
        for (i, r) in res.iter().enumerate() {
            self.slot[*r] = i;
        }
        self.solves += 1;
        let solve = self.solves;
        // The resource of least fair share next (ties: the lowest index), from a heap whose
        // entries go stale when their resource's share changes (`changed[i]` counts changes).
        let mut changed = vec![0u32; res.len()];
        let mut heap: std::collections::BinaryHeap<Share> = (0..res.len())
            .filter(|i| count[*i] > 0)
            .map(|i| Share { share: left[i].max(0.0) / count[i] as f64, index: i, changed: 0 })
            .collect();
        while let Some(Share { share, index: i, changed: c }) = heap.pop() {
            if c != changed[i] || count[i] == 0 {
                continue;
            }
            let r = res[i];
            for k in 0..self.resources[r].flows.len() {
                let f = self.resources[r].flows[k];
                if self.frozen_in[f] == solve {
                    continue;
                }
                self.frozen_in[f] = solve;
                let flow = self.flows[f].as_mut().expect("live flow");
                flow.rate = share;
                for r2 in &flow.route {
                    let j = self.slot[*r2];
                    left[j] -= share;
                    count[j] -= 1;
                    changed[j] += 1;
                    if count[j] > 0 && j != i {
                        heap.push(Share { share: left[j].max(0.0) / count[j] as f64, index: j, changed: changed[j] });
                    }
                }
            }
        }
        // Only the component's first finish is an event: rates hold until the component
        // changes, and that flow's end changes it (re-solving it and scheduling the next).
        // Scheduling every flow instead makes a component of F flows that end one by one push
        // F² events (seen at 16,384 ranks). Earlier events of every flow here are stale now.
        let mut first: Option<u64> = None;
        let start = out.len();
        for &f in flows {
            self.versions += 1;
            let flow = self.flows[f].as_mut().expect("live flow");
            flow.version = self.versions;
            let at = (flow.rate > 0.0).then(|| now + (flow.remaining / flow.rate * 1e9).ceil() as u64);
            if let Some(t) = at {
                first = Some(first.map_or(t, |m| m.min(t)));
            }
            out.push(Finish { flow: f, at, version: flow.version });
        }
        let mut k = start;
        for i in start..out.len() {
            if out[i].at.is_some() && out[i].at == first {
                out.swap(k, i);
                k += 1;
            }
        }
        out.truncate(k);
    }

    /// When flow `f` ends at its current rate (ns), `None` if its rate is 0 or it is gone.
    pub fn finish_time(&self, f: FlowId) -> Option<u64> {
        let flow = self.flows.get(f)?.as_ref()?;
        (flow.rate > 0.0).then(|| flow.updated + (flow.remaining / flow.rate * 1e9).ceil() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn finish_of(v: &[Finish], f: FlowId) -> Option<u64> {
        v.iter().rev().find(|x| x.flow == f).and_then(|x| x.at)
    }

    #[test]
    fn one_flow_runs_at_its_bottleneck() {
        let mut n = FairShare::new();
        let a = n.add_resource(100.0);
        let b = n.add_resource(50.0);
        let f = n.start(0, vec![a, b], 100.0);
        let v = n.settle(0);
        assert_eq!(finish_of(&v, f), Some(2 * S));
    }

    #[test]
    fn flows_share_fairly_and_take_up_what_others_leave() {
        // Two flows on `a` (cap 100); flow 2 is also limited by `b` (cap 20): max-min gives it
        // 20 and flow 1 the 80 left.
        let mut n = FairShare::new();
        let a = n.add_resource(100.0);
        let b = n.add_resource(20.0);
        let f1 = n.start(0, vec![a], 160.0);
        let f2 = n.start(0, vec![a, b], 20.0);
        let v = n.settle(0);
        assert_eq!((n.rate(f1), n.rate(f2)), (80.0, 20.0));
        assert_eq!(finish_of(&v, f2), Some(S));
        // When flow 2 ends at 1 s, flow 1 (80 bytes left) gets all 100.
        n.remove(S, f2);
        let v = n.settle(S);
        assert_eq!(n.rate(f1), 100.0);
        assert_eq!(finish_of(&v, f1), Some(S + 800_000_000));
    }

    #[test]
    fn a_zero_capacity_stalls_until_it_returns() {
        let mut n = FairShare::new();
        let a = n.add_resource(10.0);
        let f = n.start(0, vec![a], 10.0);
        n.settle(0);
        n.set_capacity(a, 0.0);
        let v = n.settle(S / 2);
        assert_eq!(finish_of(&v, f), None);
        n.set_capacity(a, 10.0);
        let v = n.settle(S);
        assert_eq!(finish_of(&v, f), Some(S + S / 2), "5 bytes left at 10 B/s");
    }

    #[test]
    fn a_reused_flow_id_never_matches_an_old_finish_event() {
        let mut n = FairShare::new();
        let a = n.add_resource(10.0);
        let f = n.start(0, vec![a], 10.0);
        let old = n.settle(0)[0];
        n.remove(S / 2, f);
        n.settle(S / 2);
        let g = n.start(S / 2, vec![a], 10.0);
        assert_eq!(g, f, "the id is reused");
        let new = n.settle(S / 2)[0];
        assert_ne!(new.version, old.version);
        assert_ne!(n.version(g), Some(old.version));
    }

    #[test]
    fn untouched_components_keep_their_versions() {
        let mut n = FairShare::new();
        let a = n.add_resource(10.0);
        let b = n.add_resource(10.0);
        let fa = n.start(0, vec![a], 10.0);
        n.settle(0);
        let before = n.version(fa);
        n.start(0, vec![b], 10.0);
        let v = n.settle(0);
        assert_eq!(n.version(fa), before);
        assert!(v.iter().all(|x| x.flow != fa));
    }

    proptest::proptest! {
        #[test]
        fn rates_are_feasible_and_every_flow_has_a_saturated_bottleneck(
            caps in proptest::collection::vec(1.0f64..1000.0, 1..6),
            routes in proptest::collection::vec(proptest::collection::btree_set(0usize..6, 1..4), 1..12),
        ) {
            let mut n = FairShare::new();
            let ids: Vec<_> = caps.iter().map(|c| n.add_resource(*c)).collect();
            let mut flows = Vec::new();
            for r in &routes {
                let route: Vec<_> = r.iter().filter(|i| **i < ids.len()).map(|i| ids[*i]).collect();
                if !route.is_empty() {
                    flows.push((n.start(0, route.clone(), 1e6), route));
                }
            }
            n.settle(0);
            let mut load = vec![0.0; ids.len()];
            for (f, route) in &flows {
                for r in route {
                    load[*r] += n.rate(*f);
                }
            }
            for (r, c) in caps.iter().enumerate() {
                proptest::prop_assert!(load[r] <= c * (1.0 + 1e-9), "resource {} over capacity", r);
            }
            // Max-min: each flow crosses a saturated resource on which no flow is faster.
            for (f, route) in &flows {
                let bottleneck = route.iter().any(|r| {
                    load[*r] >= caps[*r] * (1.0 - 1e-9)
                        && flows.iter().filter(|(_, rt)| rt.contains(r)).all(|(g, _)| n.rate(*g) <= n.rate(*f) * (1.0 + 1e-9))
                });
                proptest::prop_assert!(bottleneck, "flow {} has no bottleneck", f);
            }
        }
    }
}
