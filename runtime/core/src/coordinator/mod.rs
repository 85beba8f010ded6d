//! The coordinator group: a Raft log (tikv's raft-rs, `RawNode`/`Ready`) of membership
//! commands, replicated across 1, 3 or 5 coordinators, applied to the cluster view.
//!
//! - [`Coordinator`] — one replica as a sans-IO state machine: ticks, peer messages and client
//!   requests in; Raft messages and client replies out.
//! - [`DurableLog`] — the seam to stable storage (the driver's fsynced file log;
//!   [`MemoryLog`] in tests and the simulator). Nothing is acknowledged before it is synced.
//! - [`ReplicatedState`] — the view plus client sessions, so a retried command applies once.
//! - [`wire`] — the client protocol: propose a command, read the view linearizably (ReadIndex),
//!   and be redirected to the leader.
//!
//! Under faults: while a majority of voters lives and can talk, commands commit; a minority
//! (a partitioned data centre, a lone survivor) commits nothing and its leader steps down
//! (check-quorum), so it answers "not leader" instead of serving stale views.

mod log_store;
mod replica;
mod state;
pub mod wire;

pub use log_store::{DurableLog, LogStore, MemoryLog, Recovered};
pub use replica::{Coordinator, CoordinatorConfig, CoordinatorError, PeerMessageError};
pub use state::{entry_context, Applied, CommandResult, ReplicatedState, MAX_CLIENT_SESSIONS};

/// Raft's protobuf types (entries, snapshots, hard state), for drivers that store them.
pub use raft::eraftpb;

#[cfg(test)]
mod tests;
