//! Versioned, idempotent schema migrations, run by every app node on start.
//!
//! Each migration runs in its own transaction under a transaction-scoped
//! advisory lock, so two nodes starting together apply it once; applied
//! versions are recorded in `jai_schema`.
//!
//! Growth: `votes` has one row per (poll, voter) — its primary key — and an
//! index on (poll_id, option_id) so that a poll's results are an index-only
//! count. At tens of millions of rows, `votes` and `vote_requests` can be
//! hash-partitioned by `poll_id` without changing a query (every query names
//! the poll); `vote_requests` is pruned after a week by the app itself
//! (docs/app.md).

use crate::db::{Database, DbError};

/// Advisory lock key taken while migrating ("jai-app" in ASCII).
const MIGRATION_LOCK: i64 = 0x6a_6169_2d61_7070;

/// (version, name, SQL). Never edit an applied migration: add a new one.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "polls, options, votes, idempotency keys, views",
        r#"
CREATE TABLE polls (
    id           bigserial PRIMARY KEY,
    title        text NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
    description  text NOT NULL DEFAULT '' CHECK (length(description) <= 2000),
    is_open      boolean NOT NULL DEFAULT true,
    allow_revote boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE options (
    id       bigserial PRIMARY KEY,
    poll_id  bigint NOT NULL REFERENCES polls (id),
    label    text NOT NULL CHECK (length(label) BETWEEN 1 AND 100),
    position integer NOT NULL,
    removed  boolean NOT NULL DEFAULT false,
    UNIQUE (poll_id, id)
);
CREATE TABLE votes (
    poll_id    bigint NOT NULL,
    voter      text NOT NULL,
    option_id  bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (poll_id, voter),
    FOREIGN KEY (poll_id, option_id) REFERENCES options (poll_id, id)
);
CREATE INDEX votes_poll_option ON votes (poll_id, option_id);
CREATE TABLE vote_requests (
    voter           text NOT NULL,
    idempotency_key text NOT NULL,
    poll_id         bigint NOT NULL,
    option_id       bigint NOT NULL,
    outcome         text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (voter, idempotency_key)
);
CREATE INDEX vote_requests_created ON vote_requests USING brin (created_at);
CREATE TABLE poll_views (
    poll_id bigint PRIMARY KEY REFERENCES polls (id),
    views   bigint NOT NULL DEFAULT 0
);
CREATE TABLE view_batches (
    batch_id   text PRIMARY KEY,
    flushed_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE app_settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE admin_sessions (
    token_hash text PRIMARY KEY,
    expires_at timestamptz NOT NULL
);

-- One vote submission, exactly once per (voter, idempotency key): a retried
-- request returns the outcome of the first. One round trip, one transaction.
CREATE FUNCTION jai_vote(p_voter text, p_key text, p_poll bigint, p_option bigint)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_prior   text;
    v_open    boolean;
    v_revote  boolean;
    v_current bigint;
    v_result  text;
BEGIN
    INSERT INTO vote_requests (voter, idempotency_key, poll_id, option_id, outcome)
    VALUES (p_voter, p_key, p_poll, p_option, 'pending')
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        SELECT outcome INTO v_prior FROM vote_requests
        WHERE voter = p_voter AND idempotency_key = p_key;
        RETURN v_prior;
    END IF;
    SELECT is_open, allow_revote INTO v_open, v_revote FROM polls WHERE id = p_poll;
    IF NOT FOUND THEN
        v_result := 'unknown_poll';
    ELSIF NOT v_open THEN
        v_result := 'closed';
    ELSIF NOT EXISTS (SELECT 1 FROM options
                      WHERE id = p_option AND poll_id = p_poll AND NOT removed) THEN
        v_result := 'unknown_option';
    ELSE
        -- Two first votes of one voter may race: the loser of the insert
        -- waits for the winner, then sees its row and decides again.
        LOOP
            SELECT option_id INTO v_current FROM votes
            WHERE poll_id = p_poll AND voter = p_voter FOR UPDATE;
            IF NOT FOUND THEN
                INSERT INTO votes (poll_id, voter, option_id) VALUES (p_poll, p_voter, p_option)
                ON CONFLICT (poll_id, voter) DO NOTHING;
                IF FOUND THEN
                    v_result := 'recorded';
                    EXIT;
                END IF;
            ELSIF v_current = p_option THEN
                v_result := 'unchanged';
                EXIT;
            ELSIF v_revote THEN
                UPDATE votes SET option_id = p_option, updated_at = now()
                WHERE poll_id = p_poll AND voter = p_voter;
                v_result := 'moved';
                EXIT;
            ELSE
                v_result := 'already_voted';
                EXIT;
            END IF;
        END LOOP;
    END IF;
    UPDATE vote_requests SET outcome = v_result
    WHERE voter = p_voter AND idempotency_key = p_key;
    RETURN v_result;
END
$$;
"#,
    ),
    (
        2,
        "jai_vote refuses an idempotency key reused for another poll or option",
        r#"
-- A key is one submission of one choice: (voter, key) -> (poll, option).
-- Sent again with another poll or option, it is answered 'key_reused' and
-- nothing is stored; before, the first submission's outcome came back as if
-- the new choice had been counted. CREATE OR REPLACE keeps the signature, so
-- the prepared statement of every running node stays valid.
CREATE OR REPLACE FUNCTION jai_vote(p_voter text, p_key text, p_poll bigint, p_option bigint)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_prior        text;
    v_prior_poll   bigint;
    v_prior_option bigint;
    v_open         boolean;
    v_revote       boolean;
    v_current      bigint;
    v_result       text;
BEGIN
    INSERT INTO vote_requests (voter, idempotency_key, poll_id, option_id, outcome)
    VALUES (p_voter, p_key, p_poll, p_option, 'pending')
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        SELECT outcome, poll_id, option_id INTO v_prior, v_prior_poll, v_prior_option
        FROM vote_requests
        WHERE voter = p_voter AND idempotency_key = p_key;
        IF NOT FOUND OR v_prior_poll <> p_poll OR v_prior_option <> p_option THEN
            RETURN 'key_reused';
        END IF;
        RETURN v_prior;
    END IF;
    SELECT is_open, allow_revote INTO v_open, v_revote FROM polls WHERE id = p_poll;
    IF NOT FOUND THEN
        v_result := 'unknown_poll';
    ELSIF NOT v_open THEN
        v_result := 'closed';
    ELSIF NOT EXISTS (SELECT 1 FROM options
                      WHERE id = p_option AND poll_id = p_poll AND NOT removed) THEN
        v_result := 'unknown_option';
    ELSE
        -- Two first votes of one voter may race: the loser of the insert
        -- waits for the winner, then sees its row and decides again.
        LOOP
            SELECT option_id INTO v_current FROM votes
            WHERE poll_id = p_poll AND voter = p_voter FOR UPDATE;
            IF NOT FOUND THEN
                INSERT INTO votes (poll_id, voter, option_id) VALUES (p_poll, p_voter, p_option)
                ON CONFLICT (poll_id, voter) DO NOTHING;
                IF FOUND THEN
                    v_result := 'recorded';
                    EXIT;
                END IF;
            ELSIF v_current = p_option THEN
                v_result := 'unchanged';
                EXIT;
            ELSIF v_revote THEN
                UPDATE votes SET option_id = p_option, updated_at = now()
                WHERE poll_id = p_poll AND voter = p_voter;
                v_result := 'moved';
                EXIT;
            ELSE
                v_result := 'already_voted';
                EXIT;
            END IF;
        END LOOP;
    END IF;
    UPDATE vote_requests SET outcome = v_result
    WHERE voter = p_voter AND idempotency_key = p_key;
    RETURN v_result;
END
$$;
"#,
    ),
];

