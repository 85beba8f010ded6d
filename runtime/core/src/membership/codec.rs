//! The log-entry codec of [`Command`]s: `version u8 | kind u8 | fields`, little endian; strings
//! as `len u16 | UTF-8 bytes`. Decoding is total: any bytes give a command or a
//! [`DecodeError`], never a panic, and never an allocation beyond the entry's own size.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use super::Command;

/// Codec version written in every entry.
const VERSION: u8 = 1;
/// Largest entry accepted.
pub const MAX_ENTRY_BYTES: usize = 64 << 10;
/// Most addresses a join may list.
pub const MAX_ADDRS: usize = 16;

/// Why bytes are not a command.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Longer than [`MAX_ENTRY_BYTES`].
    #[error("entry of {0} bytes exceeds the maximum")]
    TooLong(usize),
    /// Ends inside a field.
    #[error("entry ends inside {0}")]
    Truncated(&'static str),
    /// Written by a codec version this one does not read.
    #[error("entry version {0} is not supported")]
    Version(u8),
    /// Unknown command kind.
    #[error("unknown command kind {0}")]
    Kind(u8),
    /// A string is not UTF-8, or a join lists too many addresses.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// Bytes left after the command.
    #[error("{0} bytes after the command")]
    Trailing(usize),
}

/// The entry of `c`.
pub fn encode(c: &Command) -> Bytes {
    let mut m = BytesMut::with_capacity(32);
    m.put_u8(VERSION);
    match c {
        Command::Join { dc, host, addrs, incarnation } => {
            m.put_u8(1);
            m.put_u32_le(*dc);
            put_str(&mut m, host);
            m.put_u8(addrs.len().min(MAX_ADDRS) as u8);
            for a in addrs.iter().take(MAX_ADDRS) {
                put_str(&mut m, a);
            }
            m.put_u64_le(*incarnation);
        }
        Command::Leave { rank, epoch } => {
            m.put_u8(2);
            m.put_u32_le(*rank);
            m.put_u64_le(*epoch);
        }
        Command::ReportFailure { rank, reporter, epoch } => {
            m.put_u8(3);
            m.put_u32_le(*rank);
            m.put_u32_le(*reporter);
            m.put_u64_le(*epoch);
        }
        Command::Progress { rank, epoch, step } => {
            m.put_u8(4);
            m.put_u32_le(*rank);
            m.put_u64_le(*epoch);
            m.put_u64_le(*step);
        }
        Command::BeginEpoch { expected } => {
            m.put_u8(5);
            m.put_u64_le(*expected);
        }
    }
    m.freeze()
}

/// Strings longer than `u16::MAX` bytes are cut at a character boundary (hosts and addresses
/// are short; the cut keeps the codec total).
fn put_str(m: &mut BytesMut, s: &str) {
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    m.put_u16_le(end as u16);
    m.put_slice(&s.as_bytes()[..end]);
}

/// The command in `entry`.
pub fn decode(entry: &[u8]) -> Result<Command, DecodeError> {
    if entry.len() > MAX_ENTRY_BYTES {
        return Err(DecodeError::TooLong(entry.len()));
    }
    let mut b = entry;
    let version = u8_of(&mut b, "version")?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let c = match u8_of(&mut b, "kind")? {
        1 => {
            let dc = u32_of(&mut b, "dc")?;
            let host = str_of(&mut b, "host")?;
            let n = u8_of(&mut b, "address count")? as usize;
            if n > MAX_ADDRS {
                return Err(DecodeError::Malformed("address count"));
            }
            let mut addrs = Vec::with_capacity(n);
            for _ in 0..n {
                addrs.push(str_of(&mut b, "address")?);
            }
            Command::Join { dc, host, addrs, incarnation: u64_of(&mut b, "incarnation")? }
        }
        2 => Command::Leave { rank: u32_of(&mut b, "rank")?, epoch: u64_of(&mut b, "epoch")? },
        3 => Command::ReportFailure {
            rank: u32_of(&mut b, "rank")?,
            reporter: u32_of(&mut b, "reporter")?,
            epoch: u64_of(&mut b, "epoch")?,
        },
        4 => Command::Progress {
            rank: u32_of(&mut b, "rank")?,
            epoch: u64_of(&mut b, "epoch")?,
            step: u64_of(&mut b, "step")?,
        },
        5 => Command::BeginEpoch { expected: u64_of(&mut b, "epoch")? },
        k => return Err(DecodeError::Kind(k)),
    };
    if !b.is_empty() {
        return Err(DecodeError::Trailing(b.len()));
    }
    Ok(c)
}

fn u8_of(b: &mut &[u8], what: &'static str) -> Result<u8, DecodeError> {
    (b.remaining() >= 1).then(|| b.get_u8()).ok_or(DecodeError::Truncated(what))
}

fn u32_of(b: &mut &[u8], what: &'static str) -> Result<u32, DecodeError> {
    (b.remaining() >= 4).then(|| b.get_u32_le()).ok_or(DecodeError::Truncated(what))
}

fn u64_of(b: &mut &[u8], what: &'static str) -> Result<u64, DecodeError> {
    (b.remaining() >= 8).then(|| b.get_u64_le()).ok_or(DecodeError::Truncated(what))
}

fn str_of(b: &mut &[u8], what: &'static str) -> Result<String, DecodeError> {
    if b.remaining() < 2 {
        return Err(DecodeError::Truncated(what));
    }
    let n = b.get_u16_le() as usize;
    if b.remaining() < n {
        return Err(DecodeError::Truncated(what));
    }
    let s = std::str::from_utf8(&b[..n]).map_err(|_| DecodeError::Malformed(what))?.to_string();
    b.advance(n);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn command() -> impl Strategy<Value = Command> {
        prop_oneof![
            (
                any::<u32>(),
                "[a-z0-9.-]{0,40}",
                proptest::collection::vec("[a-z0-9.:]{0,30}", 0..=MAX_ADDRS),
                any::<u64>()
            )
                .prop_map(|(dc, host, addrs, incarnation)| Command::Join { dc, host, addrs, incarnation }),
            (any::<u32>(), any::<u64>()).prop_map(|(rank, epoch)| Command::Leave { rank, epoch }),
            (any::<u32>(), any::<u32>(), any::<u64>()).prop_map(|(rank, reporter, epoch)| Command::ReportFailure {
                rank,
                reporter,
                epoch
            }),
            (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(rank, epoch, step)| Command::Progress {
                rank,
                epoch,
                step
            }),
            any::<u64>().prop_map(|expected| Command::BeginEpoch { expected }),
        ]
    }

    proptest! {
        #[test]
        fn every_command_round_trips(c in command()) {
            prop_assert_eq!(decode(&encode(&c)), Ok(c));
        }

        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn a_cut_or_extended_entry_is_refused(c in command(), cut in any::<prop::sample::Index>()) {
            let e = encode(&c);
            let at = cut.index(e.len());
            prop_assert!(decode(&e[..at]).is_err(), "a prefix of {} bytes", at);
            let mut longer = e.to_vec();
            longer.push(0);
            prop_assert_eq!(decode(&longer), Err(DecodeError::Trailing(1)));
        }
    }

    #[test]
    fn unknown_versions_and_kinds_are_named() {
        assert_eq!(decode(&[9, 1]), Err(DecodeError::Version(9)));
        assert_eq!(decode(&[VERSION, 77]), Err(DecodeError::Kind(77)));
        assert_eq!(decode(&[]), Err(DecodeError::Truncated("version")));
        assert!(matches!(decode(&vec![0u8; MAX_ENTRY_BYTES + 1]), Err(DecodeError::TooLong(_))));
    }
}
