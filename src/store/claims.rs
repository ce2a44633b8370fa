//! The local intents of once-per-customer-anywhere redemptions (`perCustomer:
//! Global`, DESIGN §11 rule 8): written before the hub is asked, moved under
//! the intent's row lock — by the redemption (`claimed`, then `done`) or by
//! recovery (`aborted`), never both — and their claims deleted at the hub
//! until it acknowledges. See `federation::claimer` for the protocol's I/O.

use std::time::Duration;

use sqlx::PgConnection;
use uuid::Uuid;

use super::{Operation, Result, Store, StoreError};
use crate::domain::Code;

/// A claim to delete at the hub: its intent, code and claimant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unheld {
    pub intent: Uuid,
    pub code: String,
    pub claimant: String,
}

impl Store {
    /// Writes a pending intent for `subject`'s redemption of `code`, known to
    /// the hub as `claimant`; committed before the hub is asked.
    pub async fn open_intent(
        &self,
        intent: Uuid,
        code: &Code,
        subject: &str,
        claimant: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO voucher_global_claims (intent, code, subject, claimant) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(intent)
        .bind(code.as_str())
        .bind(subject)
        .bind(claimant)
        .execute(self.pool())
        .await
        .map_err(|e| StoreError::from(e).during(Operation::Claim, Some(code)))?;
        Ok(())
    }

    /// The hub said another intent holds the customer: final.
    pub async fn refuse_intent(&self, intent: Uuid) -> Result<()> {
        self.set_intent(intent, "refused", "pending")
            .await
            .map(|_| ())
    }

    /// An intent still pending — its redemption granted nothing, failed, or
    /// never heard the hub — aborted under its row lock: its claim is to be
    /// deleted. `Some`: the claim to delete (aborted now or before, and not
    /// acknowledged).
    pub async fn abort_intent(&self, intent: Uuid) -> Result<Option<Unheld>> {
        self.set_intent(intent, "aborted", "pending").await?;
        let unheld: Option<(Uuid, String, String)> = sqlx::query_as(
            "SELECT intent, code, claimant FROM voucher_global_claims \
              WHERE intent = $1 AND state IN ('aborted', 'released') AND NOT acknowledged",
        )
        .bind(intent)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| StoreError::from(e).during(Operation::Claim, None))?;
        Ok(unheld.map(|(intent, code, claimant)| Unheld {
            intent,
            code,
            claimant,
        }))
    }

    async fn set_intent(&self, intent: Uuid, to: &str, from: &str) -> Result<bool> {
        let moved = sqlx::query(
            "UPDATE voucher_global_claims SET state = $2, updated_at = now() \
              WHERE intent = $1 AND state = $3",
        )
        .bind(intent)
        .bind(to)
        .bind(from)
        .execute(self.pool())
        .await
        .map_err(|e| StoreError::from(e).during(Operation::Claim, None))?;
        Ok(moved.rows_affected() == 1)
    }

    /// Recovery's first step: pending intents older than `after` aborted,
    /// each under its row lock — one a redemption holds is skipped (it
    /// settles itself); one it will take later finds it aborted and refuses.
    pub async fn abort_stale_intents(&self, after: Duration) -> Result<u64> {
        let aborted = sqlx::query(
            "UPDATE voucher_global_claims SET state = 'aborted', updated_at = now() \
              WHERE intent IN (SELECT intent FROM voucher_global_claims \
                                WHERE state = 'pending' \
                                  AND created_at < now() - make_interval(secs => $1) \
                                  FOR UPDATE SKIP LOCKED)",
        )
        .bind(after.as_secs_f64())
        .execute(self.pool())
        .await
        .map_err(|e| StoreError::from(e).during(Operation::Claim, None))?;
        Ok(aborted.rows_affected())
    }

    /// Claims to delete at the hub (aborted or released, not acknowledged),
    /// the oldest first.
    pub async fn unheld_claims(&self, limit: i64) -> Result<Vec<Unheld>> {
        let rows: Vec<(Uuid, String, String)> = sqlx::query_as(
            "SELECT intent, code, claimant FROM voucher_global_claims \
              WHERE state IN ('aborted', 'released') AND NOT acknowledged \
              ORDER BY created_at LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(|e| StoreError::from(e).during(Operation::Claim, None))?;
        Ok(rows
            .into_iter()
            .map(|(intent, code, claimant)| Unheld {
                intent,
                code,
                claimant,
            })
            .collect())
    }

    /// The hub acknowledged the delete of the intent's claim.
    pub async fn acknowledge_unheld(&self, intent: Uuid) -> Result<()> {
        sqlx::query(
            "UPDATE voucher_global_claims SET acknowledged = true, updated_at = now() \
              WHERE intent = $1 AND state IN ('aborted', 'released')",
        )
        .bind(intent)
        .execute(self.pool())
        .await
        .map_err(|e| StoreError::from(e).during(Operation::Claim, None))?;
        Ok(())
    }
}

/// The redemption's hold on its intent, in its transaction: `pending` →
/// `claimed` under the row lock (the guard admits the redemption's insert
/// only then). `false`: recovery aborted it first — nothing may be granted.
pub(crate) async fn hold(tx: &mut PgConnection, intent: Uuid) -> Result<bool> {
    let held = sqlx::query(
        "UPDATE voucher_global_claims SET state = 'claimed', updated_at = now() \
          WHERE intent = $1 AND state = 'pending'",
    )
    .bind(intent)
    .execute(&mut *tx)
    .await?;
    Ok(held.rows_affected() == 1)
}

/// The redemption's end, in its transaction: `done` when it granted, else
/// `aborted` (its claim then deleted).
pub(crate) async fn settle(tx: &mut PgConnection, intent: Uuid, granted: bool) -> Result<()> {
    sqlx::query(
        "UPDATE voucher_global_claims SET state = $2, updated_at = now() \
          WHERE intent = $1 AND state = 'claimed'",
    )
    .bind(intent)
    .bind(if granted { "done" } else { "aborted" })
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A reversal frees the customer anywhere: their done intent of `code`
/// released, its claim deleted at the hub by recovery.
pub(crate) async fn release(tx: &mut PgConnection, code: &Code, subject: &str) -> Result<()> {
    sqlx::query(
        "UPDATE voucher_global_claims SET state = 'released', acknowledged = false, \
                updated_at = now() \
          WHERE code = $1 AND subject = $2 AND state = 'done'",
    )
    .bind(code.as_str())
    .bind(subject)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
