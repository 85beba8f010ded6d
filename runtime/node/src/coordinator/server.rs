//! One coordinator process on tokio: the sans-IO [`Coordinator`] driven over a `phalanx-net`
//! node (Raft messages between coordinators, client requests from ranks), with its log in a
//! [`FileLog`]. The loop only moves bytes and reads the clock.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use phalanx_net::{LinkKind, Node, NodeConfig, NodeError, PathFaults, PathSpec};
use phalanx_proto::{ChannelId, Event, RankId, TransportConfig};
use phalanx_runtime::coordinator::eraftpb::{Entry, HardState, Snapshot};
use phalanx_runtime::coordinator::{Coordinator, CoordinatorConfig, CoordinatorError, DurableLog};
use thiserror::Error;
use tracing::{debug, info, info_span, warn, Instrument};

use super::file_log::{FileLog, FileLogError};

/// Channel of Raft messages between coordinators.
pub const RAFT_CHANNEL: ChannelId = ChannelId(2000);
/// Channel of client requests and replies.
pub const CLIENT_CHANNEL: ChannelId = ChannelId(2001);

/// How to run one coordinator.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// This coordinator's id (one of `peers`).
    pub id: u64,
    /// Every voting coordinator: id and the TCP address it listens on.
    pub peers: Vec<(u64, SocketAddr)>,
    /// Non-voting coordinators (learners): they replicate and apply the log, never vote.
    pub learners: Vec<(u64, SocketAddr)>,
    /// Where the log lives.
    pub data_dir: PathBuf,
    /// Cluster secret (coordinators and clients prove it on every link).
    pub secret: Vec<u8>,
    /// One Raft tick.
    pub tick: Duration,
    /// Ticks before a follower campaigns (plus seeded jitter of up to half as many).
    pub election_ticks: usize,
    /// Ticks between heartbeats.
    pub heartbeat_ticks: usize,
    /// Applied entries between snapshots.
    pub snapshot_after: u64,
    /// A rank without heartbeat this long is declared failed by the leader (zero: never).
    pub failure_timeout: Duration,
    /// Test failpoint: end the process at once (no destructors, no flush: what `kill -9`
    /// leaves) at this sync of the log, after the records were written and before they are
    /// made durable or acknowledged.
    pub crash_at_sync: Option<u64>,
}

/// The log with the crash failpoint of [`ServerConfig::crash_at_sync`].
struct CrashPoint {
    inner: FileLog,
    crash_at_sync: Option<u64>,
    syncs: u64,
}

impl DurableLog for CrashPoint {
    fn append(&mut self, entries: &[Entry]) -> std::io::Result<()> {
        self.inner.append(entries)
    }

    fn save_hard_state(&mut self, hard_state: &HardState) -> std::io::Result<()> {
        self.inner.save_hard_state(hard_state)
    }

    fn save_snapshot(&mut self, snapshot: &Snapshot) -> std::io::Result<()> {
        self.inner.save_snapshot(snapshot)
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.syncs += 1;
        if self.crash_at_sync == Some(self.syncs) {
            eprintln!(
                "coordinator: failpoint: dying at sync {} (written, not yet durable or acknowledged)",
                self.syncs
            );
            // No destructor runs, buffered records are lost, nothing is synced: what a kill -9
            // leaves (exit rather than abort: no core dump).
            std::process::exit(137);
        }
        self.inner.sync()
    }
}

impl ServerConfig {
    /// Defaults: 50 ms ticks, elections after 10 ticks (0.5–0.75 s), heartbeats every 2 ticks,
    /// ranks declared failed after 3 s without a heartbeat.
    pub fn new(id: u64, peers: Vec<(u64, SocketAddr)>, data_dir: PathBuf, secret: Vec<u8>) -> ServerConfig {
        ServerConfig {
            id,
            peers,
            learners: Vec::new(),
            data_dir,
            secret,
            tick: Duration::from_millis(50),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_after: 1024,
            failure_timeout: Duration::from_secs(3),
            crash_at_sync: None,
        }
    }
}

