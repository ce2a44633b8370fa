//! All SQL on the operator's `voucher_idempotency_keys` table.

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::PgConnection;
use sqlx::types::Json;

use super::Result;

/// Deletes the keys recorded longer ago than `retention`; returns how many.
pub async fn prune(conn: &mut PgConnection, retention: std::time::Duration) -> Result<u64> {
    let result = sqlx::query(
        "DELETE FROM voucher_idempotency_keys WHERE created_at < now() - make_interval(secs => $1)",
    )
    .bind(retention.as_secs_f64())
    .execute(conn)
    .await?;
    Ok(result.rows_affected())
}

/// What an `Idempotency-Key` already stands for; `T`, the outcome recorded for it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Claimed<T> {
    /// First use: the caller decides and records the outcome in this transaction.
    New,
    /// The same request was decided before: replay its outcome.
    Replay(T),
    /// The same request was answered before by a version that recorded the
    /// answer as it rendered it (`status`, `response`): replay it as it is.
    /// Such rows leave with the retention.
    Rendered {
        status: u16,
        response: serde_json::Value,
    },
    /// The key was used with another request body.
    Mismatch,
}

/// A key's row as a claim reads it back.
type KeyRow<T> = (
    Vec<u8>,
    Option<Json<T>>,
    Option<i16>,
    Option<serde_json::Value>,
);

/// Claims `key` for `subject` and the request hash, in the caller's
/// transaction. A concurrent request with the same key waits here until the
/// first one commits, then replays its outcome.
async fn claim<T: DeserializeOwned + Send + Unpin + 'static>(
    conn: &mut PgConnection,
    subject: &str,
    key: &str,
    request_hash: &[u8],
) -> Result<Claimed<T>> {
    let inserted = sqlx::query(
        "INSERT INTO voucher_idempotency_keys (subject, key, request_hash) VALUES ($1, $2, $3) \
         ON CONFLICT (subject, key) DO NOTHING",
    )
    .bind(subject)
    .bind(key)
    .bind(request_hash)
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(Claimed::New);
    }
    let (hash, outcome, status, response): KeyRow<T> = sqlx::query_as(
        "SELECT request_hash, outcome, status, response FROM voucher_idempotency_keys \
         WHERE subject = $1 AND key = $2",
    )
    .bind(subject)
    .bind(key)
    .fetch_one(conn)
    .await?;
    if hash != request_hash {
        return Ok(Claimed::Mismatch);
    }
    Ok(match (outcome, status, response) {
        (Some(Json(outcome)), _, _) => Claimed::Replay(outcome),
        (None, Some(status), Some(response)) => Claimed::Rendered {
            status: status as u16,
            response,
        },
        // Claimed but undecided cannot be seen from another transaction:
        // the outcome commits with the claim.
        _ => Claimed::Mismatch,
    })
}

/// [`claim`] for the keys of several requests at once (`(subject, key,
/// request hash)`, no subject twice), in the caller's transaction: what each
/// key stands for, in the same order.
pub(crate) async fn claim_many<T: DeserializeOwned + Send + Unpin + 'static>(
    conn: &mut PgConnection,
    claims: &[(&str, &str, &[u8])],
) -> Result<Vec<Claimed<T>>> {
    // Rows locked in one order by every server: two groups of the same
    // subjects never wait for each other crosswise.
    let mut sorted = claims.to_vec();
    sorted.sort();
    let subjects: Vec<&str> = sorted.iter().map(|c| c.0).collect();
    let keys: Vec<&str> = sorted.iter().map(|c| c.1).collect();
    let hashes: Vec<&[u8]> = sorted.iter().map(|c| c.2).collect();
    let inserted: Vec<String> = sqlx::query_scalar(
        "INSERT INTO voucher_idempotency_keys (subject, key, request_hash) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) \
         ON CONFLICT (subject, key) DO NOTHING RETURNING subject",
    )
    .bind(&subjects)
    .bind(&keys)
    .bind(&hashes)
    .fetch_all(&mut *conn)
    .await?;
    let mut claimed = Vec::with_capacity(claims.len());
    for (subject, key, hash) in claims {
        if inserted.iter().any(|s| s == subject) {
            claimed.push(Claimed::New);
        } else {
            // A statement of its own: it sees a claim committed meanwhile.
            claimed.push(claim(conn, subject, key, hash).await?);
        }
    }
    Ok(claimed)
}

/// Records the outcomes of claimed keys: `(subject, key, outcome)`.
pub(crate) async fn answer_many<T: Serialize + Sync>(
    conn: &mut PgConnection,
    answers: &[(&str, &str, &T)],
) -> Result<()> {
    if answers.is_empty() {
        return Ok(());
    }
    let subjects: Vec<&str> = answers.iter().map(|a| a.0).collect();
    let keys: Vec<&str> = answers.iter().map(|a| a.1).collect();
    let outcomes: Vec<Json<&T>> = answers.iter().map(|a| Json(a.2)).collect();
    sqlx::query(
        "UPDATE voucher_idempotency_keys k SET outcome = a.outcome \
         FROM unnest($1::text[], $2::text[], $3::jsonb[]) AS a(subject, key, outcome) \
         WHERE k.subject = a.subject AND k.key = a.key",
    )
    .bind(&subjects)
    .bind(&keys)
    .bind(&outcomes)
    .execute(conn)
    .await?;
    Ok(())
}
