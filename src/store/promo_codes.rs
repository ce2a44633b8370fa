//! All SQL on the billing service's `promo_codes` table.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::Result;
use super::outbox::NewAuditRecord;
use crate::domain::{Code, CodeRecord, Discount, TermField, Terms};

/// The columns every query returns, in [`Row`]'s order. A macro so that each
/// statement stays a `&'static str` literal (no SQL is assembled at run time).
/// A campaign's one-row switch for the code `$code` (an SQL expression):
/// true or false for a campaign's code, NULL for any other — and for the
/// codes of a deleted campaign, which an Orphan deletion leaves to themselves.
macro_rules! campaign_on {
    ($code:literal) => {
        concat!(
            "(SELECT c.active FROM voucher_campaign_codes cc \
              JOIN voucher_campaigns c ON c.uid = cc.campaign_uid AND c.released_at IS NULL \
              WHERE cc.code = ",
            $code,
            ")"
        )
    };
}

/// Whether the code `$code`, or its campaign, is suspended (an SQL expression).
macro_rules! suspended {
    ($code:literal) => {
        concat!(
            "EXISTS (SELECT 1 FROM voucher_suspensions s WHERE s.target = ",
            $code,
            " OR s.target = (SELECT 'campaign:' || c.uid FROM voucher_campaign_codes cc \
              JOIN voucher_campaigns c ON c.uid = cc.campaign_uid AND c.released_at IS NULL \
              WHERE cc.code = ",
            $code,
            "))"
        )
    };
}

/// For a global code of `promo_codes` (its row marked), whether the hub last
/// said every unit is spent everywhere; NULL for any other code — whose read
/// (every preview and redemption) never looks into the allotments.
macro_rules! global_gone {
    ($code:literal) => {
        concat!(
            "CASE WHEN promo_codes.global_allotment THEN \
               (SELECT COALESCE((g.state->>'gone')::boolean, false) \
                  FROM voucher_global_allotments g WHERE g.code = ",
            $code,
            ") END"
        )
    };
}

/// For a global code, whether it is once per customer on any Sovereign
/// (`perCustomer: Global`); false for any other code, read without a look
/// into the allotments.
macro_rules! once_anywhere {
    ($code:literal) => {
        concat!(
            "COALESCE(CASE WHEN promo_codes.global_allotment THEN \
               (SELECT g.per_customer_global FROM voucher_global_allotments g WHERE g.code = ",
            $code,
            ") END, false)"
        )
    };
}

macro_rules! returning {
    () => {
        concat!(
            "code, credit_omr, description, active, max_redemptions, valid_from, expires_at, \
             discount, times_redeemed, created_at, deleted_at, ",
            campaign_on!("promo_codes.code"),
            " AS campaign_on, ",
            suspended!("promo_codes.code"),
            " AS suspended, ",
            global_gone!("promo_codes.code"),
            " AS global_gone, ",
            once_anywhere!("promo_codes.code"),
            " AS once_anywhere"
        )
    };
}

/// Binds `terms` as the next seven parameters, in the order of the table's
/// columns (credit_omr, description, active, max_redemptions, valid_from,
/// expires_at, then the operator's discount): every statement that writes
/// terms, whatever its query type.
macro_rules! bind_terms {
    ($query:expr, $terms:expr) => {{
        let terms: &crate::domain::Terms = $terms;
        $query
            .bind(terms.credit_omr)
            .bind(&terms.description)
            .bind(terms.active)
            .bind(terms.max_redemptions)
            .bind(terms.valid_from)
            .bind(terms.expires_at)
            .bind(terms.discount.as_ref().map(sqlx::types::Json))
    }};
}
pub(crate) use bind_terms;

#[derive(sqlx::FromRow)]
struct Row {
    code: String,
    credit_omr: i32,
    description: String,
    active: bool,
    max_redemptions: i32,
    valid_from: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    discount: Option<sqlx::types::Json<Discount>>,
    times_redeemed: i32,
    created_at: DateTime<Utc>,
    deleted_at: Option<DateTime<Utc>>,
    campaign_on: Option<bool>,
    suspended: bool,
    global_gone: Option<bool>,
    once_anywhere: bool,
}

