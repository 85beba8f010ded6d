//! Link authentication: a mutual challenge–response over the cluster secret.
//!
//! Runs on every new link before any frame is accepted. Both sides send a `Hello` at once,
//! then a `Proof`: HMAC-SHA256 over the cluster secret, the side's role and both hellos (so both
//! fresh nonces). A proof binds the role, so a peer cannot reflect our own proof back at us.
//!
//! ```text
//! Hello (64 bytes): b"PHLH" | version u8 | role u8 | 0u16 | rank u32 | incarnation u64
//!                   | epoch u64 | nonce [u8; 32]
//! Proof (32 bytes): HMAC-SHA256(secret, b"phalanx-link-v1" | role | hello_dialer | hello_listener)
//! ```
//!
//! The secret never crosses the wire. A peer without it learns our hello (rank, epoch) and
//! nothing else, and is refused before any frame reaches the endpoint.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

use crate::ids::{Epoch, RankId};

/// Length of a hello message.
pub const HELLO_LEN: usize = 64;
/// Length of a proof message.
pub const PROOF_LEN: usize = 32;
const HELLO_MAGIC: [u8; 4] = *b"PHLH";
const HANDSHAKE_VERSION: u8 = 1;
const PROOF_CONTEXT: &[u8] = b"phalanx-link-v1";

/// Which end of the link this side is. The dialer opened the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Opened the connection.
    Dialer = 1,
    /// Accepted the connection.
    Listener = 2,
}

/// What one side says about itself in its hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkIdentity {
    /// The sender's rank.
    pub rank: RankId,
    /// Random per process start; a change tells peers the rank restarted.
    pub incarnation: u64,
    /// The sender's epoch.
    pub epoch: Epoch,
}

/// Why a handshake failed. Every variant is final for the link.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum HandshakeError {
    /// The peer's first bytes are not a Phalanx hello.
    #[error("peer did not send a Phalanx hello (bad magic or version)")]
    NotAHello,
    /// Both sides claim the same role (a misconfigured or replayed connection).
    #[error("peer claims the same role as this side")]
    RoleConflict,
    /// The dialer reached a rank other than the one it dialed.
    #[error("dialed {expected} but the peer says it is {found}")]
    WrongPeer {
        /// The rank the dialer expected.
        expected: RankId,
        /// The rank the peer claims.
        found: RankId,
    },
    /// The peer's proof does not verify: it does not hold the cluster secret.
    #[error("peer {peer} failed authentication: wrong cluster secret")]
    BadProof {
        /// The rank the peer claimed.
        peer: RankId,
    },
    /// The peer claims to be this very rank.
    #[error("peer claims to be this rank ({0})")]
    SelfConnection(RankId),
}

/// Sans-IO handshake state machine for one link.
///
/// Call order: send [`Handshake::hello`] first; feed every received byte to
/// [`Handshake::handle_bytes`], sending whatever it returns, until it reports the authenticated
/// peer. Bytes after the handshake stay in the caller's buffer (they are frames).
pub struct Handshake {
    role: Role,
    local: LinkIdentity,
    expected_peer: Option<RankId>,
    secret: Vec<u8>,
    hello: [u8; HELLO_LEN],
    peer_hello: Option<[u8; HELLO_LEN]>,
    peer: Option<LinkIdentity>,
}

/// Progress of a handshake after some bytes arrived.
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeStep {
    /// Send these bytes (possibly empty) and wait for more.
    Continue(Bytes),
    /// The peer proved it holds the secret. Send `send` (our proof, if not sent yet); the link
    /// is then ready for frames.
    Authenticated {
        /// The authenticated peer.
        peer: LinkIdentity,
        /// Bytes still to send to the peer.
        send: Bytes,
    },
}

