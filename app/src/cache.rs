//! A small time-to-live cache that serves stale entries when the database
//! cannot answer (degraded mode shows the last known results).

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Entries younger than `ttl` are fresh; older ones are kept as a fallback.
#[derive(Debug)]
pub struct TtlCache<K, V> {
    ttl: Duration,
    entries: Mutex<HashMap<K, (Instant, Arc<V>)>>,
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
    /// An empty cache.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
            loading: tokio::sync::Mutex::new(()),
        }
    }

    fn lookup(&self, key: &K) -> Option<(bool, Arc<V>)> {
        let entries = self.entries.lock().expect("cache lock");
        entries
            .get(key)
            .map(|(at, value)| (at.elapsed() < self.ttl, value.clone()))
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
                let mut entries = self.entries.lock().expect("cache lock");
                entries.insert(key, (Instant::now(), value.clone()));
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
        let cache: TtlCache<u8, u32> = TtlCache::new(Duration::from_secs(3600));
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
        let cache: TtlCache<u8, u32> = TtlCache::new(Duration::ZERO);
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
}
