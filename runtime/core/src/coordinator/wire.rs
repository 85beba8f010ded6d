//! What clients (ranks, operators) and coordinators say to each other.
//!
//! Request: `version u8 | kind u8 | client u64 | request u64 | body` — kind 1 proposes a
//! command (body: its log-entry encoding), kind 2 asks for a linearizable read of the view,
//! kind 3 is a rank's heartbeat (`rank u32 | incarnation u64 | epoch u64`).
//! Reply: `version u8 | kind u8 | request u64 | body` — 1 applied (`index u64 | result`),
//! 2 view (`index u64 | view`), 3 not leader (`leader u64`, 0 when unknown), 4 refused (`reason
//! str`: `len u16 | UTF-8`), 5 status (`epoch u64 | flags u8`: 1 fenced, 2 change pending). Decoding is total: bytes give a message or a [`DecodeError`], never a panic.

use bytes::{BufMut, Bytes, BytesMut};

use crate::coordinator::state::CommandResult;
use crate::membership::{self, ClusterView, Command, DecodeError};

const VERSION: u8 = 1;

/// Largest request accepted (a command and its header).
pub const MAX_REQUEST_BYTES: usize = membership::MAX_ENTRY_BYTES + 32;

/// A client's request. `client` is the client's own random id (stable across retries, so a
/// retried command is applied once); `request` grows with each new request of that client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRequest {
    /// The client.
    pub client: u64,
    /// The request number.
    pub request: u64,
    /// What it asks.
    pub body: RequestBody,
}

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestBody {
    /// Append this command to the log and apply it.
    Propose(Command),
    /// The current view, read linearizably (Raft ReadIndex through the leader).
    Read,
    /// Add coordinator `id` to the group as a learner (it replicates the log, never votes);
    /// it must be running and able to reach the others.
    AddLearner {
        /// The coordinator id.
        id: u64,
    },
    /// A rank is alive (the failure detector's input; not written to the log).
    Heartbeat {
        /// The rank.
        rank: u32,
        /// Its process incarnation.
        incarnation: u64,
        /// The epoch it is in.
        epoch: u64,
    },
}

/// A coordinator's answer to request `request`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientReply {
    /// The request answered.
    pub request: u64,
    /// The answer.
    pub body: ReplyBody,
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyBody {
    /// The command was committed at `index` and applied with this result.
    Applied {
        /// Its log index.
        index: u64,
        /// The result (a refusal such as a stale epoch is a result too: it is in the log).
        result: CommandResult,
    },
    /// The view as of applied index `index`, at least as new as any write acknowledged before
    /// the read was asked.
    View {
        /// The applied index it reflects.
        index: u64,
        /// The view.
        view: ClusterView,
    },
    /// Ask the leader instead (`None`: no leader known right now; retry).
    NotLeader {
        /// The leader's coordinator id, if known.
        leader: Option<u64>,
    },
    /// A configuration change was committed at `index`; the group now has these members.
    Configured {
        /// Its log index.
        index: u64,
        /// Voting coordinators.
        voters: Vec<u64>,
        /// Learners.
        learners: Vec<u64>,
    },
    /// The answer to a heartbeat: where the view stands for this rank.
    Status {
        /// The view's epoch.
        epoch: u64,
        /// The rank was declared failed (or is unknown, or another incarnation holds its id):
        /// it must stop and rejoin.
        fenced: bool,
        /// Joins, leaves or failures wait for the next epoch.
        change_pending: bool,
    },
    /// The request was malformed or cannot be served.
    Refused {
        /// Why.
        reason: String,
    },
}

