//! Fault injection on a path, for tests, chaos runs and demos: cut, delay, drop, reorder and
//! corrupt, on command. Applied by the link driver to encoded frames, so the real decoder,
//! checksums and session logic see the damage exactly as they would from a bad NIC or cable.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Debug, Default)]
struct FaultState {
    cut: bool,
    cut_after_bytes: Option<u64>,
    delay: Duration,
    drop_every: u32,
    corrupt_every: u32,
    reorder: bool,
    bytes_written: u64,
    data_frames: u64,
    corrupted: u64,
    dropped: u64,
}

/// Shared fault controls of one path (all connections dialed on it). Cloning shares the state.
///
/// A cut path behaves like a pulled cable: frames written are discarded, bytes read are
/// discarded, nobody is told, and no new connection is dialed on it until [`PathFaults::restore`].
#[derive(Clone, Debug, Default)]
pub struct PathFaults {
    state: Arc<Mutex<FaultState>>,
    restored: Arc<Notify>,
}

/// What the writer must do with one encoded frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WriteVerdict {
    /// Write it as it is.
    Write,
    /// Write it with one bit flipped at this payload offset.
    Corrupt(usize),
    /// Discard it silently.
    Discard,
    /// Hold it and write it after the next frame (reordering).
    Hold,
}

impl PathFaults {
    /// No faults.
    pub fn new() -> PathFaults {
        PathFaults::default()
    }

    fn state(&self) -> MutexGuard<'_, FaultState> {
        // A panic while holding this lock can only come from a bug in this file; recover the
        // state rather than poisoning every link.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cuts the path now.
    pub fn cut(&self) {
        self.state().cut = true;
    }

    /// Cuts the path once this many more bytes have been written on it (a deterministic
    /// "mid-transfer" cut that needs no timing).
    pub fn cut_after_bytes(&self, bytes: u64) {
        let mut s = self.state();
        s.cut_after_bytes = Some(s.bytes_written + bytes);
    }

    /// Lifts a cut; the dialer reconnects.
    pub fn restore(&self) {
        {
            let mut s = self.state();
            s.cut = false;
            s.cut_after_bytes = None;
        }
        self.restored.notify_waiters();
    }

    /// Whether the path is cut.
    pub fn is_cut(&self) -> bool {
        self.state().cut
    }

    /// Delays every frame written by `delay` (0 turns it off).
    pub fn set_delay(&self, delay: Duration) {
        self.state().delay = delay;
    }

    /// Drops every `n`-th data frame (0 turns it off).
    pub fn drop_every(&self, n: u32) {
        self.state().drop_every = n;
    }

    /// Flips one payload bit in every `n`-th data frame (0 turns it off).
    pub fn corrupt_every(&self, n: u32) {
        self.state().corrupt_every = n;
    }

    /// Swaps each pair of consecutive frames.
    pub fn set_reorder(&self, on: bool) {
        self.state().reorder = on;
    }

    /// Frames corrupted so far.
    pub fn corrupted(&self) -> u64 {
        self.state().corrupted
    }

    /// Frames dropped so far.
    pub fn dropped(&self) -> u64 {
        self.state().dropped
    }

    /// Waits until the path is not cut.
    pub async fn wait_restored(&self) {
        loop {
            let notified = self.restored.notified();
            if !self.is_cut() {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn delay(&self) -> Duration {
        self.state().delay
    }

    /// Decides the fate of one frame of `wire_len` bytes with a payload of `payload_len`.
    pub(crate) fn on_write(&self, is_data: bool, wire_len: u64, payload_len: usize) -> WriteVerdict {
        let mut s = self.state();
        if let Some(limit) = s.cut_after_bytes {
            if s.bytes_written + wire_len > limit {
                s.cut = true;
                s.cut_after_bytes = None;
            }
        }
        if s.cut {
            return WriteVerdict::Discard;
        }
        s.bytes_written += wire_len;
        if is_data {
            s.data_frames += 1;
            let n = s.data_frames;
            if s.drop_every > 0 && n.is_multiple_of(s.drop_every as u64) {
                s.dropped += 1;
                return WriteVerdict::Discard;
            }
            if s.corrupt_every > 0 && n.is_multiple_of(s.corrupt_every as u64) && payload_len > 0 {
                s.corrupted += 1;
                return WriteVerdict::Corrupt((n as usize).wrapping_mul(7919) % payload_len);
            }
        }
        if s.reorder {
            WriteVerdict::Hold
        } else {
            WriteVerdict::Write
        }
    }

    /// Whether bytes read now must be discarded.
    pub(crate) fn discard_reads(&self) -> bool {
        self.state().cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_after_bytes_cuts_at_the_first_frame_past_the_limit() {
        let f = PathFaults::new();
        f.cut_after_bytes(250);
        assert_eq!(f.on_write(true, 100, 48), WriteVerdict::Write);
        assert_eq!(f.on_write(true, 100, 48), WriteVerdict::Write);
        assert_eq!(f.on_write(true, 100, 48), WriteVerdict::Discard);
        assert!(f.is_cut());
        f.restore();
        assert_eq!(f.on_write(true, 100, 48), WriteVerdict::Write);
    }

    #[test]
    fn corruption_hits_every_nth_data_frame_and_spares_control_frames() {
        let f = PathFaults::new();
        f.corrupt_every(2);
        assert_eq!(f.on_write(true, 16, 16), WriteVerdict::Write);
        assert_eq!(f.on_write(false, 16, 16), WriteVerdict::Write);
        assert!(matches!(f.on_write(true, 16, 16), WriteVerdict::Corrupt(i) if i < 16));
        assert_eq!(f.on_write(true, 16, 0), WriteVerdict::Write, "nothing to flip in an empty payload");
        assert_eq!(f.corrupted(), 1);
    }
}
