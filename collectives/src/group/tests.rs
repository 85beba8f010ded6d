//! Groups of ranks driven over a deterministic in-process network (FIFO per message, no
//! threads): fault policies, agreement on participants, late contributions, verification.

use super::*;
use crate::reduce::{element_f64, set_element_f64};
use proptest::prelude::*;

const MS: u64 = 1_000_000;

fn f32s(vals: &[f64]) -> Vec<u8> {
    let mut b = vec![0u8; vals.len() * 4];
    for (i, v) in vals.iter().enumerate() {
        set_element_f64(DType::F32, &mut b, i, *v);
    }
    b
}

fn read(b: &[u8]) -> Vec<f64> {
    (0..b.len() / 4).map(|i| element_f64(DType::F32, b, i)).collect()
}

/// `world` groups over a FIFO network; dead ranks neither send nor receive.
struct Net {
    groups: Vec<Group>,
    queue: VecDeque<(usize, usize, Vec<Bytes>)>,
    dead: BTreeSet<usize>,
    now: u64,
    results: Vec<Option<Finished>>,
}

impl Net {
    fn new(world: usize) -> Net {
        Net {
            groups: (0..world).map(|r| Group::new(r, world)).collect(),
            queue: VecDeque::new(),
            dead: BTreeSet::new(),
            now: 0,
            results: (0..world).map(|_| None).collect(),
        }
    }

    fn collect(&mut self) {
        for (r, g) in self.groups.iter_mut().enumerate() {
            if self.dead.contains(&r) {
                continue;
            }
            while let Some((to, m)) = g.poll_send() {
                self.queue.push_back((r, to, m.chunks().to_vec()));
            }
            if let Some(f) = g.finish() {
                assert!(self.results[r].is_none(), "rank {r}: result not taken");
                self.results[r] = Some(f);
            }
        }
    }

    /// Delivers up to `limit` messages (all, if `None`).
    fn run(&mut self, limit: Option<usize>) {
        let mut n = 0;
        loop {
            self.collect();
            if limit.is_some_and(|l| n >= l) {
                return;
            }
            let Some((from, to, m)) = self.queue.pop_front() else { return };
            n += 1;
            if !self.dead.contains(&to) && !self.dead.contains(&from) {
                self.groups[to].handle_message(from, m, self.now);
            }
        }
    }

    fn kill(&mut self, r: usize) {
        self.dead.insert(r);
        for (p, g) in self.groups.iter_mut().enumerate() {
            if p != r && !self.dead.contains(&p) {
                g.handle_peer_lost(r, self.now);
            }
        }
        self.run(None);
    }

    fn advance(&mut self, dt: u64) {
        self.now += dt;
        for (r, g) in self.groups.iter_mut().enumerate() {
            if !self.dead.contains(&r) && g.poll_timeout().is_some_and(|t| t <= self.now) {
                g.handle_timeout(self.now);
            }
        }
        self.run(None);
    }

    fn start(&mut self, r: usize, op: Op, buf: Vec<u8>, options: CallOptions) {
        let now = self.now;
        self.groups[r].start(now, op, DType::F32, buf, options);
    }

    fn take(&mut self, r: usize) -> Finished {
        self.results[r].take().unwrap_or_else(|| panic!("rank {r} has not finished"))
    }
}

fn sum_op() -> Op {
    Op::AllReduce { algorithm: AllReduceAlgorithm::Ring, op: ReduceOp::Sum }
}

fn contribution(r: usize, len: usize) -> Vec<f64> {
    (0..len).map(|i| (r * 100 + i) as f64).collect()
}

fn expected_sum(ranks: &[usize], len: usize) -> Vec<f64> {
    (0..len).map(|i| ranks.iter().map(|r| contribution(*r, len)[i]).sum()).collect()
}

