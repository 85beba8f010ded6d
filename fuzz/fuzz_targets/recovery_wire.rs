//! Arbitrary bytes as a live-recovery message (from a recovering rank to a source, or back):
//! a message or an error, never a panic; a source and a fetch fed the bytes carry on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phalanx_runtime::recovery::wire::Message;
use phalanx_runtime::recovery::StateServer;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::decode(data) {
        assert_eq!(Message::decode(&m.encode()).ok(), Some(m), "what decodes re-encodes to the same message");
    }
    if let Ok(mut s) = StateServer::new(3, vec![("params".into(), bytes::Bytes::from(vec![7u8; 4096]))]) {
        let _ = s.handle(1, data);
    }
});
