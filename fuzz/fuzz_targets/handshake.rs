//! Arbitrary bytes from a would-be peer, for both roles, with and without an expected peer
//! rank, whole and cut in two: the handshake refuses or waits, never panics, and never
//! authenticates someone who does not hold the secret (the proof is an HMAC over it).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use phalanx_proto::handshake::PROOF_LEN;
use phalanx_proto::{Epoch, Handshake, HandshakeStep, LinkIdentity, RankId, Role};

const SECRET: &[u8] = b"the cluster secret";

fuzz_target!(|data: &[u8]| {
    let me = LinkIdentity { rank: RankId(0), incarnation: 1, epoch: Epoch(1) };
    // Where the bytes are cut (the last byte picks it): partial hellos and proofs.
    let cut = data.last().map_or(0, |&b| b as usize % (data.len() + 1));
    for role in [Role::Dialer, Role::Listener] {
        for expected_peer in [None, Some(RankId(1))] {
            for pieces in [[data, &[][..]], [&data[..cut], &data[cut..]]] {
                let mut hs = Handshake::new(role, me, expected_peer, SECRET, [7; 32]);
                let mut buf = BytesMut::new();
                let mut proof_sent = false;
                for piece in pieces {
                    buf.extend_from_slice(piece);
                    match hs.handle_bytes(&mut buf) {
                        Ok(HandshakeStep::Authenticated { peer, .. }) => {
                            panic!("{role:?} authenticated {peer:?} without the secret")
                        }
                        Ok(HandshakeStep::Continue(out)) => {
                            if out.is_empty() {
                                continue;
                            }
                            // Our proof goes out once, only after a well-formed hello.
                            assert!(!proof_sent, "proof sent twice");
                            assert_eq!(out.len(), PROOF_LEN);
                            proof_sent = true;
                            let peer = hs.claimed_peer().expect("proof sent before a hello");
                            assert_ne!(peer.rank, me.rank);
                            if let Some(rank) = expected_peer {
                                assert_eq!(peer.rank, rank);
                            }
                        }
                        Err(_) => break,
                    }
                }
            }
        }
    }
});