impl From<Row> for CodeRecord {
    fn from(row: Row) -> Self {
        CodeRecord {
            code: row.code,
            terms: Terms {
                credit_omr: row.credit_omr,
                discount: row.discount.map(|d| d.0),
                description: row.description,
                active: row.active,
                max_redemptions: row.max_redemptions,
                valid_from: row.valid_from,
                expires_at: row.expires_at,
            },
            times_redeemed: row.times_redeemed,
            created_at: row.created_at,
            deleted_at: row.deleted_at,
            campaign_on: row.campaign_on,
            suspended: row.suspended,
            global_gone: row.global_gone,
            once_anywhere: row.once_anywhere,
        }
    }
}

/// The outcome of [`apply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedTerms {
    /// The row before, tombstone included; `None` when it was created.
    pub before: Option<CodeRecord>,
    pub after: CodeRecord,
    /// Terms that differed from the wanted state (all of them on creation).
    pub changed: Vec<TermField>,
}

impl AppliedTerms {
    pub fn created(&self) -> bool {
        self.before.is_none()
    }

    pub fn resurrected(&self) -> bool {
        self.before.as_ref().is_some_and(CodeRecord::is_tombstoned)
    }

    /// Whether the row was written at all.
    pub fn wrote(&self) -> bool {
        self.created() || self.resurrected() || !self.changed.is_empty()
    }
}

/// A code that is not soft-deleted.
pub async fn find_live(conn: &mut PgConnection, code: &Code) -> Result<Option<CodeRecord>> {
    let row: Option<Row> = sqlx::query_as(concat!(
        "SELECT ",
        returning!(),
        " FROM promo_codes WHERE code = $1 AND deleted_at IS NULL"
    ))
    .bind(code.as_str())
    .fetch_optional(conn)
    .await?;
    Ok(row.map(Into::into))
}

/// The row, tombstone or not.
pub async fn find(conn: &mut PgConnection, code: &Code) -> Result<Option<CodeRecord>> {
    let row: Option<Row> = sqlx::query_as(concat!(
        "SELECT ",
        returning!(),
        " FROM promo_codes WHERE code = $1"
    ))
    .bind(code.as_str())
    .fetch_optional(conn)
    .await?;
    Ok(row.map(Into::into))
}

/// The row, tombstone or not, locked until the transaction ends. `NO KEY
/// UPDATE` (the code never changes): it does not wait for the key-share locks
/// that redemptions in flight hold through their `promo_redemptions` foreign
/// key, which would keep a change of a busy code waiting as long as
/// redemptions overlap.
pub(crate) async fn find_for_update(
    conn: &mut PgConnection,
    code: &Code,
) -> Result<Option<CodeRecord>> {
    let row: Option<Row> = sqlx::query_as(concat!(
        "SELECT ",
        returning!(),
        " FROM promo_codes WHERE code = $1 FOR NO KEY UPDATE"
    ))
    .bind(code.as_str())
    .fetch_optional(conn)
    .await?;
    Ok(row.map(Into::into))
}

