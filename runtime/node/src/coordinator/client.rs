//! The client side of the coordinator protocol: what a rank (or an operator's tool) uses to
//! propose membership commands and read the view. It talks to any coordinator, follows
//! "not leader" redirects, and moves on to the next coordinator when one is silent, so a
//! leader change costs it latency and nothing else. Each command keeps one request number
//! across its retries, so it is applied once however often it is resent.

use std::net::SocketAddr;
use std::time::Duration;

use phalanx_net::{LinkKind, Node, NodeConfig, NodeError, PathFaults, PathSpec};
use phalanx_proto::{Event, RankId};
use phalanx_runtime::coordinator::wire::{ClientReply, ClientRequest, ReplyBody, RequestBody};
use phalanx_runtime::coordinator::CommandResult;
use phalanx_runtime::membership::{ClusterView, Command};
use rand::TryRngCore;
use thiserror::Error;
use tracing::debug;

use super::server::CLIENT_CHANNEL;

/// Why a request did not complete.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The client's transport stopped.
    #[error("coordinator client transport: {0}")]
    Transport(#[from] NodeError),
    /// No coordinator answered as leader within the deadline (no majority reachable, or every
    /// coordinator down). A proposal may or may not have been applied: retrying it with the
    /// same client is safe only through [`CoordinatorClient::retry_last`].
    #[error("no coordinator leader answered within {waited:?} (last: {last})")]
    Unavailable {
        /// How long the client tried.
        waited: Duration,
        /// The last thing it heard.
        last: String,
    },
    /// A coordinator refused the request as malformed.
    #[error("coordinator {coordinator} refused the request: {reason}")]
    Refused {
        /// Who refused.
        coordinator: u64,
        /// Why.
        reason: String,
    },
    /// The answer does not fit the question (a read answered with a write's result).
    #[error("coordinator {coordinator} answered request {request} with {answer}")]
    Unexpected {
        /// Who answered.
        coordinator: u64,
        /// The request.
        request: u64,
        /// What came back.
        answer: String,
    },
}

/// The leader's answer to a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankStatusReply {
    /// The view's epoch.
    pub epoch: u64,
    /// Declared failed: stop and rejoin.
    pub fenced: bool,
    /// A membership change waits for the next epoch.
    pub change_pending: bool,
}

/// A connection to the coordinator group.
pub struct CoordinatorClient {
    node: Node,
    coordinators: Vec<u64>,
    client: u64,
    next_request: u64,
    last: Option<(u64, RequestBody)>,
    leader: u64,
    /// How long to wait for one coordinator before trying the next.
    pub try_timeout: Duration,
    /// How long one call keeps trying before [`ClientError::Unavailable`].
    pub deadline: Duration,
}

impl CoordinatorClient {
    /// A client of the group at `coordinators` (id, address), proving `secret` on its links.
    pub async fn connect(coordinators: &[(u64, SocketAddr)], secret: &[u8]) -> Result<CoordinatorClient, ClientError> {
        if coordinators.is_empty() {
            return Err(ClientError::Transport(NodeError::Config("no coordinator to talk to".into())));
        }
        let mut seed = [0u8; 12];
        rand::rngs::OsRng.try_fill_bytes(&mut seed).map_err(|e| NodeError::Config(format!("no OS randomness: {e}")))?;
        let client = u64::from_le_bytes([seed[0], seed[1], seed[2], seed[3], seed[4], seed[5], seed[6], seed[7]]);
        // Client transport ranks live above the coordinators' ids (which are below 2^31).
        let rank = RankId(0x8000_0000 | (u32::from_le_bytes([seed[8], seed[9], seed[10], seed[11]]) >> 1));
        let mut config = NodeConfig::new(rank, secret.to_vec());
        config.paths = coordinators
            .iter()
            .map(|(id, addr)| PathSpec {
                peer: RankId(*id as u32),
                kind: LinkKind::Tcp,
                remote: *addr,
                bind: None,
                faults: PathFaults::new(),
            })
            .collect();
        let node = Node::start(config).await?;
        Ok(CoordinatorClient {
            node,
            coordinators: coordinators.iter().map(|(id, _)| *id).collect(),
            client,
            next_request: 1,
            last: None,
            leader: coordinators.first().map_or(0, |(id, _)| *id),
            try_timeout: Duration::from_millis(1000),
            deadline: Duration::from_secs(15),
        })
    }

    /// This client's id (its commands' session in the log).
    pub fn id(&self) -> u64 {
        self.client
    }

    /// The coordinator that answered last as leader.
    pub fn leader(&self) -> u64 {
        self.leader
    }

    /// Appends `command` to the log; returns its index and the result of applying it.
    pub async fn propose(&mut self, command: Command) -> Result<(u64, CommandResult), ClientError> {
        let request = self.new_request(RequestBody::Propose(command));
        self.finish(request).await
    }

    /// Sends the last request again under the same number (after [`ClientError::Unavailable`]):
    /// applied at most once in all.
    pub async fn retry_last(&mut self) -> Result<(u64, CommandResult), ClientError> {
        match &self.last {
            Some((request, RequestBody::Propose(_))) => {
                let request = *request;
                self.finish(request).await
            }
            _ => Err(ClientError::Unexpected { coordinator: 0, request: 0, answer: "no proposal to retry".into() }),
        }
    }

