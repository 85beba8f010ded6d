//! Byte sizes on the command line: `4096`, `64KiB`, `64MiB`, `1GiB`, `64M`, `1G` — the same
//! parser scenario files use.

pub use phalanx_sim::scenario::parse_size;
