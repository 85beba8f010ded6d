//! Coordinator groups driven in-process with plain values: a message queue for the network,
//! ticks for time, [`MemoryLog`] for disks (a crash keeps only what was synced).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use super::wire::{ClientReply, ClientRequest, ReplyBody, RequestBody};
use super::*;
use crate::membership::{self, Command, Outcome};

/// The transport peer id clients use in these tests.
const CLIENT_PEER: u64 = 1000;

struct Group {
    voters: Vec<u64>,
    learners: Vec<u64>,
    nodes: BTreeMap<u64, Coordinator<MemoryLog>>,
    /// Disks of crashed coordinators.
    disks: BTreeMap<u64, MemoryLog>,
    net: VecDeque<(u64, u64, Bytes)>,
    /// Links that drop everything (both directions are listed).
    cut: BTreeSet<(u64, u64)>,
    replies: VecDeque<(u64, ClientReply)>,
    snapshot_after: u64,
    failure_ticks: u64,
    ticks: u64,
}

impl Group {
    fn new(n: u64, snapshot_after: u64) -> Group {
        let voters: Vec<u64> = (1..=n).collect();
        let mut g = Group {
            voters: voters.clone(),
            learners: Vec::new(),
            nodes: BTreeMap::new(),
            disks: BTreeMap::new(),
            net: VecDeque::new(),
            cut: BTreeSet::new(),
            replies: VecDeque::new(),
            snapshot_after,
            failure_ticks: 0,
            ticks: 0,
        };
        for id in voters {
            g.disks.insert(id, MemoryLog::new());
            g.start(id);
        }
        g
    }

    fn config(&self, id: u64) -> CoordinatorConfig {
        CoordinatorConfig {
            snapshot_after: self.snapshot_after,
            failure_ticks: self.failure_ticks,
            learners: self.learners.clone(),
            ..CoordinatorConfig::new(id, self.voters.clone())
        }
    }

    fn start(&mut self, id: u64) {
        let disk = self.disks.remove(&id).expect("a stopped coordinator has a disk");
        let c = Coordinator::new(self.config(id), disk.recover(), disk).expect("coordinator starts");
        self.nodes.insert(id, c);
    }

    /// kill -9: the disk keeps what was synced.
    fn crash(&mut self, id: u64) {
        let c = self.nodes.remove(&id).expect("running");
        self.disks.insert(id, c.log().clone());
        self.net.retain(|(_, to, _)| *to != id);
    }

