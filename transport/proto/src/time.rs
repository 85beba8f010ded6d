//! Protocol time: a plain nanosecond count chosen by the driver.
//!
//! No code in this crate reads a clock. The tokio driver passes nanoseconds since it started;
//! the simulator passes virtual nanoseconds. Both are the same type, so traces hash the same on
//! every machine.

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point in protocol time, in nanoseconds since an origin the driver picks.
///
/// Promise: the driver never passes a smaller `Instant` to a state machine than one it passed
/// before (time never goes back).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(pub u64);

impl Instant {
    /// The origin.
    pub const ZERO: Instant = Instant(0);
    /// A time later than any deadline a state machine will arm.
    pub const FAR_FUTURE: Instant = Instant(u64::MAX);

    /// Nanoseconds since the origin.
    pub fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, rhs: Duration) -> Instant {
        let ns = u64::try_from(rhs.as_nanos()).unwrap_or(u64::MAX);
        Instant(self.0.saturating_add(ns))
    }
}

impl Sub<Duration> for Instant {
    type Output = Instant;
    fn sub(self, rhs: Duration) -> Instant {
        let ns = u64::try_from(rhs.as_nanos()).unwrap_or(u64::MAX);
        Instant(self.0.saturating_sub(ns))
    }
}

impl std::fmt::Display for Instant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.6}s", self.0 as f64 / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instant_arithmetic_saturates_instead_of_wrapping() {
        assert_eq!(Instant(5) - Duration::from_nanos(10), Instant(0));
        assert_eq!(Instant::FAR_FUTURE + Duration::from_secs(1), Instant::FAR_FUTURE);
        assert_eq!(Instant(10).saturating_since(Instant(3)), Duration::from_nanos(7));
        assert_eq!(Instant(3).saturating_since(Instant(10)), Duration::ZERO);
    }
}
