//! Arbitrary bytes from a would-be peer: the handshake refuses or waits, never panics, and
//! never authenticates someone who does not hold the secret.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use phalanx_proto::{Epoch, Handshake, HandshakeStep, LinkIdentity, RankId, Role};

fuzz_target!(|data: &[u8]| {
    let me = LinkIdentity { rank: RankId(0), incarnation: 1, epoch: Epoch(1) };
    for role in [Role::Dialer, Role::Listener] {
        let mut hs = Handshake::new(role, me, None, b"the cluster secret", [7; 32]);
        let mut buf = BytesMut::from(data);
        for _ in 0..4 {
            match hs.handle_bytes(&mut buf) {
                Ok(HandshakeStep::Authenticated { .. }) => panic!("authenticated without the secret"),
                Ok(HandshakeStep::Continue(_)) => {}
                Err(_) => break,
            }
        }
    }
});