#[test]
fn messages_for_a_collective_not_yet_started_wait_for_it_and_stale_ones_are_dropped() {
    let world = 2;
    let mut g: Vec<Group> = (0..world).map(|r| Group::new(r, world)).collect();
    let sched = |r| all_reduce_schedule(AllReduceAlgorithm::Ring, r, world, 1 << 20);
    g[0].start_schedule(sched(0), DType::F32, ReduceOp::Sum, f32s(&[1.0, 2.0]));
    let first: Vec<_> = std::iter::from_fn(|| g[0].poll_send()).collect();
    g[1].start_schedule(sched(1), DType::F32, ReduceOp::Sum, f32s(&[10.0, 20.0]));
    for (_, m) in first {
        g[1].handle_message(0, m.chunks().to_vec(), 0);
    }
    for _ in 0..10 {
        for r in 0..world {
            while let Some((to, m)) = g[r].poll_send() {
                g[to].handle_message(r, m.chunks().to_vec(), 0);
            }
        }
    }
    for (r, gr) in g.iter_mut().enumerate() {
        let Some(Finished::Buffer { data, participants }) = gr.finish() else { panic!("rank {r} finished") };
        assert_eq!(read(&data), vec![11.0, 22.0]);
        assert_eq!(participants, vec![0, 1]);
    }
    // Rank 0 starts the second; its message reaches rank 1 before rank 1 starts it.
    g[0].start_schedule(sched(0), DType::F32, ReduceOp::Sum, f32s(&[3.0, 3.0]));
    let early: Vec<_> = std::iter::from_fn(|| g[0].poll_send()).collect();
    for (_, m) in early {
        g[1].handle_message(0, m.chunks().to_vec(), 0);
    }
    g[1].start_schedule(sched(1), DType::F32, ReduceOp::Sum, f32s(&[4.0, 4.0]));
    for _ in 0..10 {
        for r in 0..world {
            while let Some((to, m)) = g[r].poll_send() {
                g[to].handle_message(r, m.chunks().to_vec(), 0);
            }
        }
    }
    let Some(Finished::Buffer { data, .. }) = g[1].finish() else { panic!("rank 1 finished the second") };
    assert_eq!(read(&data), vec![7.0, 7.0]);
    // A message of the first collective arriving now is stale.
    let mut stale = data_tag(1, 0).to_le_bytes().to_vec();
    stale.extend_from_slice(&[0u8; 12]);
    let before = g[1].stale_dropped();
    g[1].handle_message(0, vec![Bytes::from(stale)], 0);
    assert_eq!(g[1].stale_dropped(), before + 1);
}

#[test]
fn every_policy_without_faults_gives_every_rank_the_full_result() {
    let len = 37;
    for options in [
        CallOptions::policy(FaultPolicy::Abort),
        CallOptions { policy: FaultPolicy::Abort, verify: true },
        CallOptions::policy(FaultPolicy::Shrink),
        CallOptions { policy: FaultPolicy::Quorum { min: 3, wait: Duration::from_secs(1) }, verify: true },
    ] {
        let world = 5;
        let mut net = Net::new(world);
        for r in 0..world {
            net.start(r, sum_op(), f32s(&contribution(r, len)), options);
        }
        net.run(None);
        let all: Vec<usize> = (0..world).collect();
        for r in 0..world {
            let Finished::Buffer { data, participants } = net.take(r) else { panic!("{options:?}: rank {r}") };
            assert_eq!(participants, all);
            assert_eq!(read(&data), expected_sum(&all, len), "{options:?}");
            assert_eq!(net.groups[r].counters().applied, 1);
        }
    }
}

#[test]
fn abort_names_the_lost_rank() {
    let world = 4;
    let mut net = Net::new(world);
    for r in 0..world {
        net.start(r, sum_op(), f32s(&contribution(r, 64)), CallOptions::default());
    }
    net.run(Some(3));
    net.kill(2);
    for r in [0, 1, 3] {
        match net.take(r) {
            Finished::Failed(GroupError::PeerLost { rank: 2, op_seq: 1, .. }) => {}
            other => panic!("rank {r}: {other:?}"),
        }
        let c = net.groups[r].counters();
        assert_eq!((c.offered, c.dropped), (1, 1));
    }
}

#[test]
fn shrink_retries_over_the_survivors_after_a_rank_dies_mid_run_and_they_agree() {
    // Kill each rank in turn (0 is the coordinator) after every possible number of messages.
    let (world, len) = (4, 29);
    let (mut shrunk, mut full, mut retried) = (0, 0, 0);
    for victim in 0..world {
        for after in 0..40 {
            let mut net = Net::new(world);
            for r in 0..world {
                net.start(r, sum_op(), f32s(&contribution(r, len)), CallOptions::policy(FaultPolicy::Shrink));
            }
            net.run(Some(after));
            net.kill(victim);
            net.run(None);
            let survivors: Vec<usize> = (0..world).filter(|r| *r != victim).collect();
            let mut agreed: Option<(Vec<u8>, Vec<usize>)> = None;
            for &r in &survivors {
                let Finished::Buffer { data, participants } = net.take(r) else {
                    panic!("victim {victim}, after {after}: rank {r} did not finish")
                };
                // Either the victim's contribution made it in everywhere, or nowhere.
                assert!(participants == survivors || participants == (0..world).collect::<Vec<_>>());
                assert_eq!(read(&data), expected_sum(&participants, len));
                retried += net.groups[r].counters().retries;
                match &agreed {
                    None => {
                        if participants == survivors {
                            shrunk += 1;
                        } else {
                            full += 1;
                        }
                        agreed = Some((data, participants));
                    }
                    Some(a) => assert_eq!(a, &(data, participants), "victim {victim}, after {after}: rank {r} differs"),
                }
            }
        }
    }
    // The sweep covers deaths before the plan, mid-attempt (retries) and after the data moved.
    assert!(shrunk > 0 && full > 0 && retried > 0, "shrunk {shrunk}, full {full}, retried {retried}");
}

