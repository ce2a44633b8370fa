//! Reversing a redemption (DESIGN §10, Voucherify's rollback): the credit
//! clawed back by a compensating ledger entry, or the discount grant ended;
//! the redemption row moved to the operator's history, so the slot is free
//! and the customer may redeem again; the counter one lower; audited — in one
//! transaction under the code's lock. Counter = live redemption rows =
//! unreversed ledger grants + unreversed discount grants, before and after.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{Operation, Result, Store, StoreError, ledger, lock_code, outbox, promo_codes};
use crate::domain::{Actor, AuditData, AuditKind, Code, Facts};

/// What a reversal came to.
#[derive(Debug, PartialEq)]
pub enum RedemptionReversal {
    /// Reversed: the answer.
    Reversed(Value),
    /// This customer holds no redemption of the code.
    NotFound,
    /// The credit is partly spent: the customer's active balance no longer covers it.
    BalanceShort { balance: i64, credit: i32 },
}

/// The ledger reason of a clawed-back grant.
fn reversal_reason(code: &str) -> String {
    format!("promo-reversal:{code}")
}

impl Store {
    /// Reverses the redemption of `code` by the customer of `user_id`.
    pub async fn reverse_redemption(
        &self,
        code: &Code,
        user_id: &str,
        reason: &str,
        actor: &Actor,
    ) -> Result<RedemptionReversal> {
        let run = async {
            let mut tx = self.pool().begin().await?;
            let reversal = steps(&mut tx, code, user_id, (reason, actor)).await?;
            match reversal {
                RedemptionReversal::Reversed(_) => tx.commit().await?,
                _ => tx.rollback().await?,
            }
            Ok(reversal)
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::ReverseRedemption, Some(code)))
    }
}

async fn steps(
    tx: &mut PgConnection,
    code: &Code,
    user_id: &str,
    (reason, actor): (&str, &Actor),
) -> Result<RedemptionReversal> {
    lock_code(tx, code).await?;
    // The customer's checkout lock too: no order takes the grant this ends meanwhile.
    let customer = super::checkout::customer(tx, user_id).await?;
    let before = promo_codes::find_for_update(tx, code).await?;
    let (Some(before), Some(customer)) = (before, customer) else {
        return Ok(RedemptionReversal::NotFound);
    };
    let redeemed_at: Option<DateTime<Utc>> = sqlx::query_scalar(
        "DELETE FROM promo_redemptions WHERE customer_id = $1 AND code = $2 RETURNING created_at",
    )
    .bind(customer)
    .bind(code.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(redeemed_at) = redeemed_at else {
        return Ok(RedemptionReversal::NotFound);
    };
    // Once per customer anywhere: the customer is free on every Sovereign again.
    super::claims::release(tx, code, user_id).await?;
    let grant: Option<Uuid> = sqlx::query_scalar(
        "UPDATE voucher_discount_grants SET ended_at = now() \
         WHERE customer_id = $1 AND code = $2 AND ended_at IS NULL RETURNING grant_id",
    )
    .bind(customer)
    .bind(code.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let credit = match grant {
        Some(_) => None,
        None => match claw_back(tx, customer, code).await? {
            Ok(credit) => credit,
            Err(short) => return Ok(short),
        },
    };
    let reversed_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO voucher_redemption_history \
           (customer_id, code, redeemed_at, reversed_by, reason, credit_omr, grant_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING reversed_at",
    )
    .bind(customer)
    .bind(code.as_str())
    .bind(redeemed_at)
    .bind(actor.to_string())
    .bind(reason)
    .bind(credit)
    .bind(grant)
    .fetch_one(&mut *tx)
    .await?;
    let after = promo_codes::uncount_redemption(tx, code).await?;
    let kind = AuditKind::RedemptionReversed;
    let facts = Facts {
        customer: Some(user_id),
        ..Facts::new(code.as_str(), actor)
    };
    let data = AuditData::of(kind, &facts, Some(before), after);
    outbox::append_audit(tx, kind, &data).await?;
    Ok(RedemptionReversal::Reversed(json!({
        "code": code.as_str(),
        "user_id": user_id,
        "reason": reason,
        "redeemed_at": redeemed_at,
        "reversed_at": reversed_at,
        "credit_omr": credit,
        "grant_id": grant,
    })))
}

/// The customer's (latest) credit for `code` clawed back by a compensating entry, if
/// the active balance still covers it: `Ok(Some(credit))`, `Ok(None)` for a
/// redemption that granted no credit, `Err` when the balance is short.
async fn claw_back(
    tx: &mut PgConnection,
    customer: Uuid,
    code: &Code,
) -> Result<std::result::Result<Option<i32>, RedemptionReversal>> {
    let credit: Option<i32> = sqlx::query_scalar(
        "SELECT amount_omr FROM credit_ledger WHERE customer_id = $1 AND reason = $2 \
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(customer)
    .bind(ledger::promo_reason(code.as_str()))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(credit) = credit else {
        return Ok(Ok(None));
    };
    let balance = ledger::balances(tx, &[customer])
        .await?
        .get(&customer)
        .copied()
        .unwrap_or_default();
    if balance < i64::from(credit) {
        return Ok(Err(RedemptionReversal::BalanceShort { balance, credit }));
    }
    ledger::append_many(tx, &[customer], -credit, &reversal_reason(code.as_str())).await?;
    Ok(Ok(Some(credit)))
}