impl Handshake {
    /// Starts a handshake. `nonce` must come from the driver's RNG (seeded in the simulator).
    pub fn new(
        role: Role,
        local: LinkIdentity,
        expected_peer: Option<RankId>,
        secret: &[u8],
        nonce: [u8; 32],
    ) -> Handshake {
        let mut hello = [0u8; HELLO_LEN];
        let mut w = &mut hello[..];
        w.put_slice(&HELLO_MAGIC);
        w.put_u8(HANDSHAKE_VERSION);
        w.put_u8(role as u8);
        w.put_u16_le(0);
        w.put_u32_le(local.rank.0);
        w.put_u64_le(local.incarnation);
        w.put_u64_le(local.epoch.0);
        w.put_slice(&nonce);
        Handshake { role, local, expected_peer, secret: secret.to_vec(), hello, peer_hello: None, peer: None }
    }

    /// The hello to send first.
    pub fn hello(&self) -> Bytes {
        Bytes::copy_from_slice(&self.hello)
    }

    /// The identity the peer claimed in its hello (not yet proven until authenticated).
    pub fn claimed_peer(&self) -> Option<LinkIdentity> {
        self.peer
    }

    /// The MAC state that `role`'s proof is computed from.
    fn proof_mac(&self, role: Role, peer_hello: &[u8; HELLO_LEN]) -> Hmac<Sha256> {
        let (dialer, listener) = match self.role {
            Role::Dialer => (&self.hello, peer_hello),
            Role::Listener => (peer_hello, &self.hello),
        };
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(PROOF_CONTEXT);
        mac.update(&[role as u8]);
        mac.update(dialer);
        mac.update(listener);
        mac
    }

    fn proof(&self, role: Role, peer_hello: &[u8; HELLO_LEN]) -> [u8; PROOF_LEN] {
        self.proof_mac(role, peer_hello).finalize().into_bytes().into()
    }

