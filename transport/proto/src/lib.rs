//! Sans-IO core of the Phalanx transport.
//!
//! Nothing here touches a socket, a clock, a thread or an unseeded RNG. Drivers (the tokio
//! driver in `phalanx-net`, the simulator) feed events in and carry actions out:
//!
//! ```
//! use bytes::Bytes;
//! use phalanx_proto::{ChannelId, Endpoint, Epoch, Event, Instant, LinkId, RankId, TransportConfig};
//!
//! let mut a = Endpoint::new(RankId(0), 11, Epoch(1), TransportConfig::default());
//! let mut b = Endpoint::new(RankId(1), 22, Epoch(1), TransportConfig::default());
//! let now = Instant(0);
//! a.handle_link_up(now, LinkId(1), b.identity());
//! b.handle_link_up(now, LinkId(1), a.identity());
//! a.send(now, RankId(1), ChannelId(7), Bytes::from_static(b"hello")).unwrap();
//! // Carry frames both ways until nothing moves (a driver does this with sockets).
//! for _ in 0..4 {
//!     while let Some(t) = a.poll_transmit(now) { b.handle_frame(now, t.link, t.frame); }
//!     while let Some(t) = b.poll_transmit(now) { a.handle_frame(now, t.link, t.frame); }
//! }
//! let got = std::iter::from_fn(|| b.poll_event()).find_map(|e| match e {
//!     Event::Message(m) => Some(m),
//!     _ => None,
//! });
//! assert_eq!(got.unwrap().payload, b"hello"[..]);
//! ```
#![warn(missing_docs)]

pub mod checksum;
mod config;
mod counters;
mod endpoint;
pub mod frame;
pub mod handshake;
pub mod harness;
mod ids;
mod path;
mod payload;
pub mod posting;
mod session;
mod time;

pub use config::TransportConfig;
pub use counters::{EndpointCounters, LinkCounters};
pub use endpoint::{
    Endpoint, Event, LinkFailure, SendError, Transmit, ACK_ALONG_MAX_PAYLOAD, MAX_MESSAGE_BYTES, PROMPT_ACK_MESSAGE,
};
pub use frame::{DecodeError, Frame, FrameDecoder, FrameFlags, FrameKind, FrameVerifier, Header};
pub use handshake::{Handshake, HandshakeError, HandshakeStep, LinkIdentity, Role};
pub use ids::{ChannelId, Epoch, LinkId, RankId};
pub use payload::Payload;
pub use posting::{Placer, PostedWrite, Posting, PostingTable};
pub use session::Message;
pub use time::Instant;
