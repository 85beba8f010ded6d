//! The coordinator group on tokio: [`run_coordinator`] runs one coordinator process (Raft over
//! the transport, log in a fsynced [`FileLog`]), and [`CoordinatorClient`] is how ranks and
//! tools talk to the group (leader redirects, retries that apply once, linearizable reads).

mod client;
mod file_log;
mod server;

pub use client::{ClientError, CoordinatorClient, RankStatusReply};
pub use file_log::{FileLog, FileLogError};
pub use server::{run_coordinator, ServerConfig, ServerError, CLIENT_CHANNEL, RAFT_CHANNEL};
