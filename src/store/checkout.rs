//! The checkout's transactions (DESIGN §10): a quote (no writes), a commit
//! recorded once per customer and order id, and its reversal. The pricing is
//! `voucher_core::checkout::price`, the same for all three; here the
//! customer's grants are read (and, to commit, locked), the order recorded
//! with the uses of each grant, once-grants consumed or given back, and the
//! audit records written in the same transaction.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgConnection;
use sqlx::types::Json;
use uuid::Uuid;

use super::discounts::{self, DiscountGrant};
use super::outbox::{self, NewAuditRecord};
use super::{Operation, Result, Store, StoreError};
use crate::domain::checkout::{Held, Line, Priced, Quote, price};
use crate::domain::{Actor, AuditData, AuditKind, Currency, Facts, OrderUse};

/// A grant as the checkout names it: its id and its code.
pub type GrantRef = (Uuid, String);

/// An order as a commit priced it, in the currency of its amounts: what the
/// commit is answered with, first and to a repeat (the store renders nothing).
#[derive(Clone, Debug, PartialEq)]
pub struct PricedOrder {
    pub quote: Quote<GrantRef>,
    pub currency: Currency,
}

/// A [`PricedOrder`] as `voucher_checkout_orders.answer` keeps it: the shape
/// every version has written there, so that each reads the others' orders.
#[derive(Serialize, Deserialize)]
struct PricedRecord {
    currency: Currency,
    lines: Vec<PricedLineRecord>,
    total: i64,
    discount: i64,
}

/// A priced line as [`PricedRecord`] keeps it.
#[derive(Serialize, Deserialize)]
struct PricedLineRecord {
    id: String,
    category: String,
    amount: i64,
    discount: i64,
    code: Option<String>,
    grant_id: Option<Uuid>,
}

impl From<&PricedOrder> for PricedRecord {
    fn from(order: &PricedOrder) -> Self {
        let lines = order.quote.lines.iter().map(|p| PricedLineRecord {
            id: p.line.id.clone(),
            category: p.line.category.clone(),
            amount: p.line.amount,
            discount: p.discount,
            code: p.grant.as_ref().map(|(_, code)| code.clone()),
            grant_id: p.grant.as_ref().map(|(id, _)| *id),
        });
        Self {
            currency: order.currency.clone(),
            lines: lines.collect(),
            total: order.quote.total,
            discount: order.quote.discount,
        }
    }
}

impl From<PricedRecord> for PricedOrder {
    fn from(record: PricedRecord) -> Self {
        let lines = record.lines.into_iter().map(|l| Priced {
            line: Line {
                id: l.id,
                category: l.category,
                amount: l.amount,
            },
            discount: l.discount,
            grant: l.grant_id.zip(l.code),
        });
        Self {
            quote: Quote {
                lines: lines.collect(),
                total: record.total,
                discount: record.discount,
            },
            currency: record.currency,
        }
    }
}

/// An order a checkout commits.
pub struct Order<'a> {
    /// The customer (`customers.user_id`).
    pub user_id: &'a str,
    pub order_id: &'a str,
    pub lines: &'a [Line],
    /// Who commits it (the billing service's token subject).
    pub actor: &'a Actor,
    pub currency: &'a Currency,
    pub now: DateTime<Utc>,
}

/// What a commit came to.
#[derive(Debug, PartialEq)]
pub enum Committed {
    /// The order as priced: now, or by the first commit for a repeat.
    Answered(PricedOrder),
    /// The order was committed before with another body.
    Differs,
}

/// What a reversal came to.
#[derive(Debug, PartialEq)]
pub enum Reversed {
    /// The answer: of this reversal, or the first one's for a repeat.
    Answered(Value),
    /// No such order of this customer.
    NotFound,
}

/// A grant as the checkout holds it: the grant's row (the one
/// [`discounts::GrantRow`]) with its code, when it was made, and whether an
/// order consumed it.
#[derive(sqlx::FromRow)]
struct HeldRow {
    #[sqlx(flatten)]
    grant: discounts::GrantRow,
    code: String,
    created_at: DateTime<Utc>,
    consumed: bool,
}

impl From<HeldRow> for Held<GrantRef> {
    fn from(row: HeldRow) -> Self {
        let grant = DiscountGrant::from(row.grant);
        Held {
            id: (grant.grant_id, row.code),
            discount: grant.discount,
            created_at: row.created_at,
            starts_at: grant.starts_at,
            ends_at: grant.ends_at,
            consumed: row.consumed,
        }
    }
}

