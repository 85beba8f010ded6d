//! Live recovery: a joining or recovering rank fetches the current training state — the
//! opaque byte buffers the trainer registered (parameters, optimizer state, …) at one step —
//! from healthy peers, before it enters the next quorum. No checkpoint file is involved.
//!
//! - [`StateServer`] (on each healthy source) answers manifest and chunk requests from the
//!   registered buffers, each chunk checksummed.
//! - [`StateFetch`] (on the recovering rank) stripes chunk requests over several sources,
//!   verifies every chunk, and re-requests what a dead, silent, refusing or corrupting source
//!   owed from the others, so the fetch resumes where the source left off.
//! - [`wire`] is the codec of what they say to each other.
//!
//! Sans-IO like the rest of this crate: bytes in, bytes out, time as nanoseconds given by the
//! caller. The tokio driver is `phalanx_node::recovery`.

mod fetch;
mod serve;
pub mod wire;

pub use fetch::{FetchCounters, FetchError, StateFetch, MAX_STRIKES};
pub use serve::{ServeCounters, ServeError, StateServer};
