//! Arbitrary bytes, fed to the frame decoder in pieces: frames or typed errors, never a panic,
//! never a request for more than one maximal frame, and every decoded frame re-encodes to
//! itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use phalanx_proto::frame::{decode_ranks, decode_sack, HEADER_LEN};
use phalanx_proto::FrameDecoder;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let max = first as u32 * 64;
    let decoder = FrameDecoder::new(max);
    // Split points derived from the data: exercise incremental decoding.
    let step = 1 + (first as usize % 97);
    let mut buf = BytesMut::new();
    let mut fed = 0;
    'feed: while fed < rest.len() {
        let end = (fed + step).min(rest.len());
        buf.extend_from_slice(&rest[fed..end]);
        fed = end;
        loop {
            assert!(decoder.bytes_needed(&buf) <= HEADER_LEN + max as usize);
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(frame.payload.len() <= max as usize);
                    let mut again = BytesMut::from(&frame.to_bytes()[..]);
                    let back = decoder.decode(&mut again).expect("re-encoded frame decodes").expect("whole");
                    assert_eq!(back, frame);
                }
                Ok(None) => break,
                Err(e) if e.is_recoverable() => continue,
                Err(_) => break 'feed,
            }
        }
    }
    let _ = decode_sack(rest, 64);
    let _ = decode_ranks(rest, 4096);
});
