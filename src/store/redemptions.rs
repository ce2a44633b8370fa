//! All SQL on the billing service's `promo_redemptions` table.

use sqlx::PgConnection;
use uuid::Uuid;

use super::Result;

/// When `customer` redeemed `code`, and the credit the ledger granted for it.
pub(crate) async fn grant_of(
    conn: &mut PgConnection,
    customer: Uuid,
    code: &str,
) -> Result<Option<(chrono::DateTime<chrono::Utc>, Option<i32>)>> {
    Ok(sqlx::query_as(
        "SELECT r.created_at, (SELECT l.amount_omr FROM credit_ledger l \
           WHERE l.customer_id = r.customer_id AND l.reason = 'promo:' || r.code \
           ORDER BY l.created_at LIMIT 1) \
         FROM promo_redemptions r WHERE r.customer_id = $1 AND r.code = $2",
    )
    .bind(customer)
    .bind(code)
    .fetch_optional(conn)
    .await?)
}

/// [`grant_of`] for the customer of a token subject: whether it redeemed
/// `code` before, without creating the customer.
pub(crate) async fn grant_of_subject(
    conn: &mut PgConnection,
    subject: &str,
    code: &str,
) -> Result<Option<(chrono::DateTime<chrono::Utc>, Option<i32>)>> {
    Ok(sqlx::query_as(
        "SELECT r.created_at, (SELECT l.amount_omr FROM credit_ledger l \
           WHERE l.customer_id = r.customer_id AND l.reason = 'promo:' || r.code \
           ORDER BY l.created_at LIMIT 1) \
         FROM customers c JOIN promo_redemptions r ON r.customer_id = c.id \
         WHERE c.user_id = $1 AND r.code = $2",
    )
    .bind(subject)
    .bind(code)
    .fetch_optional(conn)
    .await?)
}

/// Records a redemption of one code for each of `customers` (one per customer
/// and code): the customers recorded now (the others had redeemed it before).
pub(crate) async fn insert_many(
    conn: &mut PgConnection,
    customers: &[Uuid],
    code: &str,
) -> Result<std::collections::HashSet<Uuid>> {
    // Rows locked in one order by every server: two groups holding the same
    // customers never wait for each other crosswise (a deadlock Postgres
    // would break only after a second).
    let mut sorted = customers.to_vec();
    sorted.sort();
    let inserted: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO promo_redemptions (customer_id, code) SELECT unnest($1::uuid[]), $2 \
         ON CONFLICT (customer_id, code) DO NOTHING RETURNING customer_id",
    )
    .bind(&sorted)
    .bind(code)
    .fetch_all(conn)
    .await?;
    Ok(inserted.into_iter().collect())
}
