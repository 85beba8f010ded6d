//! The Phalanx runtime on tokio. So far: [`Communicator`], the async handle a trainer calls
//! for collectives, which drives the sans-IO executors of `phalanx-collectives` over a
//! `phalanx-net` node. Membership and the semi-synchronous loop (issues #5, #6) come here next.
#![warn(missing_docs)]

mod communicator;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use communicator::{
    AllReduceAlgorithm, AllToAllResult, CallOptions, CommError, Communicator, Compression, ErrorFeedback, FaultPolicy,
    GroupCounters, GroupError, Op, Outcome, Topology, COLLECTIVE_CHANNEL,
};
