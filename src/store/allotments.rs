//! All SQL on the operator's `voucher_global_allotments` table: a Sovereign's
//! allotment of each global code (DESIGN §11, docs/federation.md). The row is
//! never deleted (rule 4); the billing row's `max_redemptions` and `active`
//! follow its `local_cap` in the same transaction, and the database's guard
//! holds every writer to it (migration `…_global_allotments.sql`).

use sqlx::PgConnection;
use sqlx::types::Json;

use super::{Operation, Result, Store, StoreError};
use crate::domain::Code;
use crate::domain::allotment::Local;

impl Store {
    /// Marks `code`'s billing row global and gives it a state of its own:
    /// share 0, not yet synced — an inactive row until the hub grants units.
    /// Idempotent: a row that has its state keeps it (a re-created Voucher).
    pub async fn register_global(&self, code: &Code, hub_uid: &str) -> Result<()> {
        let run = async {
            let mut tx = self.pool().begin().await?;
            sqlx::query(
                "INSERT INTO voucher_global_allotments (code, hub_uid, state) VALUES ($1, $2, $3) \
                 ON CONFLICT (code) DO NOTHING",
            )
            .bind(code.as_str())
            .bind(hub_uid)
            .bind(Json(Local::default()))
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE promo_codes SET global_allotment = true WHERE code = $1")
                .bind(code.as_str())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, StoreError>(())
        };
        run.await
            .map_err(|e| e.during(Operation::Allotment, Some(code)))
    }

    /// Every global code of this Sovereign, with the hub Voucher it is bound to.
    pub async fn global_codes(&self) -> Result<Vec<(Code, String)>> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT code, hub_uid FROM voucher_global_allotments ORDER BY code")
                .fetch_all(self.pool())
                .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(code, uid)| Some((Code::parse(&code).ok()?, uid)))
            .collect())
    }

    /// This database's identity: its system identifier and timeline. A
    /// restore from a backup or a failover to a replica changes it, and the
    /// allotment then waits for a sync with the hub (rule 5).
    pub async fn database_identity(&self) -> Result<String> {
        let identity: String = sqlx::query_scalar(
            "SELECT s.system_identifier::text || ':' || c.timeline_id::text \
               FROM pg_control_system() s, pg_control_checkpoint() c",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(identity)
    }
}

/// Reads `code`'s state under its row lock (the transaction's until it ends).
pub async fn lock(conn: &mut PgConnection, code: &Code) -> Result<Option<Local>> {
    let state: Option<Json<Local>> = sqlx::query_scalar(
        "SELECT state FROM voucher_global_allotments WHERE code = $1 FOR UPDATE",
    )
    .bind(code.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(state.map(|Json(local)| local))
}

/// Writes `code`'s state, and the billing row's cap and switch derived from
/// it for this database (the guard derives them too, whoever writes).
pub async fn save(
    conn: &mut PgConnection,
    code: &Code,
    local: &Local,
    identity: &str,
) -> Result<()> {
    let local_cap = i64::try_from(local.local_cap(identity)).unwrap_or(i64::MAX);
    sqlx::query(
        "UPDATE voucher_global_allotments SET state = $2, local_cap = $3, updated_at = now() WHERE code = $1",
    )
    .bind(code.as_str())
    .bind(Json(local))
    .bind(local_cap)
    .execute(&mut *conn)
    .await?;
    // The row is live while units are held (the hub's deactivation comes back as a return
    // to 0); the guard sets max_redemptions from local_cap, and keeps a 0 inactive.
    sqlx::query("UPDATE promo_codes SET global_allotment = true, active = $2 WHERE code = $1")
        .bind(code.as_str())
        .bind(local_cap > 0)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