#[test]
fn quorum_goes_on_without_a_straggler_which_gets_its_contribution_back_and_joins_the_next_round() {
    // The straggler is the coordinator itself (0), or another rank (2).
    for straggler in [0, 2] {
        let (world, len) = (4, 10);
        let options = CallOptions::policy(FaultPolicy::Quorum { min: 3, wait: Duration::from_millis(500) });
        let mut net = Net::new(world);
        let mut offered = vec![0.0f64; len];
        for r in (0..world).filter(|r| *r != straggler) {
            net.start(r, sum_op(), f32s(&contribution(r, len)), options);
        }
        net.run(None);
        assert!(net.results.iter().all(Option::is_none), "nobody finishes before the wait");
        net.advance(499 * MS);
        assert!(net.results.iter().all(Option::is_none));
        net.advance(MS);
        let quorum: Vec<usize> = (0..world).filter(|r| *r != straggler).collect();
        let mut applied = vec![0.0f64; len];
        for &r in &quorum {
            let Finished::Buffer { data, participants } = net.take(r) else { panic!("rank {r}") };
            assert_eq!(participants, quorum);
            applied = read(&data);
        }
        // The straggler arrives: its contribution comes back.
        let late_contribution = contribution(straggler, len);
        net.start(straggler, sum_op(), f32s(&late_contribution), options);
        net.run(None);
        let Finished::Late { contribution: back, participants } = net.take(straggler) else { panic!("late") };
        assert_eq!(read(&back), late_contribution);
        assert_eq!(participants, quorum);
        for r in 0..world {
            for (o, c) in offered.iter_mut().zip(contribution(r, len)) {
                *o += c;
            }
        }
        // Round 2: everyone, the straggler folding its late contribution in.
        for r in 0..world {
            let mut c = contribution(r + 10, len);
            if r == straggler {
                for (x, l) in c.iter_mut().zip(&late_contribution) {
                    *x += l;
                }
            }
            for (o, x) in offered.iter_mut().zip(contribution(r + 10, len)) {
                *o += x;
            }
            net.start(r, sum_op(), f32s(&c), options);
        }
        net.run(None);
        for r in 0..world {
            let Finished::Buffer { data, participants } = net.take(r) else { panic!("round 2, rank {r}") };
            assert_eq!(participants, (0..world).collect::<Vec<_>>());
            if r == 0 {
                for (a, d) in applied.iter_mut().zip(read(&data)) {
                    *a += d;
                }
            }
        }
        assert_eq!(applied, offered, "the sum over all rounds is the sum of everything offered");
        for r in 0..world {
            let c = net.groups[r].counters();
            assert_eq!(c.offered, c.applied + c.late + c.dropped, "rank {r}: {c:?}");
        }
        assert_eq!(net.groups[straggler].counters().late, 1);
    }
}

#[test]
fn a_quorum_broadcast_waits_for_its_root_however_late_and_leaves_out_only_the_others() {
    // The root (1) and a straggler (3) are late; the coordinator (0) must not plan without the
    // root — a broadcast without it could only fail — but once the root is in, it goes on
    // without the straggler.
    let (world, root, len) = (4, 1, 6);
    let options = CallOptions::policy(FaultPolicy::Quorum { min: 2, wait: Duration::from_millis(10) });
    let bcast = Op::Broadcast { root };
    let mut net = Net::new(world);
    for r in [0, 2] {
        net.start(r, bcast, f32s(&[0.0; 6]), options);
    }
    net.advance(50 * MS);
    assert!(net.results.iter().all(Option::is_none), "planned without the root: {:?}", net.results);
    net.start(root, bcast, f32s(&contribution(root, len)), options);
    net.run(None);
    for r in [0, 1, 2] {
        let Finished::Buffer { data, participants } = net.take(r) else { panic!("rank {r}") };
        assert_eq!(participants, vec![0, 1, 2]);
        assert_eq!(read(&data), contribution(root, len), "rank {r} has the root's buffer");
    }
    net.start(3, bcast, f32s(&[0.0; 6]), options);
    net.run(None);
    assert!(matches!(net.take(3), Finished::Late { .. }));
}

#[test]
fn quorum_fails_on_every_rank_when_too_few_remain() {
    let world = 3;
    let options = CallOptions::policy(FaultPolicy::Quorum { min: 3, wait: Duration::from_millis(10) });
    let mut net = Net::new(world);
    for r in 0..2 {
        net.start(r, sum_op(), f32s(&[1.0]), options);
    }
    net.run(None);
    net.kill(2);
    for r in 0..2 {
        match net.take(r) {
            Finished::Failed(GroupError::QuorumNotMet { contributed: 2, min: 3, .. }) => {}
            other => panic!("rank {r}: {other:?}"),
        }
    }
}

