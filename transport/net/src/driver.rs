//! The tokio driver: one task owns the sans-IO [`Endpoint`] and moves its inputs and outputs;
//! link tasks own the sockets; dialers keep every configured path connected.
//!
//! This is the only place the transport reads a clock or draws OS randomness (nonces and the
//! incarnation id); everything it decides comes from `phalanx-proto`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use phalanx_proto::{
    ChannelId, Endpoint, EndpointCounters, Epoch, Event, Frame, LinkCounters, LinkId, LinkIdentity, Payload, Placer,
    RankId, TransportConfig,
};
use rand::{RngCore, SeedableRng};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tracing::{info, warn, Instrument};

use crate::faults::PathFaults;
use crate::link::LinkInput;
use crate::tls::TlsIdentity;

/// The kind of socket a path uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// A TCP connection.
    Tcp,
    /// A QUIC connection (mutual TLS) carrying `quic_streams` bidirectional streams.
    Quic,
}

/// One path this node dials and keeps connected.
#[derive(Clone, Debug)]
pub struct PathSpec {
    /// The rank at the other end.
    pub peer: RankId,
    /// Socket kind.
    pub kind: LinkKind,
    /// Address to dial.
    pub remote: SocketAddr,
    /// Local address to dial from (one per NIC); `None` lets the OS choose.
    pub bind: Option<SocketAddr>,
    /// Fault controls of this path.
    pub faults: PathFaults,
}

/// How to start a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This rank.
    pub rank: RankId,
    /// Starting epoch.
    pub epoch: Epoch,
    /// Cluster secret: every link proves knowledge of it.
    pub secret: Vec<u8>,
    /// Transport limits and timers.
    pub transport: TransportConfig,
    /// TCP addresses to accept links on (port 0 picks one; see [`Node::tcp_addrs`]).
    pub tcp_listen: Vec<SocketAddr>,
    /// UDP address to accept QUIC links on.
    pub quic_listen: Option<SocketAddr>,
    /// QUIC credentials (required for QUIC links).
    pub tls: Option<TlsIdentity>,
    /// Streams a QUIC path opens on its one connection; each stream is a link (a path of its
    /// own to the session, sharing the connection's congestion control).
    pub quic_streams: u32,
    /// Paths to dial.
    pub paths: Vec<PathSpec>,
    /// Limit on a link handshake.
    pub handshake_timeout: Duration,
    /// Limit on one connection attempt.
    pub connect_timeout: Duration,
    /// First wait before redialing a lost path (doubles up to `redial_max`).
    pub redial_initial: Duration,
    /// Longest wait between redials.
    pub redial_max: Duration,
}

impl NodeConfig {
    /// A node with defaults and no listeners or paths.
    pub fn new(rank: RankId, secret: impl Into<Vec<u8>>) -> NodeConfig {
        NodeConfig {
            rank,
            epoch: Epoch(1),
            secret: secret.into(),
            transport: TransportConfig::default(),
            tcp_listen: Vec::new(),
            quic_listen: None,
            tls: None,
            quic_streams: 1,
            paths: Vec::new(),
            handshake_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            redial_initial: Duration::from_millis(50),
            redial_max: Duration::from_secs(1),
        }
    }
}

