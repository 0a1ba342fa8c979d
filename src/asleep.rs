//! Noticing that the machine slept. The monotonic clock that timeouts run on stops while a
//! laptop or phone sleeps (Linux, Android, macOS, iOS); the wall clock does not. When the gap
//! between the two has grown since a moment, the machine slept in between, and a connection
//! from before may lead nowhere: the laptop may have woken on another network (home, then a
//! café), where a server's silence over the dead path is not noticed for a long time.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A sleep shorter than this is not noticed: the clocks drift apart slowly, and NTP may step
/// the wall clock a little.
const SLACK_MS: i64 = 2_000;

/// A moment, as the gap between the wall clock and the monotonic clock then (milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moment(i64);

impl Moment {
    /// Now. Two clock reads (vDSO on Linux: tens of nanoseconds).
    pub fn now() -> Self {
        static BASE: OnceLock<Instant> = OnceLock::new();
        let monotonic = millis(BASE.get_or_init(Instant::now).elapsed().as_millis());
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| millis(since.as_millis()));
        Self(wall - monotonic)
    }

    /// Whether the machine slept between this moment and `later`. A wall clock set back
    /// counts as no sleep.
    pub fn slept_before(self, later: Moment) -> bool {
        later.0.saturating_sub(self.0) > SLACK_MS
    }

    /// Whether the machine slept since this moment.
    pub fn slept_since(self) -> bool {
        self.slept_before(Moment::now())
    }

    /// For keeping in an atomic.
    pub fn to_raw(self) -> i64 {
        self.0
    }

    /// Back from [`Moment::to_raw`].
    pub fn from_raw(raw: i64) -> Self {
        Self(raw)
    }

    /// This moment as it looks after the machine has since slept for `slept` (for tests: the
    /// machine cannot be put to sleep in one).
    #[cfg(test)]
    pub fn before_sleeping(self, slept: std::time::Duration) -> Self {
        Self(self.0 - millis(slept.as_millis()))
    }
}

fn millis(ms: u128) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_sleep_is_the_wall_clock_running_ahead_of_the_monotonic_one() {
        let then = Moment(1_000);
        assert!(!then.slept_before(Moment(1_000)), "no time asleep");
        assert!(!then.slept_before(Moment(2_500)), "drift within the slack");
        assert!(then.slept_before(Moment(3_601_000)), "an hour asleep");
        assert!(
            !then.slept_before(Moment(-5_000_000)),
            "the wall clock set back"
        );
        let now = Moment::now();
        assert!(!now.slept_since(), "awake throughout this test");
        assert!(now.before_sleeping(Duration::from_secs(60)).slept_since());
        assert!(!now.before_sleeping(Duration::from_secs(1)).slept_since());
        assert_eq!(Moment::from_raw(now.to_raw()), now);
    }
}