/// Why a coordinator process stopped.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The configuration is unusable.
    #[error("coordinator {id}: {reason}")]
    Config {
        /// The coordinator.
        id: u64,
        /// What is wrong.
        reason: String,
    },
    /// The data directory cannot be used.
    #[error(transparent)]
    Log(#[from] FileLogError),
    /// The transport could not start.
    #[error("coordinator transport: {0}")]
    Transport(#[from] NodeError),
    /// The coordinator failed (storage, raft).
    #[error(transparent)]
    Coordinator(#[from] CoordinatorError),
}

/// Runs a coordinator until `shutdown` resolves or it fails. `on_listening` is called with the
/// bound address once the transport listens.
pub async fn run_coordinator(
    config: ServerConfig,
    on_listening: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let id = config.id;
    let everyone: Vec<(u64, SocketAddr)> = config.peers.iter().chain(&config.learners).copied().collect();
    let Some(listen) = everyone.iter().find(|(p, _)| *p == id).map(|(_, a)| *a) else {
        return Err(ServerError::Config { id, reason: "its id is not among --peers or --learners".into() });
    };
    if everyone.iter().any(|(p, _)| *p == 0 || *p > u64::from(u32::MAX >> 1)) {
        return Err(ServerError::Config { id, reason: "coordinator ids are 1..2^31".into() });
    }
    let (log, recovered) = FileLog::open(&config.data_dir)?;
    let voters: Vec<u64> = config.peers.iter().map(|(p, _)| *p).collect();
    let cconfig = CoordinatorConfig {
        election_ticks: config.election_ticks,
        heartbeat_ticks: config.heartbeat_ticks,
        snapshot_after: config.snapshot_after,
        failure_ticks: (config.failure_timeout.as_nanos() / config.tick.as_nanos().max(1)) as u64,
        // The jitter only has to differ between coordinators and restarts.
        seed: id ^ recovered.hard_state.term.rotate_left(17) ^ recovered.entries.len() as u64,
        learners: config.learners.iter().map(|(p, _)| *p).collect(),
        ..CoordinatorConfig::new(id, voters)
    };
    let log = CrashPoint { inner: log, crash_at_sync: config.crash_at_sync, syncs: 0 };
    let mut coordinator = Coordinator::new(cconfig, recovered, log)?;

    let mut node_config = NodeConfig::new(RankId(id as u32), config.secret.clone());
    node_config.tcp_listen = vec![listen];
    node_config.transport = TransportConfig::default();
    node_config.paths = everyone
        .iter()
        .filter(|(p, _)| *p != id)
        .map(|(p, addr)| PathSpec {
            peer: RankId(*p as u32),
            kind: LinkKind::Tcp,
            remote: *addr,
            bind: None,
            faults: PathFaults::new(),
        })
        .collect();
    let mut node = Node::start(node_config).await?;
    let handle = node.handle();
    on_listening(node.tcp_addrs().first().copied().unwrap_or(listen));
    // Coordinators have ids below 2^31 (clients above): one added at run time as a learner is
    // not in the configuration this process started with, and dials in itself.
    let is_peer = |r: RankId| r.0 < 0x8000_0000;

    let span = info_span!("coordinator", id);
    async move {
        let mut ticker = tokio::time::interval(config.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    info!("shutting down");
                    return Ok(());
                }
                _ = ticker.tick() => coordinator.tick(),
                ev = node.next_event() => {
                    if !apply_event(&mut coordinator, ev, &is_peer) {
                        return Err(ServerError::Transport(NodeError::Closed));
                    }
                    // Group commit: take whatever else has already arrived, so one sync of the
                    // log covers all of it (under load, far fewer fsyncs than events).
                    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                    for _ in 0..256 {
                        match node.poll_event(&mut cx) {
                            std::task::Poll::Ready(ev) => {
                                if !apply_event(&mut coordinator, ev, &is_peer) {
                                    return Err(ServerError::Transport(NodeError::Closed));
                                }
                            }
                            std::task::Poll::Pending => break,
                        }
                    }
                }
            }
            coordinator.process()?;
            while let Some((to, bytes)) = coordinator.poll_peer() {
                if handle.send(RankId(to as u32), RAFT_CHANNEL, bytes).await.is_err() {
                    return Err(ServerError::Transport(NodeError::Closed));
                }
            }
            while let Some((to, bytes)) = coordinator.poll_client() {
                if handle.send(RankId(to as u32), CLIENT_CHANNEL, bytes).await.is_err() {
                    return Err(ServerError::Transport(NodeError::Closed));
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// Hands one transport event to the coordinator; false once the node has shut down.
fn apply_event<L: DurableLog>(
    coordinator: &mut Coordinator<L>,
    ev: Option<Event>,
    is_peer: &impl Fn(RankId) -> bool,
) -> bool {
    match ev {
        None => return false,
        Some(Event::Message(m)) if m.channel == RAFT_CHANNEL && is_peer(m.from) => {
            if let Err(e) = coordinator.handle_peer(u64::from(m.from.0), &m.payload.to_bytes()) {
                warn!(error = %e, "raft message refused");
            }
        }
        Some(Event::Message(m)) if m.channel == CLIENT_CHANNEL => {
            coordinator.handle_client(u64::from(m.from.0), &m.payload.to_bytes());
        }
        Some(Event::Message(m)) => {
            debug!(from = %m.from, channel = ?m.channel, "message on an unknown channel ignored")
        }
        Some(Event::PeerUnreachable { peer, .. }) if is_peer(peer) => {
            // Raft stops streaming to it and probes. (Nothing queued is abandoned: a peer that
            // comes back with the same incarnation would miss what is sent after an abandon —
            // the session numbers from zero again. What stays queued for a client that is gone
            // for good is one small reply.)
            coordinator.report_unreachable(u64::from(peer.0));
        }
        Some(_) => {}
    }
    true
}
