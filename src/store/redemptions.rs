//! All SQL on the billing service's `promo_redemptions` table.

use sqlx::PgConnection;
use uuid::Uuid;

use super::Result;

/// Records that `customer` redeemed `code`; `false` when it already had.
pub async fn insert(conn: &mut PgConnection, customer: Uuid, code: &str) -> Result<bool> {
    let result = sqlx::query(
        "INSERT INTO promo_redemptions (customer_id, code) VALUES ($1, $2) \
         ON CONFLICT (customer_id, code) DO NOTHING",
    )
    .bind(customer)
    .bind(code)
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}
