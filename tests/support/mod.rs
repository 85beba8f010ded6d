//! Shared helpers of the cross-crate tests: nodes on loopback, payloads, bounded waiting.
#![allow(dead_code)]

pub mod linearizability;
pub mod process;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use phalanx_net::tls::{ClusterCa, TlsIdentity};
use phalanx_net::{LinkKind, Node, NodeConfig, PathFaults, PathSpec};
use phalanx_proto::{Event, RankId, TransportConfig};

pub const SECRET: &[u8] = b"test-cluster-secret";
pub const LOOPBACK: &str = "127.0.0.1:0";

/// Timers short enough that failover and unreachability show up within a test's patience.
pub fn fast_transport() -> TransportConfig {
    TransportConfig {
        heartbeat_interval: Duration::from_millis(25),
        link_timeout: Duration::from_millis(300),
        unreachable_after: Duration::from_secs(3),
        ..TransportConfig::default()
    }
}

/// Logs to stderr when `PHALANX_LOG` is set (e.g. `PHALANX_LOG=debug cargo test ...`).
pub fn init_log() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("PHALANX_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

/// A node config on loopback with fast timers; `listen` binds a TCP (or QUIC) listener.
pub fn config(rank: u32, secret: &[u8], listen: Option<LinkKind>, tls: Option<TlsIdentity>) -> NodeConfig {
    init_log();
    let mut c = NodeConfig::new(RankId(rank), secret.to_vec());
    c.transport = fast_transport();
    c.redial_max = Duration::from_millis(100);
    c.connect_timeout = Duration::from_millis(500);
    c.tls = tls;
    match listen {
        Some(LinkKind::Tcp) => c.tcp_listen = vec![LOOPBACK.parse().unwrap()],
        Some(LinkKind::Quic) => c.quic_listen = Some(LOOPBACK.parse().unwrap()),
        None => {}
    }
    c
}

pub fn path(peer: u32, kind: LinkKind, remote: SocketAddr, faults: &PathFaults) -> PathSpec {
    PathSpec { peer: RankId(peer), kind, remote, bind: None, faults: faults.clone() }
}

/// The address a node listens on for `kind`.
pub fn addr(node: &Node, kind: LinkKind) -> SocketAddr {
    match kind {
        LinkKind::Tcp => node.tcp_addrs()[0],
        LinkKind::Quic => node.quic_addr().expect("QUIC listener"),
    }
}

/// A cluster CA and credentials for ranks `0..n`.
pub fn credentials(n: u32) -> (ClusterCa, Vec<TlsIdentity>) {
    let ca = ClusterCa::generate("phalanx test cluster").unwrap();
    let ids = (0..n).map(|r| ca.issue(&format!("rank-{r}")).unwrap()).collect();
    (ca, ids)
}

/// A reproducible payload.
pub fn payload(len: usize, seed: u64) -> Bytes {
    phalanx_proto::harness::pattern(len, seed)
}

/// Waits for an event matching `want`, collecting the others; fails the test after `limit`.
pub async fn expect_event(node: &mut Node, limit: Duration, mut want: impl FnMut(&Event) -> bool) -> Event {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, node.next_event()).await {
            Ok(Some(e)) if want(&e) => return e,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("node shut down while waiting for an event"),
            Err(_) => panic!("no matching event within {limit:?}"),
        }
    }
}

/// Polls `cond` until it holds; fails the test after `limit`. For conditions that have no
/// event of their own (counters reached by another node).
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
