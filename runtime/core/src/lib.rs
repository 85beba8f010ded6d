//! The runtime's sans-IO core (DESIGN.md: `runtime/core`): the **cluster view** that the
//! coordinators replicate — who is in the job, in which epoch — as a deterministic state
//! machine over a log of [`membership::Command`]s, and the **coordinator group** that orders
//! that log with Raft ([`coordinator`]); and [`recovery`], live recovery of a rank's training
//! state from healthy peers; and [`semisync`], the outer optimizer, sync schedules and
//! accounting of semi-synchronous training. Nothing here touches a socket, a clock or a thread:
//! time comes in as ticks, bytes as events, and the log reaches disk through a seam.

#![warn(missing_docs)]

pub mod coordinator;
pub mod membership;
pub mod recovery;
pub mod semisync;
