//! What the communicator-level tests share: nodes on loopback, every pair linked.

use phalanx_net::{LinkKind, Node, NodeConfig, PathFaults, PathSpec};
use phalanx_proto::{RankId, TransportConfig};

/// Starts `world` nodes on loopback with `transport`'s timers, each dialing every higher rank
/// once.
pub async fn nodes(world: usize, secret: &[u8], transport: TransportConfig) -> Vec<Node> {
    let mut out: Vec<Node> = Vec::new();
    let mut addrs = Vec::new();
    for r in (0..world).rev() {
        let mut c = NodeConfig::new(RankId(r as u32), secret);
        c.transport = transport.clone();
        c.tcp_listen = vec!["127.0.0.1:0".parse().expect("address")];
        for (peer, addr) in &addrs {
            c.paths.push(PathSpec {
                peer: RankId(*peer),
                kind: LinkKind::Tcp,
                remote: *addr,
                bind: None,
                faults: PathFaults::new(),
            });
        }
        let n = Node::start(c).await.expect("node starts");
        addrs.push((r as u32, n.tcp_addrs()[0]));
        out.push(n);
    }
    out.reverse();
    out
}
