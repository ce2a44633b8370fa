//! All SQL on the operator's `voucher_global_allotments` table: a Sovereign's
//! allotment of each global code (DESIGN §11, docs/federation.md). The row is
//! never deleted (rule 4); the billing row's `max_redemptions` and `active`
//! follow its `local_cap` in the same transaction, and the database's guard
//! holds every writer to it (migration `…_global_allotments.sql`).

use sqlx::PgConnection;
use sqlx::types::Json;

use super::sync::Global;
use super::{Operation, Result, Store, StoreError};
use crate::domain::Code;
use crate::domain::allotment::Local;

impl Store {
    /// Marks `code`'s billing row global and gives it a state of its own:
    /// share 0, not yet synced — an inactive row until the hub grants units.
    /// Idempotent: a row that has its state keeps it (a re-created Voucher).
    pub async fn register_global(&self, code: &Code, hub_uid: &str) -> Result<()> {
        self.register_global_as(code, hub_uid, false).await
    }

    /// [`Store::register_global`], once per customer on any Sovereign or not.
    pub async fn register_global_as(
        &self,
        code: &Code,
        hub_uid: &str,
        per_customer_global: bool,
    ) -> Result<()> {
        let run = async {
            let mut tx = self.pool().begin().await?;
            let global = Global {
                hub_uid,
                offered: true,
                return_asked: false,
                per_customer_global,
            };
            bind(&mut tx, code, &global).await?;
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

    /// This database's identity: its system identifier, timeline and
    /// incarnation (a token in an unlogged table, made here when missing). A
    /// restore from a backup of any kind, a failover or a crash of Postgres
    /// changes it, and the allotment then waits for a sync with the hub (rule 5).
    pub async fn database_identity(&self) -> Result<String> {
        let mut conn = self.pool().acquire().await?;
        sqlx::query(
            "INSERT INTO voucher_database_incarnation (token) VALUES (gen_random_uuid()::text) \
             ON CONFLICT (only_row) DO NOTHING",
        )
        .execute(&mut *conn)
        .await?;
        let identity: String = sqlx::query_scalar("SELECT voucher_operator_database_identity()")
            .fetch_one(&mut *conn)
            .await?;
        Ok(identity)
    }
}

/// A global code's state as this Sovereign holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub local: Local,
    /// Offered here now (its Voucher exists, the vendor's terms make it
    /// redeemable): the allotment loop returns the unused share of a code
    /// that is not.
    pub offered: bool,
    /// The hub asks for returns (a cap lowered below the units granted).
    pub return_asked: bool,
}

impl Store {
    /// `code`'s state, if it is a global code of this Sovereign.
    pub async fn held(&self, code: &Code) -> Result<Option<Held>> {
        let mut conn = self.pool().acquire().await?;
        read(&mut conn, code, "")
            .await
            .map_err(|e| e.during(Operation::Allotment, Some(code)))
    }
}

impl Store {
    /// Offers `code` no more (its Voucher is being deleted): the allotment
    /// loop returns its unused share. `None` when it is no global code.
    pub async fn withdraw(&self, code: &Code) -> Result<Option<Held>> {
        let run = async {
            let mut tx = self.pool().begin().await?;
            let held = lock(&mut tx, code).await?;
            sqlx::query(
                "UPDATE voucher_global_allotments SET offered = false WHERE code = $1 AND offered",
            )
            .bind(code.as_str())
            .execute(&mut *tx)
            .await?;
            // The row follows at once: nothing more is redeemed here.
            sqlx::query(
                "UPDATE promo_codes SET active = false WHERE code = $1 AND active AND global_allotment",
            )
            .bind(code.as_str())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<_, StoreError>(held)
        };
        run.await
            .map_err(|e| e.during(Operation::Allotment, Some(code)))
    }
}

async fn read(conn: &mut PgConnection, code: &Code, lock: &'static str) -> Result<Option<Held>> {
    let sql = format!(
        "SELECT state, offered, return_asked FROM voucher_global_allotments WHERE code = $1{lock}"
    );
    let row: Option<(Json<Local>, bool, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(code.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.map(|(Json(local), offered, return_asked)| Held {
        local,
        offered,
        return_asked,
    }))
}

/// Reads `code`'s state under its row lock (the transaction's until it ends).
pub async fn lock(conn: &mut PgConnection, code: &Code) -> Result<Option<Held>> {
    read(conn, code, " FOR UPDATE").await
}

/// The terms a global code's billing row carries: the vendor's (`hub`), with
/// the cap and switch its share here sets — what the guard sets too, so that
/// drift correction never fights the allotment. Takes the allotment's row
/// lock: a refill round's change waits for this transaction, and the other
/// way round.
pub(crate) async fn row_terms(
    conn: &mut PgConnection,
    code: &Code,
    hub: &crate::domain::Terms,
    offered: bool,
) -> Result<crate::domain::Terms> {
    let cap: Option<i64> = sqlx::query_scalar(
        "SELECT CASE WHEN synced_identity = voucher_operator_database_identity() \
                THEN local_cap ELSE 0 END \
           FROM voucher_global_allotments WHERE code = $1 FOR UPDATE",
    )
    .bind(code.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    let cap = cap.unwrap_or_default();
    Ok(crate::domain::Terms {
        active: offered && cap > 0,
        max_redemptions: i32::try_from(cap.max(1)).unwrap_or(i32::MAX),
        ..hub.clone()
    })
}

/// Binds `code` to the hub Voucher `hub_uid` and says whether it is offered:
/// the state created (share 0, not yet synced) when it has none — a
/// re-created Voucher finds the one it had (rule 4) — and the billing row
/// marked global, which the guard keeps.
pub(crate) async fn bind(conn: &mut PgConnection, code: &Code, global: &Global<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO voucher_global_allotments \
             (code, hub_uid, state, offered, return_asked, per_customer_global) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (code) DO UPDATE SET hub_uid = EXCLUDED.hub_uid, \
             offered = EXCLUDED.offered, return_asked = EXCLUDED.return_asked, \
             per_customer_global = EXCLUDED.per_customer_global \
         WHERE (voucher_global_allotments.hub_uid, voucher_global_allotments.offered, \
                voucher_global_allotments.return_asked, \
                voucher_global_allotments.per_customer_global) \
               IS DISTINCT FROM (EXCLUDED.hub_uid, EXCLUDED.offered, EXCLUDED.return_asked, \
                EXCLUDED.per_customer_global)",
    )
    .bind(code.as_str())
    .bind(global.hub_uid)
    .bind(Json(Local::default()))
    .bind(global.offered)
    .bind(global.return_asked)
    .bind(global.per_customer_global)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE promo_codes SET global_allotment = true WHERE code = $1 AND NOT global_allotment",
    )
    .bind(code.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Whether `code`'s row is a global one (`None`: no row). Only a Global
/// Voucher binds such a row, and it binds no other.
pub(crate) async fn is_global(conn: &mut PgConnection, code: &Code) -> Result<Option<bool>> {
    Ok(
        sqlx::query_scalar("SELECT global_allotment FROM promo_codes WHERE code = $1")
            .bind(code.as_str())
            .fetch_optional(&mut *conn)
            .await?,
    )
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
        "UPDATE voucher_global_allotments SET state = $2, local_cap = $3, synced_identity = $4, \
         updated_at = now() WHERE code = $1",
    )
    .bind(code.as_str())
    .bind(Json(local))
    .bind(local_cap)
    .bind(&local.synced_identity)
    .execute(&mut *conn)
    .await?;
    // The row is live while units are held and the code is offered (a code not offered
    // returns its share); the guard sets max_redemptions from local_cap, and keeps a 0
    // inactive. Written only when one of them changes: every write wakes the row's Voucher.
    sqlx::query(
        "UPDATE promo_codes p SET global_allotment = true, active = ($2 AND a.offered) \
           FROM voucher_global_allotments a \
          WHERE p.code = $1 AND a.code = p.code \
            AND (p.active IS DISTINCT FROM ($2 AND a.offered) OR NOT p.global_allotment \
                 OR p.max_redemptions <> GREATEST($3, 1))",
    )
    .bind(code.as_str())
    .bind(local_cap > 0)
    .bind(local_cap)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
