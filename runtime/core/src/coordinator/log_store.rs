//! The Raft log as the coordinator holds it: [`LogStore`], the in-memory copy raft-rs reads
//! (it implements [`raft::Storage`]), and [`DurableLog`], the seam through which every entry,
//! hard state and snapshot reaches stable storage before anything is acknowledged.
//!
//! The same replay rules serve both the real file log of the driver and [`MemoryLog`] (tests,
//! simulator): a [`Recovered`] log is rebuilt by applying the records in order, and an entry at
//! an index already present replaces it and everything after it (Raft's conflict rule).

use std::io;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

/// What a restarted coordinator finds on disk: its last snapshot (the state machine as of an
/// index), the hard state (term, vote, commit) and the entries after the snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovered {
    /// Term, vote and commit index.
    pub hard_state: HardState,
    /// The latest snapshot (`None`: the log starts at index 1).
    pub snapshot: Option<Snapshot>,
    /// Entries after the snapshot, contiguous and ascending.
    pub entries: Vec<Entry>,
}

impl Recovered {
    /// Appends `entries` (contiguous, ascending): the first replaces whatever the log holds at
    /// its index and after. Entries at or below the snapshot are ignored (already compacted).
    pub fn append(&mut self, entries: &[Entry]) {
        let floor = self.snapshot.as_ref().map_or(0, |s| s.get_metadata().index);
        let entries: Vec<&Entry> = entries.iter().filter(|e| e.index > floor).collect();
        let Some(first) = entries.first() else { return };
        let keep = self.entries.iter().take_while(|e| e.index < first.index).count();
        self.entries.truncate(keep);
        self.entries.extend(entries.into_iter().cloned());
    }

    /// Replaces the log up to the snapshot's index by the snapshot, keeping the entries after
    /// it (those that follow contiguously).
    pub fn install(&mut self, snapshot: &Snapshot) {
        let index = snapshot.get_metadata().index;
        self.entries.retain(|e| e.index > index);
        if self.entries.first().is_some_and(|e| e.index != index + 1) {
            self.entries.clear();
        }
        if self.hard_state.commit < index {
            self.hard_state.commit = index;
        }
        if self.hard_state.term < snapshot.get_metadata().term {
            self.hard_state.term = snapshot.get_metadata().term;
        }
        self.snapshot = Some(snapshot.clone());
    }

    /// The index of the last entry (or of the snapshot; 0 when empty).
    pub fn last_index(&self) -> u64 {
        self.entries
            .last()
            .map(|e| e.index)
            .unwrap_or_else(|| self.snapshot.as_ref().map_or(0, |s| s.get_metadata().index))
    }

    /// The entry at `index`, if the log still holds it.
    pub fn entry(&self, index: u64) -> Option<&Entry> {
        let first = self.entries.first()?.index;
        self.entries.get(usize::try_from(index.checked_sub(first)?).ok()?)
    }
}

/// Stable storage for the Raft log. The coordinator calls [`DurableLog::sync`] after writing and
/// before it sends any message that acknowledges what it wrote (a vote, an append response) or
/// replies to a client; a write that was not synced may be lost in a crash, a synced one never.
pub trait DurableLog {
    /// Appends entries (contiguous, ascending); the first replaces the log from its index on.
    fn append(&mut self, entries: &[Entry]) -> io::Result<()>;
    /// Records term, vote and commit index.
    fn save_hard_state(&mut self, hard_state: &HardState) -> io::Result<()>;
    /// Replaces the log up to the snapshot's index by the snapshot (one received from the
    /// leader, or one taken locally to compact the log); later entries are kept.
    fn save_snapshot(&mut self, snapshot: &Snapshot) -> io::Result<()>;
    /// Makes every write so far durable.
    fn sync(&mut self) -> io::Result<()>;
}

/// A [`DurableLog`] in memory: what was synced survives a simulated crash
/// ([`MemoryLog::recover`]), what was written after the last sync does not.
#[derive(Clone, Debug, Default)]
pub struct MemoryLog {
    durable: Recovered,
    unsynced: Recovered,
    /// Syncs done (a test can check that acknowledgements waited for one).
    pub syncs: u64,
}

impl MemoryLog {
    /// An empty log.
    pub fn new() -> MemoryLog {
        MemoryLog::default()
    }

    /// What a restart would find: everything up to the last sync.
    pub fn recover(&self) -> Recovered {
        self.durable.clone()
    }
}

impl DurableLog for MemoryLog {
    fn append(&mut self, entries: &[Entry]) -> io::Result<()> {
        self.unsynced.append(entries);
        Ok(())
    }

    fn save_hard_state(&mut self, hard_state: &HardState) -> io::Result<()> {
        self.unsynced.hard_state = hard_state.clone();
        Ok(())
    }

    fn save_snapshot(&mut self, snapshot: &Snapshot) -> io::Result<()> {
        self.unsynced.install(snapshot);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.durable = self.unsynced.clone();
        self.syncs += 1;
        Ok(())
    }
}

