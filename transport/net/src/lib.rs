//! Drivers of the Phalanx transport: a tokio event loop around the sans-IO
//! [`phalanx_proto::Endpoint`], and links over TCP, QUIC (quinn, mutual TLS), memory and
//! (feature `rdma`) RDMA.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use bytes::Bytes;
//! use phalanx_net::{LinkKind, Node, NodeConfig, PathFaults, PathSpec};
//! use phalanx_proto::{ChannelId, RankId};
//!
//! let mut b = NodeConfig::new(RankId(1), "cluster secret");
//! b.tcp_listen = vec!["127.0.0.1:0".parse()?];
//! let mut b = Node::start(b).await?;
//! let mut a = NodeConfig::new(RankId(0), "cluster secret");
//! for _ in 0..2 {
//!     // Two TCP paths to rank 1.
//!     a.paths.push(PathSpec { peer: RankId(1), kind: LinkKind::Tcp, remote: b.tcp_addrs()[0], bind: None, faults: PathFaults::new() });
//! }
//! let a = Node::start(a).await?;
//! a.handle().send(RankId(1), ChannelId(0), Bytes::from_static(b"hi")).await?;
//! let m = b.next_message(std::time::Duration::from_secs(5), |_| {}).await.unwrap();
//! assert_eq!(m.payload, b"hi"[..]);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod dial;
mod driver;
mod faults;
mod link;
mod listen_addr;
mod mem;
mod message_buf;
mod quic;
#[cfg(feature = "rdma")]
pub mod rdma;
mod recv_pool;
mod tcp;
pub mod tls;

pub use driver::{CounterSnapshot, LinkKind, Node, NodeConfig, NodeError, NodeHandle, PathSpec};
pub use faults::PathFaults;
pub use link::LinkError;
pub use listen_addr::free_loopback_addr;
pub use mem::connect_mem;