    fn isolate(&mut self, id: u64) {
        for other in self.voters.iter().chain(&self.learners).copied().collect::<Vec<_>>() {
            if other != id {
                self.cut.insert((id, other));
                self.cut.insert((other, id));
            }
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
    }

    fn drain(&mut self, id: u64) {
        let c = self.nodes.get_mut(&id).expect("running");
        c.process().expect("process");
        while let Some((to, b)) = c.poll_peer() {
            self.net.push_back((id, to, b));
        }
        while let Some((peer, b)) = c.poll_client() {
            assert_eq!(peer, CLIENT_PEER);
            self.replies.push_back((id, ClientReply::decode(&b).expect("a reply decodes")));
        }
    }

    /// One tick everywhere, then deliver messages until the network is quiet.
    fn step(&mut self) {
        self.ticks += 1;
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in &ids {
            self.nodes.get_mut(id).expect("running").tick();
            self.drain(*id);
        }
        while let Some((from, to, b)) = self.net.pop_front() {
            if self.cut.contains(&(from, to)) || !self.nodes.contains_key(&to) {
                continue;
            }
            self.nodes.get_mut(&to).expect("running").handle_peer(from, &b).expect("a raft message");
            self.drain(to);
        }
    }

    fn leaders(&self) -> Vec<u64> {
        self.nodes.values().filter(|c| c.is_leader()).map(|c| c.id()).collect()
    }

    /// Steps until exactly one coordinator among `among` leads; returns it and the ticks taken.
    fn await_leader(&mut self, among: &[u64], max_ticks: u64) -> (u64, u64) {
        let start = self.ticks;
        loop {
            let l: Vec<u64> = self.leaders().into_iter().filter(|l| among.contains(l)).collect();
            if l.len() == 1 {
                return (l[0], self.ticks - start);
            }
            assert!(self.ticks - start < max_ticks, "no single leader among {among:?} after {max_ticks} ticks");
            self.step();
        }
    }

    /// Sends a request to `at` and steps until it answers (or `max_ticks` pass).
    fn ask(&mut self, at: u64, req: ClientRequest, max_ticks: u64) -> Option<ReplyBody> {
        self.replies.clear();
        self.nodes.get_mut(&at).expect("running").handle_client(CLIENT_PEER, &req.encode());
        self.drain(at);
        for _ in 0..max_ticks {
            if let Some(pos) = self.replies.iter().position(|(from, r)| *from == at && r.request == req.request) {
                return self.replies.remove(pos).map(|(_, r)| r.body);
            }
            self.step();
        }
        None
    }

    /// Proposes through whoever leads now, following redirects.
    fn propose(&mut self, client: u64, request: u64, command: Command) -> (u64, CommandResult) {
        let mut at = self.leaders().first().copied().unwrap_or(self.voters[0]);
        for _ in 0..20 {
            let req = ClientRequest { client, request, body: RequestBody::Propose(command.clone()) };
            match self.ask(at, req, 50) {
                Some(ReplyBody::Applied { index, result }) => return (index, result),
                Some(ReplyBody::NotLeader { leader: Some(l) }) if self.nodes.contains_key(&l) => at = l,
                _ => {
                    let (l, _) = self.await_leader(&self.voters.clone(), 200);
                    at = l;
                }
            }
        }
        panic!("request {request} of client {client} never applied");
    }

    /// The committed entries of `id`, index → (term, data).
    fn committed(&self, id: u64) -> BTreeMap<u64, (u64, Bytes)> {
        let c = &self.nodes[&id];
        let first = c.log().recover().snapshot.map_or(1, |s| s.get_metadata().index + 1);
        (first..=c.applied()).filter_map(|i| c.entry(i).map(|e| (i, (e.term, e.data.clone())))).collect()
    }
}

fn join(host: &str) -> Command {
    Command::Join { dc: 0, host: host.into(), addrs: vec![format!("{host}:1")], incarnation: 1 }
}

#[test]
fn three_coordinators_elect_one_leader_and_agree_on_every_entry() {
    let mut g = Group::new(3, 1024);
    let (leader, _) = g.await_leader(&[1, 2, 3], 100);
    for (i, h) in ["a", "b", "c"].iter().enumerate() {
        let (_, result) = g.propose(7, i as u64 + 1, join(h));
        assert_eq!(result, Ok(Outcome::Joined { rank: i as u32, from_epoch: 1 }));
    }
    let (_, began) = g.propose(7, 4, Command::BeginEpoch { expected: 0 });
    assert_eq!(began, Ok(Outcome::EpochBegan { epoch: 1, members: vec![0, 1, 2] }));
    for _ in 0..5 {
        g.step();
    }
    for id in [1, 2, 3] {
        assert_eq!(g.nodes[&id].view(), g.nodes[&leader].view(), "coordinator {id} applied the same view");
        assert_eq!(g.committed(id), g.committed(leader));
        assert!(g.nodes[&id].log().syncs > 0);
    }
    // A follower redirects to the leader.
    let follower = [1, 2, 3].into_iter().find(|i| *i != leader).expect("a follower");
    let reply = g.ask(follower, ClientRequest { client: 8, request: 1, body: RequestBody::Read }, 1);
    assert_eq!(reply, Some(ReplyBody::NotLeader { leader: Some(leader) }));
    // A linearizable read at the leader sees every acknowledged write.
    match g.ask(leader, ClientRequest { client: 8, request: 2, body: RequestBody::Read }, 20) {
        Some(ReplyBody::View { view, .. }) => assert_eq!(view.members(), &[0, 1, 2]),
        other => panic!("read answered {other:?}"),
    }
}

#[test]
fn a_crashed_leader_is_replaced_within_two_election_timeouts_and_nothing_committed_is_lost() {
    let mut g = Group::new(3, 1024);
    let (old, _) = g.await_leader(&[1, 2, 3], 100);
    let mut acked = BTreeMap::new();
    for r in 1..=10u64 {
        let (index, _) = g.propose(7, r, join(&format!("h{r}")));
        acked.insert(index, r);
    }
    g.crash(old);
    let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|i| *i != old).collect();
    let (new, ticks) = g.await_leader(&rest, 100);
    // Election timeout: 10 ticks plus at most 5 of seeded jitter.
    assert!(ticks <= 2 * 15, "new leader {new} after {ticks} ticks");
    for r in 11..=15u64 {
        let (index, _) = g.propose(7, r, join(&format!("h{r}")));
        acked.insert(index, r);
    }
    // Restarted from its disk, the old leader catches up to the same log.
    g.start(old);
    for _ in 0..30 {
        g.step();
    }
    let reference = g.committed(new);
    assert_eq!(g.committed(old), reference);
    for index in acked.keys() {
        assert!(reference.contains_key(index), "acknowledged entry {index} is in the log");
    }
    assert_eq!(g.nodes[&old].view().ranks().count(), 15);
}

