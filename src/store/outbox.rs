//! All SQL on the operator's `voucher_audit_outbox` table.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::Result;
use crate::domain::{AuditData, AuditKind};

/// An audit record waiting to be published.
#[derive(Clone, Debug, PartialEq)]
pub struct NewAuditRecord {
    pub event_id: Uuid,
    pub code: String,
    pub kind: AuditKind,
    pub payload: serde_json::Value,
}

impl NewAuditRecord {
    /// A record with a fresh, time-ordered event id.
    pub fn new(code: impl Into<String>, kind: AuditKind, payload: serde_json::Value) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            code: code.into(),
            kind,
            payload,
        }
    }
}

/// Appends `record` in the caller's transaction, so it commits or rolls back
/// with the change it describes. Returns its position in the outbox.
pub async fn append(conn: &mut PgConnection, record: &NewAuditRecord) -> Result<i64> {
    let seq = sqlx::query_scalar(
        "INSERT INTO voucher_audit_outbox (event_id, code, kind, payload) \
         VALUES ($1, $2, $3, $4) RETURNING seq",
    )
    .bind(record.event_id)
    .bind(&record.code)
    .bind(record.kind.as_str())
    .bind(&record.payload)
    .fetch_one(conn)
    .await?;
    Ok(seq)
}

/// Appends the audit record of one change (see [`AuditData::of`]) in the
/// caller's transaction: every change of the operator's is recorded this way.
pub async fn append_audit(
    conn: &mut PgConnection,
    kind: AuditKind,
    data: &AuditData,
) -> Result<i64> {
    let payload = serde_json::to_value(data).expect("audit data serialises");
    append(conn, &NewAuditRecord::new(data.code.clone(), kind, payload)).await
}

/// A stored audit record.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct AuditRecord {
    pub seq: i64,
    pub event_id: Uuid,
    pub code: String,
    pub kind: String,
    pub occurred_at: DateTime<Utc>,
    pub payload: serde_json::Value,
    /// A global (cross-Sovereign) code's record: published where the
    /// vendor's hub gathers them.
    pub global: bool,
}

/// The oldest unpublished records, in outbox order.
pub async fn pending(conn: &mut PgConnection, limit: i64) -> Result<Vec<AuditRecord>> {
    pending_except(conn, limit, &[]).await
}

/// The oldest unpublished records of codes other than `codes` (those the
/// relay holds back this round).
pub(crate) async fn pending_except(
    conn: &mut PgConnection,
    limit: i64,
    codes: &[String],
) -> Result<Vec<AuditRecord>> {
    Ok(sqlx::query_as(
        "SELECT o.seq, o.event_id, o.code, o.kind, o.occurred_at, o.payload, \
                COALESCE((SELECT p.global_allotment FROM promo_codes p WHERE p.code = o.code), \
                         false) AS global \
           FROM voucher_audit_outbox o \
          WHERE o.published_at IS NULL AND o.code <> ALL($2) ORDER BY o.seq LIMIT $1",
    )
    .bind(limit)
    .bind(codes)
    .fetch_all(conn)
    .await?)
}

pub async fn mark_published(conn: &mut PgConnection, seqs: &[i64]) -> Result<()> {
    sqlx::query("UPDATE voucher_audit_outbox SET published_at = now() WHERE seq = ANY($1)")
        .bind(seqs)
        .execute(conn)
        .await?;
    Ok(())
}

/// Moves a record the relay cannot publish to `voucher_audit_dead_letters`,
/// with why: out of the outbox, so that the records after it go out.
pub async fn dead_letter(conn: &mut PgConnection, seq: i64, error: &str) -> Result<()> {
    sqlx::query(
        "WITH moved AS (DELETE FROM voucher_audit_outbox WHERE seq = $1 \
           RETURNING seq, event_id, code, kind, occurred_at, payload) \
         INSERT INTO voucher_audit_dead_letters (seq, event_id, code, kind, occurred_at, payload, error) \
         SELECT seq, event_id, code, kind, occurred_at, payload, $2 FROM moved",
    )
    .bind(seq)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes records published longer ago than `retention`; returns how many.
pub async fn prune(conn: &mut PgConnection, retention: std::time::Duration) -> Result<u64> {
    let result = sqlx::query(
        "DELETE FROM voucher_audit_outbox WHERE published_at < now() - make_interval(secs => $1)",
    )
    .bind(retention.as_secs_f64())
    .execute(conn)
    .await?;
    Ok(result.rows_affected())
}

/// How many records wait, and how long the oldest has waited (seconds).
pub async fn backlog(conn: &mut PgConnection) -> Result<(i64, f64)> {
    Ok(sqlx::query_as(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(occurred_at))::float8, 0) \
         FROM voucher_audit_outbox WHERE published_at IS NULL",
    )
    .fetch_one(conn)
    .await?)
}
