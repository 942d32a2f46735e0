//! Token-bucket rate limits, kept in this node's memory.
//!
//! Per node on purpose: limits only need to be roughly right, and sharing
//! them through PostgreSQL would put a write on every request. The load
//! balancer hashes the voter cookie to pick a node, so a voter's bucket lives
//! on one node; a per-address bucket is per node (docs/app.md, "Votes").
//!
//! Keys come from requests (anyone can mint voter ids and many addresses),
//! so the buckets are bounded: at the bound, full buckets (which hold no
//! information) are forgotten, then the least recently used until a
//! quarter is free. A forgotten key starts again with a full bucket, so
//! under such a flood the limit errs towards letting through, never towards
//! refusing everyone.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// The most keys one limiter tracks.
const MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
    /// Last taken from (refills move `updated`, not this).
    used: Instant,
}

/// Allows `per_minute` events per key per minute, with a burst of the same size.
#[derive(Debug)]
pub struct RateLimiter {
    capacity: f64,
    per_second: f64,
    max_keys: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// A limiter of `per_minute` per key.
    pub fn new(per_minute: u32) -> Self {
        Self::with_max_keys(per_minute, MAX_KEYS)
    }

    /// A limiter of `per_minute` per key tracking at most `max_keys` keys.
    pub fn with_max_keys(per_minute: u32, max_keys: usize) -> Self {
        Self {
            capacity: f64::from(per_minute),
            per_second: f64::from(per_minute) / 60.0,
            max_keys: max_keys.max(4),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// How many keys are tracked.
    pub fn len(&self) -> usize {
        self.buckets.lock().expect("rate limiter lock").len()
    }

    /// True when no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes one token for `key` at `now`; false when the key is over its limit.
    pub fn allow(&self, key: &str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if buckets.len() >= self.max_keys && !buckets.contains_key(key) {
            self.make_room(&mut buckets, now);
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: self.capacity,
            updated: now,
            used: now,
        });
        bucket.used = now;
        let tokens = refill(bucket, self.capacity, self.per_second, now);
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            true
        } else {
            bucket.tokens = tokens;
            false
        }
    }
}

impl RateLimiter {
    /// Forgets full buckets, then the least recently used, until a quarter
    /// of `max_keys` is free: one O(n) pass per max_keys / 4 new keys.
    fn make_room(&self, buckets: &mut HashMap<String, Bucket>, now: Instant) {
        let (capacity, per_second) = (self.capacity, self.per_second);
        buckets.retain(|_, bucket| refill(bucket, capacity, per_second, now) < capacity);
        let target = self.max_keys - self.max_keys / 4;
        if buckets.len() > target {
            let excess = buckets.len() - target;
            let mut used: Vec<(Instant, String)> = buckets
                .iter()
                .map(|(key, bucket)| (bucket.used, key.clone()))
                .collect();
            used.select_nth_unstable_by_key(excess, |(used, _)| *used);
            for (_, key) in &used[..excess] {
                buckets.remove(key);
            }
        }
    }
}

/// Brings `bucket` up to `now` and returns its tokens.
fn refill(bucket: &mut Bucket, capacity: f64, per_second: f64, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
    bucket.tokens = (bucket.tokens + elapsed * per_second).min(capacity);
    bucket.updated = now;
    bucket.tokens
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refusal_then_refill() {
        let limiter = RateLimiter::new(3);
        let start = Instant::now();
        assert!((0..3).all(|_| limiter.allow("a", start)));
        assert!(!limiter.allow("a", start));
        assert!(limiter.allow("b", start), "keys are independent");
        assert!(limiter.allow("a", start + Duration::from_secs(20)));
        assert!(!limiter.allow("a", start + Duration::from_secs(20)));
    }

    #[test]
    fn a_flood_of_keys_stays_bounded_and_keeps_the_busy_ones() {
        // Issue #18: buckets only used once were never full again within
        // the prune's scan, so random voter ids grew the map without end.
        let limiter = RateLimiter::with_max_keys(2, 100);
        let start = Instant::now();
        assert!(limiter.allow("abuser", start) && limiter.allow("abuser", start));
        for n in 0..10_000u64 {
            let now = start + Duration::from_millis(n);
            limiter.allow(&format!("random-{n}"), now);
            assert!(limiter.len() <= 100, "{} keys", limiter.len());
            if n % 10 == 0 {
                // Still hammering: still refused, its bucket never forgotten.
                assert!(!limiter.allow("abuser", now), "at key {n}");
            }
        }
    }
}
