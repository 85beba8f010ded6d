//! The state machine the coordinators replicate: the [`ClusterView`] plus one session per
//! client, so that a command a client retries (after a timeout or a leader change) is applied
//! once and answered with the result of that one application (Raft thesis §6.3).

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, BytesMut};
use tracing::warn;

use crate::membership::{self, ClusterView, DecodeError, Outcome, ViewError};

/// Most client sessions kept; beyond it the session applied longest ago is forgotten (a client
/// that silent for that long and then retries an old request gets no cached answer).
pub const MAX_CLIENT_SESSIONS: usize = 4096;

/// What applying a command gave.
pub type CommandResult = Result<Outcome, ViewError>;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Session {
    request: u64,
    index: u64,
    result: CommandResult,
}

/// The cluster view and the client sessions, as of an applied log index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicatedState {
    view: ClusterView,
    sessions: BTreeMap<u64, Session>,
}

/// One entry's effect, for the coordinator that answers the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The client that proposed it.
    pub client: u64,
    /// Its request number.
    pub request: u64,
    /// The result of the one application (for a duplicate: of the first).
    pub result: CommandResult,
}

impl ReplicatedState {
    /// The empty state (epoch 0, no ranks).
    pub fn new() -> ReplicatedState {
        ReplicatedState::default()
    }

    /// The cluster view.
    pub fn view(&self) -> &ClusterView {
        &self.view
    }

    /// Applies the entry at `index`: `context` names the client and request (16 bytes; empty
    /// for Raft's own entries), `data` is the command. A request a client already had applied
    /// is not applied again. An undecodable entry (only a bug could write one) changes nothing
    /// on any replica, identically.
    pub fn apply_entry(&mut self, index: u64, context: &[u8], data: &[u8]) -> Option<Applied> {
        if data.is_empty() {
            return None;
        }
        let (client, request) = match context {
            [] => (None, 0),
            mut c if c.len() == 16 => (Some(c.get_u64_le()), c.get_u64_le()),
            _ => {
                warn!(index, "entry with a malformed client context: skipped");
                return None;
            }
        };
        if let Some(client) = client {
            if let Some(s) = self.sessions.get(&client) {
                if request == s.request {
                    return Some(Applied { client, request, result: s.result.clone() });
                }
                if request < s.request {
                    return None;
                }
            }
        }
        let command = match membership::decode(data) {
            Ok(c) => c,
            Err(e) => {
                warn!(index, error = %e, "undecodable command entry: skipped");
                return None;
            }
        };
        let result = self.view.apply(&command);
        let client = client?;
        self.sessions.insert(client, Session { request, index, result: result.clone() });
        if self.sessions.len() > MAX_CLIENT_SESSIONS {
            if let Some(oldest) = self.sessions.iter().min_by_key(|(_, s)| s.index).map(|(c, _)| *c) {
                self.sessions.remove(&oldest);
            }
        }
        Some(Applied { client, request, result })
    }

    /// The snapshot bytes: the view, then `sessions u32 | (client u64, request u64, index u64,
    /// result)..`.
    pub fn encode(&self) -> Vec<u8> {
        let mut m = BytesMut::new();
        membership::put_view(&mut m, &self.view);
        m.put_u32_le(self.sessions.len() as u32);
        for (c, s) in &self.sessions {
            m.put_u64_le(*c);
            m.put_u64_le(s.request);
            m.put_u64_le(s.index);
            membership::put_result(&mut m, &s.result);
        }
        m.to_vec()
    }

    /// The state in snapshot bytes.
    pub fn decode(bytes: &[u8]) -> Result<ReplicatedState, DecodeError> {
        let mut b = bytes;
        let view = membership::get_view(&mut b)?;
        if b.remaining() < 4 {
            return Err(DecodeError::Truncated("session count"));
        }
        let n = b.get_u32_le() as usize;
        if n > b.len() / 26 {
            return Err(DecodeError::Truncated("sessions"));
        }
        let mut sessions = BTreeMap::new();
        for _ in 0..n {
            if b.remaining() < 24 {
                return Err(DecodeError::Truncated("session"));
            }
            let client = b.get_u64_le();
            let request = b.get_u64_le();
            let index = b.get_u64_le();
            let result = membership::get_result(&mut b)?;
            sessions.insert(client, Session { request, index, result });
        }
        if !b.is_empty() {
            return Err(DecodeError::Trailing(b.len()));
        }
        Ok(ReplicatedState { view, sessions })
    }
}

/// The context bytes of a client's command entry.
pub fn entry_context(client: u64, request: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(16);
    c.put_u64_le(client);
    c.put_u64_le(request);
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::Command;

    fn join(host: &str) -> Vec<u8> {
        membership::encode(&Command::Join { dc: 0, host: host.into(), addrs: vec![], incarnation: 1 }).to_vec()
    }

    #[test]
    fn a_retried_request_is_applied_once_and_answered_alike() {
        let mut s = ReplicatedState::new();
        let first = s.apply_entry(1, &entry_context(7, 1), &join("a")).expect("applied");
        assert_eq!(first.result, Ok(Outcome::Joined { rank: 0, from_epoch: 1 }));
        // The same request again (a retry that reached the log twice): same answer, no change.
        let again = s.apply_entry(2, &entry_context(7, 1), &join("a")).expect("answered");
        assert_eq!(again, first);
        assert_eq!(s.view().ranks().count(), 1);
        // An older request of that client: ignored.
        assert_eq!(s.apply_entry(3, &entry_context(7, 0), &join("b")), None);
        assert_eq!(s.view().ranks().count(), 1);
        // Raft's empty entries do nothing.
        assert_eq!(s.apply_entry(4, &[], &[]), None);
    }

    #[test]
    fn the_snapshot_round_trips_with_sessions() {
        let mut s = ReplicatedState::new();
        s.apply_entry(1, &entry_context(7, 1), &join("a"));
        s.apply_entry(2, &entry_context(8, 4), &join("b"));
        s.apply_entry(3, &entry_context(8, 5), &membership::encode(&Command::BeginEpoch { expected: 3 }));
        let bytes = s.encode();
        assert_eq!(ReplicatedState::decode(&bytes), Ok(s));
        for cut in 0..bytes.len() {
            assert!(ReplicatedState::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn sessions_are_bounded_and_the_oldest_goes_first() {
        let mut s = ReplicatedState::new();
        for c in 0..=MAX_CLIENT_SESSIONS as u64 {
            s.apply_entry(c + 1, &entry_context(c, 1), &membership::encode(&Command::BeginEpoch { expected: 99 }));
        }
        assert_eq!(s.sessions.len(), MAX_CLIENT_SESSIONS);
        assert!(!s.sessions.contains_key(&0), "client 0 applied longest ago");
    }
}
