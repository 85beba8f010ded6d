//! Counters readable from code: per link and per endpoint.

/// What happened on one link (one path to one peer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Wire bytes handed to the link (headers included).
    pub bytes_sent: u64,
    /// Wire bytes received and decoded on the link.
    pub bytes_received: u64,
    /// Frames handed to the link.
    pub frames_sent: u64,
    /// Valid frames received.
    pub frames_received: u64,
    /// Data frames first sent on this link that had to be sent again (lost, corrupted, or the
    /// link died): charged to this link.
    pub retransmits: u64,
    /// Frames that arrived on this link with a bad checksum.
    pub checksum_failures: u64,
}

/// Totals for an endpoint. Survives link churn (dead links' counts stay in here).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounters {
    /// Wire bytes sent over all links.
    pub bytes_sent: u64,
    /// Wire bytes received over all links.
    pub bytes_received: u64,
    /// Frames sent.
    pub frames_sent: u64,
    /// Frames received.
    pub frames_received: u64,
    /// Data frames sent again.
    pub retransmits: u64,
    /// Links declared dead while they carried unacknowledged frames, which moved elsewhere.
    pub failovers: u64,
    /// Payload bytes this endpoint forwarded for other ranks (it acted as relay).
    pub relayed_bytes: u64,
    /// Payload bytes of this endpoint's own frames sent through a relay.
    pub relayed_out_bytes: u64,
    /// Frames received with a bad checksum.
    pub checksum_failures: u64,
    /// Duplicate data frames suppressed.
    pub duplicates: u64,
    /// Frames refused because their epoch was below the fence.
    pub stale_epoch_refused: u64,
    /// Frames dropped because no route existed to forward them.
    pub unroutable_dropped: u64,
    /// Application messages delivered.
    pub messages_delivered: u64,
    /// Application payload bytes delivered.
    pub payload_bytes_delivered: u64,
}
