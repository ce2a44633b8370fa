//! The checkout lifecycle (DESIGN §10) against the real Postgres: a quote writes nothing, a
//! commit is recorded once per customer and order id (its body compared in canonical form), a
//! reversal gives a whole order's discount back, and a once-grant is consumed by one order even
//! when many commit at once. Commit and reverse are the billing service's, never a customer's.

use std::sync::Arc;

use super::*;

/// POST `path` with `token` and `body`: the status and the JSON answer.
async fn post(s: &Server, token: &str, path: &str, body: Value) -> (StatusCode, Value) {
    let response = s
        .http
        .post(format!("{}{path}", s.base))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn service() -> String {
    token("billing-service", Some("billing-service"), 300)
}

/// `subject` redeems a discount code granting `terms` (seeded as the controller writes it).
async fn granted(s: &Server, subject: &str, code: &str, terms: Value) -> String {
    s.seed(&format!(
        "INSERT INTO promo_codes (code, credit_omr, discount) VALUES ('{code}', 0, '{terms}') \
         ON CONFLICT (code) DO NOTHING"
    ))
    .await;
    let (status, answer) = s
        .redeem(
            Some(&token(subject, None, 300)),
            json!({"code": code, "tenant_id": "t"}),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer["discount"]["grant_id"].as_str().unwrap().to_owned()
}

fn order() -> Value {
    json!([
        {"id": "a", "category": "install", "amount": 10_005},
        {"id": "b", "category": "install", "amount": 3_000},
        {"id": "c", "category": "support", "amount": 7_000},
    ])
}

#[tokio::test]
async fn an_order_is_quoted_committed_once_and_reversed_whole() {
    let s = start().await;
    let grant = granted(
        &s,
        "alice",
        "INSTALLS-20",
        json!({"percent_off": 20, "applies_to": ["install"]}),
    )
    .await;
    let alice = token("alice", None, 300);

    // The customer's quote: two installs discounted (floored), the support line not.
    let (status, quote) = post(
        &s,
        &alice,
        "/billing/vouchers/checkout/quote",
        json!({"lines": order()}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{quote}");
    let discounts: Vec<i64> = quote["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["discount"].as_i64().unwrap())
        .collect();
    assert_eq!(discounts, [2001, 600, 0]);
    assert_eq!(
        (quote["total"].as_i64(), quote["discount"].as_i64()),
        (Some(20_005), Some(2601))
    );
    assert_eq!(quote["lines"][0]["code"], "INSTALLS-20");
    assert_eq!(quote["lines"][0]["grant_id"], grant.as_str());
    assert_eq!(quote["lines"][2]["code"], Value::Null);
    assert_eq!(quote["currency"], "OMR");
    let orders: i64 = s
        .scalar("SELECT count(*) FROM voucher_checkout_orders")
        .await;
    assert_eq!(orders, 0, "a quote writes nothing");

    // Committed by the billing service: what the quote said.
    let commit = json!({"user_id": "alice", "order_id": "ORD-1", "lines": order()});
    let (status, committed) = post(
        &s,
        &service(),
        "/billing/vouchers/checkout/commit",
        commit.clone(),
    )
    .await;
    assert_eq!(
        (status, &committed),
        (StatusCode::OK, &quote),
        "quote equals commit"
    );
    // A repeat with the lines in another order: the same answer, recorded once.
    let mut reordered = commit.clone();
    reordered["lines"].as_array_mut().unwrap().reverse();
    let (status, repeat) = post(
        &s,
        &service(),
        "/billing/vouchers/checkout/commit",
        reordered,
    )
    .await;
    assert_eq!((status, &repeat), (StatusCode::OK, &committed));
    // Another body under the same order id: refused.
    let mut changed = commit.clone();
    changed["lines"][0]["amount"] = json!(99);
    let (status, refused) =
        post(&s, &service(), "/billing/vouchers/checkout/commit", changed).await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("was committed before with other lines")
    );
    // A customer never commits what it priced itself.
    let (status, refused) = post(
        &s,
        &alice,
        "/billing/vouchers/checkout/commit",
        json!({"user_id": "alice", "order_id": "ORD-9", "lines": order()}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");

    // The once-grant is spent: the next order takes nothing off.
    let (_, second) = post(
        &s,
        &service(),
        "/billing/vouchers/checkout/commit",
        json!({"user_id": "alice", "order_id": "ORD-2", "lines": order()}),
    )
    .await;
    assert_eq!(second["discount"], 0, "{second}");

    // Reversed whole: the discount given back, the once-grant usable again; a repeat, the same.
    let reverse = |order: &str| format!("/billing/vouchers/checkout/orders/{order}/reverse");
    let (status, reversed) = post(
        &s,
        &service(),
        &reverse("ORD-1"),
        json!({"user_id": "alice", "reason": "refunded"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{reversed}");
    assert_eq!(reversed["discount"], 2601);
    assert_eq!(reversed["grants_released"], json!([grant]));
    let (_, again) = post(
        &s,
        &alice,
        "/billing/vouchers/checkout/quote",
        json!({"lines": order()}),
    )
    .await;
    assert_eq!(again["discount"], 2601, "usable again: {again}");
    let (status, repeat) = post(
        &s,
        &service(),
        &reverse("ORD-1"),
        json!({"user_id": "alice", "reason": "refunded"}),
    )
    .await;
    assert_eq!((status, &repeat), (StatusCode::OK, &reversed));
    let (status, _) = post(
        &s,
        &service(),
        &reverse("ORD-404"),
        json!({"user_id": "alice"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = post(&s, &alice, &reverse("ORD-1"), json!({"user_id": "alice"})).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a customer never reverses an order it was charged for"
    );

    // Audited in the same transactions: one record per grant and order.
    let kinds: Vec<(String, String)> = sqlx::query_as(
        "SELECT kind, payload->'order'->>'order_id' FROM voucher_audit_outbox \
         WHERE kind IN ('discount_applied', 'discount_reversed') ORDER BY seq",
    )
    .fetch_all(&s.pool)
    .await
    .unwrap();
    assert_eq!(
        kinds,
        [
            ("discount_applied".to_owned(), "ORD-1".to_owned()),
            ("discount_reversed".to_owned(), "ORD-1".to_owned())
        ]
    );
}

#[tokio::test]
async fn fifty_commits_at_once_consume_a_once_grant_once() {
    let s = Arc::new(start().await);
    granted(&s, "bob", "FIVE-OFF", json!({"amount_off": 5000})).await;
    let commits: Vec<_> = (0..50)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let body = json!({"user_id": "bob", "order_id": format!("ORD-{i}"),
                                  "lines": [{"id": "l", "category": "install", "amount": 8000}]});
                post(&s, &service(), "/billing/vouchers/checkout/commit", body).await
            })
        })
        .collect();
    let mut discounted = 0;
    for commit in commits {
        let (status, answer) = commit.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{answer}");
        if answer["discount"] != 0 {
            assert_eq!(answer["discount"], 5000);
            discounted += 1;
        }
    }
    assert_eq!(discounted, 1, "exactly one order discounted");
    let uses: i64 = s.scalar("SELECT count(*) FROM voucher_checkout_uses").await;
    assert_eq!(uses, 1);
}

#[tokio::test]
async fn two_commits_of_one_order_at_once_record_it_once() {
    let s = Arc::new(start().await);
    granted(
        &s,
        "carol",
        "TEN-PC",
        json!({"percent_off": 10, "duration_months": 3}),
    )
    .await;
    let body = json!({"user_id": "carol", "order_id": "SAME", "lines": order()});
    let service = service();
    let (a, b) = tokio::join!(
        post(
            &s,
            &service,
            "/billing/vouchers/checkout/commit",
            body.clone()
        ),
        post(
            &s,
            &service,
            "/billing/vouchers/checkout/commit",
            body.clone()
        ),
    );
    assert_eq!((a.0, b.0), (StatusCode::OK, StatusCode::OK));
    assert_eq!(a.1, b.1, "the same answer");
    let (orders, uses): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM voucher_checkout_orders), (SELECT count(*) FROM voucher_checkout_uses)",
    )
    .fetch_one(&s.pool)
    .await
    .unwrap();
    assert_eq!((orders, uses), (1, 3), "one order, a use per line");
}

#[tokio::test]
async fn an_ended_repeating_grant_discounts_nothing() {
    let s = start().await;
    // erin holds a live 5 % for a month, and a 50 % redeemed two months ago (written as the
    // redemption wrote it then): its month is over.
    granted(
        &s,
        "erin",
        "OTHER-5",
        json!({"percent_off": 5, "duration_months": 1}),
    )
    .await;
    s.seed(
        "INSERT INTO promo_codes (code, credit_omr, discount) VALUES ('OLD-50', 0, '{\"percent_off\": 50}'); \
         INSERT INTO voucher_discount_grants (customer_id, code, percent_off, applies_to, \
           duration_months, currency, starts_at, ends_at) \
         SELECT id, 'OLD-50', 50, '{}', 1, 'OMR', now() - interval '2 months', now() - interval '1 month' \
         FROM customers WHERE user_id = 'erin'",
    )
    .await;
    let (_, quote) = post(
        &s,
        &token("erin", None, 300),
        "/billing/vouchers/checkout/quote",
        json!({"lines": order()}),
    )
    .await;
    // The ended 50 % takes nothing; the live 5 % does.
    assert_eq!(quote["lines"][0]["code"], "OTHER-5", "{quote}");
    assert_eq!(quote["discount"], 500 + 150 + 350);
}

#[tokio::test]
async fn a_malformed_order_is_refused_naming_the_field_and_writes_nothing() {
    let s = start().await;
    granted(&s, "frank", "TEN-OFF", json!({"percent_off": 10})).await;
    let line = |amount: Value| json!([{"id": "a", "category": "install", "amount": amount}]);
    let many: Vec<Value> = (0..201)
        .map(|i| json!({"id": format!("l{i}"), "category": "usage", "amount": 1}))
        .collect();
    // (body, what the 400 says, why)
    let cases = [
        (
            json!({"user_id": "frank", "order_id": "O", "lines": line(json!(-5))}),
            "lines[0].amount is -5",
            "a negative amount",
        ),
        (
            json!({"user_id": "frank", "order_id": "O", "lines": line(json!(1.5))}),
            "lines[0].amount",
            "a fraction of a minor unit",
        ),
        (
            json!({"user_id": "frank", "order_id": "O", "lines": line(json!(1_000_000_000_001_i64))}),
            "lines[0].amount is 1000000000001",
            "past 10^12",
        ),
        (
            json!({"user_id": "frank", "order_id": "O", "lines": line(json!("5"))}),
            "lines[0].amount",
            "not a number",
        ),
        (
            json!({"user_id": "frank", "order_id": "O", "lines": [{"id": "a", "category": "instal", "amount": 1}]}),
            "lines[0].category \"instal\" is not a charge category",
            "a typo",
        ),
        (
            json!({"user_id": "frank", "order_id": "O", "lines": [{"id": "a", "category": "usage", "amount": 1}, {"id": "a", "category": "usage", "amount": 2}]}),
            "lines[1].id \"a\" appears twice",
            "a line id twice",
        ),
        (
            json!({"user_id": "frank", "order_id": "O", "lines": many}),
            "at most 200 lines; this one has 201",
            "too many lines",
        ),
        (
            json!({"user_id": "frank", "order_id": "O".repeat(129), "lines": line(json!(1))}),
            "\"order_id\" must be 1 to 128 characters",
            "a long order id",
        ),
        (
            json!({"user_id": "frank", "order_id": "O\u{7}", "lines": line(json!(1))}),
            "\"order_id\" must be 1 to 128 characters without control characters",
            "a control character",
        ),
        (
            json!({"order_id": "O", "lines": line(json!(1))}),
            "the field \"user_id\" is required",
            "the service names the customer",
        ),
        (
            json!({"user_id": "frank", "lines": line(json!(1))}),
            "the field \"order_id\" is required",
            "an order id",
        ),
    ];
    for (body, says, why) in cases {
        let (status, answer) =
            post(&s, &service(), "/billing/vouchers/checkout/commit", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{why}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(says),
            "{why}: {error:?} does not say {says:?}"
        );
    }
    // 200 lines with ids of 128 characters fit the body limit.
    let widest: Vec<Value> = (0..200)
        .map(|i| json!({"id": format!("{i:0>128}"), "category": "usage", "amount": 1_000_000_000_000_i64}))
        .collect();
    let (status, answer) = post(
        &s,
        &service(),
        "/billing/vouchers/checkout/quote",
        json!({"user_id": "frank", "lines": widest}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (orders, uses, consumed): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM voucher_checkout_orders), (SELECT count(*) FROM voucher_checkout_uses), \
                (SELECT count(*) FROM voucher_discount_grants WHERE consumed_by IS NOT NULL)",
    )
    .fetch_one(&s.pool)
    .await
    .unwrap();
    assert_eq!((orders, uses, consumed), (0, 0, 0), "nothing written");
}

fn admin() -> String {
    token("root", Some("superadmin"), 300)
}

/// Counter, live redemption rows, unreversed ledger grants + unreversed discount grants, and
/// history rows of `code`: the first three are equal whatever was reversed.
async fn books(s: &Server, code: &str) -> (i64, i64, i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT times_redeemed FROM promo_codes WHERE code = $1)::bigint, \
                (SELECT count(*) FROM promo_redemptions WHERE code = $1), \
                (SELECT count(*) FROM credit_ledger WHERE reason = 'promo:' || $1) \
                - (SELECT count(*) FROM credit_ledger WHERE reason = 'promo-reversal:' || $1) \
                + (SELECT count(*) FROM voucher_discount_grants WHERE code = $1 AND ended_at IS NULL), \
                (SELECT count(*) FROM voucher_redemption_history WHERE code = $1)",
    )
    .bind(code)
    .fetch_one(&s.pool)
    .await
    .unwrap()
}

const REVERSE: &str = "/billing/vouchers/redemptions/reverse";

#[tokio::test]
async fn a_reversed_redemption_frees_its_slot_and_keeps_the_books_exact() {
    let s = start().await;
    s.seed("INSERT INTO promo_codes (code, credit_omr, max_redemptions) VALUES ('BACK-10', 10, 1)")
        .await;
    let gina = token("gina", None, 300);
    let body = json!({"code": "BACK-10", "tenant_id": "t"});
    let (status, first) = s.redeem(Some(&gina), body.clone(), Some("gina-1")).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(books(&s, "BACK-10").await, (1, 1, 1, 0));

    let reversal = json!({"code": "back-10", "user_id": "gina", "reason": "goodwill mistake"});
    let (status, refused) = post(&s, &gina, REVERSE, reversal.clone()).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a customer reverses nothing: {refused}"
    );
    let (status, refused) = post(&s, &service(), REVERSE, reversal.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "nor the checkout: {refused}");
    let (status, reversed) = post(&s, &admin(), REVERSE, reversal.clone()).await;
    assert_eq!(status, StatusCode::OK, "{reversed}");
    assert_eq!(
        (reversed["credit_omr"].as_i64(), reversed["code"].as_str()),
        (Some(10), Some("BACK-10"))
    );
    assert_eq!(
        books(&s, "BACK-10").await,
        (0, 0, 0, 1),
        "the slot freed, the credit clawed back"
    );
    let balance: i64 = s
        .scalar("SELECT sum(amount_omr)::bigint FROM credit_ledger l JOIN customers c ON c.id = l.customer_id WHERE c.user_id = 'gina'")
        .await;
    assert_eq!(balance, 0);
    // The original request's key still answers the original grant.
    let (status, replayed) = s.redeem(Some(&gina), body.clone(), Some("gina-1")).await;
    assert_eq!((status, &replayed), (StatusCode::OK, &first));
    // The slot is free (cap 1): the customer redeems again, once.
    s.assert_redeems(Some(&gina), body.clone()).await;
    assert_eq!(books(&s, "BACK-10").await, (1, 1, 1, 1));
    let (status, _) = post(
        &s,
        &admin(),
        REVERSE,
        json!({"code": "BACK-10", "user_id": "nobody"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let kinds: i64 = s
        .scalar("SELECT count(*) FROM voucher_audit_outbox WHERE kind = 'redemption_reversed' AND code = 'BACK-10'")
        .await;
    assert_eq!(kinds, 1);
}

#[tokio::test]
async fn a_reversal_is_refused_when_the_balance_no_longer_covers_the_credit() {
    let s = start().await;
    s.seed("INSERT INTO promo_codes (code, credit_omr) VALUES ('SPENT-10', 10)")
        .await;
    s.assert_redeems(
        Some(&token("hana", None, 300)),
        json!({"code": "SPENT-10", "tenant_id": "t"}),
    )
    .await;
    // Six of the ten rial spent by the billing service.
    s.seed(
        "INSERT INTO credit_ledger (customer_id, amount_omr, reason) \
         SELECT id, -6, 'order:A-1' FROM customers WHERE user_id = 'hana'",
    )
    .await;
    let (status, refused) = post(
        &s,
        &admin(),
        REVERSE,
        json!({"code": "SPENT-10", "user_id": "hana"}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("balance (4 OMR) no longer covers the 10 OMR credit"),
        "{refused}"
    );
    assert_eq!(
        books(&s, "SPENT-10").await,
        (1, 1, 1, 0),
        "nothing reversed"
    );
}

#[tokio::test]
async fn a_reversed_discount_ends_its_grant_and_the_customer_may_redeem_again() {
    let s = start().await;
    let first = granted(
        &s,
        "ivan",
        "AGAIN-15",
        json!({"percent_off": 15, "duration_months": 2}),
    )
    .await;
    let (status, reversed) = post(
        &s,
        &admin(),
        REVERSE,
        json!({"code": "AGAIN-15", "user_id": "ivan"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{reversed}");
    assert_eq!(reversed["grant_id"], first.as_str());
    assert_eq!(books(&s, "AGAIN-15").await, (0, 0, 0, 1));
    let (_, quote) = post(
        &s,
        &token("ivan", None, 300),
        "/billing/vouchers/checkout/quote",
        json!({"lines": order()}),
    )
    .await;
    assert_eq!(quote["discount"], 0, "an ended grant discounts nothing");
    let second = granted(&s, "ivan", "AGAIN-15", json!({"percent_off": 15})).await;
    assert_ne!(second, first, "a new grant");
    assert_eq!(books(&s, "AGAIN-15").await, (1, 1, 1, 1));
}

#[tokio::test]
async fn the_report_of_a_period_matches_the_rows() {
    let s = start().await;
    s.seed("INSERT INTO promo_codes (code, credit_omr) VALUES ('REP-5', 5)")
        .await;
    for who in ["r1", "r2", "r3"] {
        s.assert_redeems(
            Some(&token(who, None, 300)),
            json!({"code": "REP-5", "tenant_id": "t"}),
        )
        .await;
    }
    post(
        &s,
        &admin(),
        REVERSE,
        json!({"code": "REP-5", "user_id": "r3"}),
    )
    .await;
    granted(
        &s,
        "r1",
        "REP-PC",
        json!({"percent_off": 20, "applies_to": ["install"]}),
    )
    .await;
    let r1 = json!({"user_id": "r1", "order_id": "R-1", "lines": order()});
    post(&s, &service(), "/billing/vouchers/checkout/commit", r1).await;
    granted(
        &s,
        "r2",
        "REP-PC",
        json!({"percent_off": 20, "applies_to": ["install"]}),
    )
    .await;
    let r2 = json!({"user_id": "r2", "order_id": "R-2", "lines": order()});
    post(&s, &service(), "/billing/vouchers/checkout/commit", r2).await;
    post(
        &s,
        &service(),
        "/billing/vouchers/checkout/orders/R-2/reverse",
        json!({"user_id": "r2"}),
    )
    .await;

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_voucher-operator"))
        .args([
            "report",
            "--database-url",
            &s.url,
            "--from",
            "2020-01-01",
            "--to",
            "2100-01-01",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let csv = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        csv,
        "code,namespace,redemptions,credit_omr,discount,currency,reversals\n\
         REP-5,,3,15,0,OMR,1\n\
         REP-PC,,2,0,2601,OMR,0\n",
        "three redemptions of 5 (one reversed), and one order's 2,601 (the other reversed)"
    );
    // A period before any of it: nothing.
    let empty = std::process::Command::new(env!("CARGO_BIN_EXE_voucher-operator"))
        .args([
            "report",
            "--database-url",
            &s.url,
            "--from",
            "2020-01-01",
            "--to",
            "2020-02-01",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&empty.stdout).lines().count(),
        1,
        "the header only"
    );
}