/// Why a node could not start or a call failed.
#[derive(Debug, Error)]
pub enum NodeError {
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The configuration is inconsistent.
    #[error("invalid node configuration: {0}")]
    Config(String),
    /// TLS credentials are unusable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The node has shut down.
    #[error("the node has shut down")]
    Closed,
    /// The endpoint refused the message.
    #[error(transparent)]
    Send(#[from] phalanx_proto::SendError),
}

/// Endpoint totals and the counters of each live link (with its peer).
pub type CounterSnapshot = (EndpointCounters, Vec<(LinkId, RankId, LinkCounters)>);

/// Commands to the endpoint task.
#[derive(Debug)]
pub(crate) enum Command {
    Send {
        peer: RankId,
        channel: ChannelId,
        payload: Payload,
        done: oneshot::Sender<Result<(), NodeError>>,
    },
    Link(LinkInput),
    LinkUp {
        link: LinkId,
        peer: LinkIdentity,
        writer: mpsc::UnboundedSender<Frame>,
        reader: AbortHandle,
        closed: oneshot::Sender<()>,
    },
    Counters(oneshot::Sender<CounterSnapshot>),
    SetEpoch(Epoch),
    SetFence(Epoch),
    Abandon(RankId, oneshot::Sender<u64>),
    Undelivered(RankId, oneshot::Sender<u64>),
    Shutdown,
}

struct Shared {
    rank: RankId,
    identity: Mutex<LinkIdentity>,
    secret: Vec<u8>,
    max_payload: u32,
    next_link: AtomicU64,
    auth_failures: AtomicU64,
    rng: Mutex<rand_chacha::ChaCha20Rng>,
    commands: mpsc::UnboundedSender<Command>,
    start: tokio::time::Instant,
    placer: PlacerSlot,
}

/// The application's [`Placer`], which every link reader of the node asks (see
/// [`NodeHandle::set_placer`]).
pub(crate) type PlacerSlot = Arc<std::sync::RwLock<Option<Arc<dyn Placer>>>>;

/// A cheap, cloneable handle to a running node.
#[derive(Clone)]
pub struct NodeHandle {
    shared: Arc<Shared>,
}

impl NodeHandle {
    /// This rank.
    pub fn rank(&self) -> RankId {
        self.shared.rank
    }

    /// The endpoint's clock: the time base of every [`phalanx_proto::Instant`] in its events.
    pub fn now(&self) -> phalanx_proto::Instant {
        phalanx_proto::Instant(self.shared.start.elapsed().as_nanos() as u64)
    }

    pub(crate) fn identity(&self) -> LinkIdentity {
        *self.shared.identity.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn secret(&self) -> &[u8] {
        &self.shared.secret
    }

    pub(crate) fn max_payload(&self) -> u32 {
        self.shared.max_payload
    }

    pub(crate) fn nonce(&self) -> [u8; 32] {
        let mut n = [0u8; 32];
        self.shared.rng.lock().unwrap_or_else(|e| e.into_inner()).fill_bytes(&mut n);
        n
    }

    pub(crate) fn allocate_link_id(&self) -> LinkId {
        LinkId(self.shared.next_link.fetch_add(1, Ordering::Relaxed))
    }

    pub(crate) fn command_sender(&self) -> mpsc::UnboundedSender<Command> {
        self.shared.commands.clone()
    }

    pub(crate) fn count_auth_failure(&self) {
        self.shared.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections refused because the peer failed authentication (or we failed theirs).
    pub fn auth_failures(&self) -> u64 {
        self.shared.auth_failures.load(Ordering::Relaxed)
    }

    /// Queues a message for `peer`. Returns once the endpoint accepted it (never waits for the
    /// network); delivery is reported by the peer, failure by [`Event::PeerUnreachable`].
    /// A payload of several parts is sent without joining them (see
    /// [`phalanx_proto::Endpoint::send`]).
    pub async fn send(&self, peer: RankId, channel: ChannelId, payload: impl Into<Payload>) -> Result<(), NodeError> {
        let payload = payload.into();
        let (done, rx) = oneshot::channel();
        self.shared.commands.send(Command::Send { peer, channel, payload, done }).map_err(|_| NodeError::Closed)?;
        rx.await.map_err(|_| NodeError::Closed)?
    }

    /// Endpoint totals and per-link counters of the live links.
    pub async fn counters(&self) -> Result<CounterSnapshot, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.shared.commands.send(Command::Counters(tx)).map_err(|_| NodeError::Closed)?;
        rx.await.map_err(|_| NodeError::Closed)
    }

    /// Sets the epoch stamped on frames and announced in handshakes.
    pub fn set_epoch(&self, epoch: Epoch) {
        self.shared.identity.lock().unwrap_or_else(|e| e.into_inner()).epoch = epoch;
        let _ = self.shared.commands.send(Command::SetEpoch(epoch));
    }

    /// Refuses frames from epochs below `fence`.
    pub fn set_fence(&self, fence: Epoch) {
        let _ = self.shared.commands.send(Command::SetFence(fence));
    }

    /// Drops everything queued for `peer`; returns the number of messages dropped. Only for a
    /// peer gone for good or restarted: the session numbers from zero again, so a peer that
    /// comes back with the same incarnation misses what is sent to it afterwards (see
    /// [`phalanx_proto::Endpoint::abandon_peer`]).
    pub async fn abandon_peer(&self, peer: RankId) -> Result<u64, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.shared.commands.send(Command::Abandon(peer, tx)).map_err(|_| NodeError::Closed)?;
        rx.await.map_err(|_| NodeError::Closed)
    }

