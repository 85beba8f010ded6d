//! Arbitrary bytes, fed to the frame decoder at once and in pieces: frames or typed errors,
//! never a panic, never a request for more than one maximal frame, every decoded frame
//! re-encodes to exactly the bytes it came from, and how the bytes were cut changes nothing.
#![no_main]

use std::mem::{discriminant, Discriminant};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use phalanx_proto::frame::{decode_ranks, decode_sack, encode_ranks, encode_sack, HEADER_LEN};
use phalanx_proto::{DecodeError, Frame, FrameDecoder};

/// What one `decode` call produced. Fatal errors are compared by kind only: a `BadMagic` seen
/// on a short buffer carries fewer of the bytes than the same error seen on a longer one.
#[derive(Debug, PartialEq)]
enum Outcome {
    Frame(Frame),
    Dropped(DecodeError),
    Fatal(Discriminant<DecodeError>),
}

/// Decodes everything `buf` holds, checking the decoder's promises at every call.
/// Returns `false` once a fatal error has stopped the stream.
fn drain(d: &FrameDecoder, buf: &mut BytesMut, out: &mut Vec<Outcome>) -> bool {
    let max = d.max_payload() as usize;
    loop {
        let needed = d.bytes_needed(buf);
        assert!(needed <= HEADER_LEN + max, "bytes_needed {needed} above HEADER_LEN + {max}");
        let before = buf.len();
        let mut head = [0u8; HEADER_LEN];
        if before >= HEADER_LEN {
            head.copy_from_slice(&buf[..HEADER_LEN]);
        }
        match d.decode(buf) {
            Ok(Some(frame)) => {
                assert!(frame.payload.len() <= max, "payload of {} above {max}", frame.payload.len());
                assert_eq!(before - buf.len(), frame.wire_len(), "consumed bytes differ from the frame");
                let wire = frame.to_bytes();
                assert_eq!(wire[..HEADER_LEN], head, "re-encoded header differs from the bytes decoded");
                let mut again = BytesMut::from(&wire[..]);
                let back = d.decode(&mut again).expect("re-encoded frame decodes").expect("and is whole");
                assert_eq!(back, frame);
                assert!(again.is_empty());
                out.push(Outcome::Frame(frame));
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "an incomplete frame was consumed");
                assert!(needed > before, "incomplete, yet bytes_needed {needed} <= {before} held");
                return true;
            }
            Err(e) if e.is_recoverable() => {
                // The bad frame, and only it, has been consumed; framing is kept.
                assert!(before >= HEADER_LEN);
                let declared = u32::from_le_bytes([head[44], head[45], head[46], head[47]]) as usize;
                assert!(declared <= max);
                assert_eq!(before - buf.len(), HEADER_LEN + declared);
                out.push(Outcome::Dropped(e));
            }
            Err(e) => {
                assert_eq!(buf.len(), before, "a fatal error ({e}) changed the buffer");
                out.push(Outcome::Fatal(discriminant(&e)));
                return false;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let decoder = FrameDecoder::new(first as u32 * 64);

    // Reference: all bytes at once.
    let mut whole = BytesMut::from(rest);
    let mut expected = Vec::new();
    drain(&decoder, &mut whole, &mut expected);

    // The same bytes in pieces of 1..=97 bytes, each length picked by the data at the cut.
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut fed = 0;
    let mut live = true;
    while live && fed < rest.len() {
        let step = 1 + (rest[fed] as usize + first as usize) % 97;
        let end = (fed + step).min(rest.len());
        buf.extend_from_slice(&rest[fed..end]);
        fed = end;
        live = drain(&decoder, &mut buf, &mut got);
    }
    assert_eq!(got, expected, "decoding in pieces differs from decoding at once");
    // Both stop at the same byte; after a fatal error the pieces run has not fed the rest.
    if live {
        assert_eq!(buf[..], whole[..], "pieces and whole leave different remainders");
    } else {
        assert!(whole.starts_with(&buf), "pieces and whole stopped at different bytes");
    }

    // Ack and heartbeat payload decoders on the raw bytes.
    let limit = first as usize;
    let ranges = decode_sack(rest, limit);
    assert!(ranges.len() <= limit.min(rest.len() / 16));
    assert!(ranges.iter().all(|&(s, e)| s < e), "empty or inverted range kept: {ranges:?}");
    assert_eq!(decode_sack(&encode_sack(&ranges), usize::MAX), ranges);
    let ranks = decode_ranks(rest, limit);
    assert_eq!(ranks.len(), limit.min(rest.len() / 4));
    assert_eq!(encode_ranks(ranks.iter().copied())[..], rest[..ranks.len() * 4]);
});
