//! Elastic membership for a rank: join through the coordinators, build the communicator of
//! each epoch from the committed view, heartbeat the leader, and move to a new epoch only at
//! step boundaries, all members together.
//!
//! ## The step-boundary protocol
//! Every `boundary_every` steps ([`ElasticMember::begin_step`]):
//! 1. Read the view linearizably. If this rank is the lowest live member and a change is
//!    pending (joiners, leavers, failed ranks), propose `BeginEpoch { expected: current }`
//!    (refused harmlessly if someone moved it already) and read again.
//! 2. **Agree**: all-reduce (max, `Shrink` policy) of the newest epoch each member has seen,
//!    over the current communicator. Survivors get the same target; members that did not take
//!    part are reported failed.
//! 3. If the target is newer: read the view at that epoch, flush and drop the old
//!    communicator, and build the new one (a fresh transport endpoint on this rank's fixed
//!    address, stamped with the new epoch and **fenced** below it, so frames from an older
//!    epoch — a zombie — are refused; its topology is the members' data centres from the
//!    view). A rank not in the new member list has departed.
//! 4. **Sync**: all-reduce (max) of the step over the new communicator, so joiners, which
//!    were admitted during the epoch change, start at the group's step.
//! 5. **Admission barrier**: the members wait until the joiners have recovered the training
//!    state of that step from them ([`ElasticMember::recover_state`]) or entered without it
//!    ([`ElasticMember::enter`]); members publish each step's state before its boundary.
//!
//! Only the lowest live member proposes an epoch change, and only before the agreement, so
//! one boundary sees at most one change and every member reads the same view. A rank whose
//! heartbeat comes back "fenced" (declared failed while paused or cut off) stops with
//! [`ElasticError::Fenced`]; it must rejoin as a new incarnation.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use phalanx_collectives::reduce::{DType, ReduceOp};
use phalanx_net::{LinkKind, Node, NodeConfig, NodeError, NodeHandle, PathFaults, PathSpec};
use phalanx_proto::{Epoch, Event, RankId, TransportConfig};
use phalanx_runtime::membership::{
    AdmissionAction, AdmissionInput, AdmissionPlan, BoundaryAction, BoundaryInput, BoundaryOutcome, BoundaryPlan,
    ClusterView, Command, Outcome, ViewError,
};
use phalanx_runtime::recovery::StateServer;
use thiserror::Error;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::coordinator::{ClientError, CoordinatorClient};
use crate::recovery::{fetch_state, FetchOptions, FetchedState, RECOVERY_CHANNEL};
use crate::{AllReduceAlgorithm, CallOptions, CommError, Communicator, FaultPolicy, Op, Subgroup, Topology};

/// How a rank takes part in an elastic job.
#[derive(Clone, Debug)]
pub struct ElasticConfig {
    /// The coordinator group (id, address).
    pub coordinators: Vec<(u64, SocketAddr)>,
    /// Cluster secret (coordinators and ranks).
    pub secret: Vec<u8>,
    /// This rank's data centre.
    pub dc: u32,
    /// This rank's host name.
    pub host: String,
    /// The transport address this rank listens on in every epoch (a fixed port: peers find it
    /// in the view).
    pub listen: SocketAddr,
    /// This process's incarnation (differs across restarts).
    pub incarnation: u64,
    /// Transport limits and timers of the per-epoch endpoints.
    pub transport: TransportConfig,
    /// Members this many before the first epoch begins (like torchrun's `--nnodes`).
    pub start_world: usize,
    /// Steps between boundaries.
    pub boundary_every: u64,
    /// Heartbeat period (the coordinators' failure timeout must be several of these).
    pub heartbeat_every: Duration,
    /// Deadline of the agreement and sync collectives.
    pub sync_deadline: Duration,
    /// How long to wait to be admitted into an epoch.
    pub admission_timeout: Duration,
    /// Where this rank serves its training state to recovering ranks (live recovery), if it
    /// does; published with [`ElasticMember::publish_state`], fetched by joiners with
    /// [`ElasticMember::recover_state`]. Announced as the second address of its join.
    pub state_listen: Option<SocketAddr>,
    /// Fault controls shared by every path this rank dials to a member in another data centre
    /// (tests and the demo cut "the WAN" with it).
    pub wan_faults: PathFaults,
}

