//! All SQL on the billing service's `customers` table.

use sqlx::PgConnection;
use uuid::Uuid;

use super::Result;

pub async fn find(conn: &mut PgConnection, user_id: &str) -> Result<Option<Uuid>> {
    Ok(
        sqlx::query_scalar("SELECT id FROM customers WHERE user_id = $1")
            .bind(user_id)
            .fetch_optional(conn)
            .await?,
    )
}

/// The customer of a token subject, created as the billing service does when
/// it is missing. Safe against concurrent first requests of one subject.
pub async fn ensure(
    conn: &mut PgConnection,
    user_id: &str,
    tenant_id: &str,
    email: &str,
) -> Result<Uuid> {
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO customers (user_id, tenant_id, email) VALUES ($1, $2, $3) \
         ON CONFLICT (user_id) DO NOTHING RETURNING id",
    )
    .bind(user_id)
    .bind(tenant_id)
    .bind(email)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(id) = inserted {
        return Ok(id);
    }
    Ok(
        sqlx::query_scalar("SELECT id FROM customers WHERE user_id = $1")
            .bind(user_id)
            .fetch_one(conn)
            .await?,
    )
}
