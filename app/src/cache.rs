//! A small time-to-live cache that serves stale entries when the database
//! cannot answer (degraded mode shows the last known results).
//!
//! Keys come from requests (a poll id in the URL, which may not exist and
//! is then cached as "none"), so the number of entries is bounded: at the
//! bound, the quarter of the entries used least recently is dropped.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One cached value.
#[derive(Debug)]
struct Entry<V> {
    loaded: Instant,
    used: Instant,
    value: Arc<V>,
}

/// Entries younger than `ttl` are fresh; older ones are kept as a fallback,
/// at most `max_entries` in all.
#[derive(Debug)]
pub struct TtlCache<K, V> {
    ttl: Duration,
    max_entries: usize,
    entries: Mutex<HashMap<K, Entry<V>>>,
    /// One load at a time, so a expiring entry under load costs one query.
    loading: tokio::sync::Mutex<()>,
}

/// A value and whether it is past its time to live.
#[derive(Debug)]
pub struct Cached<V> {
    /// The value.
    pub value: Arc<V>,
    /// True when served because a reload failed or is under way.
    pub stale: bool,
}

impl<K: Eq + Hash + Clone, V> TtlCache<K, V> {
    /// An empty cache of at most `max_entries` (at least 4).
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        Self {
            ttl,
            max_entries: max_entries.max(4),
            entries: Mutex::new(HashMap::new()),
            loading: tokio::sync::Mutex::new(()),
        }
    }

    /// How many entries are held.
    pub fn len(&self) -> usize {
        self.entries.lock().expect("cache lock").len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lookup(&self, key: &K) -> Option<(bool, Arc<V>)> {
        let mut entries = self.entries.lock().expect("cache lock");
        entries.get_mut(key).map(|entry| {
            entry.used = Instant::now();
            (entry.loaded.elapsed() < self.ttl, entry.value.clone())
        })
    }

    fn store(&self, key: K, value: Arc<V>) {
        let mut entries = self.entries.lock().expect("cache lock");
        if entries.len() >= self.max_entries && !entries.contains_key(&key) {
            // Drop the least recently used quarter: one O(n) pass per
            // max_entries / 4 new keys.
            let mut used: Vec<(Instant, K)> = entries
                .iter()
                .map(|(key, entry)| (entry.used, key.clone()))
                .collect();
            let cut = self.max_entries / 4;
            used.select_nth_unstable_by_key(cut, |(used, _)| *used);
            for (_, key) in &used[..cut] {
                entries.remove(key);
            }
        }
        let now = Instant::now();
        entries.insert(
            key,
            Entry {
                loaded: now,
                used: now,
                value,
            },
        );
    }

    /// Forgets `key` (after a change this node made).
    pub fn invalidate(&self, key: &K) {
        self.entries.lock().expect("cache lock").remove(key);
    }

    /// The fresh value, else a newly loaded one, else the stale one if the
    /// load fails or another load is under way.
    pub async fn get_or_load<E, F, Fut>(&self, key: K, load: F) -> Result<Cached<V>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let stale = match self.lookup(&key) {
            Some((true, value)) => {
                return Ok(Cached {
                    value,
                    stale: false,
                })
            }
            Some((false, value)) => Some(value),
            None => None,
        };
        let _guard = match (&stale, self.loading.try_lock()) {
            (_, Ok(guard)) => guard,
            (Some(value), Err(_)) => {
                return Ok(Cached {
                    value: value.clone(),
                    stale: false,
                })
            }
            (None, Err(_)) => self.loading.lock().await,
        };
        if let Some((true, value)) = self.lookup(&key) {
            return Ok(Cached {
                value,
                stale: false,
            });
        }
        match load().await {
            Ok(value) => {
                let value = Arc::new(value);
                self.store(key, value.clone());
                Ok(Cached {
                    value,
                    stale: false,
                })
            }
            Err(error) => match stale {
                Some(value) => Ok(Cached { value, stale: true }),
                None => Err(error),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fresh_values_are_not_reloaded() {
        let cache: TtlCache<u8, u32> = TtlCache::new(Duration::from_secs(3600), 100);
        let first = cache.get_or_load(1, || async { Ok::<_, ()>(10) }).await;
        assert_eq!(*first.unwrap().value, 10);
        let again = cache.get_or_load(1, || async { Ok::<_, ()>(11) }).await;
        assert_eq!(*again.unwrap().value, 10, "fresh entry reused");
        cache.invalidate(&1);
        let reloaded = cache.get_or_load(1, || async { Ok::<_, ()>(12) }).await;
        assert_eq!(*reloaded.unwrap().value, 12);
    }

    #[tokio::test]
    async fn stale_values_survive_failed_reloads() {
        // A zero time to live makes every stored entry stale at once.
        let cache: TtlCache<u8, u32> = TtlCache::new(Duration::ZERO, 100);
        let first = cache.get_or_load(1, || async { Ok::<_, ()>(10) }).await;
        assert_eq!(*first.unwrap().value, 10);
        let failed = cache.get_or_load(1, || async { Err::<u32, _>(()) }).await;
        let failed = failed.unwrap();
        assert_eq!((*failed.value, failed.stale), (10, true));
        let missing = cache
            .get_or_load(2, || async { Err::<u32, _>("down") })
            .await;
        assert_eq!(missing.unwrap_err(), "down");
    }

    #[tokio::test]
    async fn random_keys_cannot_grow_the_cache_past_its_bound() {
        // Issue #18: every random poll id was kept as "no such poll" forever.
        let cache: TtlCache<i64, Option<u32>> = TtlCache::new(Duration::from_secs(3600), 40);
        let popular = cache
            .get_or_load(0, || async { Ok::<_, ()>(Some(1)) })
            .await;
        assert_eq!(*popular.unwrap().value, Some(1));
        for id in 1..=10_000 {
            cache
                .get_or_load(id, || async { Ok::<_, ()>(None) })
                .await
                .unwrap();
            assert!(cache.len() <= 40, "{} entries", cache.len());
            if id % 5 == 0 {
                // A poll people keep reading stays cached.
                let again = cache
                    .get_or_load(0, || async { Err::<Option<u32>, _>(()) })
                    .await;
                assert_eq!(
                    *again.unwrap().value,
                    Some(1),
                    "the popular entry was dropped"
                );
            }
        }
    }
}
