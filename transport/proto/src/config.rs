//! Transport knobs. Every limit lives here so tests can shrink them and reach big-input paths
//! with small inputs.

use std::time::Duration;

/// Limits and timers of one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportConfig {
    /// Largest payload of one data frame; messages are split into chunks of this size.
    pub chunk_bytes: usize,
    /// Largest payload the decoder accepts (a peer sending more is cut off).
    pub max_payload_bytes: u32,
    /// Bytes a path may have sent and not yet acknowledged. Paths get new frames only as
    /// acknowledgements free room, so each path's share follows its measured delivery rate.
    pub path_window_bytes: u64,
    /// Frames a session may have outstanding beyond the cumulative ack; also the receiver's
    /// reorder-buffer bound.
    pub session_window_frames: u64,
    /// Interval between heartbeats on each link.
    pub heartbeat_interval: Duration,
    /// A link that delivers nothing for this long is declared dead and its frames move on.
    pub link_timeout: Duration,
    /// A peer with no route (or no acknowledgement progress) for this long is reported as
    /// [`crate::Event::PeerUnreachable`].
    pub unreachable_after: Duration,
    /// Lower bound of the per-path retransmission timeout.
    pub min_rto: Duration,
    /// Send an ack after this many data frames without one (at most a quarter of
    /// `session_window_frames` is used), or after two once they carry an eighth of
    /// `path_window_bytes`, whichever comes first ([`TransportConfig::ack_due`]). Each ack
    /// costs both ranks a system call and a wake-up, so small messages are acknowledged in
    /// batches (or by the `ack_delay` timer), while a stream of large frames is acknowledged
    /// every two frames, long before its sender's window fills.
    pub ack_every_frames: u32,
    /// Send an ack at the latest this long after unacknowledged data arrived.
    pub ack_delay: Duration,
    /// Selective-ack ranges per ack frame.
    pub max_sack_ranges: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            chunk_bytes: 1 << 20,
            max_payload_bytes: 16 << 20,
            path_window_bytes: 8 << 20,
            session_window_frames: 1024,
            heartbeat_interval: Duration::from_millis(100),
            link_timeout: Duration::from_millis(1500),
            unreachable_after: Duration::from_secs(5),
            min_rto: Duration::from_millis(400),
            ack_every_frames: 64,
            ack_delay: Duration::from_micros(500),
            max_sack_ranges: 32,
        }
    }
}

impl TransportConfig {
    /// Whether a receiver acknowledges now, holding `frames` data frames of `bytes` payload
    /// bytes without an ack (see [`TransportConfig::ack_every_frames`]): after
    /// `ack_every_frames` frames (at most a quarter of `session_window_frames`), or after two
    /// frames once they carry an eighth of `path_window_bytes` — so a stream of large frames
    /// is acknowledged every two frames (1 MiB frames, 8 MiB window), long before its sender's
    /// window fills. (The endpoint also acknowledges at once the last frame of a message of at
    /// least [`crate::PROMPT_ACK_MESSAGE`] bytes.)
    pub fn ack_due(&self, frames: u32, bytes: u64) -> bool {
        let frames_cap = u32::try_from(self.session_window_frames / 4).unwrap_or(u32::MAX).max(1);
        frames >= self.ack_every_frames.min(frames_cap).max(1) || (frames >= 2 && bytes >= self.path_window_bytes / 8)
    }

    /// Checks the knobs are consistent; the error names the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.chunk_bytes == 0 {
            return Err("chunk_bytes must be at least 1".into());
        }
        if self.chunk_bytes as u64 > self.max_payload_bytes as u64 {
            return Err(format!(
                "chunk_bytes ({}) exceeds max_payload_bytes ({})",
                self.chunk_bytes, self.max_payload_bytes
            ));
        }
        if self.session_window_frames == 0 || self.path_window_bytes == 0 {
            return Err("windows must be non-zero".into());
        }
        if self.heartbeat_interval.is_zero() || self.link_timeout <= self.heartbeat_interval {
            return Err("link_timeout must exceed a non-zero heartbeat_interval".into());
        }
        if self.ack_every_frames == 0 || self.max_sack_ranges == 0 {
            return Err("ack_every_frames and max_sack_ranges must be non-zero".into());
        }
        Ok(())
    }
}
