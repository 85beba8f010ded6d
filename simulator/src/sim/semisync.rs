//! The semi-synchronous workload (`kind = "semisync"`): every rank drives the **real**
//! protocol of `phalanx_node::semisync::CrossDcSemiSync` — its sans-IO half,
//! `phalanx_runtime::semisync::CrossDcPlan`, the code that decides in production which
//! collectives run, in which order, under which policy, with which root — over the real
//! collectives' `Group`s: every step a gradient all-reduce in the rank's data centre; at the
//! steps where fragments are due, the DCs' leaders (index 0 of each DC) run the outer rounds and
//! the heals the plan asks for among themselves, then each leader realigns its DC with a
//! broadcast carrying the model, the fragments' outer state and their heal flags.
//!
//! What is modelled rather than computed is only the arithmetic on parameters (anchors, outer
//! optimizer), which is local to a rank: payloads are the simulator's contributions (real:
//! checked against a reference; phantom: lengths). Sizes: a gradient is `bytes`, an outer
//! gradient `outer_bytes / fragments` (e.g. int8), a heal carries a fragment's fp32 anchor and
//! momentum, a realignment the fp32 model plus four fp32 vectors per fragment it carries (as
//! `CrossDcSemiSync` sends them). A realignment's heal flags travel as the bytes would: a
//! receiver adopts the root's flags as they were when the root started the broadcast.

use std::time::Duration;

use phalanx_collectives::group::{AllReduceAlgorithm, CallOptions, FaultPolicy, Op};
use phalanx_collectives::reduce::{DType, ReduceOp};
use phalanx_runtime::semisync::{
    CallGroup, CrossDcPlan, FragmentFlags, PlanConfig, PlannedCall, RoundResult, SyncCall, SyncMode,
};

use super::{add_i64, contribution, op_key, PayloadKind, Sim, MS};

/// A leader's last realignment: its call (epoch, key) and the heal flags of the fragments it
/// carried, as they were when it started.
pub(super) type RealignSent = ((u64, u64), Vec<(usize, FragmentFlags)>);

/// `n` rounded up to whole 8-byte elements.
fn whole(n: u64) -> usize {
    (n.div_ceil(8) * 8) as usize
}