#[test]
fn verify_names_the_rank_whose_result_differs() {
    let world = 3;
    let mut net = Net::new(world);
    net.groups[1].corrupt_next_result();
    for r in 0..world {
        net.start(r, sum_op(), f32s(&contribution(r, 16)), CallOptions { policy: FaultPolicy::Shrink, verify: true });
    }
    net.run(None);
    for r in 0..world {
        match net.take(r) {
            Finished::Failed(GroupError::ResultMismatch { ranks, .. }) => assert_eq!(ranks, vec![1]),
            other => panic!("rank {r}: {other:?}"),
        }
    }
    // Without the fault the next one passes.
    for r in 0..world {
        net.start(r, sum_op(), f32s(&contribution(r, 16)), CallOptions { policy: FaultPolicy::Abort, verify: true });
    }
    net.run(None);
    for r in 0..world {
        assert!(matches!(net.take(r), Finished::Buffer { .. }));
    }
}

#[test]
fn a_rank_that_gives_up_at_its_deadline_is_left_out_and_its_contribution_counted_dropped() {
    let world = 3;
    let mut net = Net::new(world);
    net.start(0, sum_op(), f32s(&[1.0]), CallOptions::policy(FaultPolicy::Shrink));
    net.start(1, sum_op(), f32s(&[2.0]), CallOptions::policy(FaultPolicy::Shrink));
    net.start(2, sum_op(), f32s(&[4.0]), CallOptions::policy(FaultPolicy::Shrink));
    // Rank 2's first messages are lost with its call: it gives up before anything is delivered.
    net.groups[2].abandon(0);
    net.run(None);
    for r in 0..2 {
        let Finished::Buffer { data, participants } = net.take(r) else { panic!("rank {r}") };
        assert_eq!((read(&data), participants), (vec![3.0], vec![0, 1]));
    }
    assert_eq!(net.groups[2].counters().dropped, 1);
}

#[test]
fn all_gather_and_reduce_scatter_over_the_survivors_keep_each_rank_s_own_block() {
    let (world, len) = (4, 10);
    let mut net = Net::new(world);
    net.kill(3);
    let block = |r: usize| block_range(len, world, r);
    for r in 0..3 {
        let mut v = vec![0.0; len];
        for i in block(r) {
            v[i] = (r * 10 + i) as f64;
        }
        net.start(r, Op::AllGather, f32s(&v), CallOptions::policy(FaultPolicy::Shrink));
    }
    net.run(None);
    for r in 0..3 {
        let Finished::Buffer { data, participants } = net.take(r) else { panic!("rank {r}") };
        assert_eq!(participants, vec![0, 1, 2]);
        let got = read(&data);
        for p in 0..3 {
            for i in block(p) {
                assert_eq!(got[i], (p * 10 + i) as f64);
            }
        }
        assert!(block(3).all(|i| got[i] == 0.0));
    }
    for r in 0..3 {
        net.start(
            r,
            Op::ReduceScatter { op: ReduceOp::Sum },
            f32s(&contribution(r, len)),
            CallOptions::policy(FaultPolicy::Shrink),
        );
    }
    net.run(None);
    let want = expected_sum(&[0, 1, 2], len);
    for r in 0..3 {
        let Finished::Buffer { data, .. } = net.take(r) else { panic!("rank {r}") };
        let got = read(&data);
        for i in block(r) {
            assert_eq!(got[i], want[i]);
        }
    }
}

#[test]
fn broadcast_from_a_lost_root_fails_with_root_lost() {
    let world = 3;
    let mut net = Net::new(world);
    net.kill(2);
    for r in 0..2 {
        net.start(r, Op::Broadcast { root: 2 }, f32s(&[0.0; 4]), CallOptions::policy(FaultPolicy::Shrink));
    }
    net.run(None);
    for r in 0..2 {
        assert!(matches!(net.take(r), Finished::Failed(GroupError::RootLost { root: 2, .. })));
    }
}

#[test]
fn all_to_all_with_a_lost_rank_completes_and_hands_its_share_back() {
    let world = 4;
    let mut net = Net::new(world);
    let payload = |s: usize, d: usize| Bytes::from(vec![(s * 16 + d) as u8; s + d + 1]);
    for r in 0..world {
        let now = net.now;
        net.groups[r].start_all_to_all(now, (0..world).map(|d| payload(r, d)).collect(), FaultPolicy::Shrink);
    }
    net.run(Some(4));
    net.kill(1);
    for r in [0, 2, 3] {
        let Finished::AllToAll(res) = net.take(r) else { panic!("rank {r}") };
        assert_eq!(res.lost, vec![1]);
        assert_eq!(res.undelivered, vec![(1, payload(r, 1))]);
        for s in [0, 2, 3] {
            assert_eq!(res.received[s], payload(s, r), "rank {r} from {s}");
        }
        assert!(res.received[1].is_empty());
    }
}

