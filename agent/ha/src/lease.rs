//! Lease arithmetic shared by the agent's keepalive task, its fencing
//! watchdog and fence keeper, and the simulator's models of them: how often
//! to renew, how long one renewal may take, what an answered renewal
//! proves, and when to fence. One place, so the simulator checks the numbers the
//! agent uses (docs/architecture.md, "Lease timings").

use super::model::Millis;
use jai_proto::DynamicConfig;
use std::time::Duration;

/// The longest one renewal attempt may take before it is abandoned and
/// retried: a healthy etcd answers a keepalive in milliseconds (it does not
/// go through raft), so a slow one is stuck on a member without a leader.
pub const KEEPALIVE_ATTEMPT: Duration = Duration::from_millis(500);

/// Pause before retrying a failed renewal: an etcd leader election takes a
/// second or two and the deadline is only `ttl` away.
pub const KEEPALIVE_RETRY: Duration = Duration::from_millis(100);

/// How often the fencing watchdog compares the lease deadline with the clock.
pub const FENCE_CHECK_EVERY: Duration = Duration::from_millis(50);

/// Renewal period: ten times per TTL, at least every `loop_wait`, so a dead
/// leader's lease has little left to run.
pub fn renew_every(config: &DynamicConfig) -> Duration {
    config.loop_wait.min(config.ttl / 10)
}

/// Bound of one renewal attempt under `config`.
pub fn attempt_timeout(config: &DynamicConfig) -> Duration {
    KEEPALIVE_ATTEMPT.min(config.retry_timeout / 2)
}

/// The TTL to ask etcd for: whole seconds, at least etcd's minimum of 2 s.
pub fn grant_ttl_secs(config: &DynamicConfig) -> i64 {
    config.ttl.as_secs().max(2) as i64
}

/// What an answered renewal (or grant) proves: the lease cannot expire
/// before the instant the request was *sent* plus the TTL etcd answered.
pub fn confirmed_until(sent: Millis, ttl_secs: i64) -> Millis {
    sent + ttl_secs.max(0) as Millis * 1000
}

/// The fencing point: from then on a primary guarded with `margin` must be
/// stopped, its lease being no longer confirmed beyond the margin
/// (`valid_until − margin`; at once without a lease). The fence keeper
/// waits for exactly this point; the watchdog sees it at its next tick.
pub fn fence_point(valid_until: Option<Millis>, margin: Duration) -> Millis {
    valid_until.map_or(0, |until| {
        until.saturating_sub(margin.as_millis() as Millis)
    })
}

/// The first watchdog tick (a multiple of [`FENCE_CHECK_EVERY`] on the
/// agent's clock) at or after `now` at which a primary guarded with `margin`
/// must be fenced: the [`fence_point`] has come.
pub fn fence_tick(valid_until: Option<Millis>, margin: Duration, now: Millis) -> Millis {
    let every = FENCE_CHECK_EVERY.as_millis() as Millis;
    fence_point(valid_until, margin).max(now).div_ceil(every) * every
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_renew_every_400ms_and_fence_at_the_margin() {
        let config = DynamicConfig::default();
        assert_eq!(renew_every(&config), config.ttl / 10);
        assert_eq!(confirmed_until(1_000, 4), 5_000);
        // 5 000 − 500 ms margin, on a 50 ms tick.
        assert_eq!(
            fence_tick(Some(5_000), Duration::from_millis(500), 1_000),
            4_500
        );
        assert_eq!(fence_tick(None, Duration::from_millis(500), 1_234), 1_250);
        assert_eq!(fence_point(Some(5_000), Duration::from_millis(500)), 4_500);
        assert_eq!(fence_point(None, Duration::from_millis(500)), 0);
    }
}