/// Every live code, ordered by code, but those campaigns issued (up to a
/// million a campaign: they are downloaded a campaign at a time).
pub async fn list_live(conn: &mut PgConnection) -> Result<Vec<CodeRecord>> {
    let rows: Vec<Row> = sqlx::query_as(concat!(
        "SELECT ",
        returning!(),
        " FROM promo_codes WHERE deleted_at IS NULL AND NOT EXISTS \
         (SELECT 1 FROM voucher_campaign_codes c WHERE c.code = promo_codes.code) ORDER BY code"
    ))
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// Makes the row carry `wanted`, writing only when something differs. A
/// tombstone is resurrected; `times_redeemed` and `created_at` are never touched.
pub async fn apply(conn: &mut PgConnection, code: &Code, wanted: &Terms) -> Result<AppliedTerms> {
    let before = find_for_update(conn, code).await?;
    let changed = match &before {
        Some(current) => wanted.changes_from(&current.terms),
        None => TermField::ALL.to_vec(),
    };
    let after = match &before {
        Some(current) if !current.is_tombstoned() && changed.is_empty() => current.clone(),
        Some(_) => {
            const UPDATE: &str = concat!(
                "UPDATE promo_codes SET credit_omr = $2, description = $3, active = $4, \
                 max_redemptions = $5, valid_from = $6, expires_at = $7, discount = $8, \
                 deleted_at = NULL \
                 WHERE code = $1 RETURNING ",
                returning!()
            );
            write(conn, UPDATE, code, wanted).await?
        }
        None => {
            const INSERT: &str = concat!(
                "INSERT INTO promo_codes (code, credit_omr, description, active, \
                 max_redemptions, valid_from, expires_at, discount) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING ",
                returning!()
            );
            write(conn, INSERT, code, wanted).await?
        }
    };
    Ok(AppliedTerms {
        before,
        after,
        changed,
    })
}

async fn write(
    conn: &mut PgConnection,
    sql: &'static str,
    code: &Code,
    terms: &Terms,
) -> Result<CodeRecord> {
    let row: Row = bind_terms!(sqlx::query_as(sql).bind(code.as_str()), terms)
        .fetch_one(conn)
        .await?;
    Ok(row.into())
}

/// Soft-deletes a live code the way the billing service does: `deleted_at =
/// now()`, `active = false`, redemption history kept. Returns the tombstone,
/// or `None` when there was no live row.
pub async fn soft_delete(conn: &mut PgConnection, code: &Code) -> Result<Option<CodeRecord>> {
    let row: Option<Row> = sqlx::query_as(concat!(
        "UPDATE promo_codes SET deleted_at = now(), active = false \
         WHERE code = $1 AND deleted_at IS NULL RETURNING ",
        returning!()
    ))
    .bind(code.as_str())
    .fetch_optional(conn)
    .await?;
    Ok(row.map(Into::into))
}

/// One redemption fewer (a reversal moved its row to the history): the row after.
pub(crate) async fn uncount_redemption(
    conn: &mut PgConnection,
    code: &Code,
) -> Result<Option<CodeRecord>> {
    let row: Option<Row> = sqlx::query_as(concat!(
        "UPDATE promo_codes SET times_redeemed = times_redeemed - 1 WHERE code = $1 RETURNING ",
        returning!()
    ))
    .bind(code.as_str())
    .fetch_optional(conn)
    .await?;
    Ok(row.map(Into::into))
}

/// Counts the redemptions `redeemed` stands for (one audit record each, in
/// the order they are counted) of the code `seen` describes, and appends
/// their audit records (and `exhausted` when the last reaches the cap), in
/// one statement: the one that takes the code's row lock, held until the
/// commit that follows. Counts only while the row is live, active, in its
/// window at `now`, with room under its cap for all of them (re-checked on
/// the row it locks, so the cap is exact) and carries the terms of `seen` —
/// but a global code's cap, which is its share here (operator state that a
/// refill moves, not a term: the guard holds every writer to it);
/// `None` otherwise, and nothing is written. The records' `before`/`after`
/// are those of `seen`, their counters set from the row; a campaign's code's
/// records name the campaign.
pub(crate) async fn count_redemptions(
    conn: &mut PgConnection,
    seen: &CodeRecord,
    now: DateTime<Utc>,
    redeemed: &[NewAuditRecord],
    exhausted: &NewAuditRecord,
) -> Result<Option<CodeRecord>> {
    const COUNT: &str = concat!(
        "WITH counted AS ( \
           UPDATE promo_codes SET times_redeemed = times_redeemed + $8 \
           WHERE code = $1 AND deleted_at IS NULL AND COALESCE(",
        campaign_on!("$1"),
        ", active) AND NOT ",
        suspended!("$1"),
        " \
             AND (valid_from IS NULL OR valid_from <= $2) \
             AND (expires_at IS NULL OR expires_at > $2) \
             AND (max_redemptions = 0 OR times_redeemed + $8 <= max_redemptions) \
             AND credit_omr = $3 AND description = $4 \
             AND (max_redemptions = $5 OR global_allotment) \
             AND valid_from IS NOT DISTINCT FROM $6 AND expires_at IS NOT DISTINCT FROM $7 \
             AND voucher_operator_discount_terms(discount) \
                 IS NOT DISTINCT FROM voucher_operator_discount_terms($15) \
           RETURNING ",
        returning!(),
        "), issued AS ( \
           SELECT COALESCE((SELECT jsonb_build_object('campaign', jsonb_build_object( \
             'namespace', c.namespace, 'name', c.name)) \
             FROM voucher_campaign_codes cc JOIN voucher_campaigns c ON c.uid = cc.campaign_uid \
             WHERE cc.code = $1), '{}'::jsonb) AS campaign \
         ), redeemed AS ( \
           INSERT INTO voucher_audit_outbox (event_id, code, kind, payload) \
           SELECT e.id, counted.code, $9, jsonb_set(jsonb_set(e.payload, \
             '{before,times_redeemed}', to_jsonb(counted.times_redeemed - $8 + e.n - 1)), \
             '{after,times_redeemed}', to_jsonb(counted.times_redeemed - $8 + e.n)) \
             || issued.campaign \
           FROM counted, issued, \
             unnest($10::uuid[], $11::jsonb[]) WITH ORDINALITY AS e(id, payload, n) \
           ORDER BY e.n \
         ), exhausted AS ( \
           INSERT INTO voucher_audit_outbox (event_id, code, kind, payload) \
           SELECT $12, code, $13, jsonb_set(jsonb_set($14::jsonb, '{before,times_redeemed}', \
             to_jsonb(times_redeemed - 1)), '{after,times_redeemed}', to_jsonb(times_redeemed)) \
             || issued.campaign \
           FROM counted, issued \
           WHERE max_redemptions > 0 AND times_redeemed >= max_redemptions \
             AND counted.global_gone IS NULL \
         ) SELECT * FROM counted"
    );
    let terms = &seen.terms;
    let count = i32::try_from(redeemed.len()).expect("a batch fits an i32");
    let kind = redeemed.first().map_or("redeemed", |r| r.kind.as_str());
    let ids: Vec<uuid::Uuid> = redeemed.iter().map(|r| r.event_id).collect();
    let payloads: Vec<&serde_json::Value> = redeemed.iter().map(|r| &r.payload).collect();
    let row: Option<Row> = sqlx::query_as(COUNT)
        .bind(&seen.code)
        .bind(now)
        .bind(terms.credit_omr)
        .bind(&terms.description)
        .bind(terms.max_redemptions)
        .bind(terms.valid_from)
        .bind(terms.expires_at)
        .bind(count)
        .bind(kind)
        .bind(&ids)
        .bind(&payloads)
        .bind(exhausted.event_id)
        .bind(exhausted.kind.as_str())
        .bind(&exhausted.payload)
        .bind(terms.discount.as_ref().map(sqlx::types::Json))
        .fetch_optional(conn)
        .await?;
    Ok(row.map(Into::into))
}

/// Every row but campaign codes, for export: read through `to_jsonb` so that it also works on a
/// billing database the operator never migrated (no window columns yet).
pub async fn export_rows(
    conn: &mut PgConnection,
    include_deleted: bool,
) -> Result<Vec<CodeRecord>> {
    // Campaign codes are the campaign's (a Voucher could only conflict with
    // it); a database the operator never migrated has none.
    let campaigns: bool =
        sqlx::query_scalar("SELECT to_regclass('voucher_campaign_codes') IS NOT NULL")
            .fetch_one(&mut *conn)
            .await?;
    let rows: Vec<serde_json::Value> = if campaigns {
        sqlx::query_scalar(
            "SELECT to_jsonb(p) FROM promo_codes p WHERE ($1 OR deleted_at IS NULL) AND NOT EXISTS \
             (SELECT 1 FROM voucher_campaign_codes c WHERE c.code = p.code) ORDER BY code",
        )
        .bind(include_deleted)
        .fetch_all(conn)
        .await?
    } else {
        sqlx::query_scalar(
            "SELECT to_jsonb(p) FROM promo_codes p WHERE $1 OR deleted_at IS NULL ORDER BY code",
        )
        .bind(include_deleted)
        .fetch_all(conn)
        .await?
    };
    let time = |v: &serde_json::Value| {
        v.as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc))
    };
    let int = |v: &serde_json::Value| v.as_i64().unwrap_or_default() as i32;
    Ok(rows
        .iter()
        .map(|r| CodeRecord {
            code: r["code"].as_str().unwrap_or_default().to_owned(),
            terms: Terms {
                credit_omr: int(&r["credit_omr"]),
                // Absent on a database the operator never migrated.
                discount: serde_json::from_value(r["discount"].clone()).ok().flatten(),
                description: r["description"].as_str().unwrap_or_default().to_owned(),
                active: r["active"].as_bool().unwrap_or(true),
                max_redemptions: int(&r["max_redemptions"]),
                valid_from: time(&r["valid_from"]),
                expires_at: time(&r["expires_at"]),
            },
            times_redeemed: int(&r["times_redeemed"]),
            created_at: time(&r["created_at"]).unwrap_or_default(),
            deleted_at: time(&r["deleted_at"]),
            // Export leaves campaign codes out.
            campaign_on: None,
            suspended: false,
            global_gone: None,
            once_anywhere: false,
        })
        .collect())
}
