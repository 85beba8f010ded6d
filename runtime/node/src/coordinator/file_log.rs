//! The coordinator's durable Raft log: one append-only file of checksummed records, fsynced
//! before anything it holds is acknowledged.
//!
//! Record: `len u32 | crc32c u32 | kind u8 | payload` (little endian; `len` counts kind and
//! payload; the CRC covers them). Kinds: 1 entry, 2 hard state, 3 snapshot (raft's protobuf
//! encodings). Replaying the records in order with the rules of [`Recovered`] rebuilds the log.
//! A crash can leave a torn record at the end — one that was never synced, so never
//! acknowledged: it is cut off when the log is opened. A bad record *before* the end is
//! corruption and is refused. Compaction rewrites the file (snapshot, hard state, the entries
//! after the snapshot) to a temporary file, syncs it and renames it over the log.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use phalanx_runtime::coordinator::eraftpb::{Entry, HardState, Snapshot};
use phalanx_runtime::coordinator::{DurableLog, Recovered};
use protobuf::Message as _;
use thiserror::Error;
use tracing::{info, warn};

const KIND_ENTRY: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_SNAPSHOT: u8 = 3;
/// Largest record accepted when replaying (a snapshot of a very large view).
const MAX_RECORD: usize = 1 << 30;
const LOG_FILE: &str = "raft.log";

/// Why a data directory cannot be used.
#[derive(Debug, Error)]
pub enum FileLogError {
    /// The directory or file cannot be created, read or locked.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Another process holds the log.
    #[error("{path} is in use by another coordinator process")]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// A record before the end does not check out: the disk or someone else damaged the log.
    #[error("{path}: record at byte {offset} is corrupt ({reason}); refusing to start")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

/// The durable log of one coordinator, in `DIR/raft.log`.
pub struct FileLog {
    path: PathBuf,
    dir: PathBuf,
    out: BufWriter<File>,
    /// What the file holds (needed to rewrite it at compaction).
    mirror: Recovered,
}

impl FileLog {
    /// Opens (creating if needed) the log in `dir`, locks it against a second process, and
    /// returns it with what it held. A torn last record is cut off.
    pub fn open(dir: &Path) -> Result<(FileLog, Recovered), FileLogError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| FileLogError::Io { path: path.clone(), source }
        };
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(LOG_FILE);
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(FileLogError::Locked { path }),
            Err(std::fs::TryLockError::Error(e)) => return Err(FileLogError::Io { path, source: e }),
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io_err(&path))?;
        let (recovered, good) =
            replay(&bytes).map_err(|(offset, reason)| FileLogError::Corrupt { path: path.clone(), offset, reason })?;
        if good < bytes.len() {
            warn!(path = %path.display(), at = good, cut = bytes.len() - good, "cut a torn record off the log's end");
            file.set_len(good as u64).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))?;
        }
        info!(
            path = %path.display(),
            entries = recovered.entries.len(),
            snapshot = recovered.snapshot.as_ref().map_or(0, |s| s.get_metadata().index),
            term = recovered.hard_state.term,
            "log opened"
        );
        let log = FileLog { path, dir: dir.to_path_buf(), out: BufWriter::new(file), mirror: recovered.clone() };
        Ok((log, recovered))
    }

    /// Reads the log in `dir` without opening it for writing (inspection, tests): what a
    /// restart would recover now. A torn last record is ignored, not cut.
    pub fn read(dir: &Path) -> Result<Recovered, FileLogError> {
        let path = dir.join(LOG_FILE);
        let bytes = std::fs::read(&path).map_err(|source| FileLogError::Io { path: path.clone(), source })?;
        replay(&bytes).map(|(r, _)| r).map_err(|(offset, reason)| FileLogError::Corrupt { path, offset, reason })
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_record(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        write_record(&mut self.out, kind, payload)
    }
}

fn write_record(out: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len() + 1).map_err(|_| io::Error::other("record over 4 GiB"))?;
    let mut crc = crc32c::crc32c(&[kind]);
    crc = crc32c::crc32c_append(crc, payload);
    out.write_all(&len.to_le_bytes())?;
    out.write_all(&crc.to_le_bytes())?;
    out.write_all(&[kind])?;
    out.write_all(payload)
}

fn encode<M: protobuf::Message>(m: &M) -> io::Result<Vec<u8>> {
    m.write_to_bytes().map_err(io::Error::other)
}

/// Replays records: the recovered log and the length of the good prefix, or the offset and
/// reason of a corrupt record that is not the last.
fn replay(bytes: &[u8]) -> Result<(Recovered, usize), (u64, String)> {
    let mut r = Recovered::default();
    let mut at = 0usize;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < 9 {
            break; // torn header
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len == 0 || len > MAX_RECORD {
            return Err((at as u64, format!("record length {len}")));
        }
        if rest.len() < 8 + len {
            break; // torn body
        }
        let body = &rest[8..8 + len];
        if crc32c::crc32c(body) != crc {
            if at + 8 + len == bytes.len() {
                break; // a torn last record whose length landed but whose body did not
            }
            return Err((at as u64, "checksum mismatch".into()));
        }
        let payload = &body[1..];
        let bad = |e: protobuf::ProtobufError| (at as u64, e.to_string());
        match body[0] {
            KIND_ENTRY => r.append(&[Entry::parse_from_bytes(payload).map_err(bad)?]),
            KIND_HARD_STATE => r.hard_state = HardState::parse_from_bytes(payload).map_err(bad)?,
            KIND_SNAPSHOT => r.install(&Snapshot::parse_from_bytes(payload).map_err(bad)?),
            k => return Err((at as u64, format!("unknown record kind {k}"))),
        }
        at += 8 + len;
    }
    Ok((r, at))
}

