//! All SQL on the billing service's `customers` table.

use sqlx::PgConnection;
use uuid::Uuid;

use super::Result;

/// The customers of `user_ids` that exist, by user id.
pub(crate) async fn find_many(
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

/// Creates the customers `(user id, tenant, email)` that do not exist yet (one created
/// meanwhile by another request is found): their ids, by user id.
pub(crate) async fn ensure_many(
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