/// The live grants of `customer`. Read under the customer's checkout lock
/// (see [`customer`]) when committing: every writer of a grant's use
/// (commit, reversal of an order or of a redemption) takes it, so no row
/// lock is needed (each would write the grant's page).
async fn held(conn: &mut PgConnection, customer: Uuid) -> Result<Vec<Held<GrantRef>>> {
    let rows: Vec<HeldRow> = sqlx::query_as(
        "SELECT grant_id, code, percent_off, amount_off, applies_to, duration_months, \
         created_at, starts_at, ends_at, consumed_by IS NOT NULL AS consumed \
         FROM voucher_discount_grants WHERE customer_id = $1 AND ended_at IS NULL",
    )
    .bind(customer)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// The customer of `user_id`, its checkout lock taken first and held to the
/// end of the transaction: commits and reversals of one
/// customer (and reversals of its redemptions) go one at a time. An advisory
/// lock: the runtime may not update the billing service's customers, and
/// redemptions, which only reference the row, must not wait.
pub(crate) async fn customer(conn: &mut PgConnection, user_id: &str) -> Result<Option<Uuid>> {
    // One statement: the lock first (FROM), then the customer.
    Ok(sqlx::query_scalar(
        "SELECT (SELECT id FROM customers WHERE user_id = $1) \
         FROM (SELECT pg_advisory_xact_lock(hashtextextended('checkout:' || $1, 0))) AS locked",
    )
    .bind(user_id)
    .fetch_one(conn)
    .await?)
}

/// An order's body in canonical form: its lines sorted by id.
pub fn canonical(user_id: &str, order_id: &str, lines: &[Line]) -> Value {
    let mut sorted: Vec<&Line> = lines.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let lines: Vec<Value> = sorted
        .iter()
        .map(|l| json!({"id": l.id, "category": l.category, "amount": l.amount}))
        .collect();
    json!({"user_id": user_id, "order_id": order_id, "lines": lines})
}

/// The audit record of `grant`'s share of an order (`kind`: applied or reversed).
fn order_record(
    kind: AuditKind,
    actor: &Actor,
    grant: (&Uuid, &str, i64),
    (user_id, order_id, currency): (&str, &str, &Currency),
) -> NewAuditRecord {
    let (grant_id, code, amount) = grant;
    let said = format!("{} off order {order_id}", currency.format(amount));
    let facts = Facts {
        grant: Some(&said),
        ..Facts::new(code, actor)
    };
    let mut data = AuditData::of(kind, &facts, None, None);
    data.order = Some(OrderUse {
        order_id: order_id.to_owned(),
        user_id: user_id.to_owned(),
        grant_id: grant_id.to_string(),
        amount,
        currency: currency.as_str().to_owned(),
    });
    let payload = serde_json::to_value(&data).expect("audit data serialises");
    NewAuditRecord::new(code, kind, payload)
}

impl Store {
    /// Prices `lines` for the customer of `user_id` with its grants as they
    /// are now; writes nothing. A customer unknown to billing has no grants.
    pub async fn quote(
        &self,
        user_id: &str,
        lines: &[Line],
        now: DateTime<Utc>,
    ) -> Result<Quote<GrantRef>> {
        let run = async {
            // One read: the customer's live grants by its user id (none for a stranger).
            let rows: Vec<HeldRow> = sqlx::query_as(
                "SELECT g.grant_id, g.code, g.percent_off, g.amount_off, g.applies_to, \
                 g.duration_months, g.created_at, g.starts_at, g.ends_at, \
                 g.consumed_by IS NOT NULL AS consumed \
                 FROM customers c JOIN voucher_discount_grants g ON g.customer_id = c.id \
                 WHERE c.user_id = $1 AND g.ended_at IS NULL",
            )
            .bind(user_id)
            .fetch_all(self.pool())
            .await?;
            let held: Vec<Held<GrantRef>> = rows.into_iter().map(Into::into).collect();
            Ok(price(lines, &held, now))
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Checkout, None))
    }

    /// Commits `order` once: priced under the customer's checkout lock (two
    /// commits of one customer go one after the other, so a once-grant is
    /// consumed by exactly one order), recorded with each grant's uses and
    /// one `discount_applied` record per grant, in one transaction. A repeat
    /// with the same body (in canonical form) is answered as the first was.
    pub async fn commit(&self, order: &Order<'_>) -> Result<Committed> {
        let run = async {
            let mut tx = self.pool().begin().await?;
            let committed = commit_steps(&mut tx, order).await?;
            tx.commit().await?;
            Ok(committed)
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Checkout, None))
    }

    /// Reverses the whole order `order_id` of `user_id` (refunded or
    /// cancelled): its once-grants are given back, one `discount_reversed`
    /// record per grant. A repeat is answered as the first reversal was.
    pub async fn reverse_order(
        &self,
        (user_id, order_id): (&str, &str),
        reason: &str,
        actor: &Actor,
        currency: &Currency,
    ) -> Result<Reversed> {
        let run = async {
            let mut tx = self.pool().begin().await?;
            let reversed =
                reverse_steps(&mut tx, (user_id, order_id), reason, actor, currency).await?;
            tx.commit().await?;
            Ok(reversed)
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Checkout, None))
    }
}

