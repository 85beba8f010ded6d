//! Newtypes for every identifier that crosses the wire or names a fault.

use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($inner:ty), $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_type!(
    /// A rank: one process of the job. Unique within a cluster.
    RankId(u32),
    "rank"
);
id_type!(
    /// A membership epoch. Monotonic; frames carry the sender's epoch so that stale ranks can
    /// be fenced.
    Epoch(u64),
    "epoch"
);
id_type!(
    /// One path to a peer (a TCP connection, a QUIC connection, an in-memory pipe). Assigned by
    /// the driver, never reused within one endpoint's lifetime.
    LinkId(u64),
    "link"
);
id_type!(
    /// A logical channel (tag) between two ranks. Messages are delivered in order per channel.
    ChannelId(u32),
    "ch"
);