    /// Messages to `peer` queued or in flight and not yet acknowledged.
    pub async fn undelivered(&self, peer: RankId) -> Result<u64, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.shared.commands.send(Command::Undelivered(peer, tx)).map_err(|_| NodeError::Closed)?;
        rx.await.map_err(|_| NodeError::Closed)
    }

    /// Waits until everything sent to `peer` has been acknowledged, or `timeout` passes.
    /// Returns whether it was all acknowledged (use before exiting a process).
    pub async fn flush(&self, peer: RankId, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.undelivered(peer).await {
                Ok(0) => return true,
                Err(_) => return false,
                Ok(_) if tokio::time::Instant::now() >= deadline => return false,
                Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }

    /// Lets the links read a message's data straight into a place the application posted for
    /// it (see [`phalanx_proto::posting`]): for a message whose first frame is small and whose
    /// data follows as one frame, a link asks `placer` and reads the data into the posting it
    /// gets. `None` turns that off; a node has one placer (a second call replaces the first).
    /// Messages for which nothing is posted, and every message a fault interrupts, arrive as
    /// before.
    pub fn set_placer(&self, placer: Option<Arc<dyn Placer>>) {
        *self.shared.placer.write().unwrap_or_else(|e| e.into_inner()) = placer;
    }

    pub(crate) fn placer_slot(&self) -> PlacerSlot {
        Arc::clone(&self.shared.placer)
    }

    /// Stops the node: closes every link and listener.
    pub fn shutdown(&self) {
        let _ = self.shared.commands.send(Command::Shutdown);
    }

    /// Completes when the node has shut down (its endpoint task is gone).
    pub(crate) async fn closed(&self) {
        self.shared.commands.closed().await
    }
}

/// A running node: the handle plus the stream of events for the application.
pub struct Node {
    handle: NodeHandle,
    events: mpsc::UnboundedReceiver<Event>,
    tcp_addrs: Vec<SocketAddr>,
    quic_addr: Option<SocketAddr>,
}

impl Node {
    /// Binds the listeners, starts the endpoint task and the dialers. Links come up in the
    /// background; messages sent before a path is up wait for it.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        config.transport.validate().map_err(NodeError::Config)?;
        let wants_quic = config.paths.iter().any(|p| p.kind == LinkKind::Quic) || config.quic_listen.is_some();
        if wants_quic && config.tls.is_none() {
            return Err(NodeError::Config("QUIC links need TLS credentials (tls)".into()));
        }
        let mut seed_rng = rand::rngs::OsRng;
        let mut seed = [0u8; 32];
        rand::TryRngCore::try_fill_bytes(&mut seed_rng, &mut seed)
            .map_err(|e| NodeError::Config(format!("no OS randomness: {e}")))?;
        let mut rng = rand_chacha::ChaCha20Rng::from_seed(seed);
        let incarnation = rng.next_u64();
        let mut endpoint = Endpoint::new(config.rank, incarnation, config.epoch, config.transport.clone());
        // A peer this node dials that never comes up is reported unreachable in time.
        for path in &config.paths {
            endpoint.expect_peer(phalanx_proto::Instant::ZERO, path.peer);
        }
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let handle = NodeHandle {
            shared: Arc::new(Shared {
                rank: config.rank,
                identity: Mutex::new(endpoint.identity()),
                secret: config.secret.clone(),
                max_payload: config.transport.max_payload_bytes,
                next_link: AtomicU64::new(1),
                auth_failures: AtomicU64::new(0),
                rng: Mutex::new(rng),
                commands: cmd_tx,
                start: tokio::time::Instant::now(),
                placer: PlacerSlot::default(),
            }),
        };
        let mut tcp_addrs = Vec::new();
        for addr in &config.tcp_listen {
            let listener =
                tokio::net::TcpListener::bind(addr).await.map_err(|source| NodeError::Bind { addr: *addr, source })?;
            tcp_addrs.push(listener.local_addr().map_err(|source| NodeError::Bind { addr: *addr, source })?);
            tokio::spawn(crate::tcp::accept_loop(handle.clone(), listener, config.handshake_timeout));
        }
        let mut quic_addr = None;
        let mut quic = None;
        if let Some(tls) = &config.tls {
            let bind = config.quic_listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
            let ep = crate::quic::endpoint(bind, tls, config.quic_listen.is_some())?;
            if config.quic_listen.is_some() {
                quic_addr = Some(ep.local_addr().map_err(|source| NodeError::Bind { addr: bind, source })?);
                tokio::spawn(crate::quic::accept_loop(handle.clone(), ep.clone(), config.handshake_timeout));
            }
            quic = Some((ep, tls.clone()));
        }
        let span = tracing::info_span!("endpoint", rank = %config.rank);
        tokio::spawn(run_endpoint(endpoint, cmd_rx, ev_tx, handle.shared.start).instrument(span));
        for path in config.paths.clone() {
            let dialer = crate::dial::Dialer {
                node: handle.clone(),
                path,
                quic: quic.clone(),
                quic_streams: config.quic_streams,
                handshake_timeout: config.handshake_timeout,
                connect_timeout: config.connect_timeout,
                redial_initial: config.redial_initial,
                redial_max: config.redial_max,
            };
            tokio::spawn(dialer.run());
        }
        info!(rank = %config.rank, ?tcp_addrs, ?quic_addr, incarnation, "node started");
        Ok(Node { handle, events: ev_rx, tcp_addrs, quic_addr })
    }