#[test]
fn hierarchical_all_reduce_over_two_data_centres_is_exact_and_survives_a_lost_rank() {
    let (world, len) = (6, 1000);
    let mut net = Net::new(world);
    for g in &mut net.groups {
        g.set_topology(Topology::uniform(2, 3));
    }
    let op = Op::AllReduce { algorithm: AllReduceAlgorithm::Hierarchical, op: ReduceOp::Sum };
    for r in 0..world {
        net.start(r, op, f32s(&contribution(r, len)), CallOptions::policy(FaultPolicy::Shrink));
    }
    net.run(None);
    let all: Vec<usize> = (0..world).collect();
    for r in 0..world {
        let Finished::Buffer { data, .. } = net.take(r) else { panic!("rank {r}") };
        assert_eq!(read(&data), expected_sum(&all, len));
    }
    // Rank 4 dies: data centres of 3 and 2 ranks (the leader-based fallback).
    net.kill(4);
    for r in (0..world).filter(|r| *r != 4) {
        net.start(r, op, f32s(&contribution(r, len)), CallOptions::policy(FaultPolicy::Shrink));
    }
    net.run(None);
    let survivors = vec![0, 1, 2, 3, 5];
    for &r in &survivors {
        let Finished::Buffer { data, participants } = net.take(r) else { panic!("rank {r}") };
        assert_eq!(participants, survivors);
        assert_eq!(read(&data), expected_sum(&survivors, len));
    }
}

#[test]
fn auto_picks_by_size_and_topology() {
    let two = Topology::uniform(2, 4);
    let one = Topology::flat(8);
    let big = small_all_reduce_limit(8);
    assert_eq!(big, 2 * SMALL_ALL_REDUCE_BYTES);
    assert_eq!(choose_all_reduce(AllReduceAlgorithm::Auto, &two, big), AllReduceAlgorithm::Hierarchical);
    assert_eq!(choose_all_reduce(AllReduceAlgorithm::Auto, &one, big), AllReduceAlgorithm::Ring);
    assert_eq!(choose_all_reduce(AllReduceAlgorithm::Auto, &two, big - 1), AllReduceAlgorithm::RecursiveDoubling);
    assert_eq!(choose_all_reduce(AllReduceAlgorithm::Hierarchical, &one, 1), AllReduceAlgorithm::Ring);
    assert_eq!(choose_all_reduce(AllReduceAlgorithm::Ring, &two, big), AllReduceAlgorithm::Ring);
    // Two ranks: the ring from SMALL_ALL_REDUCE_BYTES; more: recursive doubling up to twice it.
    let (pair, four) = (Topology::flat(2), Topology::flat(4));
    let small = SMALL_ALL_REDUCE_BYTES;
    assert_eq!(choose_all_reduce(AllReduceAlgorithm::Auto, &pair, small), AllReduceAlgorithm::Ring);
    assert_eq!(choose_all_reduce(AllReduceAlgorithm::Auto, &pair, small - 1), AllReduceAlgorithm::RecursiveDoubling);
    assert_eq!(choose_all_reduce(AllReduceAlgorithm::Auto, &four, small), AllReduceAlgorithm::RecursiveDoubling);
    assert_eq!(choose_all_reduce(AllReduceAlgorithm::Auto, &four, 2 * small), AllReduceAlgorithm::Ring);
}

#[test]
fn small_all_gathers_over_a_power_of_two_group_take_log2_rounds() {
    let rounds = |participants: &[usize], world: usize, bytes: usize| {
        let (s, map) = Op::AllGather.schedule(participants[0], participants, &Topology::flat(world), bytes).unwrap();
        assert_eq!(map, Some((world, participants.to_vec())), "blocks stay the participants' own");
        s.rounds.len()
    };
    let small = SMALL_ALL_GATHER_BYTES - 1;
    assert_eq!(rounds(&[0, 1, 2, 3], 4, small), 2, "recursive doubling");
    assert_eq!(rounds(&(0..8).collect::<Vec<_>>(), 8, small), 3);
    assert_eq!(rounds(&[0, 1, 2, 3], 4, SMALL_ALL_GATHER_BYTES), 3, "the ring from the limit on");
    assert_eq!(rounds(&[0, 1, 2], 3, small), 2, "the ring: not a power of two");
    assert_eq!(rounds(&[0, 1, 3, 5, 6], 7, small), 4, "five survivors of seven: the ring");
    assert_eq!(rounds(&[1, 2, 4, 6], 7, small), 2, "four survivors of seven: recursive doubling");
    assert_eq!(rounds(&[0, 1], 2, small), 1, "two ranks: one exchange either way");
}

