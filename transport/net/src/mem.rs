//! In-memory links: two nodes in one process joined by a pipe (`tokio::io::duplex`). The same
//! handshake, codec, fault hooks and session logic run as on a socket; only the kernel is
//! missing. For tests and single-process demos.

use std::time::Duration;

use phalanx_proto::Role;

use crate::driver::NodeHandle;
use crate::faults::PathFaults;
use crate::link::{authenticate, handshake_for, spawn_link, LinkError};

/// Pipe buffer per direction.
const PIPE_BYTES: usize = 4 << 20;

/// Joins `a` and `b` with one in-memory link (a dials, b accepts). Faults apply on `a`'s side.
/// Returns once both sides are authenticated.
pub async fn connect_mem(a: &NodeHandle, b: &NodeHandle, faults: PathFaults) -> Result<(), LinkError> {
    let (sa, sb) = tokio::io::duplex(PIPE_BYTES);
    let (mut ra, mut wa) = tokio::io::split(sa);
    let (mut rb, mut wb) = tokio::io::split(sb);
    let hs_a = handshake_for(a, Role::Dialer, Some(b.rank()));
    let hs_b = handshake_for(b, Role::Listener, None);
    let timeout = Duration::from_secs(5);
    let (ra_res, rb_res) =
        tokio::join!(authenticate(&mut ra, &mut wa, hs_a, timeout), authenticate(&mut rb, &mut wb, hs_b, timeout));
    let (peer_of_a, left_a) = ra_res?;
    let (peer_of_b, left_b) = rb_res?;
    drop(spawn_link(a, ra, wa, left_a, peer_of_a, "mem", Some(faults)));
    drop(spawn_link(b, rb, wb, left_b, peer_of_b, "mem", None));
    Ok(())
}
