//! Discount codes (DESIGN §10): previewed with their terms, redeemed into the customer's
//! discount grant under every rule a credit has (cap, window, once per customer,
//! Idempotency-Key, audit in the same transaction), never into the ledger.

use std::sync::Arc;

use chrono::{DateTime, Months, Utc};

use super::*;

/// A discount code as the billing database holds it (credit_omr 0, the terms beside it).
async fn seed_discount(s: &Server, code: &str, discount: Value, extra: &str) {
    s.seed(&format!(
        "INSERT INTO promo_codes (code, credit_omr, discount, description{}) VALUES ('{code}', 0, '{discount}', 'a discount'{})",
        if extra.is_empty() { "" } else { ", max_redemptions, expires_at" },
        extra
    ))
    .await;
}

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .unwrap_or_else(|| panic!("not a time: {v}"))
        .with_timezone(&Utc)
}

#[tokio::test]
async fn a_discount_code_is_previewed_and_redeemed_into_a_grant() {
    let s = start().await;
    let terms = json!({"percent_off": 20, "applies_to": ["install"], "duration_months": 3});
    seed_discount(&s, "INSTALLS-20", terms, "").await;
    let (status, preview) = s.preview(r#"{"code":"installs-20"}"#).await;
    assert_eq!(status, StatusCode::OK, "{preview}");
    assert_eq!(
        preview["discount"],
        json!({"percent_off": 20, "applies_to": ["install"], "duration_months": 3})
    );
    assert_eq!(preview["currency"], "OMR");
    assert!(preview.get("credit_omr").is_none(), "no credit: {preview}");

    let alice = token("alice", None, 300);
    let body = json!({"code": "INSTALLS-20", "tenant_id": "t"});
    let (status, granted) = s.redeem(Some(&alice), body.clone(), Some("k-1")).await;
    assert_eq!(status, StatusCode::OK, "{granted}");
    assert_eq!(granted["code"], "INSTALLS-20");
    assert_eq!(granted["currency"], "OMR");
    let discount = &granted["discount"];
    assert_eq!(discount["percent_off"], 20, "{granted}");
    assert_eq!(discount["applies_to"], json!(["install"]));
    assert!(granted.get("credit_omr").is_none() && granted.get("balance_omr").is_none());
    // Three calendar months from the redemption, to the microsecond the database keeps.
    let starts = time(&discount["starts_at"]);
    assert_eq!(
        time(&discount["ends_at"]),
        starts.checked_add_months(Months::new(3)).unwrap()
    );
    let (percent, applies_to, ends_at, customer): (i32, Vec<String>, DateTime<Utc>, String) =
        sqlx::query_as(
            "SELECT g.percent_off, g.applies_to, g.ends_at, c.user_id FROM voucher_discount_grants g \
             JOIN customers c ON c.id = g.customer_id WHERE g.grant_id = $1::uuid",
        )
        .bind(discount["grant_id"].as_str().unwrap())
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(
        (percent, applies_to, customer),
        (20, vec!["install".to_owned()], "alice".to_owned())
    );
    assert_eq!(ends_at, time(&discount["ends_at"]));
    // Counted, no credit in the ledger; audited as a discount in the same transaction.
    assert_eq!(s.counts("INSTALLS-20").await, (1, 1, 0));
    let reason: String = s
        .scalar(
            "SELECT payload->>'reason' FROM voucher_audit_outbox WHERE kind = 'discount_granted'",
        )
        .await;
    assert_eq!(
        reason,
        "redeemed by alice for a discount of 20% install 3mo"
    );

    // The key replays the grant; a second redemption is a repeat that carries it.
    let (status, replayed) = s.redeem(Some(&alice), body.clone(), Some("k-1")).await;
    assert_eq!((status, &replayed), (StatusCode::OK, &granted));
    let (status, again) = s.redeem(Some(&alice), body, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert_eq!(
        again["discount"]["grant_id"], discount["grant_id"],
        "{again}"
    );
    assert_eq!(s.counts("INSTALLS-20").await, (1, 1, 0), "granted once");
}

#[tokio::test]
async fn a_once_grant_ends_with_its_voucher_or_never() {
    let s = start().await;
    let until = "2099-01-01T00:00:00Z";
    seed_discount(
        &s,
        "FIVE-OFF",
        json!({"amount_off": 5000}),
        &format!(", 10, '{until}'"),
    )
    .await;
    seed_discount(
        &s,
        "FOREVER-OFF",
        json!({"amount_off": 250, "applies_to": ["support"]}),
        "",
    )
    .await;
    let bob = token("bob", None, 300);
    let (status, granted) = s
        .redeem(
            Some(&bob),
            json!({"code": "FIVE-OFF", "tenant_id": "t"}),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{granted}");
    assert_eq!(granted["discount"]["amount_off"], 5000);
    assert!(
        granted["discount"].get("percent_off").is_none(),
        "{granted}"
    );
    assert_eq!(
        time(&granted["discount"]["ends_at"]),
        time(&json!(until)),
        "the voucher's expiresAt"
    );
    let (status, granted) = s
        .redeem(
            Some(&bob),
            json!({"code": "FOREVER-OFF", "tenant_id": "t"}),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{granted}");
    assert_eq!(
        granted["discount"]["ends_at"],
        Value::Null,
        "lives until used: {granted}"
    );
}

#[tokio::test]
async fn a_capped_discount_code_is_never_over_redeemed() {
    let s = Arc::new(start().await);
    seed_discount(&s, "CAP-DISCOUNT", json!({"percent_off": 10}), ", 20, NULL").await;
    let requests: Vec<_> = (0..100)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let t = token(&format!("racer-{i}"), None, 300);
                s.redeem(
                    Some(&t),
                    json!({"code": "CAP-DISCOUNT", "tenant_id": "t"}),
                    None,
                )
                .await
                .0
            })
        })
        .collect();
    let (mut ok, mut gone) = (0, 0);
    for request in requests {
        match request.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::GONE => gone += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, gone), (20, 80));
    assert_eq!(s.counts("CAP-DISCOUNT").await, (20, 20, 0));
    let grants: i64 = s
        .scalar("SELECT count(*) FROM voucher_discount_grants WHERE code = 'CAP-DISCOUNT'")
        .await;
    assert_eq!(grants, 20, "one grant a redemption");
}
