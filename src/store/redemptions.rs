//! All SQL on the billing service's `promo_redemptions` table.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::Result;
use super::discounts::{DiscountGrant, GrantRow};

/// A customer's earlier redemption of a code: when, and what it granted (the
/// ledger's credit, or the live discount grant).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Past {
    pub redeemed_at: DateTime<Utc>,
    pub credit_omr: Option<i32>,
    pub discount: Option<DiscountGrant>,
}

/// What an earlier redemption granted, beside `r` (a `promo_redemptions` row): the first
/// ledger grant of its code, and the live discount grant.
macro_rules! past {
    ($from:literal) => {
        concat!(
            "SELECT r.created_at, (SELECT l.amount_omr FROM credit_ledger l \
               WHERE l.customer_id = r.customer_id AND l.reason = 'promo:' || r.code \
               ORDER BY l.created_at LIMIT 1) AS credit_omr, \
             g.grant_id, g.percent_off, g.amount_off, g.applies_to, g.duration_months, \
             g.starts_at, g.ends_at ",
            $from,
            " LEFT JOIN voucher_discount_grants g ON g.customer_id = r.customer_id \
               AND g.code = r.code AND g.ended_at IS NULL"
        )
    };
}

#[derive(sqlx::FromRow)]
struct PastRow {
    created_at: DateTime<Utc>,
    credit_omr: Option<i32>,
    // The discount grant's columns: NULL without one.
    grant_id: Option<Uuid>,
    percent_off: Option<i32>,
    amount_off: Option<i64>,
    applies_to: Option<Vec<String>>,
    duration_months: Option<i32>,
    starts_at: Option<DateTime<Utc>>,
    ends_at: Option<DateTime<Utc>>,
}

impl From<PastRow> for Past {
    fn from(row: PastRow) -> Self {
        let discount = row
            .grant_id
            .zip(row.starts_at)
            .map(|(grant_id, starts_at)| {
                GrantRow {
                    grant_id,
                    percent_off: row.percent_off,
                    amount_off: row.amount_off,
                    applies_to: row.applies_to.unwrap_or_default(),
                    duration_months: row.duration_months,
                    starts_at,
                    ends_at: row.ends_at,
                }
                .into()
            });
        Past {
            redeemed_at: row.created_at,
            credit_omr: row.credit_omr,
            discount,
        }
    }
}

/// When `customer` redeemed `code`, and what it granted.
pub(crate) async fn grant_of(
    conn: &mut PgConnection,
    customer: Uuid,
    code: &str,
) -> Result<Option<Past>> {
    let row: Option<PastRow> = sqlx::query_as(concat!(
        past!("FROM promo_redemptions r"),
        " WHERE r.customer_id = $1 AND r.code = $2"
    ))
    .bind(customer)
    .bind(code)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(Into::into))
}

/// [`grant_of`] for the customer of a token subject: whether it redeemed
/// `code` before, without creating the customer.
pub(crate) async fn grant_of_subject(
    conn: &mut PgConnection,
    subject: &str,
    code: &str,
) -> Result<Option<Past>> {
    let row: Option<PastRow> = sqlx::query_as(concat!(
        past!("FROM customers c JOIN promo_redemptions r ON r.customer_id = c.id"),
        " WHERE c.user_id = $1 AND r.code = $2"
    ))
    .bind(subject)
    .bind(code)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(Into::into))
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
