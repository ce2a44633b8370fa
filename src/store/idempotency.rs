//! All SQL on the operator's `voucher_idempotency_keys` table.

use sqlx::PgConnection;

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

/// What an `Idempotency-Key` already stands for.
#[derive(Clone, Debug, PartialEq)]
pub enum Claimed {
    /// First use: the caller answers and records the answer in this transaction.
    New,
    /// The same request was answered before: replay this answer.
    Replay {
        status: u16,
        response: serde_json::Value,
    },
    /// The key was used with another request body.
    Mismatch,
}

/// Claims `key` for `subject` and the request hash, in the caller's
/// transaction. A concurrent request with the same key waits here until the
/// first one commits, then replays its answer.
pub async fn claim(
    conn: &mut PgConnection,
    subject: &str,
    key: &str,
    request_hash: &[u8],
) -> Result<Claimed> {
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
    let (hash, status, response): (Vec<u8>, Option<i16>, Option<serde_json::Value>) = sqlx::query_as(
        "SELECT request_hash, status, response FROM voucher_idempotency_keys WHERE subject = $1 AND key = $2",
    )
    .bind(subject)
    .bind(key)
    .fetch_one(conn)
    .await?;
    if hash != request_hash {
        return Ok(Claimed::Mismatch);
    }
    Ok(match (status, response) {
        (Some(status), Some(response)) => Claimed::Replay {
            status: status as u16,
            response,
        },
        // Claimed but unanswered cannot be seen from another transaction:
        // the answer commits with the claim.
        _ => Claimed::Mismatch,
    })
}

/// Records the answer to a claimed key.
pub async fn answer(
    conn: &mut PgConnection,
    subject: &str,
    key: &str,
    status: u16,
    response: &serde_json::Value,
) -> Result<()> {
    sqlx::query("UPDATE voucher_idempotency_keys SET status = $3, response = $4 WHERE subject = $1 AND key = $2")
        .bind(subject)
        .bind(key)
        .bind(status as i16)
        .bind(response)
        .execute(conn)
        .await?;
    Ok(())
}