#[test]
fn an_isolated_leader_commits_nothing_and_steps_down_and_the_majority_carries_on() {
    let mut g = Group::new(3, 1024);
    let (old, _) = g.await_leader(&[1, 2, 3], 100);
    assert!(g.propose(7, 1, join("a")).1.is_ok());
    g.isolate(old);
    // A request to the isolated leader is never applied.
    let req = ClientRequest { client: 9, request: 1, body: RequestBody::Propose(join("minority")) };
    let answer = g.ask(old, req, 40);
    assert!(!matches!(answer, Some(ReplyBody::Applied { .. })), "the minority applied {answer:?}");
    assert!(!g.nodes[&old].is_leader(), "check-quorum made the isolated leader step down");
    let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|i| *i != old).collect();
    let (new, _) = g.await_leader(&rest, 100);
    let (_, r) = g.propose(7, 2, join("b"));
    assert_eq!(r, Ok(Outcome::Joined { rank: 1, from_epoch: 1 }));
    g.heal();
    for _ in 0..40 {
        g.step();
    }
    // One history: the minority's proposal is nowhere.
    assert_eq!(g.committed(old), g.committed(new));
    assert!(g.nodes[&old].view().ranks().all(|(_, m)| m.host != "minority"));
    assert_eq!(g.nodes[&old].view(), g.nodes[&new].view());
}

#[test]
fn a_command_retried_after_a_leader_change_applies_once() {
    let mut g = Group::new(3, 1024);
    let (old, _) = g.await_leader(&[1, 2, 3], 100);
    // The leader appends the proposal and replicates it, then crashes before answering.
    let req = ClientRequest { client: 5, request: 1, body: RequestBody::Propose(join("x")) };
    g.nodes.get_mut(&old).expect("leader").handle_client(CLIENT_PEER, &req.encode());
    g.drain(old);
    let to_followers: Vec<_> = g.net.drain(..).collect();
    g.crash(old);
    g.net.extend(to_followers.into_iter().filter(|(_, to, _)| *to != old));
    // The client retries the same request wherever the leader is now.
    let (_, first) = g.propose(5, 1, join("x"));
    let (_, again) = g.propose(5, 1, join("x"));
    assert_eq!(first, again);
    let xs = g.nodes.values().next().expect("a live coordinator").view().ranks().filter(|(_, m)| m.host == "x").count();
    assert_eq!(xs, 1, "joined once");
}