/// Applies the migrations this database lacks; returns how many ran.
pub async fn migrate(db: &Database) -> Result<usize, DbError> {
    let mut applied = 0;
    for &(version, name, sql) in MIGRATIONS {
        let ran = db
            .write_with_retry(|mut client| async move {
                let tx = client.transaction().await?;
                tx.batch_execute("SET LOCAL client_min_messages = warning")
                    .await?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                    .await?;
                tx.batch_execute(
                    "CREATE TABLE IF NOT EXISTS jai_schema (
                         version integer PRIMARY KEY,
                         name text NOT NULL,
                         applied_at timestamptz NOT NULL DEFAULT now())",
                )
                .await?;
                let done = tx
                    .query_opt("SELECT 1 FROM jai_schema WHERE version = $1", &[&version])
                    .await?
                    .is_some();
                if done {
                    return Ok(false);
                }
                tx.batch_execute(sql).await?;
                tx.execute(
                    "INSERT INTO jai_schema (version, name) VALUES ($1, $2)",
                    &[&version, &name],
                )
                .await?;
                tx.commit().await?;
                Ok(true)
            })
            .await
            .map_err(|error| match error {
                DbError::Permanent(message) => {
                    DbError::Permanent(format!("migration {version} ({name}): {message}"))
                }
                other => other,
            })?
            .value;
        if ran {
            tracing::info!(version, name, "schema migration applied");
            applied += 1;
        }
    }
    Ok(applied)
}
