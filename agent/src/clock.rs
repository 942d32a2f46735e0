//! The agent's monotonic clock: what the round driver and the lease
//! arithmetic count in ([`Millis`] since the agent started).

use crate::ha::Millis;
use std::time::{Duration, Instant};

/// The agent's monotonic clock, in milliseconds since it started.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }

    /// Now.
    pub fn now(&self) -> Millis {
        self.millis_at(Instant::now())
    }

    /// `instant` on this clock (0 for instants before the start).
    pub fn millis_at(&self, instant: Instant) -> Millis {
        instant.saturating_duration_since(self.start).as_millis() as Millis
    }

    /// The instant `millis` on this clock stands for.
    pub fn instant_at(&self, millis: Millis) -> Instant {
        self.start + Duration::from_millis(millis)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Wall-clock seconds since the Unix epoch: for records people read and
/// schedules (backups, switchovers at a time), never for lease arithmetic.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}
