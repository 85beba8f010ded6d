//! The Raft coordinator group as real processes on loopback: `phalanx coordinator` ×3 with
//! durable logs, killed with SIGKILL and restarted from their data directories, while clients
//! (the library's `CoordinatorClient`) keep proposing membership commands.
//!
//! What is checked: a new leader takes over and clients carry on; an acknowledged command is
//! never lost; no two coordinators ever hold different committed entries at one index; a
//! restarted coordinator catches up; the history of every client call is linearizable.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command as Process, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use phalanx_node::coordinator::{ClientError, CoordinatorClient, FileLog};
use phalanx_runtime::coordinator::eraftpb::Entry;
use phalanx_runtime::coordinator::CommandResult;
use phalanx_runtime::membership::{self, ClusterView, Command, Outcome};
use support::linearizability::{check, Call, Model};

const SECRET: &[u8] = b"coordinator-test-secret";

/// Three coordinator processes and their data directories.
struct Group {
    peers: Vec<(u64, SocketAddr)>,
    root: PathBuf,
    children: BTreeMap<u64, Child>,
    snapshot_after: u64,
}

impl Group {
    fn new(name: &str, snapshot_after: u64) -> Group {
        let root = std::env::temp_dir().join(format!("phalanx-coord-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let peers = (1..=3u64).map(|id| (id, phalanx_net::free_loopback_addr().expect("a free port"))).collect();
        let mut g = Group { peers, root, children: BTreeMap::new(), snapshot_after };
        for id in 1..=3 {
            g.start(id);
        }
        g
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join(format!("c{id}"))
    }

    fn start(&mut self, id: u64) {
        self.start_with(id, None);
    }

    /// Starts coordinator `id`; with `crash_at_sync`, it aborts itself at that sync of its log
    /// (records written, not yet durable or acknowledged).
    fn start_with(&mut self, id: u64, crash_at_sync: Option<u64>) {
        let peers: Vec<String> = self.peers.iter().map(|(i, a)| format!("{i}={a}")).collect();
        let mut cmd = Process::new(env!("CARGO_BIN_EXE_phalanx"));
        if let Some(n) = crash_at_sync {
            cmd.env("PHALANX_FAILPOINT_CRASH_AT_SYNC", n.to_string());
        }
        let child = cmd
            .args(["coordinator", "--id", &id.to_string(), "--peers", &peers.join(",")])
            .arg("--data-dir")
            .arg(self.dir(id))
            .args(["--secret", std::str::from_utf8(SECRET).expect("utf-8")])
            .args(["--snapshot-after", &self.snapshot_after.to_string()])
            // The clients here are not ranks and never heartbeat: no failure detector.
            .args(["--failure-ms", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("phalanx coordinator starts");
        self.children.insert(id, child);
    }

    /// Restarts (without failpoint) every coordinator that died by itself; returns how many.
    fn reap(&mut self) -> u64 {
        let mut dead = Vec::new();
        for (id, c) in self.children.iter_mut() {
            if matches!(c.try_wait(), Ok(Some(_))) {
                dead.push(*id);
            }
        }
        for id in &dead {
            self.children.remove(id);
            self.start(*id);
        }
        dead.len() as u64
    }

    fn kill9(&mut self, id: u64) {
        if let Some(mut c) = self.children.remove(&id) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every coordinator's log as it is on disk now.
    fn logs(&self) -> BTreeMap<u64, phalanx_runtime::coordinator::Recovered> {
        (1..=3).map(|id| (id, FileLog::read(&self.dir(id)).expect("a readable log"))).collect()
    }

    async fn client(&self) -> CoordinatorClient {
        let mut c = CoordinatorClient::connect(&self.peers, SECRET).await.expect("client starts");
        c.try_timeout = Duration::from_millis(400);
        c.deadline = Duration::from_secs(20);
        c
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for id in 1..=3 {
            self.kill9(id);
        }
        if std::env::var_os("PHALANX_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

fn join(host: String) -> Command {
    Command::Join { dc: 0, addrs: vec![format!("{host}:1")], host, incarnation: 1 }
}

/// Committed entries must agree across coordinators: for every index, every log whose commit
/// index covers it holds the same entry. Returns the merged committed log.
fn committed_agreement(logs: &BTreeMap<u64, phalanx_runtime::coordinator::Recovered>) -> BTreeMap<u64, Entry> {
    let mut merged: BTreeMap<u64, (u64, Entry)> = BTreeMap::new();
    for (id, log) in logs {
        for e in log.entries.iter().filter(|e| e.index <= log.hard_state.commit) {
            if let Some((other, seen)) = merged.get(&e.index) {
                assert_eq!(
                    (seen.term, &seen.data, &seen.context),
                    (e.term, &e.data, &e.context),
                    "coordinators {other} and {id} committed different entries at index {}",
                    e.index
                );
            } else {
                merged.insert(e.index, (*id, e.clone()));
            }
        }
    }
    merged.into_iter().map(|(i, (_, e))| (i, e)).collect()
}

/// Acknowledged commands are in the committed log at their index, on a majority; those already
/// compacted into a snapshot everywhere must show in the final view (joins are never undone
/// in these tests).
fn acknowledged_are_durable(
    logs: &BTreeMap<u64, phalanx_runtime::coordinator::Recovered>,
    acked: &BTreeMap<u64, Command>,
    final_view: &ClusterView,
) {
    let compacted = logs.values().map(|l| l.snapshot.as_ref().map_or(0, |s| s.get_metadata().index)).max().unwrap_or(0);
    for (index, command) in acked {
        if *index <= compacted {
            if let Command::Join { host, .. } = command {
                assert!(
                    final_view.ranks().any(|(_, m)| m.host == *host),
                    "acknowledged join of {host} (index {index}) is in the view"
                );
            }
            continue;
        }
        let holders: Vec<u64> = logs
            .iter()
            .filter(|(_, l)| l.hard_state.commit >= *index && l.entry(*index).is_some())
            .map(|(id, _)| *id)
            .collect();
        let summary: Vec<String> = logs
            .iter()
            .map(|(id, l)| {
                let first = l.entries.first().map_or(0, |e| e.index);
                format!(
                    "{id}: commit {} term {} entries {first}..={}",
                    l.hard_state.commit,
                    l.hard_state.term,
                    l.last_index()
                )
            })
            .collect();
        assert!(holders.len() >= 2, "acknowledged index {index} is committed on {holders:?} only; logs {summary:?}");
        for id in holders {
            let e = logs[&id].entry(*index).expect("held");
            assert_eq!(membership::decode(&e.data).as_ref(), Ok(command), "coordinator {id}, index {index}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_the_leader_a_new_one_takes_over_nothing_acknowledged_is_lost_and_the_old_one_catches_up() {
    support::init_log();
    let mut g = Group::new("failover", 1024);
    let mut client = g.client().await;
    let mut acked = BTreeMap::new();
    for i in 0..10 {
        let c = join(format!("before-{i}"));
        let (index, result) = client.propose(c.clone()).await.expect("the group commits");
        assert!(matches!(result, Ok(Outcome::Joined { .. })), "{result:?}");
        acked.insert(index, c);
    }
    let old = client.leader();
    g.kill9(old);
    let killed = Instant::now();
    let c = join("after-0".into());
    let (index, _) = client.propose(c.clone()).await.expect("a new leader commits");
    let failover = killed.elapsed();
    acked.insert(index, c);
    let new = client.leader();
    assert_ne!(new, old, "the killed coordinator cannot have answered");
    eprintln!("leader {old} SIGKILLed; coordinator {new} committed the next command after {failover:?}");
    for i in 1..10 {
        let c = join(format!("after-{i}"));
        let (index, _) = client.propose(c.clone()).await.expect("clients carry on");
        acked.insert(index, c);
    }
    // Restart the old leader from its data directory: it catches up to the last acknowledged
    // index (its log on disk says so).
    g.start(old);
    let last = *acked.keys().last().expect("acknowledged");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = FileLog::read(&g.dir(old)).expect("readable");
        if log.hard_state.commit >= last && log.last_index() >= last {
            break;
        }
        assert!(Instant::now() < deadline, "restarted coordinator {old} did not catch up: {:?}", log.hard_state);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, view) = client.read_view().await.expect("a linearizable read");
    assert_eq!(view.ranks().count(), 20, "every acknowledged join applied once");
    for id in 1..=3 {
        g.kill9(id);
    }
    let logs = g.logs();
    committed_agreement(&logs);
    acknowledged_are_durable(&logs, &acked, &view);
    assert!(logs[&old].hard_state.commit >= last);
}

/// Waits `total`, restarting (without failpoint) every coordinator that dies meanwhile, as a
/// supervisor would; returns how many did.
async fn reap_for(g: &mut Group, total: Duration) -> u64 {
    let until = Instant::now() + total;
    let mut n = 0;
    while Instant::now() < until {
        n += g.reap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    n
}

/// The cluster view as the checker's model.
#[derive(Clone)]
struct ViewModel(ClusterView);

#[derive(Clone, Debug)]
enum Op {
    Propose(Command),
    Read,
}

#[derive(Clone, Debug, PartialEq)]
enum Out {
    Applied(CommandResult),
    View(ClusterView),
}

impl Model for ViewModel {
    type Op = Op;
    type Out = Out;
    fn step(&self, op: &Op) -> (ViewModel, Out) {
        match op {
            Op::Propose(c) => {
                let mut v = self.0.clone();
                let r = v.apply(c);
                (ViewModel(v), Out::Applied(r))
            }
            Op::Read => (self.clone(), Out::View(self.0.clone())),
        }
    }
    fn key(&self) -> Vec<u8> {
        membership::encode_view(&self.0).to_vec()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_coordinators_twenty_times_under_load_loses_no_acknowledged_command_and_stays_linearizable() {
    support::init_log();
    let mut g = Group::new("durability", 256);
    // Wait until the group serves.
    g.client().await.read_view().await.expect("the group starts");
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let history: Arc<Mutex<Vec<Call<Op, Out>>>> = Arc::default();
    let acked: Arc<Mutex<BTreeMap<u64, Command>>> = Arc::default();
    let mut workers = Vec::new();
    for w in 0..3u64 {
        let mut client = g.client().await;
        let (stop, history, acked) = (stop.clone(), history.clone(), acked.clone());
        workers.push(tokio::spawn(async move {
            let mut epoch = 0;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let op = match (w + i) % 5 {
                    0 => Op::Read,
                    1 => Op::Propose(Command::BeginEpoch { expected: epoch }),
                    _ => Op::Propose(join(format!("w{w}-{i}"))),
                };
                let invoke = start.elapsed().as_nanos() as u64;
                let (out, complete) = match &op {
                    Op::Read => match client.read_view().await {
                        Ok((_, v)) => {
                            epoch = v.epoch();
                            (Some(Out::View(v)), Some(start.elapsed().as_nanos() as u64))
                        }
                        Err(ClientError::Unavailable { .. }) => (None, None),
                        Err(e) => panic!("read failed: {e}"),
                    },
                    Op::Propose(c) => match client.propose(c.clone()).await {
                        Ok((index, r)) => {
                            if let Ok(Outcome::EpochBegan { epoch: e, .. }) = &r {
                                epoch = *e;
                            }
                            if let Err(membership::ViewError::EpochMoved { current, .. }) = &r {
                                epoch = *current;
                            }
                            acked.lock().expect("lock").insert(index, c.clone());
                            (Some(Out::Applied(r)), Some(start.elapsed().as_nanos() as u64))
                        }
                        Err(ClientError::Unavailable { .. }) => (None, None),
                        Err(e) => panic!("proposal failed: {e}"),
                    },
                };
                history.lock().expect("lock").push(Call { invoke, complete, op, out });
                // Pace the load (keeps the history small enough to check quickly).
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        }));
    }
    // Twenty SIGKILLs — the leader on even rounds, a follower on odd ones — each coordinator
    // restarted from its data directory with a failpoint that makes it abort itself a few
    // syncs later, between writing log records and acknowledging them.
    let mut probe = g.client().await;
    probe.deadline = Duration::from_secs(2);
    let mut self_aborted = 0;
    for round in 0..20u64 {
        let leader = match probe.read_view().await {
            Ok(_) => probe.leader(),
            Err(_) => 1 + round % 3,
        };
        let victim = if round % 2 == 0 { leader } else { 1 + (leader + round) % 3 };
        let victim = if victim == 0 { 1 } else { victim };
        g.kill9(victim);
        self_aborted += reap_for(&mut g, Duration::from_millis(150)).await;
        g.start_with(victim, Some(3 + (round * 7) % 17));
        self_aborted += reap_for(&mut g, Duration::from_millis(250)).await;
    }
    self_aborted += reap_for(&mut g, Duration::from_millis(300)).await;
    probe.deadline = Duration::from_secs(20);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    // The final view, through a fresh client (a new transport endpoint), with a minute's
    // patience: on a loaded 2-core machine the last restarts and elections can take a while.
    let mut fresh = g.client().await;
    fresh.deadline = Duration::from_secs(60);
    let (_, final_view) = match fresh.read_view().await {
        Ok(v) => v,
        Err(e) => {
            let alive: Vec<u64> = g.children.keys().copied().collect();
            panic!("the group does not serve after the chaos ({e}); coordinator processes {alive:?}");
        }
    };
    for id in 1..=3 {
        g.kill9(id);
    }
    let logs = g.logs();
    committed_agreement(&logs);
    let acked = acked.lock().expect("lock").clone();
    acknowledged_are_durable(&logs, &acked, &final_view);
    let history = history.lock().expect("lock").clone();
    let known = history.iter().filter(|c| c.complete.is_some()).count();
    eprintln!(
        "{} calls ({known} completed, {} of unknown outcome), {} acknowledged commands, final epoch {}",
        history.len(),
        history.len() - known,
        acked.len(),
        final_view.epoch()
    );
    assert!(acked.len() >= 20, "the clients made progress through the chaos: {} commands", acked.len());
    eprintln!("{self_aborted} coordinators died by failpoint between writing and acknowledging");
    assert!(self_aborted >= 5, "the failpoint fired only {self_aborted} times");
    check(ViewModel(ClusterView::new()), &history).expect("the history is linearizable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_added_as_a_learner_at_run_time_catches_up_and_follows_the_log() {
    support::init_log();
    let g = Group::new("learner", 16);
    let mut client = g.client().await;
    for i in 0..40 {
        assert!(client.propose(join(format!("early-{i}"))).await.expect("the group commits").1.is_ok());
    }
    // A fourth coordinator, started knowing the voters and itself as a learner.
    let addr = phalanx_net::free_loopback_addr().expect("a free port");
    let dir = g.root.join("c4");
    let peers: Vec<String> = g.peers.iter().map(|(i, a)| format!("{i}={a}")).collect();
    let mut learner = Process::new(env!("CARGO_BIN_EXE_phalanx"))
        .args(["coordinator", "--id", "4", "--peers", &peers.join(","), "--learners", &format!("4={addr}")])
        .arg("--data-dir")
        .arg(&dir)
        .args(["--secret", std::str::from_utf8(SECRET).expect("utf-8"), "--failure-ms", "0"])
        .stdout(Stdio::null())
        .spawn()
        .expect("the learner starts");
    let (voters, learners) = client.add_learner(4).await.expect("the group adds it");
    assert_eq!((voters, learners), (vec![1, 2, 3], vec![4]));
    let mut last = 0;
    for i in 0..5 {
        last = client.propose(join(format!("late-{i}"))).await.expect("the group commits").0;
    }
    // It catches up (from a snapshot: the voters compacted) and follows what comes next.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = FileLog::read(&dir).expect("a readable log");
        if log.hard_state.commit >= last && log.entry(last).is_some() {
            assert!(log.snapshot.is_some(), "it was brought up to date by a snapshot");
            break;
        }
        assert!(Instant::now() < deadline, "the learner did not catch up: {:?}", log.hard_state);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = learner.kill();
    let _ = learner.wait();
}
