//! Collective algorithms for Phalanx, as schedules: pure functions from (rank, world, count) to
//! the rounds of sends and receives that rank performs. Schedules are data; one executor (to
//! come, over `phalanx-proto`) will run all of them, and [`symbolic`] checks them: executing
//! any schedule on symbolic contributions must leave every rank with exactly the right set of
//! contributions, each once.
//!
//! ```
//! use phalanx_collectives::schedule::{ring, Collective};
//! use phalanx_collectives::symbolic;
//!
//! let world = 5;
//! let schedules: Vec<_> = (0..world).map(|r| ring::schedule(Collective::AllReduce, r, world).unwrap()).collect();
//! symbolic::check(Collective::AllReduce, world, &schedules).unwrap();
//! ```
#![warn(missing_docs)]

pub mod alltoall;
pub mod codec;
pub mod executor;
pub mod group;
pub mod lending;
pub mod reduce;
pub mod reference;
pub mod schedule;
pub mod streaming_copy;
pub mod symbolic;
