//! All SQL on the operator's `voucher_discount_grants` table: what a
//! redemption of a discount code granted its customer (DESIGN §10).

use std::collections::HashMap;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

use super::Result;
use crate::domain::{Currency, Discount, Off};

/// A customer's discount grant: the terms as redeemed, and when it ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscountGrant {
    pub grant_id: Uuid,
    #[serde(flatten)]
    pub discount: Discount,
    pub starts_at: DateTime<Utc>,
    /// `None`: a once-grant without an end (it lives until used).
    pub ends_at: Option<DateTime<Utc>>,
}

/// Grants `discount` to each of `customers` for `code`, from `starts_at`:
/// the grants, by customer. Their end is the discount's (`expires_at`: the
/// voucher's, which ends a once-grant).
pub(crate) async fn insert_many(
    conn: &mut PgConnection,
    customers: &[Uuid],
    code: &str,
    (discount, currency): (&Discount, &Currency),
    starts_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
) -> Result<HashMap<Uuid, DiscountGrant>> {
    let (percent_off, amount_off) = discount.off.split();
    // As the database keeps it (to the microsecond), so the answer is what a read gives back.
    let starts_at = starts_at.trunc_subsecs(6);
    let ends_at = discount.ends_at(starts_at, expires_at);
    let rows: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "INSERT INTO voucher_discount_grants (customer_id, code, percent_off, amount_off, \
         applies_to, duration_months, currency, starts_at, ends_at) \
         SELECT unnest($1::uuid[]), $2, $3, $4, $5, $6, $7, $8, $9 \
         RETURNING customer_id, grant_id",
    )
    .bind(customers)
    .bind(code)
    .bind(percent_off)
    .bind(amount_off)
    .bind(&discount.applies_to)
    .bind(discount.duration_months)
    .bind(currency.as_str())
    .bind(starts_at)
    .bind(ends_at)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(customer, grant_id)| {
            let grant = DiscountGrant {
                grant_id,
                discount: discount.clone(),
                starts_at,
                ends_at,
            };
            (customer, grant)
        })
        .collect())
}

#[derive(sqlx::FromRow)]
pub(crate) struct GrantRow {
    pub(crate) grant_id: Uuid,
    pub(crate) percent_off: Option<i32>,
    pub(crate) amount_off: Option<i64>,
    pub(crate) applies_to: Vec<String>,
    pub(crate) duration_months: Option<i32>,
    pub(crate) starts_at: DateTime<Utc>,
    pub(crate) ends_at: Option<DateTime<Utc>>,
}

impl From<GrantRow> for DiscountGrant {
    fn from(row: GrantRow) -> Self {
        let off = Off::join(row.percent_off, row.amount_off);
        DiscountGrant {
            grant_id: row.grant_id,
            discount: Discount {
                off,
                applies_to: row.applies_to,
                duration_months: row.duration_months,
            },
            starts_at: row.starts_at,
            ends_at: row.ends_at,
        }
    }
}