impl ElasticConfig {
    /// A rank at `listen` joining the group at `coordinators`, with defaults: boundaries every
    /// step, heartbeats every 500 ms, 30 s to be admitted, 10 s for agreement.
    pub fn new(coordinators: Vec<(u64, SocketAddr)>, secret: &[u8], host: &str, listen: SocketAddr) -> ElasticConfig {
        ElasticConfig {
            coordinators,
            secret: secret.to_vec(),
            dc: 0,
            host: host.to_string(),
            listen,
            incarnation: 1,
            transport: TransportConfig::default(),
            start_world: 1,
            boundary_every: 1,
            heartbeat_every: Duration::from_millis(500),
            sync_deadline: Duration::from_secs(10),
            admission_timeout: Duration::from_secs(30),
            state_listen: None,
            wan_faults: PathFaults::new(),
        }
    }
}

/// Why a rank cannot go on.
#[derive(Debug, Error)]
pub enum ElasticError {
    /// The coordinators could not be reached (no leader within the client's deadline).
    #[error("coordinators: {0}")]
    Coordinator(#[from] ClientError),
    /// The coordinators refused a command (stale epoch, fenced, …).
    #[error("rank {rank}: the coordinators refused: {source}")]
    Refused {
        /// This rank.
        rank: u32,
        /// Why.
        #[source]
        source: ViewError,
    },
    /// This rank was declared failed (it was silent past the failure timeout): stop and rejoin
    /// as a new incarnation.
    #[error("rank {rank} was declared failed in epoch {epoch}: fenced, must rejoin")]
    Fenced {
        /// This rank.
        rank: u32,
        /// The view's epoch when it learnt so.
        epoch: u64,
    },
    /// Not admitted into an epoch in time (too few ranks joined to start, or nobody began one).
    #[error("rank {rank} not admitted within {waited:?} (view at epoch {epoch})")]
    NotAdmitted {
        /// This rank.
        rank: u32,
        /// How long it waited.
        waited: Duration,
        /// The view's epoch then.
        epoch: u64,
    },
    /// The transport endpoint of an epoch could not start.
    #[error("rank {rank}, epoch {epoch}: transport: {source}")]
    Transport {
        /// This rank.
        rank: u32,
        /// The epoch.
        epoch: u64,
        /// Why.
        #[source]
        source: NodeError,
    },
    /// The agreement or sync collective failed (its deadline passed).
    #[error("rank {rank}, epoch {epoch}: {source}")]
    Collective {
        /// This rank.
        rank: u32,
        /// The epoch.
        epoch: u64,
        /// Why.
        #[source]
        source: CommError,
    },
    /// The coordinators answered something that does not fit the request.
    #[error("unexpected coordinator answer: {0}")]
    Unexpected(String),
    /// This rank departed (it is in no epoch any more).
    #[error("rank {rank} departed")]
    Departed {
        /// This rank.
        rank: u32,
    },
    /// A member's address in the view is not a socket address.
    #[error("rank {rank} lists address {addr:?}, not host:port")]
    BadAddress {
        /// The member.
        rank: u32,
        /// The address.
        addr: String,
    },
}

/// What a step boundary did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boundary {
    /// Not a boundary step, or no change: same epoch, same communicator.
    Continue,
    /// A new epoch began: the communicator was rebuilt.
    Rebuilt {
        /// The new epoch.
        epoch: u64,
        /// Its members (view rank ids; communicator index = position).
        members: Vec<u32>,
    },
    /// This rank is not a member of the new epoch (it left): it must stop.
    Departed {
        /// The epoch it is not part of.
        epoch: u64,
    },
}

/// The communicators of one epoch, over one endpoint: all members, this rank's data centre,
/// and — on the lowest member of each data centre — the data centres' leaders.
struct EpochComms {
    all: Communicator,
    dc: Communicator,
    leaders: Option<Communicator>,
}