#[test]
fn a_compressed_all_reduce_is_bit_identical_everywhere_and_close_to_the_exact_sum() {
    for compression in [Compression::Int8, Compression::Int4] {
        let (world, len) = (4, 700);
        let mut net = Net::new(world);
        let values =
            |r: usize| -> Vec<f32> { (0..len).map(|i| ((r * 37 + i * 11) % 101) as f32 / 10.0 - 5.0).collect() };
        let op = Op::CompressedAllReduce { op: ReduceOp::Sum, compression };
        // Rank 3 is lost before the call: the others reduce over themselves.
        net.kill(3);
        for r in 0..3 {
            let now = net.now;
            net.groups[r].start(
                now,
                op,
                DType::U8,
                codec::encode(compression, &values(r)),
                CallOptions::policy(FaultPolicy::Shrink),
            );
        }
        net.run(None);
        let mut first: Option<Vec<u8>> = None;
        for r in 0..3 {
            let Finished::Buffer { data, participants } = net.take(r) else { panic!("rank {r}") };
            assert_eq!(participants, vec![0, 1, 2]);
            let got = read(&data);
            assert_eq!(got.len(), len);
            // Each contribution is off by at most half a step (max 5.0 / levels) per element.
            let step = 5.0 / if compression == Compression::Int8 { 127.0 } else { 7.0 };
            for (i, g) in got.iter().enumerate() {
                let exact: f64 = (0..3).map(|p| f64::from(values(p)[i])).sum();
                assert!((g - exact).abs() <= 3.0 * step / 2.0 + 1e-4, "{compression:?} element {i}: {g} vs {exact}");
            }
            match &first {
                None => first = Some(data),
                Some(f) => assert_eq!(f, &data, "rank {r} bit-identical"),
            }
        }
    }
}

#[test]
fn control_messages_round_trip() {
    let reports = [
        Report { current: None, recent: vec![(3, Outcome::Committed(2)), (4, Outcome::Late), (5, Outcome::Failed)] },
        Report {
            current: Some((
                9,
                CallOptions { policy: FaultPolicy::Quorum { min: 2, wait: Duration::from_millis(7) }, verify: true },
                MemberState::Done { attempt: 1, participants: vec![0, 2, 5], hash: 77 },
                Some(5),
            )),
            recent: vec![],
        },
        Report {
            current: Some((
                1,
                CallOptions::policy(FaultPolicy::Shrink),
                MemberState::Running { attempt: 0, participants: vec![1] },
                None,
            )),
            recent: vec![],
        },
    ];
    for r in reports {
        let mut b = encode_report(&r);
        b.advance(8);
        assert!(matches!(decode_control(b, 8), Some(Control::Report(x)) if x == r));
    }
    let decisions = [
        Decision::Plan { attempt: 3, participants: vec![0, 1, 4] },
        Decision::Commit { attempt: 2 },
        Decision::Fail(GroupError::ResultMismatch { op_seq: 4, ranks: vec![2, 3] }),
        Decision::Fail(GroupError::QuorumNotMet { op_seq: 4, contributed: 1, min: 3 }),
        Decision::Fail(GroupError::PeerLost { op_seq: 4, rank: 1, epoch: 9 }),
        Decision::Fail(GroupError::RootLost { op_seq: 4, root: 1 }),
        Decision::Fail(GroupError::TooManyAttempts { op_seq: 4, attempts: 9 }),
        Decision::Fail(GroupError::Malformed { op_seq: 4, rank: 2 }),
    ];
    for d in decisions {
        let mut b = encode_decision(12, &d);
        b.advance(8);
        assert!(matches!(decode_control(b, 8), Some(Control::Decision(12, x)) if x == d));
    }
}

proptest! {
    #[test]
    fn rank_lists_round_trip_as_runs_and_bad_runs_are_refused(
        members in proptest::collection::btree_set(0usize..200, 0..120),
        first in any::<u32>(),
        len in any::<u32>(),
    ) {
        let ranks: Vec<usize> = members.into_iter().collect();
        let d = Decision::Plan { attempt: 1, participants: ranks.clone() };
        let mut b = encode_decision(3, &d);
        b.advance(8);
        let runs = 1 + ranks.windows(2).filter(|w| w[1] != w[0] + 1).count();
        // Header (kind, op, what, attempt, run count) then 8 bytes per run.
        prop_assert_eq!(b.len(), 1 + 8 + 1 + 4 + 4 + 8 * if ranks.is_empty() { 0 } else { runs });
        prop_assert!(matches!(decode_control(b.clone(), 200), Some(Control::Decision(3, x)) if x == d));
        // A world too small for the highest rank refuses the message.
        if let Some(top) = ranks.last() {
            prop_assert!(decode_control(b, *top).is_none());
        }
        // An arbitrary run: accepted only if non-empty and within the world, and then whole.
        let mut m = BytesMut::new();
        m.put_u8(2);
        m.put_u64_le(3);
        m.put_u8(0);
        m.put_u32_le(1);
        m.put_u32_le(1);
        m.put_u32_le(first);
        m.put_u32_le(len);
        let ok = len > 0 && u64::from(first) + u64::from(len) <= 1000;
        match decode_control(m.freeze(), 1000) {
            Some(Control::Decision(3, Decision::Plan { participants, .. })) => {
                prop_assert!(ok);
                prop_assert_eq!(participants, (first as usize..(first + len) as usize).collect::<Vec<_>>());
            }
            None => prop_assert!(!ok),
            Some(_) => prop_assert!(false, "not a plan"),
        }
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_a_group(msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 1..20), control in any::<bool>()) {
        let mut g = Group::new(0, 3);
        g.start(0, sum_op(), DType::F32, f32s(&[1.0]), CallOptions::policy(FaultPolicy::Shrink));
        for mut m in msgs {
            if control && m.len() >= 8 {
                m[7] |= 0x80;
            }
            g.handle_message(1, vec![Bytes::from(m)], 0);
            while g.poll_send().is_some() {}
        }
        let c = g.counters();
        prop_assert_eq!(c.offered, 1);
    }
}

