//! The runtime's sans-IO core (DESIGN.md: `runtime/core`). So far: the **cluster view** that
//! the coordinators replicate — who is in the job, in which epoch — as a deterministic state
//! machine over a log of [`membership::Command`]s, with its log-entry codec. The Raft group that
//! orders the log (issue #5) drives it; nothing here touches a socket, a clock or a thread.

pub mod membership;