/// One rank of an elastic job.
pub struct ElasticMember {
    config: ElasticConfig,
    client: CoordinatorClient,
    rank: u32,
    epoch: u64,
    members: Vec<u32>,
    /// The data centre of each member (by communicator index).
    dcs: Vec<u32>,
    comm: Option<EpochComms>,
    step: u64,
    boundary_done_for: Option<u64>,
    /// Admitted, not yet through the admission barrier.
    owes_barrier: bool,
    shared_epoch: Arc<AtomicU64>,
    fenced: Arc<AtomicBool>,
    /// The current epoch's endpoint, for the heartbeat task to shut down when fenced.
    endpoint: Arc<std::sync::Mutex<Option<NodeHandle>>>,
    /// It asked to leave: dropped from the view, it is departed, not fenced.
    leaving: Arc<AtomicBool>,
    heartbeat: tokio::task::JoinHandle<()>,
    /// The state this rank serves (live recovery) and the task serving it.
    state: Option<(tokio::sync::watch::Sender<Option<StateServer>>, tokio::task::JoinHandle<()>)>,
}

impl Drop for ElasticMember {
    fn drop(&mut self) {
        self.heartbeat.abort();
        if let Some((_, task)) = &self.state {
            task.abort();
        }
    }
}

impl ElasticMember {
    /// Joins the job: gets a rank id from the coordinators, starts heartbeating, waits to be
    /// admitted into an epoch (beginning the first one when `start_world` ranks have joined),
    /// builds the communicator and syncs the step with the group.
    pub async fn join(config: ElasticConfig) -> Result<ElasticMember, ElasticError> {
        let mut client = CoordinatorClient::connect(&config.coordinators, &config.secret).await?;
        let command = Command::Join {
            dc: config.dc,
            host: config.host.clone(),
            addrs: std::iter::once(config.listen).chain(config.state_listen).map(|a| a.to_string()).collect(),
            incarnation: config.incarnation,
        };
        let rank = match client.propose(command).await?.1 {
            Ok(Outcome::Joined { rank, .. }) => rank,
            Err(ViewError::AlreadyJoined { rank, .. }) => rank,
            Ok(other) => return Err(ElasticError::Unexpected(format!("a join answered {other:?}"))),
            Err(source) => return Err(ElasticError::Refused { rank: u32::MAX, source }),
        };
        let shared_epoch = Arc::new(AtomicU64::new(0));
        let endpoint: Arc<std::sync::Mutex<Option<NodeHandle>>> = Arc::default();
        let leaving = Arc::new(AtomicBool::new(false));
        let fenced = Arc::new(AtomicBool::new(false));
        let heartbeat = tokio::spawn(
            heartbeat_loop(
                config.clone(),
                rank,
                shared_epoch.clone(),
                fenced.clone(),
                endpoint.clone(),
                leaving.clone(),
            )
            .instrument(info_span!("heartbeat", rank)),
        );
        let state = match config.state_listen {
            Some(addr) => {
                let mut c = NodeConfig::new(RankId(rank), config.secret.clone());
                c.tcp_listen = vec![addr];
                c.transport = config.transport.clone();
                let node = Node::start(c).await.map_err(|source| ElasticError::Transport { rank, epoch: 0, source })?;
                let (tx, rx) = tokio::sync::watch::channel(None);
                Some((tx, tokio::spawn(serve_published(node, rx).instrument(info_span!("state_server", rank)))))
            }
            None => None,
        };
        let mut me = ElasticMember {
            state,
            config,
            client,
            rank,
            epoch: 0,
            members: Vec::new(),
            dcs: Vec::new(),
            comm: None,
            step: 0,
            boundary_done_for: None,
            owes_barrier: false,
            shared_epoch,
            fenced,
            endpoint,
            leaving,
            heartbeat,
        };
        info!(rank, "joined; waiting to be admitted into an epoch");
        me.admit().await?;
        // It enters the epoch's training with the admission barrier: in
        // [`ElasticMember::recover_state`] once it has the state, or [`ElasticMember::enter`].
        me.owes_barrier = true;
        Ok(me)
    }