impl ClientRequest {
    /// The request's bytes.
    pub fn encode(&self) -> Bytes {
        let mut m = BytesMut::with_capacity(32);
        m.put_u8(VERSION);
        match &self.body {
            RequestBody::Propose(_) => m.put_u8(1),
            RequestBody::Read => m.put_u8(2),
            RequestBody::Heartbeat { .. } => m.put_u8(3),
            RequestBody::AddLearner { .. } => m.put_u8(4),
        }
        m.put_u64_le(self.client);
        m.put_u64_le(self.request);
        match &self.body {
            RequestBody::Propose(c) => m.put_slice(&membership::encode(c)),
            RequestBody::Read => {}
            RequestBody::Heartbeat { rank, incarnation, epoch } => {
                m.put_u32_le(*rank);
                m.put_u64_le(*incarnation);
                m.put_u64_le(*epoch);
            }
            RequestBody::AddLearner { id } => m.put_u64_le(*id),
        }
        m.freeze()
    }

    /// The request in `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<ClientRequest, DecodeError> {
        if bytes.len() > MAX_REQUEST_BYTES {
            return Err(DecodeError::TooLong(bytes.len()));
        }
        let mut b = bytes;
        let version = membership::codec_u8(&mut b, "version")?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let kind = membership::codec_u8(&mut b, "kind")?;
        let client = membership::codec_u64(&mut b, "client")?;
        let request = membership::codec_u64(&mut b, "request")?;
        let body = match kind {
            1 => RequestBody::Propose(membership::decode(b)?),
            2 if b.is_empty() => RequestBody::Read,
            2 => return Err(DecodeError::Trailing(b.len())),
            3 => {
                let rank = membership::codec_u32(&mut b, "rank")?;
                let incarnation = membership::codec_u64(&mut b, "incarnation")?;
                let epoch = membership::codec_u64(&mut b, "epoch")?;
                if !b.is_empty() {
                    return Err(DecodeError::Trailing(b.len()));
                }
                RequestBody::Heartbeat { rank, incarnation, epoch }
            }
            4 => {
                let id = membership::codec_u64(&mut b, "id")?;
                if !b.is_empty() {
                    return Err(DecodeError::Trailing(b.len()));
                }
                RequestBody::AddLearner { id }
            }
            k => return Err(DecodeError::Kind(k)),
        };
        Ok(ClientRequest { client, request, body })
    }
}

impl ClientReply {
    /// The reply's bytes.
    pub fn encode(&self) -> Bytes {
        let mut m = BytesMut::with_capacity(32);
        m.put_u8(VERSION);
        let kind = match &self.body {
            ReplyBody::Applied { .. } => 1,
            ReplyBody::View { .. } => 2,
            ReplyBody::NotLeader { .. } => 3,
            ReplyBody::Refused { .. } => 4,
            ReplyBody::Status { .. } => 5,
            ReplyBody::Configured { .. } => 6,
        };
        m.put_u8(kind);
        m.put_u64_le(self.request);
        match &self.body {
            ReplyBody::Applied { index, result } => {
                m.put_u64_le(*index);
                membership::put_result(&mut m, result);
            }
            ReplyBody::View { index, view } => {
                m.put_u64_le(*index);
                membership::put_view(&mut m, view);
            }
            ReplyBody::NotLeader { leader } => m.put_u64_le(leader.unwrap_or(0)),
            ReplyBody::Status { epoch, fenced, change_pending } => {
                m.put_u64_le(*epoch);
                m.put_u8(u8::from(*fenced) | u8::from(*change_pending) << 1);
            }
            ReplyBody::Configured { index, voters, learners } => {
                m.put_u64_le(*index);
                for ids in [voters, learners] {
                    m.put_u8(ids.len().min(u8::MAX as usize) as u8);
                    for id in ids.iter().take(u8::MAX as usize) {
                        m.put_u64_le(*id);
                    }
                }
            }
            ReplyBody::Refused { reason } => membership::codec_put_str(&mut m, reason),
        }
        m.freeze()
    }