    /// A handle for sending and control (cloneable, usable from other tasks).
    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// The TCP addresses actually bound.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }

    /// The QUIC address actually bound.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic_addr
    }

    /// The next event (message or fault report). `None` once the node has shut down.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Polls for the next event: `Ready(None)` once the node has shut down; `Pending`
    /// schedules the waker of `cx` (the most recent caller's only) for the next event.
    pub fn poll_event(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Event>> {
        self.events.poll_recv(cx)
    }

    /// Waits for the next message, handing every other event to `on_other`; gives up after
    /// `timeout` (returns `None`).
    pub async fn next_message(
        &mut self,
        timeout: Duration,
        mut on_other: impl FnMut(&Event),
    ) -> Option<phalanx_proto::Message> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Event::Message(m))) => return Some(m),
                Ok(Some(other)) => on_other(&other),
                Ok(None) | Err(_) => return None,
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

struct LinkEntry {
    writer: mpsc::UnboundedSender<Frame>,
    reader: AbortHandle,
    _closed: oneshot::Sender<()>,
}

/// The endpoint task: the only owner of the [`Endpoint`].
async fn run_endpoint(
    mut endpoint: Endpoint,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    start: tokio::time::Instant,
) {
    let now = move || phalanx_proto::Instant(start.elapsed().as_nanos() as u64);
    let mut links: BTreeMap<LinkId, LinkEntry> = BTreeMap::new();
    // One timer for the task's life, moved only when the endpoint's deadline moves: a timer
    // registered anew on every pass (a new `sleep_until`) costs a trip through the timer wheel,
    // and one that fires earlier than the runtime's next wake-up also a write to its eventfd.
    let timer = tokio::time::sleep_until(start);
    tokio::pin!(timer);
    let mut armed: Option<phalanx_proto::Instant> = None;
    loop {
        let deadline = endpoint.poll_timeout();
        if deadline != armed {
            if let Some(t) = deadline {
                timer.as_mut().reset(start + Duration::from_nanos(t.as_nanos()));
            }
            armed = deadline;
        }
        let cmd = tokio::select! {
            c = commands.recv() => match c { Some(c) => Some(c), None => break },
            _ = &mut timer, if armed.is_some() => {
                // Fired: the next pass re-arms it for whatever the endpoint says then.
                armed = None;
                None
            }
        };
        let mut batch = 0;
        let mut next = cmd;
        loop {
            match next {
                Some(Command::Shutdown) => {
                    // Last acknowledgements out first; the writers send what they hold and
                    // close when their channels drop.
                    endpoint.flush_acks(now());
                    while let Some(tx) = endpoint.poll_transmit(now()) {
                        if let Some(l) = links.get(&tx.link) {
                            let _ = l.writer.send(tx.frame);
                        }
                    }
                    for (_, l) in std::mem::take(&mut links) {
                        l.reader.abort();
                    }
                    return;
                }
                Some(c) => handle_command(&mut endpoint, &mut links, c, now()),
                None => {}
            }
            batch += 1;
            if batch >= 256 {
                break;
            }
            match commands.try_recv() {
                Ok(c) => next = Some(c),
                Err(_) => break,
            }
        }
        let t = now();
        // Timers are checked after every batch, so a flood of frames cannot starve them.
        if endpoint.poll_timeout().is_some_and(|d| d <= t) {
            endpoint.handle_timeout(t);
        }
        while let Some(tx) = endpoint.poll_transmit(t) {
            if let Some(l) = links.get(&tx.link) {
                let _ = l.writer.send(tx.frame);
            }
        }
        while let Some(ev) = endpoint.poll_event() {
            if let Event::LinkFailed { link, .. } = &ev {
                if let Some(l) = links.remove(link) {
                    l.reader.abort();
                }
            }
            let _ = events.send(ev);
        }
    }
}