    /// The view, read linearizably: it reflects every command acknowledged before the call.
    pub async fn read_view(&mut self) -> Result<(u64, ClusterView), ClientError> {
        let request = self.new_request(RequestBody::Read);
        match self.call(request).await? {
            (_, ReplyBody::View { index, view }) => Ok((index, view)),
            (coordinator, other) => Err(ClientError::Unexpected { coordinator, request, answer: format!("{other:?}") }),
        }
    }

    /// Adds coordinator `id` (running, started with itself among its `--learners`) to the group
    /// as a learner; returns the group's voters and learners after the change.
    pub async fn add_learner(&mut self, id: u64) -> Result<(Vec<u64>, Vec<u64>), ClientError> {
        let request = self.new_request(RequestBody::AddLearner { id });
        match self.call(request).await? {
            (_, ReplyBody::Configured { voters, learners, .. }) => Ok((voters, learners)),
            (coordinator, other) => Err(ClientError::Unexpected { coordinator, request, answer: format!("{other:?}") }),
        }
    }

    /// Tells the leader this rank is alive; returns the view's epoch, whether this rank has
    /// been fenced (declared failed: it must stop and rejoin) and whether a change waits for
    /// the next epoch.
    pub async fn heartbeat(&mut self, rank: u32, incarnation: u64, epoch: u64) -> Result<RankStatusReply, ClientError> {
        let request = self.new_request(RequestBody::Heartbeat { rank, incarnation, epoch });
        match self.call(request).await? {
            (_, ReplyBody::Status { epoch, fenced, change_pending }) => {
                Ok(RankStatusReply { epoch, fenced, change_pending })
            }
            (coordinator, other) => Err(ClientError::Unexpected { coordinator, request, answer: format!("{other:?}") }),
        }
    }

    fn new_request(&mut self, body: RequestBody) -> u64 {
        let request = self.next_request;
        self.next_request += 1;
        self.last = Some((request, body));
        request
    }

    async fn finish(&mut self, request: u64) -> Result<(u64, CommandResult), ClientError> {
        match self.call(request).await? {
            (_, ReplyBody::Applied { index, result }) => Ok((index, result)),
            (coordinator, other) => Err(ClientError::Unexpected { coordinator, request, answer: format!("{other:?}") }),
        }
    }

    /// Sends request `request` (the body in `self.last`) until a leader answers.
    async fn call(&mut self, request: u64) -> Result<(u64, ReplyBody), ClientError> {
        let body = match &self.last {
            Some((r, b)) if *r == request => b.clone(),
            _ => return Err(ClientError::Unexpected { coordinator: 0, request, answer: "unknown request".into() }),
        };
        let bytes = ClientRequest { client: self.client, request, body }.encode();
        let start = tokio::time::Instant::now();
        let deadline = start + self.deadline;
        let mut target = self.leader;
        let mut last = String::from("no answer yet");
        let handle = self.node.handle();
        while tokio::time::Instant::now() < deadline {
            handle.send(RankId(target as u32), CLIENT_CHANNEL, bytes.clone()).await?;
            let try_until = deadline.min(tokio::time::Instant::now() + self.try_timeout);
            let answer = loop {
                let wait = try_until.saturating_duration_since(tokio::time::Instant::now());
                match tokio::time::timeout(wait, self.node.next_event()).await {
                    Err(_) => break None,
                    Ok(None) => return Err(ClientError::Transport(NodeError::Closed)),
                    Ok(Some(Event::Message(m))) if m.channel == CLIENT_CHANNEL => {
                        match ClientReply::decode(&m.payload.to_bytes()) {
                            Ok(r) if r.request == request && u64::from(m.from.0) == target => break Some(r.body),
                            Ok(_) => {} // an answer to an earlier try
                            Err(e) => debug!(from = %m.from, error = %e, "undecodable coordinator reply"),
                        }
                    }
                    Ok(Some(_)) => {}
                }
            };
            match answer {
                Some(ReplyBody::NotLeader { leader: Some(l) }) if l != target && self.coordinators.contains(&l) => {
                    last = format!("coordinator {target}: not leader, try {l}");
                    target = l;
                }
                Some(ReplyBody::NotLeader { .. }) => {
                    last = format!("coordinator {target}: not leader, no leader known");
                    // An election is under way: give it a moment, then ask the next one.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    target = self.next_after(target);
                }
                Some(ReplyBody::Refused { reason }) => {
                    return Err(ClientError::Refused { coordinator: target, reason });
                }
                Some(body) => {
                    self.leader = target;
                    return Ok((target, body));
                }
                None => {
                    last = format!("coordinator {target}: silent for {:?}", self.try_timeout);
                    target = self.next_after(target);
                }
            }
        }
        Err(ClientError::Unavailable { waited: start.elapsed(), last })
    }

    fn next_after(&self, c: u64) -> u64 {
        let i = self.coordinators.iter().position(|x| *x == c).map_or(0, |i| i + 1);
        self.coordinators[i % self.coordinators.len().max(1)]
    }
}