#[test]
fn a_lagging_coordinator_catches_up_from_a_snapshot_after_compaction() {
    let mut g = Group::new(3, 8);
    let (leader, _) = g.await_leader(&[1, 2, 3], 100);
    let lagging = [1, 2, 3].into_iter().find(|i| *i != leader).expect("a follower");
    g.crash(lagging);
    for r in 1..=30u64 {
        assert!(g.propose(7, r, join(&format!("h{r}"))).1.is_ok());
    }
    assert!(g.nodes[&leader].log().recover().snapshot.is_some(), "the leader compacted its log into a snapshot");
    g.start(lagging);
    for _ in 0..40 {
        g.step();
    }
    assert_eq!(g.nodes[&lagging].view(), g.nodes[&leader].view());
    assert_eq!(g.nodes[&lagging].view().ranks().count(), 30);
    // And it restarts from its own snapshot, then replays the committed entries after it.
    g.crash(lagging);
    g.start(lagging);
    assert!(g.nodes[&lagging].applied() > 0, "resumed from its snapshot, not from index 0");
    for _ in 0..5 {
        g.step();
    }
    assert_eq!(g.nodes[&lagging].view(), g.nodes[&leader].view());
}

#[test]
fn a_single_coordinator_elects_itself_and_serves() {
    let mut g = Group::new(1, 1024);
    let (l, _) = g.await_leader(&[1], 40);
    assert_eq!(l, 1);
    let (_, r) = g.propose(1, 1, join("solo"));
    assert_eq!(r, Ok(Outcome::Joined { rank: 0, from_epoch: 1 }));
}

#[test]
fn malformed_client_and_peer_bytes_are_refused_cleanly() {
    let mut g = Group::new(1, 1024);
    g.await_leader(&[1], 40);
    let c = g.nodes.get_mut(&1).expect("running");
    c.handle_client(CLIENT_PEER, b"\x01\x09garbage");
    let (_, b) = c.poll_client().expect("an answer");
    assert!(matches!(ClientReply::decode(&b).map(|r| r.body), Ok(ReplyBody::Refused { .. })));
    assert!(matches!(c.handle_peer(2, b"\xff\xff\xff"), Err(PeerMessageError::Malformed { .. })));
    let bad_config = Coordinator::new(CoordinatorConfig::new(4, vec![1, 2, 3]), Recovered::default(), MemoryLog::new());
    assert!(matches!(bad_config, Err(CoordinatorError::Config { id: 4, .. })));
}

/// Three coordinators whose leader declares a rank silent for `failure_ticks` failed, with a
/// leader elected.
fn elected_with_detector(failure_ticks: u64) -> Group {
    let mut g = Group::new(3, 1024);
    g.failure_ticks = failure_ticks;
    for id in [1, 2, 3] {
        g.crash(id);
        g.start(id);
    }
    g.await_leader(&[1, 2, 3], 100);
    g
}

#[test]
fn the_leader_declares_a_silent_rank_failed_and_tells_it_so_when_it_comes_back() {
    let mut g = elected_with_detector(20);
    let elected_at = g.ticks;
    assert!(g.propose(7, 1, join("alive")).1.is_ok());
    assert!(g.propose(7, 2, join("silent")).1.is_ok());
    assert!(g.propose(7, 3, Command::BeginEpoch { expected: 0 }).1.is_ok());
    let heartbeat = |request, rank| ClientRequest {
        client: 8,
        request,
        body: RequestBody::Heartbeat { rank, incarnation: 1, epoch: 1 },
    };
    // Rank 0 heartbeats every tick, rank 1 never does.
    let mut failed_after = None;
    for t in 0..60u64 {
        let leader = g.leaders()[0];
        match g.ask(leader, heartbeat(100 + t, 0), 1) {
            Some(ReplyBody::Status { fenced, .. }) => assert!(!fenced, "a live rank is never fenced"),
            other => panic!("heartbeat answered {other:?}"),
        }
        g.step();
        let leader = g.leaders()[0];
        if g.nodes[&leader].view().rank(1).is_some_and(|m| m.status == membership::RankStatus::Failed) {
            failed_after = Some(g.ticks - elected_at);
            break;
        }
    }
    let t = failed_after.expect("the silent rank was declared failed");
    assert!(t > 20, "not before its timeout ({t} ticks after the leader's election)");
    let leader = g.leaders()[0];
    assert_eq!(g.nodes[&leader].view().rank(0).map(|m| m.status), Some(membership::RankStatus::Active));
    // The silent rank comes back: its heartbeat is answered "fenced", it must rejoin.
    match g.ask(leader, heartbeat(999, 1), 1) {
        Some(ReplyBody::Status { fenced, change_pending, .. }) => assert!(fenced && change_pending),
        other => panic!("heartbeat answered {other:?}"),
    }
}