fn handle_command(
    endpoint: &mut Endpoint,
    links: &mut BTreeMap<LinkId, LinkEntry>,
    cmd: Command,
    now: phalanx_proto::Instant,
) {
    match cmd {
        Command::Send { peer, channel, payload, done } => {
            let r = endpoint.send(now, peer, channel, payload).map_err(NodeError::from);
            let _ = done.send(r);
        }
        Command::Link(LinkInput::Frame(link, frame)) => endpoint.handle_frame(now, link, frame),
        Command::Link(LinkInput::DecodeError(link, e)) => endpoint.handle_decode_error(now, link, e),
        Command::Link(LinkInput::Closed(link)) => {
            if links.contains_key(&link) {
                endpoint.handle_link_closed(now, link);
            }
        }
        Command::LinkUp { link, peer, writer, reader, closed } => {
            links.insert(link, LinkEntry { writer, reader, _closed: closed });
            endpoint.handle_link_up(now, link, peer);
        }
        Command::Counters(reply) => {
            let per_link = endpoint.links().filter_map(|(l, p)| endpoint.link_counters(l).map(|c| (l, p, c))).collect();
            let _ = reply.send((endpoint.counters(), per_link));
        }
        Command::SetEpoch(e) => endpoint.set_epoch(e),
        Command::SetFence(e) => endpoint.set_fence(e),
        Command::Abandon(peer, reply) => {
            let _ = reply.send(endpoint.abandon_peer(peer));
        }
        Command::Undelivered(peer, reply) => {
            let _ = reply.send(endpoint.undelivered_messages(peer));
        }
        Command::Shutdown => {}
    }
}

/// Logs a refused connection once, with the reason, and counts it.
pub(crate) fn refuse(node: &NodeHandle, from: &str, error: &dyn std::fmt::Display) {
    node.count_auth_failure();
    warn!(rank = %node.rank(), %from, %error, "link refused");
}
