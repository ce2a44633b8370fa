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

/// The customers of `user_ids` that exist, by user id.
pub async fn find_many(
    conn: &mut PgConnection,
    user_ids: &[&str],
) -> Result<std::collections::HashMap<String, Uuid>> {
    let rows: Vec<(String, Uuid)> =
        sqlx::query_as("SELECT user_id, id FROM customers WHERE user_id = ANY($1)")
            .bind(user_ids)
            .fetch_all(conn)
            .await?;
    Ok(rows.into_iter().collect())
}

/// [`ensure`] for several new customers `(user id, tenant, email)`: their ids, by user id.
pub async fn ensure_many(
    conn: &mut PgConnection,
    customers: &[(&str, &str, &str)],
) -> Result<std::collections::HashMap<String, Uuid>> {
    // Rows locked in one order by every server (see `redemptions::insert_many`).
    let mut sorted = customers.to_vec();
    sorted.sort();
    let users: Vec<&str> = sorted.iter().map(|c| c.0).collect();
    let tenants: Vec<&str> = sorted.iter().map(|c| c.1).collect();
    let emails: Vec<&str> = sorted.iter().map(|c| c.2).collect();
    let mut ids: std::collections::HashMap<String, Uuid> = sqlx::query_as(
        "INSERT INTO customers (user_id, tenant_id, email) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) \
         ON CONFLICT (user_id) DO NOTHING RETURNING user_id, id",
    )
    .bind(&users)
    .bind(&tenants)
    .bind(&emails)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect::<Vec<(String, Uuid)>>()
    .into_iter()
    .collect();
    // Created concurrently by another request: a statement of its own sees them.
    let raced: Vec<&str> = users
        .iter()
        .copied()
        .filter(|u| !ids.contains_key(*u))
        .collect();
    if !raced.is_empty() {
        ids.extend(find_many(conn, &raced).await?);
    }
    Ok(ids)
}
