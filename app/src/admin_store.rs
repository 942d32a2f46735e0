//! The queries only the admin interface makes: poll editing, statistics,
//! the degraded-mode switch and admin sessions. All go to the primary.

use crate::db::{Database, DbError};
use crate::validate::NewPoll;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};
use std::time::Duration;

/// A poll's line on the dashboard.
#[derive(Debug, Clone)]
pub struct PollStats {
    /// Poll id.
    pub id: i64,
    /// Its question.
    pub title: String,
    /// Accepting votes.
    pub is_open: bool,
    /// Votes counted (one per voter).
    pub votes: i64,
    /// Vote submissions received (retries of one key count once).
    pub submissions: i64,
    /// Page views flushed so far.
    pub views: i64,
}

/// Every poll with its counts, newest first.
pub async fn poll_stats(db: &Database) -> Result<Vec<PollStats>, DbError> {
    let rows = db
        .write_with_retry(|client| async move {
            client
                .query(
                    "SELECT p.id, p.title, p.is_open,
                        (SELECT count(*) FROM votes v WHERE v.poll_id = p.id),
                        (SELECT count(*) FROM vote_requests r WHERE r.poll_id = p.id),
                        coalesce((SELECT views FROM poll_views w WHERE w.poll_id = p.id), 0)
                     FROM polls p ORDER BY p.id DESC",
                    &[],
                )
                .await
        })
        .await?
        .value;
    Ok(rows
        .iter()
        .map(|row| PollStats {
            id: row.get(0),
            title: row.get(1),
            is_open: row.get(2),
            votes: row.get(3),
            submissions: row.get(4),
            views: row.get(5),
        })
        .collect())
}

/// Creates a poll with its options; returns its id.
pub async fn create_poll(db: &Database, poll: &NewPoll) -> Result<i64, DbError> {
    let attempted = db
        .write_with_retry(|mut client| async move {
            let tx = client.transaction().await?;
            let row = tx
                .query_one(
                    "INSERT INTO polls (title, description, allow_revote) VALUES ($1, $2, $3) RETURNING id",
                    &[&poll.title, &poll.description, &poll.allow_revote],
                )
                .await?;
            let id: i64 = row.get(0);
            for (position, label) in poll.options.iter().enumerate() {
                let position = position as i32;
                tx.execute(
                    "INSERT INTO options (poll_id, label, position) VALUES ($1, $2, $3)",
                    &[&id, label, &position],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(id)
        })
        .await?;
    Ok(attempted.value)
}

/// Changes a poll's texts and re-vote rule; false when it does not exist.
pub async fn update_poll(
    db: &Database,
    id: i64,
    title: &str,
    description: &str,
    allow_revote: bool,
) -> Result<bool, DbError> {
    let changed = db
        .write_with_retry(|client| async move {
            client
                .execute(
                    "UPDATE polls SET title = $2, description = $3, allow_revote = $4, updated_at = now() WHERE id = $1",
                    &[&id, &title, &description, &allow_revote],
                )
                .await
        })
        .await?;
    Ok(changed.value == 1)
}

/// Opens or closes a poll; false when it does not exist.
pub async fn set_open(db: &Database, id: i64, open: bool) -> Result<bool, DbError> {
    let changed = db
        .write_with_retry(|client| async move {
            client
                .execute(
                    "UPDATE polls SET is_open = $2, updated_at = now() WHERE id = $1",
                    &[&id, &open],
                )
                .await
        })
        .await?;
    Ok(changed.value == 1)
}

/// Removes an abusive option: hidden, not votable, and its votes no longer
/// shown. False when the option is not part of the poll.
pub async fn remove_option(db: &Database, poll: i64, option: i64) -> Result<bool, DbError> {
    let changed = db
        .write_with_retry(|client| async move {
            client
                .execute(
                    "UPDATE options SET removed = true WHERE poll_id = $1 AND id = $2",
                    &[&poll, &option],
                )
                .await
        })
        .await?;
    Ok(changed.value == 1)
}

/// The operator's degraded-mode switch, shared by every app node.
pub async fn set_degraded(db: &Database, on: bool) -> Result<(), DbError> {
    let value = if on { "on" } else { "off" };
    db.write_with_retry(|client| async move {
        client
            .execute(
                "INSERT INTO app_settings (key, value) VALUES ('degraded', $1)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[&value],
            )
            .await
    })
    .await?;
    Ok(())
}

fn token_hash(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))
}

/// Stores a new session; the cookie holds `token`, the database only its hash.
pub async fn create_session(db: &Database, token: &str, ttl: Duration) -> Result<(), DbError> {
    let hash = token_hash(token);
    let seconds = ttl.as_secs_f64();
    db.write_with_retry(|client| {
        let hash = hash.clone();
        async move {
            client
                .execute(
                    "INSERT INTO admin_sessions (token_hash, expires_at)
                     VALUES ($1, now() + make_interval(secs => $2))",
                    &[&hash, &seconds],
                )
                .await
        }
    })
    .await?;
    Ok(())
}

/// True when `token` names a live session.
pub async fn session_valid(db: &Database, token: &str) -> Result<bool, DbError> {
    let hash = token_hash(token);
    let found = db
        .write_with_retry(|client| {
            let hash = hash.clone();
            async move {
                client
                    .query_opt(
                        "SELECT 1 FROM admin_sessions WHERE token_hash = $1 AND expires_at > now()",
                        &[&hash],
                    )
                    .await
            }
        })
        .await?;
    Ok(found.value.is_some())
}

/// Ends a session (logout).
pub async fn delete_session(db: &Database, token: &str) -> Result<(), DbError> {
    let hash = token_hash(token);
    db.write_with_retry(|client| {
        let hash = hash.clone();
        async move {
            client
                .execute("DELETE FROM admin_sessions WHERE token_hash = $1", &[&hash])
                .await
        }
    })
    .await?;
    Ok(())
}
