//! The queries on polls, options and votes.

use crate::db::{Attempted, Database, DbError};
use deadpool_postgres::Object;

/// A line of the poll list.
#[derive(Debug, Clone)]
pub struct PollSummary {
    /// Poll id.
    pub id: i64,
    /// Its question.
    pub title: String,
    /// Accepting votes.
    pub is_open: bool,
}

/// One answer of a poll.
#[derive(Debug, Clone)]
pub struct PollOption {
    /// Option id.
    pub id: i64,
    /// What the voter picks.
    pub label: String,
    /// Removed by an admin (abusive): hidden and not votable.
    pub removed: bool,
}

/// A poll with its options.
#[derive(Debug, Clone)]
pub struct Poll {
    /// Poll id.
    pub id: i64,
    /// The question.
    pub title: String,
    /// Optional longer text.
    pub description: String,
    /// Accepting votes.
    pub is_open: bool,
    /// A voter may move their vote.
    pub allow_revote: bool,
    /// All options, removed ones included, in display order.
    pub options: Vec<PollOption>,
}

impl Poll {
    /// The options voters see.
    pub fn visible_options(&self) -> impl Iterator<Item = &PollOption> {
        self.options.iter().filter(|option| !option.removed)
    }
}

/// A poll's counts.
#[derive(Debug, Clone)]
pub struct Results {
    /// The poll.
    pub poll: Poll,
    /// Votes per visible option, in display order.
    pub counts: Vec<(PollOption, i64)>,
    /// Sum of `counts`.
    pub total: i64,
}

/// What a vote submission did (the same for every retry of one key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoteOutcome {
    /// First vote of this voter in this poll.
    Recorded,
    /// The voter's vote moved to another option.
    Moved,
    /// The voter had already picked this option.
    Unchanged,
    /// The poll does not allow moving a vote.
    AlreadyVoted,
    /// The poll is closed.
    Closed,
    /// No such poll.
    UnknownPoll,
    /// The option is not (or no longer) part of this poll.
    UnknownOption,
    /// The idempotency key was first sent with another poll or option:
    /// nothing was stored.
    KeyReused,
}

impl VoteOutcome {
    fn parse(text: &str) -> Result<Self, DbError> {
        Ok(match text {
            "recorded" => Self::Recorded,
            "moved" => Self::Moved,
            "unchanged" => Self::Unchanged,
            "already_voted" => Self::AlreadyVoted,
            "closed" => Self::Closed,
            "unknown_poll" => Self::UnknownPoll,
            "unknown_option" => Self::UnknownOption,
            "key_reused" => Self::KeyReused,
            other => {
                return Err(DbError::Permanent(format!(
                    "unexpected vote outcome {other:?}"
                )))
            }
        })
    }

    /// True when the vote counts (now or already).
    pub fn accepted(self) -> bool {
        matches!(self, Self::Recorded | Self::Moved | Self::Unchanged)
    }
}

/// The SQL of a vote: also what `make bench-app` gives pgbench.
pub const VOTE_SQL: &str = "SELECT jai_vote($1, $2, $3, $4)";

/// Records a vote, retrying through a failover with the same idempotency key.
pub async fn vote(
    db: &Database,
    voter: &str,
    key: &str,
    poll: i64,
    option: i64,
) -> Result<Attempted<VoteOutcome>, DbError> {
    let attempted = db
        .vote_with_retry(|shared| async move {
            let row = shared
                .client
                .query_one(&shared.statement, &[&voter, &key, &poll, &option])
                .await?;
            Ok(row.get::<_, String>(0))
        })
        .await?;
    Ok(Attempted {
        value: VoteOutcome::parse(&attempted.value)?,
        attempts: attempted.attempts,
    })
}

/// Open polls, newest first (at most 200).
pub async fn open_polls(db: &Database) -> Result<Vec<PollSummary>, DbError> {
    db.read_once(|client| async move {
        let rows = client
            .query(
                "SELECT id, title, is_open FROM polls WHERE is_open ORDER BY id DESC LIMIT 200",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| PollSummary {
                id: row.get(0),
                title: row.get(1),
                is_open: row.get(2),
            })
            .collect())
    })
    .await
}