/// Runs one all-reduce of `bytes` over `world` groups, phantom or real, killing `kill` after
/// `after` deliveries; returns each rank's result (participants) and the wire bytes sent.
fn wire_run(world: usize, bytes: usize, phantom: bool, kill: Option<(usize, usize)>) -> (Vec<Option<Vec<usize>>>, u64) {
    let mut groups: Vec<Group> = (0..world).map(|r| Group::new(r, world)).collect();
    let op = Op::AllReduce { algorithm: AllReduceAlgorithm::Ring, op: ReduceOp::Sum };
    let options = CallOptions::policy(FaultPolicy::Shrink);
    for (r, g) in groups.iter_mut().enumerate() {
        if phantom {
            g.start_phantom(0, op, DType::F32, bytes, options);
        } else {
            g.start(0, op, DType::F32, crate::reference::input(DType::F32, ReduceOp::Sum, r, bytes / 4), options);
        }
    }
    let mut queue: VecDeque<(usize, usize, Bytes, usize)> = VecDeque::new();
    let mut results: Vec<Option<Vec<usize>>> = vec![None; world];
    let mut dead = BTreeSet::new();
    let (mut wire, mut delivered) = (0u64, 0usize);
    loop {
        for (r, g) in groups.iter_mut().enumerate() {
            if dead.contains(&r) {
                continue;
            }
            while let Some((to, m, ph)) = g.poll_send_sized() {
                assert!(ph == 0 || phantom, "a real group sent a phantom length");
                wire += (m.len() + ph) as u64;
                queue.push_back((r, to, m.to_bytes(), ph));
            }
            if let Some(f) = g.finish() {
                let Finished::Buffer { data, participants } = f else { panic!("rank {r}: {f:?}") };
                assert_eq!(data.is_empty(), phantom || bytes == 0);
                results[r] = Some(participants);
            }
        }
        if let Some((victim, at)) = kill {
            if delivered == at && dead.insert(victim) {
                for (p, g) in groups.iter_mut().enumerate() {
                    if p != victim {
                        g.handle_peer_lost(victim, 0);
                    }
                }
                continue;
            }
        }
        let Some((from, to, m, ph)) = queue.pop_front() else { break };
        delivered += 1;
        if !dead.contains(&to) && !dead.contains(&from) {
            groups[to].handle_message_sized(from, vec![m], ph, 0);
        }
    }
    (results, wire)
}

#[test]
fn phantom_buffers_run_the_same_protocol_with_the_same_wire_bytes() {
    for (world, bytes, kill) in [(4, 4 << 20, None), (5, 12_000, None), (6, 3 << 20, Some((2, 9))), (3, 0, None)] {
        let (real, real_wire) = wire_run(world, bytes, false, kill);
        let (phantom, phantom_wire) = wire_run(world, bytes, true, kill);
        assert_eq!(real, phantom, "world {world}: the same participants everywhere");
        assert_eq!(real_wire, phantom_wire, "world {world}: the same bytes on the wire");
        assert!(real.iter().enumerate().all(|(r, p)| p.is_some() || kill.is_some_and(|(v, _)| v == r)));
    }
}