    /// This rank's id in the view (stable across epochs).
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Members of the current epoch (view rank ids; the communicator's index is the position).
    pub fn members(&self) -> &[u32] {
        &self.members
    }

    /// The data centre of each member of the current epoch, by communicator index.
    pub fn member_dcs(&self) -> &[u32] {
        &self.dcs
    }

    /// This rank's data centre.
    pub fn dc(&self) -> u32 {
        self.config.dc
    }

    /// The step this rank is at (synced with the group at every epoch change).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The communicator of the current epoch ([`ElasticError::Departed`] after this rank left).
    pub fn communicator(&mut self) -> Result<&mut Communicator, ElasticError> {
        let rank = self.rank;
        self.comm.as_mut().map(|c| &mut c.all).ok_or(ElasticError::Departed { rank })
    }

    /// The current epoch's communicator of this rank's data centre (its members in view order;
    /// index 0 is the DC's leader), and — on that leader only — the communicator of the
    /// leaders of every data centre of the epoch (in DC order). Both share the epoch's endpoint
    /// with [`ElasticMember::communicator`] but run their own collectives, so a DC's rounds go
    /// on while the WAN is cut. When a leader is lost, the next epoch's lowest member of its DC
    /// leads.
    pub fn dc_communicators(&mut self) -> Result<(&mut Communicator, Option<&mut Communicator>), ElasticError> {
        let rank = self.rank;
        let c = self.comm.as_mut().ok_or(ElasticError::Departed { rank })?;
        Ok((&mut c.dc, c.leaders.as_mut()))
    }

    /// Makes `buffers` at `step` the training state this rank serves to recovering ranks
    /// (replacing what it served). Does nothing without [`ElasticConfig::state_listen`].
    pub fn publish_state(&self, step: u64, buffers: Vec<(String, bytes::Bytes)>) {
        if let Some((tx, _)) = &self.state {
            match StateServer::new(step, buffers) {
                Ok(server) => {
                    let _ = tx.send(Some(server));
                }
                Err(e) => warn!(step, error = %e, "state not published"),
            }
        }
    }

    /// Live recovery: fetches the training state at this rank's current step from the other
    /// members of its epoch (striped over them, checksummed, resumed elsewhere if a source
    /// dies), waiting up to `timeout` for them to serve that step, then enters the epoch (the
    /// admission barrier the others wait at). For a rank that just joined, before its first
    /// step. Members publish the state of a step before its boundary (at the end of the step
    /// before), so it is served while they wait.
    pub async fn recover_state(&mut self, timeout: Duration) -> Result<FetchedState, ElasticError> {
        let others: Vec<u32> = self.members.iter().copied().filter(|r| *r != self.rank).collect();
        self.recover_state_from(others, timeout).await
    }

    /// [`ElasticMember::recover_state`] from the other members of this rank's data centre only
    /// — for trainers whose model differs between data centres between syncs (DiLoCo across
    /// DCs: a DC's ranks are replicas, another DC's are not, and a striped fetch must not mix
    /// them). With no other member in its DC, from the members of the lowest other DC.
    pub async fn recover_state_within_dc(&mut self, timeout: Duration) -> Result<FetchedState, ElasticError> {
        let my_dc = self.dc();
        let of_dc = |dc: u32| -> Vec<u32> {
            self.members.iter().zip(&self.dcs).filter(|(r, d)| **d == dc && **r != self.rank).map(|(r, _)| *r).collect()
        };
        let mut sources = of_dc(my_dc);
        if sources.is_empty() {
            if let Some(other) = self.dcs.iter().copied().filter(|d| *d != my_dc).min() {
                sources = of_dc(other);
            }
        }
        self.recover_state_from(sources, timeout).await
    }

    async fn recover_state_from(&mut self, members: Vec<u32>, timeout: Duration) -> Result<FetchedState, ElasticError> {
        let (rank, epoch, step) = (self.rank, self.epoch, self.step);
        let (_, view) = {
            let mut client = CoordinatorClient::connect(&self.config.coordinators, &self.config.secret).await?;
            client.read_view().await?
        };
        let mut config = NodeConfig::new(RankId(rank), self.config.secret.clone());
        config.transport = self.config.transport.clone();
        let mut sources = Vec::new();
        for r in members.iter().filter(|r| **r != rank) {
            let Some(addr) = view.rank(*r).and_then(|m| m.addrs.get(1)) else { continue };
            let remote: SocketAddr =
                addr.parse().map_err(|_| ElasticError::BadAddress { rank: *r, addr: addr.clone() })?;
            config.paths.push(PathSpec {
                peer: RankId(*r),
                kind: LinkKind::Tcp,
                remote,
                bind: None,
                faults: PathFaults::new(),
            });
            sources.push(RankId(*r));
        }
        if sources.is_empty() {
            return Err(ElasticError::Unexpected(format!("rank {rank}: no member serves state in epoch {epoch}")));
        }
        let mut node = Node::start(config).await.map_err(|source| ElasticError::Transport { rank, epoch, source })?;
        let start = tokio::time::Instant::now();
        let span = info_span!("live_recovery", rank, epoch, step);
        let fetched: Result<FetchedState, ElasticError> = async {
            loop {
                let options = FetchOptions { manifest_deadline: timeout, ..FetchOptions::default() };
                match fetch_state(&mut node, &sources, options).await {
                    Ok(s) if s.step == step => {
                        info!(bytes = s.buffers.iter().map(|(_, b)| b.len()).sum::<usize>(), elapsed = ?s.elapsed, "state recovered from peers");
                        break Ok(s);
                    }
                    Ok(s) => debug!(served = s.step, want = step, "sources serve another step; asking again"),
                    Err(e) => debug!(error = %e, "recovery attempt failed; asking again"),
                }
                if start.elapsed() > timeout {
                    break Err(ElasticError::Unexpected(format!(
                        "rank {rank}: no member served the state of step {step} within {timeout:?}"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        .instrument(span)
        .await;
        let state = fetched?;
        self.enter().await?;
        Ok(state)
    }

    /// Asks to leave at the next epoch; the rank keeps training until a boundary reports
    /// [`Boundary::Departed`].
    pub async fn request_leave(&mut self) -> Result<(), ElasticError> {
        self.leaving.store(true, Ordering::Relaxed);
        match self.client.propose(Command::Leave { rank: self.rank, epoch: self.epoch }).await?.1 {
            Ok(_) => Ok(()),
            Err(source) => Err(ElasticError::Refused { rank: self.rank, source }),
        }
    }

    /// Starts step [`ElasticMember::step`]: on boundary steps runs the boundary protocol (see
    /// the module docs). Call [`ElasticMember::end_step`] after the step's collectives.
    pub async fn begin_step(&mut self) -> Result<Boundary, ElasticError> {
        if self.fenced.load(Ordering::Relaxed) {
            return Err(ElasticError::Fenced { rank: self.rank, epoch: self.shared_epoch.load(Ordering::Relaxed) });
        }
        self.enter().await?;
        if !self.step.is_multiple_of(self.config.boundary_every.max(1)) || self.boundary_done_for == Some(self.step) {
            return Ok(Boundary::Continue);
        }
        self.boundary_done_for = Some(self.step);
        let span = info_span!("step_boundary", rank = self.rank, epoch = self.epoch, step = self.step);
        let result = self.boundary().instrument(span).await;
        if result.is_err() && self.fenced.load(Ordering::Relaxed) {
            // Whatever failed meanwhile (the endpoint was shut down), this is why.
            return Err(ElasticError::Fenced { rank: self.rank, epoch: self.shared_epoch.load(Ordering::Relaxed) });
        }
        result
    }

    /// Ends the current step.
    pub fn end_step(&mut self) {
        self.step += 1;
    }

    /// Runs `phalanx_runtime`'s sans-IO [`BoundaryPlan`] (the protocol of the module docs) over
    /// the coordinator client and this epoch's communicator.
    async fn boundary(&mut self) -> Result<Boundary, ElasticError> {
        let mut plan = BoundaryPlan::new(self.rank, self.epoch, self.members.clone(), self.step);
        loop {
            let input = match plan.poll() {
                BoundaryAction::ReadView => BoundaryInput::View(self.client.read_view().await?.1),
                BoundaryAction::Propose { command, best_effort: false } => {
                    if let Ok(Outcome::EpochBegan { epoch, ref members }) = self.client.propose(command).await?.1 {
                        info!(epoch, ?members, "began a new epoch");
                    }
                    BoundaryInput::Proposed
                }
                BoundaryAction::Propose { command, best_effort: true } => {
                    if let Command::ReportFailure { rank, .. } = command {
                        warn!(lost = rank, epoch = self.epoch, "member lost: reporting it failed");
                    }
                    if let Err(e) = self.client.propose(command).await {
                        warn!(error = %e, "failure report not delivered");
                    }
                    BoundaryInput::Proposed
                }
                BoundaryAction::Agree { value } => {
                    let (value, participants) = self.agree_max(value).await?;
                    if participants.len() * 2 <= self.members.len() && participants.len() < self.members.len() {
                        warn!(epoch = self.epoch, ?participants, "agreement with a minority: not reporting anyone");
                    }
                    BoundaryInput::Agreed { value, participants }
                }
                BoundaryAction::Rebuild { view } => {
                    self.rebuild(&view).await?;
                    BoundaryInput::Rebuilt
                }
                BoundaryAction::Barrier => {
                    // Wait for this epoch's joiners to have recovered their state (they serve
                    // nothing and take part in nothing before): the admission barrier.
                    self.barrier().await?;
                    BoundaryInput::BarrierPassed
                }
                BoundaryAction::Done(BoundaryOutcome::Continue) => return Ok(Boundary::Continue),
                BoundaryAction::Done(BoundaryOutcome::Rebuilt { step, .. }) => {
                    self.step = step;
                    self.boundary_done_for = Some(step);
                    return Ok(Boundary::Rebuilt { epoch: self.epoch, members: self.members.clone() });
                }
                BoundaryAction::Done(BoundaryOutcome::Departed { epoch, members }) => {
                    info!(epoch, "not a member of the new epoch: departing");
                    if let Some(c) = self.comm.take() {
                        for (i, r) in self.members.iter().enumerate() {
                            if *r != self.rank && members.contains(r) {
                                c.all.handle().flush(RankId(i as u32), Duration::from_secs(2)).await;
                            }
                        }
                    }
                    return Ok(Boundary::Departed { epoch });
                }
            };
            plan.handle(input);
        }
    }

    /// The admission barrier: every member of a new epoch takes part once, after the step sync;
    /// joiners after they recovered the training state, so the others do not move on (and stop
    /// serving the state of that step) before.
    async fn barrier(&mut self) -> Result<(), ElasticError> {
        let (rank, epoch, deadline) = (self.rank, self.epoch, self.config.admission_timeout);
        let comm = self.communicator()?;
        let options = CallOptions { policy: FaultPolicy::Shrink, verify: false };
        comm.collective(Op::Barrier, DType::U8, Vec::new(), options, deadline)
            .await
            .map_err(|source| ElasticError::Collective { rank, epoch, source })?;
        self.owes_barrier = false;
        Ok(())
    }

    /// Enters the epoch this rank was admitted into without recovering any state (the
    /// admission barrier; [`ElasticMember::recover_state`] does it too, and the first
    /// [`ElasticMember::begin_step`] if neither was called).
    pub async fn enter(&mut self) -> Result<(), ElasticError> {
        if self.owes_barrier {
            self.barrier().await?;
        }
        Ok(())
    }

    async fn agree_max(&mut self, value: i64) -> Result<(i64, Vec<usize>), ElasticError> {
        let (rank, epoch, deadline) = (self.rank, self.epoch, self.config.sync_deadline);
        let comm = self.communicator()?;
        let options = CallOptions { policy: FaultPolicy::Shrink, verify: false };
        let op = Op::AllReduce { algorithm: AllReduceAlgorithm::Auto, op: ReduceOp::Max };
        match comm.collective(op, DType::I64, value.to_le_bytes().to_vec(), options, deadline).await {
            Ok(crate::Outcome::Done { data, participants }) => {
                let v = data.get(..8).and_then(|b| b.try_into().ok()).map(i64::from_le_bytes).unwrap_or(value);
                Ok((v, participants))
            }
            Ok(crate::Outcome::Late { .. }) => {
                Err(ElasticError::Collective { rank, epoch, source: CommError::Late { op_seq: 0 } })
            }
            Err(source) => Err(ElasticError::Collective { rank, epoch, source }),
        }
    }

    /// Runs `phalanx_runtime`'s sans-IO [`AdmissionPlan`]: reads the view until this rank is a
    /// member of an epoch (the lowest joiner of a job that has not started begins the first
    /// epoch once `start_world` ranks joined), builds its communicator and takes the group's
    /// step. Gives up after the admission timeout.
    async fn admit(&mut self) -> Result<(), ElasticError> {
        let start = tokio::time::Instant::now();
        let mut plan = AdmissionPlan::new(self.rank, self.config.start_world);
        let mut epoch_seen = 0;
        loop {
            let input = match plan.poll() {
                AdmissionAction::ReadView => {
                    let (_, view) = self.client.read_view().await?;
                    epoch_seen = view.epoch();
                    AdmissionInput::View(view)
                }
                AdmissionAction::Propose(command) => {
                    let _ = self.client.propose(command).await?;
                    AdmissionInput::Proposed
                }
                AdmissionAction::Wait => {
                    if start.elapsed() > self.config.admission_timeout {
                        return Err(ElasticError::NotAdmitted {
                            rank: self.rank,
                            waited: start.elapsed(),
                            epoch: epoch_seen,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    AdmissionInput::Waited
                }
                AdmissionAction::Rebuild { view } => {
                    self.rebuild(&view).await?;
                    AdmissionInput::Rebuilt
                }
                AdmissionAction::Agree { value } => AdmissionInput::Agreed { value: self.agree_max(value).await?.0 },
                AdmissionAction::Admitted { step, .. } => {
                    self.step = step;
                    self.boundary_done_for = Some(step);
                    return Ok(());
                }
            };
            plan.handle(input);
        }
    }

    /// Drops the old communicator and builds the one of `view`'s epoch.
    async fn rebuild(&mut self, view: &ClusterView) -> Result<(), ElasticError> {
        let epoch = view.epoch();
        let members = view.members().to_vec();
        let index = members.iter().position(|r| *r == self.rank).unwrap_or(0);
        if let Some(old) = self.comm.take() {
            // Let the members that stay get our last messages of the old epoch (the agreement's
            // result may still be on its way to them); members that are gone are not waited for.
            for (i, r) in self.members.iter().enumerate() {
                if *r != self.rank && members.contains(r) {
                    old.all.handle().flush(RankId(i as u32), Duration::from_secs(2)).await;
                }
            }
            drop(old);
        }
        let mut config = NodeConfig::new(RankId(index as u32), self.config.secret.clone());
        config.epoch = Epoch(epoch);
        config.transport = self.config.transport.clone();
        config.tcp_listen = vec![self.config.listen];
        config.redial_initial = Duration::from_millis(20);
        config.redial_max = Duration::from_millis(200);
        // Lower indices dial higher ones: one link per pair.
        for (i, r) in members.iter().enumerate().skip(index + 1) {
            let Some(m) = view.rank(*r) else {
                return Err(ElasticError::Unexpected(format!("member {r} of epoch {epoch} has no record in the view")));
            };
            let addr = m.addrs.first().cloned().unwrap_or_default();
            let remote: SocketAddr =
                addr.parse().map_err(|_| ElasticError::BadAddress { rank: *r, addr: addr.clone() })?;
            let my_dc = view.rank(self.rank).map_or(self.config.dc, |me| me.dc);
            let faults = if m.dc != my_dc { self.config.wan_faults.clone() } else { PathFaults::new() };
            config.paths.push(PathSpec { peer: RankId(i as u32), kind: LinkKind::Tcp, remote, bind: None, faults });
        }
        // The old endpoint's listener may still be closing: retry the bind for a moment.
        let mut tries = 0;
        let node = loop {
            match Node::start(config.clone()).await {
                Ok(n) => break n,
                Err(NodeError::Bind { .. }) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(source) => return Err(ElasticError::Transport { rank: self.rank, epoch, source }),
            }
        };
        // Frames from an older epoch (a zombie's) are refused from now on.
        node.handle().set_fence(Epoch(epoch));
        *self.endpoint.lock().unwrap_or_else(|e| e.into_inner()) = Some(node.handle());
        // The members' data centres, from the view: large all-reduces then run hierarchically
        // (inside each DC, then across DCs, then inside again).
        self.dcs = members.iter().map(|r| view.rank(*r).map_or(0, |m| m.dc)).collect();
        let dc_of = self.dcs.iter().map(|d| *d as usize).collect();
        // One subgroup per data centre (ascending DC id), then the DCs' lowest members.
        let mut ids: Vec<u32> = self.dcs.clone();
        ids.sort_unstable();
        ids.dedup();
        let mut subgroups: Vec<Subgroup> =
            ids.iter().map(|dc| Subgroup::flat((0..members.len()).filter(|i| self.dcs[*i] == *dc).collect())).collect();
        subgroups.push(Subgroup::flat(subgroups.iter().map(|g| g.members[0]).collect()));
        let (all, subs) = Communicator::with_subgroups(node, index, Topology::new(dc_of), &subgroups)
            .map_err(|e| ElasticError::Unexpected(format!("epoch {epoch}: {e}")))?;
        let mut subs = subs.into_iter();
        let mut dc = None;
        for _ in 0..ids.len() {
            dc = dc.or(subs.next().flatten());
        }
        let Some(dc) = dc else {
            return Err(ElasticError::Unexpected(format!("epoch {epoch}: rank {} in no data centre", self.rank)));
        };
        self.comm = Some(EpochComms { all, dc, leaders: subs.next().flatten() });
        info!(rank = self.rank, epoch, index, world = members.len(), "communicator built for the epoch");
        self.epoch = epoch;
        self.members = members;
        self.shared_epoch.store(epoch, Ordering::Relaxed);
        Ok(())
    }
}

/// Heartbeats the leader; when told this rank was declared failed, marks it fenced and shuts
/// its current endpoint down, so a collective it is in (with peers that moved on) ends at once
/// instead of at its deadline.
async fn heartbeat_loop(
    config: ElasticConfig,
    rank: u32,
    epoch: Arc<AtomicU64>,
    fenced: Arc<AtomicBool>,
    endpoint: Arc<std::sync::Mutex<Option<NodeHandle>>>,
    leaving: Arc<AtomicBool>,
) {
    let mut client = match CoordinatorClient::connect(&config.coordinators, &config.secret).await {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "heartbeat client did not start");
            return;
        }
    };
    client.deadline = config.heartbeat_every * 4;
    client.try_timeout = config.heartbeat_every;
    loop {
        match client.heartbeat(rank, config.incarnation, epoch.load(Ordering::Relaxed)).await {
            Ok(s) if s.fenced && leaving.load(Ordering::Relaxed) => {
                // It asked to leave and is gone from the view: not a zombie, nothing to stop.
                return;
            }
            Ok(s) if s.fenced => {
                warn!(epoch = s.epoch, "the coordinators declared this rank failed: fenced");
                fenced.store(true, Ordering::Relaxed);
                if let Some(h) = endpoint.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    h.shutdown();
                }
                return;
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "heartbeat not answered"),
        }
        tokio::time::sleep(config.heartbeat_every).await;
    }
}

/// Serves the latest published state on `node` until the member goes away.
async fn serve_published(mut node: Node, mut published: tokio::sync::watch::Receiver<Option<StateServer>>) {
    let handle = node.handle();
    let mut server: Option<StateServer> = None;
    loop {
        tokio::select! {
            changed = published.changed() => {
                if changed.is_err() {
                    return;
                }
                server = published.borrow_and_update().clone();
            }
            ev = node.next_event() => match ev {
                None => return,
                Some(Event::Message(m)) if m.channel == RECOVERY_CHANNEL => {
                    let reply = server.as_mut().and_then(|s| s.handle(u64::from(m.from.0), &m.payload.to_bytes()));
                    if let Some(reply) = reply {
                        if handle.send(m.from, RECOVERY_CHANNEL, reply).await.is_err() {
                            return;
                        }
                    }
                }
                Some(_) => {}
            },
        }
    }
}
