//! All SQL on the operator's `voucher_audit_outbox` table.

use sqlx::PgConnection;
use uuid::Uuid;

use super::Result;
use crate::domain::AuditKind;

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
