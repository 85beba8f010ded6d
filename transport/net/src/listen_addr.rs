//! Picking a listen address for a process that will bind it later (launchers, demos, tests).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use rand::Rng;

/// The kernel's default ephemeral port range, where `/proc` does not say.
const DEFAULT_EPHEMERAL: (u16, u16) = (32768, 60999);
/// Ports below this are left to well-known services.
const LOWEST: u16 = 10_000;

/// A loopback address whose port is free now and lies outside the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), for a process that binds it later.
///
/// Promise: the kernel never hands such a port to an outgoing connection, so between this call
/// and the caller's bind only another explicit bind can take it. (The usual trick — bind port 0,
/// read the port, close — picks an ephemeral port, and any process's next `connect` may then be
/// given it as its local port: a demo's worker failed to listen four times in a row that way,
/// its port held by another worker's connection.) Tries random ports; falls back to the
/// kernel's choice when there is no room outside the range.
pub fn free_loopback_addr() -> std::io::Result<SocketAddr> {
    let (lo, hi) = ephemeral_range().unwrap_or(DEFAULT_EPHEMERAL);
    // Candidates: LOWEST..lo, then first_above..=u16::MAX.
    let below = lo.saturating_sub(LOWEST) as u32;
    let first_above = u32::from(hi.max(LOWEST - 1)) + 1;
    let above = u32::from(u16::MAX) + 1 - first_above;
    let mut rng = rand::rng();
    if below + above > 0 {
        for _ in 0..256 {
            let i = rng.random_range(0..below + above);
            let port = if i < below { u32::from(LOWEST) + i } else { first_above + (i - below) };
            let port = u16::try_from(port).expect("candidates are ports");
            if let Ok(l) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
                return l.local_addr();
            }
        }
    }
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()
}

/// The kernel's ephemeral port range, if it says.
fn ephemeral_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|w| w.parse::<u16>().ok());
    let (lo, hi) = (it.next()??, it.next()??);
    (lo <= hi).then_some((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_on_loopback_free_and_outside_the_ephemeral_range() {
        let (lo, hi) = ephemeral_range().unwrap_or(DEFAULT_EPHEMERAL);
        for _ in 0..20 {
            let a = free_loopback_addr().expect("a free port");
            assert!(a.ip().is_loopback(), "{a}");
            if lo > LOWEST || hi < u16::MAX {
                assert!(a.port() < lo || a.port() > hi, "{a} is in the ephemeral range {lo}-{hi}");
                assert!(a.port() >= LOWEST, "{a}");
            }
            TcpListener::bind(a).expect("still free");
        }
    }
}