impl Sim<'_> {
    /// Parameter fragments of the outer rounds (1: plain DiLoCo).
    pub(super) fn semisync_fragments(&self) -> usize {
        self.sc.workload.outer_fragments.unwrap_or(1).max(1)
    }

    /// Inner steps per outer round (of one fragment): a commit's worth of progress.
    pub(super) fn semisync_round_steps(&self) -> u64 {
        (self.sc.workload.outer_every.unwrap_or(1) / self.semisync_fragments() as u64).max(1)
    }

    /// A fresh plan, as `CrossDcSemiSync::new` makes it: in-DC rounds under the scenario's
    /// policy (a quorum's `min` capped at half the DC), outer rounds among the leaders (capped
    /// at half the DCs), DiLoCo or streaming DiLoCo every `outer_every` steps.
    pub(super) fn semisync_plan(&self) -> CrossDcPlan {
        let w = &self.sc.workload;
        let policy = |cap: usize| match self.call_options().policy {
            FaultPolicy::Quorum { min, wait } => FaultPolicy::Quorum { min: min.min(cap.div_ceil(2)).max(1), wait },
            p => p,
        };
        let every = w.outer_every.unwrap_or(1);
        let fragments = self.semisync_fragments();
        let mode = match fragments {
            1 => SyncMode::Diloco { every },
            _ => SyncMode::StreamingDiloco { every, fragments },
        };
        let catch_up_wait = Duration::from_nanos((w.catch_up_wait_ms.unwrap_or(5000.0) * MS) as u64);
        let heal_every = w.heal_every.unwrap_or(4);
        let inner =
            PlanConfig { mode: SyncMode::Synchronous, policy: policy(self.per_dc()), catch_up_wait, heal_every };
        let outer = PlanConfig { mode, policy: policy(self.sc.topology.dcs), catch_up_wait, heal_every };
        CrossDcPlan::new(inner, outer)
    }

    /// Fresh groups for the members of a new epoch (membership), after [`Sim::form_member_groups`]
    /// set the layout: a DC's group over its members, the leaders' over the leaders (on
    /// leaders), and the group of all members for the boundary.
    pub(super) fn semisync_member_groups(&mut self, members: &[usize]) {
        let per_dc = self.per_dc();
        for r in members.iter().copied() {
            if !self.ranks[r].alive {
                continue;
            }
            let dc_len = self.layout.dc_members.get(r / per_dc).map_or(0, Vec::len);
            let dc_group = self.layout.index(r, 1, r, per_dc).map(|i| self.new_group(i, dc_len, None));
            let leaders = self.layout.leaders.len();
            let g = self.layout.index(r, 0, r, per_dc).map(|i| self.new_group(i, leaders, None));
            let all = self.layout.index(r, 2, r, per_dc).map(|i| self.new_group(i, members.len(), None));
            let rk = &mut self.ranks[r];
            rk.dc_group = dc_group;
            rk.group = g;
            rk.all_group = all;
            rk.call_channel = 0;
            rk.sync_call = None;
        }
    }

    /// Epoch boundary (membership) at `step`: a joiner rebuilds its plan from what a member of
    /// its DC exports (`CrossDcSemiSync::import`: the step and the heal flags), and every
    /// member calls `group_changed`, as `phalanx train-worker` does.
    pub(super) fn semisync_epoch(&mut self, members: &[usize], step: u64) {
        let per_dc = self.per_dc();
        let fragments = self.semisync_fragments();
        for j in members.iter().copied() {
            let rk = &self.ranks[j];
            if !rk.alive {
                continue;
            }
            if rk.plan.is_none() {
                // The source: a settled member of its DC, else any settled member.
                let settled = |s: &usize| *s != j && self.ranks[*s].alive && self.ranks[*s].plan.is_some();
                let source = members.iter().copied().filter(settled).min_by_key(|s| (s / per_dc != j / per_dc, *s));
                let unhealed = source.and_then(|s| self.ranks[s].plan.as_ref()).map(|p| p.outer().unhealed());
                let mut plan = self.semisync_plan();
                plan.set_step(step);
                if let Some(u) = unhealed {
                    // Same configuration, same fragment count: cannot be refused.
                    let _ = plan.outer_mut().set_unhealed(&u);
                }
                let rk = &mut self.ranks[j];
                rk.plan = Some(plan);
                rk.outer_carry = vec![None; fragments];
            }
            if let Some(p) = self.ranks[j].plan.as_mut() {
                p.group_changed();
            }
        }
    }

    /// Rank `r` computed its step: the gradient round inside its data centre.
    pub(super) fn semisync_gradients(&mut self, r: usize) {
        let per_dc = self.layout.dc_members[r / self.per_dc()].len();
        let Some(plan) = self.ranks[r].plan.as_mut() else { return };
        let call = plan.begin_gradients(per_dc);
        self.contrib.offered += 1;
        self.semisync_start(r, CallGroup::Dc, call, 1);
    }

    /// Rank `r`'s call ended with `result`: the plan learns it and hands out the next call;
    /// when it has none, the step is done.
    pub(super) fn semisync_closed(&mut self, r: usize, result: RoundResult) {
        let per_dc = self.layout.dc_members[r / self.per_dc()].len();
        let dcs = self.layout.leaders.len();
        let rk = &mut self.ranks[r];
        let Some(plan) = rk.plan.as_mut() else { return };
        let leader = rk.group.is_some();
        match rk.sync_call.take() {
            Some(SyncCall::Gradients) => {
                plan.handle_gradients(&result, per_dc);
                plan.after_inner_step(leader);
            }
            Some(SyncCall::Realign { .. }) => plan.handle(&result, per_dc),
            Some(_) => plan.handle(&result, dcs),
            None => {}
        }
        rk.call_compute_ns = 0;
        match plan.poll_call(leader.then_some(dcs)) {
            Some(c) => {
                let riding = plan.outer().riding();
                if matches!(c.call.call, SyncCall::Outer { .. }) {
                    self.contrib.offered += 1;
                }
                self.semisync_start(r, c.group, c.call, riding)
            }
            None => {
                rk.step += 1;
                self.begin_step(r);
            }
        }
    }

    /// Starts the plan's call on rank `r` (`units` contributions riding in it).
    fn semisync_start(&mut self, r: usize, group: CallGroup, planned: PlannedCall, units: u64) {
        let w = &self.sc.workload;
        let real = w.payload == PayloadKind::Real;
        let per_dc = self.per_dc();
        let k = self.semisync_fragments() as u64;
        let step = self.ranks[r].step;
        let (gradient, outer) = (w.bytes.0, w.outer_bytes.map_or(w.bytes.0, |b| b.0));
        let options = CallOptions { policy: planned.policy, verify: w.verify };
        let average = Op::AllReduce { algorithm: AllReduceAlgorithm::Auto, op: ReduceOp::Sum };
        // What the call moves: (op, bytes, this rank is the broadcast's root (as a rank)).
        let (op, bytes, root) = match &planned.call {
            SyncCall::Gradients => (average, whole(gradient), None),
            SyncCall::Outer { .. } => (average, whole(outer / k), None),
            SyncCall::Heal { root, .. } => {
                (Op::Broadcast { root: *root }, whole(2 * gradient / k), Some(self.group_rank(r, 0, *root)))
            }
            SyncCall::Realign { fragments } => {
                let n = gradient + fragments.len() as u64 * 4 * gradient / k + 8;
                (Op::Broadcast { root: 0 }, whole(n), Some(self.group_rank(r, 1, 0)))
            }
        };
        let offered = real.then(|| match (&planned.call, root) {
            (SyncCall::Outer { fragment }, _) => {
                let mut buf = contribution(r, step, bytes);
                if let Some(c) = self.ranks[r].outer_carry[*fragment].take() {
                    add_i64(&mut buf, &c);
                }
                buf
            }
            (_, Some(root)) if root != r => vec![0u8; bytes],
            _ => contribution(r, step, bytes),
        });
        let rk = &mut self.ranks[r];
        rk.sync_call = Some(planned.call.clone());
        let channel = u8::from(group == CallGroup::Dc);
        let g = match group {
            CallGroup::Dc => rk.dc_group.as_mut(),
            CallGroup::Leaders => rk.group.as_mut(),
        };
        let Some(g) = g else { return };
        let op_seq = match &offered {
            Some(b) => g.start(self.now, op, DType::I64, b.clone(), options),
            None => g.start_phantom(self.now, op, DType::I64, bytes, options),
        };
        if let (SyncCall::Realign { fragments }, Some(root)) = (&planned.call, root) {
            if root == r {
                // The heal flags the realignment carries, as the root holds them now.
                let plan = rk.plan.as_ref().expect("a semisync rank has a plan");
                let flags = fragments.iter().map(|f| (*f, plan.outer().fragment_flags(*f))).collect();
                rk.realign_sent = Some(((self.epoch, op_key(channel, r / per_dc, op_seq)), flags));
            }
        }
        self.call_started(r, channel, op_seq, (offered, units), root);
    }

    /// A follower received its leader's realignment (call `key`): it adopts the heal flags the
    /// realignment carried.
    pub(super) fn semisync_realigned(&mut self, r: usize, key: (u64, u64)) {
        let leader = self.group_rank(r, 1, 0);
        if leader == r || leader >= self.world {
            return;
        }
        let Some((sent, flags)) = self.ranks[leader].realign_sent.clone() else { return };
        if sent != key {
            return;
        }
        if let Some(plan) = self.ranks[r].plan.as_mut() {
            for (f, fl) in flags {
                plan.outer_mut().set_fragment_flags(f, fl);
            }
        }
    }
}
