//! Arbitrary bytes as what crosses the coordinator's process boundary: a client request, a
//! reply, a snapshot of the replicated state, a Raft message from a peer. Each decodes or gives
//! an error, never a panic; what decodes re-encodes and decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phalanx_runtime::coordinator::wire::{ClientReply, ClientRequest};
use phalanx_runtime::coordinator::{Coordinator, CoordinatorConfig, MemoryLog, Recovered, ReplicatedState};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = ClientRequest::decode(data) {
        assert_eq!(ClientRequest::decode(&r.encode()), Ok(r));
    }
    if let Ok(r) = ClientReply::decode(data) {
        assert_eq!(ClientReply::decode(&r.encode()), Ok(r));
    }
    if let Ok(s) = ReplicatedState::decode(data) {
        assert_eq!(ReplicatedState::decode(&s.encode()), Ok(s));
    }
    // A coordinator fed the bytes as a peer's Raft message and as a client's request carries on.
    if let Ok(mut c) = Coordinator::new(CoordinatorConfig::new(1, vec![1, 2, 3]), Recovered::default(), MemoryLog::new()) {
        let _ = c.handle_peer(2, data);
        c.handle_client(99, data);
        c.process().expect("an in-memory log never fails");
    }
});