    /// The reply in `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<ClientReply, DecodeError> {
        if bytes.len() > membership::MAX_VIEW_BYTES + 32 {
            return Err(DecodeError::TooLong(bytes.len()));
        }
        let mut b = bytes;
        let version = membership::codec_u8(&mut b, "version")?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let kind = membership::codec_u8(&mut b, "kind")?;
        let request = membership::codec_u64(&mut b, "request")?;
        let body = match kind {
            1 => {
                let index = membership::codec_u64(&mut b, "index")?;
                ReplyBody::Applied { index, result: membership::get_result(&mut b)? }
            }
            2 => {
                let index = membership::codec_u64(&mut b, "index")?;
                ReplyBody::View { index, view: membership::get_view(&mut b)? }
            }
            3 => {
                let l = membership::codec_u64(&mut b, "leader")?;
                ReplyBody::NotLeader { leader: (l != 0).then_some(l) }
            }
            4 => ReplyBody::Refused { reason: membership::codec_str(&mut b, "reason")? },
            5 => {
                let epoch = membership::codec_u64(&mut b, "epoch")?;
                let flags = membership::codec_u8(&mut b, "flags")?;
                if flags > 3 {
                    return Err(DecodeError::Malformed("status flags"));
                }
                ReplyBody::Status { epoch, fenced: flags & 1 != 0, change_pending: flags & 2 != 0 }
            }
            6 => {
                let index = membership::codec_u64(&mut b, "index")?;
                let mut lists = [Vec::new(), Vec::new()];
                for list in &mut lists {
                    let n = membership::codec_u8(&mut b, "member count")? as usize;
                    for _ in 0..n {
                        list.push(membership::codec_u64(&mut b, "member")?);
                    }
                }
                let [voters, learners] = lists;
                ReplyBody::Configured { index, voters, learners }
            }
            k => return Err(DecodeError::Kind(k)),
        };
        if !b.is_empty() {
            return Err(DecodeError::Trailing(b.len()));
        }
        Ok(ClientReply { request, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{Outcome, ViewError};
    use proptest::prelude::*;

    #[test]
    fn requests_and_replies_round_trip() {
        let reqs = [
            ClientRequest { client: 9, request: 3, body: RequestBody::Read },
            ClientRequest { client: 9, request: 4, body: RequestBody::Heartbeat { rank: 3, incarnation: 8, epoch: 2 } },
            ClientRequest { client: 9, request: 5, body: RequestBody::AddLearner { id: 4 } },
            ClientRequest {
                client: u64::MAX,
                request: 0,
                body: RequestBody::Propose(Command::Leave { rank: 4, epoch: 2 }),
            },
        ];
        for r in reqs {
            assert_eq!(ClientRequest::decode(&r.encode()), Ok(r));
        }
        let mut view = ClusterView::new();
        view.apply(&Command::Join { dc: 1, host: "h".into(), addrs: vec!["a:1".into()], incarnation: 5 })
            .expect("join");
        let replies = [
            ReplyBody::Applied { index: 7, result: Ok(Outcome::Joined { rank: 0, from_epoch: 1 }) },
            ReplyBody::Applied { index: 8, result: Err(ViewError::Fenced(3)) },
            ReplyBody::View { index: 9, view },
            ReplyBody::NotLeader { leader: Some(2) },
            ReplyBody::NotLeader { leader: None },
            ReplyBody::Status { epoch: 4, fenced: true, change_pending: false },
            ReplyBody::Status { epoch: 5, fenced: false, change_pending: true },
            ReplyBody::Configured { index: 44, voters: vec![1, 2, 3], learners: vec![4] },
            ReplyBody::Refused { reason: "bad request: entry ends inside kind".into() },
        ];
        for body in replies {
            let r = ClientReply { request: 12, body };
            let bytes = r.encode();
            assert_eq!(ClientReply::decode(&bytes), Ok(r));
            for cut in 0..bytes.len() {
                assert!(ClientReply::decode(&bytes[..cut]).is_err(), "cut at {cut}");
            }
        }
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ClientRequest::decode(&bytes);
            let _ = ClientReply::decode(&bytes);
        }
    }
}