#[test]
fn executors_refuse_data_of_the_wrong_kind() {
    use crate::executor::{Executor, MESSAGE_HEADER};
    let schedule = || ring::schedule(Collective::AllReduce, 0, 2).expect("ring");
    let mut real = Executor::new(schedule(), 7, DType::F32, ReduceOp::Sum, 2, vec![0u8; 64]);
    let mut phantom = Executor::phantom(schedule(), 7, DType::F32, ReduceOp::Sum, 2, 64, Layout::default());
    let (_, m, ph) = phantom.poll_send_sized().expect("a first send");
    assert_eq!((m.len(), ph), (MESSAGE_HEADER, 32), "a header and a phantom half");
    assert_eq!(real.poll_send_sized().map(|(_, m, ph)| (m.len(), ph)), Some((MESSAGE_HEADER + 32, 0)));
    // What rank 1 sends rank 0 in round 0: op 7, round 0, the block rank 0 expects, segment 0.
    let block = schedule().rounds[0].recvs[0].blocks.start as u32;
    let mut header = Vec::new();
    header.extend_from_slice(&7u64.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&block.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    let with_data = [header.clone(), vec![0u8; 32]].concat();
    let header = Bytes::from(header);
    assert!(matches!(
        real.handle_chunks_sized(1, std::slice::from_ref(&header), 32),
        Err(ExecError::WrongLength { .. })
    ));
    assert!(matches!(
        phantom.handle_chunks_sized(1, &[Bytes::from(with_data.clone())], 0),
        Err(ExecError::WrongLength { .. })
    ));
    assert!(matches!(
        phantom.handle_chunks_sized(1, std::slice::from_ref(&header), 31),
        Err(ExecError::WrongLength { .. })
    ));
    assert_eq!(phantom.handle_chunks_sized(1, &[header], 32), Ok(()));
    assert_eq!(real.handle_chunks_sized(1, &[Bytes::from(with_data)], 0), Ok(()));
}

#[test]
fn a_quorum_wait_that_passed_with_too_few_ready_arms_no_timer_and_the_next_report_decides() {
    // Found by the simulator: once the wait had passed with fewer than `min` ready, the
    // coordinator kept asking for a timeout in the past, and drivers spun on it.
    let world = 4;
    let options = CallOptions::policy(FaultPolicy::Quorum { min: 3, wait: Duration::from_millis(10) });
    let mut net = Net::new(world);
    for r in 0..2 {
        net.start(r, sum_op(), f32s(&contribution(r, 4)), options);
    }
    net.run(None);
    let due = net.groups[0].poll_timeout().expect("the coordinator waits for the quorum");
    net.advance(20 * MS);
    assert!(net.results.iter().all(Option::is_none), "two of four cannot make a quorum of three");
    assert_eq!(net.groups[0].poll_timeout(), None, "nothing left to wait for by the clock (was {due})");
    net.start(2, sum_op(), f32s(&contribution(2, 4)), options);
    net.run(None);
    for r in 0..3 {
        let Finished::Buffer { participants, .. } = net.take(r) else { panic!("rank {r}") };
        assert_eq!(participants, vec![0, 1, 2], "the third report makes the quorum at once");
    }
}

/// With lending on, a finished all-gather holds its result back while the transport still
/// holds its own block's messages: returned, the caller gets its own allocation back; taken
/// back early (`take_back`), a correct copy, the messages still valid.
#[test]
fn a_collective_that_lent_its_buffer_finishes_when_the_bytes_are_back_or_with_a_copy_if_taken_back() {
    let world = 2;
    let count = 2_200_000; // 8.8 MB of f32: above the streaming and lending threshold
    let block = |r: usize| crate::schedule::block_range(count, world, r);
    let mut groups: Vec<Group> = (0..world).map(|r| Group::new(r, world)).collect();
    let mut addrs = Vec::new();
    for (r, g) in groups.iter_mut().enumerate() {
        g.set_lend_sends(true);
        let mut buf = vec![0u8; count * 4];
        for i in block(r) {
            set_element_f64(DType::F32, &mut buf, i, (r * 10 + i % 7) as f64);
        }
        addrs.push(buf.as_ptr() as usize);
        g.start(0, Op::AllGather, DType::F32, buf, CallOptions::default());
    }
    // The transport's part: deliver a copy of every message, keep the message itself.
    let mut held: Vec<Vec<Payload>> = vec![Vec::new(); world];
    loop {
        let mut moved = false;
        for r in 0..world {
            while let Some((to, m)) = groups[r].poll_send() {
                groups[to].handle_message(r, vec![m.to_bytes()], 0);
                held[r].push(m);
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    let expect = |data: &[u8]| {
        for r in 0..world {
            for i in block(r) {
                assert_eq!(element_f64(DType::F32, data, i), (r * 10 + i % 7) as f64, "element {i}");
            }
        }
    };
    for g in &mut groups {
        assert!(g.finish().is_none(), "done, but the buffer is still lent");
    }
    // Rank 0: the transport lets go; the group finishes with the caller's own allocation.
    let returned = groups[0].lent().expect("lent");
    drop(std::mem::take(&mut held[0]));
    let waker = std::task::Waker::noop();
    assert!(returned.poll(&mut std::task::Context::from_waker(waker)).is_ready());
    groups[0].poll();
    let Some(Finished::Buffer { data, .. }) = groups[0].finish() else { panic!("rank 0 finished") };
    assert_eq!(data.as_ptr() as usize, addrs[0], "the same allocation");
    expect(&data);
    // Rank 1: taken back while still lent: a copy, and the lent messages stay intact.
    assert!(groups[1].lent().is_some());
    let before: Vec<Bytes> = held[1].iter().map(|m| m.to_bytes()).collect();
    assert_eq!(groups[1].counters().lent_copies, 0);
    groups[1].take_back();
    assert_eq!(groups[1].counters().lent_copies, 1, "counted");
    assert_eq!(groups[0].counters().lent_copies, 0, "rank 0 got its loans back");
    let Some(Finished::Buffer { data, .. }) = groups[1].finish() else { panic!("rank 1 finished") };
    assert_ne!(data.as_ptr() as usize, addrs[1], "a copy");
    expect(&data);
    assert!(held[1].iter().zip(&before).all(|(m, b)| m.to_bytes() == b), "lent bytes unchanged");
}
