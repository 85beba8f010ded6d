//! Arbitrary bytes, fed to the frame decoder at once and in pieces, as they are and with their
//! frame checksums repaired: frames or typed errors, never a panic, never a request for more
//! than one maximal frame, every decoded frame re-encodes to exactly the bytes it came from,
//! and how the bytes were cut changes nothing.
#![no_main]

use std::mem::{discriminant, Discriminant};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use phalanx_proto::checksum::Crc32c;
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

/// `bytes` with the checksum of every whole frame it holds set right, so that streams of valid
/// frames are as easy for the fuzzer to reach as garbage (it cannot solve a CRC by mutation).
fn with_checksums_fixed(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    let mut at = 0;
    while v.len() - at >= HEADER_LEN {
        let len = u32::from_le_bytes([v[at + 44], v[at + 45], v[at + 46], v[at + 47]]) as usize;
        let end = at + HEADER_LEN + len;
        if end > v.len() {
            break;
        }
        let mut crc = Crc32c::new();
        crc.update(&v[at..at + HEADER_LEN - 4]);
        crc.update(&v[at + HEADER_LEN..end]);
        v[at + HEADER_LEN - 4..at + HEADER_LEN].copy_from_slice(&crc.finish().to_le_bytes());
        at = end;
    }
    v
}

/// Decodes `stream` all at once and in pieces and checks that both agree.
fn check_stream(decoder: &FrameDecoder, stream: &[u8], cut_salt: u8) {
    // Reference: all bytes at once.
    let mut whole = BytesMut::from(stream);
    let mut expected = Vec::new();
    drain(decoder, &mut whole, &mut expected);

    // The same bytes in pieces of 1..=97 bytes, each length picked by the data at the cut.
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut fed = 0;
    let mut live = true;
    while live && fed < stream.len() {
        let step = 1 + (stream[fed] as usize + cut_salt as usize) % 97;
        let end = (fed + step).min(stream.len());
        buf.extend_from_slice(&stream[fed..end]);
        fed = end;
        live = drain(decoder, &mut buf, &mut got);
    }
    assert_eq!(got, expected, "decoding in pieces differs from decoding at once");
    // Both stop at the same byte; after a fatal error the pieces run has not fed the rest.
    if live {
        assert_eq!(buf[..], whole[..], "pieces and whole leave different remainders");
    } else {
        assert!(whole.starts_with(&buf), "pieces and whole stopped at different bytes");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let decoder = FrameDecoder::new(first as u32 * 64);
    // The bytes as they are (checksum errors, framing kept after them), then with valid
    // checksums (frames decoded, re-encoded and compared).
    check_stream(&decoder, rest, first);
    check_stream(&decoder, &with_checksums_fixed(rest), first);

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
