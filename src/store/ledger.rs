//! All SQL on the billing service's `credit_ledger` table.

use sqlx::PgConnection;
use uuid::Uuid;

use super::Result;

/// The ledger reason of a voucher grant, as the billing service writes it.
pub(crate) fn promo_reason(code: &str) -> String {
    format!("promo:{code}")
}

/// Appends the same grant to the ledger of each of `customers`.
pub(crate) async fn append_many(
    conn: &mut PgConnection,
    customers: &[Uuid],
    amount_omr: i32,
    reason: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO credit_ledger (customer_id, amount_omr, reason) \
         SELECT unnest($1::uuid[]), $2, $3",
    )
    .bind(customers)
    .bind(amount_omr)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// The active balance of each of `customers` that has one, by customer.
pub async fn balances(
    conn: &mut PgConnection,
    customers: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, i64>> {
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT customer_id, COALESCE(SUM(amount_omr), 0)::BIGINT FROM credit_ledger \
         WHERE customer_id = ANY($1) AND status = 'active' GROUP BY customer_id",
    )
    .bind(customers)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().collect())
}