    /// Consumes handshake bytes from the front of `buf`.
    pub fn handle_bytes(&mut self, buf: &mut BytesMut) -> Result<HandshakeStep, HandshakeError> {
        let mut out = BytesMut::new();
        if self.peer_hello.is_none() {
            if buf.len() < HELLO_LEN {
                let n = buf.len().min(4);
                if buf[..n] != HELLO_MAGIC[..n] {
                    return Err(HandshakeError::NotAHello);
                }
                return Ok(HandshakeStep::Continue(Bytes::new()));
            }
            let raw: [u8; HELLO_LEN] = buf[..HELLO_LEN].try_into().expect("length checked");
            let mut r = &raw[..];
            let mut magic = [0u8; 4];
            r.copy_to_slice(&mut magic);
            if magic != HELLO_MAGIC || r.get_u8() != HANDSHAKE_VERSION {
                return Err(HandshakeError::NotAHello);
            }
            let role = r.get_u8();
            if role == self.role as u8 || (role != Role::Dialer as u8 && role != Role::Listener as u8) {
                return Err(HandshakeError::RoleConflict);
            }
            let _reserved = r.get_u16_le();
            let peer = LinkIdentity {
                rank: RankId(r.get_u32_le()),
                incarnation: r.get_u64_le(),
                epoch: Epoch(r.get_u64_le()),
            };
            if peer.rank == self.local.rank {
                return Err(HandshakeError::SelfConnection(peer.rank));
            }
            if let Some(expected) = self.expected_peer {
                if expected != peer.rank {
                    return Err(HandshakeError::WrongPeer { expected, found: peer.rank });
                }
            }
            buf.advance(HELLO_LEN);
            self.peer_hello = Some(raw);
            self.peer = Some(peer);
            out.put_slice(&self.proof(self.role, &raw));
        }
        let (Some(peer_hello), Some(peer)) = (self.peer_hello, self.peer) else {
            unreachable!("set above");
        };
        if buf.len() < PROOF_LEN {
            return Ok(HandshakeStep::Continue(out.freeze()));
        }
        let peer_role = match self.role {
            Role::Dialer => Role::Listener,
            Role::Listener => Role::Dialer,
        };
        // Constant-time check (the MAC crate's own): how far a forged proof matched must not
        // show in timing, nor to a fuzzer's comparison tracing.
        if self.proof_mac(peer_role, &peer_hello).verify_slice(&buf[..PROOF_LEN]).is_err() {
            return Err(HandshakeError::BadProof { peer: peer.rank });
        }
        buf.advance(PROOF_LEN);
        Ok(HandshakeStep::Authenticated { peer, send: out.freeze() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(rank: u32) -> LinkIdentity {
        LinkIdentity { rank: RankId(rank), incarnation: 100 + rank as u64, epoch: Epoch(3) }
    }

    type Outcome = Option<Result<LinkIdentity, HandshakeError>>;

    /// Runs both sides, feeding each side's output to the other. `None`: that side was still
    /// waiting when the other gave up (in a real link it then sees the connection close).
    fn run(mut a: Handshake, mut b: Handshake) -> (Outcome, Outcome) {
        let mut to_a = BytesMut::from(&b.hello()[..]);
        let mut to_b = BytesMut::from(&a.hello()[..]);
        let (mut ra, mut rb) = (None, None);
        for _ in 0..4 {
            if ra.is_none() {
                match a.handle_bytes(&mut to_a) {
                    Ok(HandshakeStep::Continue(out)) => to_b.extend_from_slice(&out),
                    Ok(HandshakeStep::Authenticated { peer, send }) => {
                        to_b.extend_from_slice(&send);
                        ra = Some(Ok(peer));
                    }
                    Err(e) => ra = Some(Err(e)),
                }
            }
            if rb.is_none() {
                match b.handle_bytes(&mut to_b) {
                    Ok(HandshakeStep::Continue(out)) => to_a.extend_from_slice(&out),
                    Ok(HandshakeStep::Authenticated { peer, send }) => {
                        to_a.extend_from_slice(&send);
                        rb = Some(Ok(peer));
                    }
                    Err(e) => rb = Some(Err(e)),
                }
            }
        }
        (ra, rb)
    }

    #[test]
    fn peers_with_the_same_secret_authenticate_each_other() {
        let a = Handshake::new(Role::Dialer, id(1), Some(RankId(2)), b"s3cret", [1; 32]);
        let b = Handshake::new(Role::Listener, id(2), None, b"s3cret", [2; 32]);
        let (ra, rb) = run(a, b);
        assert_eq!(ra, Some(Ok(id(2))));
        assert_eq!(rb, Some(Ok(id(1))));
    }

    #[test]
    fn wrong_secret_is_refused_by_both_sides() {
        let a = Handshake::new(Role::Dialer, id(1), Some(RankId(2)), b"s3cret", [1; 32]);
        let b = Handshake::new(Role::Listener, id(2), None, b"guess", [2; 32]);
        let (ra, rb) = run(a, b);
        // The listener checks first and refuses without revealing its own proof.
        assert_eq!(rb, Some(Err(HandshakeError::BadProof { peer: RankId(1) })));
        assert_eq!(ra, None);
        // Either order: a dialer that holds the wrong secret is refused by the listener too.
        let a = Handshake::new(Role::Dialer, id(1), Some(RankId(2)), b"guess", [1; 32]);
        let b = Handshake::new(Role::Listener, id(2), None, b"s3cret", [2; 32]);
        assert_eq!(run(a, b).1, Some(Err(HandshakeError::BadProof { peer: RankId(1) })));
    }

    #[test]
    fn dialing_the_wrong_rank_and_role_reflection_are_refused() {
        let a = Handshake::new(Role::Dialer, id(1), Some(RankId(5)), b"k", [1; 32]);
        let b = Handshake::new(Role::Listener, id(2), None, b"k", [2; 32]);
        assert_eq!(run(a, b).0, Some(Err(HandshakeError::WrongPeer { expected: RankId(5), found: RankId(2) })));
        let a = Handshake::new(Role::Dialer, id(1), None, b"k", [1; 32]);
        let b = Handshake::new(Role::Dialer, id(2), None, b"k", [2; 32]);
        assert_eq!(run(a, b).0, Some(Err(HandshakeError::RoleConflict)));
    }

    #[test]
    fn non_phalanx_bytes_are_refused_at_once() {
        let mut a = Handshake::new(Role::Listener, id(1), None, b"k", [1; 32]);
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert_eq!(a.handle_bytes(&mut buf), Err(HandshakeError::NotAHello));
    }
}