impl DurableLog for FileLog {
    fn append(&mut self, entries: &[Entry]) -> io::Result<()> {
        for e in entries {
            self.write_record(KIND_ENTRY, &encode(e)?)?;
        }
        self.mirror.append(entries);
        Ok(())
    }

    fn save_hard_state(&mut self, hard_state: &HardState) -> io::Result<()> {
        self.write_record(KIND_HARD_STATE, &encode(hard_state)?)?;
        self.mirror.hard_state = hard_state.clone();
        Ok(())
    }

    fn save_snapshot(&mut self, snapshot: &Snapshot) -> io::Result<()> {
        self.out.flush()?;
        self.mirror.install(snapshot);
        // Rewrite: snapshot, hard state, the entries after it; then swap the files.
        let tmp = self.dir.join(format!("{LOG_FILE}.compacting"));
        {
            let mut w = BufWriter::new(File::create(&tmp)?);
            write_record(&mut w, KIND_SNAPSHOT, &encode(snapshot)?)?;
            write_record(&mut w, KIND_HARD_STATE, &encode(&self.mirror.hard_state)?)?;
            for e in &self.mirror.entries {
                write_record(&mut w, KIND_ENTRY, &encode(e)?)?;
            }
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
        }
        let new = OpenOptions::new().read(true).append(true).open(&tmp)?;
        new.try_lock().map_err(|e| io::Error::other(format!("locking the compacted log: {e}")))?;
        std::fs::rename(&tmp, &self.path)?;
        File::open(&self.dir)?.sync_all()?;
        self.out = BufWriter::new(new);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(index: u64, term: u64) -> Entry {
        Entry { index, term, data: vec![index as u8; 10].into(), ..Default::default() }
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("phalanx-filelog-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn what_was_synced_is_there_after_reopening_and_a_torn_tail_is_cut() {
        let dir = tmpdir("reopen");
        {
            let (mut log, r) = FileLog::open(&dir).expect("open");
            assert_eq!(r, Recovered::default());
            log.append(&[e(1, 1), e(2, 1), e(3, 1)]).expect("append");
            log.save_hard_state(&HardState { term: 2, vote: 1, commit: 2, ..Default::default() }).expect("hs");
            log.append(&[e(3, 2)]).expect("append");
            log.sync().expect("sync");
            // A second process cannot open it meanwhile.
            assert!(matches!(FileLog::open(&dir), Err(FileLogError::Locked { .. })));
        }
        // A torn record at the end (a crash mid-write).
        let path = dir.join(LOG_FILE);
        let good_len = std::fs::metadata(&path).expect("log").len();
        let mut f = OpenOptions::new().append(true).open(&path).expect("log");
        f.write_all(&[40, 0, 0, 0, 1, 2, 3, 4, KIND_ENTRY, 9, 9]).expect("write");
        drop(f);
        let (_, r) = FileLog::open(&dir).expect("reopen");
        assert_eq!(r.entries, vec![e(1, 1), e(2, 1), e(3, 2)]);
        assert_eq!(r.hard_state.term, 2);
        assert_eq!(std::fs::metadata(&path).expect("log").len(), good_len, "the torn record was cut off");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupt_record_before_the_end_is_refused() {
        let dir = tmpdir("corrupt");
        {
            let (mut log, _) = FileLog::open(&dir).expect("open");
            log.append(&[e(1, 1), e(2, 1)]).expect("append");
            log.sync().expect("sync");
        }
        let path = dir.join(LOG_FILE);
        let mut bytes = std::fs::read(&path).expect("log");
        bytes[12] ^= 0x40;
        std::fs::write(&path, &bytes).expect("write");
        assert!(matches!(FileLog::open(&dir), Err(FileLogError::Corrupt { offset: 0, .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn compaction_rewrites_the_log_around_the_snapshot() {
        let dir = tmpdir("compact");
        let snap = {
            let (mut log, _) = FileLog::open(&dir).expect("open");
            log.append(&[e(1, 1), e(2, 1), e(3, 1), e(4, 1)]).expect("append");
            log.save_hard_state(&HardState { term: 1, vote: 1, commit: 4, ..Default::default() }).expect("hs");
            let mut snap = Snapshot { data: b"view".to_vec().into(), ..Default::default() };
            snap.mut_metadata().index = 2;
            snap.mut_metadata().term = 1;
            log.save_snapshot(&snap).expect("compact");
            log.append(&[e(5, 1)]).expect("append after compaction");
            log.sync().expect("sync");
            snap
        };
        let (_, r) = FileLog::open(&dir).expect("reopen");
        assert_eq!(r.snapshot, Some(snap));
        assert_eq!(r.entries, vec![e(3, 1), e(4, 1), e(5, 1)]);
        assert_eq!(r.hard_state.commit, 4);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