async fn commit_steps(tx: &mut PgConnection, order: &Order<'_>) -> Result<Committed> {
    let request = canonical(order.user_id, order.order_id, order.lines);
    let priced = |quote| PricedOrder {
        quote,
        currency: order.currency.clone(),
    };
    let Some(customer) = customer(tx, order.user_id).await? else {
        // No customer, no grant: nothing to record.
        return Ok(Committed::Answered(priced(price(
            order.lines,
            &[],
            order.now,
        ))));
    };
    let held = held(tx, customer).await?;
    let answer = priced(price(order.lines, &held, order.now));
    if record(tx, customer, order, &request, (&answer, &held)).await? {
        return Ok(Committed::Answered(answer));
    }
    // Committed before (the lock makes it visible to a fresh read).
    let (first, Json(answer)): (Value, Json<PricedRecord>) = sqlx::query_as(
        "SELECT request, answer FROM voucher_checkout_orders WHERE customer_id = $1 AND order_id = $2",
    )
    .bind(customer)
    .bind(order.order_id)
    .fetch_one(&mut *tx)
    .await?;
    Ok(if first == request {
        Committed::Answered(answer.into())
    } else {
        Committed::Differs
    })
}

/// Records the order, unless it was committed before (`false`): in one
/// statement, the order, each line's use of a grant, the once-grants it
/// consumed, and one `discount_applied` record per grant it used.
async fn record(
    tx: &mut PgConnection,
    customer: Uuid,
    order: &Order<'_>,
    request: &Value,
    (answer, held): (&PricedOrder, &[Held<GrantRef>]),
) -> Result<bool> {
    let quote = &answer.quote;
    const RECORD: &str = "\
        WITH o AS ( \
          INSERT INTO voucher_checkout_orders (customer_id, order_id, request, answer, committed_by) \
          VALUES ($1, $2, $3, $4, $5) ON CONFLICT (customer_id, order_id) DO NOTHING \
          RETURNING customer_id, order_id \
        ), uses AS ( \
          INSERT INTO voucher_checkout_uses (customer_id, order_id, line_id, grant_id, amount) \
          SELECT o.customer_id, o.order_id, u.line, u.grant_id, u.amount \
          FROM o, unnest($6::text[], $7::uuid[], $8::bigint[]) AS u(line, grant_id, amount) \
        ), consumed AS ( \
          UPDATE voucher_discount_grants g SET consumed_by = o.order_id FROM o \
          WHERE g.grant_id = ANY($9::uuid[]) \
        ), audited AS ( \
          INSERT INTO voucher_audit_outbox (event_id, code, kind, payload) \
          SELECT a.id, a.code, $10, a.payload \
          FROM o, unnest($11::uuid[], $12::text[], $13::jsonb[]) AS a(id, code, payload) \
        ) SELECT count(*) FROM o";
    let used: Vec<(&str, &GrantRef, i64)> = quote
        .lines
        .iter()
        .filter_map(|l| {
            l.grant
                .as_ref()
                .map(|g| (l.line.id.as_str(), g, l.discount))
        })
        .collect();
    let line_ids: Vec<&str> = used.iter().map(|(line, _, _)| *line).collect();
    let grant_ids: Vec<Uuid> = used.iter().map(|(_, (id, _), _)| *id).collect();
    let amounts: Vec<i64> = used.iter().map(|(_, _, amount)| *amount).collect();
    let grants = quote.used();
    let consumed: Vec<Uuid> = grants
        .iter()
        .filter(|g| held.iter().any(|h| h.id == **g && h.is_once()))
        .map(|(id, _)| *id)
        .collect();
    let records: Vec<NewAuditRecord> = grants
        .iter()
        .map(|grant| {
            let amount: i64 = used
                .iter()
                .filter(|(_, g, _)| *g == grant)
                .map(|(_, _, amount)| amount)
                .sum();
            order_record(
                AuditKind::DiscountApplied,
                order.actor,
                (&grant.0, &grant.1, amount),
                (order.user_id, order.order_id, order.currency),
            )
        })
        .collect();
    let inserted: i64 = sqlx::query_scalar(RECORD)
        .bind(customer)
        .bind(order.order_id)
        .bind(request)
        .bind(Json(PricedRecord::from(answer)))
        .bind(order.actor.to_string())
        .bind(&line_ids)
        .bind(&grant_ids)
        .bind(&amounts)
        .bind(&consumed)
        .bind(AuditKind::DiscountApplied.as_str())
        .bind(records.iter().map(|r| r.event_id).collect::<Vec<_>>())
        .bind(records.iter().map(|r| r.code.as_str()).collect::<Vec<_>>())
        .bind(records.iter().map(|r| &r.payload).collect::<Vec<_>>())
        .fetch_one(&mut *tx)
        .await?;
    Ok(inserted == 1)
}

