//! Page views are counted in memory and written in batches.
//!
//! A view costs a hash-map increment; every `views.flush_interval` the
//! counts go to PostgreSQL in one statement. Each batch carries an id that
//! the database records with it, so a batch retried after an unclear commit
//! is added once. Loss window: the views counted since the last successful
//! flush, i.e. at most one flush interval on a crash (SIGKILL); on SIGTERM the
//! app flushes before it exits. While no primary is reachable the pending
//! batch is kept and retried, so views are delayed, not lost.

use crate::db::Database;
use crate::signing::random_token;
use std::collections::HashMap;
use std::sync::Mutex;

/// Counts views per poll until the next flush.
#[derive(Debug, Default)]
pub struct ViewCounter {
    counts: Mutex<HashMap<i64, i64>>,
    /// A batch taken but not yet confirmed written, retried with its id.
    in_flight: tokio::sync::Mutex<Option<Batch>>,
}

/// Views taken out of the counter, with the id that makes them idempotent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Unique per batch.
    pub id: String,
    /// Poll ids.
    pub polls: Vec<i64>,
    /// Views of each poll.
    pub views: Vec<i64>,
}

impl ViewCounter {
    /// Counts one view of `poll`.
    pub fn record(&self, poll: i64) {
        *self
            .counts
            .lock()
            .expect("view lock")
            .entry(poll)
            .or_default() += 1;
    }

    /// Takes the counted views as a new batch (None when there are none).
    pub fn take(&self) -> Option<Batch> {
        let counts = std::mem::take(&mut *self.counts.lock().expect("view lock"));
        if counts.is_empty() {
            return None;
        }
        let (polls, views) = counts.into_iter().unzip();
        Some(Batch {
            id: random_token(),
            polls,
            views,
        })
    }

    /// Writes the pending batch, then a new one. Keeps a batch that fails
    /// for the next flush; returns the number of views written.
    pub async fn flush(&self, db: &Database) -> Result<i64, crate::db::DbError> {
        let mut in_flight = self.in_flight.lock().await;
        let mut written = 0;
        // The pending batch first, then what was counted meanwhile: at most
        // two writes, so a flush ends even under a steady stream of views.
        for _ in 0..2 {
            if in_flight.is_none() {
                *in_flight = self.take();
            }
            let Some(batch) = in_flight.as_ref() else {
                break;
            };
            crate::store::add_views(db, &batch.id, &batch.polls, &batch.views).await?;
            written += batch.views.iter().sum::<i64>();
            *in_flight = None;
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_are_summed_per_poll_and_taken_once() {
        let counter = ViewCounter::default();
        for poll in [1, 2, 1, 1] {
            counter.record(poll);
        }
        let batch = counter.take().unwrap();
        let mut pairs: Vec<(i64, i64)> = batch
            .polls
            .iter()
            .copied()
            .zip(batch.views.iter().copied())
            .collect();
        pairs.sort();
        assert_eq!(pairs, [(1, 3), (2, 1)]);
        assert_eq!(counter.take(), None);
    }
}
