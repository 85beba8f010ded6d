//! Membership: the replicated cluster view and the commands that change it.
//!
//! The view is what a communicator is built from: an epoch (monotonic), and every rank with its
//! data centre, host, addresses, status and last reported step. It changes only by applying
//! [`Command`]s in log order, so every coordinator that applies the same log holds the same view
//! (tested: same log, same view, byte for byte). Membership takes effect at epoch boundaries:
//! joins and departures are *pending* until a [`Command::BeginEpoch`] makes the next epoch's
//! member list, so a group never changes under a running collective.
//!
//! **Fencing.** Commands from a rank carry the epoch it believes current; one from an older
//! epoch is refused with [`ViewError::StaleEpoch`] (the zombie is told to rejoin), and a rank
//! marked failed stays failed until it joins again under a new incarnation.

mod boundary;
mod codec;
mod view;

pub use boundary::{
    AdmissionAction, AdmissionInput, AdmissionPlan, BoundaryAction, BoundaryInput, BoundaryOutcome, BoundaryPlan,
};
pub use codec::{
    decode, decode_view, encode, encode_view, get_result, get_view, put_result, put_view, DecodeError, MAX_ADDRS,
    MAX_ENTRY_BYTES, MAX_VIEW_BYTES,
};
pub(crate) use codec::{
    put_str as codec_put_str, str_of as codec_str, u32_of as codec_u32, u64_of as codec_u64, u8_of as codec_u8,
};
pub use view::{ClusterView, Command, Member, Outcome, RankStatus, ViewError};
