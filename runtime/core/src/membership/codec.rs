//! The log-entry codec of [`Command`]s: `version u8 | kind u8 | fields`, little endian; strings
//! as `len u16 | UTF-8 bytes`. Decoding is total: any bytes give a command or a
//! [`DecodeError`], never a panic, and never an allocation beyond the entry's own size.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use std::collections::BTreeMap;

use super::{ClusterView, Command, Member, Outcome, RankStatus, ViewError};

/// Codec version written in every entry.
const VERSION: u8 = 1;
/// Largest entry accepted.
pub const MAX_ENTRY_BYTES: usize = 64 << 10;
/// Most addresses a join may list.
pub const MAX_ADDRS: usize = 16;

/// Largest encoded view accepted (a snapshot or a read reply): about a million ranks.
pub const MAX_VIEW_BYTES: usize = 256 << 20;

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
pub(crate) fn put_str(m: &mut BytesMut, s: &str) {
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

/// The bytes of a whole view: `version u8 | epoch u64 | ranks u32 | rank records | members u32 |
/// member ids`. A rank record is `rank u32 | dc u32 | host str | addrs u8, str.. | incarnation
/// u64 | status u8 | step u64`.
pub fn encode_view(v: &ClusterView) -> Bytes {
    let mut m = BytesMut::with_capacity(16 + v.ranks().count() * 48);
    put_view(&mut m, v);
    m.freeze()
}

/// Appends the encoding of `v` to `m` (see [`encode_view`]).
pub fn put_view(m: &mut BytesMut, v: &ClusterView) {
    m.put_u8(VERSION);
    m.put_u64_le(v.epoch());
    m.put_u32_le(v.ranks().count() as u32);
    for (rank, r) in v.ranks() {
        m.put_u32_le(rank);
        m.put_u32_le(r.dc);
        put_str(m, &r.host);
        m.put_u8(r.addrs.len().min(MAX_ADDRS) as u8);
        for a in r.addrs.iter().take(MAX_ADDRS) {
            put_str(m, a);
        }
        m.put_u64_le(r.incarnation);
        m.put_u8(match r.status {
            RankStatus::Joining => 1,
            RankStatus::Active => 2,
            RankStatus::Leaving => 3,
            RankStatus::Failed => 4,
        });
        m.put_u64_le(r.step);
    }
    m.put_u32_le(v.members().len() as u32);
    for r in v.members() {
        m.put_u32_le(*r);
    }
}

/// The view in `bytes` (all of them).
pub fn decode_view(bytes: &[u8]) -> Result<ClusterView, DecodeError> {
    let mut b = bytes;
    let v = get_view(&mut b)?;
    if !b.is_empty() {
        return Err(DecodeError::Trailing(b.len()));
    }
    Ok(v)
}

/// Reads one view from the front of `b` (see [`encode_view`]). Counts are checked against the
/// bytes left before anything is allocated; member ids must be ascending ranks of the view.
pub fn get_view(b: &mut &[u8]) -> Result<ClusterView, DecodeError> {
    if b.len() > MAX_VIEW_BYTES {
        return Err(DecodeError::TooLong(b.len()));
    }
    let version = u8_of(b, "version")?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let epoch = u64_of(b, "epoch")?;
    let n = u32_of(b, "rank count")? as usize;
    // A rank record is at least 31 bytes.
    if n > b.len() / 31 {
        return Err(DecodeError::Truncated("rank records"));
    }
    let mut ranks = BTreeMap::new();
    let mut last = None;
    for _ in 0..n {
        let rank = u32_of(b, "rank")?;
        if last.is_some_and(|l| rank <= l) {
            return Err(DecodeError::Malformed("rank order"));
        }
        last = Some(rank);
        let dc = u32_of(b, "dc")?;
        let host = str_of(b, "host")?;
        let k = u8_of(b, "address count")? as usize;
        if k > MAX_ADDRS {
            return Err(DecodeError::Malformed("address count"));
        }
        let mut addrs = Vec::with_capacity(k);
        for _ in 0..k {
            addrs.push(str_of(b, "address")?);
        }
        let incarnation = u64_of(b, "incarnation")?;
        let status = match u8_of(b, "status")? {
            1 => RankStatus::Joining,
            2 => RankStatus::Active,
            3 => RankStatus::Leaving,
            4 => RankStatus::Failed,
            _ => return Err(DecodeError::Malformed("status")),
        };
        let step = u64_of(b, "step")?;
        ranks.insert(rank, Member { dc, host, addrs, incarnation, status, step });
    }
    let k = u32_of(b, "member count")? as usize;
    if k > b.len() / 4 {
        return Err(DecodeError::Truncated("member ids"));
    }
    let mut members = Vec::with_capacity(k);
    for _ in 0..k {
        let r = u32_of(b, "member")?;
        if members.last().is_some_and(|l| r <= *l) || !ranks.contains_key(&r) {
            return Err(DecodeError::Malformed("member list"));
        }
        members.push(r);
    }
    Ok(ClusterView::from_parts(epoch, ranks, members))
}

/// Appends what applying a command gave: `1` and an [`Outcome`], or `0` and a [`ViewError`].
pub fn put_result(m: &mut BytesMut, r: &Result<Outcome, ViewError>) {
    match r {
        Ok(o) => {
            m.put_u8(1);
            match o {
                Outcome::Joined { rank, from_epoch } => {
                    m.put_u8(1);
                    m.put_u32_le(*rank);
                    m.put_u64_le(*from_epoch);
                }
                Outcome::Updated => m.put_u8(2),
                Outcome::Unchanged => m.put_u8(3),
                Outcome::EpochBegan { epoch, members } => {
                    m.put_u8(4);
                    m.put_u64_le(*epoch);
                    m.put_u32_le(members.len() as u32);
                    for r in members {
                        m.put_u32_le(*r);
                    }
                }
            }
        }
        Err(e) => {
            m.put_u8(0);
            match e {
                ViewError::StaleEpoch { rank, given, current } => {
                    m.put_u8(1);
                    m.put_u32_le(*rank);
                    m.put_u64_le(*given);
                    m.put_u64_le(*current);
                }
                ViewError::EpochMoved { expected, current } => {
                    m.put_u8(2);
                    m.put_u64_le(*expected);
                    m.put_u64_le(*current);
                }
                ViewError::UnknownRank(r) => {
                    m.put_u8(3);
                    m.put_u32_le(*r);
                }
                ViewError::Fenced(r) => {
                    m.put_u8(4);
                    m.put_u32_le(*r);
                }
                ViewError::AlreadyJoined { rank, incarnation } => {
                    m.put_u8(5);
                    m.put_u32_le(*rank);
                    m.put_u64_le(*incarnation);
                }
                ViewError::Full => m.put_u8(6),
            }
        }
    }
}

/// Reads what [`put_result`] wrote from the front of `b`.
pub fn get_result(b: &mut &[u8]) -> Result<Result<Outcome, ViewError>, DecodeError> {
    Ok(match u8_of(b, "result")? {
        1 => Ok(match u8_of(b, "outcome")? {
            1 => Outcome::Joined { rank: u32_of(b, "rank")?, from_epoch: u64_of(b, "epoch")? },
            2 => Outcome::Updated,
            3 => Outcome::Unchanged,
            4 => {
                let epoch = u64_of(b, "epoch")?;
                let n = u32_of(b, "member count")? as usize;
                if n > b.len() / 4 {
                    return Err(DecodeError::Truncated("member ids"));
                }
                let mut members = Vec::with_capacity(n);
                for _ in 0..n {
                    members.push(u32_of(b, "member")?);
                }
                Outcome::EpochBegan { epoch, members }
            }
            _ => return Err(DecodeError::Malformed("outcome")),
        }),
        0 => Err(match u8_of(b, "refusal")? {
            1 => ViewError::StaleEpoch {
                rank: u32_of(b, "rank")?,
                given: u64_of(b, "epoch")?,
                current: u64_of(b, "epoch")?,
            },
            2 => ViewError::EpochMoved { expected: u64_of(b, "epoch")?, current: u64_of(b, "epoch")? },
            3 => ViewError::UnknownRank(u32_of(b, "rank")?),
            4 => ViewError::Fenced(u32_of(b, "rank")?),
            5 => ViewError::AlreadyJoined { rank: u32_of(b, "rank")?, incarnation: u64_of(b, "incarnation")? },
            6 => ViewError::Full,
            _ => return Err(DecodeError::Malformed("refusal")),
        }),
        _ => return Err(DecodeError::Malformed("result")),
    })
}

pub(crate) fn u8_of(b: &mut &[u8], what: &'static str) -> Result<u8, DecodeError> {
    (b.remaining() >= 1).then(|| b.get_u8()).ok_or(DecodeError::Truncated(what))
}

pub(crate) fn u32_of(b: &mut &[u8], what: &'static str) -> Result<u32, DecodeError> {
    (b.remaining() >= 4).then(|| b.get_u32_le()).ok_or(DecodeError::Truncated(what))
}

pub(crate) fn u64_of(b: &mut &[u8], what: &'static str) -> Result<u64, DecodeError> {
    (b.remaining() >= 8).then(|| b.get_u64_le()).ok_or(DecodeError::Truncated(what))
}

pub(crate) fn str_of(b: &mut &[u8], what: &'static str) -> Result<String, DecodeError> {
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
    fn a_view_round_trips_and_bad_views_are_refused() {
        let mut v = ClusterView::new();
        for (i, h) in ["a", "b", "c"].iter().enumerate() {
            let c = Command::Join { dc: i as u32, host: h.to_string(), addrs: vec![format!("{h}:1")], incarnation: 7 };
            v.apply(&c).expect("join");
        }
        v.apply(&Command::BeginEpoch { expected: 0 }).expect("epoch");
        v.apply(&Command::ReportFailure { rank: 1, reporter: 0, epoch: 1 }).expect("report");
        v.apply(&Command::Progress { rank: 2, epoch: 1, step: 99 }).expect("progress");
        let bytes = encode_view(&v);
        assert_eq!(decode_view(&bytes), Ok(v.clone()));
        for cut in 0..bytes.len() {
            assert!(decode_view(&bytes[..cut]).is_err(), "a view cut at {cut} bytes");
        }
        // A member id that is no rank of the view.
        let mut bad = bytes.to_vec();
        let last = bad.len() - 4;
        bad[last..].copy_from_slice(&77u32.to_le_bytes());
        assert_eq!(decode_view(&bad), Err(DecodeError::Malformed("member list")));
        // A rank count far beyond the bytes: refused before allocating.
        let mut huge = bytes[..9].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_view(&huge), Err(DecodeError::Truncated("rank records")));
    }

    #[test]
    fn results_round_trip() {
        let all = [
            Ok(Outcome::Joined { rank: 3, from_epoch: 9 }),
            Ok(Outcome::Updated),
            Ok(Outcome::Unchanged),
            Ok(Outcome::EpochBegan { epoch: 4, members: vec![0, 2, 5] }),
            Err(ViewError::StaleEpoch { rank: 1, given: 2, current: 3 }),
            Err(ViewError::EpochMoved { expected: 1, current: 2 }),
            Err(ViewError::UnknownRank(8)),
            Err(ViewError::Fenced(4)),
            Err(ViewError::AlreadyJoined { rank: 2, incarnation: 11 }),
            Err(ViewError::Full),
        ];
        for r in all {
            let mut m = BytesMut::new();
            put_result(&mut m, &r);
            let mut b = &m[..];
            assert_eq!(get_result(&mut b), Ok(r));
            assert!(b.is_empty());
        }
    }

    proptest! {
        #[test]
        fn any_bytes_decode_as_a_view_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_view(&bytes);
            let mut b = &bytes[..];
            let _ = get_result(&mut b);
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
