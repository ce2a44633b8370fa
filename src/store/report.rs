//! The finance report (DESIGN §10): per code, what a period's redemptions
//! granted and what the checkout gave — read from the rows themselves, so it
//! matches them by construction and is checked against them by a test.

use chrono::{DateTime, Utc};

use super::{Operation, Result, Store, StoreError};

/// One code's figures for a period: redemptions made in it (reversed ones
/// included), the credit those granted (whole OMR), the discount orders
/// committed in it took off (minor units of the currency, reversed orders
/// excluded), and the redemptions reversed in it.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct CodeFigures {
    pub code: String,
    /// The namespace of the Voucher or campaign that owns the code; empty when none does.
    pub namespace: String,
    pub redemptions: i64,
    pub credit_omr: i64,
    pub discount: i64,
    pub reversals: i64,
}

impl Store {
    /// The figures of every code with something in `[from, to)`, by code;
    /// only codes owned in `namespace` when one is given.
    pub async fn report(
        &self,
        (from, to): (DateTime<Utc>, DateTime<Utc>),
        namespace: Option<&str>,
    ) -> Result<Vec<CodeFigures>> {
        const REPORT: &str = "\
            WITH redeemed AS ( \
              SELECT code, count(*) AS n FROM ( \
                SELECT code, created_at AS at FROM promo_redemptions \
                UNION ALL SELECT code, redeemed_at FROM voucher_redemption_history) r \
              WHERE at >= $1 AND at < $2 GROUP BY code \
            ), credited AS ( \
              SELECT substr(reason, 7) AS code, sum(amount_omr) AS omr FROM credit_ledger \
              WHERE reason LIKE 'promo:%' AND created_at >= $1 AND created_at < $2 GROUP BY 1 \
            ), discounted AS ( \
              SELECT g.code, sum(u.amount) AS amount FROM voucher_checkout_uses u \
              JOIN voucher_checkout_orders o USING (customer_id, order_id) \
              JOIN voucher_discount_grants g ON g.grant_id = u.grant_id \
              WHERE o.committed_at >= $1 AND o.committed_at < $2 AND o.reversed_at IS NULL \
              GROUP BY g.code \
            ), reversed AS ( \
              SELECT code, count(*) AS n FROM voucher_redemption_history \
              WHERE reversed_at >= $1 AND reversed_at < $2 GROUP BY code \
            ), codes AS ( \
              SELECT code FROM redeemed UNION SELECT code FROM credited \
              UNION SELECT code FROM discounted UNION SELECT code FROM reversed \
            ) \
            SELECT c.code, \
              COALESCE(b.namespace, vc.namespace, '') AS namespace, \
              COALESCE(r.n, 0)::bigint AS redemptions, COALESCE(cr.omr, 0)::bigint AS credit_omr, \
              COALESCE(d.amount, 0)::bigint AS discount, COALESCE(rv.n, 0)::bigint AS reversals \
            FROM codes c \
            LEFT JOIN redeemed r USING (code) LEFT JOIN credited cr USING (code) \
            LEFT JOIN discounted d USING (code) LEFT JOIN reversed rv USING (code) \
            LEFT JOIN voucher_bindings b ON b.code = c.code \
            LEFT JOIN voucher_campaign_codes cc ON cc.code = c.code \
            LEFT JOIN voucher_campaigns vc ON vc.uid = cc.campaign_uid \
            WHERE $3::text IS NULL OR COALESCE(b.namespace, vc.namespace) = $3 \
            ORDER BY c.code";
        let run = async {
            let rows: Vec<CodeFigures> = sqlx::query_as(REPORT)
                .bind(from)
                .bind(to)
                .bind(namespace)
                .fetch_all(self.pool())
                .await?;
            Ok(rows)
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Report, None))
    }
}