#[test]
fn a_rank_joining_long_after_the_election_gets_its_full_timeout_before_it_is_declared_failed() {
    let mut g = elected_with_detector(20);
    for _ in 0..60 {
        g.step();
    }
    // A restarted process joins 60 ticks after the leader's detector started, and has not
    // heartbeated yet (its first heartbeat is on its way): not silent yet.
    assert!(g.propose(7, 1, join("restarted")).1.is_ok());
    let joined_at = g.ticks;
    let status = |g: &Group| {
        let leader = g.leaders()[0];
        g.nodes[&leader].view().rank(0).map(|m| m.status)
    };
    for _ in 0..15 {
        g.step();
        assert_eq!(
            status(&g),
            Some(membership::RankStatus::Joining),
            "declared failed {} ticks after joining",
            g.ticks - joined_at
        );
    }
    // Silent for good: its own timeout still applies.
    for _ in 0..40 {
        g.step();
    }
    assert_eq!(status(&g), Some(membership::RankStatus::Failed));
}

#[test]
fn a_learner_follows_the_log_but_never_counts_toward_a_majority() {
    let mut g = Group::new(3, 1024);
    g.learners = vec![4];
    for id in [1, 2, 3] {
        g.crash(id);
        g.start(id);
    }
    g.disks.insert(4, MemoryLog::new());
    g.start(4);
    let (leader, _) = g.await_leader(&[1, 2, 3], 100);
    for r in 1..=5u64 {
        assert!(g.propose(7, r, join(&format!("h{r}"))).1.is_ok());
    }
    for _ in 0..5 {
        g.step();
    }
    assert_eq!(g.nodes[&4].view(), g.nodes[&leader].view(), "the learner applied the same log");
    assert!(!g.nodes[&4].is_leader());
    // With two voters gone, the learner does not make a majority: nothing commits, nobody leads.
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|i| *i != leader).collect();
    g.crash(leader);
    g.crash(others[0]);
    for _ in 0..100 {
        g.step();
    }
    assert!(g.leaders().is_empty(), "no leader without a majority of voters: {:?}", g.leaders());
}

#[test]
fn a_learner_added_at_run_time_catches_up_and_every_coordinator_records_it() {
    let mut g = Group::new(3, 8);
    let (leader, _) = g.await_leader(&[1, 2, 3], 100);
    for r in 1..=12u64 {
        assert!(g.propose(7, r, join(&format!("h{r}"))).1.is_ok());
    }
    // Coordinator 4 starts knowing the voters and itself as a learner; the voters do not know it.
    let c = Coordinator::new(
        CoordinatorConfig { learners: vec![4], ..CoordinatorConfig::new(4, vec![1, 2, 3]) },
        Recovered::default(),
        MemoryLog::new(),
    )
    .expect("a learner starts");
    g.nodes.insert(4, c);
    let req = ClientRequest { client: 9, request: 1, body: RequestBody::AddLearner { id: 4 } };
    match g.ask(leader, req, 50) {
        Some(ReplyBody::Configured { voters, learners, .. }) => {
            assert_eq!(voters, vec![1, 2, 3]);
            assert_eq!(learners, vec![4]);
        }
        other => panic!("add-learner answered {other:?}"),
    }
    for _ in 0..40 {
        g.step();
    }
    // It caught up (through the snapshot: the leader compacted after 8 entries) and applies
    // what comes next.
    assert_eq!(g.nodes[&4].view(), g.nodes[&leader].view());
    assert!(g.propose(7, 13, join("h13")).1.is_ok());
    for _ in 0..5 {
        g.step();
    }
    assert_eq!(g.nodes[&4].view().ranks().count(), 13);
    assert!(!g.nodes[&4].is_leader());
}