async fn fetch_poll(client: &Object, id: i64) -> Result<Option<Poll>, tokio_postgres::Error> {
    let Some(row) = client
        .query_opt(
            "SELECT title, description, is_open, allow_revote FROM polls WHERE id = $1",
            &[&id],
        )
        .await?
    else {
        return Ok(None);
    };
    let options = client
        .query(
            "SELECT id, label, removed FROM options WHERE poll_id = $1 ORDER BY position, id",
            &[&id],
        )
        .await?
        .iter()
        .map(|option| PollOption {
            id: option.get(0),
            label: option.get(1),
            removed: option.get(2),
        })
        .collect();
    Ok(Some(Poll {
        id,
        title: row.get(0),
        description: row.get(1),
        is_open: row.get(2),
        allow_revote: row.get(3),
        options,
    }))
}

/// A poll and its options, `None` when it does not exist.
pub async fn poll(db: &Database, id: i64) -> Result<Option<Poll>, DbError> {
    db.read_once(|client| async move { fetch_poll(&client, id).await })
        .await
}

/// A poll read on the primary, for the admin who just changed it (a replica
/// may not have the change yet).
pub async fn poll_on_primary(db: &Database, id: i64) -> Result<Option<Poll>, DbError> {
    let attempted = db
        .write_with_retry(|client| async move { fetch_poll(&client, id).await })
        .await?;
    Ok(attempted.value)
}

/// A poll's results, `None` when it does not exist.
pub async fn results(db: &Database, id: i64) -> Result<Option<Results>, DbError> {
    db.read_once(|client| async move {
        let Some(poll) = fetch_poll(&client, id).await? else {
            return Ok(None);
        };
        let rows = client
            .query(
                "SELECT option_id, count(*) FROM votes WHERE poll_id = $1 GROUP BY option_id",
                &[&id],
            )
            .await?;
        let count_of = |option: i64| {
            rows.iter()
                .find(|row| row.get::<_, i64>(0) == option)
                .map(|row| row.get::<_, i64>(1))
                .unwrap_or(0)
        };
        let counts: Vec<(PollOption, i64)> = poll
            .visible_options()
            .map(|option| (option.clone(), count_of(option.id)))
            .collect();
        let total = counts.iter().map(|(_, count)| count).sum();
        Ok(Some(Results {
            poll,
            counts,
            total,
        }))
    })
    .await
}

/// Adds a batch of page views once: a retried batch id is ignored.
pub async fn add_views(
    db: &Database,
    batch_id: &str,
    polls: &[i64],
    views: &[i64],
) -> Result<(), DbError> {
    db.write_with_retry(|client| async move {
        client
            .execute(
                "WITH batch AS (
                     INSERT INTO view_batches (batch_id) VALUES ($1)
                     ON CONFLICT DO NOTHING RETURNING 1)
                 INSERT INTO poll_views (poll_id, views)
                 SELECT p, v FROM unnest($2::bigint[], $3::bigint[]) AS t (p, v)
                 WHERE EXISTS (SELECT 1 FROM batch) AND EXISTS (SELECT 1 FROM polls WHERE id = p)
                 ON CONFLICT (poll_id) DO UPDATE SET views = poll_views.views + EXCLUDED.views",
                &[&batch_id, &polls, &views],
            )
            .await
    })
    .await?;
    Ok(())
}

/// Forgets idempotency keys and view batch ids older than a week: a retry
/// never comes that late.
pub async fn prune(db: &Database) -> Result<(), DbError> {
    db.write_with_retry(|client| async move {
        client
            .batch_execute(
                "DELETE FROM vote_requests WHERE created_at < now() - interval '7 days';
                 DELETE FROM view_batches WHERE flushed_at < now() - interval '7 days';
                 DELETE FROM admin_sessions WHERE expires_at < now();",
            )
            .await
    })
    .await?;
    Ok(())
}