/// The in-memory log raft-rs reads through [`raft::Storage`]: entries after the latest
/// snapshot, the snapshot itself (metadata and the encoded state machine), hard state and
/// membership of the Raft group.
#[derive(Clone, Debug, Default)]
pub struct LogStore {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
    entries: Vec<Entry>,
}

impl LogStore {
    /// A store holding what was recovered; `voters` and `learners` are the group's membership
    /// when no snapshot says otherwise.
    pub fn new(recovered: &Recovered, voters: &[u64], learners: &[u64]) -> LogStore {
        let mut s = LogStore::default();
        match &recovered.snapshot {
            Some(snap) => {
                s.conf_state = snap.get_metadata().get_conf_state().clone();
                s.snapshot = snap.clone();
            }
            None => {
                s.conf_state.voters = voters.to_vec();
                s.conf_state.learners = learners.to_vec();
            }
        }
        s.entries = recovered.entries.clone();
        s.hard_state = recovered.hard_state.clone();
        s
    }

    /// The latest snapshot (empty data before the first one).
    pub fn snapshot_ref(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Appends entries (the first replaces the log from its index on).
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        let keep = self.entries.iter().take_while(|e| e.index < first.index).count();
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
    }

    /// Records term, vote and commit.
    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    /// The group's membership after a configuration change (snapshots taken from now on carry
    /// it).
    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.conf_state = cs;
    }

    /// Moves the commit index forward.
    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    /// Installs a snapshot: drops the entries it covers.
    pub fn install(&mut self, snap: &Snapshot) {
        let meta = snap.get_metadata();
        self.entries.retain(|e| e.index > meta.index);
        if self.entries.first().is_some_and(|e| e.index != meta.index + 1) {
            self.entries.clear();
        }
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.conf_state = meta.get_conf_state().clone();
        self.snapshot = snap.clone();
    }

    /// A snapshot of `data` (the encoded state machine) as of the applied `index`, not yet
    /// installed; `None` if the log no longer holds that index's term.
    pub fn snapshot_at(&self, index: u64, data: Vec<u8>) -> Option<Snapshot> {
        let term = self.term(index).ok()?;
        let mut meta = SnapshotMetadata { index, term, ..Default::default() };
        meta.set_conf_state(self.conf_state.clone());
        let mut snap = Snapshot::default();
        snap.set_metadata(meta);
        snap.data = data.into();
        Some(snap)
    }

    fn first(&self) -> u64 {
        self.snapshot.get_metadata().index + 1
    }

    fn last(&self) -> u64 {
        self.entries.last().map_or(self.snapshot.get_metadata().index, |e| e.index)
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let offset = self.first();
        let mut ents = self.entries[(low - offset) as usize..(high - offset) as usize].to_vec();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let meta = self.snapshot.get_metadata();
        if idx == meta.index {
            return Ok(meta.term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot.get_metadata().index < request_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(index: u64, term: u64) -> Entry {
        Entry { index, term, data: vec![index as u8, term as u8].into(), ..Default::default() }
    }

    #[test]
    fn an_append_replaces_the_conflicting_suffix() {
        let mut r = Recovered::default();
        r.append(&[e(1, 1), e(2, 1), e(3, 1)]);
        r.append(&[e(2, 2)]);
        assert_eq!(r.entries, vec![e(1, 1), e(2, 2)]);
        assert_eq!(r.last_index(), 2);
        assert_eq!(r.entry(2), Some(&e(2, 2)));
        assert_eq!(r.entry(3), None);
    }

    #[test]
    fn a_snapshot_drops_what_it_covers_and_keeps_what_follows() {
        let mut r = Recovered::default();
        r.append(&[e(1, 1), e(2, 1), e(3, 1)]);
        let store = LogStore::new(&r, &[1], &[]);
        let snap = store.snapshot_at(2, b"state".to_vec()).expect("index 2 is held");
        r.install(&snap);
        assert_eq!(r.entries, vec![e(3, 1)]);
        assert_eq!(r.hard_state.commit, 2);
        // Entries the snapshot covers are ignored when replayed again.
        r.append(&[e(2, 1)]);
        assert_eq!(r.entries, vec![e(3, 1)]);
        let s = LogStore::new(&r, &[1], &[]);
        assert_eq!(s.first_index(), Ok(3));
        assert_eq!(s.term(2), Ok(1));
        assert!(s.entries(2, 4, None, GetEntriesContext::empty(false)).is_err(), "compacted");
        assert_eq!(s.entries(3, 4, None, GetEntriesContext::empty(false)), Ok(vec![e(3, 1)]));
    }

    #[test]
    fn only_synced_writes_survive_a_crash() {
        let mut log = MemoryLog::new();
        log.append(&[e(1, 1)]).expect("memory");
        log.sync().expect("memory");
        log.append(&[e(2, 1)]).expect("memory");
        assert_eq!(log.recover().entries, vec![e(1, 1)]);
        log.sync().expect("memory");
        assert_eq!(log.recover().entries, vec![e(1, 1), e(2, 1)]);
    }
}