async fn reverse_steps(
    tx: &mut PgConnection,
    (user_id, order_id): (&str, &str),
    reason: &str,
    actor: &Actor,
    currency: &Currency,
) -> Result<Reversed> {
    let Some(customer) = customer(tx, user_id).await? else {
        return Ok(Reversed::NotFound);
    };
    let order: Option<(Option<Value>,)> = sqlx::query_as(
        "SELECT reversal FROM voucher_checkout_orders \
         WHERE customer_id = $1 AND order_id = $2 FOR UPDATE",
    )
    .bind(customer)
    .bind(order_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((reversal,)) = order else {
        return Ok(Reversed::NotFound);
    };
    if let Some(first) = reversal {
        return Ok(Reversed::Answered(first));
    }
    let uses: Vec<(Uuid, String, i64)> = sqlx::query_as(
        "SELECT u.grant_id, g.code, sum(u.amount)::bigint FROM voucher_checkout_uses u \
         JOIN voucher_discount_grants g ON g.grant_id = u.grant_id \
         WHERE u.customer_id = $1 AND u.order_id = $2 GROUP BY u.grant_id, g.code ORDER BY u.grant_id",
    )
    .bind(customer)
    .bind(order_id)
    .fetch_all(&mut *tx)
    .await?;
    let released: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE voucher_discount_grants SET consumed_by = NULL \
         WHERE customer_id = $1 AND consumed_by = $2 RETURNING grant_id",
    )
    .bind(customer)
    .bind(order_id)
    .fetch_all(&mut *tx)
    .await?;
    let given_back: i64 = uses.iter().map(|(_, _, amount)| amount).sum();
    let reversed_at: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *tx)
        .await?;
    let answer = json!({
        "user_id": user_id,
        "order_id": order_id,
        "reason": reason,
        "currency": currency.as_str(),
        "discount": given_back,
        "grants_released": released,
        "reversed_at": reversed_at,
    });
    sqlx::query(
        "UPDATE voucher_checkout_orders SET reversed_at = $3, reversal = $4 \
         WHERE customer_id = $1 AND order_id = $2",
    )
    .bind(customer)
    .bind(order_id)
    .bind(reversed_at)
    .bind(&answer)
    .execute(&mut *tx)
    .await?;
    for (grant_id, code, amount) in &uses {
        let record = order_record(
            AuditKind::DiscountReversed,
            actor,
            (grant_id, code, *amount),
            (user_id, order_id, currency),
        );
        outbox::append(tx, &record).await?;
    }
    Ok(Reversed::Answered(answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An order recorded by an earlier version (the answer as it rendered it) reads back as the
    /// order it priced, and is recorded again in the very same shape.
    #[test]
    fn a_priced_order_is_kept_in_the_shape_every_version_wrote() {
        let earlier = json!({
            "currency": "OMR",
            "lines": [
                {"id": "a", "category": "install", "amount": 10000, "discount": 2000,
                 "code": "DISC-INSTALL", "grant_id": "00000000-0000-0000-0000-000000000007"},
                {"id": "b", "category": "compute", "amount": 500, "discount": 0,
                 "code": null, "grant_id": null},
            ],
            "total": 10500,
            "discount": 2000,
        });
        let record: PricedRecord = serde_json::from_value(earlier.clone()).unwrap();
        let order = PricedOrder::from(record);
        assert_eq!(order.currency, Currency::default());
        assert_eq!(
            order.quote.lines[0].grant,
            Some((Uuid::from_u128(7), "DISC-INSTALL".to_owned()))
        );
        assert_eq!(order.quote.lines[1].grant, None);
        let again = serde_json::to_value(PricedRecord::from(&order)).unwrap();
        assert_eq!(again, earlier);
    }
}
