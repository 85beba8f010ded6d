//! The Phalanx runtime on tokio. So far: [`Communicator`], the async handle a trainer calls
//! for collectives, which drives the sans-IO executors of `phalanx-collectives` over a
//! `phalanx-net` node; and the [`coordinator`] group (Raft over the transport, a durable log)
//! with the client ranks use to join, leave and read the view; and [`recovery`], live recovery
//! of a rank's training state from healthy peers; [`elastic`], a rank of an elastic job
//! (epochs, fencing, admission); and [`semisync`], the semi-synchronous training loop (sync DP,
//! local SGD, DiLoCo, streaming DiLoCo, and DiLoCo across data centres).
#![warn(missing_docs)]

mod communicator;
pub mod coordinator;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod elastic;
pub mod params;
pub mod recovery;
pub mod semisync;

pub use communicator::{
    AllReduceAlgorithm, AllToAllResult, CallOptions, CommError, Communicator, Compression, ErrorFeedback, FaultPolicy,
    GroupCounters, GroupError, Op, Outcome, Subgroup, Topology, BOUND_SPIN, COLLECTIVE_CHANNEL, DEFAULT_SPIN,
};
